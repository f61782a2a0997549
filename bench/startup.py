"""Start-up: `clip-decoder predict` on one photo, whole processes, a new vocabulary against one embedded before.

Case (a): the labels were never embedded (a new, empty cache folder each run): the process loads the
text tower (transformers and all-MiniLM-L6-v2) to embed them, and keeps them on disk. Case (b), same
run: the same command once the vocabulary is on disk (a cache folder filled by one earlier run): the
text tower is never loaded. The runs alternate a, b, a, b, ... so machine noise hits both alike; each
process's CPU time (user + system) and peak RSS come from the kernel's accounting of that process
(``os.wait4``). Both cases print the same scores (checked). The packaged model, as a user's first
command after the install runs it.
Run: python -m bench.startup [--runs 5] [--labels cat,dog,car] [--image tests/data/chelsea-cat.jpg]
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.report import ROOT, bench_parser, command, machine, publish, shown


def timed_run(argv: list[str], cache: Path) -> tuple[float, float, float, str]:
    """(CPU seconds, wall seconds, peak RSS MiB, stdout) of one whole process."""
    env = {**os.environ, "CLIP_DECODER_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        sys.exit(f"error: {' '.join(argv)} exited with {process.returncode}")
    return usage.ru_utime + usage.ru_stime, wall, usage.ru_maxrss / 1024, out


def main() -> None:
    parser = bench_parser(__doc__, data=False)  # --no-write
    parser.add_argument("--runs", type=int, default=5, help="runs of each case (default 5), after one warm-up each")
    parser.add_argument("--labels", default="cat,dog,car")
    parser.add_argument("--image", type=Path, default=ROOT / "tests" / "data" / "chelsea-cat.jpg")
    args = parser.parse_args()
    if args.runs < 1:
        sys.exit("error: --runs must be positive")
    if not args.image.is_file():
        sys.exit(f"error: no image at {args.image}")
    argv = [sys.executable, "-m", "clip_decoder", "predict", "--labels", args.labels, str(args.image)]

    results: dict[str, list[tuple[float, float, float]]] = {"a": [], "b": []}
    outputs = set()
    with tempfile.TemporaryDirectory(prefix="clip-decoder-startup-") as folder:
        embedded = Path(folder) / "embedded"
        for run in range(args.runs + 1):  # the first of each case warms the page cache; not counted
            with tempfile.TemporaryDirectory(dir=folder) as empty:
                cold = timed_run(argv, Path(empty))
            warm = timed_run(argv, embedded)  # (the warm-up run is the one that fills it)
            outputs.update((cold[3], warm[3]))
            if run:
                results["a"].append(cold[:3])
                results["b"].append(warm[:3])
            print(f"run {run}: (a) {cold[0]:.2f} CPU-s, (b) {warm[0]:.2f} CPU-s", file=sys.stderr)
    if len(outputs) != 1:
        sys.exit(f"error: the two cases printed different scores: {sorted(outputs)}")

    def median(case: str, column: int) -> float:
        return statistics.median(row[column] for row in results[case])

    ratios = [b[0] / a[0] for a, b in zip(results["a"], results["b"])]
    names = {"a": "(a) new vocabulary: the text tower loads and embeds it", "b": "(b) the vocabulary embedded before, on disk"}
    rows = [f"| {names[case]} | {median(case, 0):.2f} | {median(case, 1):.2f} | {median(case, 2):.0f} |" for case in "ab"]
    table = "\n".join([
        "## Start-up: `clip-decoder predict` on one photo, a new vocabulary against one embedded before",
        "",
        f"Command: `{command('startup', f'--runs {args.runs} --labels {args.labels} --image {shown(args.image)}')}`;"
        f" {machine()}.",
        f"`clip-decoder predict --labels {args.labels} {shown(args.image)}` with the packaged model, whole processes,"
        f" {args.runs} runs of each case alternating after one warm-up each; medians. CPU is user + system"
        " time of the process (all its threads). Both cases print the same scores.",
        "",
        "| case | CPU s | wall s | peak RSS MiB |",
        "|---|---|---|---|",
        *rows,
        "",
        f"(b) / (a), CPU time, pair by pair: median {statistics.median(ratios):.2f} (min {min(ratios):.2f},"
        f" max {max(ratios):.2f}). Target: at most 0.5.",
    ])
    publish(table, section="startup", no_write=args.no_write)


if __name__ == "__main__":
    main()
