"""Render SVG files to PNG on white, each in a fresh fork of this process that is killed past a time limit."""

from __future__ import annotations

import io
import multiprocessing
import os
import time
from collections.abc import Sequence
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from ..decoding import usable_cpus
from ..errors import ClipDecoderError

RENDER_TIMEOUT_S = 60  # the slowest real file takes ~12 s here
# Rendered once before the workers fork; see render_all.
_WARM_UP = b'<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"><text y="8">a</text></svg>'
# A worker's exit status for each outcome; any other status (an exception, a crash) is a render error.
_EXIT_CODES = {None: 0, "blank render": 3, "render error": 4}
_REASONS = {code: reason for reason, code in _EXIT_CODES.items()}

Job = tuple[Path, Path, int]  # (svg file, png file to write, longest side in pixels)


def require_cairo() -> None:
    """Raise ClipDecoderError when cairosvg or the system library libcairo2 is missing."""
    try:
        import cairosvg  # noqa: F401 - imported to check it loads
    except (ImportError, OSError) as e:
        raise ClipDecoderError(f"rendering SVGs needs cairosvg and libcairo2 ({e})") from e


def render_svg(src: Path, dst: Path, size: int) -> str | None:
    """Render an SVG onto white, longest side ``size``, and write it as PNG; return a skip reason."""
    import cairosvg

    try:
        data = src.read_bytes()
        png = cairosvg.svg2png(bytestring=data, output_width=size, background_color="white")
        if Image.open(io.BytesIO(png)).height > size:  # portrait: bound the height instead
            png = cairosvg.svg2png(bytestring=data, output_height=size, background_color="white")
        image = Image.open(io.BytesIO(png)).convert("RGB")
        if image.getextrema() == ((255, 255),) * 3:
            return "blank render"
        image.save(dst, format="PNG")
        return None
    except Exception:  # noqa: BLE001 - one bad drawing must not stop the build
        return "render error"


def _render_and_exit(job: Job) -> None:
    """Worker body: render one file and report the outcome as the exit status."""
    os._exit(_EXIT_CODES[render_svg(*job)])


def render_all(jobs: Sequence[Job], workers: int | None = None, timeout: float = RENDER_TIMEOUT_S,
               progress: bool = True) -> list[str | None]:
    """Render every job, ``workers`` at a time (default: the CPU count); per job, None or a skip reason.

    cairo caches fonts per process, and the first file to use a font changes how later files draw
    text; so every SVG renders in a fresh fork of this process, after one fixed warm-up render,
    and the output does not depend on scheduling. A worker still running after ``timeout`` seconds
    is killed (also when it is stuck inside cairo) and its file is skipped as "render timeout";
    a worker that crashes skips its file as "render error".
    """
    import cairosvg

    cairosvg.svg2png(bytestring=_WARM_UP)
    workers = workers or usable_cpus()
    context = multiprocessing.get_context("fork")
    results: list[str | None] = [None] * len(jobs)
    running: dict[int, tuple[int, BaseProcess, float]] = {}  # sentinel -> (job index, worker, deadline)
    queue = iter(range(len(jobs)))
    with tqdm(total=len(jobs), desc="render svg", disable=not progress) as bar:
        try:
            while True:
                while len(running) < workers and (i := next(queue, None)) is not None:
                    worker = context.Process(target=_render_and_exit, args=(jobs[i],), daemon=True)
                    worker.start()
                    running[worker.sentinel] = (i, worker, time.monotonic() + timeout)
                if not running:
                    return results
                first_deadline = min(deadline for _, _, deadline in running.values())
                wait(list(running), timeout=max(0.0, first_deadline - time.monotonic()))
                now = time.monotonic()
                for sentinel, (i, worker, deadline) in list(running.items()):
                    if worker.exitcode is None:
                        if now < deadline:
                            continue
                        worker.kill()  # its partial PNG, if any, is removed with the skipped file
                        worker.join()
                        results[i] = "render timeout"
                    else:
                        results[i] = _REASONS.get(worker.exitcode, "render error")
                    worker.close()
                    del running[sentinel]
                    bar.update()
        finally:
            for _, worker, _ in running.values():
                worker.kill()
                worker.join()
