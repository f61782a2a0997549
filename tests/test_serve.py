"""The HTTP service through FastAPI's test client: predict, limits, health, the page."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient

from clip_decoder import CLIPDecoder
from clip_decoder.serve import Limits, create_app


@pytest.fixture(scope="module")
def model(model_dir):
    return CLIPDecoder.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def model_dir(tiny_clip_dir, tmp_path_factory):
    return CLIPDecoder.create(backbone=f"hf:{tiny_clip_dir}", dim=32, heads=4, ffn_dim=64).save_pretrained(
        tmp_path_factory.mktemp("serve-model"))


@pytest.fixture(scope="module")
def client(model):
    return TestClient(create_app(model, Limits(max_upload_bytes=200_000, max_images=3, max_labels=5)))


def test_predict_matches_the_library(client, model, cat_photo):
    files = [("images", ("cat.jpg", cat_photo.read_bytes(), "image/jpeg")),
             ("images", ("broken.jpg", b"not an image", "image/jpeg"))]
    response = client.post("/v1/predict", files=files, data={"labels": ["cat, dog", "car"], "top_k": "2", "heatmaps": "true"})
    assert response.status_code == 200
    cat, broken = response.json()["results"]
    expected = model.predict([cat_photo], ["cat", "dog", "car"])[0]
    assert cat["image"] == "cat.jpg" and list(cat["scores"]) == ["cat", "dog", "car"]
    np.testing.assert_allclose(list(cat["scores"].values()), expected, atol=1e-5)
    assert len(cat["labels"]) == 2 and set(cat["heatmaps"]) == set(cat["labels"])
    assert all(url.startswith("data:image/png;base64,") for url in cat["heatmaps"].values())
    assert broken["image"] == "broken.jpg" and "broken.jpg" in broken["error"] and "scores" not in broken


@pytest.mark.parametrize("data, count, status, message", [
    ({"labels": ""}, 1, 422, "no labels"),
    ({"labels": "a,b,c,d,e,f"}, 1, 422, "at most 5"),
    ({"labels": "a,a"}, 1, 422, "twice"),
    ({"labels": "cat"}, 4, 413, "at most 3"),
    ({"labels": "cat", "threshold": "2"}, 1, 422, "threshold"),
])
def test_bad_requests_get_a_clear_4xx(client, cat_photo, data, count, status, message):
    files = [("images", (f"{i}.jpg", cat_photo.read_bytes(), "image/jpeg")) for i in range(count)]
    response = client.post("/v1/predict", files=files, data=data)
    assert response.status_code == status and message in response.text


def test_uploads_are_bounded(client):
    response = client.post("/v1/predict", files=[("images", ("big.jpg", b"x" * 200_001, "image/jpeg"))], data={"labels": "cat"})
    assert response.status_code == 413 and "big.jpg" in response.text


def test_heatmaps_without_a_decision_cover_the_best_labels(model, cat_photo):
    client = TestClient(create_app(model))
    files = [("images", ("cat.jpg", cat_photo.read_bytes(), "image/jpeg"))]
    result = client.post("/v1/predict", files=files, data={"labels": "cat,dog,car", "heatmaps": "true"}).json()["results"][0]
    assert "labels" not in result and set(result["heatmaps"]) == {"cat", "dog", "car"}


def test_health_page_and_docs(client):
    assert client.get("/health").json()["status"] == "ok"
    page = client.get("/")
    assert page.status_code == 200 and "/v1/predict" in page.text
    assert "/v1/predict" in client.get("/openapi.json").json()["paths"]
