"""The web page end to end in real headless Chromium (Debian's package, driven by Playwright)."""

from __future__ import annotations

import json
import shutil
import urllib.request

import pytest

from conftest import serving

from clip_decoder import CLIPDecoder
from clip_decoder.serve import create_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def server(tiny_clip_dir):
    """The app around a tiny model, served by uvicorn on a free loopback port."""
    model = CLIPDecoder.create(backbone=f"hf:{tiny_clip_dir}", dim=32, heads=4, ffn_dim=64)
    with serving(create_app(model)) as base:
        yield base


def api_answer(base: str, image_path, labels: str) -> dict:
    boundary = "clip-decoder-test"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"labels\"\r\n\r\n{labels}\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"images\"; filename=\"{image_path.name}\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode() + image_path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(f"{base}/v1/predict", data=body,
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(request) as response:
        return json.load(response)["results"][0]


def test_the_page_shows_the_apis_scores(server, cat_photo, tmp_path):
    playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    if CHROMIUM is None:
        pytest.skip("no Chromium found: install Debian's package (apt-get install chromium) to run the page test")
    labels = "cat, dog, red car"
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(server + "/")
        page.set_input_files("#file", str(cat_photo))
        page.fill("#labels", labels)
        page.click("#run")
        page.wait_for_selector("tr.label")
        read = "rows => rows.map(r => [r.dataset.label, r.querySelector('.score').textContent, r.lastChild.textContent])"
        rows = page.eval_on_selector_all("tr.label", read)
        page.hover("tr.label")  # shows that label's heatmap
        page.wait_for_function("document.getElementById('view').src.startsWith('data:image/png')")
        page.screenshot(path=str(tmp_path / "page.png"))
        page.fill("#threshold", "0")  # a typed threshold decides instead of the model's rule
        page.click("#run")
        page.wait_for_function("[...document.querySelectorAll('tr.label')].every(r => r.lastChild.textContent === 'yes')")
        browser.close()
    answer = api_answer(server, cat_photo, labels)
    expected = answer["scores"]
    assert sorted(label for label, _, _ in rows) == sorted(expected)
    assert [label for label, _, _ in rows] == sorted(expected, key=lambda label: -expected[label])  # by score
    for label, shown, decision in rows:
        assert float(shown) == pytest.approx(expected[label], abs=5e-4)  # the page shows 3 decimals
        assert decision == ("yes" if label in answer["labels"] else "no")  # the model's rule, as the API decided


def test_the_page_never_shows_a_photo_beside_another_ones_results_and_says_what_it_is_doing(server, cat_photo, tmp_path):
    """A new photo and a failed request clear the results; errors read as words; Score is disabled while a
    request runs; the favicon is served."""
    playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    if CHROMIUM is None:
        pytest.skip("no Chromium found: install Debian's package (apt-get install chromium) to run the page test")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"this is not a JPEG")
    rows = "document.querySelectorAll('tr.label').length"
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        refused = []  # every answer of 400 or more the page's own loading met (e.g. a missing favicon)
        page.on("response", lambda response: response.status >= 400 and refused.append(response.url))
        page.goto(server + "/")
        page.wait_for_load_state("networkidle")

        def scored(labels: str) -> None:
            page.fill("#labels", labels)
            page.click("#run")
            page.wait_for_function("!document.getElementById('run').disabled")

        page.set_input_files("#file", str(cat_photo))
        scored("cat, dog")
        assert page.evaluate(rows) == 2
        page.set_input_files("#file", str(broken))  # a new photo: the cat's results go
        assert page.evaluate(rows) == 0 and page.text_content("#error") == ""
        scored("cat, dog")  # the service cannot read it: said in words, nothing else shown
        error = page.text_content("#error")
        assert page.evaluate(rows) == 0 and "broken.jpg" in error and "not a recognised image format" in error

        page.set_input_files("#file", str(cat_photo))
        scored("cat, dog")
        assert page.evaluate(rows) == 2
        scored(" , ")  # no labels: the request fails, and the old results go with it
        error = page.text_content("#error")
        assert page.evaluate(rows) == 0 and "no labels given" in error and not error.startswith(('"', "[", "{"))

        held = []  # a request held back until the page has shown that it runs
        page.route("**/v1/predict", lambda route: held.append(route))
        page.fill("#labels", "cat")
        page.click("#run")
        page.wait_for_function("document.getElementById('run').disabled")
        assert "Scoring" in page.text_content("#status")
        page.wait_for_function("document.getElementById('run').disabled", timeout=500)  # still held
        assert len(held) == 1
        held[0].continue_()
        page.wait_for_function("!document.getElementById('run').disabled")
        assert page.evaluate(rows) == 1 and page.text_content("#status") == ""
        page.unroute("**/v1/predict")
        icon = page.evaluate("fetch('/favicon.ico').then(r => [r.status, r.headers.get('content-type')])")
        browser.close()
    assert icon == [200, "image/svg+xml"] and not [url for url in refused if "/v1/predict" not in url]
