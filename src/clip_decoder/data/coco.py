"""Convert COCO instances JSON (2014 or 2017 layout) to the dataset-folder contract.

An image's labels are the names of the categories among its annotations (crowd annotations
included). Images without any annotation are kept with an empty label field (ML-Decoder's
COCO loader drops them). Every category present is written, also the ones outside the label
split: the OV-COCO 48/17 protocol trains on seen labels only and leaves out 15 categories,
and training already treats labels outside ``split.seen`` as neither positive nor negative.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from ..errors import ClipDecoderError
from .folder import LabelSplit, Row, read_split, write_folder

# Packaged label splits: the open-vocabulary COCO split of Bansal et al. (ECCV 2018) as used by
# OVR-CNN and the open-vocabulary detection literature, 48 seen and 17 unseen categories.
PACKAGED_SPLITS = {"48/17": "coco-48-17-split.json"}


def packaged_split(name: str) -> LabelSplit:
    """The label split shipped with the package under ``name`` (one of ``PACKAGED_SPLITS``)."""
    if name not in PACKAGED_SPLITS:
        raise ClipDecoderError(f"unknown COCO label split {name!r}; packaged splits: {', '.join(PACKAGED_SPLITS)}")
    with resources.as_file(resources.files(__package__).joinpath(PACKAGED_SPLITS[name])) as path:
        return read_split(path)


def read_coco(json_path: str | Path, images: str | Path) -> tuple[list[Row], tuple[str, ...]]:
    """(image path under ``images``, label names) per image of a COCO instances file, and its category names."""
    json_path = Path(json_path)
    try:
        with json_path.open("rb") as f:
            data = json.load(f)
    except FileNotFoundError as error:
        raise ClipDecoderError(f"COCO annotation file {json_path} does not exist") from error
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ClipDecoderError(f"COCO annotation file {json_path}: not readable JSON ({error})") from error
    for key in ("images", "annotations", "categories"):
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise ClipDecoderError(f"{json_path}: not a COCO instances file (no '{key}' list)")
    key = "categories"
    try:
        names = {c["id"]: c["name"].strip() for c in data["categories"]}
        key = "images"
        files = {im["id"]: im["file_name"] for im in data["images"]}
        key = "annotations"
        present: dict[object, set] = {image_id: set() for image_id in files}
        for ann in data["annotations"]:
            image_id, category_id = ann["image_id"], ann["category_id"]
            if image_id not in present:
                raise ClipDecoderError(f"{json_path}: annotation {ann.get('id')} refers to image {image_id}, "
                                       "which is not in 'images'")
            if category_id not in names:
                raise ClipDecoderError(f"{json_path}: annotation {ann.get('id')} has category {category_id}, "
                                       "which is not in 'categories'")
            present[image_id].add(category_id)
    except (KeyError, TypeError, AttributeError) as error:
        raise ClipDecoderError(f"{json_path}: malformed '{key}' entry ({error!r})") from error
    order = {category_id: i for i, category_id in enumerate(names)}
    root = Path(images)
    rows = [
        (root / files[image_id], tuple(dict.fromkeys(names[c] for c in sorted(categories, key=order.__getitem__))))
        for image_id, categories in present.items()
    ]
    return rows, tuple(dict.fromkeys(names.values()))


def convert_coco(
    train_json: str | Path,
    train_images: str | Path,
    test_json: str | Path,
    test_images: str | Path,
    out: str | Path,
    split: str | LabelSplit | None = "48/17",
) -> dict[str, int]:
    """Convert COCO train/test instances files to a dataset folder in ``out``; return images per part.

    ``split`` is a packaged split name, a ``LabelSplit``, or None to write no ``split.json``.
    """
    if isinstance(split, str):
        split = packaged_split(split)
    parts = {}
    for part, json_path, images in (("train", train_json, train_images), ("test", test_json, test_images)):
        parts[part], categories = read_coco(json_path, images)
        missing = [] if split is None else [name for name in split.all if name not in categories]
        if missing:
            raise ClipDecoderError(f"{json_path} has no category named {', '.join(missing)} (from the label split)")
    return write_folder(out, parts, split)
