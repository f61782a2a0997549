"""Batch tagging helpers: which images to read, which labels to keep, and how to print them."""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TextIO

import numpy as np
from PIL import Image

from .errors import ClipDecoderError
from .images import Preprocess, load_image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"}
FORMATS = ("jsonl", "csv", "table")
DEFAULT_THRESHOLD = 0.5  # for labels without their own threshold, when thresholds are in use
TABLE_TOP = 5  # labels shown per image in the table when no decision rule is given
HEATMAP_TOP = 3  # labels drawn per image with --heatmaps when no decision rule is given


def expand_images(inputs: Sequence[str], list_file: str | None = None) -> tuple[list[Path], list[str]]:
    """(paths, problems): files as given; folders expanded recursively; glob patterns
    ('photos/**/*.jpg') expanded; plus one path per line of ``list_file``. Order is kept. A path
    that does not exist is kept too, so that it is reported with the other bad images; a folder
    with no image files and a pattern that matches none become ``problems`` (one message each),
    to report beside them rather than stop the run."""
    items = list(inputs)
    if list_file:
        try:
            text = Path(list_file).read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as error:
            raise ClipDecoderError(f"cannot read image list {list_file}: {error}") from error
        items += [line.strip() for line in text.splitlines() if line.strip()]
    if not items:
        raise ClipDecoderError("no images given")
    paths: list[Path] = []
    problems: list[str] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                problems.append(f"folder {path} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
            paths.extend(found)
        elif not path.exists() and glob.has_magic(item):
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
            if not matches:
                problems.append(f"pattern {item!r} matches no file")
            paths.extend(matches)
        else:
            paths.append(path)
    return paths, problems


def read_thresholds(path: str | Path) -> tuple[dict[str, float], float | None]:
    """(per-label thresholds, default) from a JSON file: either ``{label: T}`` or the
    ``{"default": T, "labels": {label: T}}`` that ``clip-decoder calibrate`` writes."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ClipDecoderError(f"cannot read thresholds file {path}: {error}") from error
    if not isinstance(data, dict):
        raise ClipDecoderError(f"thresholds file {path}: expected a JSON object {{label: threshold}}")
    calibrated = isinstance(data.get("labels"), dict)
    per_label, default = (data["labels"], data.get("default")) if calibrated else (data, None)
    for label, value in [*per_label.items(), *([("default", default)] if calibrated else [])]:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ClipDecoderError(f"thresholds file {path}: threshold of {label!r} must be a number in [0, 1], got {value!r}")
    return {label: float(value) for label, value in per_label.items()}, (float(default) if calibrated else None)


class Decider:
    """Turns one image's scores into the labels it gets, highest score first.

    With ``top_k`` only: the K best labels. With thresholds: the labels at or above their own
    threshold (``per_label``; labels not in it use ``threshold``, else DEFAULT_THRESHOLD), and at
    most ``top_k`` of them when both are given. With neither, no decision is made.
    """

    def __init__(self, top_k: int | None = None, threshold: float | None = None,
                 per_label: Mapping[str, float] | None = None) -> None:
        if top_k is not None and top_k < 1:
            raise ClipDecoderError(f"--top-k must be at least 1, got {top_k}")
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise ClipDecoderError(f"--threshold must be in [0, 1], got {threshold}")
        self.top_k, self.threshold, self.per_label = top_k, threshold, dict(per_label or {})

    @property
    def active(self) -> bool:
        return self.top_k is not None or self.thresholded

    @property
    def thresholded(self) -> bool:
        return self.threshold is not None or bool(self.per_label)

    def __call__(self, labels: Sequence[str], scores: np.ndarray) -> list[str]:
        order = sorted(range(len(labels)), key=lambda i: -float(scores[i]))
        if self.thresholded:
            default = DEFAULT_THRESHOLD if self.threshold is None else self.threshold
            order = [i for i in order if scores[i] >= self.per_label.get(labels[i], default)]
        return [labels[i] for i in order[: self.top_k]]


class Writer:
    """Prints predictions as JSON Lines (the contract), CSV or a readable table."""

    def __init__(self, out: TextIO, fmt: str, labels: Sequence[str], decider: Decider) -> None:
        if fmt not in FORMATS:
            raise ClipDecoderError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
        self.out, self.format, self.labels, self.decider = out, fmt, list(labels), decider
        self.csv = csv.writer(out, lineterminator="\n") if fmt == "csv" else None
        if self.csv:
            self.csv.writerow(["image", *self.labels, *(["labels"] if decider.active else [])])

    def write(self, image: str, scores: np.ndarray) -> None:
        chosen = self.decider(self.labels, scores) if self.decider.active else None
        if self.format == "jsonl":
            record = {"image": image, "scores": {label: round(float(s), 6) for label, s in zip(self.labels, scores)}}
            if chosen is not None:
                record["labels"] = chosen
            self.out.write(json.dumps(record, ensure_ascii=False) + "\n")
        elif self.csv:
            self.csv.writerow([image, *(f"{float(s):.6f}" for s in scores), *(["|".join(chosen)] if chosen is not None else [])])
        else:
            shown = chosen if chosen is not None else Decider(top_k=TABLE_TOP)(self.labels, scores)
            score = dict(zip(self.labels, scores))
            cells = ", ".join(f"{label} {float(score[label]):.2f}" for label in shown) or "(no label)"
            self.out.write(f"{image}\t{cells}\n")
        self.out.flush()



def heatmap(image: Image.Image, weights: np.ndarray, preprocess: Preprocess, opacity: float = 0.55) -> Image.Image:
    """One label's attention weights over the image tokens (N,), upsampled and overlaid on the
    image as the tower saw it (resized and cropped); brighter is more attention."""
    import matplotlib

    side = math.isqrt(len(weights))
    if side * side != len(weights):
        raise ClipDecoderError(f"cannot draw {len(weights)} image tokens as a square grid")
    grid = weights.reshape(side, side)
    grid = (grid - grid.min()) / max(float(grid.max() - grid.min()), 1e-12)
    colours = (matplotlib.colormaps["inferno"](grid)[..., :3] * 255).astype(np.uint8)
    seen = preprocess.resize_crop(image)
    overlay = Image.fromarray(colours).resize(seen.size, Image.Resampling.BICUBIC)
    return Image.blend(seen, overlay, opacity)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "x"


def heatmap_name(image: str, label: str) -> str:
    """A file name for one image and label: safe characters, and a hash of the image's path so
    that images with the same name in different folders do not overwrite each other."""
    digest = hashlib.sha1(str(image).encode()).hexdigest()[:6]
    return f"{_safe(Path(image).stem)}-{digest}__{_safe(label)}.png"


def write_heatmaps(folder: str | Path, image_path: str, labels: Sequence[str], chosen: Sequence[str],
                   attention: np.ndarray, preprocess: Preprocess) -> None:
    """PNG heatmaps of ``chosen`` labels for one image into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    image = load_image(image_path)
    for label in chosen:
        heatmap(image, attention[labels.index(label)], preprocess).save(folder / heatmap_name(image_path, label))
