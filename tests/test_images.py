"""Tests for clip_decoder.images: robust loading and tower preprocessing."""

import io
import json
import struct
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from clip_decoder.errors import ClipDecoderError
from clip_decoder.images import Preprocess, load_image

WHITE = (255, 255, 255)


def palette(**info) -> Image.Image:
    im = Image.new("P", (4, 4), 0)
    im.putpalette([0, 200, 0] * 256)
    im.info.update(info)  # e.g. transparency=0 (a tRNS chunk when saved as PNG)
    return im


# (factory, file format to round-trip through or None for in-memory, expected RGB of pixel (0, 0))
MODE_CASES = {
    "L": (lambda: Image.new("L", (4, 4), 100), "PNG", (100, 100, 100)),
    "1": (lambda: Image.new("1", (4, 4), 1), "PNG", WHITE),
    "P": (lambda: palette(), "PNG", (0, 200, 0)),
    "P-transparent": (lambda: palette(transparency=0), "PNG", WHITE),
    "LA-transparent": (lambda: Image.new("LA", (4, 4), (0, 0)), "PNG", WHITE),
    "LA-opaque": (lambda: Image.new("LA", (4, 4), (50, 255)), "PNG", (50, 50, 50)),
    "RGBA-transparent": (lambda: Image.new("RGBA", (4, 4), (0, 0, 0, 0)), "PNG", WHITE),
    "RGBA-half": (lambda: Image.new("RGBA", (4, 4), (255, 0, 0, 128)), "PNG", (255, 127, 127)),
    "PA": (lambda: Image.new("PA", (4, 4), (0, 0)), None, WHITE),
    "RGBa": (lambda: Image.new("RGBa", (4, 4), (0, 0, 0, 0)), None, WHITE),
    "CMYK-zero": (lambda: Image.new("CMYK", (4, 4), (0, 0, 0, 0)), "TIFF", WHITE),
    "CMYK-red": (lambda: Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "JPEG", (255, 0, 0)),
    "YCbCr": (lambda: Image.new("RGB", (4, 4), (0, 0, 255)).convert("YCbCr"), None, (0, 0, 255)),
    "I;16-max": (lambda: Image.new("I;16", (4, 4), 65535), "PNG", WHITE),
    "I;16-half": (lambda: Image.new("I;16", (4, 4), 32768), "PNG", (128, 128, 128)),
    "I;16B": (lambda: Image.new("I;16B", (4, 4), 32768), None, (128, 128, 128)),
    "I": (lambda: Image.new("I", (4, 4), 65535), None, WHITE),
    "F-unit": (lambda: Image.fromarray(np.float32([[0.5, 0.0]]), "F"), "TIFF", (128, 128, 128)),
}


@pytest.mark.parametrize("case", MODE_CASES, ids=list(MODE_CASES))
def test_modes_load_as_rgb(tmp_path, case):
    factory, fmt, expected = MODE_CASES[case]
    source = factory()
    if fmt:
        source.save(tmp_path / "img", format=fmt)
        source = tmp_path / "img"
    im = load_image(source)
    assert im.mode == "RGB"
    assert np.abs(np.subtract(im.getpixel((0, 0)), expected)).max() <= 3, im.getpixel((0, 0))


def test_float_outside_unit_range_is_stretched():
    im = load_image(Image.fromarray(np.float32([[1000.0, -1000.0, 0.0]]), "F"))
    assert [im.getpixel((x, 0)) for x in range(3)] == [WHITE, (0, 0, 0), (128, 128, 128)]


def test_exif_orientation_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 20), "red").save(tmp_path / "rot.jpg", exif=exif)
    assert load_image(tmp_path / "rot.jpg").size == (20, 40)


def test_animated_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ("red", "blue")]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:], duration=50)
    assert load_image(str(tmp_path / "a.gif")).getpixel((0, 0)) == (255, 0, 0)


def test_bytes_and_file_object_sources(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (3, 2), "blue").save(buf, "PNG")
    assert load_image(buf.getvalue()).size == (3, 2)
    (tmp_path / "b.png").write_bytes(buf.getvalue())
    with open(tmp_path / "b.png", "rb") as f:
        assert load_image(f).getpixel((0, 0)) == (0, 0, 255)
        assert not f.closed  # the caller's file object is left open
    with pytest.raises(ClipDecoderError, match="<bytes>"):
        load_image(b"definitely not an image")


def make_truncated(p):  # JPEG cut in half
    noise = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    Image.fromarray(noise).save(p, quality=95)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


BROKEN = {
    "missing": lambda p: None, "directory": lambda p: p.mkdir(), "zero-byte": lambda p: p.write_bytes(b""),
    "truncated": make_truncated, "text": lambda p: p.write_text("hello, I am not a JPEG\n"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_broken_files_raise_naming_the_file(tmp_path, case):
    path = tmp_path / f"{case}-photo.jpg"
    BROKEN[case](path)
    with pytest.raises(ClipDecoderError, match=f"{case}-photo.jpg"):
        load_image(path)


def png_declaring(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", width, height)  # IHDR width/height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # IHDR CRC over type+data
    return bytes(data)


@pytest.mark.parametrize("size", [(100_000, 100_000), (9_000, 8_000)])  # PIL's own limit, then ours (64M)
def test_decompression_bomb_rejected_from_header(tmp_path, size):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_declaring(*size))
    start = time.perf_counter()
    with pytest.raises(ClipDecoderError, match=r"bomb\.png.*(exceeds|bomb)"):  # not "truncated": never decoded
        load_image(path)
    assert time.perf_counter() - start < 0.5


def test_max_pixels_parameter():
    im = Image.new("RGB", (100, 100))
    with pytest.raises(ClipDecoderError, match="exceeds"):
        load_image(im, max_pixels=5_000)
    assert load_image(im, max_pixels=10_000).size == (100, 100)


ZERO, ONE = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)


def thirds() -> Image.Image:  # 90x30: left third red, middle green, right blue
    return Image.fromarray(np.tile(np.repeat(np.eye(3, dtype=np.uint8) * 255, 30, axis=0), (30, 1, 1)))


def test_preprocess_shape_and_normalisation():
    pre = Preprocess(224, 256, mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0))
    out = pre(Image.new("RGB", (300, 200), (255, 0, 128)))
    assert out.shape == (3, 224, 224) and out.dtype == np.float32
    expected = np.array([(1 - 0.5) / 0.25, (0 - 0.5) / 0.5, 128 / 255 - 0.5])[:, None, None]
    np.testing.assert_allclose(out, np.broadcast_to(expected, out.shape), atol=1e-5)


def test_centre_crop_picks_the_middle_and_squash_keeps_everything():
    crop = Preprocess(16, 16, ZERO, ONE, resample="nearest")(thirds())
    assert crop[1].min() == 1 and crop[0].max() == 0 and crop[2].max() == 0  # all green
    squash = Preprocess(15, None, ZERO, ONE, resample="nearest")(thirds())
    assert squash[0][:, 0].min() == 1 and squash[1][:, 7].min() == 1 and squash[2][:, -1].min() == 1


def test_tiny_image_and_batch_and_non_rgb_input():
    pre = Preprocess(8, 10, ZERO, ONE)
    out = pre(Image.new("RGB", (1, 1), (0, 255, 0)))
    np.testing.assert_allclose(out[:, 4, 4], [0, 1, 0], atol=1e-6)
    batch = pre.batch([Image.new("RGB", (5, 50)), Image.new("RGBA", (30, 20), (0, 0, 0, 0))])
    assert batch.shape == (2, 3, 8, 8) and batch.dtype == torch.float32
    assert batch[1].min() == 1.0  # transparent -> white


def test_dict_round_trip():
    pre = Preprocess(224, None, (0.48, 0.45, 0.41), (0.27, 0.26, 0.28), "bilinear")
    back = Preprocess.from_dict(json.loads(json.dumps(pre.to_dict())))
    assert back == pre and isinstance(back.mean, tuple) and isinstance(back.std, tuple)


BAD_CONFIGS = [{"image_size": 0}, {"image_size": 224.0}, {"resize_size": 100}, {"std": (1.0, 0.0, 1.0)},
               {"std": (1.0, 1.0)}, {"mean": (0.0, float("nan"), 0.0)}, {"resample": "lanczos"}]


@pytest.mark.parametrize("kwargs", BAD_CONFIGS)
def test_invalid_preprocess_raises(kwargs):
    with pytest.raises(ClipDecoderError):
        Preprocess(**{"image_size": 224, "resize_size": 256, "mean": ZERO, "std": ONE, **kwargs})
