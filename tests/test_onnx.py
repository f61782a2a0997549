"""The ONNX export and the torch-free runtime: parity with the torch model on every model kind, the
command line and the service with --runtime onnx, no torch imported, and clear errors for broken exports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clip_decoder import CLIPDecoder
from clip_decoder.cli import main
from clip_decoder.errors import ClipDecoderError
from clip_decoder.export import export_model
from clip_decoder.caches import file_key
from clip_decoder.onnx_model import GRAPHS, MANIFEST_FILE, OnnxModel
from clip_decoder.prior import imagenet_class_names
from clip_decoder.prompts import SINGLE_TEMPLATE

pytest.importorskip("onnxruntime")

SEVEN = ["cat", "dog", "car", "tree", "person", "bicycle", "flower"]
CLIPART = sorted((Path(__file__).parent / "data" / "clipart").glob("*.png"))  # six OpenClipart test images
TOLERANCE = 1e-4  # absolute, on probabilities


def skimage_photos() -> list[Image.Image]:
    """Real photos that ship with scikit-image (no download)."""
    from skimage import data

    return [Image.fromarray(getattr(data, name)()).convert("RGB") for name in ("astronaut", "coffee", "chelsea", "rocket")]


@pytest.fixture(scope="module")
def packaged_export(tmp_path_factory):
    model = CLIPDecoder.from_pretrained("openclipart")
    out = tmp_path_factory.mktemp("packaged-export")
    export_model(model, out, source="openclipart", log=lambda text: None)
    return model, out


def assert_same_scores(model, exported: OnnxModel, images, labels, templates=None) -> None:
    expected = model.predict(images, labels, templates)
    got = exported.predict(images, labels, templates)
    assert got.shape == expected.shape == (len(images), len(labels))
    assert np.abs(got - expected).max() <= TOLERANCE
    top = min(3, len(labels))
    assert (np.argsort(-got, axis=1, kind="stable")[:, :top] == np.argsort(-expected, axis=1, kind="stable")[:, :top]).all()


@pytest.mark.parametrize("labels", [["cat"], SEVEN], ids=["1 label", "7 labels"])
def test_the_packaged_model_scores_the_same_through_onnx_runtime(packaged_export, cat_photo, labels):
    model, out = packaged_export
    assert_same_scores(model, OnnxModel.load(out), [cat_photo, *skimage_photos()], labels)


def test_a_thousand_labels_score_the_same_and_the_manifest_says_what_was_checked(packaged_export, cat_photo):
    model, out = packaged_export
    labels = list(imagenet_class_names())  # 1,000 labels, through one template to keep the test short
    assert_same_scores(model, OnnxModel.load(out), [cat_photo, *skimage_photos()], labels, SINGLE_TEMPLATE)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["decision"]["trained_threshold"] == model.config.decision_threshold
    assert manifest["prior"]["centring"] == model.config.prior.centring
    assert max(manifest["check"]["max_abs_difference"].values()) < 1e-3


def test_clip_art_test_images_score_the_same(packaged_export):
    model, out = packaged_export
    assert len(CLIPART) == 6
    assert_same_scores(model, OnnxModel.load(out), CLIPART, SEVEN)


CALIBRATED = {"labels": {"red": 0.001}, "default": 0.999, "new_labels": 0.999, "trained_labels": ["red", "green"]}


def test_each_pair_gets_its_labels_weight_plus_the_confidence_weight_times_the_images_confidence(packaged_export):
    """What the runtime feeds scoring.onnx; an export from before image.onnx gave the confidence (format 2) gets each
    label's weight alone, (labels,), as its graph takes it."""
    exported, fed = OnnxModel.load(packaged_export[1]), []

    class Recorder:  # stands in for scoring.onnx: what it was fed is the point
        def run(self, outputs, feed):
            fed.append(feed)
            return [np.zeros((len(feed["tokens"]), len(feed["label_embeddings"])), dtype=np.float32)]

    exported._scoring = Recorder()
    tokens, prior, embeddings = np.zeros((2, 49, 8), np.float32), np.zeros((2, 4), np.float32), np.zeros((3, 4), np.float32)
    weights, gains = np.float32([20.0, 5.0, 0.0]), np.float32([10.0, 10.0, 0.0])  # new, trained, head_only
    exported._scores([tokens, prior, np.float32([0.5, 1.0])], embeddings, weights, gains)
    np.testing.assert_allclose(fed[-1]["prior_weights"], [[25.0, 10.0, 0.0], [30.0, 15.0, 0.0]])
    exported._scores([tokens, prior], embeddings, weights, gains)
    np.testing.assert_allclose(fed[-1]["prior_weights"], [20.0, 5.0, 0.0])


@pytest.fixture(scope="module")
def trained_export(trained, tmp_path_factory):
    """The model trained in the tests (tiny hf CLIP towers), with a calibration table and the prior off on one
    trained label (as `--prior-head-only-margin` can make it), exported on the command line."""
    import shutil

    root = tmp_path_factory.mktemp("trained-export")
    folder, out = root / "model", root / "export"
    shutil.copytree(trained[0], folder)
    (folder / "thresholds.json").write_text(json.dumps(CALIBRATED))
    config = json.loads((folder / "config.json").read_text())
    config["prior"]["head_only"] = config["labels"][:1]
    (folder / "config.json").write_text(json.dumps(config))
    assert main(["export", "--model", str(folder), "--out", str(out)]) == 0
    return folder, out


def test_a_model_trained_in_the_test_and_an_untrained_siglip_head_score_the_same(trained_export, tiny_siglip_dir, tmp_path):
    folder, out = trained_export
    siglip = CLIPDecoder.create(backbone=f"hf:{tiny_siglip_dir}", dim=32, heads=4, ffn_dim=64)
    export_model(siglip, tmp_path / "siglip", log=lambda text: None)
    images = [Image.new("RGB", (40, 30), colour) for colour in ("red", "blue", "white")] + skimage_photos()[:2]
    for model, exported in ((CLIPDecoder.from_pretrained(folder), OnnxModel.load(out)),
                            (siglip, OnnxModel.load(tmp_path / "siglip"))):
        for labels in (["red"], ["red", "green", "blue", "yellow", "white", "black", "cat"], list(imagenet_class_names())):
            assert_same_scores(model, exported, images, labels)  # 1, 7 and 1,000 labels
        exported.set_prior_weights(weight=0.0, seen_weight=0.0)
        model.set_prior(type(model.config.prior).off())
        assert_same_scores(model, exported, images, ["red", "cat"])


def test_predict_with_onnx_runtime_prints_what_the_torch_path_prints_and_imports_no_torch(packaged_export, cat_photo,
                                                                                          tmp_path):
    _, out = packaged_export
    runs = {}
    for runtime in ("torch", "onnx"):
        model = ["--model", str(out)] if runtime == "onnx" else []
        script = ("import json, sys; from clip_decoder.cli import main; code = main(sys.argv[1:]);"
                  " print(json.dumps({'code': code, 'torch': [m for m in sys.modules"
                  " if m.split('.')[0] in ('torch', 'transformers', 'sentence_transformers')]}), file=sys.stderr)")
        done = subprocess.run([sys.executable, "-c", script, "predict", "--runtime", runtime, *model, "--labels",
                               "cat,dog,car", str(cat_photo), str(tmp_path / "missing.jpg")],
                              capture_output=True, text=True, check=False)
        runs[runtime] = (done.stdout, json.loads(done.stderr.strip().splitlines()[-1]), done.stderr)
    (torch_out, torch_end, _), (onnx_out, onnx_end, onnx_err) = runs["torch"], runs["onnx"]
    assert onnx_end == {"code": 1, "torch": []} and torch_end["code"] == 1 and torch_end["torch"]
    torch_record, onnx_record = json.loads(torch_out), json.loads(onnx_out)
    assert onnx_record["labels"] == torch_record["labels"] == ["cat"]
    assert max(abs(onnx_record["scores"][k] - v) for k, v in torch_record["scores"].items()) <= TOLERANCE
    assert "missing.jpg" in onnx_err and "1 of 2 images failed" in onnx_err


def test_the_service_answers_the_same_with_either_runtime(packaged_export, cat_photo):
    from fastapi.testclient import TestClient

    from clip_decoder.serve import create_app

    model, out = packaged_export
    answers = []
    for tagger in (model, OnnxModel.load(out)):
        with TestClient(create_app(tagger)) as client:
            response = client.post("/v1/predict", data={"labels": "cat,dog", "heatmaps": "true"},
                                   files=[("images", ("cat.jpg", cat_photo.read_bytes(), "image/jpeg")),
                                          ("images", ("broken.jpg", b"not an image", "image/jpeg"))])
            assert response.status_code == 200
            answers.append(response.json()["results"])
            assert client.get("/health").json()["trained_labels"] == len(model.config.labels)
    torch_answer, onnx_answer = answers
    assert onnx_answer[0]["labels"] == torch_answer[0]["labels"] == ["cat"]
    assert set(onnx_answer[0]["heatmaps"]) == set(torch_answer[0]["heatmaps"]) == {"cat", "dog"}  # (no rule asked: the best)
    assert abs(onnx_answer[0]["scores"]["dog"] - torch_answer[0]["scores"]["dog"]) <= TOLERANCE
    assert onnx_answer[1] == torch_answer[1]  # the broken image's error, word for word


def test_export_on_the_command_line_and_what_it_refuses(trained_export, tmp_path, capsys):
    folder, out = trained_export
    graphs = [*GRAPHS.values(), *(f"{graph}.data" for graph in GRAPHS.values())]  # each graph's weights beside it
    assert sorted(p.name for p in out.iterdir()) == sorted([*graphs, MANIFEST_FILE, "tokenizer.json", "thresholds.json"])
    image = tmp_path / "blue.png"
    Image.new("RGB", (32, 32), "blue").save(image)
    for runtime, model in (("torch", folder), ("onnx", out)):  # the calibration travels with the export
        assert main(["predict", "--runtime", runtime, "--model", str(model), "--calibrated", "--labels", "red,green",
                     str(image)]) == 0
        assert json.loads(capsys.readouterr().out)["labels"] == ["red"]  # red at 0.001, green at 0.999
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert main(["export", "--model", str(folder), "--out", str(tmp_path / "mine")]) == 2
    assert "holds other files" in capsys.readouterr().err and (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert main(["predict", "--runtime", "onnx", "--model", str(out), "--shortlist", "2", "--labels", "red",
                 str(out / MANIFEST_FILE)]) == 2
    assert "--shortlist is not available with --runtime onnx" in capsys.readouterr().err


def broken_export(source: Path, target: Path, how: str) -> Path:
    import shutil

    shutil.copytree(source, target)
    manifest = json.loads((target / MANIFEST_FILE).read_text())
    if how == "missing graph":
        (target / GRAPHS["scoring"]).unlink()
    elif how == "truncated graph":
        data = (target / GRAPHS["scoring"]).read_bytes()
        (target / GRAPHS["scoring"]).write_bytes(data[: len(data) // 2])
    elif how == "truncated weights":
        with open(target / f"{GRAPHS['text']}.data", "r+b") as f:
            f.truncate(100)
    elif how == "corrupt graph":  # the right size, garbage inside
        size = (target / GRAPHS["scoring"]).stat().st_size
        (target / GRAPHS["scoring"]).write_bytes(b"\x07garbage" * (size // 8) + b"\x00" * (size % 8))
    elif how == "corrupt weights":  # one byte changed: the size is right
        with open(target / f"{GRAPHS['image']}.data", "r+b") as f:
            f.seek(1000)
            byte = f.read(1)
            f.seek(1000)
            f.write(bytes([byte[0] ^ 0xFF]))
    elif how == "graph that does not load":  # e.g. a graph this onnxruntime cannot read; its hash made to fit
        (target / GRAPHS["scoring"]).write_bytes(b"not a graph")
        manifest["files"][GRAPHS["scoring"]] = {"bytes": 11, "sha256": file_key(target / GRAPHS["scoring"])}
        (target / MANIFEST_FILE).write_text(json.dumps(manifest))
    elif how == "newer manifest":
        manifest["format_version"] = 99
        (target / MANIFEST_FILE).write_text(json.dumps(manifest))
    elif how == "format 2 manifest":  # as written before the prior's confidence weight
        manifest["format_version"] = 2
        del manifest["prior"]["confidence_weight"]
        (target / MANIFEST_FILE).write_text(json.dumps(manifest))
    elif how == "not a manifest":
        (target / MANIFEST_FILE).write_text("{oops")
    return target


def test_an_export_from_before_the_confidence_weight_scores_and_refuses_one_in_one_line(trained_export, tmp_path,
                                                                                        capsys, cat_photo):
    older = broken_export(trained_export[1], tmp_path / "older", "format 2 manifest")
    assert OnnxModel.load(older).prior.confidence_weight == 0
    command = ["predict", "--runtime", "onnx", "--model", str(older), "--labels", "red", str(cat_photo)]
    assert main(command) == 0 and "red" in capsys.readouterr().out
    assert main([*command, "--prior-confidence-weight", "10"]) == 2
    err = capsys.readouterr().err.strip()
    assert "exported before the prior's confidence weight: export the model again" in err and len(err.splitlines()) == 1
    assert main([*command, "--prior-confidence-weight", "0", "--prior-weight", "3"]) == 0


@pytest.mark.parametrize("how, message", [
    ("missing graph", "scoring.onnx is missing"),
    ("truncated graph", "scoring.onnx has"),
    ("truncated weights", "text.onnx.data has"),
    ("corrupt graph", "scoring.onnx does not match its sha256 in the manifest"),
    ("corrupt weights", "image.onnx.data does not match its sha256 in the manifest"),
    ("graph that does not load", "scoring.onnx: not a loadable ONNX graph"),
    ("newer manifest", "manifest.json: format_version 99 was written by another clip-decoder"),
    ("not a manifest", "manifest.json: not valid JSON"),
])
def test_a_broken_export_is_refused_in_one_line_naming_the_file(trained_export, tmp_path, capsys, cat_photo, how, message):
    folder, out = trained_export
    bad = broken_export(out, tmp_path / "bad", how)
    assert main(["predict", "--runtime", "onnx", "--model", str(bad), "--labels", "red", str(cat_photo)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1
    with pytest.raises(ClipDecoderError, match="not an export"):
        OnnxModel.load(folder)  # a model folder is not an export


def test_the_readme_snippet_scores_a_photo_with_only_onnxruntime_numpy_pillow_and_tokenizers(packaged_export, cat_photo):
    model, out = packaged_export
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    snippet = readme.split("<!-- onnx-snippet:start -->")[1].split("<!-- onnx-snippet:end -->")[0]
    snippet = snippet.split("```python")[1].split("```")[0].replace('"my-export"', repr(str(out)))
    snippet = snippet.replace('"photo.jpg"', repr(str(cat_photo)))
    check = ("\nimport sys\nassert not [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers',"
             " 'clip_decoder')], 'imported'")
    done = subprocess.run([sys.executable, "-c", snippet + check], capture_output=True, text=True, check=True)
    printed = json.loads(done.stdout.strip().replace("'", '"'))
    expected = model.predict([cat_photo], list(printed))[0]
    assert np.abs(np.array(list(printed.values())) - expected).max() <= 5e-4 + TOLERANCE  # (printed to 3 decimals)


def test_an_install_without_torch_says_so_in_one_line_and_points_to_the_onnx_runtime(cat_photo):
    script = ("import sys; sys.modules['torch'] = None; from clip_decoder.cli import main;"
              f" sys.exit(main(['predict', '--labels', 'cat', {str(cat_photo)!r}]))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "error: `clip-decoder predict` needs the torch package, which is not installed (an install without torch runs"
        " exports: `predict` / `serve --runtime onnx --model EXPORT_DIR`)"]


def test_the_service_runs_an_export_without_importing_torch(packaged_export, cat_photo):
    _, out = packaged_export
    script = f"""
import sys
from fastapi.testclient import TestClient
from clip_decoder.onnx_model import OnnxModel
from clip_decoder.serve import create_app
with TestClient(create_app(OnnxModel.load({str(out)!r}))) as client:
    answer = client.post("/v1/predict", data={{"labels": "cat,dog"}},
                         files=[("images", ("cat.jpg", open({str(cat_photo)!r}, "rb").read(), "image/jpeg"))])
assert answer.json()["results"][0]["labels"] == ["cat"], answer.text
print([m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "sentence_transformers")])
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
