"""Disk faults: a full disk, no permission or an I/O error at any write leaves the previous file as it
was and is one line naming the file and the cause; the same command, once the fault is gone, ends
with the result of a run that never failed."""

from __future__ import annotations

import errno
import json
import re
import shutil
import subprocess

import pytest
import torch
from conftest import HEAD, DiskFault
from safetensors.torch import load_file

from clip_decoder import CLIPDecoder
from clip_decoder.cli import main
from clip_decoder.training.checkpoint import load_checkpoint, save_checkpoint

def train_args(data, clip_dir, out, cache) -> list[str]:
    """3 epochs of 5 steps; a checkpoint after steps 2 and 4 and at each epoch's end."""
    return ["train", "--data", str(data), "--split", str(data / "split.json"), "--out", str(out),
            "--backbone", f"hf:{clip_dir}", "--epochs", "3", "--batch-size", "4", "--val-fraction", "0.25",
            "--cache", str(cache), "--checkpoint-every", "2", "--resume", *HEAD]


@pytest.fixture(scope="module")
def reference(tiny_dataset, tiny_clip_dir, tmp_path_factory):
    """A run that never failed: its model folder and its (now full) feature cache."""
    out, cache = tmp_path_factory.mktemp("reference"), tmp_path_factory.mktemp("cache")
    assert main(train_args(tiny_dataset, tiny_clip_dir, out, cache)) == 0
    return out, cache


def one_error(capsys) -> str:
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) == 1, errors
    return errors[0]


def assert_same_model(out, reference_out) -> None:
    trained, expected = load_file(out / "model.safetensors"), load_file(reference_out / "model.safetensors")
    assert trained.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(trained[key], value), key
    logs = [[{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in (o / "train_log.jsonl").read_text().splitlines()]
            for o in (out, reference_out)]
    assert logs[0] == logs[1]


def no_temporary_files(*folders) -> bool:
    return not [path for folder in folders for path in folder.rglob("*.tmp")]


def test_a_full_disk_while_caching_features_keeps_the_entries_written_and_the_rerun_finishes(
        tiny_dataset, tiny_clip_dir, reference, tmp_path, monkeypatch, capsys):
    out, cache = tmp_path / "model", tmp_path / "cache"
    fault = DiskFault(monkeypatch, "*.safetensors", errno.ENOSPC, skip=8)  # the first batch of 8 is written
    assert main(train_args(tiny_dataset, tiny_clip_dir, out, cache)) == 2
    line = one_error(capsys)
    assert re.fullmatch(rf"error: cannot write {re.escape(str(cache))}/features/\w{{16}}/\w{{64}}\.safetensors:"
                        r" No space left on device \(ENOSPC\); nothing was written", line), line
    assert len(list(cache.glob("features/*/*.safetensors"))) == 8 and no_temporary_files(cache)
    fault.stop()
    assert main(train_args(tiny_dataset, tiny_clip_dir, out, cache)) == 0
    assert_same_model(out, reference[0])


def test_an_io_error_while_checkpointing_keeps_the_previous_checkpoint_and_resume_finishes(
        tiny_dataset, tiny_clip_dir, reference, tmp_path, monkeypatch, capsys):
    out = tmp_path / "model"
    fault = DiskFault(monkeypatch, "checkpoint.safetensors", errno.EIO, skip=4)  # epoch 2, step 4 fails
    assert main(train_args(tiny_dataset, tiny_clip_dir, out, reference[1])) == 2
    checkpoint = out / "checkpoint.safetensors"
    assert one_error(capsys) == (f"error: cannot write {checkpoint}: Input/output error (EIO);"
                                 " the previous checkpoint.safetensors is unchanged")
    state = load_checkpoint(checkpoint)
    assert (state["epoch"], state["step"]) == (2, 2) and no_temporary_files(out)
    fault.stop()
    (out / ".checkpoint.safetensors.4242.tmp").write_bytes(b"what a process killed while writing left")
    assert main(train_args(tiny_dataset, tiny_clip_dir, out, reference[1])) == 0
    assert not checkpoint.exists() and no_temporary_files(out)  # the leftover is deleted too
    assert_same_model(out, reference[0])


@pytest.mark.parametrize("name, code", [("model.safetensors", errno.EACCES), ("config.json", errno.ENOSPC)])
def test_a_failed_model_folder_write_leaves_the_previous_folder_and_resume_finishes(
        name, code, tiny_dataset, tiny_clip_dir, reference, tmp_path, monkeypatch, capsys):
    out = CLIPDecoder.create(backbone=f"hf:{tiny_clip_dir}", dim=32, heads=4, ffn_dim=64).save_pretrained(tmp_path / "model")
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    fault = DiskFault(monkeypatch, name, code)
    assert main(train_args(tiny_dataset, tiny_clip_dir, out, reference[1])) == 2
    assert one_error(capsys) == (f"error: cannot write {out / name}: {'Permission denied (EACCES)' if code == errno.EACCES else 'No space left on device (ENOSPC)'};"
                                 f" the previous {name} is unchanged")
    assert {name: (out / name).read_bytes() for name in before} == before  # both files: the folder is the old one
    assert (out / "checkpoint.safetensors").exists() and no_temporary_files(out)
    fault.stop()
    assert main(train_args(tiny_dataset, tiny_clip_dir, out, reference[1])) == 0
    assert_same_model(out, reference[0])


def test_a_full_disk_while_writing_training_json_keeps_the_checkpoint_and_resume_finishes(
        tiny_dataset, tiny_clip_dir, reference, tmp_path, monkeypatch, capsys):
    out = tmp_path / "model"
    fault = DiskFault(monkeypatch, "training.json", errno.ENOSPC)
    assert main(train_args(tiny_dataset, tiny_clip_dir, out, reference[1])) == 2
    assert one_error(capsys) == f"error: cannot write {out / 'training.json'}: No space left on device (ENOSPC); nothing was written"
    assert not (out / "training.json").exists() and (out / "checkpoint.safetensors").exists() and no_temporary_files(out)
    fault.stop()
    assert main(train_args(tiny_dataset, tiny_clip_dir, out, reference[1])) == 0
    assert_same_model(out, reference[0])
    summary = json.loads((out / "training.json").read_text())
    assert summary["selected_epoch"] == json.loads((reference[0] / "training.json").read_text())["selected_epoch"]


def test_a_full_disk_while_writing_thresholds_keeps_the_previous_ones(tiny_dataset, reference, tmp_path, monkeypatch,
                                                                      capsys):
    model = shutil.copytree(reference[0], tmp_path / "model")
    args = ["calibrate", "--model", str(model), "--data", str(tiny_dataset), "--split", str(tiny_dataset / "split.json"),
            "--cache", str(reference[1])]
    assert main(args) == 0
    thresholds = (model / "thresholds.json").read_bytes()
    capsys.readouterr()
    fault = DiskFault(monkeypatch, "thresholds.json", errno.ENOSPC)
    assert main(args) == 2
    assert one_error(capsys) == (f"error: cannot write {model / 'thresholds.json'}: No space left on device (ENOSPC);"
                                 " the previous thresholds.json is unchanged")
    assert (model / "thresholds.json").read_bytes() == thresholds and no_temporary_files(model)
    fault.stop()
    assert main(args) == 0 and (model / "thresholds.json").read_bytes() == thresholds


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs at tmp_path/disk: a file system that really fills (mounting needs root)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if shutil.which("mount") is None or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)],
                                                        capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root); the fault-injection tests above cover each write")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def fill(disk, leave: int) -> None:
    """Fill ``disk`` with one file until only about ``leave`` bytes stay free."""
    import os

    stats = os.statvfs(disk)
    (disk / "filler").write_bytes(bytes(max(0, stats.f_bavail * stats.f_frsize - leave)))


def test_a_really_full_disk_keeps_the_previous_checkpoint_and_training_finishes_once_space_is_back(
        small_disk, tiny_dataset, tiny_clip_dir, reference, capsys):
    checkpoint = small_disk / "checkpoint.safetensors"
    save_checkpoint(checkpoint, {"step": 1})
    fill(small_disk, 64 * 1024)
    with pytest.raises(Exception, match=rf"cannot write {re.escape(str(checkpoint))}: No space left on device \(ENOSPC\);"
                                        " the previous checkpoint.safetensors is unchanged"):
        save_checkpoint(checkpoint, {"step": 2, "weights": torch.zeros(100_000)})
    assert load_checkpoint(checkpoint) == {"step": 1} and no_temporary_files(small_disk)

    out = small_disk / "model"
    assert main(train_args(tiny_dataset, tiny_clip_dir, out, reference[1])) == 2
    assert one_error(capsys) == (f"error: cannot write {out / 'checkpoint.safetensors'}: No space left on device (ENOSPC);"
                                 " nothing was written")
    assert no_temporary_files(small_disk)
    (small_disk / "filler").unlink()  # space is back
    assert main(train_args(tiny_dataset, tiny_clip_dir, out, reference[1])) == 0
    assert_same_model(out, reference[0])
