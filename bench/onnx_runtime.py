"""ONNX Runtime against torch eager: start-up, images per second, label embedding, memory, sizes.

(1) Whole processes (started before this process loads any model): `clip-decoder predict --labels L IMAGE` with the packaged model (torch) and
`clip-decoder predict --runtime onnx --model EXPORT ...` (its export), alternating, each with three new
labels (an empty cache folder per run) and with the labels embedded before (a cache filled by an earlier
run); CPU time (user + system) from the kernel's accounting of each process (``os.wait4``), peak RSS its
VmHWM, read from /proc while it runs (wait4's maxrss also counts the RSS a child inherits at fork).
(2) One process: images per second of `predict` at batch 1 and 8 over the first N clip-art test images
with a fixed 100-label vocabulary (embedded before the timing), torch and ONNX Runtime called in turn
(medians), and the largest probability difference and top-3 agreement on those images.
(3) Labels embedded per second (7 templates each, nothing cached). (4) The export folder's size.
(5) Install size: the files of the distributions each runtime needs (its requirements followed).
Run: python -m bench.onnx_runtime [--export DIR] [--images 64] [--runs 5]
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np

from bench.report import ROOT, bench_parser, check_inputs, command, isolated, machine, publish, shown

VOCABULARY = 100  # labels scored per image in the throughput: the benchmark's, then ImageNet class names
TORCH_FREE = ["onnxruntime", "tokenizers", "numpy", "pillow", "safetensors", "tqdm"]  # what --runtime onnx imports


def distribution_closure(names: list[str]) -> set[str]:
    """The distributions ``names`` need, their requirements followed (no extras), as installed here."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = re.split(r"[\s<>=!~;\[(]", todo.pop(), maxsplit=1)[0].lower().replace("_", "-")
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen.add(name)
        todo += [req for req in dist.requires or [] if "extra ==" not in req and not _marker_false(req)]
    return seen


def _marker_false(requirement: str) -> bool:
    from packaging.requirements import Requirement

    marker = Requirement(requirement).marker
    return marker is not None and not marker.evaluate({"extra": ""})


def installed_mib(names: set[str]) -> float:
    total = 0
    for name in names:
        for file in metadata.distribution(name).files or []:
            path = Path(file.locate())
            if path.is_file():
                total += path.stat().st_size
    return total / 2**20


def timed_run(argv: list[str], cache: Path) -> tuple[float, float, float, str]:
    """(CPU seconds, wall seconds, peak RSS MiB, stdout) of one whole process."""
    env = {**os.environ, "CLIP_DECODER_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out:
        process = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.DEVNULL, text=True)
        peak_kib = 0
        while True:  # VmHWM is gone once the process has exited (a zombie has no memory)
            try:
                status = Path(f"/proc/{process.pid}/status").read_text()
                peak_kib = max(peak_kib, int(status.split("VmHWM:")[1].split()[0]))
            except (OSError, IndexError):
                break
            time.sleep(0.002)
        _, code, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(code)
        out.seek(0)
        printed = out.read()
    if process.returncode != 0:
        sys.exit(f"error: {' '.join(argv)} exited with {process.returncode}")
    return usage.ru_utime + usage.ru_stime, wall, peak_kib / 1024, printed


def load(runtime: str, export: str):
    from clip_decoder import CLIPDecoder
    from clip_decoder.onnx_model import OnnxModel

    return OnnxModel.load(export) if runtime == "onnx" else CLIPDecoder.from_pretrained("openclipart")


def images_per_second(runtime: str, export: str, images: list[str], vocabulary: list[str], batch: int) -> float:
    """``predict``'s images/s in this (fresh) process, after a warm-up that also embeds the vocabulary."""
    model = load(runtime, export)
    model.predict(images[:batch], vocabulary, batch_size=batch)
    started = time.perf_counter()
    model.predict(images, vocabulary, batch_size=batch)
    return len(images) / (time.perf_counter() - started)


def labels_per_second(runtime: str, export: str, labels: list[str]) -> float:
    """Labels embedded per second (the model's templates, nothing cached), the text tower loaded beforehand."""
    model = load(runtime, export)
    model.embed_labels.arrays(["warm-up"], model.templates)
    started = time.perf_counter()
    model.embed_labels.arrays(labels, model.templates)
    return len(labels) / (time.perf_counter() - started)


def process_rows(export: Path, image: Path, labels: str, runs: int) -> dict[str, list[tuple]]:
    """(CPU s, wall s, peak RSS MiB) per run of each (runtime, new / embedded) case, and the printed scores."""
    argv = {"torch": [sys.executable, "-m", "clip_decoder", "predict", "--labels", labels, str(image)],
            "onnx": [sys.executable, "-m", "clip_decoder", "predict", "--runtime", "onnx", "--model", str(export),
                     "--labels", labels, str(image)]}
    rows: dict[str, list[tuple]] = {f"{runtime} {case}": [] for runtime in argv for case in ("new", "embedded")}
    scores = {}
    with tempfile.TemporaryDirectory(prefix="clip-decoder-onnx-bench-") as folder:
        for run in range(runs + 1):  # the first run of each case warms the page cache; not counted
            for runtime, args in argv.items():
                with tempfile.TemporaryDirectory(dir=folder) as empty:
                    new = timed_run(args, Path(empty))
                embedded = timed_run(args, Path(folder) / f"embedded-{runtime}")
                scores[runtime] = json.loads(new[3])["scores"]
                if run:
                    rows[f"{runtime} new"].append(new[:3])
                    rows[f"{runtime} embedded"].append(embedded[:3])
            print(f"run {run} done", file=sys.stderr)
    difference = max(abs(scores["onnx"][label] - value) for label, value in scores["torch"].items())
    return rows, difference


def main() -> None:
    parser = bench_parser(__doc__)  # --data, --no-write
    parser.add_argument("--export", type=Path, help="an export of the packaged model (default: exported now, timed)")
    parser.add_argument("--images", type=int, default=64, help="clip-art test images for the throughput (default 64)")
    parser.add_argument("--runs", type=int, default=5, help="whole-process runs of each case (default 5)")
    parser.add_argument("--labels", default="cat,dog,car", help="the start-up's three labels")
    parser.add_argument("--image", type=Path, default=ROOT / "tests" / "data" / "chelsea-cat.jpg")
    args = parser.parse_args()
    check_inputs(args.data, split=args.data / "splits" / "default.json")
    os.environ["HF_HUB_OFFLINE"] = "1"
    from clip_decoder import CLIPDecoder
    from clip_decoder.onnx_model import OnnxModel
    from clip_decoder.prior import imagenet_class_names

    scratch = tempfile.TemporaryDirectory(prefix="clip-decoder-export-")
    export_seconds = None
    if args.export is None or not (args.export / "manifest.json").is_file():
        export = args.export or Path(scratch.name) / "export"
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "clip_decoder", "export", "--out", str(export)], check=True)
        export_seconds = time.perf_counter() - started
    else:
        export = args.export
    rows, startup_difference = process_rows(export, args.image, args.labels, args.runs)

    lines = (args.data / "test.csv").read_text(encoding="utf-8").splitlines()[1 : args.images + 1]
    images = [args.data / line.split(",")[0] for line in lines]
    split = json.loads((args.data / "splits" / "default.json").read_text())
    vocabulary = list(dict.fromkeys([*sorted(split["seen"] + split["unseen"]), *imagenet_class_names()]))[:VOCABULARY]
    names = [str(image) for image in images]
    new_labels = [f"{name} {i}" for i, name in enumerate(vocabulary[:50])]  # never embedded before
    throughput, embedding = {1: {}, 8: {}}, {}
    for _ in range(3):  # each case in a fresh process, in turn: one runtime's threads never slow the other's
        for runtime in ("torch", "onnx"):
            for batch in (1, 8):
                throughput[batch].setdefault(runtime, []).append(isolated(images_per_second, runtime, str(export), names,
                                                                          vocabulary, batch)[0])
            embedding.setdefault(runtime, []).append(isolated(labels_per_second, runtime, str(export), new_labels)[0])
    throughput = {batch: {runtime: statistics.median(v) for runtime, v in rates.items()} for batch, rates in throughput.items()}
    embedding = {runtime: statistics.median(v) for runtime, v in embedding.items()}
    model, exported = CLIPDecoder.from_pretrained("openclipart"), OnnxModel.load(export)
    expected, got = model.predict(images, vocabulary), exported.predict(images, vocabulary)
    top3 = float((np.argsort(-expected, 1)[:, :3] == np.argsort(-got, 1)[:, :3]).all(1).mean())

    def graph_mib(name: str) -> float:
        return sum(file.stat().st_size for file in export.glob(f"{name}.onnx*")) / 2**20

    export_mib = sum(f.stat().st_size for f in export.iterdir()) / 2**20
    torch_install = installed_mib(distribution_closure([r for r in metadata.requires("clip-decoder") if "extra ==" not in r]))
    free_install = installed_mib(distribution_closure(TORCH_FREE))

    def median(case: str, column: int) -> float:
        return statistics.median(row[column] for row in rows[case])

    cpu_ratio = [o[0] / t[0] for t, o in zip(rows["torch new"], rows["onnx new"])]
    rss_ratio = [o[2] / t[2] for t, o in zip(rows["torch new"], rows["onnx new"])]
    table = "\n".join([
        "## ONNX Runtime against torch eager: start-up, images per second, label embedding, memory, sizes",
        "",
        f"Command: `{command('onnx_runtime', f'--images {args.images} --runs {args.runs}')}`; {machine()},"
        f" onnxruntime {metadata.version('onnxruntime')}. The packaged model and its export"
        + (f" (written by `clip-decoder export` in {export_seconds:.0f} s)." if export_seconds else "."),
        "",
        f"Whole processes, `clip-decoder predict [--runtime onnx --model EXPORT] --labels {args.labels}"
        f" {shown(args.image)}`, {args.runs} runs of each case in turn after one warm-up; medians. \"new\": an empty"
        " cache folder each run (the text tower loads and embeds the labels); \"embedded\": the labels on disk from"
        f" an earlier run. Largest difference between the two runtimes' printed scores: {startup_difference:.1e}.",
        "",
        "| runtime, labels | CPU s | wall s | peak RSS MiB |",
        "|---|---|---|---|",
        *[f"| {case} | {median(case, 0):.2f} | {median(case, 1):.2f} | {median(case, 2):.0f} |" for case in rows],
        "",
        f"ONNX / torch with new labels, run by run: CPU time median {statistics.median(cpu_ratio):.2f} (target at most"
        f" 0.33), peak RSS median {statistics.median(rss_ratio):.2f} (target at most 0.5).",
        "",
        f"`predict` over the first {len(images)} clip-art test images of {shown(args.data)}, a fixed vocabulary of"
        f" {len(vocabulary)} labels (embedded before), decoding included, each case timed in a fresh process after a"
        " warm-up (in one process, ONNX Runtime's idle threads slowed torch's next run by about 15%); medians of 3, in turn:",
        "",
        "| | torch eager | ONNX Runtime | ONNX / torch |",
        "|---|---|---|---|",
        *[f"| images/s, batch {batch} | {t['torch']:.1f} | {t['onnx']:.1f} | {t['onnx'] / t['torch']:.2f}x |"
          for batch, t in throughput.items()],
        f"| labels embedded/s (7 templates, none cached) | {embedding['torch']:.1f} | {embedding['onnx']:.1f} |"
        f" {embedding['onnx'] / embedding['torch']:.2f}x |",
        "",
        f"Parity on those images: largest probability difference {np.abs(expected - got).max():.1e}; the same top 3"
        f" on {top3:.0%} of images. Export folder: {export_mib:.0f} MiB (the image graph and its weights"
        f" {graph_mib('image'):.0f}, the text graph {graph_mib('text'):.0f} MiB). Installed size of what each runtime needs: torch path (clip-decoder's requirements) {torch_install:.0f}"
        f" MiB; torch-free (`{' '.join(TORCH_FREE)}` and what they need) {free_install:.0f} MiB, plus clip-decoder itself.",
    ])
    scratch.cleanup()
    publish(table, section="onnx-runtime", no_write=args.no_write)


if __name__ == "__main__":
    main()
