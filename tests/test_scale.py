"""Scaling out: torchrun DDP gives one process's model, end-to-end fine-tuning, accumulation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import HEAD
from safetensors.torch import load_file

from clip_decoder import CLIPDecoder
from clip_decoder.cli import main
from clip_decoder.data.folder import read_split
from clip_decoder.errors import ClipDecoderError
from clip_decoder.evaluate import evaluate_model
from clip_decoder.features import FeatureLocation
from clip_decoder.training.checkpoint import load_checkpoint
from clip_decoder.training.config import TrainConfig
from clip_decoder.training.methods import decoder_method
from clip_decoder.training.trainer import Trainer

# Dropout off: with it each rank draws its own masks, so 1 and 2 processes would train with
# different noise (as two seeds do); everything else must agree to floating-point noise.
TOLERANCE = 1e-4  # on weights, and on metrics in percent points


def train_args(data, clip_dir, out, cache, *extra) -> list[str]:
    return ["train", "--data", str(data), "--split", str(data / "split.json"), "--out", str(out),
            "--backbone", f"hf:{clip_dir}", "--epochs", "3", "--batch-size", "8", "--val-fraction", "0.25",
            "--cache", str(cache), "--dropout", "0", *HEAD, *extra]


def start_torchrun(args: list[str], processes: int = 2, restarts: int = 0, **popen) -> subprocess.Popen:
    """``torchrun --standalone --nproc_per_node N --max-restarts R -m clip_decoder ARGS`` in its own
    process group, so that a hang kills torchrun's workers too, not only torchrun."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               "--max-restarts", str(restarts), "-m", "clip_decoder", *args]
    return subprocess.Popen(command, env=env, start_new_session=True, **popen)


def torchrun(args: list[str], processes: int = 2) -> None:
    """Run ``start_torchrun``'s command to the end; it must succeed."""
    process = start_torchrun(args, processes, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    assert process.returncode == 0, stderr[-3000:]


def test_torchrun_on_two_processes_trains_the_model_one_process_trains(tiny_dataset, tiny_clip_dir, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(train_args(tiny_dataset, tiny_clip_dir, one, tmp_path / "cache-one")) == 0
    torchrun(train_args(tiny_dataset, tiny_clip_dir, two, tmp_path / "cache-two"))

    weights_one, weights_two = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert weights_one.keys() == weights_two.keys()
    for key in weights_one:
        torch.testing.assert_close(weights_two[key], weights_one[key], atol=TOLERANCE, rtol=0)
    split = read_split(tiny_dataset / "split.json")
    metrics = [evaluate_model(CLIPDecoder.from_pretrained(out), tiny_dataset, split,
                              FeatureLocation(cache=tmp_path / "cache-one"), progress=False) for out in (one, two)]
    for part in ("zsl", "gzsl"):
        assert metrics[1][part].keys() == metrics[0][part].keys()
        for name, value in metrics[0][part].items():  # numbers, and the zsl's "zsl_images"
            other = metrics[1][part][name]
            assert (other == value) if isinstance(value, str) else abs(other - value) <= TOLERANCE, (part, name)

    # Each distinct image went through the tower once, split between the two ranks.
    summary_one, summary_two = (json.loads((out / "training.json").read_text()) for out in (one, two))
    entries = list((tmp_path / "cache-two").glob("features/*/*.safetensors"))
    assert summary_two["processes"] == 2 and len(summary_two["images_encoded_per_process"]) == 2
    assert sum(summary_two["images_encoded_per_process"]) == len(entries) == sum(summary_one["images_encoded_per_process"])
    assert min(summary_two["images_encoded_per_process"]) > 0
    assert not (two / "checkpoint.safetensors").exists()


def torchrun_workers(torchrun: subprocess.Popen) -> dict[int, int]:
    """RANK -> pid of torchrun's live workers (its child processes, read from /proc)."""
    workers = {}
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == torchrun.pid:
                env = dict(item.split("=", 1) for item in (entry / "environ").read_text().split("\0") if "=" in item)
                workers[int(env["RANK"])] = int(entry.name)
        except (OSError, KeyError, ValueError):  # a process that ended meanwhile
            continue
    return workers


def wait_for_checkpoint(path: Path, torchrun: subprocess.Popen, done: int, deadline: float, log: Path) -> None:
    """Wait until the checkpoint at ``path`` is past ``done`` steps and part way through an epoch."""
    while torchrun.poll() is None and time.monotonic() < deadline:
        try:
            state = load_checkpoint(path)
        except ClipDecoderError:  # not written yet, or replaced while being read
            state = None
        if state is not None:
            steps = (state["epoch"] - 1) * (state["train_images"] // RESTART_BATCH) + state["step"]
            if steps > done and state["step"] >= 1:
                return
        time.sleep(0.005)
    raise AssertionError(f"torchrun ended (code {torchrun.poll()}) or stalled before its checkpoint passed {done}"
                         f" steps:\n{log.read_text()[-3000:]}")


RESTART_BATCH = 4


def test_torchrun_restarts_the_group_after_a_worker_is_killed_and_ends_with_the_uninterrupted_model(
        tiny_dataset, tiny_clip_dir, tmp_path):
    """``torchrun --max-restarts 2 ... train --resume``: SIGKILL rank 0 mid-epoch, then rank 1 of the restarted
    group; each time torchrun restarts the group, which resumes from the checkpoint. Dropout stays on (each rank's
    random state is in the checkpoint): the model is the uninterrupted run's, bit for bit."""
    def args(out: Path) -> list[str]:
        return ["train", "--data", str(tiny_dataset), "--split", str(tiny_dataset / "split.json"), "--out", str(out),
                "--backbone", f"hf:{tiny_clip_dir}", "--epochs", "10", "--batch-size", str(RESTART_BATCH), "--val-fraction", "0.25",
                "--cache", str(tmp_path / "cache"), "--checkpoint-every", "1", "--resume", *HEAD]

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    torchrun(args(straight))
    log_path = tmp_path / "torchrun.log"
    log = log_path.open("w")
    process = start_torchrun(args(killed), restarts=2, stdout=log, stderr=subprocess.STDOUT)
    checkpoint, deadline, restarts = killed / "checkpoint.safetensors", time.monotonic() + 300, []
    try:
        for rank, after in ((0, 6), (1, 16)):  # steps done, of 50 (5 per epoch)
            wait_for_checkpoint(checkpoint, process, after, deadline, log_path)
            group = torchrun_workers(process)
            os.kill(group[rank], signal.SIGKILL)
            killed_at = time.monotonic()
            while not (set(torchrun_workers(process).values()) - set(group.values())):  # torchrun starts a new group
                assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
                time.sleep(0.05)
            written = checkpoint.stat().st_mtime_ns
            while checkpoint.stat().st_mtime_ns == written:  # which resumes and writes its first checkpoint
                assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
                time.sleep(0.01)
            restarts.append(time.monotonic() - killed_at)
        assert process.wait(timeout=max(1.0, deadline - time.monotonic())) == 0, log_path.read_text()[-3000:]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        log.close()
    for key, value in load_file(straight / "model.safetensors").items():
        assert torch.equal(load_file(killed / "model.safetensors")[key], value), key
    logs = [[json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()] for out in (straight, killed)]
    assert logs[1] == [{**record, "seconds": logs[1][i]["seconds"]} for i, record in enumerate(logs[0])]
    assert not checkpoint.exists()
    print(f"\nkilled rank 0, then rank 1: training resumed {restarts[0]:.1f} s and {restarts[1]:.1f} s after each kill")


def test_torchrun_fine_tuning_the_tower_matches_one_process(tiny_dataset, tiny_clip_dir, tmp_path):
    """End to end under DDP: decoded images sharded, the tower's gradients averaged, validation
    split across ranks and gathered."""
    finetune = ["--finetune-image-tower", "--tower-lr", "1e-3"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(train_args(tiny_dataset, tiny_clip_dir, one, tmp_path / "cache", *finetune)) == 0
    torchrun(train_args(tiny_dataset, tiny_clip_dir, two, tmp_path / "cache", *finetune))
    weights_one, weights_two = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert any(key.startswith("image_tower.") for key in weights_one) and weights_one.keys() == weights_two.keys()
    for key in weights_one:
        torch.testing.assert_close(weights_two[key], weights_one[key], atol=TOLERANCE, rtol=0)
    logs = [[json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()] for out in (one, two)]
    assert [r["val_mAP_seen"] for r in logs[0]] == pytest.approx([r["val_mAP_seen"] for r in logs[1]], abs=TOLERANCE)


def test_batch_size_must_split_evenly_into_micro_batches():
    with pytest.raises(Exception, match="multiple of --accumulate"):
        TrainConfig(batch_size=10, accumulate=4)


def test_accumulating_micro_batches_gives_the_gradient_of_the_whole_batch(tiny_clip_dir):
    """ASL is a mean over images, so two half batches give one whole batch's step (the alignment
    loss's negatives are per micro-batch, so it is off here)."""
    config = TrainConfig(batch_size=8, clip_weight=0.0, head={"dim": 32, "heads": 4, "ffn_dim": 64, "dropout": 0.0})
    method = decoder_method("clip-decoder")
    tokens, labels = torch.randn(8, 17, 24), torch.randn(4, 24)
    targets, sentences = (torch.rand(8, 4) > 0.5).float(), torch.randn(8, 24)
    states = []
    for accumulate in (1, 2):
        torch.manual_seed(0)
        model = CLIPDecoder.create(backbone=f"hf:{tiny_clip_dir}", **config.head)
        trainer = Trainer(model, method.recipe(replace(config, accumulate=accumulate)), total_steps=4)
        losses = trainer.step(tokens, labels, targets, sentences)
        # The gradients themselves, not the weights after AdamW: a parameter whose exact gradient
        # is 0 (the key bias: softmax ignores a constant shift) gets Adam's sign of float noise.
        states.append((losses["cls"], {name: p.grad.clone() for name, p in model.head.named_parameters()}))
    assert states[0][0] == pytest.approx(states[1][0], rel=1e-5)
    for key, value in states[0][1].items():
        torch.testing.assert_close(states[1][1][key], value, atol=1e-6, rtol=1e-4)


def test_fine_tuning_the_image_tower_end_to_end_lowers_the_loss_and_saves_the_tower(tiny_dataset, tiny_clip_dir,
                                                                                      tmp_path):
    out = tmp_path / "finetuned"
    args = train_args(tiny_dataset, tiny_clip_dir, out, tmp_path / "cache", "--finetune-image-tower",
                      "--tower-lr", "1e-3", "--accumulate", "2")
    args[args.index("--epochs") + 1] = "6"
    assert main(args) == 0
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < log[0]["loss"]
    config = json.loads((out / "config.json").read_text())
    assert config["image_tower_trained"] is True
    saved = load_file(out / "model.safetensors")
    tuned = CLIPDecoder.from_pretrained(out)
    untouched = CLIPDecoder.create(backbone=f"hf:{tiny_clip_dir}")
    # The tower's weights were trained, saved, and are what loading gives back.
    key = "vision_model.encoder.layers.1.mlp.fc1.weight"
    assert not torch.equal(saved[f"image_tower.{key}"], untouched.image_tower.state_dict()[key])
    assert torch.equal(tuned.image_tower.state_dict()[key], saved[f"image_tower.{key}"])
    # A fine-tuned tower never reuses the frozen tower's cached features.
    from clip_decoder.features import FeatureCache

    assert FeatureCache(tuned.image_tower, tmp_path / "c").folder.name != FeatureCache(untouched.image_tower,
                                                                                      tmp_path / "c").folder.name


def test_tower_blocks_trains_only_the_last_blocks(tiny_clip_dir):
    model = CLIPDecoder.create(backbone=f"hf:{tiny_clip_dir}", dim=32, heads=4, ffn_dim=64)
    Trainer(model, decoder_method("clip-decoder").recipe(TrainConfig(finetune_image_tower=True, tower_blocks=2)),
            total_steps=1)
    blocks = model.image_tower.trainable_blocks()
    trains = [all(p.requires_grad for p in block.parameters()) for block in blocks]
    assert trains == [False] * (len(blocks) - 2) + [True, True]
    assert not any(p.requires_grad for p in model.text_tower.parameters())


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_every_trainable_tower_block_gets_a_gradient_from_the_tokens(kind, tiny_clip_dir, tiny_siglip_dir):
    """DDP needs a gradient for every trainable parameter; the loss sees the tower only through its tokens."""
    folder = tiny_clip_dir if kind == "clip" else tiny_siglip_dir
    model = CLIPDecoder.create(backbone=f"hf:{folder}", dim=32, heads=4, ffn_dim=64)
    blocks = torch.nn.ModuleList(model.image_tower.trainable_blocks())
    blocks.requires_grad_(True)
    model.image_tower(torch.randn(2, 3, 32, 32)).tokens.square().sum().backward()
    assert all(p.grad is not None for p in blocks.parameters())
