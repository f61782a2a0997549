"""Scale: memory per process and seconds per step of training and evaluation from a FeatureStore, against N.

Builds a feature store of N synthetic training images (and --test-images test images) with the
offline tower's token shape (49 x 1280 float16, pooled 1280 float32) and NUS-WIDE's label counts
(925 seen labels in training, 1,006 at test with 81 unseen, about 2.4 labels per image) through
``FeatureStore``'s writer, the one extraction uses, split across the processes; then trains at most
--max-steps steps of ``TrainingRun`` (the real step: objective, backward, AdamW, OneCycle, EMA; DDP
over gloo with --processes > 1), runs ``finish_training`` (the prior's offset over every stored
pooled vector) and, on rank 0, the store evaluation (``evaluate.stored_metrics``: scores in
chunks into a memory-mapped matrix, metrics in chunks) of the test images on all 1,006 labels.

Synthetic data, generated cheaply: each image's tokens are one of a fixed bank of 257 random token
grids (image i gets grid i mod 257), so generating costs nothing, but every image's rows are
really written to and read from disk. Labels are drawn per image from --label-sets distinct label
sets (a Zipf-like draw of 1 + Poisson(1.4) labels each), because each distinct sentence goes through
the text tower once per process (200 sentences/s on one core); real data has more distinct sets, each
adding one (384,) float32 embedding, 1.5 KiB, per process. The scores are meaningless (random
features); the bench measures memory and time.

Memory per process is sampled every 5 ms from /proc/self/status by a thread in each process: private
memory is the peak of RssAnon (what the process itself allocated); RSS (VmHWM) also counts the pages
of the memory-mapped store, which belong to the kernel's page cache and are shared and reclaimable.
Run: python -m bench.scale --images N [--test-images T] [--processes P] [--max-steps S] [--batch-size 64]
     [--label-sets 2000] [--store DIR] [--keep] --json FILE
The store goes to a temporary folder (or --store DIR) and is deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

TOKENS, DIM = 49, 1280  # the offline tower's (EfficientNet-Lite2 at 224 px)
SEEN, UNSEEN = 925, 81  # NUS-WIDE's zero-shot split
BANK = 257  # distinct random token grids
ROWS_PER_WRITE = 64  # rows handed to the writer at once, as extraction hands a batch


class Memory:
    """Peaks of RssAnon (private) and VmHWM (RSS) of this process, sampled from /proc/self/status."""

    def __init__(self, every: float = 0.005) -> None:
        self.private_kib, self.every = 0, every
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    @staticmethod
    def status() -> dict[str, int]:
        with open("/proc/self/status") as status:
            return {line.split(":")[0]: int(line.split()[1]) for line in status if line.split(":")[0] in (
                "RssAnon", "VmHWM")}

    def _sample(self) -> None:
        while True:
            self.private_kib = max(self.private_kib, self.status()["RssAnon"])
            time.sleep(self.every)

    def peaks_mib(self) -> dict[str, float]:
        now = self.status()
        return {"peak_private_mib": max(self.private_kib, now["RssAnon"]) / 1024, "peak_rss_mib": now["VmHWM"] / 1024}


def label_sets(count: int, vocabulary: list[str], rng: np.random.Generator) -> list[tuple[str, ...]]:
    """``count`` distinct label sets of 1 + Poisson(1.4) labels (2.4 on average), frequent labels first (Zipf-like)."""
    weights = 1 / (1 + rng.permutation(len(vocabulary)))  # which labels are frequent: at random
    weights /= weights.sum()
    sets: dict[tuple[str, ...], None] = {}
    while len(sets) < count:
        size = min(len(vocabulary), 1 + rng.poisson(1.4))
        sets[tuple(vocabulary[i] for i in sorted(rng.choice(len(vocabulary), size, replace=False, p=weights)))] = None
    return list(sets)


def synthetic_part(name: str, images: int, sets: list[tuple[str, ...]], rng: np.random.Generator):
    """(keys, samples) of ``images`` synthetic images, each with one of ``sets``."""
    from clip_decoder.data.folder import Sample

    keys = [hashlib.sha256(f"{name}-{i}".encode()).hexdigest() for i in range(images)]
    chosen = rng.integers(0, len(sets), images)
    return keys, [Sample(Path(f"synthetic/{name}-{i}.jpg"), sets[chosen[i]]) for i in range(images)]


def write_store(store, keys: list[str], world) -> int:
    """Write this rank's share of ``keys`` not stored yet through the store's writer; returns the rows written."""
    rng = np.random.default_rng(0)
    bank = rng.standard_normal((BANK, TOKENS, DIM), dtype=np.float32).astype(np.float16)
    bank_pooled = bank.astype(np.float32).mean(axis=1)
    mine = [i for i in world.shard(list(range(len(keys)))) if keys[i] not in store]
    writer = store.writer()
    for start in range(0, len(mine), ROWS_PER_WRITE):
        rows = np.array(mine[start : start + ROWS_PER_WRITE]) % BANK
        writer.add([keys[i] for i in mine[start : start + ROWS_PER_WRITE]], bank[rows], bank_pooled[rows])
    writer.flush()
    return writer.written


def worker(args: argparse.Namespace) -> None:
    """One process of the run (a torchrun worker): build, train, evaluate; write this rank's results."""
    memory = Memory()
    from clip_decoder.data.folder import LabelSplit
    from clip_decoder.distributed import close_world, init_world
    from clip_decoder.evaluate import stored_metrics
    from clip_decoder.features import FeatureStore
    from clip_decoder.training.config import TrainConfig
    from clip_decoder.training.data import FeatureSet
    from clip_decoder.training.loop import TrainingRun, finish_training
    from clip_decoder.training.methods import decoder_method, untrained_model

    world = init_world()
    seen = [f"tag{i:04d}" for i in range(SEEN)]
    unseen = [f"concept{i:02d}" for i in range(UNSEEN)]
    split = LabelSplit(tuple(seen), tuple(unseen))
    rng = np.random.default_rng(1)
    train_keys, train_samples = synthetic_part("train", args.images, label_sets(args.label_sets, seen, rng), rng)
    test_keys, test_samples = synthetic_part("test", args.test_images, label_sets(args.label_sets, seen + unseen, rng),
                                             rng)
    store = FeatureStore(args.store)
    started = time.perf_counter()
    written = write_store(store, train_keys + test_keys, world)
    world.barrier()
    store.refresh()
    store_seconds = time.perf_counter() - started

    recipe = decoder_method("clip-decoder").recipe(TrainConfig(batch_size=args.batch_size, epochs=1))
    model = untrained_model(recipe, "offline")
    tokens, pooled = store.rows(train_keys)
    train = FeatureSet(tokens, pooled, train_samples)
    run = TrainingRun(model, train, None, split.seen, recipe, world)
    model.train()
    steps = []
    for rows, inputs in train.batches(run.epoch_batches(run.epoch_order())):
        start = time.perf_counter()
        run.step(rows, inputs)
        steps.append(time.perf_counter() - start)
        if len(steps) == args.max_steps:
            break
    start = time.perf_counter()
    finish_training(model, train, split.seen)
    finish_seconds = time.perf_counter() - start
    world.barrier()

    result = {"rank": world.rank, "rows_written": written, "store_seconds": store_seconds, "steps": len(steps),
              "step_seconds": steps, "finish_training_seconds": finish_seconds, "torch_threads": torch.get_num_threads()}
    if world.is_main:
        start = time.perf_counter()
        tokens, pooled = store.rows(test_keys)
        metrics = stored_metrics(model, tokens, pooled, test_samples, split,
                                 out=store.score_matrix((len(test_samples), len(split.all))))
        result.update(eval_seconds=time.perf_counter() - start, metrics=metrics)
    world.barrier()
    result.update(memory.peaks_mib())
    (Path(args.results) / f"rank{world.rank}.json").write_text(json.dumps(result))
    close_world(world)


def launch(args: argparse.Namespace) -> dict:
    """Run ``args.processes`` workers under torchrun on one store; gather their results."""
    with tempfile.TemporaryDirectory(prefix="clip-decoder-scale-") as results:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                   str(args.processes), "-m", "bench.scale", "--worker", "--results", results, "--store", str(args.store),
                   "--images", str(args.images), "--test-images", str(args.test_images), "--max-steps",
                   str(args.max_steps), "--batch-size", str(args.batch_size), "--label-sets", str(args.label_sets)]
        subprocess.run(command, check=True)
        ranks = [json.loads((Path(results) / f"rank{rank}.json").read_text()) for rank in range(args.processes)]
    main = ranks[0]
    timed = main["step_seconds"][2:] or main["step_seconds"]  # after two warm-up steps
    store_bytes = sum(path.stat().st_size for path in Path(args.store).glob("*.npy"))
    return {
        "images": args.images, "processes": args.processes, "test_images": args.test_images,
        "test_labels": SEEN + UNSEEN, "batch_size": args.batch_size, "steps": main["steps"],
        "peak_rss_mib_per_process": round(max(r["peak_rss_mib"] for r in ranks), 1),
        "peak_private_mib_per_process": round(max(r["peak_private_mib"] for r in ranks), 1),
        "seconds_per_step": round(statistics.median(timed), 4),
        "eval_seconds": round(main["eval_seconds"], 1),
        "store_seconds": round(max(r["store_seconds"] for r in ranks), 1),
        "store_gib": round(store_bytes / 2**30, 2),
        "finish_training_seconds": round(main["finish_training_seconds"], 1),
        "label_sets": args.label_sets, "torch_threads": main["torch_threads"],
        "per_process": [{k: (round(v, 1) if isinstance(v, float) else v) for k, v in r.items()
                         if k in ("rank", "rows_written", "peak_rss_mib", "peak_private_mib")} for r in ranks],
        "mAP_gzsl_random_features": round(main["metrics"]["gzsl"]["mAP"], 2),
    }


def report(paths: list[Path], no_write: bool) -> None:
    """The table of results files (one per run, as --json wrote them) and the targets, into docs/BENCHMARKS.md."""
    import platform

    from bench.report import publish

    runs = [json.loads(Path(path).read_text()) for path in paths]
    lines = [
        "## Scale: training and evaluation from a feature store, against the number of images (CPU)",
        "",
        (f"`bench/scale.py` (its docstring says how): synthetic images of the offline tower's shape (49 x 1280 float16"
         f" tokens, ~123 KiB per image on disk), {SEEN} seen / {SEEN + UNSEEN} test labels, ~2.4 labels per image;"
         " batch 64 over all processes, `TrainConfig()` head; one row per command. Private memory: the sampled peak"
         " of RssAnon; RSS (VmHWM) also counts the store's memory-mapped pages (page cache). Evaluation runs on"
         f" rank 0 over every test image and all {SEEN + UNSEEN} labels. {platform.machine()}, {os.cpu_count()} cores,"
         f" Python {platform.python_version()}, torch {torch.__version__}; each process uses the torch threads shown"
         " (`OMP_NUM_THREADS=2` for one process, 1 each for two: one per core); the rows ran one after another."
         " Seconds per step: the median of the steps after the first two. The store lives in a temporary folder"
         " on the VM's disk and is deleted after each row."),
        "",
        "| images | processes | torch threads | peak private MiB / process | peak RSS MiB / process | s / step"
        " (median) | test images x labels | evaluation s | store GiB | store written in s | command |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(f"| {r['images']:,} | {r['processes']} | {r['torch_threads']} | {r['peak_private_mib_per_process']:,.0f}"
                     f" | {r['peak_rss_mib_per_process']:,.0f} | {r['seconds_per_step']:.2f} |"
                     f" {r['test_images']:,} x {r['test_labels']:,} | {r['eval_seconds']:,.0f} | {r['store_gib']:.1f}"
                     f" | {r['store_seconds']:.0f} | `{r['command']}` |")
    lines += ["", "| target | measured |", "|---|---|"]
    for processes in sorted({r["processes"] for r in runs}):
        same = sorted((r for r in runs if r["processes"] == processes and r["test_images"] < 100_000),
                      key=lambda r: r["images"])
        if len(same) < 2:
            continue
        low, high = same[0], same[-1]
        ratio = high["peak_private_mib_per_process"] / low["peak_private_mib_per_process"]
        steps = [r["seconds_per_step"] for r in same]
        spread = max(steps) / min(steps) - 1
        fastest, slowest = (f"{r['images']:,}" for r in (min(same, key=lambda r: r["seconds_per_step"]),
                                                           max(same, key=lambda r: r["seconds_per_step"])))
        private_gb = high["peak_private_mib_per_process"] * 2**20 / 1e9
        lines += [
            (f"| {processes} process(es): peak private memory within 1.3x from {low['images']:,} to {high['images']:,}"
             f" images | {ratio:.2f}x: {'met' if ratio <= 1.3 else 'NOT met'} |"),
            (f"| {processes} process(es): peak private memory under 4 GB at {high['images']:,} images |"
             f" {private_gb:.2f} GB: {'met' if private_gb < 4 else 'NOT met'} |"),
            (f"| {processes} process(es): seconds per step flat within 20% | {min(steps):.2f} s ({fastest} images) to"
             f" {max(steps):.2f} s ({slowest} images), +{100 * spread:.0f}%: {'met' if spread <= 0.2 else 'NOT met'} |"),
        ]
    publish("\n".join(lines), section="scale", no_write=no_write)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.splitlines()[0])
    parser.add_argument("--report", nargs="+", type=Path, metavar="JSON",
                        help="instead of a run: the table of these results files, written to docs/BENCHMARKS.md")
    parser.add_argument("--no-write", action="store_true", help="with --report: print the table only")
    parser.add_argument("--images", type=int, help="synthetic training images in the store")
    parser.add_argument("--test-images", type=int, default=None, help="synthetic test images (default: images / 10)")
    parser.add_argument("--processes", type=int, default=1, help="torchrun processes (default: 1)")
    parser.add_argument("--max-steps", type=int, default=20, help="training steps at most (default: 20)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per step over all processes (default: 64)")
    parser.add_argument("--label-sets", type=int, default=2000, help="distinct label sets (default: 2000)")
    parser.add_argument("--store", type=Path, metavar="DIR",
                        help="make the store in a new folder inside DIR (default: in the temporary folder); deleted after")
    parser.add_argument("--keep", action="store_true", help="keep the store after the run")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--results", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.report:
        return report(args.report, args.no_write)
    if args.images is None:
        sys.exit("error: --images is required (or --report)")
    if args.test_images is None:
        args.test_images = max(1, args.images // 10)
    if min(args.images, args.test_images, args.processes, args.max_steps, args.batch_size, args.label_sets) < 1:
        sys.exit("error: --images, --test-images, --processes, --max-steps, --batch-size and --label-sets must be positive")
    if args.worker:
        return worker(args)
    if args.batch_size % args.processes:
        sys.exit(f"error: --batch-size {args.batch_size} must be a multiple of --processes {args.processes}")
    if args.images < args.batch_size:
        sys.exit(f"error: --images {args.images} is less than one batch ({args.batch_size})")
    args.store = Path(tempfile.mkdtemp(prefix="clip-decoder-store-", dir=args.store))
    try:
        result = launch(args)
    finally:
        if args.keep:
            print(f"store kept in {args.store}", file=sys.stderr)
        else:
            shutil.rmtree(args.store, ignore_errors=True)
    result["command"] = "python -m bench.scale " + " ".join(sys.argv[1:])
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
