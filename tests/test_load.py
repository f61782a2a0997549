"""The service under load and attack on loopback: real uvicorn, concurrent clients, slow and huge bodies."""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import serving

from clip_decoder import CLIPDecoder
from clip_decoder.serve import Limits, create_app

REQUESTS, CONCURRENCY = 500, 16
LABEL_SETS = [["red", "green", "blue", "yellow", "white", "black"], ["cat", "red car", "black"], ["white"]]
LIMITS = Limits(max_labels=8, max_upload_bytes=50_000)
RSS_GROWTH_MB = 32  # allowed growth of this process (server and clients) over the 500 requests


def pooled(base: str, connections: int) -> httpx.Client:
    """A client whose idle connections expire before uvicorn's 5 s keep-alive would close them under it."""
    return httpx.Client(base_url=base, timeout=60, limits=httpx.Limits(max_connections=connections, keepalive_expiry=2))


def rss_mb(key: str = "VmRSS", pid: int | str = "self") -> float:
    """A process's resident memory now (VmRSS) or at its peak (VmHWM), in MiB (this one's by default)."""
    line = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith(key + ":"))
    return int(line.split()[1]) / 1024


@pytest.fixture(scope="module")
def model(trained):
    return CLIPDecoder.from_pretrained(trained[0])


@pytest.fixture(scope="module")
def pictures(tiny_dataset, cat_photo) -> list[tuple[str, bytes]]:
    return [(cat_photo.name, cat_photo.read_bytes())] + [
        (path.name, path.read_bytes()) for path in sorted((tiny_dataset / "images").glob("test-*.png"))[:3]]


def planned(i: int, pictures: list[tuple[str, bytes]], new_vocabularies: bool = False) -> dict:
    """Request ``i`` of the load: 7 in 10 good, then too many labels, an oversized upload, a broken image.
    With ``new_vocabularies``, every other request asks for 5 labels never asked before."""
    name, data = pictures[i % len(pictures)]
    labels = LABEL_SETS[i % len(LABEL_SETS)]
    if new_vocabularies and i % 2:
        labels = [f"thing {i} {n}" for n in range(5)]
    kind = {7: "labels", 8: "upload", 9: "broken"}.get(i % 10, "good")
    files = [("images", (name, data, "application/octet-stream"))]
    if kind == "labels":
        labels = [f"label {n}" for n in range(LIMITS.max_labels + 1)]
    elif kind == "upload":
        files = [("images", ("huge.png", bytes(LIMITS.max_upload_bytes + 1), "image/png"))]
    elif kind == "broken":
        files.append(("images", ("broken.png", b"\x89PNG not really", "image/png")))
    return {"kind": kind, "picture": i % len(pictures), "labels": labels, "files": files}


def test_500_requests_16_at_a_time(model, pictures):
    expected = {(p, tuple(labels)): model.predict([data], labels)[0]
                for p, (_, data) in enumerate(pictures) for labels in LABEL_SETS}
    plans = [planned(i, pictures) for i in range(REQUESTS)]

    def send(client: httpx.Client, plan: dict) -> tuple[float, httpx.Response]:
        start = time.perf_counter()
        response = client.post("/v1/predict", files=plan["files"], data={"labels": ",".join(plan["labels"])})
        return time.perf_counter() - start, response

    with serving(create_app(model, LIMITS)) as base, \
            pooled(base, CONCURRENCY) as client, \
            ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(lambda plan: send(client, plan), plans[: 2 * CONCURRENCY]))  # warm-up: threads, allocator
        rss_before = rss_mb()
        start = time.perf_counter()
        answers = list(pool.map(lambda plan: send(client, plan), plans))
        seconds = time.perf_counter() - start
        rss_after = rss_mb()

    statuses = [response.status_code for _, response in answers]
    assert not [status for status in statuses if status >= 500]
    for plan, (_, response) in zip(plans, answers):
        if plan["kind"] == "labels":
            assert response.status_code == 422 and "max_labels" in response.text
        elif plan["kind"] == "upload":
            assert response.status_code == 413 and "max_upload_bytes" in response.text
        else:
            assert response.status_code == 200
            results = response.json()["results"]
            scores = results[0]["scores"]
            assert list(scores) == plan["labels"]
            np.testing.assert_allclose(list(scores.values()), expected[plan["picture"], tuple(plan["labels"])], atol=1e-5)
            if plan["kind"] == "broken":
                assert "broken.png" in results[1]["error"] and "scores" not in results[1]
    assert rss_after - rss_before < RSS_GROWTH_MB
    p50, p90, p99 = (np.percentile([latency for latency, _ in answers], q) * 1000 for q in (50, 90, 99))
    print(f"\n{REQUESTS} requests, {CONCURRENCY} at a time: p50 {p50:.0f} ms, p90 {p90:.0f} ms, p99 {p99:.0f} ms,"
          f" {REQUESTS / seconds:.0f} requests/s; RSS {rss_before:.0f} -> {rss_after:.0f} MiB (peak {rss_mb('VmHWM'):.0f})")


MEMORY_REQUESTS = 2000
# The service's own RSS (its own process): growth from the first request to the last, and over the
# last half (the caches are bounded: label embeddings by max_cached_labels, vocabularies by 8). The
# first half includes the warm-up (worker threads, glibc arenas), which varies with the machine and
# the checkout: 29 to 65 MiB in all here, and 2 to 6 MiB over the last half.
RSS_GROWTH_MB, RSS_LAST_HALF_MB = 96, 16


def test_2000_requests_in_the_service_s_own_process_keep_its_memory_bounded(trained, pictures, tmp_path):
    """``clip-decoder serve`` in its own process, as deployed: 2,000 requests, 16 at a time, good and bad, new and
    repeated vocabularies. Its memory grows while it warms up (threads, allocator), then levels off."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # OMP_WAIT_POLICY=PASSIVE: the clients share this machine's cores; MALLOC_ARENA_MAX=2: fewer glibc arenas,
    # the setting README's "The service" gives for deployment.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE", "MALLOC_ARENA_MAX": "2"}
    command = [sys.executable, "-m", "clip_decoder", "serve", "--model", str(trained[0]), "--port", str(port),
               "--max-labels", str(LIMITS.max_labels), "--max-upload-mb", str(LIMITS.max_upload_bytes / 2**20)]
    server = subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL)
    plans = [planned(i, pictures, new_vocabularies=True) for i in range(MEMORY_REQUESTS)]
    try:
        with pooled(f"http://127.0.0.1:{port}", CONCURRENCY) as client, ThreadPoolExecutor(CONCURRENCY) as pool:
            for _ in range(600):  # the server loads its model first
                try:
                    client.get("/health")
                    break
                except httpx.TransportError:
                    assert server.poll() is None, "the server exited"
                    time.sleep(0.1)
            rss = [rss_mb(pid=server.pid)]
            statuses = []
            for half in (plans[: MEMORY_REQUESTS // 2], plans[MEMORY_REQUESTS // 2 :]):
                statuses += pool.map(lambda plan: client.post("/v1/predict", files=plan["files"],
                                                              data={"labels": ",".join(plan["labels"])}).status_code, half)
                rss.append(rss_mb(pid=server.pid))
    finally:
        server.terminate()
        server.wait(timeout=30)
    expected = {"good": 200, "broken": 200, "labels": 422, "upload": 413}
    assert statuses == [expected[plan["kind"]] for plan in plans]
    print(f"\nservice RSS over {MEMORY_REQUESTS} requests: {rss[0]:.0f} -> {rss[1]:.0f} -> {rss[2]:.0f} MiB")
    assert rss[2] - rss[0] < RSS_GROWTH_MB and rss[2] - rss[1] < RSS_LAST_HALF_MB


class Slow:
    """A model that takes at least ``seconds`` per request (so that requests pile up)."""

    def __init__(self, model, seconds: float) -> None:
        self.model, self.seconds = model, seconds

    def __getattr__(self, name: str):
        return getattr(self.model, name)

    def predict_batches(self, *args, **kwargs):
        time.sleep(self.seconds)
        yield from self.model.predict_batches(*args, **kwargs)


def test_a_flood_gets_429s_with_retry_after_and_no_errors(model, pictures):
    name, data = pictures[0]
    with serving(create_app(Slow(model, 0.05), Limits(max_queue=2))) as base, \
            pooled(base, 64) as client, \
            ThreadPoolExecutor(64) as pool:
        answers = list(pool.map(lambda _: client.post("/v1/predict", files=[("images", (name, data, "image/png"))],
                                                       data={"labels": "red,cat"}), range(128)))
    statuses = {response.status_code for response in answers}
    assert statuses == {200, 429}
    assert all(int(response.headers["retry-after"]) >= 1 and "max_queue" in response.text
               for response in answers if response.status_code == 429)


def raw_reply(port: int, request: bytes) -> tuple[float, bytes]:
    """Send raw bytes on a fresh connection and read the reply; return the seconds it took and the reply."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(request)
        reply = b""
        while not (b"\r\n\r\n" in reply and reply.endswith(b"}")):
            chunk = connection.recv(65536)
            if not chunk:
                break
            reply += chunk
    return time.monotonic() - start, reply


def test_slow_and_huge_bodies_are_cut_off_early(model):
    def head(length: int) -> bytes:
        return (f"POST /v1/predict HTTP/1.1\r\nHost: localhost\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                f"Content-Length: {length}\r\n\r\n").encode()

    with serving(create_app(model, Limits(max_request_seconds=1.0, max_body_bytes=100_000))) as base:
        port = httpx.URL(base).port
        seconds, reply = raw_reply(port, head(10**10))  # declares 10 GB and sends none of it
        assert reply.startswith(b"HTTP/1.1 413") and b"max_body_bytes" in reply and seconds < 1
        seconds, reply = raw_reply(port, head(1000) + b"--b\r\n")  # then stalls
        assert reply.startswith(b"HTTP/1.1 408") and b"max_request_seconds" in reply and 0.9 < seconds < 5
        assert httpx.get(base + "/health").json()["status"] == "ok"  # still serving


def idle_connections(port: int, count: int) -> list[socket.socket]:
    """``count`` connections that send nothing."""
    return [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(count)]


def read_to_end(connection: socket.socket) -> bytes:
    """What the server sends on ``connection`` until it closes it."""
    reply = b""
    while chunk := connection.recv(65536):
        reply += chunk
    return reply


def health_seconds(client: httpx.Client, times: int = 20) -> list[float]:
    """Seconds each of ``times`` GET /health took."""
    seconds = []
    for _ in range(times):
        start = time.perf_counter()
        assert client.get("/health").json()["status"] == "ok"
        seconds.append(time.perf_counter() - start)
    return seconds


def test_200_idle_connections_stop_neither_health_nor_a_request(model, pictures):
    name, data = pictures[0]
    with serving(create_app(model)) as base, pooled(base, 1) as client:
        alone = health_seconds(client)
        idle = idle_connections(httpx.URL(base).port, 200)
        try:
            crowded = health_seconds(client)
            start = time.perf_counter()
            response = client.post("/v1/predict", files=[("images", (name, data, "image/png"))], data={"labels": "red,cat"})
            predict = time.perf_counter() - start
            assert response.status_code == 200
            assert max(crowded) < 1 and predict < 1, (crowded, predict)
            for connection in idle:  # still open, nothing sent back: under both limits
                connection.setblocking(False)
                with pytest.raises(BlockingIOError):
                    connection.recv(1)
        finally:
            for connection in idle:
                connection.close()
    print(f"\n/health median {np.median(alone) * 1000:.1f} ms alone, {np.median(crowded) * 1000:.1f} ms"
          f" (max {max(crowded) * 1000:.1f} ms) with 200 idle connections open; a predict request {predict * 1000:.0f} ms")


def test_connections_past_the_cap_get_429_and_heads_too_slow_get_408(model):
    limits = Limits(max_connections=8, max_header_seconds=1.0)
    with serving(create_app(model, limits)) as base:
        port = httpx.URL(base).port
        start = time.monotonic()
        idle = idle_connections(port, 8)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as extra:
            refused = read_to_end(extra)
        assert refused.startswith(b"HTTP/1.1 429") and b"max_connections" in refused and b"retry-after: 1" in refused
        for connection in idle:
            reply = read_to_end(connection)
            assert reply.startswith(b"HTTP/1.1 408") and b"max_header_seconds" in reply, reply
            connection.close()
        assert 0.9 < time.monotonic() - start < 5

        # A head sent a byte every 0.25 s: the bytes do not restart the clock.
        start = time.monotonic()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as trickle:
            for byte in b"GET /health HTTP/1.1\r\nHost: x\r\n":
                trickle.sendall(bytes([byte]))
                if select.select([trickle], [], [], 0.25)[0]:
                    break
            reply = read_to_end(trickle)
        assert reply.startswith(b"HTTP/1.1 408") and 0.9 < time.monotonic() - start < 5
        assert httpx.get(base + "/health").json()["limits"]["max_connections"] == 8  # slots free again


def test_an_oversized_body_sent_whole_before_reading_the_answer_gets_413(model):
    """urllib sends the whole body before it reads the answer: it must read a 413, not a reset."""
    with serving(create_app(model, Limits(max_body_bytes=100_000))) as base:
        for size in (200_000, 5_000_000):
            request = urllib.request.Request(base + "/v1/predict", data=bytes(size),
                                             headers={"Content-Type": "multipart/form-data; boundary=b"})
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=10)
            assert refused.value.code == 413 and b"max_body_bytes" in refused.value.read()
        assert httpx.get(base + "/health").json()["status"] == "ok"
