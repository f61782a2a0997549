"""The command line: predict's JSON-lines contract, bad items reported, --help everywhere."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from clip_decoder import CLIPDecoder
from clip_decoder.cli import main


@pytest.fixture(scope="module")
def model_dir(tiny_clip_dir, tmp_path_factory):
    model = CLIPDecoder.create(backbone=f"hf:{tiny_clip_dir}", dim=32, heads=4, ffn_dim=64)
    return model.save_pretrained(tmp_path_factory.mktemp("cli-model"))


def test_predict_prints_every_asked_label_for_each_image(model_dir, cat_photo, tmp_path, capsys):
    folder = tmp_path / "photos" / "nested"
    folder.mkdir(parents=True)
    (folder / "cat.jpg").write_bytes(cat_photo.read_bytes())
    (tmp_path / "photos" / "notes.txt").write_text("not an image")
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("cat\n\ndog\nstreet sign\n")
    code = main(["predict", "--model", str(model_dir), "--labels-file", str(labels_file),
                 "--format", "jsonl", str(cat_photo), str(tmp_path / "photos")])
    assert code == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["image"] for r in records] == [str(cat_photo), str(folder / "cat.jpg")]
    for record in records:
        assert list(record["scores"]) == ["cat", "dog", "street sign"]
        assert all(0 <= p <= 1 for p in record["scores"].values())
    # The same image twice: the same scores, up to float rounding (two rows of one batch may take different
    # kernel paths when other processes load the cores).
    assert records[0]["scores"] == pytest.approx(records[1]["scores"], abs=1e-5)


def test_predict_decides_by_the_model_rule_unless_told_otherwise(tiny_clip_dir, cat_photo, tmp_path, capsys):
    from clip_decoder.thresholds import NEW_LABEL_THRESHOLD

    def predict(folder, *options) -> dict:
        assert main(["predict", "--model", str(folder), "--labels", "cat,dog,car", *options, str(cat_photo)]) == 0
        return json.loads(capsys.readouterr().out)

    model = CLIPDecoder.create(backbone=f"hf:{tiny_clip_dir}", dim=32, heads=4, ffn_dim=64)
    model.set_trained_labels(["cat"])
    scores = predict(model.save_pretrained(tmp_path / "probe"))["scores"]
    for shift, cat_decided in ((-1e-4, True), (1e-4, False)):  # cat, a trained label, at the model's own threshold
        model.set_decision_threshold(scores["cat"] + shift)
        folder = model.save_pretrained(tmp_path / f"model{shift}")
        record = predict(folder)
        new = [label for label in ("dog", "car") if scores[label] >= NEW_LABEL_THRESHOLD]  # the others: new labels
        assert record["labels"] == sorted(["cat"] * cat_decided + new, key=lambda label: -scores[label])
    assert predict(folder, "--threshold", "0")["labels"] == sorted(scores, key=lambda label: -scores[label])
    (tmp_path / "own.json").write_text('{"car": 0.0}')  # a plain file: the other labels keep the model's rule
    assert predict(folder, "--thresholds", str(tmp_path / "own.json"))["labels"] == sorted(
        {"car", *new}, key=lambda label: -scores[label])
    assert predict(folder, "--top-k", "1")["labels"] == [max(scores, key=scores.get)]


def test_predict_with_a_shortlist_decodes_only_the_top_labels(model_dir, cat_photo, capsys):
    labels = "cat,dog,car,tree,house"
    assert main(["predict", "--model", str(model_dir), "--labels", labels, str(cat_photo)]) == 0
    exact = json.loads(capsys.readouterr().out)["scores"]
    assert main(["predict", "--model", str(model_dir), "--labels", labels, "--shortlist", "2", str(cat_photo)]) == 0
    approximate = json.loads(capsys.readouterr().out)["scores"]
    same = [label for label in exact if abs(exact[label] - approximate[label]) < 1e-6]
    assert len(same) >= 2
    assert max(approximate[label] for label in exact if label not in same) < min(approximate[label] for label in same)


def test_predict_csv_with_decisions_globs_and_a_list_file(model_dir, cat_photo, tmp_path, capsys, monkeypatch):
    import csv
    import io

    (tmp_path / "shots").mkdir()
    (tmp_path / "shots" / "cat.jpg").write_bytes(cat_photo.read_bytes())
    (tmp_path / "list.txt").write_text(f"{cat_photo}\n")
    thresholds = tmp_path / "thresholds.json"
    thresholds.write_text('{"cat": 0.0}')
    monkeypatch.chdir(tmp_path)
    code = main(["predict", "--model", str(model_dir), "--labels", "cat,dog,car", "--format", "csv", "--top-k", "2",
                 "--thresholds", str(thresholds), "--threshold", "1.0", "--templates", "ensemble",
                 "--images-from", "list.txt", "shots/*.jpg"])
    assert code == 0
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert rows[0] == ["image", "cat", "dog", "car", "labels"]
    assert [row[0] for row in rows[1:]] == ["shots/cat.jpg", str(cat_photo)]
    assert all(row[-1] == "cat" for row in rows[1:])  # cat passes its own 0.0; the others need 1.0


def test_predict_writes_attention_heatmaps(model_dir, cat_photo, tmp_path, capsys):
    from PIL import Image

    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / cat_photo.name).write_bytes(cat_photo.read_bytes())  # same file name, another folder
    out = tmp_path / "maps"
    assert main(["predict", "--model", str(model_dir), "--labels", "cat,dog,car,tree", "--top-k", "2",
                 "--heatmaps", str(out), str(cat_photo), str(other / cat_photo.name)]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    names = [p.name for p in out.iterdir()]
    assert len(names) == 4  # 2 images x their 2 decided labels, none overwritten
    for record in records:
        for label in record["labels"]:
            assert sum(name.endswith(f"__{label}.png") for name in names) >= 1
    for path in out.iterdir():
        image = Image.open(path)
        assert image.size == (32, 32) and image.mode == "RGB"  # the tiny tower's 32 px view


def test_bad_images_are_reported_and_skipped_and_the_exit_status_says_so(model_dir, cat_photo, tmp_path, capsys):
    broken = tmp_path / "broken.jpg"
    broken.write_text("this is text")
    code = main(["predict", "--model", str(model_dir), "--labels", "cat, dog", "--batch-size", "1",
                 str(broken), str(cat_photo), str(tmp_path / "missing.png")])  # batches where every image fails
    captured = capsys.readouterr()
    assert code == 1
    assert [json.loads(line)["image"] for line in captured.out.splitlines()] == [str(cat_photo)]
    assert "broken.jpg" in captured.err and "missing.png" in captured.err
    assert "2 of 3 images failed" in captured.err and "Traceback" not in captured.err


def test_predict_checks_every_input_before_it_loads_a_model(cat_photo, tmp_path, capsys, monkeypatch):
    from clip_decoder.model import CLIPDecoder

    loaded = []
    monkeypatch.setattr(CLIPDecoder, "from_pretrained", classmethod(lambda cls, *a, **k: loaded.append(a)))
    (tmp_path / "empty").mkdir()
    assert main(["predict", "--labels", "cat", str(tmp_path / "missing.jpg"), str(tmp_path / "empty")]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"error: cannot load image {str(tmp_path / 'missing.jpg')!r}: file not found",
        f"error: folder {tmp_path / 'empty'} holds no image files (.bmp, .gif, .jpeg, .jpg, .png, .tif, .tiff, .webp)",
        "2 of 2 images failed"]
    (tmp_path / "t.json").write_text('{"cat": 7}')
    assert main(["predict", "--labels", "cat", "--thresholds", str(tmp_path / "t.json"), str(cat_photo)]) == 2
    assert "threshold of 'cat' must be a number in [0, 1]" in capsys.readouterr().err
    assert loaded == []  # nothing was loaded for any of them


def test_user_errors_print_one_line_and_exit_2(tmp_path, cat_photo, capsys):
    assert main(["predict", "--model", str(tmp_path / "nope"), "--labels", "cat", str(cat_photo)]) == 2
    assert main(["predict", "--labels", ",", str(cat_photo)]) == 2
    assert main(["predict", "--labels", "cat"]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert errors == [f"error: model folder {tmp_path / 'nope'} does not exist (packaged models: openclipart)", "error: no labels given", "error: no images given"]


def test_an_unwritable_output_path_is_one_line_naming_it(trained, tiny_dataset, tmp_path, capsys):
    out, cache, _ = trained
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(["evaluate", "--model", str(out), "--data", str(tiny_dataset), "--split", str(tiny_dataset / "split.json"),
                 "--json", str(blocker / "metrics.json"), "--cache", str(cache)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert errors == [f"error: cannot write {blocker / 'metrics.json'}: Not a directory (ENOTDIR); nothing was written"]


@pytest.mark.parametrize("argv", [["--help"], ["predict", "--help"]])
def test_help(argv):
    result = subprocess.run([sys.executable, "-m", "clip_decoder", *argv], capture_output=True, text=True)
    assert result.returncode == 0 and "usage: clip-decoder" in result.stdout


@pytest.mark.parametrize("command", ["evaluate", "bench"])
def test_zsl_images_is_offered_explained_and_checked(command, capsys):
    from clip_decoder.cli_parser import build_parser

    parser = build_parser()
    help_text = " ".join(parser._subparsers._group_actions[0].choices[command].format_help().split())
    assert "--zsl-images {with-unseen,all}" in help_text and "(default with-unseen)" in help_text
    assert "all: every test image (the set of LESA, BiAM and the CLIP-Decoder authors' code)" in help_text
    required = {"evaluate": ["--model", "m", "--split", "s.json"], "bench": ["--splits", "s.json"]}[command]
    with pytest.raises(SystemExit) as exited:
        main([command, "--data", "d", *required, "--zsl-images", "every"])
    assert exited.value.code == 2 and "argument --zsl-images: invalid choice: 'every'" in capsys.readouterr().err
