"""``clip-decoder train``: a dataset folder and a label split in, a model folder out.

Runs as one process, or as one rank of a torchrun job (the same call on every rank); rank 0
writes the model folder, ``train_log.jsonl``, ``training.json`` and ``curves.png``.
"""

from __future__ import annotations

import io
import json
import sys
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch

from ..atomic import remove_leftovers, write_file
from ..data.folder import LabelSplit, training_parts, warn_label_coverage
from ..errors import ClipDecoderError
from ..feature_store import FeatureStore
from ..features import FeatureCache
from ..model import CLIPDecoder
from .checkpoint import load_checkpoint
from .config import TrainConfig
from .data import FeatureSet, ImageSet
from .distributed import World, close_world, init_world, local_device
from .loop import CHECKPOINT_EVERY, fit

CHECKPOINT_FILE = "checkpoint.safetensors"
LOG_FILE = "train_log.jsonl"


def plot_curves(history: list[dict], path: Path) -> None:
    """PNG of the training losses and the validation mAP per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for key in ("loss", "cls", "clip"):
        left.plot(epochs, [r[key] for r in history], label=key)
    left.set(xlabel="epoch", ylabel="training loss", yscale="log")
    left.legend()
    right.plot(epochs, [r["val_mAP_seen"] for r in history], color="tab:green")
    best = max(history, key=lambda r: r["val_mAP_seen"])
    right.axvline(best["epoch"], color="grey", linestyle=":", label=f"selected (epoch {best['epoch']})")
    right.set(xlabel="epoch", ylabel="validation mAP, seen labels (%)")
    right.legend()
    figure.tight_layout()
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=100)
    plt.close(figure)
    write_file(path, png.getvalue())


def check_resumable(state: dict, config: TrainConfig, world: World, path: Path) -> None:
    """Refuse to continue a checkpoint with other options or another number of processes."""
    differ = sorted(key for key, value in asdict(config).items() if state["config"].get(key) != value)
    if differ:
        changes = ", ".join(f"{key} {state['config'].get(key)!r} -> {getattr(config, key)!r}" for key in differ)
        raise ClipDecoderError(f"{path} was written with other training options ({changes});"
                               " resume with the same options, or delete it to start again")
    if state["world_size"] != world.size:
        raise ClipDecoderError(f"{path} was written by {state['world_size']} processes; resume with the same number"
                               f" (this run has {world.size})")


def write_json(path: Path, data: dict) -> None:
    """Write a JSON file atomically (temporary file, then rename)."""
    write_file(path, json.dumps(data, indent=2) + "\n")


def write_log(out: Path, history: list[dict]) -> None:
    """``out/train_log.jsonl``: one JSON record per finished epoch, rewritten whole (atomically) each time."""
    write_file(out / LOG_FILE, "".join(json.dumps(record) + "\n" for record in history), fsync=False)


def new_model(config: TrainConfig, backbone: str) -> CLIPDecoder:
    """The seeded, untrained model that ``config`` trains."""
    torch.manual_seed(config.seed)
    return CLIPDecoder.create(backbone=backbone, templates=config.template_set, prior=config.model_prior,
                              **config.head_options)


def train_model(
    data_dir: str | Path,
    split: LabelSplit,
    out: str | Path,
    backbone: str = "offline",
    config: TrainConfig | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    resume: bool = False,
    checkpoint_every: int = CHECKPOINT_EVERY,
    store_dir: str | Path | None = None,
) -> CLIPDecoder:
    """Train on the folder's train part (seen labels only) and write a model folder to ``out``.

    ``out/checkpoint.safetensors`` holds the run's state until the model folder is written;
    ``resume`` continues from it. With ``store_dir`` the frozen tower's features go to a sharded
    ``FeatureStore`` there and are read a batch at a time, instead of the per-image cache held in memory.
    """
    world = init_world()
    try:
        return _train_model(data_dir, split, Path(out), backbone, config or TrainConfig(), cache_dir, progress,
                            resume, checkpoint_every, world, store_dir)
    finally:
        close_world(world)


def _train_model(data_dir, split: LabelSplit, out: Path, backbone: str, config: TrainConfig, cache_dir, progress: bool,
                 resume: bool, checkpoint_every: int, world: World, store_dir=None) -> CLIPDecoder:
    model = new_model(config, backbone)
    model.config.image_tower_trained = config.finetune_image_tower
    model.to(local_device())
    checkpoint, state = out / CHECKPOINT_FILE, None
    if resume and checkpoint.is_file():
        state = load_checkpoint(checkpoint)
        check_resumable(state, config, world, checkpoint)
    elif resume and world.is_main:
        print(f"no checkpoint in {out}: training from the start", file=sys.stderr)
    train_samples, val_samples = training_parts(data_dir, config.val_fraction)
    if world.is_main:
        warn_label_coverage(train_samples + val_samples, split, split.seen, "training")
    extracted = []
    if config.finetune_image_tower:
        preprocess = model.image_tower.preprocess
        train, val = (ImageSet.build(samples, preprocess, progress, world) for samples in (train_samples, val_samples))
    else:
        source = FeatureCache(model.image_tower, cache_dir) if store_dir is None else FeatureStore.for_tower(
            model.image_tower, store_dir)
        if store_dir is not None:
            if world.is_main:
                source.remove_leftovers()  # before any rank writes to it
            world.barrier()
        train, val = (FeatureSet.build(samples, source, progress, world) for samples in (train_samples, val_samples))
        extracted = world.all_gather_objects(source.encoded)
    if state is not None and state["train_images"] != len(train.samples):
        raise ClipDecoderError(f"{checkpoint} was written for {state['train_images']} training images, the data now"
                               f" has {len(train.samples)}; delete it to start again")
    on_epoch = None
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        remove_leftovers(out)  # of a run killed while writing (a half checkpoint can be large)
        write_log(out, state["history"] if state else [])
        on_epoch = partial(write_log, out)
    history = fit(model, train, val, split.seen, config, progress, on_epoch, world, checkpoint, checkpoint_every, state)
    if world.is_main:
        model.save_pretrained(out)
        best = max(history, key=lambda r: r["val_mAP_seen"])
        write_json(out / "training.json", {
            "config": {**asdict(config), "epochs": config.num_epochs, "head": config.head_options},
            "backbone": backbone, "processes": world.size,
            "train_images": len(train.samples), "val_images": len(val.samples),
            "images_encoded_per_process": extracted, "selected_epoch": best["epoch"], "val_mAP_seen": best["val_mAP_seen"]})
        plot_curves(history, out / "curves.png")
        checkpoint.unlink(missing_ok=True)
    world.barrier()
    return model
