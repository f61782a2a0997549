"""Image sources -> preprocessed pixel batches (numpy), decoded ahead in background threads; and
the batch of predictions every tagging runtime yields. Torch-free (the ONNX runtime uses it too).

``decoded_batches`` decodes and preprocesses the next batch(es) in a small thread pool while the
caller runs the image tower on the current one. This pays because PIL (decode, resize) and numpy
(normalisation) release the GIL, and the tower's forward leaves gaps in the cores' time. Besides
the batch the caller holds, at most ``prefetch`` batches are decoded or queued at any time, so
memory stays bounded however many sources there are.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from typing import TYPE_CHECKING, Protocol

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .errors import ClipDecoderError
from .images import ImageSource, Preprocess, load_image
from .prompts import check_labels

if TYPE_CHECKING:
    from .prompts import LabelEmbedder
    from .thresholds import Thresholds

# One thread. Decode + preprocess costs ~4.5 ms of one core per image (an openclipart PNG for
# the 224 px offline tower), the tower's forward ~55 ms per image on torch's 2 threads, which
# leave ~0.3 of a core idle on average (process CPU / wall ~1.7): one thread already has ~4x the
# room it needs to stay ahead. A second one only decodes the first batch faster (nothing to
# overlap with yet) and otherwise competes with torch's 2 threads for the cores and with the
# tower's Python code for the GIL. Measured on the 2-core machine (shared: timings swung 2x):
# 0, 1 and 2 threads did not differ beyond that noise (median img/s 12.3, 12.3, 11.8; forward
# alone 14.0; 32 images, batch 8). On more cores, pass more.
DEFAULT_WORKERS = 1
# Ahead of a tower on a GPU, one decoding thread is the bottleneck. On an H200 with 16 cores a
# ViT-B/16 forward ran 1,059 images/s (fp32, batch 64); with 1 / 2 / 3 / 4 / 6 / 8 decoding threads
# (two runs each) predict (batch 64) ran 259-349 / 498-568 / 669-707 / 671-691 / 652-655 / 514-585
# images/s and extraction (batch 8) 199-234 / 275-288 / 275-334 / 282-333 / 268-323 / 248-321. Past 4
# the threads fight the tower's Python thread for the GIL. So: the spare cores, at most 4.
MAX_ACCELERATOR_WORKERS = 4


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity where the OS reports one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def decode_workers(device_type: str) -> int:
    """Threads that decode ahead of an image tower on ``device_type`` ("cpu", "cuda", ...): one
    beside a CPU tower (it needs the cores), the spare cores beside an accelerator, at most 4 (under
    torchrun, of this process's share of the node's cores: LOCAL_WORLD_SIZE processes share them)."""
    if device_type == "cpu":
        return DEFAULT_WORKERS
    share = usable_cpus() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(MAX_ACCELERATOR_WORKERS, share - 1))

# Images per image-tower forward. On CPU small batches are faster per image: the activations of
# a batch of 8 stay in cache. EfficientNet-Lite2 at 224 px on 2 cores: 18.4 images/s at batch
# 4-8, 14.0 at 16, 7.7 at 32 (median of 3, 64 images). GPUs want larger batches: pass them.
DEFAULT_BATCH_SIZE = 8


@dataclass
class DecodedBatch:
    """One batch: the input positions that decoded, their pixels, and the ones that failed."""

    indices: list[int]  # positions in the input, ascending; row i of pixels is indices[i]
    pixels: np.ndarray  # (len(indices), 3, H, W) float32, as Preprocess.arrays makes it
    failed: dict[int, str]  # position in the input -> error message (names the file)


@dataclass
class PredictedBatch:
    """One batch of predictions: rows of ``scores`` belong to the input positions in ``indices``."""

    indices: list[int]
    scores: np.ndarray  # (len(indices), n_labels) probabilities
    failed: dict[int, str]  # input position -> why that image could not be used
    attention: np.ndarray | None = None  # (len(indices), n_labels, N) with attention=True


def _decode(source: ImageSource, preprocess: Preprocess) -> np.ndarray | str:
    """One image's normalised (3, H, W) pixels, or the error message if it cannot be used."""
    try:
        return preprocess(load_image(source))
    except ClipDecoderError as error:
        return str(error)


def _assemble(positions: list[int], results: list[np.ndarray | str], preprocess: Preprocess) -> DecodedBatch:
    """Stack the images of one batch that decoded; collect the errors of those that did not."""
    indices = [i for i, r in zip(positions, results) if not isinstance(r, str)]
    arrays = [r for r in results if not isinstance(r, str)]
    pixels = np.stack(arrays) if arrays else preprocess.arrays([])
    return DecodedBatch(indices, pixels, {i: r for i, r in zip(positions, results) if isinstance(r, str)})


def decoded_batches(
    sources: Iterable[ImageSource],
    preprocess: Preprocess,
    batch_size: int = DEFAULT_BATCH_SIZE,
    workers: int = DEFAULT_WORKERS,
    prefetch: int = 1,
) -> Iterator[DecodedBatch]:
    """Yield ``DecodedBatch``es of ``batch_size`` consecutive sources, in input order.

    ``sources`` may be anything ``load_image`` accepts (paths, bytes, binary files, PIL images);
    it is read lazily. Each image becomes ``preprocess(load_image(source))``; the rows are equal
    to ``preprocess.arrays`` of the decoded images (torch callers wrap them: ``torch.from_numpy``). An
    image that cannot be used is reported in ``failed`` (a batch may then be short, or even empty) and
    the rest carry on. While the caller
    works on one batch, ``workers`` threads decode the next ``prefetch`` (>= 1) batches. ``workers=0``
    decodes each batch in the caller's thread when it is asked for (no threads, no overlap). In
    threaded mode a file object or not-yet-loaded PIL image must not appear twice in ``sources``:
    two threads would read it at once.
    """
    if batch_size < 1 or workers < 0 or prefetch < 1:  # checked now, not at the first next()
        raise ClipDecoderError(f"decoded_batches: need batch_size >= 1, workers >= 0 and prefetch >= 1, got "
                               f"{batch_size}, {workers} and {prefetch}")
    return _batches(sources, preprocess, batch_size, workers, prefetch)


def _batches(
    sources: Iterable[ImageSource], preprocess: Preprocess, batch_size: int, workers: int, prefetch: int
) -> Iterator[DecodedBatch]:
    """The generator behind ``decoded_batches`` (its pool starts at the first ``next``)."""
    numbered = enumerate(sources)
    chunks = iter(lambda: list(islice(numbered, batch_size)), [])  # lists of (position, source)
    if workers == 0:
        for chunk in chunks:
            yield _assemble([i for i, _ in chunk], [_decode(s, preprocess) for _, s in chunk], preprocess)
        return

    pool = ThreadPoolExecutor(workers, thread_name_prefix="clip-decoder-decode")
    pending: deque[tuple[list[int], list[Future]]] = deque()

    def submit_next() -> None:
        chunk = next(chunks, None)
        if chunk:
            pending.append(([i for i, _ in chunk], [pool.submit(_decode, s, preprocess) for _, s in chunk]))

    try:
        for _ in range(prefetch):
            submit_next()
        while pending:
            positions, futures = pending.popleft()
            results = [future.result() for future in futures]
            submit_next()  # decoded while the caller uses this batch
            yield _assemble(positions, results, preprocess)
    finally:  # also when the caller stops early: drop queued work, wait for the running images
        pool.shutdown(wait=True, cancel_futures=True)


class Tagger(Protocol):
    """What ``predict`` and ``serve`` use of a model: ``CLIPDecoder`` (torch) and ``onnx_model.OnnxModel`` keep it."""

    templates: tuple[str, ...]  # the prompt templates labels are embedded through
    preprocess: Preprocess
    backbone: str
    trained_labels: tuple[str, ...]
    embed_labels: LabelEmbedder
    text_tower: object  # ``text_tower.encode([])`` loads a text tower that loads on first use

    def default_thresholds(self) -> Thresholds: ...

    def predict_batches(self, images: Sequence, labels: Sequence[str], templates: Sequence[str] | None = None,
                        batch_size: int = DEFAULT_BATCH_SIZE, shortlist: int | None = None,
                        attention: bool = False) -> Iterator[PredictedBatch]: ...


def checked_request(labels: Sequence[str], batch_size: int) -> list[str]:
    """The labels of a ``predict_batches`` call, checked with its batch size, as every tagger checks them."""
    labels = check_labels(labels)
    if not labels:
        raise ClipDecoderError("no labels to score")
    if batch_size < 1:
        raise ClipDecoderError(f"batch_size must be at least 1, got {batch_size}")
    return labels


def predict_scores(tagger: Tagger, images, labels: Sequence[str], templates: Sequence[str] | None, batch_size: int,
                   progress: bool = False, **options) -> np.ndarray:
    """Every tagger's ``predict``: its ``predict_batches`` (with ``options``) as one array (n_images, n_labels); one path
    or PIL image is a list of one; the first image that could not be read raises ClipDecoderError."""
    images = [images] if isinstance(images, (str, os.PathLike, Image.Image)) else list(images)
    batches = tagger.predict_batches(images, labels, templates, batch_size, **options)
    rows = []
    total = -(-len(images) // batch_size)
    for batch in tqdm(batches, desc="predict", unit="batch", total=total, disable=not progress):
        if batch.failed:
            raise ClipDecoderError(next(iter(batch.failed.values())))
        rows.append(batch.scores)
    return np.concatenate(rows) if rows else np.zeros((0, len(labels)), dtype=np.float32)
