"""``clip-decoder train``: a dataset folder and a label split in, a model folder out.

Runs as one process, or as one rank of a torchrun job (the same call on every rank); rank 0
writes the model folder, ``train_log.jsonl``, ``training.json`` and ``curves.png``.
"""

from __future__ import annotations

import io
import json
import sys
from dataclasses import asdict
from pathlib import Path

from ..atomic import remove_leftovers, write_file
from ..data.folder import LabelSplit, training_parts, warn_label_coverage
from ..decoding import decode_workers
from ..distributed import World, close_world, init_world, local_device
from ..errors import ClipDecoderError
from ..features import FeatureLocation
from ..model import CLIPDecoder
from ..model_folder import CHECKPOINT_FILE, CURVES_FILE, TRAINING_FILE, ModelFolder
from .checkpoint import load_checkpoint
from .config import TrainConfig
from .data import FeatureSet, ImageSet
from .loop import CHECKPOINT_EVERY, fit
from .losses import LOSS_TERMS
from .methods import decoder_method, untrained_model
from .recipe import Recipe


def plot_curves(history: list[dict], path: Path) -> None:
    """PNG of the training losses and the validation mAP per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for key in [key for key in history[0] if key == "loss" or key in LOSS_TERMS]:
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
    options = json.loads(json.dumps(asdict(config)))  # as the checkpoint holds them (tuples are lists)
    differ = sorted(key for key, value in options.items() if state["config"].get(key) != value)
    if differ:
        changes = ", ".join(f"{key} {state['config'].get(key)!r} -> {options[key]!r}" for key in differ)
        raise ClipDecoderError(f"{path} was written with other training options ({changes});"
                               " resume with the same options, or delete it to start again")
    if state["world_size"] != world.size:
        raise ClipDecoderError(f"{path} was written by {state['world_size']} processes; resume with the same number"
                               f" (this run has {world.size})")


def train_model(
    data_dir: str | Path,
    split: LabelSplit,
    out: str | Path,
    backbone: str = "offline",
    config: TrainConfig = TrainConfig(),
    features: FeatureLocation = FeatureLocation(),
    progress: bool = True,
    resume: bool = False,
    checkpoint_every: int = CHECKPOINT_EVERY,
) -> CLIPDecoder:
    """Train on the folder's train part (seen labels only) and write a model folder to ``out``.

    ``out/checkpoint.safetensors`` holds the run's state until the model folder is written;
    ``resume`` continues from it. ``features`` says where the frozen tower's features are kept
    (the per-image cache, or a feature store read a batch at a time).
    """
    world = init_world()
    try:
        recipe = decoder_method(config.method).recipe(config)
        folder = ModelFolder(out)
        model = untrained_model(recipe, backbone)
        model.to(local_device())
        state = _saved_state(folder, recipe, world, resume)
        train, val, extracted = _training_data(model, data_dir, split, recipe, features, progress, world)
        if state is not None and state["train_images"] != len(train.samples):
            raise ClipDecoderError(f"{folder / CHECKPOINT_FILE} was written for {state['train_images']} training images,"
                                   f" the data now has {len(train.samples)}; delete it to start again")
        on_epoch = None
        if world.is_main:
            folder.path.mkdir(parents=True, exist_ok=True)
            remove_leftovers(folder.path)  # of a run killed while writing (a half checkpoint can be large)
            folder.write_train_log(state["history"] if state else [])
            on_epoch = folder.write_train_log
        history = fit(model, train, val, split.seen, recipe, progress, on_epoch, world, folder / CHECKPOINT_FILE,
                      checkpoint_every, state)
        if world.is_main:
            _write_outputs(folder, model, recipe, history, backbone, world, {
                "train_images": len(train.samples), "val_images": len(val.samples), "images_encoded_per_process": extracted})
        world.barrier()
        return model
    finally:
        close_world(world)


def _saved_state(folder: ModelFolder, recipe: Recipe, world: World, resume: bool) -> dict | None:
    """The checkpoint to continue from, checked (with ``resume``), or None."""
    checkpoint = folder / CHECKPOINT_FILE
    if resume and checkpoint.is_file():
        state = load_checkpoint(checkpoint)
        check_resumable(state, recipe.config, world, checkpoint)
        return state
    if resume and world.is_main:
        print(f"no checkpoint in {folder.path}: training from the start", file=sys.stderr)
    return None


def _training_data(model: CLIPDecoder, data_dir, split: LabelSplit, recipe: Recipe, features: FeatureLocation,
                   progress: bool, world: World) -> tuple:
    """(train, val, images encoded per process): decoded images when the tower trains, else its features."""
    train_samples, val_samples = training_parts(data_dir, recipe.config.val_fraction)
    if world.is_main:
        warn_label_coverage(train_samples + val_samples, split, split.seen, "training")
    if recipe.config.finetune_image_tower:
        preprocess, workers = model.image_tower.preprocess, decode_workers(local_device().type)
        train, val = (ImageSet.build(samples, preprocess, progress, world, workers)
                      for samples in (train_samples, val_samples))
        return train, val, []
    source = features.open(model.image_tower)
    world.main_first(source.remove_leftovers)  # before any rank writes to it
    train, val = (FeatureSet.build(samples, source, progress, world) for samples in (train_samples, val_samples))
    return train, val, world.all_gather_objects(source.encoded)


def _write_outputs(folder: ModelFolder, model: CLIPDecoder, recipe: Recipe, history: list[dict], backbone: str,
                   world: World, data: dict) -> None:
    """The model folder, training.json and curves.png (rank 0); the checkpoint is done with."""
    model.save_pretrained(folder.path)
    best = max(history, key=lambda r: r["val_mAP_seen"])
    folder.write_json(TRAINING_FILE, {
        "config": {**asdict(recipe.config), "epochs": recipe.epochs, "head": recipe.head}, "backbone": backbone,
        "processes": world.size, **data, "selected_epoch": best["epoch"], "val_mAP_seen": best["val_mAP_seen"]})
    plot_curves(history, folder / CURVES_FILE)
    (folder / CHECKPOINT_FILE).unlink(missing_ok=True)
