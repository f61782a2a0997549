"""COCO instances JSON to the dataset-folder contract, on tiny replicas of the official files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clip_decoder import ClipDecoderError
from clip_decoder.data.coco import convert_coco, packaged_split
from clip_decoder.data.folder import LabelSplit, read_part, read_split

OV = packaged_split("48/17")
# The 80 COCO names minus the 65 of the split would be the 15 left out; two are enough here.
LEFT_OUT = ("dining table", "traffic light")


def instances(images: dict[str, list[str]], categories=OV.all + LEFT_OUT, crowd: tuple[str, ...] = ()) -> dict:
    """A COCO instances dict: ``images`` maps file name to the category names of its annotations."""
    ids = {name: 1 + 2 * i for i, name in enumerate(categories)}  # sparse ids, like the real 1..90
    data = {
        "info": {"year": 2017}, "licenses": [],
        "images": [{"id": 100 + i, "file_name": name, "width": 640, "height": 480} for i, name in enumerate(images)],
        "annotations": [],
        "categories": [{"id": ids[name], "name": name, "supercategory": "thing"} for name in categories],
    }
    for i, names in enumerate(images.values()):
        for name in names:
            data["annotations"].append({
                "id": len(data["annotations"]) + 1, "image_id": 100 + i, "category_id": ids[name],
                "bbox": [0, 0, 10, 10], "area": 100.0, "iscrowd": int(name in crowd), "segmentation": [],
            })
    return data


def dump(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


@pytest.fixture
def coco(tmp_path):
    train = dump(tmp_path / "annotations" / "instances_train2017.json", instances({
        "000000000009.jpg": ["dog", "person", "person"],  # repeated category, unseen dog kept too
        "000000000025.jpg": ["dining table"],  # only a category outside the split
        "000000000030.jpg": [],  # no annotation: kept, empty labels
        "000000000034.jpg": ["zebra", "cat"],
    }, crowd=("cat",)))
    test = dump(tmp_path / "annotations" / "instances_val2017.json", instances({
        "000000000139.jpg": ["tv", "couch", "person"],
        "000000000285.jpg": ["bear"],
    }))
    return train, tmp_path / "train2017", test, tmp_path / "val2017"


def labels_by_file(out: Path, part: str) -> dict[str, set[str]]:
    return {s.image.name: set(s.labels) for s in read_part(out, part)}


def test_convert_coco_labels_paths_and_packaged_split(coco, tmp_path):
    train, train_images, test, test_images = coco
    out = tmp_path / "out" / "coco"
    assert convert_coco(train, train_images, test, test_images, out) == {"train": 4, "test": 2}
    assert labels_by_file(out, "train") == {
        "000000000009.jpg": {"dog", "person"}, "000000000025.jpg": {"dining table"},
        "000000000030.jpg": set(), "000000000034.jpg": {"zebra", "cat"},
    }
    assert labels_by_file(out, "test") == {"000000000139.jpg": {"tv", "couch", "person"}, "000000000285.jpg": {"bear"}}
    # labels follow the category order of the file; paths are relative and point at the original images
    assert read_part(out, "train")[0].labels == ("person", "dog")
    assert (out / "train.csv").read_text().splitlines()[1].startswith("../../train2017/000000000009.jpg,")
    assert {s.image.resolve() for s in read_part(out, "test")} == {
        (test_images / name).resolve() for name in ("000000000139.jpg", "000000000285.jpg")}
    assert read_split(out / "split.json") == OV


def test_packaged_split_is_the_48_17_ov_coco_split():
    assert (len(OV.seen), len(OV.unseen)) == (48, 17)
    assert {"airplane", "bus", "cat", "dog", "cow", "elephant", "umbrella", "tie", "snowboard", "skateboard",
            "cup", "knife", "cake", "couch", "keyboard", "sink", "scissors"} == set(OV.unseen)


def test_split_none_writes_no_split_json_and_a_custom_split_is_written(coco, tmp_path):
    assert convert_coco(*coco, tmp_path / "plain", split=None) == {"train": 4, "test": 2}
    assert not (tmp_path / "plain" / "split.json").exists()
    custom = LabelSplit(seen=("person", "zebra"), unseen=("dog",))
    convert_coco(*coco, tmp_path / "custom", split=custom)
    assert read_split(tmp_path / "custom" / "split.json") == custom


def test_split_names_must_be_categories_of_each_file(tmp_path):
    train = dump(tmp_path / "train.json", instances({"a.jpg": ["person"]}, categories=("person", "dog")))
    test = dump(tmp_path / "test.json", instances({"b.jpg": ["person"]}, categories=("person",)))
    with pytest.raises(ClipDecoderError, match=r"train.json has no category named bicycle, .*tv, .*scissors"):
        convert_coco(train, tmp_path, test, tmp_path, tmp_path / "out")
    with pytest.raises(ClipDecoderError, match=r"test.json has no category named dog"):
        convert_coco(train, tmp_path, test, tmp_path, tmp_path / "out", split=LabelSplit(("person",), ("dog",)))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ("{not json", "not readable JSON"),
    ('{"images": [], "annotations": []}', "not a COCO instances file \\(no 'categories' list\\)"),
    ('[1, 2]', "not a COCO instances file"),
    ('{"images": [{"id": 1}], "annotations": [], "categories": []}', "malformed 'images' entry"),
    ('{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"id": 7, "image_id": 2, "category_id": 1}],'
     ' "categories": [{"id": 1, "name": "person"}]}', "annotation 7 refers to image 2, which is not in 'images'"),
    ('{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"id": 7, "image_id": 1, "category_id": 3}],'
     ' "categories": [{"id": 1, "name": "person"}]}', "annotation 7 has category 3"),
])
def test_bad_annotation_files_name_the_file(tmp_path, content, message):
    path = tmp_path / "instances_train2014.json"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    good = dump(tmp_path / "good.json", instances({"b.jpg": ["person"]}))
    with pytest.raises(ClipDecoderError, match=f"instances_train2014.json.*{message}|{message}.*instances_train2014"):
        convert_coco(path, tmp_path, good, tmp_path, tmp_path / "out")


def test_unknown_packaged_split_and_pipe_in_a_name(coco, tmp_path):
    with pytest.raises(ClipDecoderError, match="unknown COCO label split '65/15'.*48/17"):
        convert_coco(*coco, tmp_path / "out", split="65/15")
    train = dump(tmp_path / "pipe.json", instances({"a.jpg": ["a|b"]}, categories=("a|b",)))
    with pytest.raises(ClipDecoderError, match=r"cannot contain '\|'.*a\|b"):
        convert_coco(train, tmp_path, train, tmp_path, tmp_path / "out", split=None)


def test_cli_converts_coco_with_the_packaged_split(coco, tmp_path, capsys):
    from clip_decoder.cli import main

    train, train_images, test, test_images = coco
    out = tmp_path / "cli"
    assert main(["data", "coco", "--train-json", str(train), "--train-images", str(train_images), "--test-json",
                 str(test), "--test-images", str(test_images), "--out", str(out)]) == 0
    assert "train.csv 4 images, test.csv 2 images" in capsys.readouterr().out
    assert labels_by_file(out, "test") == {"000000000139.jpg": {"tv", "couch", "person"}, "000000000285.jpg": {"bear"}}
    assert read_split(out / "split.json") == OV
    assert main(["data", "coco", "--train-json", str(tmp_path / "absent.json"), "--train-images", str(train_images),
                 "--test-json", str(test), "--test-images", str(test_images), "--out", str(out)]) == 2
    assert "absent.json" in capsys.readouterr().err
