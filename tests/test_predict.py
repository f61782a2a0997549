"""Batch tagging helpers: image inputs, thresholds files, decisions and output formats."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from clip_decoder import ClipDecoderError
from clip_decoder.decisions import Decider
from clip_decoder.inputs import expand_images
from clip_decoder.thresholds import Thresholds
from clip_decoder.writers import Writer

LABELS = ["cat", "dog", "car", "tree"]
SCORES = np.array([0.9, 0.2, 0.6, 0.05], dtype=np.float32)


def test_images_from_files_folders_globs_and_a_list_file(tmp_path, monkeypatch):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/one.jpg", "a/b/two.PNG", "a/notes.txt", "three.jpg"):
        (tmp_path / name).write_bytes(b"x")
    listing = tmp_path / "list.txt"
    listing.write_text("\ufeffthree.jpg\n\n missing.jpg \n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    paths, problems = expand_images(["a", "*.jpg", "a/**/*.PNG"], str(listing))
    # each file once, under the first name it was given; the missing one is reported before anything loads
    assert [str(p) for p in paths] == ["a/b/two.PNG", "a/one.jpg", "three.jpg"]
    assert problems == ["cannot load image 'missing.jpg': file not found"]


def test_a_file_named_twice_is_scored_once(tmp_path, monkeypatch):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "photo.jpg").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    paths, problems = expand_images(["photos/photo.jpg", "photos", str(tmp_path / "photos" / "photo.jpg"),
                                     "photos/../photos/photo.jpg"])
    assert paths == [Path("photos/photo.jpg")] and problems == []


def test_bad_image_inputs_are_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "a.png").write_bytes(b"x")
    paths, problems = expand_images([str(tmp_path / "empty"), str(tmp_path / "*.jpg"), str(tmp_path / "a.png")])
    assert paths == [tmp_path / "a.png"]  # the empty folder and the unmatched pattern do not stop the run
    assert [p.split(" (")[0] for p in problems] == [f"folder {tmp_path / 'empty'} holds no image files",
                                                  f"pattern {str(tmp_path / '*.jpg')!r} matches no file"]
    with pytest.raises(ClipDecoderError, match="cannot read image list"):
        expand_images([], str(tmp_path / "nope.txt"))
    with pytest.raises(ClipDecoderError, match="no images given"):
        expand_images([])


def test_thresholds_file(tmp_path):
    good = tmp_path / "t.json"
    good.write_text(json.dumps({"cat": 0.7, "dog": 1}))
    assert Thresholds.read(good) == Thresholds({"cat": 0.7, "dog": 1.0})
    good.write_text(json.dumps({"default": 0.3, "labels": {"cat": 0.6}, "min_positives": 5}))  # from calibrate
    assert Thresholds.read(good) == Thresholds({"cat": 0.6}, default=0.3)
    for text, message in [("[0.5]", "expected a JSON object"), ('{"cat": 1.5}', "must be a number in"),
                          ('{"cat": true}', "must be a number in"), ('{"cat": "0.5"}', "must be a number in"),
                          ("{oops", "cannot read thresholds"), ('{"default": 2, "labels": {}}', "'default' must be")]:
        good.write_text(text)
        with pytest.raises(ClipDecoderError, match=message):
            Thresholds.read(good)


def test_decisions():
    assert not Decider().active
    assert Decider(top_k=2)(LABELS, SCORES) == ["cat", "car"]
    assert Decider(threshold=0.5)(LABELS, SCORES) == ["cat", "car"]
    assert Decider(threshold=0.1, top_k=1)(LABELS, SCORES) == ["cat"]
    # own thresholds first; the others use --threshold, else 0.5
    assert Decider(thresholds=Thresholds({"cat": 0.95, "tree": 0.01}))(LABELS, SCORES) == ["car", "tree"]
    assert Decider(threshold=0.1, thresholds=Thresholds({"cat": 0.95}))(LABELS, SCORES) == ["car", "dog"]
    with pytest.raises(ClipDecoderError, match="--top-k"):
        Decider(top_k=0)
    with pytest.raises(ClipDecoderError, match="--threshold"):
        Decider(threshold=2.0)


def test_one_reader_gives_calibrated_thresholds_to_trained_and_new_labels_alike(tmp_path, trained, capsys):
    """A thresholds.json from calibrate read through --thresholds decides as --calibrated does: a label the
    model never saw gets the table's new-label threshold, not the trained labels' default."""
    import shutil

    from clip_decoder.cli import main

    out, _, _ = trained
    model = tmp_path / "model"
    shutil.copytree(out, model)
    table = {"default": 0.0, "new_labels": 1.0, "labels": {}, "trained_labels": ["red", "green", "blue", "yellow"]}
    (model / "thresholds.json").write_text(json.dumps(table))
    image = str(Path(__file__).parent / "data" / "chelsea-cat.jpg")
    decided = {}
    for option in (["--calibrated"], ["--thresholds", str(model / "thresholds.json")]):
        assert main(["predict", "--model", str(model), "--labels", "red,white", *option, image]) == 0
        decided[option[0]] = json.loads(capsys.readouterr().out)["labels"]
    assert decided["--calibrated"] == decided["--thresholds"] == ["red"]  # white: never trained on, threshold 1.0
    assert Thresholds.read(model / "thresholds.json").for_labels(["red", "white", "purple"]).tolist() == [0.0, 1.0, 1.0]


@given(st.lists(st.floats(0, 1), min_size=4, max_size=4), st.integers(1, 5), st.floats(0, 1))
def test_decisions_are_the_best_labels_above_the_threshold(scores, top_k, threshold):
    scores = np.array(scores)
    chosen = Decider(top_k=top_k, threshold=threshold)(LABELS, scores)
    assert len(chosen) <= top_k and all(scores[LABELS.index(label)] >= threshold for label in chosen)
    picked = [scores[LABELS.index(label)] for label in chosen]
    assert picked == sorted(picked, reverse=True)
    left_out = [s for label, s in zip(LABELS, scores) if label not in chosen and s >= threshold]
    assert len(chosen) == top_k or not left_out
    assert all(s <= min(picked) for s in left_out)


def written(fmt: str, decider: Decider) -> str:
    out = io.StringIO()
    writer = Writer(out, fmt, LABELS, decider)
    writer.write("a.jpg", SCORES)
    writer.write("b, with comma.jpg", SCORES[::-1].copy())
    return out.getvalue()


def test_jsonl_keeps_every_score_and_adds_the_decision():
    plain = [json.loads(line) for line in written("jsonl", Decider()).splitlines()]
    assert plain[0] == {"image": "a.jpg", "scores": {"cat": 0.9, "dog": 0.2, "car": 0.6, "tree": 0.05}}
    decided = [json.loads(line) for line in written("jsonl", Decider(top_k=1)).splitlines()]
    assert [r["labels"] for r in decided] == [["cat"], ["tree"]] and len(decided[1]["scores"]) == 4


def test_csv_has_a_column_per_label():
    rows = list(csv.reader(io.StringIO(written("csv", Decider(threshold=0.5)))))
    assert rows[0] == ["image", *LABELS, "labels"]
    assert rows[1] == ["a.jpg", "0.900000", "0.200000", "0.600000", "0.050000", "cat|car"]
    assert rows[2][0] == "b, with comma.jpg" and rows[2][-1] == "tree|dog"


def test_table_shows_the_best_labels_or_the_decision():
    assert written("table", Decider()).splitlines()[0] == "a.jpg\tcat 0.90, car 0.60, dog 0.20, tree 0.05"
    assert written("table", Decider(threshold=0.95)).splitlines()[0] == "a.jpg\t(no label; best: cat 0.90)"
