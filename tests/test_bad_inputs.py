"""Bad input everywhere a user can give it: one clear error naming the file or value, the rest carried on.

Images go through ONE ``clip-decoder predict`` call (warnings recorded, any escaping exception fails it);
datasets through ``train`` / ``evaluate``; model folders through ``predict --model``; the parsers get
property-based tests. Every fixture file is generated here.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import re
import shutil
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import load_file, save_file

from clip_decoder import CLIPDecoder, ClipDecoderError
from clip_decoder.cli import main, read_labels
from clip_decoder.data.folder import read_part, read_split
from clip_decoder.images import load_image
from clip_decoder.thresholds import Thresholds

LABELS = ["cat", "dog"]
QUICK = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def model_dir(tiny_clip_dir, tmp_path_factory) -> Path:
    model = CLIPDecoder.create(backbone=f"hf:{tiny_clip_dir}", dim=32, heads=4, ffn_dim=64)
    return model.save_pretrained(tmp_path_factory.mktemp("bad-inputs-model"))


# ---- images ------------------------------------------------------------------------------------


def quadrants() -> np.ndarray:
    """48x32 RGB: top-left red, top-right green, bottom-left blue, bottom-right white."""
    pixels = np.full((32, 48, 3), 255, dtype=np.uint8)
    pixels[:16, :24], pixels[:16, 24:], pixels[16:, :24] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    return pixels


# How a camera stores the upright picture for each EXIF orientation (numpy, independent of PIL).
STORED = {1: lambda a: a, 2: np.fliplr, 3: lambda a: np.rot90(a, 2), 4: np.flipud, 5: lambda a: a.swapaxes(0, 1),
          6: lambda a: np.rot90(a, 1), 7: lambda a: np.rot90(a, 2).swapaxes(0, 1), 8: lambda a: np.rot90(a, -1)}


def write_rotated_jpeg(path: Path, orientation: int = 6) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(np.ascontiguousarray(STORED[orientation](quadrants()))).save(path, exif=exif, quality=95)


def write_palette_gif(path: Path) -> None:
    """Left half palette index 0 (transparent), right half index 1 (green)."""
    image = Image.new("P", (16, 16), 1)
    image.paste(0, (0, 0, 8, 16))
    image.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    image.save(path, transparency=0)


def write_animated_gif(path: Path) -> None:
    frames = [Image.new("RGB", (8, 8), colour) for colour in ("red", "blue")]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50)


def write_truncated_jpeg(path: Path) -> None:
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path, quality=95)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def write_bomb_png(path: Path, width: int = 100_000, height: int = 100_000) -> None:
    """A 1x1 PNG whose header claims ``width`` x ``height`` pixels (a few dozen bytes on disk)."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)  # IHDR width, height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # IHDR CRC
    path.write_bytes(bytes(data))


def write_folder_without_images(path: Path) -> None:
    path.mkdir()
    (path / "readme.txt").write_text("no pictures here")


# name -> (file name, writer, None for a good input or a fragment of its error). In this order, with
# --batch-size 3, batches mix good and bad images and one batch holds only bad ones.
IMAGE_CASES = {
    "png-with-alpha": ("alpha.png", lambda p: Image.new("RGBA", (16, 16), (255, 0, 0, 128)).save(p), None),
    "zero-byte": ("empty.jpg", lambda p: p.write_bytes(b""), "file is empty (0 bytes)"),
    "png-16-bit": ("deep.png", lambda p: Image.fromarray(np.full((16, 16), 40000, np.uint16)).save(p), None),
    "truncated-jpeg": ("truncated.jpg", write_truncated_jpeg, "image file is truncated"),
    "text-named-jpg": ("notes.jpg", lambda p: p.write_text("hello, I am not a JPEG\n"), "not a recognised image format"),
    "decompression-bomb": ("bomb.png", write_bomb_png, "possible decompression bomb"),
    "missing-path": ("missing.jpg", lambda p: None, "file not found"),
    "folder-with-no-images": ("no-images", write_folder_without_images, "holds no image files"),
    "cmyk-jpeg": ("cmyk.jpg", lambda p: Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(p), None),
    "palette-gif": ("palette.gif", write_palette_gif, None),
    "animated-gif": ("animated.gif", write_animated_gif, None),
    "exif-rotated-jpeg": ("rotated.jpg", write_rotated_jpeg, None),
    "1x1": ("dot.png", lambda p: Image.new("RGB", (1, 1), "blue").save(p), None),
}
BAD_IMAGES = [name for name, (_, _, error) in IMAGE_CASES.items() if error]


@pytest.fixture(scope="module")
def predicted(model_dir, tmp_path_factory) -> dict:
    """Every image case in one `clip-decoder predict` call: its exit code, records, stderr and warnings."""
    folder = tmp_path_factory.mktemp("image-cases")
    paths = {}
    for name, (file_name, write, _) in IMAGE_CASES.items():
        paths[name] = folder / file_name
        write(paths[name])
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # what a user's terminal would show
        code = main(["predict", "--model", str(model_dir), "--labels", ",".join(LABELS), "--batch-size", "3",
                     *map(str, paths.values())])  # an exception escaping main (a traceback) fails here
    records = [json.loads(line) for line in stdout.getvalue().splitlines()]
    return {"code": code, "paths": paths, "records": records, "stderr": stderr.getvalue(), "warnings": caught}


@pytest.mark.parametrize("case", IMAGE_CASES)
def test_each_image_input_is_scored_or_reported_on_one_line(predicted, case):
    path, error = str(predicted["paths"][case]), IMAGE_CASES[case][2]
    records = [r for r in predicted["records"] if r["image"] == path]
    mentions = [line for line in predicted["stderr"].splitlines() if path in line]
    if error is None:
        assert len(records) == 1 and not mentions
        assert list(records[0]["scores"]) == LABELS and all(0 <= p <= 1 for p in records[0]["scores"].values())
    else:
        assert not records
        assert len(mentions) == 1 and mentions[0].startswith("error: ") and error in mentions[0], mentions


def test_a_run_with_bad_images_reports_each_carries_on_and_exits_1(predicted):
    lines = predicted["stderr"].splitlines()
    assert predicted["code"] == 1
    assert not predicted["warnings"], [str(w.message) for w in predicted["warnings"]]
    assert lines[-1] == f"{len(BAD_IMAGES)} of {len(IMAGE_CASES)} images failed"
    assert len(lines) == len(BAD_IMAGES) + 1 and all(line.startswith("error: ") for line in lines[:-1])
    good = [str(predicted["paths"][name]) for name in IMAGE_CASES if name not in BAD_IMAGES]
    assert [r["image"] for r in predicted["records"]] == good  # input order kept


@pytest.mark.parametrize("orientation", STORED)
def test_exif_rotated_jpeg_comes_out_upright(tmp_path, orientation):
    write_rotated_jpeg(tmp_path / "photo.jpg", orientation)
    image = load_image(tmp_path / "photo.jpg")
    assert image.size == (48, 32)
    centres = [image.getpixel(xy) for xy in ((12, 8), (36, 8), (12, 24), (36, 24))]
    expected = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)]
    assert np.abs(np.subtract(centres, expected)).max() <= 8, centres


def test_palette_gif_transparency_becomes_white(tmp_path):
    write_palette_gif(tmp_path / "palette.gif")
    image = load_image(tmp_path / "palette.gif")
    assert image.mode == "RGB" and image.getpixel((2, 2)) == (255, 255, 255) and image.getpixel((12, 2)) == (0, 200, 0)


# ---- datasets: training and evaluation carry on past bad rows ----------------------------------


def stderr_lines(text: str) -> list[str]:
    return [line for line in re.split(r"[\r\n]+", text) if line.startswith(("error:", "warning:"))]


BAD_TRAINING_IMAGES = {"empty.jpg": IMAGE_CASES["zero-byte"][1], "truncated.jpg": write_truncated_jpeg,
                       "notes.jpg": IMAGE_CASES["text-named-jpg"][1], "bomb.png": write_bomb_png,
                       "missing.png": lambda p: None}
SPLIT = {"seen": ["red", "green", "blue", "yellow", "красный", "purple"], "unseen": ["white", "black"]}


@pytest.fixture(scope="module")
def messy_dataset(tiny_dataset, tmp_path_factory) -> Path:
    """tiny_dataset's images with a train.csv holding a BOM, bad and missing images, a duplicate row,
    an empty label field, a quoted label with a comma, a unicode label and labels outside the split;
    the split names a label no image has."""
    root = tmp_path_factory.mktemp("messy-dataset")
    shutil.copytree(tiny_dataset / "images", root / "images")
    shutil.copy(tiny_dataset / "test.csv", root / "test.csv")
    for name, write in BAD_TRAINING_IMAGES.items():
        write(root / "images" / name)
    Image.new("RGB", (32, 32), "grey").save(root / "images" / "plain.png")
    with (tiny_dataset / "train.csv").open(newline="") as f:
        rows = list(csv.reader(f))
    rows += [[f"images/{name}", "red"] for name in BAD_TRAINING_IMAGES]
    rows += [["images/plain.png", ""], ["images/train-0.png", "cat, black|green"], ["images/train-1.png", "красный|zebra"]]
    with (root / "train.csv").open("w", newline="", encoding="utf-8-sig") as f:
        csv.writer(f).writerows(rows)
    (root / "split.json").write_text(json.dumps(SPLIT, ensure_ascii=False), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def trained_on_messy_data(messy_dataset, tiny_clip_dir, tmp_path_factory) -> dict:
    out, cache = tmp_path_factory.mktemp("messy-model"), tmp_path_factory.mktemp("messy-cache")
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        code = main(["train", "--data", str(messy_dataset), "--split", str(messy_dataset / "split.json"), "--out", str(out),
                     "--backbone", f"hf:{tiny_clip_dir}", "--epochs", "2", "--batch-size", "8", "--val-fraction", "0.25",
                     "--cache", str(cache), "--dim", "32", "--heads", "4", "--ffn-dim", "64"])
    return {"code": code, "out": out, "cache": cache, "lines": stderr_lines(stderr.getvalue())}


def test_training_reports_bad_images_and_trains_on_the_good_ones(trained_on_messy_data, messy_dataset):
    lines = [line for line in trained_on_messy_data["lines"] if line.startswith("error:")]
    assert trained_on_messy_data["code"] == 0
    for name in BAD_TRAINING_IMAGES:
        assert sum(str(messy_dataset / "images" / name) in line for line in lines) == 1, (name, lines)
    assert len(lines) == len(BAD_TRAINING_IMAGES)
    summary = json.loads((trained_on_messy_data["out"] / "training.json").read_text())
    assert summary["train_images"] + summary["val_images"] == 32 + 1  # tiny_dataset's 32 and plain.png, once each
    assert list(CLIPDecoder.from_pretrained(trained_on_messy_data["out"]).config.labels) == SPLIT["seen"]


def test_training_warns_once_about_labels_outside_the_split_and_split_labels_without_images(trained_on_messy_data):
    lines = [line for line in trained_on_messy_data["lines"] if line.startswith("warning:")]
    assert lines == [
        "warning: 2 label(s) of the training images are not in the split and are ignored: 'cat, black', 'zebra'",
        "warning: 1 label(s) of the split have no training image: 'purple'",
    ]


def test_evaluate_reports_bad_test_images_and_warns_about_labels(trained_on_messy_data, messy_dataset, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(messy_dataset, data)
    with (data / "test.csv").open("a", newline="") as f:
        csv.writer(f).writerows([["images/empty.jpg", "red"], ["images/test-0.png", "zebra"]])
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"seen": SPLIT["seen"], "unseen": ["white", "black", "violet"]}))
    stderr, metrics = io.StringIO(), tmp_path / "metrics.json"
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        code = main(["evaluate", "--model", str(trained_on_messy_data["out"]), "--data", str(data), "--split", str(split),
                     "--cache", str(trained_on_messy_data["cache"]), "--json", str(metrics)])
    assert code == 0
    assert stderr_lines(stderr.getvalue()) == [
        "warning: 1 label(s) of the test images are not in the split and are ignored: 'zebra'",
        "warning: 3 label(s) of the split have no test image: 'purple', 'violet', 'красный'",
        f"error: cannot load image {str(data / 'images' / 'empty.jpg')!r}: file is empty (0 bytes)",
    ]
    assert json.loads(metrics.read_text())["gzsl"]["n_images"] == 16  # the bad row left out, the others scored


def test_a_csv_with_only_its_header_is_an_error(tmp_path):
    (tmp_path / "test.csv").write_text("image,labels\n\n")
    with pytest.raises(ClipDecoderError, match=re.escape(f"{tmp_path / 'test.csv'}: lists no images")):
        read_part(tmp_path, "test")


def test_a_split_with_a_bom_is_read(tmp_path):
    (tmp_path / "split.json").write_text('\ufeff{"seen": ["a"], "unseen": ["b"]}', encoding="utf-8")
    assert read_split(tmp_path / "split.json").all == ("a", "b")


# ---- model folders: one line naming the file, through the CLI ---------------------------------


DELETE = object()  # break_config: remove the field


def break_config(**changes):
    def apply(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        for key, value in changes.items():
            section, _, field = key.rpartition(".")
            target = config[section] if section else config
            if value is DELETE:
                del target[field]
            else:
                target[field] = value
        (folder / "config.json").write_text(json.dumps(config))
    return apply


def write_weights(change):
    def apply(folder: Path) -> None:
        tensors = load_file(folder / "model.safetensors")
        change(tensors)
        save_file(tensors, folder / "model.safetensors")
    return apply


# name -> (how to break a copy of a good model folder, the file the error names, a fragment of the error)
MODEL_CASES = {
    "missing-safetensors": (lambda f: (f / "model.safetensors").unlink(), "model.safetensors", "has no model.safetensors"),
    "corrupt-safetensors": (lambda f: (f / "model.safetensors").write_bytes(b"\x00garbage" * 10), "model.safetensors",
                            "not a readable safetensors file"),
    "truncated-safetensors": (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:500]),
                              "model.safetensors", "not a readable safetensors file"),
    "wrong-shapes": (break_config(**{"head.dim": 64}), "model.safetensors", "has shape"),
    "missing-weight": (write_weights(lambda t: t.pop("head.query_proj.weight")), "model.safetensors",
                       "head.query_proj.weight missing"),
    "extra-weight": (write_weights(lambda t: t.update({"image_tower.x": t["head.query_proj.weight"].clone()})),
                     "model.safetensors", "image_tower.x unexpected"),
    "unknown-backbone": (break_config(backbone="resnet9000"), "config.json", "unknown backbone 'resnet9000'"),
    "newer-config-version": (break_config(format_version=99), "config.json", "written by a newer clip-decoder"),
    "config-not-json": (lambda f: (f / "config.json").write_text("{not json"), "config.json", "not valid JSON"),
    "config-not-utf8": (lambda f: (f / "config.json").write_bytes(b"\xff\xfe{}"), "config.json", "not valid JSON"),
    "config-not-an-object": (lambda f: (f / "config.json").write_text("[1, 2]"), "config.json",
                             "expected a JSON object, got list"),
    "config-missing-head": (break_config(head=DELETE), "config.json", "not a valid clip-decoder config"),
    "head-null": (break_config(head=None), "config.json", "'head' must be an object, got None"),
    "head-dim-a-string": (break_config(**{"head.dim": "32"}), "config.json", "'head.dim' must be a positive integer, got '32'"),
    "head-dim-negative": (break_config(**{"head.dim": -4}), "config.json", "'head.dim' must be a positive integer, got -4"),
    "head-dim-a-float": (break_config(**{"head.dim": 32.0}), "config.json", "'head.dim' must be a positive integer"),
    "dropout-a-string": (break_config(**{"head.dropout": "0.1"}), "config.json", "'head.dropout' must be a number"),
    "cosine-skip-a-string": (break_config(**{"head.cosine_skip": "no"}), "config.json",
                             "'head.cosine_skip' must be true or false"),
    "align-dim-a-bool": (break_config(align_dim=True), "config.json", "'align_dim' must be a positive integer, got True"),
    "labels-a-string": (break_config(labels="cat"), "config.json", "'labels' must be a list, got 'cat'"),
    "templates-not-strings": (break_config(templates=[5]), "config.json", "prompt template 5 must contain"),
    "backbone-a-number": (break_config(backbone=7), "config.json", "'backbone' must be a string, got 7"),
    "unknown-head-option": (break_config(**{"head.colour": "red"}), "config.json", "not a valid clip-decoder config"),
}


@pytest.mark.parametrize("case", MODEL_CASES)
def test_broken_model_folder_is_one_error_line_naming_the_file(model_dir, tmp_path, case, capsys):
    breaks, file_name, fragment = MODEL_CASES[case]
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    breaks(folder)
    image = tmp_path / "dot.png"
    Image.new("RGB", (4, 4)).save(image)
    assert main(["predict", "--model", str(folder), "--labels", "cat", str(image)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    [line] = captured.err.splitlines()
    assert line.startswith("error: ") and fragment in line, line
    assert str(folder / file_name) in line or (str(folder) in line and file_name in line), line


def test_a_config_with_a_bom_loads(model_dir, tmp_path):
    shutil.copytree(model_dir, tmp_path / "model")
    config = tmp_path / "model" / "config.json"
    config.write_text("\ufeff" + config.read_text(), encoding="utf-8")
    assert CLIPDecoder.from_pretrained(tmp_path / "model").config.backbone.startswith("hf:")


# ---- property-based tests of the parsers -------------------------------------------------------

NAME_CHARACTERS = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00|")
LABEL = st.text(NAME_CHARACTERS, min_size=1, max_size=12).map(str.strip).filter(bool)
IMAGE_NAME = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00/"), min_size=1,
                     max_size=12).map(str.strip).filter(bool)
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=5),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
                           max_leaves=10)


@QUICK
@given(rows=st.lists(st.tuples(IMAGE_NAME, st.lists(LABEL, max_size=4), st.sampled_from(["|", " | ", "||"])), min_size=1,
                     max_size=8),
       bom=st.booleans())
def test_read_part_round_trips_rows_written_by_the_csv_module(tmp_path, rows, bom):
    with (tmp_path / "train.csv").open("w", newline="", encoding="utf-8-sig" if bom else "utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "labels"])
        for image, labels, separator in rows:  # spaces around names and empty names between '||' are ignored
            writer.writerow([image, separator.join(f" {label} " for label in labels)])
    expected: dict[str, dict[str, None]] = {}
    for image, labels, _ in rows:  # rows of one image merge; repeated labels count once; order kept
        expected.setdefault(image, {}).update(dict.fromkeys(labels))
    samples = read_part(tmp_path, "train")
    assert [(s.image, s.labels) for s in samples] == [(tmp_path / image, tuple(labels)) for image, labels in expected.items()]


@QUICK
@given(data=st.binary(max_size=200))
def test_read_part_on_any_bytes_reads_or_raises_our_error(tmp_path, data):
    (tmp_path / "train.csv").write_bytes(b"image,labels\n" + data)
    try:
        samples = read_part(tmp_path, "train")
    except ClipDecoderError as error:
        assert "train.csv" in str(error)
    else:
        assert samples and len({s.image for s in samples}) == len(samples)
        for sample in samples:
            assert len(set(sample.labels)) == len(sample.labels)
            assert all(label and label == label.strip() and "|" not in label for label in sample.labels)


@QUICK
@given(seen=st.lists(LABEL, min_size=1, max_size=5), unseen=st.lists(LABEL, min_size=1, max_size=5),
       bom=st.booleans())
def test_read_split_round_trips_or_names_the_overlap(tmp_path, seen, unseen, bom):
    path = tmp_path / "split.json"
    path.write_text(("\ufeff" if bom else "") + json.dumps({"seen": seen, "unseen": unseen}), encoding="utf-8")
    overlap = set(seen) & set(unseen)
    if overlap:
        with pytest.raises(ClipDecoderError, match="both seen and unseen: " + re.escape(", ".join(sorted(overlap)))):
            read_split(path)
    else:
        split = read_split(path)
        assert (split.seen, split.unseen) == (tuple(dict.fromkeys(seen)), tuple(dict.fromkeys(unseen)))


@QUICK
@given(data=JSON_VALUES)
def test_read_split_on_any_json_gives_a_valid_split_or_our_error(tmp_path, data):
    (tmp_path / "split.json").write_text(json.dumps(data))
    try:
        split = read_split(tmp_path / "split.json")
    except ClipDecoderError as error:
        assert "split.json" in str(error)
    else:
        assert split.seen and split.unseen and not set(split.seen) & set(split.unseen)


THRESHOLD = st.floats(0.0, 1.0) | st.integers(0, 1)


@QUICK
@given(thresholds=st.dictionaries(st.text(max_size=8), THRESHOLD, max_size=5),
       default=st.none() | THRESHOLD)
def test_read_thresholds_round_trips_both_formats(tmp_path, thresholds, default):
    content = thresholds if default is None else {"default": default, "labels": thresholds}
    (tmp_path / "t.json").write_text(json.dumps(content))
    read = Thresholds.read(tmp_path / "t.json")
    assert read.labels == {label: float(value) for label, value in thresholds.items()}
    assert read.default == (None if default is None else float(default))


@QUICK
@given(data=JSON_VALUES | st.binary(max_size=50))
def test_read_thresholds_on_anything_gives_thresholds_in_0_1_or_our_error(tmp_path, data):
    path = tmp_path / "t.json"
    path.write_bytes(data) if isinstance(data, bytes) else path.write_text(json.dumps(data))
    try:
        read = Thresholds.read(path)
    except ClipDecoderError as error:
        assert "t.json" in str(error)
    else:
        fallbacks = [value for value in (read.default, read.new_labels) if value is not None]
        assert all(0.0 <= value <= 1.0 for value in [*read.labels.values(), *fallbacks])


LINE_LABEL = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")), min_size=1, max_size=12).map(
    str.strip).filter(bool)


@QUICK
@given(labels=st.lists(LINE_LABEL, min_size=1, max_size=6), bom=st.booleans(), newline=st.sampled_from(["\n", "\r\n"]))
def test_read_labels_round_trips_a_labels_file_and_the_comma_list(tmp_path, labels, bom, newline):
    path = tmp_path / "labels.txt"
    path.write_bytes((("\ufeff" if bom else "") + newline.join(["", *labels, ""]) + newline).encode("utf-8"))
    assert read_labels(argparse.Namespace(labels_file=str(path), labels=None)) == labels
    no_commas = [label for label in labels if "," not in label]
    if no_commas:
        assert read_labels(argparse.Namespace(labels_file=None, labels=" , ".join(no_commas))) == no_commas


def sample_image_bytes(fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(quadrants()).save(buffer, fmt)
    return buffer.getvalue()


SAMPLES = {fmt: sample_image_bytes(fmt) for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")}


@st.composite
def damaged_images(draw) -> bytes:
    """A small valid image with some bytes overwritten and possibly cut short."""
    data = bytearray(SAMPLES[draw(st.sampled_from(sorted(SAMPLES)))])
    for _ in range(draw(st.integers(1, 8))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(1, len(data)))])


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=300) | damaged_images())
def test_load_image_on_any_bytes_gives_an_rgb_image_or_our_error(data):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            image = load_image(data)
        except ClipDecoderError as error:
            assert str(error).startswith("cannot load image '<bytes>': ") and "\n" not in str(error)
        else:
            assert image.mode == "RGB" and image.width > 0 and image.height > 0
    assert not caught, [str(w.message) for w in caught]  # nothing but the result or the one error
