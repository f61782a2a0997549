"""The dataset-folder and label-split contracts."""

from __future__ import annotations

import json

import pytest

from clip_decoder import ClipDecoderError
from clip_decoder.data.folder import carve_validation, read_part, read_split, target_matrix, training_parts


def write(path, text, encoding="utf-8"):
    path.write_text(text, encoding=encoding)
    return path


def test_read_part_handles_bom_quotes_unicode_duplicates_and_empty_labels(tmp_path):
    write(tmp_path / "train.csv", '\ufeffimage,labels\na.png,cat|dog\n"b, c.png",caf\u00e9\nempty.png,\na.png,dog|sky\n\n',
          encoding="utf-8")
    samples = read_part(tmp_path, "train")
    assert [(s.image.name, s.labels) for s in samples] == [
        ("a.png", ("cat", "dog", "sky")), ("b, c.png", ("caf\u00e9",)), ("empty.png", ())]
    assert samples[0].image == tmp_path / "a.png"


@pytest.mark.parametrize("text, message", [
    ("path,tags\na.png,cat\n", "header must be 'image,labels'"),
    ("image,labels\na.png,cat,extra\n", "line 2: expected 2 fields"),
    ("", "header"),
])
def test_read_part_errors_name_the_file_and_line(tmp_path, text, message):
    write(tmp_path / "test.csv", text)
    with pytest.raises(ClipDecoderError, match=message):
        read_part(tmp_path, "test")
    with pytest.raises(ClipDecoderError, match="has no val.csv"):
        read_part(tmp_path, "val")


@pytest.mark.parametrize("content, message", [
    ({"seen": ["a", "b"], "unseen": ["b"]}, "both seen and unseen: b"),
    ({"seen": [], "unseen": ["b"]}, "'seen' must be a non-empty list"),
    ({"seen": ["a"]}, "'unseen' must be a list"),
    (["a"], "expected an object"),
])
def test_read_split_rejects_bad_splits(tmp_path, content, message):
    with pytest.raises(ClipDecoderError, match=message):
        read_split(write(tmp_path / "split.json", json.dumps(content)))


def test_read_split_errors_for_missing_and_broken_files(tmp_path):
    with pytest.raises(ClipDecoderError, match="does not exist"):
        read_split(tmp_path / "none.json")
    with pytest.raises(ClipDecoderError, match="not readable JSON"):
        read_split(write(tmp_path / "bad.json", "{"))
    assert read_split(write(tmp_path / "ok.json", '{"seen": ["a", "a"], "unseen": ["c"]}')).all == ("a", "c")


def test_validation_is_carved_deterministically_and_val_csv_wins(tmp_path):
    rows = "".join(f"img{i}.png,cat\n" for i in range(200))
    write(tmp_path / "train.csv", "image,labels\n" + rows)
    train, val = training_parts(tmp_path, 0.1)
    assert 5 < len(val) < 40 and len(train) + len(val) == 200
    assert not {s.image for s in train} & {s.image for s in val}
    assert carve_validation(read_part(tmp_path, "train"), 0.1) == (train, val)
    write(tmp_path / "val.csv", "image,labels\nother.png,dog\n")
    assert [s.image.name for s in training_parts(tmp_path)[1]] == ["other.png"]


def test_target_matrix_ignores_labels_outside_the_list(tmp_path):
    write(tmp_path / "test.csv", "image,labels\na.png,cat|zebra\nb.png,\n")
    targets = target_matrix(read_part(tmp_path, "test"), ("dog", "cat"))
    assert targets.tolist() == [[0.0, 1.0], [0.0, 0.0]]
