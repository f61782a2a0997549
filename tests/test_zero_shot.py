"""A tower alone, no trained head (--backbone): SigLIP's own sigmoid and CLIP's two-text softmax, against
transformers' models, on the command line and in the service."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from clip_decoder.cli import main
from clip_decoder.images import load_image
from clip_decoder.prompts import SINGLE_TEMPLATE
from clip_decoder.zero_shot import NEUTRAL_LABEL, ZeroShotTagger

LABELS = ["red", "a blue sky", "cat"]


def images():
    return [Image.new("RGB", (40, 30), "red"), Image.new("RGB", (32, 32), "blue"), load_image(Image.new("L", (50, 60), 128))]


def transformers_logits(folder, texts: list[str], pixels: torch.Tensor, siglip: bool) -> torch.Tensor:
    """The model's own logits_per_image, as transformers computes them (its text padded as our tower pads it)."""
    from transformers import AutoModel, AutoTokenizer

    model, tokenizer = AutoModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    tokens = tokenizer(texts, padding="max_length" if siglip else True, truncation=True, max_length=64, return_tensors="pt")
    inputs = {"input_ids": tokens["input_ids"]} if siglip else dict(tokens)
    with torch.no_grad():
        return model(**inputs, pixel_values=pixels).logits_per_image


def test_siglip_alone_gives_its_own_sigmoid_probabilities(tiny_siglip_dir):
    tagger = ZeroShotTagger.load(f"hf:{tiny_siglip_dir}", templates=SINGLE_TEMPLATE)
    pixels = tagger.preprocess.batch(images())
    expected = torch.sigmoid(transformers_logits(tiny_siglip_dir, [SINGLE_TEMPLATE[0].format(label) for label in LABELS],
                                                 pixels, siglip=True))
    got = tagger.predict(images(), LABELS)
    assert got.shape == (3, 3) and np.abs(got - expected.numpy()).max() <= 1e-5
    assert np.abs(tagger.predict(images(), LABELS[:1]) - got[:, :1]).max() <= 1e-6  # independent of the other labels


def test_clip_alone_gives_its_own_softmax_between_the_label_and_a_neutral_prompt(tiny_clip_dir):
    tagger = ZeroShotTagger.load(f"hf:{tiny_clip_dir}", templates=SINGLE_TEMPLATE)
    pixels = tagger.preprocess.batch(images())
    got = tagger.predict(images(), LABELS)
    neutral = SINGLE_TEMPLATE[0].format(NEUTRAL_LABEL)
    for index, label in enumerate(LABELS):
        logits = transformers_logits(tiny_clip_dir, [SINGLE_TEMPLATE[0].format(label), neutral], pixels, siglip=False)
        assert np.abs(got[:, index] - logits.softmax(dim=-1)[:, 0].numpy()).max() <= 1e-5


def test_predict_and_serve_with_a_tower_alone(tiny_siglip_dir, tmp_path, capsys):
    from fastapi.testclient import TestClient

    from clip_decoder.serve import create_app

    image = tmp_path / "red.png"
    Image.new("RGB", (32, 32), "red").save(image)
    backbone = f"hf:{tiny_siglip_dir}"
    assert main(["predict", "--backbone", backbone, "--labels", "red,blue", str(image)]) == 0
    record = json.loads(capsys.readouterr().out)
    expected = ZeroShotTagger.load(backbone).predict([image], ["red", "blue"])[0]
    assert list(record["scores"]) == ["red", "blue"] and np.allclose(list(record["scores"].values()), expected, atol=1e-6)
    assert record["labels"] == [label for label, score in record["scores"].items() if score >= 0.5]  # the default: 0.5
    with TestClient(create_app(ZeroShotTagger.load(backbone))) as client:
        answer = client.post("/v1/predict", data={"labels": "red,blue", "heatmaps": "true"},
                             files=[("images", ("red.png", image.read_bytes(), "image/png"))]).json()["results"][0]
    assert "heatmaps" not in answer and np.allclose(list(answer["scores"].values()), expected, atol=1e-6)


@pytest.mark.parametrize("extra, message", [
    (["--backbone", "offline"], "has no image-text space of its own to tag with (its zero-shot view is 'imagenet')"),
    (["--backbone", "hf:x", "--prior-weight", "3"], "--prior-weight needs a trained model (--model)"),
    (["--backbone", "hf:x", "--heatmaps", "maps"], "--heatmaps needs a trained model (--model)"),
    (["--backbone", "hf:x", "--runtime", "onnx"], "--runtime onnx needs a trained model (--model)"),
])
def test_what_a_tower_alone_cannot_do_is_refused_in_one_line(cat_photo, capsys, extra, message):
    assert main(["predict", *extra, "--labels", "cat", str(cat_photo)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1
    with pytest.raises(SystemExit):  # --model and --backbone are one or the other
        main(["predict", "--model", "my-model", "--backbone", "hf:x", "--labels", "cat", str(cat_photo)])
