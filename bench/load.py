"""The HTTP service under concurrent load: latency percentiles, throughput and the server's memory.

Starts `clip-decoder serve` on a free loopback port (its own process), then sends ``--requests``
requests, ``--concurrency`` at a time (httpx from a thread pool), the same mix as
tests/test_load.py: 7 in 10 good (one test image, ``--labels`` of the model's training labels),
then one with too many labels (422), one oversized upload (413) and one adding a broken image
(200, that image reported). Latencies are of the good requests; throughput counts all of them.
Memory is the server's: VmRSS after a warm-up and after the run, and its peak (VmHWM).
Run: python -m bench.load [--data DIR] [--model models/openclipart-default] [--requests 500] [--concurrency 16] [--no-write]
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from bench.report import bench_parser, check_inputs, command, machine, publish, shown
from clip_decoder.data.folder import read_part

MAX_LABELS, MAX_UPLOAD_BYTES = 100, 2**20  # the server's limits in this run, so that the bad requests are cheap


def rss_mb(pid: int, key: str = "VmRSS") -> float:
    """A process's resident memory now (VmRSS) or at its peak (VmHWM), in MiB."""
    line = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith(key + ":"))
    return int(line.split()[1]) / 1024


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_healthy(client: httpx.Client, server: subprocess.Popen) -> None:
    """Return once the server answers /health (it loads its model first); exit if it died."""
    while True:
        try:
            client.get("/health")
            return
        except httpx.TransportError:
            if server.poll() is not None:
                sys.exit(f"error: the server exited with code {server.returncode}")
            time.sleep(0.2)


def planned(i: int, pictures: list[tuple[str, bytes]], labels: list[str]) -> tuple[str, dict]:
    """Request ``i``: its kind and the keyword arguments of its POST."""
    name, data = pictures[i % len(pictures)]
    kind = {7: "too many labels", 8: "oversized upload", 9: "with a broken image"}.get(i % 10, "good")
    files = [("images", (name, data, "image/png"))]
    if kind == "too many labels":
        labels = [f"label {n}" for n in range(MAX_LABELS + 1)]
    elif kind == "oversized upload":
        files = [("images", ("huge.png", bytes(MAX_UPLOAD_BYTES + 1), "image/png"))]
    elif kind == "with a broken image":
        files.append(("images", ("broken.png", b"\x89PNG not really", "image/png")))
    return kind, {"files": files, "data": {"labels": ",".join(labels)}}


def main() -> None:
    parser = bench_parser(__doc__, model=True)  # --data (its test images), --model (served), --no-write
    parser.add_argument("--images", type=int, default=32, help="distinct test images the requests cycle through")
    parser.add_argument("--labels", type=int, default=20, help="labels per good request (the model's first training labels)")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    check_inputs(args.data, part="test", model=args.model)

    labels = json.loads((args.model / "config.json").read_text())["labels"][: args.labels]
    pictures = [(sample.image.name, sample.image.read_bytes()) for sample in read_part(args.data, "test")[: args.images]]
    plans = [planned(i, pictures, labels) for i in range(args.requests)]
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "clip_decoder", "serve", "--model", str(args.model), "--port", str(port),
                               "--max-labels", str(MAX_LABELS), "--max-upload-mb", str(MAX_UPLOAD_BYTES / 2**20),
                               "--max-queue", str(args.concurrency)])
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120,
                          limits=httpx.Limits(max_connections=args.concurrency, keepalive_expiry=2)) as client, \
                ThreadPoolExecutor(args.concurrency) as pool:
            wait_until_healthy(client, server)

            def send(plan: tuple[str, dict]) -> tuple[str, float, int]:
                start = time.perf_counter()
                response = client.post("/v1/predict", **plan[1])
                return plan[0], time.perf_counter() - start, response.status_code

            list(pool.map(send, plans[: 2 * args.concurrency]))  # warm-up: vocabulary cache, threads, allocator
            rss_warm = rss_mb(server.pid)
            start = time.perf_counter()
            answers = list(pool.map(send, plans))
            seconds = time.perf_counter() - start
            rss_after, rss_peak = rss_mb(server.pid), rss_mb(server.pid, "VmHWM")
    finally:
        server.terminate()
        server.wait(timeout=30)

    good = [latency for kind, latency, status in answers if kind == "good" and status == 200]
    p50, p90, p99 = (1000 * float(np.percentile(good, q)) for q in (50, 90, 99))
    statuses = Counter((kind, status) for kind, _, status in answers)
    answered = ", ".join(f"{kind} {status}: {count}" for (kind, status), count in sorted(statuses.items()))
    errors = sum(count for (_, status), count in statuses.items() if status >= 500)
    rerun = command("load", f"--model {shown(args.model)} --data {shown(args.data)} --images {args.images}"
                            f" --labels {args.labels} --requests {args.requests} --concurrency {args.concurrency}")
    table = "\n".join([
        "## HTTP service under load (CPU, loopback)",
        "",
        f"Command: `{rerun}`; {machine()}; the clients share the machine's cores with the server.",
        f"`clip-decoder serve` (own process, one inference at a time) around `{shown(args.model)}`; {args.requests} requests,"
        f" {args.concurrency} at a time, cycling through {len(pictures)} test images of `{shown(args.data)}` (one per request)"
        f" with {len(labels)} labels. 7 in 10 are good, then one each with {MAX_LABELS + 1} labels, an oversized upload and an"
        " added broken image. Latency is per good request, client side, queueing included.",
        "",
        "| requests | concurrency | p50 ms | p90 ms | p99 ms | requests / s | 5xx | server RSS after warm-up → after (MiB) | server peak RSS (MiB) |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {args.requests} | {args.concurrency} | {p50:.0f} | {p90:.0f} | {p99:.0f} | {args.requests / seconds:.1f} | {errors} |"
        f" {rss_warm:,.0f} → {rss_after:,.0f} | {rss_peak:,.0f} |",
        "",
        f"Answers (kind status: count): {answered}.",
    ])
    publish(table, section="load", no_write=args.no_write)


if __name__ == "__main__":
    main()
