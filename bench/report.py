"""Shared by the bench scripts: options, input checks, timing, peak memory, and the tail that
prints a table and writes it into docs/BENCHMARKS.md.

A script's set-up and tail, in short::

    parser = bench_parser(__doc__, split=True)        # --data, --split, --no-write
    parser.add_argument("--images", type=int, default=32)
    args = parser.parse_args()
    check_inputs(args.data, split=split_of(args))     # exits with one clear message
    ...
    publish(table, section="inference", no_write=args.no_write)
"""

from __future__ import annotations

import argparse
import multiprocessing
import platform
import re
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "BENCHMARKS.md"
HEADER = "# Benchmarks\n\nEach section is written by the script it names; `make bench` reruns them all.\n"
# What `make demo` builds and trains; relative to the repository root, where the scripts run.
DEFAULT_DATA = Path("data/openclipart")
DEFAULT_MODEL = Path("models/openclipart-default")


def bench_parser(doc: str, *, data: bool = True, split: bool = False, model: bool = False,
                 target: str = "docs/BENCHMARKS.md", **kwargs) -> argparse.ArgumentParser:
    """An ArgumentParser for a bench script, with the options they share.

    ``doc`` is the script's docstring: its first line is the description (the whole of it with
    ``formatter_class=argparse.RawDescriptionHelpFormatter``). Adds ``--data`` (the benchmark
    folder, default data/openclipart) unless ``data`` is false, ``--split`` (default
    DATA/splits/default.json; read it with ``split_of``) when ``split``, ``--model`` (default
    models/openclipart-default) when ``model``, and always ``--no-write`` (leave ``target`` alone).
    Other keyword arguments go to ArgumentParser; ``prog`` is "python -m bench.<script>".
    """
    kwargs.setdefault("prog", f"python -m bench.{Path(sys.argv[0]).stem}")
    raw = kwargs.get("formatter_class") is argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=doc if raw else doc.splitlines()[0], **kwargs)
    if data:
        parser.add_argument("--data", type=Path, default=DEFAULT_DATA, metavar="DIR",
                            help="benchmark folder (default: %(default)s)")
    if split:
        parser.add_argument("--split", type=Path, default=None, metavar="JSON",
                            help="label split JSON (default: DATA/splits/default.json)")
    if model:
        parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, metavar="DIR",
                            help="model folder (default: %(default)s)")
    parser.add_argument("--no-write", action="store_true", help=f"print the table only; leave {target} alone")
    return parser


def split_of(args: argparse.Namespace) -> Path:
    """The label split a script reads: ``--split``, or DATA/splits/default.json."""
    return args.split or args.data / "splits" / "default.json"


def check_inputs(data: Path | None = None, *, part: str = "test", split: Path | None = None,
                 model: Path | None = None) -> None:
    """Exit with one clear error unless the inputs a script reads exist.

    ``data``: a benchmark folder with a ``part`` CSV (test.csv by default); ``split``: a label
    split JSON; ``model``: a model folder (its config.json). `make demo` builds all three.
    """
    problems = []
    if data is not None and not (Path(data) / f"{part}.csv").is_file():
        problems.append(f"no benchmark folder at {shown(data)} (no {part}.csv there); build it with `make demo` or"
                        f" `clip-decoder data openclipart --out {shown(data)}`")
    # A split inside a missing benchmark folder is missing with it: one message says both.
    if split is not None and not Path(split).is_file() and not (problems and Path(split).is_relative_to(data)):
        problems.append(f"no label split at {shown(split)}; `make demo` (or `clip-decoder data openclipart`) writes"
                        " splits/default.json in the benchmark folder")
    if model is not None and not (Path(model) / "config.json").is_file():
        problems.append(f"no model folder at {shown(model)} (no config.json there); train one with `make demo`")
    if problems:
        sys.exit("error: " + "; and ".join(problems))


def check_positive(args: argparse.Namespace, *names: str) -> None:
    """Exit with one error unless every option in ``names`` (dest names, e.g. "batch_size") is at least 1."""
    if min(getattr(args, name) for name in names) < 1:
        options = [f"--{name.replace('_', '-')}" for name in names]
        listed = ", ".join(options[:-1]) + " and " + options[-1] if len(options) > 1 else options[0]
        sys.exit(f"error: {listed} must be positive")


def command(script: str, arguments: str | list[str]) -> str:
    """The command line that reruns ``script`` (a module of bench/) with ``arguments``, for a table's "Command:"."""
    text = " ".join(arguments) if isinstance(arguments, list) else arguments
    return f"python -m bench.{script} {text}".rstrip()


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
    """This process's peak resident memory so far, in MiB: its VmHWM. (getrusage's ru_maxrss would also count,
    in a process started by fork and exec, the RSS its parent had at the fork: a fresh process of ``isolated``
    started from a parent holding a 2 GB model reported 2 GB whatever it did.)"""
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024


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


def write_section(name: str, body: str, doc: Path = DOC, header: str = HEADER) -> None:
    """Replace (or append) the section marked ``name`` in ``doc`` (docs/BENCHMARKS.md)."""
    text = doc.read_text() if doc.exists() else header
    block = f"<!-- {name}:start -->\n{body.strip()}\n<!-- {name}:end -->"
    pattern = re.compile(rf"<!-- {re.escape(name)}:start -->.*?<!-- {re.escape(name)}:end -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else f"{text.rstrip()}\n\n{block}\n"
    doc.parent.mkdir(exist_ok=True)
    doc.write_text(text)


def publish(table: str, *, section: str | None, no_write: bool, doc: Path = DOC, header: str = HEADER) -> None:
    """The shared tail: print ``table``, then, unless ``no_write``, write it into ``doc``.

    With a ``section`` name the table replaces that marked section (or is appended as it);
    with ``section=None`` it is appended at the end of ``doc`` (a log, as docs/EXPERIMENTS.md).
    """
    print(table)
    if no_write:
        return
    if section is not None:
        write_section(section, table, doc, header)
    else:
        doc.parent.mkdir(exist_ok=True)
        doc.write_text((doc.read_text() if doc.exists() else header) + "\n" + table + "\n")
