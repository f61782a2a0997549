"""The dataset-folder and label-split contracts, and the validation part carved from training.

Dataset folder: ``train.csv`` / ``test.csv`` (optional ``val.csv``) with header ``image,labels``;
``image`` is relative to the folder, ``labels`` joins names with ``|``.
Label split: JSON ``{"seen": [...], "unseen": [...]}``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ClipDecoderError

PARTS = ("train", "val", "test")
NAMED_IN_WARNINGS = 10  # labels a warning names before it only counts the rest

Row = tuple[Path, Sequence[str]]  # an image path and its label names, as a converter reads them


@dataclass(frozen=True)
class Sample:
    """One image and its label names."""

    image: Path
    labels: tuple[str, ...]


@dataclass(frozen=True)
class LabelSplit:
    """Labels a model may train on (seen) and labels held out for zero-shot testing (unseen)."""

    seen: tuple[str, ...]
    unseen: tuple[str, ...]

    @property
    def all(self) -> tuple[str, ...]:
        return self.seen + self.unseen


def read_part(root: str | Path, part: str) -> list[Sample]:
    """Read ``root/<part>.csv``; duplicate rows and repeated labels are merged, order kept."""
    root = Path(root)
    path = root / f"{part}.csv"
    if not path.is_file():
        raise ClipDecoderError(f"dataset folder {root} has no {part}.csv")
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:  # utf-8-sig drops a BOM
            rows = list(csv.reader(f))
    except (UnicodeDecodeError, csv.Error) as error:
        raise ClipDecoderError(f"{path}: cannot read as UTF-8 CSV ({error})") from error
    if not rows or [cell.strip() for cell in rows[0]] != ["image", "labels"]:
        raise ClipDecoderError(f"{path}: the header must be 'image,labels'")
    samples: dict[str, list[str]] = {}
    for number, row in enumerate(rows[1:], start=2):
        if not row or not any(cell.strip() for cell in row):
            continue
        if len(row) != 2 or not row[0].strip():
            raise ClipDecoderError(f"{path}, line {number}: expected 2 fields 'image,labels', got {row!r}")
        labels = samples.setdefault(row[0].strip(), [])
        for label in row[1].split("|"):
            if label.strip() and label.strip() not in labels:
                labels.append(label.strip())
    if not samples:
        raise ClipDecoderError(f"{path}: lists no images")
    return [Sample(root / image, tuple(labels)) for image, labels in samples.items()]


def write_part(root: str | Path, part: str, rows: Iterable[tuple[str, Iterable[str]]]) -> None:
    """Write ``root/<part>.csv``: one ``image,labels`` row per (path relative to root, label names)."""
    rows = [(image, list(labels)) for image, labels in rows]
    bad = sorted({label for _, labels in rows for label in labels if "|" in label})
    if bad:
        raise ClipDecoderError(f"label names cannot contain '|' (the dataset-folder separator): {', '.join(bad)}")
    with (Path(root) / f"{part}.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["image", "labels"])
        writer.writerows((image, "|".join(labels)) for image, labels in rows)


def write_folder(out: str | Path, parts: dict[str, Iterable[Row]], split: LabelSplit | None) -> dict[str, int]:
    """Write ``<part>.csv`` per part (image paths relative to ``out``) and ``split.json``; return images per part."""
    out = Path(out)
    parts = {part: list(rows) for part, rows in parts.items()}
    folders: dict[Path, str] = {}  # relpath once per image folder: per image it dominates the run time

    def relative(image: Path) -> str:
        if image.parent not in folders:
            try:
                folders[image.parent] = os.path.relpath(image.parent, out)
            except ValueError as error:  # Windows: image and output folder on different drives
                raise ClipDecoderError(f"cannot write image paths relative to {out}: {error}") from error
        return os.path.normpath(os.path.join(folders[image.parent], image.name))

    out.mkdir(parents=True, exist_ok=True)
    for part, rows in parts.items():
        write_part(out, part, ((relative(image), labels) for image, labels in rows))
    if split is not None:
        write_split(out / "split.json", split)
    return {part: len(rows) for part, rows in parts.items()}


def read_split(path: str | Path) -> LabelSplit:
    """Read and check a label-split JSON file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))  # -sig: a BOM from an editor is fine
    except FileNotFoundError as error:
        raise ClipDecoderError(f"label split {path} does not exist") from error
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ClipDecoderError(f"label split {path}: not readable JSON ({error})") from error
    if not isinstance(data, dict):
        raise ClipDecoderError(f"label split {path}: expected an object with 'seen' and 'unseen' lists")
    parts = {}
    for key in ("seen", "unseen"):  # unseen may be empty: a model trained on every label
        names = data.get(key)
        if not isinstance(names, list) or not (names or key == "unseen") or not all(
                isinstance(n, str) and n.strip() for n in names):
            raise ClipDecoderError(f"label split {path}: '{key}' must be a {'non-empty ' * (key == 'seen')}list"
                                   " of label names")
        parts[key] = tuple(dict.fromkeys(n.strip() for n in names))
    overlap = sorted(set(parts["seen"]) & set(parts["unseen"]))
    if overlap:
        raise ClipDecoderError(f"label split {path}: labels both seen and unseen: {', '.join(overlap)}")
    return LabelSplit(**parts)


def write_split(path: str | Path, split: LabelSplit) -> None:
    """Write a label-split JSON file: ``seen`` then ``unseen``, indented by 2, UTF-8, with a final newline."""
    data = {"seen": list(split.seen), "unseen": list(split.unseen)}
    Path(path).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _named(labels: Sequence[str]) -> str:
    """Label names quoted (they may hold commas) and joined for a warning; past NAMED_IN_WARNINGS only counted."""
    more = len(labels) - NAMED_IN_WARNINGS
    return ", ".join(map(repr, labels[:NAMED_IN_WARNINGS])) + (f" and {more} more" if more > 0 else "")


def warn_label_coverage(samples: Sequence[Sample], split: LabelSplit, used: Sequence[str], part: str) -> None:
    """Warn on stderr (one line each) about the samples' labels that are not in the split (ignored)
    and about the ``used`` labels of the split that no sample has."""
    present = {label for sample in samples for label in sample.labels}
    outside, absent = sorted(present - set(split.all)), sorted(set(used) - present)
    if outside:
        print(f"warning: {len(outside)} label(s) of the {part} images are not in the split and are ignored:"
              f" {_named(outside)}", file=sys.stderr)
    if absent:
        print(f"warning: {len(absent)} label(s) of the split have no {part} image: {_named(absent)}", file=sys.stderr)


def target_matrix(samples: list[Sample], labels: tuple[str, ...] | list[str], dtype=np.float32) -> np.ndarray:
    """0/1 matrix (n_samples, n_labels); labels outside ``labels`` are ignored."""
    index = {label: i for i, label in enumerate(labels)}
    targets = np.zeros((len(samples), len(labels)), dtype=dtype)
    for row, sample in enumerate(samples):
        for label in sample.labels:
            if label in index:
                targets[row, index[label]] = 1.0
    return targets


def carve_validation(samples: list[Sample], fraction: float = 0.1, salt: str = "") -> tuple[list[Sample], list[Sample]]:
    """Split training samples into (train, val) deterministically, by a hash of salt + file name.

    A different ``salt`` gives an independent split (to carve again from an already carved part).
    """
    if not 0.0 < fraction < 1.0:
        raise ClipDecoderError(f"validation fraction must be between 0 and 1, got {fraction}")

    def bucket(sample: Sample) -> float:
        digest = hashlib.sha256((salt + sample.image.name).encode("utf-8")).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    train = [s for s in samples if bucket(s) >= fraction]
    val = [s for s in samples if bucket(s) < fraction]
    if not train or not val:
        raise ClipDecoderError(f"{len(samples)} training images are too few to carve a validation part")
    return train, val


def training_parts(root: str | Path, fraction: float = 0.1) -> tuple[list[Sample], list[Sample]]:
    """(train, val): ``val.csv`` when the folder has one, else carved from ``train.csv``."""
    train = read_part(root, "train")
    if (Path(root) / "val.csv").is_file():
        return train, read_part(root, "val")
    return carve_validation(train, fraction)
