"""Tests for clip_decoder.decoding: batches decoded ahead in threads, and the FeatureCache using them."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from clip_decoder import decoding
from clip_decoder.decoding import decode_workers, decoded_batches
from clip_decoder.errors import ClipDecoderError
from clip_decoder.features import FeatureCache
from clip_decoder.images import Preprocess, load_image

TINY = Preprocess(8, 10, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))


def grey(level: int) -> Image.Image:
    """A small image whose every pixel is ``level``: its batch row tells which input it was."""
    return Image.new("RGB", (12, 9), (level, level, level))


def png_bytes(level: int) -> bytes:
    buf = io.BytesIO()
    grey(level).save(buf, "PNG")
    return buf.getvalue()


def levels_of(pixels: np.ndarray) -> list[int]:
    """Undo TINY's normalisation of the red channel: the grey level of each row."""
    return [round(float(row[0, 0, 0] * 0.5 + 0.5) * 255) for row in pixels]


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_order_is_kept_across_batches_that_do_not_divide_the_input(workers):
    sources = [png_bytes(10 * i) for i in range(11)]
    batches = list(decoded_batches(sources, TINY, batch_size=4, workers=workers))
    assert [b.indices for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    assert [levels_of(b.pixels) for b in batches] == [[0, 10, 20, 30], [40, 50, 60, 70], [80, 90, 100]]
    assert all(b.pixels.shape[1:] == (3, 8, 8) and not b.failed for b in batches)


@pytest.mark.parametrize("workers", [0, 2])
def test_broken_files_are_reported_by_name_and_the_rest_come_out(tmp_path, workers):
    paths = []
    for i in range(5):
        paths.append(tmp_path / f"ok-{i}.png")
        grey(20 * i).save(paths[-1])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello, I am not a JPEG\n")
    paths[1:1] = [tmp_path / "empty.jpg"]  # position 1
    paths[4:4] = [tmp_path / "text.jpg"]  # position 4
    batches = list(decoded_batches(paths, TINY, batch_size=3, workers=workers))
    assert [b.indices for b in batches] == [[0, 2], [3, 5], [6]]
    assert [levels_of(b.pixels) for b in batches] == [[0, 20], [40, 60], [80]]
    failed = {k: v for b in batches for k, v in b.failed.items()}
    assert set(failed) == {1, 4} and "empty.jpg" in failed[1] and "text.jpg" in failed[4]


def test_a_batch_of_only_broken_images_is_empty_not_an_error():
    (batch,) = decoded_batches([b"", b"nope"], TINY, batch_size=4)
    assert batch.indices == [] and batch.pixels.shape == (0, 3, 8, 8) and set(batch.failed) == {0, 1}


def test_pixels_equal_the_sequential_preprocess_arrays(cat_photo, tiny_dataset):
    from clip_decoder.encoders.offline import LITE_PREPROCESS

    with Image.open(cat_photo) as photo:  # a lazily opened PIL image, once only (see the docstring)
        sources = [cat_photo, *sorted((tiny_dataset / "images").glob("test-*.png"))[:3], cat_photo.read_bytes(), photo]
        (batch,) = decoded_batches(sources, LITE_PREPROCESS, batch_size=8, workers=2)
        expected = LITE_PREPROCESS.arrays([load_image(s) for s in sources])
    assert batch.indices == list(range(6)) and np.array_equal(batch.pixels, expected)


def test_preprocess_is_bit_identical_to_the_plain_formula(cat_photo):
    image = load_image(cat_photo)
    pre = Preprocess(224, 256, mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711))
    pixels = np.asarray(pre.resize_crop(image), dtype=np.float32) / 255.0
    plain = ((pixels - np.float32(pre.mean)) / np.float32(pre.std)).transpose(2, 0, 1)
    out = pre(image)
    assert out.flags.c_contiguous and out.dtype == np.float32 and np.array_equal(out, plain)


def test_decoding_runs_ahead_by_a_bounded_amount_and_stops_with_the_caller():
    pulled = []

    def sources():
        for i in range(1000):
            pulled.append(i)
            yield png_bytes(i % 256)

    batches = decoded_batches(sources(), TINY, batch_size=5, workers=2, prefetch=1)
    first = next(batches)
    assert first.indices == [0, 1, 2, 3, 4]
    assert len(pulled) == 2 * 5  # this batch and the one decoding ahead
    batches.close()  # the caller stops early: queued work is dropped, the threads end
    assert not [t for t in threading.enumerate() if t.name.startswith("clip-decoder-decode")]
    assert len(pulled) == 2 * 5


def test_invalid_arguments_raise():
    with pytest.raises(ClipDecoderError, match="batch_size"):
        decoded_batches([b""], TINY, batch_size=0)
    with pytest.raises(ClipDecoderError, match="prefetch"):
        decoded_batches([b""], TINY, prefetch=0)


def test_feature_cache_gives_the_same_features_decoding_in_threads_as_in_turn(tiny_clip_dir, tiny_dataset, tmp_path,
                                                                               capsys):
    from clip_decoder.encoders import create_backbone

    tower = create_backbone(f"hf:{tiny_clip_dir}").image  # 32 px: quick; the decoding does not depend on the tower
    paths = sorted((tiny_dataset / "images").glob("train-*.png"))[:5]
    (tmp_path / "broken.jpg").write_text("not a JPEG")
    paths.insert(2, tmp_path / "broken.jpg")
    sequential = FeatureCache(tower, tmp_path / "in-turn", decode_workers=0)
    threaded = FeatureCache(tower, tmp_path / "threads", decode_workers=2)
    before = sequential.get(paths, batch_size=4, progress=False)
    assert "broken.jpg" in capsys.readouterr().err
    after = threaded.get(paths, batch_size=4, progress=False)
    assert "broken.jpg" in capsys.readouterr().err
    assert before.kept == after.kept == [0, 1, 3, 4, 5] and set(before.failed) == set(after.failed) == {2}
    distinct = len({p.read_bytes() for p in paths if p.suffix == ".png"})  # equal files are encoded once
    assert sequential.encoded == threaded.encoded == distinct
    assert torch.equal(before.tokens, after.tokens) and torch.equal(before.pooled, after.pooled)
    with torch.inference_mode():  # and what the tower gives on the images, preprocessed one by one
        direct = tower(tower.preprocess.batch([load_image(p) for p in paths[:2]]))
    torch.testing.assert_close(after.pooled[:2], direct.pooled, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(after.tokens[:2], direct.tokens.half(), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("cpus, on_gpu", [(1, 1), (2, 1), (3, 2), (5, 4), (16, 4)])
def test_decoding_threads_follow_the_towers_device(monkeypatch, cpus, on_gpu):
    """One thread beside a CPU tower (it needs the cores); beside a GPU the spare cores, at most 4
    (past 4 they slowed an H200's extraction and tagging: decoding.py's comment)."""
    monkeypatch.setattr(decoding, "usable_cpus", lambda: cpus)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert decode_workers("cpu") == 1
    assert decode_workers("cuda") == on_gpu
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun, two processes on this node: half the cores each
    assert decode_workers("cuda") == max(1, min(4, cpus // 2 - 1))


def test_tower_features_decode_with_the_threads_of_the_towers_device(tiny_clip_dir, tiny_dataset, monkeypatch):
    from clip_decoder.encoders import create_backbone
    from clip_decoder.features import common

    asked = []
    monkeypatch.setattr(common, "decode_workers", lambda device_type: asked.append(device_type) or 3)
    seen_workers = []
    real = common.decoded_batches

    def recording(*args, workers, **options):
        seen_workers.append(workers)
        return real(*args, workers=workers, **options)

    monkeypatch.setattr(common, "decoded_batches", recording)
    tower = create_backbone(f"hf:{tiny_clip_dir}").image
    paths = sorted((tiny_dataset / "images").glob("train-*.png"))[:2]
    list(common.encoded_batches(tower, paths))
    list(common.encoded_batches(tower, paths, workers=0))  # an explicit count wins
    assert asked == ["cpu"] and seen_workers == [3, 0]


def test_zero_shot_tagging_and_tower_training_decode_with_the_threads_asked_for(tiny_clip_dir, tiny_dataset,
                                                                              monkeypatch):
    from clip_decoder import zero_shot
    from clip_decoder.data.folder import read_part
    from clip_decoder.training import data

    seen_workers = []

    def recorder(module):
        real = module.decoded_batches

        def recording(*args, workers=decoding.DEFAULT_WORKERS, **options):
            seen_workers.append(workers)
            return real(*args, workers=workers, **options)
        monkeypatch.setattr(module, "decoded_batches", recording)

    recorder(zero_shot)
    recorder(data)
    monkeypatch.setattr(zero_shot, "decode_workers", lambda device_type: 3)
    tagger = zero_shot.ZeroShotTagger.load(f"hf:{tiny_clip_dir}")
    paths = sorted((tiny_dataset / "images").glob("train-*.png"))[:2]
    tagger.predict(paths, ["red", "blue"])
    images = data.ImageSet.build(read_part(tiny_dataset, "train")[:4], tagger.preprocess, progress=False, decode_workers=2)
    list(images.batches([torch.tensor([0, 1]), torch.tensor([2, 3])]))
    assert seen_workers == [3, 2, 2]
