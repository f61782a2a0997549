"""Safe image loading (any file, any mode -> 8-bit RGB) and tower preprocessing."""

from __future__ import annotations

import io
import math
import os
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import IO, TYPE_CHECKING, Any, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ClipDecoderError

if TYPE_CHECKING:  # torch only for ``Preprocess.batch``: the ONNX runtime preprocesses with this module too
    import torch

MAX_IMAGE_PIXELS = 64_000_000

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, IO[bytes], Image.Image]

_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


def _fail(name: str, reason: str) -> ClipDecoderError:
    """Build the error for an image that cannot be used (one line: decoders' messages may span several)."""
    return ClipDecoderError(f"cannot load image {name!r}: {' '.join(reason.split())}")


def _source_name(source: Any) -> str:
    """A human-readable name for an image source, for error messages."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)  # type: ignore[return-value]
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "<bytes>"
    if isinstance(source, Image.Image):
        return getattr(source, "filename", "") or "<PIL image>"
    return str(getattr(source, "name", "") or "<file object>")


def path_problem(path: str | os.PathLike) -> str | None:
    """Why the file at ``path`` cannot be an image, seen without reading it (missing, a folder, empty), or None."""
    if not os.path.exists(path):
        return str(_fail(os.fspath(path), "file not found"))
    if os.path.isdir(path):
        return str(_fail(os.fspath(path), "is a directory, not an image file"))
    if os.path.getsize(path) == 0:
        return str(_fail(os.fspath(path), "file is empty (0 bytes)"))
    return None


def _open(source: Any, name: str) -> tuple[Image.Image, bool]:
    """Open (header only) an image source; return it and whether we own (must close) it."""
    if isinstance(source, Image.Image):
        return source, False
    if isinstance(source, (str, os.PathLike)):
        if problem := path_problem(source):
            raise ClipDecoderError(problem)
        return Image.open(source), True
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise _fail(name, "no data (0 bytes)")
        return Image.open(io.BytesIO(bytes(source))), True
    if hasattr(source, "read"):
        return Image.open(source), False  # the caller's file object stays open
    raise _fail(name, f"unsupported source type {type(source).__name__}")


def _scale_to_uint8(image: Image.Image) -> Image.Image:
    """16/32-bit integer -> 0..65535 scaled to 0..255; float -> 0..1 if it fits, else min..max."""
    arr = np.asarray(image).astype(np.float64)
    if image.mode == "F":
        arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0.0 or hi > 1.0:  # not 0..1 data: stretch its own range
            arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
        arr = arr * 255.0
    else:
        arr = np.clip(arr, 0, 65535) / 257.0
    return Image.fromarray(np.rint(arr).astype(np.uint8), "L")


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any mode to 8-bit RGB, compositing transparency onto white."""
    if image.mode.startswith("I") or image.mode == "F":
        image = _scale_to_uint8(image)
    if image.mode == "La":
        image = image.convert("LA")
    if image.mode in _ALPHA_MODES or image.mode == "P" or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(source: ImageSource, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Load a path, bytes, binary file or PIL image as a fully decoded, upright 8-bit RGB image."""
    name = _source_name(source)
    image: Image.Image | None = None
    owned = False
    try:
        with warnings.catch_warnings():
            # PIL's notes on damaged metadata ("Truncated File Read", "Corrupt EXIF data") would print
            # around the one line a bad image gets: the image loads or fails without them.
            warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image, owned = _open(source, name)  # reads the header only
            width, height = image.size
            if width <= 0 or height <= 0:
                raise _fail(name, f"image has zero size {width}x{height}")
            if width * height > max_pixels:
                raise _fail(name, f"{width}x{height} pixels exceeds the limit of {max_pixels} pixels")
            image.load()  # raises on truncated data (LOAD_TRUNCATED_IMAGES is left False)
            result = _to_rgb(ImageOps.exif_transpose(image))
            return result.copy() if result is image else result
    except ClipDecoderError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _fail(name, f"possible decompression bomb ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise _fail(name, "not a recognised image format") from exc
    except Exception as exc:  # broken files raise all kinds of errors from the decoders
        raise _fail(name, f"{type(exc).__name__}: {exc}") from exc
    finally:
        if owned and image is not None:
            image.close()


@dataclass(frozen=True)
class Preprocess:
    """How to turn an image into one tower's input tensor."""

    image_size: int
    resize_size: int | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resample: str = "bicubic"

    def __post_init__(self) -> None:
        """Validate fields and store mean/std as tuples of floats."""

        def positive_int(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and value > 0

        if not positive_int(self.image_size):
            raise ClipDecoderError(f"preprocess: image_size must be a positive int, got {self.image_size!r}")
        if self.resize_size is not None and not (
            positive_int(self.resize_size) and self.resize_size >= self.image_size
        ):
            raise ClipDecoderError(
                f"preprocess: resize_size must be None or an int >= image_size ({self.image_size}), "
                f"got {self.resize_size!r}"
            )
        for key in ("mean", "std"):
            value = getattr(self, key)
            try:
                triple = tuple(float(v) for v in value)
            except (TypeError, ValueError):
                triple = ()
            if len(triple) != 3 or not all(math.isfinite(v) for v in triple):
                raise ClipDecoderError(f"preprocess: {key} must be 3 finite numbers, got {value!r}")
            object.__setattr__(self, key, triple)
        if not all(s > 0 for s in self.std):
            raise ClipDecoderError(f"preprocess: std values must be positive, got {self.std!r}")
        if self.resample not in _RESAMPLE:
            raise ClipDecoderError(
                f"preprocess: resample must be one of {sorted(_RESAMPLE)}, got {self.resample!r}"
            )

    def resize_crop(self, image: Image.Image) -> Image.Image:
        """Resize (shortest side or squash) and centre-crop to image_size x image_size."""
        size, resample = self.image_size, _RESAMPLE[self.resample]
        width, height = image.size
        if self.resize_size is None:
            target = (size, size)
        else:
            scale = self.resize_size / min(width, height)
            target = (max(self.resize_size, round(width * scale)), max(self.resize_size, round(height * scale)))
        if target != image.size:
            image = image.resize(target, resample)
        left = int(round((target[0] - size) / 2.0))
        top = int(round((target[1] - size) / 2.0))
        if (left, top, target) == (0, 0, (size, size)):
            return image
        return image.crop((left, top, left + size, top + size))

    def __call__(self, image: Image.Image) -> np.ndarray:
        """Return a normalised float32 array of shape (3, image_size, image_size)."""
        if image.mode != "RGB":
            image = load_image(image)
        # Channels first before the arithmetic, in place: bit-identical to normalising the
        # (H, W, 3) array and transposing after, and ~4x faster (numpy's inner loops then run
        # along rows, not over 3 channels).
        pixels = np.ascontiguousarray(np.asarray(self.resize_crop(image)).transpose(2, 0, 1), dtype=np.float32)
        pixels /= 255.0
        pixels -= np.asarray(self.mean, dtype=np.float32)[:, None, None]
        pixels /= np.asarray(self.std, dtype=np.float32)[:, None, None]
        return pixels

    def arrays(self, images: Iterable[Image.Image]) -> np.ndarray:
        """Return a float32 array of shape (B, 3, image_size, image_size)."""
        arrays = [self(image) for image in images]
        if not arrays:
            return np.empty((0, 3, self.image_size, self.image_size), dtype=np.float32)
        return np.stack(arrays)

    def batch(self, images: Iterable[Image.Image]) -> torch.Tensor:
        """``arrays`` as a torch tensor."""
        import torch

        return torch.from_numpy(self.arrays(images))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict (mean/std as lists)."""
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Preprocess:
        """Build from a dict as written by to_dict (e.g. read back from JSON)."""
        if not isinstance(d, Mapping):
            raise ClipDecoderError(f"preprocess: expected a mapping, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        missing = sorted(n for n in names - set(d) if n != "resample")
        if unknown or missing:
            raise ClipDecoderError(f"preprocess: unknown keys {unknown}, missing keys {missing}")
        return cls(**d)
