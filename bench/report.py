"""Shared by the bench scripts: timing, peak memory, and writing a table into docs/BENCHMARKS.md."""

from __future__ import annotations

import multiprocessing
import platform
import re
import resource
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "BENCHMARKS.md"
HEADER = "# Benchmarks\n\nEach section is written by the script it names; `make bench` reruns them all.\n"


def machine() -> str:
    """One line naming the machine and the versions that matter."""
    return (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads,"
        f" Python {platform.python_version()}, torch {torch.__version__}"
    )


def shown(path: Path) -> str:
    """A path as the command line would name it: relative to the repository when inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def interleaved_medians(functions: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time of each function, calling them in turn so that machine noise hits all alike."""
    for function in functions.values():
        function()  # warm-up: first-call allocations, lazy initialisation
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PeakMemory:
    """Peak resident memory (MiB) while a ``with`` block runs, sampled every 2 ms (Linux /proc).

    For cases that share a process: unlike ``isolated``, the memory held before the block counts.
    """

    def __enter__(self) -> PeakMemory:
        self.peak_mb, self._running = self._rss_mb(), True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._running = False
        self._thread.join()

    def _sample(self) -> None:
        while self._running:
            self.peak_mb = max(self.peak_mb, self._rss_mb())
            time.sleep(0.002)

    @staticmethod
    def _rss_mb() -> float:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def _call_and_report_peak(function, args):
    return function(*args), peak_rss_mb()


def isolated(function: Callable, *args):
    """Run ``function(*args)`` in a fresh process; return its result and that process's peak RSS (MiB).

    A fresh process per case keeps one case's allocations out of the next one's peak. The
    function must be defined at module level (it is pickled by reference).
    """
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_call_and_report_peak, function, args).result()


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section marked ``name`` in docs/BENCHMARKS.md."""
    text = DOC.read_text() if DOC.exists() else HEADER
    block = f"<!-- {name}:start -->\n{body.strip()}\n<!-- {name}:end -->"
    pattern = re.compile(rf"<!-- {re.escape(name)}:start -->.*?<!-- {re.escape(name)}:end -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else f"{text.rstrip()}\n\n{block}\n"
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(text)
