"""The HTTP service's memory over a long run: its RSS every 250 requests, from start to end.

Starts `clip-decoder serve` (its own process, the environment passed on: try MALLOC_ARENA_MAX=2),
then sends ``--requests`` requests, 16 at a time: the mix of bench/load.py (7 in 10 good, then too
many labels, an oversized upload, an added broken image), every other one with a vocabulary of 5
labels never asked before (embedded, then cached), the others repeating the model's first 20
training labels. Prints the server's VmRSS right after its model loaded, every 250 requests, and
its peak (VmHWM). Prints only; docs/RELIABILITY.md quotes it.
Run: python -m bench.service_memory [--data DIR] [--model openclipart] [--requests 2000]
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx

from bench.load import MAX_LABELS, MAX_UPLOAD_BYTES, free_port, planned, rss_mb, wait_until_healthy
from bench.report import bench_parser, check_inputs, machine
from clip_decoder.data.folder import read_part
from clip_decoder.model_folder import ModelFolder

CONCURRENCY, EVERY = 16, 250


def with_new_vocabulary(i: int, plan: tuple[str, dict]) -> tuple[str, dict]:
    """Request ``i`` of bench/load.py's mix; every other good one asks for 5 labels never asked before."""
    kind, request = plan
    if i % 2 and kind in ("good", "with a broken image"):
        request = {**request, "data": {"labels": ",".join(f"thing {i} {n}" for n in range(5))}}
    return kind, request


def main() -> None:
    parser = bench_parser(__doc__)  # --data (its test images), --no-write (unused: prints only)
    parser.add_argument("--model", default="openclipart", help="model folder or packaged model (default: %(default)s)")
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    check_inputs(args.data, part="test")

    labels = list(ModelFolder.find(args.model).read_config().labels[:20])
    pictures = [(sample.image.name, sample.image.read_bytes()) for sample in read_part(args.data, "test")[:32]]
    plans = [with_new_vocabulary(i, planned(i, pictures, labels)) for i in range(args.requests)]
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "clip_decoder", "serve", "--model", str(args.model), "--port", str(port),
                               "--max-labels", str(MAX_LABELS), "--max-upload-mb", str(MAX_UPLOAD_BYTES / 2**20)])
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120,
                          limits=httpx.Limits(max_connections=CONCURRENCY, keepalive_expiry=2)) as client, \
                ThreadPoolExecutor(CONCURRENCY) as pool:
            wait_until_healthy(client, server)
            rss, statuses, start = [rss_mb(server.pid)], Counter(), time.perf_counter()
            for first in range(0, len(plans), EVERY):
                statuses.update(pool.map(lambda plan: (plan[0], client.post("/v1/predict", **plan[1]).status_code),
                                         plans[first : first + EVERY]))
                rss.append(rss_mb(server.pid))
            seconds, peak = time.perf_counter() - start, rss_mb(server.pid, "VmHWM")
    finally:
        server.terminate()
        server.wait(timeout=30)
    answered = ", ".join(f"{kind} {status}: {count}" for (kind, status), count in sorted(statuses.items()))
    print(f"{machine()}; `clip-decoder serve --model {args.model}`, {args.requests} requests, {CONCURRENCY} at a time,"
          f" in {seconds:.0f} s. Answers: {answered}.")
    print(f"server RSS (MiB), at start then every {EVERY} requests: " + " ".join(f"{value:.0f}" for value in rss)
          + f"; growth {rss[-1] - rss[0]:.0f} MiB; peak {peak:.0f} MiB")


if __name__ == "__main__":
    main()
