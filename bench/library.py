"""Tagging a library: `predict --out` against the bare image tower, one process against two, memory against inputs.

On the first N clip-art images of the benchmark (train part), the packaged model, 29 labels (the photo vocabulary):
(a) baseline: the bare image tower's forward at batch 8 over the same images, decoded beforehand (a
    hundred at a time, outside the timing), in a fresh process, torch's default threads, with the malloc
    settings `predict` makes (clip_decoder.allocator);
(b) `clip-decoder predict --out DIR` over them, one whole process, torch's default threads: decoding, the
    head, the part files and the process's start-up included;
(b') the same with glibc's own malloc settings (CLIP_DECODER_MALLOC=default);
(c) the same as (b) under `torchrun --nproc_per_node 2` with OMP_NUM_THREADS=1 (two processes, one thread each);
(d) memory: a `predict --out` process given 1,000 and 100,000 input paths (hard links to the same
    1,000 files, so every path is a distinct file to the command), each stopped after --memory-seconds;
    its peak private memory (Private_Clean + Private_Dirty, sampled from /proc every 0.5 s); and the
    1,000 paths again with glibc's own settings.
Each round times (a), (b), (b') and (c) in turn (--rounds, default 2): medians, and each round's (b) / (a) beside,
since the machine's speed drifts between minutes.
Run: python -m bench.library [--images 2000] [--rounds 2] [--memory-seconds 60] [--no-write]
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.report import ROOT, bench_parser, check_inputs, check_positive, command, isolated, machine, publish, shown
from clip_decoder import CLIPDecoder
from clip_decoder.allocator import ENV as MALLOC_ENV, keep_freed_memory
from clip_decoder.data.folder import read_part
from clip_decoder.images import load_image

VOCABULARY = ROOT / "data" / "photos" / "vocabulary.txt"


def private_mib(pid: int) -> float:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:])
    return sum(int(fields[key].split()[0]) for key in ("Private_Clean", "Private_Dirty")) / 1024


def run_process(argv: list[str], env: dict, stop_after: float | None = None) -> tuple[float, float]:
    """(wall seconds, peak private MiB) of one command; with ``stop_after``, its memory is sampled every 0.5 s (the
    kernel walks the process's pages to answer: not while a timed case runs) and it is stopped after that long."""
    started = time.perf_counter()
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0.0
    while process.poll() is None:
        if stop_after is not None:
            try:
                peak = max(peak, private_mib(process.pid))
            except (OSError, KeyError):
                pass
            if time.perf_counter() - started > stop_after:
                process.kill()
        time.sleep(0.5 if stop_after is not None else 0.05)
    if process.returncode not in (0, 1) and stop_after is None:
        sys.exit(f"error: {' '.join(argv)} exited with {process.returncode}: {process.stderr.read()[-2000:]}")
    return time.perf_counter() - started, peak


def bare_forward(paths: list) -> float:
    """(a), in a fresh process as (b) is: seconds of the packaged model's tower forward alone, batch 8, over the
    images decoded beforehand a hundred at a time."""
    keep_freed_memory()
    tower, seconds = CLIPDecoder.from_pretrained("openclipart").image_tower, 0.0
    for start in range(0, len(paths), 96):
        pixels = tower.preprocess.batch([load_image(path) for path in paths[start : start + 96]])
        began = time.perf_counter()
        with torch.inference_mode():
            for batch in pixels.split(8):
                tower(batch)
        seconds += time.perf_counter() - began
    return seconds


def main() -> None:
    parser = bench_parser(__doc__)  # --data, --no-write
    parser.add_argument("--images", type=int, default=2000, help="the first N training images (default 2000)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of (a), (b) and (c) (default 2)")
    parser.add_argument("--memory-seconds", type=float, default=60, help="how long each memory case runs (default 60)")
    args = parser.parse_args()
    check_inputs(args.data, part="train")
    check_positive(args, "images", "rounds")
    samples = read_part(args.data, "train")[: args.images]
    paths = [sample.image for sample in samples]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    glibc_env = {**env, MALLOC_ENV: "default"}  # (b') and the last memory case: glibc's own malloc settings
    labels_arg = ["--labels-file", str(VOCABULARY)]
    scratch = Path(tempfile.mkdtemp(prefix="clip-decoder-library-"))
    try:
        listing = scratch / "inputs.txt"
        listing.write_text("".join(f"{path}\n" for path in paths))
        predict = [sys.executable, "-m", "clip_decoder", "predict", *labels_arg, "--images-from", str(listing)]
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                    "clip_decoder", "predict", *labels_arg, "--images-from", str(listing)]
        forward, one, glibc, two = [], [], [], []
        for round_ in range(args.rounds):
            print(f"round {round_ + 1} of {args.rounds} ...", file=sys.stderr)
            forward.append(isolated(bare_forward, paths)[0])
            one.append(run_process([*predict, "--out", str(scratch / f"one-{round_}")], env)[0])
            glibc.append(run_process([*predict, "--out", str(scratch / f"glibc-{round_}")], glibc_env)[0])
            two.append(run_process([*torchrun, "--out", str(scratch / f"two-{round_}")], {**env, "OMP_NUM_THREADS": "1"})[0])
        rows = [[json.loads(line) for line in (scratch / name / "results.jsonl").read_text().splitlines()]
                for name in ("one-0", "two-0")]
        assert [row["index"] for row in rows[1]] == list(range(len(paths))), "(c) did not score each image once"
        difference = max(abs(a["scores"][label] - b["scores"][label]) for a, b in zip(*rows) for label in a.get("scores", {}))

        memory = {}
        links = scratch / "links"
        links.mkdir()
        for count, malloc in ((1_000, "set"), (100_000, "set"), (1_000, "default")):
            listing = scratch / f"inputs-{count}.txt"
            with listing.open("w") as f:
                for i in range(count):
                    link = links / f"{i:06d}.png"
                    if not link.exists():
                        os.link(paths[i % min(len(paths), 1000)], link)
                    f.write(f"{link}\n")
            _, memory[count, malloc] = run_process(
                [sys.executable, "-m", "clip_decoder", "predict", *labels_arg, "--images-from", str(listing),
                 "--out", str(scratch / f"memory-{count}-{malloc}")], glibc_env if malloc == "default" else env,
                stop_after=args.memory_seconds)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    n, ratios = len(paths), ", ".join(f"{a / b:.2f}x" for a, b in zip(forward, one))
    forward, one, glibc, two = (statistics.median(times) for times in (forward, one, glibc, two))
    table = "\n".join([
        "## Tagging a library: `predict --out` against the bare tower, one process against two, memory",
        "",
        f"Command: `{command('library', f'--images {args.images} --rounds {args.rounds} --memory-seconds {args.memory_seconds:g}')}`;"
        f" {machine()}. The packaged model; the first {n} training images of {shown(args.data)}; the 29-label photo"
        " vocabulary. Medians of the rounds.",
        "",
        "| case | seconds | images/s | against (a) |",
        "|---|---|---|---|",
        f"| (a) bare image tower forward, batch 8, images decoded beforehand, a fresh process | {forward:.1f} | {n / forward:.1f} | 1.00x |",
        f"| (b) `predict --out`, one process (start-up, decoding, head, part files) | {one:.1f} | {n / one:.1f} |"
        f" {forward / one:.2f}x |",
        f"| (b') the same with glibc's own malloc settings (`CLIP_DECODER_MALLOC=default`) | {glibc:.1f} | {n / glibc:.1f} |"
        f" {forward / glibc:.2f}x |",
        f"| (c) the same, `torchrun --nproc_per_node 2`, one thread each | {two:.1f} | {n / two:.1f} | {forward / two:.2f}x |",
        "",
        f"(b) against (a) in each round: {ratios}. (c) against (b): {one / two:.2f}x the speed; (c) holds each image once, its scores within {difference:.0e} of"
        " (b)'s (other thread counts, other rounding)."
        f" (b) against (b'): {glibc / one:.2f}x the speed."
        f" Peak private memory of a `predict --out` process stopped after {args.memory_seconds:g} s: {memory[1_000, 'set']:.0f}"
        f" MiB with 1,000 input paths, {memory[100_000, 'set']:.0f} MiB with 100,000 (hard links to the same 1,000 files),"
        f" {memory[100_000, 'set'] / memory[1_000, 'set']:.2f}x; {memory[1_000, 'default']:.0f} MiB with 1,000 paths and"
        " glibc's own malloc settings.",
    ])
    publish(table, section="library", no_write=args.no_write)


if __name__ == "__main__":
    main()
