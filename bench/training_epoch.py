"""Training: seconds per epoch and peak memory on cached features, against the frozen image tower.

Measure (a): an epoch of the head's training steps over tokens precomputed once into a
FeatureCache. Baseline (b), same run: the same epoch with each batch's images decoded,
preprocessed and run through the frozen image tower (no grad, eval mode) before the same step.
Both use the same images, labels, batch size, model config and one step function that mirrors
``train.fit`` (train.Trainer: loss, backward, AdamW step, OneCycle step, EMA update); only where the tokens come
from differs. Times are medians of ``--repeats`` interleaved epochs; peak RSS is measured per case
in a fresh process (setup + one epoch). Target: (a) is at least 20x faster than (b).
Run: python bench/training_epoch.py [--data DIR] [--split JSON] [--images 256] [--batch-size 64]
     [--repeats 3] [--no-write]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import interleaved_medians, isolated, machine, shown, write_section  # noqa: E402

from clip_decoder.data.folder import Sample, read_split, training_parts  # noqa: E402
from clip_decoder.decoding import DEFAULT_BATCH_SIZE, DEFAULT_WORKERS, decoded_batches  # noqa: E402
from clip_decoder.features import FeatureCache  # noqa: E402
from clip_decoder.model import CLIPDecoder  # noqa: E402
from clip_decoder.prompts import TEMPLATE_SETS  # noqa: E402
from clip_decoder.train import FeatureSet, TrainConfig, Trainer, encode_sentences  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT / "data" / "openclipart"
BACKBONE = "offline"  # train_model's default
TARGET = 20.0


class Variant:
    """One variant's training state: train.py's Trainer (optimizer, OneCycle, EMA) and fit's batch order."""

    def __init__(self, model: CLIPDecoder, config: TrainConfig, samples: list[Sample], seen: tuple[str, ...], epochs: int):
        self.model, self.config = model, config
        self.label_embeddings = model.embed_labels(list(seen), TEMPLATE_SETS[config.templates])
        probe = FeatureSet(torch.empty(0), torch.empty(0), samples)  # only for its targets / sentences
        self.targets = probe.targets(seen)
        self.sentence_embeddings = encode_sentences(model, probe.sentences(seen))
        self.steps_per_epoch = max(1, len(samples) // config.batch_size)  # as fit: the last partial batch is dropped
        self.head_trainer = Trainer(model, config, epochs * self.steps_per_epoch)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.count = len(samples)

    def epoch_order(self) -> torch.Tensor:
        """The sample indices of one epoch's steps, in fit's order (a fresh permutation per epoch)."""
        order = torch.randperm(self.count, generator=self.generator)
        return order[: self.steps_per_epoch * self.config.batch_size]

    def batches(self):
        """Index batches of one epoch, in fit's order."""
        yield from self.epoch_order().split(self.config.batch_size)

    def step(self, tokens: torch.Tensor, batch: torch.Tensor) -> float:
        """fit's training step on one batch of image tokens; returns the loss."""
        losses = self.head_trainer.step(tokens, self.label_embeddings, self.targets[batch], self.sentence_embeddings[batch])
        return losses["loss"]


def cached_epoch(trainer: Variant, tokens: torch.Tensor) -> None:
    """(a): batches of tokens already in memory (float16 from the cache, as fit gets them)."""
    trainer.model.train()
    for batch in trainer.batches():
        trainer.step(tokens[batch], batch)


def tower_epoch(trainer: Variant, samples: list[Sample]) -> None:
    """(b): decode, preprocess and encode each batch's images with the frozen tower, then the same step.

    Decoding is ``decoded_batches``' (as feature extraction does it): the next batch is decoded
    in background threads while the tower and the step run on this one, in the same batch order.
    """
    trainer.model.train()  # the towers stay in eval mode (CLIPDecoder.train)
    tower = trainer.model.image_tower
    order = trainer.epoch_order()
    sources = [samples[i].image for i in order.tolist()]
    for decoded in decoded_batches(sources, tower.preprocess, trainer.config.batch_size):
        if decoded.failed:  # cannot happen: only images that decoded for the cache are used
            raise RuntimeError(f"images failed to decode: {decoded.failed}")
        with torch.no_grad():  # not inference_mode: its tensors could not be saved for the head's backward
            # The tower at its fastest batch size (decoding.DEFAULT_BATCH_SIZE), as extraction runs it.
            tokens = torch.cat([tower(pixels).tokens for pixels in decoded.pixels.split(DEFAULT_BATCH_SIZE)])
        trainer.step(tokens, order[decoded.indices])


def new_model(config: TrainConfig) -> CLIPDecoder:
    torch.manual_seed(config.seed)  # as train_model
    return CLIPDecoder.create(backbone=BACKBONE, templates=TEMPLATE_SETS[config.templates], **config.head_options)


def one_case(variant: str, samples: list[Sample], seen: tuple[str, ...], batch_size: int, cache_dir: str) -> float:
    """Setup + one epoch of ``variant`` in this (fresh) process; returns the epoch's seconds.

    The cached case reads the features from the already filled cache (no extraction here); the
    tower case never touches the cache. Both hold the whole model, towers included, as training does.
    """
    config = TrainConfig(batch_size=batch_size)
    model = new_model(config)
    trainer = Variant(model, config, samples, seen, epochs=1)
    if variant == "cached":
        tokens = FeatureSet.build(samples, FeatureCache(model.image_tower, cache_dir), progress=False).tokens
        start = time.perf_counter()
        cached_epoch(trainer, tokens)
    else:
        start = time.perf_counter()
        tower_epoch(trainer, samples)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="dataset folder (default: data/openclipart)")
    parser.add_argument("--split", type=Path, default=None, help="label split JSON (default: DATA/splits/default.json)")
    parser.add_argument("--images", type=int, default=256, help="the first N training images (default: 256)")
    parser.add_argument("--batch-size", type=int, default=TrainConfig().batch_size)
    parser.add_argument("--repeats", type=int, default=3, help="epochs per variant; the median is reported")
    parser.add_argument("--no-write", action="store_true", help="print the table only; leave docs/BENCHMARKS.md alone")
    args = parser.parse_args()
    split_path = args.split or args.data / "splits" / "default.json"
    if not (args.data / "train.csv").is_file():
        sys.exit(f"error: no benchmark folder at {args.data}; build it with `make demo` or "
                 f"`clip-decoder data openclipart --out {args.data}`")
    if not split_path.is_file():
        sys.exit(f"error: no label split {split_path}; `make demo` (or `clip-decoder data openclipart`) writes it")
    if min(args.images, args.batch_size, args.repeats) < 1:
        sys.exit("error: --images, --batch-size and --repeats must be positive")

    config = TrainConfig(batch_size=args.batch_size)
    seen = read_split(split_path).seen
    train_samples, _ = training_parts(args.data, config.val_fraction)
    requested = train_samples[: args.images]

    model = new_model(config)
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

    # Two trainers with identical starting heads and batch orders; each schedule spans warm-up + repeats.
    epochs = args.repeats + 1
    cached = Variant(model, config, samples, seen, epochs)
    tower = Variant(copy.deepcopy(model), config, samples, seen, epochs)
    print(f"timing: {args.repeats} epochs per variant (after one warm-up each), interleaved ...", file=sys.stderr)
    seconds = interleaved_medians(
        {"cached": lambda: cached_epoch(cached, tokens), "tower": lambda: tower_epoch(tower, samples)}, args.repeats
    )

    trained_images = cached.steps_per_epoch * args.batch_size
    speedup = seconds["tower"] / seconds["cached"]
    margin = 100 * (speedup / TARGET - 1)
    verdict = (f"met: {speedup:.1f}x >= {TARGET:.0f}x ({margin:+.0f}% over the target)" if speedup >= TARGET
               else f"NOT met: {speedup:.1f}x < {TARGET:.0f}x ({-margin:.0f}% short of the target)")
    command = (f"python bench/training_epoch.py --data {shown(args.data)} --split {shown(split_path)}"
               f" --images {args.images} --batch-size {args.batch_size} --repeats {args.repeats}")
    table = "\n".join([
        f"## Training epoch: cached features vs through the frozen image tower, `{BACKBONE}` backbone (CPU)",
        "",
        (f"Command: `{command}`; {machine()}; medians of {args.repeats} epoch(s) per variant (interleaved,"
         " after one warm-up epoch each)."),
        "",
        (f"Same data for both: the first {len(samples)} training images of `{shown(args.data)}`, {len(seen)} seen labels,"
         f" batch {args.batch_size}, {cached.steps_per_epoch} step(s) per epoch ({trained_images} images; the last partial"
         f" batch is dropped, as `fit` does), `TrainConfig()` head and `{config.templates}` templates. Same step"
         " (`model.loss`, backward, AdamW, OneCycle, EMA); an epoch here is the training steps only, no validation."
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
    print(table)
    if not args.no_write:
        write_section("training_epoch", table)


if __name__ == "__main__":
    main()
