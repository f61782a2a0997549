"""No lost work: atomic checkpoints, resume after SIGKILL, a feature cache that never trusts a bad entry."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict

import pytest
import torch
from conftest import HEAD
from safetensors.torch import load_file, save_file

from clip_decoder.training.checkpoint import load_checkpoint, save_checkpoint
from clip_decoder.cli import build_parser, main, training_config
from clip_decoder.encoders import create_backbone
from clip_decoder.errors import ClipDecoderError
from clip_decoder.features import FeatureCache


def test_checkpoint_round_trips_nested_state_without_pickle(tmp_path):
    state = {"epoch": 3, "best": float("nan"), "history": [{"loss": 0.5}], "none": None,
             "optimizer": {"state": {0: {"step": torch.tensor(4.0), "exp_avg": torch.ones(2, 3)}},
                           "param_groups": [{"betas": (0.9, 0.999), "params": [0]}]},
             "rng": [torch.get_rng_state()]}
    path = tmp_path / "state.safetensors"
    save_checkpoint(path, state)
    back = load_checkpoint(path)
    assert back["epoch"] == 3 and back["history"] == [{"loss": 0.5}] and back["none"] is None
    assert back["best"] != back["best"]  # nan survives
    assert list(back["optimizer"]["state"]) == [0]  # int keys stay ints, as optimizers need
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], torch.ones(2, 3))
    assert torch.equal(back["rng"][0], torch.get_rng_state())
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_a_crash_while_writing_a_checkpoint_leaves_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.safetensors"
    save_checkpoint(path, {"step": 1})
    real_write = os.write

    def crash(descriptor, data):
        real_write(descriptor, bytes(data[: len(data) // 2]))
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "write", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"step": 2})
    assert load_checkpoint(path) == {"step": 1}
    assert list(tmp_path.iterdir()) == [path]  # the half-written temporary file is removed


def test_an_unreadable_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "checkpoint.safetensors"
    path.write_bytes(b"\x00" * 10)
    with pytest.raises(ClipDecoderError, match="checkpoint .* is not readable"):
        load_checkpoint(path)


def _train_args(data, clip_dir, out, cache, epochs: int) -> list[str]:
    return ["train", "--data", str(data), "--split", str(data / "split.json"), "--out", str(out),
            "--backbone", f"hf:{clip_dir}", "--epochs", str(epochs), "--batch-size", "4", "--val-fraction", "0.25",
            "--cache", str(cache), "--checkpoint-every", "1", *HEAD]


def test_train_resumes_after_sigkill_mid_epoch_to_the_uninterrupted_result(tiny_dataset, tiny_clip_dir, tmp_path):
    """Dropout stays on: the checkpoint holds the random state too, so the result is exact."""
    epochs, cache = 8, tmp_path / "cache"
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert main(_train_args(tiny_dataset, tiny_clip_dir, straight, cache, epochs)) == 0

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "clip_decoder", *_train_args(tiny_dataset, tiny_clip_dir, killed, cache, epochs)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint, state, deadline = killed / "checkpoint.safetensors", None, time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline:
        if checkpoint.exists():
            try:
                state = load_checkpoint(checkpoint)
            except ClipDecoderError:  # replaced by the next checkpoint while being read: look again
                continue
            if state["epoch"] >= 3 and state["step"] >= 1:  # part way through an epoch, past the first ones
                process.send_signal(signal.SIGKILL)
                break
        time.sleep(0.005)
    assert process.wait(timeout=60) == -signal.SIGKILL, "training ended before it could be killed"
    assert not (killed / "model.safetensors").exists()
    assert 3 <= load_checkpoint(checkpoint)["epoch"] <= epochs

    assert main([*_train_args(tiny_dataset, tiny_clip_dir, killed, cache, epochs), "--resume"]) == 0
    assert not checkpoint.exists()
    resumed, uninterrupted = load_file(killed / "model.safetensors"), load_file(straight / "model.safetensors")
    for key, value in uninterrupted.items():
        assert torch.equal(resumed[key], value), key
    logs = [[json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()] for out in (straight, killed)]
    assert [r["epoch"] for r in logs[1]] == list(range(1, epochs + 1))
    assert [r["val_mAP_seen"] for r in logs[1]] == [r["val_mAP_seen"] for r in logs[0]]
    assert [r["loss"] for r in logs[1]] == [r["loss"] for r in logs[0]]


def test_resume_refuses_a_checkpoint_of_other_options(tiny_dataset, tiny_clip_dir, tmp_path, capsys):
    out, cache = tmp_path / "model", tmp_path / "cache"
    out.mkdir()
    args = _train_args(tiny_dataset, tiny_clip_dir, out, cache, 2)
    config = asdict(training_config(build_parser().parse_args(args)))
    save_checkpoint(out / "checkpoint.safetensors", {"config": {**config, "lr": 0.5}, "world_size": 1})
    assert main([*args, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "written with other training options (lr 0.5 -> 0.001); resume with the same options" in err


def test_resume_without_a_checkpoint_starts_from_the_beginning(tiny_dataset, tiny_clip_dir, tmp_path, capsys):
    out = tmp_path / "model"
    assert main([*_train_args(tiny_dataset, tiny_clip_dir, out, tmp_path / "cache", 1), "--resume"]) == 0
    assert "training from the start" in capsys.readouterr().err and (out / "model.safetensors").exists()


@pytest.fixture
def cache_and_images(tiny_clip_dir, tiny_dataset, tmp_path):
    tower = create_backbone(f"hf:{tiny_clip_dir}").image
    images = sorted((tiny_dataset / "images").glob("test-*.png"))[:3]
    cache = FeatureCache(tower, tmp_path / "cache")
    return cache, images, cache.get(images, progress=False)


def _spoil(entry, how: str, other_entry) -> None:
    tensors = load_file(entry)
    if how == "garbage":
        entry.write_bytes(b"\x00garbage" * 50)
    elif how == "truncated":
        entry.write_bytes(entry.read_bytes()[:100])
    elif how == "nan":
        tensors["tokens"][0, 0] = float("nan")
        save_file(tensors, entry, metadata={"source_sha256": entry.stem})
    elif how == "wrong shape":
        save_file({"tokens": tensors["tokens"][:, :5].contiguous(), "pooled": tensors["pooled"]}, entry,
                  metadata={"source_sha256": entry.stem})
    elif how == "another image's entry":
        entry.write_bytes(other_entry.read_bytes())


@pytest.mark.parametrize("how", ["garbage", "truncated", "nan", "wrong shape", "another image's entry"])
def test_feature_cache_rebuilds_a_corrupt_or_stale_entry(cache_and_images, how, capsys):
    cache, images, fresh = cache_and_images
    entries = sorted(cache.folder.glob("*.safetensors"))
    _spoil(entries[0], how, entries[1])
    again = FeatureCache(cache.tower, cache.folder.parent.parent)
    features = again.get(images, progress=False)
    assert again.rebuilt == 1 and again.encoded == 1
    assert "corrupt or stale; recomputing it" in capsys.readouterr().err
    # Recomputed alone rather than in a batch of 3: equal to float noise.
    torch.testing.assert_close(features.tokens, fresh.tokens, atol=2e-3, rtol=0)
    torch.testing.assert_close(features.pooled, fresh.pooled, atol=1e-5, rtol=0)
    assert FeatureCache(cache.tower, cache.folder.parent.parent).get(images, progress=False) is not None


def test_feature_cache_of_a_changed_tower_is_a_different_cache(cache_and_images):
    cache, images, _ = cache_and_images
    with torch.no_grad():
        next(cache.tower.parameters()).add_(0.01)
    changed = FeatureCache(cache.tower, cache.folder.parent.parent)
    assert changed.folder != cache.folder
    changed.get(images, progress=False)
    assert changed.encoded == len({p.read_bytes() for p in images})
