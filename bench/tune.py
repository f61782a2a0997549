"""Choose training defaults WITHOUT touching unseen labels or test images.

The seen labels of a split are split again: a quarter become pseudo-unseen. Each variant trains
on the training images with the pseudo-seen labels only (model selection on a part carved from
them) and is scored, ZSL and GZSL, on the validation images with pseudo-seen + pseudo-unseen
labels. The real unseen labels and the test part are never read.
Run: python -m bench.tune [--data DIR] [--split JSON] [--seeds 0 1] [--variants NAME ...] [--no-write]
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from dataclasses import replace

from bench.report import ROOT, bench_parser, check_inputs, command, machine, publish, shown, split_of
from clip_decoder.benchmark import run_method
from clip_decoder.data.folder import LabelSplit, carve_validation, read_split, training_parts
from clip_decoder.encoders import create_backbone
from clip_decoder.features import FeatureCache
from clip_decoder.training.config import TrainConfig
from clip_decoder.training.data import FeatureSet
from clip_decoder.training.methods import MethodRun, get_method

# name -> (method, TrainConfig changes against the base)
VARIANTS: dict[str, tuple[str, dict]] = {
    "base": ("clip-decoder", {}),
    "ml-decoder": ("ml-decoder", {}),
    "linear": ("linear", {}),
    "conse": ("conse", {}),
}
DOC = ROOT / "docs" / "EXPERIMENTS.md"
HEADER = ("# Experiments\n\nDefaults are picked here on seen labels only (bench/tune.py); test images and unseen"
          " labels are never used.\n")


def nested_split(split: LabelSplit, fraction: float = 0.25, seed: int = 0) -> LabelSplit:
    """Hold out ``fraction`` of the seen labels as pseudo-unseen (deterministic)."""
    labels = sorted(split.seen)
    random.Random(seed).shuffle(labels)
    held = set(labels[: max(1, round(fraction * len(labels)))])
    return LabelSplit(seen=tuple(l for l in split.seen if l not in held), unseen=tuple(l for l in split.seen if l in held))


def parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def main() -> None:
    parser = bench_parser(__doc__, split=True, target="docs/EXPERIMENTS.md")  # --data, --split, --no-write
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), help="names from VARIANTS, or"
                        " NAME:method:key=value,key=value for an ad-hoc variant")
    parser.add_argument("--base", default="", help="key=value,... changes applied to every variant's TrainConfig")
    parser.add_argument("--cache")
    parser.add_argument("--title", default="Tuning run")
    args = parser.parse_args()
    split_path = split_of(args)
    check_inputs(args.data, part="train", split=split_path)  # the training part only: validation is carved from it

    def changes(text: str) -> dict:
        """'lr=1e-3,head.dim=384' -> {"lr": 0.001, "head": {"dim": 384}}."""
        out, head = {}, {}
        for key, value in (item.split("=", 1) for item in text.split(",") if item):
            (head if key.startswith("head.") else out)[key.removeprefix("head.")] = parse_value(value)
        return {**out, "head": head} if head else out

    base = replace(TrainConfig(), **changes(args.base))
    split = nested_split(read_split(split_path))
    towers = create_backbone("offline")
    cache = FeatureCache(towers.image, args.cache)
    train_samples, val_samples = training_parts(args.data, base.val_fraction)
    inner_train, inner_val = carve_validation(train_samples, 0.1, salt="tune")
    parts = {name: FeatureSet.build(items, cache) for name, items in
             {"train": inner_train, "val": inner_val, "test": val_samples}.items()}
    rows = []
    for variant in args.variants:
        if ":" in variant:
            name, method, text = (variant.split(":", 2) + [""])[:3]
            extra = changes(text)
        else:
            name, (method, extra) = variant, VARIANTS[variant]
        config = replace(base, **{**extra, "head": {**base.head, **extra.get("head", {})}})
        runs = []
        started = time.perf_counter()
        for seed in args.seeds if get_method(method).seeded else args.seeds[:1]:
            runs.append(run_method(method, MethodRun(towers, parts, split, replace(config, seed=seed))))
        seconds = (time.perf_counter() - started) / len(runs)
        cells = [statistics.mean(r[p]["mAP"] for r in runs) for p in ("zsl", "gzsl")]
        row = f"| {name} | {method} | {text if ':' in variant else extra or '-'} | {cells[0]:.1f} | {cells[1]:.1f} | {seconds:.0f} s |"
        print(row, flush=True)
        rows.append(row)
    table = "\n".join([
        f"## {args.title}", "",
        f"Command: `{command('tune', sys.argv[1:])}`; {machine()}.",
        f"Base config: {base}. Nested split of `{shown(split_path)}`: {len(split.seen)} pseudo-seen /"
        f" {len(split.unseen)} pseudo-unseen labels; scored on the validation part ({len(parts['test'].samples)}"
        f" images); means over seeds {args.seeds}.", "",
        "| variant | method | changes | ZSL mAP | GZSL mAP | s / run |", "|---|---|---|---|---|---|", *rows])
    publish(table, section=None, no_write=args.no_write, doc=DOC, header=HEADER)  # appended: a log of runs


if __name__ == "__main__":
    main()
