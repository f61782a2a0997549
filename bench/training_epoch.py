"""Training: seconds per epoch and peak memory on cached features, against the frozen image tower.

Measure (a): an epoch of the head's training steps over tokens precomputed once into a
FeatureCache. Baseline (b), same run: the same epoch with each batch's images decoded,
preprocessed and run through the frozen image tower (no grad, eval mode) before the same step.
Both use the same images, labels, batch size, model config and ``fit``'s own batch order and step
(``training.loop.TrainingRun``: objective, backward, AdamW step, OneCycle step, EMA update); only where
the tokens come from differs. Times are medians of ``--repeats`` interleaved epochs; peak RSS is measured per case
in a fresh process (setup + one epoch). Target: (a) is at least 20x faster than (b).
Run: python -m bench.training_epoch [--data DIR] [--split JSON] [--images 256] [--batch-size 64]
     [--repeats 3] [--no-write]
"""

from __future__ import annotations

import copy
import sys
import tempfile
import time
from dataclasses import replace

import torch

from bench.report import (bench_parser, check_inputs, check_positive, command, interleaved_medians, isolated, machine,
                          publish, shown, split_of)
from clip_decoder.data.folder import Sample, read_split, training_parts
from clip_decoder.decoding import DEFAULT_BATCH_SIZE, DEFAULT_WORKERS, decoded_batches
from clip_decoder.features import FeatureCache
from clip_decoder.model import CLIPDecoder
from clip_decoder.training.config import TrainConfig
from clip_decoder.training.data import FeatureSet
from clip_decoder.training.loop import TrainingRun
from clip_decoder.training.methods import decoder_method, untrained_model
from clip_decoder.training.recipe import Recipe

BACKBONE = "offline"  # train_model's default
TARGET = 20.0


def cached_epoch(run: TrainingRun, tokens: torch.Tensor) -> None:
    """(a): batches of tokens already in memory (float16 from the cache, as fit gets them)."""
    run.model.train()
    for rows in run.epoch_batches(run.epoch_order()):
        run.step(rows, tokens[rows])


def tower_epoch(run: TrainingRun, samples: list[Sample]) -> None:
    """(b): decode, preprocess and encode each batch's images with the frozen tower, then the same step.

    Decoding is ``decoded_batches``' (as feature extraction does it): the next batch is decoded
    in background threads while the tower and the step run on this one, in the same batch order.
    """
    run.model.train()  # the towers stay in eval mode (CLIPDecoder.train)
    tower = run.model.image_tower
    order = torch.cat(list(run.epoch_batches(run.epoch_order())))
    sources = [samples[i].image for i in order.tolist()]
    for decoded in decoded_batches(sources, tower.preprocess, run.config.batch_size):
        if decoded.failed:  # cannot happen: only images that decoded for the cache are used
            raise RuntimeError(f"images failed to decode: {decoded.failed}")
        with torch.no_grad():  # not inference_mode: its tensors could not be saved for the head's backward
            # The tower at its fastest batch size (decoding.DEFAULT_BATCH_SIZE), as extraction runs it.
            tokens = torch.cat([tower(pixels).tokens for pixels in torch.from_numpy(decoded.pixels).split(DEFAULT_BATCH_SIZE)])
        run.step(order[decoded.indices], tokens)


def training_run(model: CLIPDecoder, recipe: Recipe, features: FeatureSet, seen: tuple[str, ...]) -> TrainingRun:
    """fit's run state (Trainer, batch order, step) without validation: no val part."""
    return TrainingRun(model, features, None, seen, recipe)


def one_case(variant: str, samples: list[Sample], seen: tuple[str, ...], batch_size: int, cache_dir: str) -> float:
    """Setup + one epoch of ``variant`` in this (fresh) process; returns the epoch's seconds.

    The cached case reads the features from the already filled cache (no extraction here); the
    tower case never touches the cache. Both hold the whole model, towers included, as training does.
    """
    recipe = decoder_method("clip-decoder").recipe(TrainConfig(batch_size=batch_size, epochs=1))
    model = untrained_model(recipe, BACKBONE)
    if variant == "cached":
        features = FeatureSet.build(samples, FeatureCache(model.image_tower, cache_dir), progress=False)
        run = training_run(model, recipe, features, seen)
        start = time.perf_counter()
        cached_epoch(run, features.tokens)
    else:
        run = training_run(model, recipe, FeatureSet(torch.empty(0), torch.empty(0), samples), seen)
        start = time.perf_counter()
        tower_epoch(run, samples)
    return time.perf_counter() - start


def main() -> None:
    parser = bench_parser(__doc__, split=True)  # --data, --split, --no-write
    parser.add_argument("--images", type=int, default=256, help="the first N training images (default: 256)")
    parser.add_argument("--batch-size", type=int, default=TrainConfig().batch_size)
    parser.add_argument("--repeats", type=int, default=3, help="epochs per variant; the median is reported")
    args = parser.parse_args()
    split_path = split_of(args)
    check_inputs(args.data, part="train", split=split_path)
    check_positive(args, "images", "batch_size", "repeats")

    config = TrainConfig(batch_size=args.batch_size)
    seen = read_split(split_path).seen
    train_samples, _ = training_parts(args.data, config.val_fraction)
    requested = train_samples[: args.images]

    model = untrained_model(decoder_method("clip-decoder").recipe(config), BACKBONE)
    # A temporary cache: the features of exactly these images, extracted in this run; the user's
    # cache is neither read (a warm entry would hide nothing from (a), but would skip the one-time
    # extraction reported below) nor filled with a benchmark's leftovers.
    with tempfile.TemporaryDirectory(prefix="clip-decoder-bench-cache-") as cache_dir:
        print(f"extracting features of {len(requested)} images into a temporary cache ...", file=sys.stderr)
        start = time.perf_counter()
        features = FeatureSet.build(requested, FeatureCache(model.image_tower, cache_dir), progress=False)
        extract_s = time.perf_counter() - start
        samples, tokens = features.samples, features.tokens  # images that could be read: used by both variants

        print("peak memory: one process per case ...", file=sys.stderr)
        _, cached_rss = isolated(one_case, "cached", samples, seen, args.batch_size, cache_dir)
        _, tower_rss = isolated(one_case, "tower", samples, seen, args.batch_size, cache_dir)

    # Two runs with identical starting heads and batch orders; each schedule spans warm-up + repeats.
    config = replace(config, epochs=args.repeats + 1)
    cached = training_run(model, config, features, seen)
    tower = training_run(copy.deepcopy(model), config, features, seen)
    print(f"timing: {args.repeats} epochs per variant (after one warm-up each), interleaved ...", file=sys.stderr)
    seconds = interleaved_medians(
        {"cached": lambda: cached_epoch(cached, tokens), "tower": lambda: tower_epoch(tower, samples)}, args.repeats
    )

    trained_images = cached.steps_per_epoch * args.batch_size
    speedup = seconds["tower"] / seconds["cached"]
    margin = 100 * (speedup / TARGET - 1)
    verdict = (f"met: {speedup:.1f}x >= {TARGET:.0f}x ({margin:+.0f}% over the target)" if speedup >= TARGET
               else f"NOT met: {speedup:.1f}x < {TARGET:.0f}x ({-margin:.0f}% short of the target)")
    rerun = command("training_epoch", f"--data {shown(args.data)} --split {shown(split_path)}"
                                      f" --images {args.images} --batch-size {args.batch_size} --repeats {args.repeats}")
    table = "\n".join([
        f"## Training epoch: cached features vs through the frozen image tower, `{BACKBONE}` backbone (CPU)",
        "",
        (f"Command: `{rerun}`; {machine()}; medians of {args.repeats} epoch(s) per variant (interleaved,"
         " after one warm-up epoch each)."),
        "",
        (f"Same data for both: the first {len(samples)} training images of `{shown(args.data)}`, {len(seen)} seen labels,"
         f" batch {args.batch_size}, {cached.steps_per_epoch} step(s) per epoch ({trained_images} images; the last partial"
         f" batch is dropped, as `fit` does), `TrainConfig()` head and `{config.templates}` templates. Same step"
         " (`TrainingRun.step`: the objective, backward, AdamW, OneCycle, EMA); an epoch here is the training steps only, no validation."
         f" (b) decodes with `clip_decoder.decoding.decoded_batches` ({DEFAULT_WORKERS} threads, the next batch decoded"
         f" while the tower and the step run on this one) and runs the tower {DEFAULT_BATCH_SIZE} images at a time,"
         " its fastest batch size on CPU."),
        "",
        "| measure | (a) cached features | (b) baseline: through the tower | (b) / (a) |",
        "|---|---|---|---|",
        f"| seconds per epoch | {seconds['cached']:.3f} s | {seconds['tower']:.2f} s | {speedup:.1f}x |",
        f"| images per second | {trained_images / seconds['cached']:.0f} | {trained_images / seconds['tower']:.1f} | |",
        (f"| peak RSS, own process (setup + one epoch; the whole model, towers included) | {cached_rss:.0f} MiB"
         f" | {tower_rss:.0f} MiB | {tower_rss / cached_rss:.2f}x |"),
        "",
        "| | |",
        "|---|---|",
        f"| target: an epoch on cached features at least {TARGET:.0f}x faster than through the tower | {verdict} |",
        (f"| one-time feature extraction into an empty cache (decode + tower + write; NOT in (a)'s epoch time)"
         f" | {extract_s:.2f} s ({len(samples) / extract_s:.1f} images/s) |"),
    ])
    publish(table, section="training_epoch", no_write=args.no_write)


if __name__ == "__main__":
    main()
