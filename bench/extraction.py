"""Feature extraction: images/s of FeatureCache.get, decoding in threads, against the bare image tower.

Same images, same batch size, default `offline` image tower (EfficientNet-Lite2 at 224 px), CPU:
(a) ``FeatureCache.get`` into a new, empty cache folder: hash each file, decode + preprocess in
    background threads (``clip_decoder.decoding``) while the tower runs, forward, write the
    entries; the folder is removed after each run (inside the timing: milliseconds);
(b) the same with ``decode_workers=0``: each batch decoded in turn in the calling thread, as
    before ``decoding`` existed;
(c) baseline: the bare tower forward on the same images, decoded and preprocessed beforehand.
Every case runs with glibc's malloc set as `clip-decoder extract` sets it (allocator.keep_freed_memory).
Times are medians of ``--repeats`` interleaved runs (after one warm-up each). Peak RSS is
measured per case in a fresh process (tower creation + one run). Target: (a) reaches at least 80%
of (c)'s images/s.
Run: python -m bench.extraction [--data DIR] [--images 128] [--batch-size 8] [--repeats 3]
     [--workers N] [--no-write]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from bench.report import (bench_parser, check_inputs, check_positive, command, interleaved_medians, isolated, machine,
                          publish, shown)
from clip_decoder.allocator import keep_freed_memory
from clip_decoder.data.folder import read_part
from clip_decoder.decoding import DEFAULT_BATCH_SIZE, DEFAULT_WORKERS
from clip_decoder.encoders.offline import EfficientNetLite2Tower
from clip_decoder.errors import ClipDecoderError
from clip_decoder.features import FeatureCache
from clip_decoder.images import load_image

TARGET = 0.80  # (a) / (c), in images/s


def new_tower() -> EfficientNetLite2Tower:
    """``create_backbone("offline").image``, without building the text tower this bench never uses."""
    return EfficientNetLite2Tower()


def extract(tower, paths: list[Path], batch_size: int, workers: int) -> None:
    """Cases (a) and (b): one ``FeatureCache.get`` of ``paths`` into a new, empty cache folder."""
    folder = tempfile.mkdtemp(prefix="clip-decoder-bench-extraction-")
    try:
        FeatureCache(tower, folder, decode_workers=workers).get(paths, batch_size=batch_size, progress=False)
    finally:
        shutil.rmtree(folder)


def preprocessed(tower, paths: list[Path], batch_size: int) -> list[torch.Tensor]:
    """The baseline's input: every batch decoded and preprocessed, ready for the tower."""
    return [tower.preprocess.batch([load_image(p) for p in paths[s : s + batch_size]])
            for s in range(0, len(paths), batch_size)]


@torch.inference_mode()
def forward(tower, batches: list[torch.Tensor]) -> None:
    """Case (c), the baseline: the bare tower forward on preprocessed batches."""
    for pixels in batches:
        tower(pixels)


def one_case(case: str, paths: list[Path], batch_size: int, workers: int) -> None:
    """A peak-memory probe, run in a fresh process: build the tower, then run ``case`` once."""
    keep_freed_memory()
    tower = new_tower()
    if case == "forward":
        forward(tower, preprocessed(tower, paths, batch_size))
    else:
        extract(tower, paths, batch_size, workers if case == "threads" else 0)


def usable_images(data: Path, count: int) -> list[Path]:
    """The first ``count`` training images of ``data`` that decode (all cases use exactly these)."""
    paths = []
    for sample in read_part(data, "train"):
        try:
            load_image(sample.image)
        except ClipDecoderError as error:
            print(f"skipped: {error}", file=sys.stderr)
            continue
        paths.append(sample.image)
        if len(paths) == count:
            break
    return paths


def main() -> None:
    # --data (its train.csv), --no-write
    parser = bench_parser(__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--images", type=int, default=128, help="the first N training images")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="images per tower forward")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case (after one warm-up)")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS, help="decoding threads for (a)")
    args = parser.parse_args()
    check_positive(args, "images", "batch_size", "repeats", "workers")
    check_inputs(args.data, part="train")
    keep_freed_memory()

    paths = usable_images(args.data, args.images)
    if len(paths) < args.images:
        print(f"warning: only {len(paths)} usable images in {args.data}", file=sys.stderr)
    print(f"peak memory: one process per case, {len(paths)} images ...", file=sys.stderr)
    rss = {case: isolated(one_case, case, paths, args.batch_size, args.workers)[1]
           for case in ("threads", "in turn", "forward")}

    tower = new_tower()
    batches = preprocessed(tower, paths, args.batch_size)
    print(f"timing: {args.repeats} runs per case (after one warm-up each), interleaved ...", file=sys.stderr)
    seconds = interleaved_medians({
        "threads": lambda: extract(tower, paths, args.batch_size, args.workers),
        "in turn": lambda: extract(tower, paths, args.batch_size, 0),
        "forward": lambda: forward(tower, batches),
    }, args.repeats)

    rate = {case: len(paths) / s for case, s in seconds.items()}
    ratio = {case: rate[case] / rate["forward"] for case in rate}
    verdict = (f"met: {ratio['threads']:.0%} >= {TARGET:.0%}" if ratio["threads"] >= TARGET
               else f"NOT met: {ratio['threads']:.0%} < {TARGET:.0%}")
    verdict += f" ({100 * (ratio['threads'] - TARGET):+.0f} percentage points)"
    rerun = command("extraction", f"--data {shown(args.data)} --images {args.images}"
                                  f" --batch-size {args.batch_size} --repeats {args.repeats} --workers {args.workers}")
    rows = [("(a) `FeatureCache.get`, decoding in threads", "threads"),
            ("(b) `FeatureCache.get`, decoding in turn in the calling thread (`decode_workers=0`: the order"
             " of work before)", "in turn"),
            ("(c) baseline: bare tower forward on preprocessed tensors", "forward")]
    table = "\n".join([
        "## Feature extraction: decoding in threads vs the bare image tower, `offline` backbone (CPU)",
        "",
        f"Command: `{rerun}`; {machine()}; medians of {args.repeats} runs per case (interleaved, after one"
        " warm-up each).",
        "",
        f"Same images for all: the first {len(paths)} training images of `{shown(args.data)}`, batch {args.batch_size},"
        f" tower `{tower.name}`. (a) and (b) hash, decode, preprocess, run the tower and write one entry per image"
        f" into a new, empty cache folder; (a) decodes the next batch in {args.workers} background thread(s) while"
        " the tower runs. (c) runs the tower alone on batches decoded and preprocessed beforehand. Peak RSS: each"
        " case in its own process (tower creation + one run; (c) holds all preprocessed batches). glibc's malloc is set as"
        " `clip-decoder extract` sets it.",
        "",
        "| case | images/s | / (c) | peak RSS, own process |",
        "|---|---|---|---|",
        *[f"| {label} | {rate[case]:.1f} | {ratio[case]:.0%} | {rss[case]:.0f} MiB |" for label, case in rows],
        "",
        "| | |",
        "|---|---|",
        f"| target: (a) at least {TARGET:.0%} of (c)'s images/s | {verdict} |",
        f"| (a) / (b): speed-up from decoding in threads | {rate['threads'] / rate['in turn']:.2f}x |",
    ])
    publish(table, section="extraction", no_write=args.no_write)


if __name__ == "__main__":
    main()
