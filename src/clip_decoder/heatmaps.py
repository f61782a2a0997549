"""Where each label looked: its cross-attention over the image tokens drawn over the image."""

from __future__ import annotations

import hashlib
import io
import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from .atomic import write_file
from .errors import ClipDecoderError
from .images import Preprocess, load_image



def heatmap(image: Image.Image, weights: np.ndarray, preprocess: Preprocess, opacity: float = 0.55) -> Image.Image:
    """One label's attention weights over the image tokens (N,), upsampled and overlaid on the
    image as the tower saw it (resized and cropped); brighter is more attention."""
    try:
        import matplotlib
    except ModuleNotFoundError as error:  # an install without it (the torch-free one) still tags
        raise ClipDecoderError("heatmaps need the matplotlib package, which is not installed") from error

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
        png = io.BytesIO()
        heatmap(image, attention[labels.index(label)], preprocess).save(png, format="PNG")
        write_file(folder / heatmap_name(image_path, label), png.getvalue(), fsync=False)
