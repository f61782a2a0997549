"""Multi-label ranking metrics (AP, mAP, P/R/F1@k) and the NUS-WIDE ZSL/GZSL protocol.

Ties are deterministic: AP treats tied scores as one threshold (as sklearn and LESA), top-k takes
tied labels in label order, lower index first. mAP skips labels without a positive and counts them
(``n_labels_without_positives``); LESA, BiAM and ML-Decoder average them in as AP 0, which is
``mAP * (n_labels - n_labels_without_positives) / n_labels``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from clip_decoder.errors import ClipDecoderError

# Which test images ZSL ranks the unseen labels on (the first is the default), and what each one is.
ZSL_IMAGES = {
    "with-unseen": "the test images with an unseen label (ML-Decoder's set)",
    "all": "every test image (the set of LESA, BiAM and the CLIP-Decoder authors' code)",
}


def check_zsl_images(zsl_images: str, where: str) -> str:
    """``zsl_images`` if it names an image set of ZSL_IMAGES, else raise ClipDecoderError naming it and ``where``."""
    if zsl_images not in ZSL_IMAGES:
        raise ClipDecoderError(f"{where}: zsl_images must be one of {', '.join(ZSL_IMAGES)}, got {zsl_images!r}")
    return zsl_images


# Large matrices (a memory-mapped score matrix of a whole test set) are read this many rows, or
# label columns, at a time, so no full-size temporary is made; the results do not depend on it.
ROWS_PER_CHUNK = 4096
COLUMNS_PER_CHUNK = 64


def _first(array: np.ndarray, bad) -> tuple[int, tuple | None]:
    """(how many entries ``bad(chunk)`` marks, the index of the first) over row chunks of ``array``."""
    count, first = 0, None
    for start in range(0, len(array), ROWS_PER_CHUNK):
        marked = np.argwhere(bad(array[start : start + ROWS_PER_CHUNK]))
        if len(marked) and first is None:
            first = (start + int(marked[0][0]), *map(int, marked[0][1:]))
        count += len(marked)
    return count, first


def _check(scores, targets, where: str, ndim: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Return (float scores, int8 0/1 targets) or raise ClipDecoderError naming `where`."""
    scores, targets = np.asarray(scores), np.asarray(targets)
    if scores.ndim != ndim or targets.ndim != ndim:
        raise ClipDecoderError(
            f"{where}: scores and targets must be {ndim}-D, got shapes {scores.shape} and {targets.shape}"
        )
    if scores.shape != targets.shape:
        raise ClipDecoderError(f"{where}: scores shape {scores.shape} != targets shape {targets.shape}")
    if scores.size == 0:
        raise ClipDecoderError(f"{where}: scores and targets are empty (shape {scores.shape})")
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float64)
    count, first = _first(scores, np.isnan)
    if count:
        raise ClipDecoderError(f"{where}: scores contain {count} NaN value(s), first at index {first}")
    _, first = _first(targets, lambda chunk: (chunk != 0) & (chunk != 1))
    if first is not None:
        raise ClipDecoderError(f"{where}: targets must be 0/1, found {targets[first]!r} at index {first}")
    return scores, targets.astype(np.int8, copy=False)


def _ap(scores: np.ndarray, positive: np.ndarray) -> float:
    """AP of one validated column: mean over positives of the precision at the threshold equal to its score."""
    pos = np.sort(scores[positive])
    if len(pos) == 0:
        return float("nan")
    ranked = np.sort(scores)
    n_at_least = len(ranked) - np.searchsorted(ranked, pos)  # images scoring >= each positive (ties grouped)
    tp_at_least = len(pos) - np.searchsorted(pos, pos)  # positives among them
    return float(np.mean(tp_at_least / n_at_least))


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Average precision of one label (1-D arrays), equal to sklearn's average_precision_score; nan if no positives."""
    scores, targets = _check(scores, targets, "average_precision", ndim=1)
    return _ap(scores, targets == 1)


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Mean over labels (columns) of per-label AP; labels without positives are skipped, nan if none has one."""
    return _map(*_check(scores, targets, "mean_average_precision"))


def _map(scores: np.ndarray, targets: np.ndarray) -> float:
    """mean_average_precision on validated arrays."""
    columns = np.flatnonzero(targets.any(axis=0))
    aps = []
    for start in range(0, len(columns), COLUMNS_PER_CHUNK):
        chunk = columns[start : start + COLUMNS_PER_CHUNK]
        block, positive = scores[:, chunk], targets[:, chunk] == 1
        aps += [_ap(block[:, j], positive[:, j]) for j in range(len(chunk))]
    return float(np.mean(aps)) if aps else float("nan")


def per_image_metrics(scores: np.ndarray, targets: np.ndarray) -> dict:
    """How images rank a free vocabulary: images whose best-scoring label is correct, and the mean
    over images of the AP of their labels (percent); images without a label are skipped in the AP."""
    scores, targets = _check(scores, targets, "per_image_metrics")
    best = scores.argmax(axis=1)  # ties: the first label
    return {"top1_correct": int(targets[np.arange(len(targets)), best].sum()), "images": int(len(targets)),
            "per_image_AP": 100 * _map(scores.T, targets.T)}


def micro_prf(scores: np.ndarray, targets: np.ndarray, thresholds: np.ndarray) -> dict[str, float]:
    """Decisions ``scores >= thresholds`` (one per column) against the targets, micro over every
    (image, label) pair: precision, recall and F1 in percent, and ``yes_per_true``, how many labels
    were decided per true one (1: as many as are true)."""
    chosen, truth = np.asarray(scores) >= np.asarray(thresholds)[None, :], np.asarray(targets) > 0
    tp = float((chosen & truth).sum())
    precision = 100 * tp / max(chosen.sum(), 1)
    recall = 100 * tp / max(truth.sum(), 1)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": round(precision, 2), "recall": round(recall, 2), "F1": round(f1, 2),
            "yes_per_true": round(float(chosen.sum()) / max(float(truth.sum()), 1.0), 3)}


def top_k_mask(scores: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of each row's k highest scores; ties go to the lower label index (as a stable sort)."""
    kth = -np.partition(-scores, k - 1, axis=1)[:, k - 1 : k]  # k-th largest score of each row
    above, tied = scores > kth, scores == kth
    room = k - above.sum(axis=1, keepdims=True)  # how many tied labels still fit
    return above | (tied & (np.cumsum(tied, axis=1, dtype=np.int32) <= room))


def precision_recall_f1_at_k(scores: np.ndarray, targets: np.ndarray, k: int) -> tuple[float, float, float]:
    """Micro P@k, R@k, F1@k (fractions); k > n_labels ranks all labels but divides by k (the literature's fixed K)."""
    return _prf(*_check(scores, targets, "precision_recall_f1_at_k"), k)


def _prf(scores: np.ndarray, targets: np.ndarray, k: int) -> tuple[float, float, float]:
    """precision_recall_f1_at_k on validated arrays."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ClipDecoderError(f"precision_recall_f1_at_k: k must be a positive integer, got {k!r}")
    n_images, n_labels = scores.shape
    hits = sum(int(targets[start : start + ROWS_PER_CHUNK][top_k_mask(scores[start : start + ROWS_PER_CHUNK],
                                                                       min(int(k), n_labels))].sum())
               for start in range(0, n_images, ROWS_PER_CHUNK))
    n_pos = int(targets.sum(dtype=np.int64))
    p = hits / (k * n_images)
    r = hits / n_pos if n_pos else float("nan")  # recall (and F1) undefined without positives
    f1 = 2 * p * r / (p + r) if p + r > 0 else (0.0 if n_pos else float("nan"))
    return p, r, f1


def multilabel_metrics(scores: np.ndarray, targets: np.ndarray, ks: Sequence[int] = (3, 5)) -> dict:
    """mAP and P@k/R@k/F1@k for each k in ks, in percent, plus n_images and n_labels."""
    return _metrics(*_check(scores, targets, "multilabel_metrics"), ks)


def _metrics(scores: np.ndarray, targets: np.ndarray, ks: Sequence[int]) -> dict:
    """multilabel_metrics on validated arrays."""
    out: dict = {"mAP": 100 * _map(scores, targets)}
    for k in ks:
        p, r, f1 = _prf(scores, targets, k)
        out.update({f"P@{k}": 100 * p, f"R@{k}": 100 * r, f"F1@{k}": 100 * f1})
    out["n_images"], out["n_labels"] = int(scores.shape[0]), int(scores.shape[1])
    out["n_labels_without_positives"] = int(scores.shape[1] - targets.any(axis=0).sum())  # skipped by the mAP
    return out


def _unseen_columns(scores, targets, label_names: list[str], unseen: list[str],
                    where: str) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Validated (scores, targets) and the unseen labels' column indices in label order; raise naming a problem."""
    scores, targets = _check(scores, targets, where)
    names = list(label_names)
    if len(names) != scores.shape[1]:
        raise ClipDecoderError(
            f"{where}: {len(names)} label names but scores/targets have {scores.shape[1]} label columns"
        )
    index = {n: i for i, n in enumerate(names)}
    if len(index) != len(names):
        dup = sorted(n for n, c in Counter(names).items() if c > 1)
        raise ClipDecoderError(f"{where}: duplicate label names {dup}")
    missing = [u for u in unseen if u not in index]
    if missing:
        raise ClipDecoderError(f"{where}: unseen label(s) {missing} not in label_names")
    cols = sorted({index[u] for u in unseen})  # keep original label order so top-k tie-breaking matches GZSL
    if not cols:
        raise ClipDecoderError(f"{where}: the unseen label list is empty, so ZSL is undefined")
    if not targets[:, cols].any():
        raise ClipDecoderError(
            f"{where}: none of the {len(targets)} test images has an unseen label positive, so ZSL is undefined"
        )
    return scores, targets, cols


def _zsl(scores: np.ndarray, targets: np.ndarray, cols: list[int], zsl_images: str, ks: Sequence[int]) -> dict:
    """The ZSL metrics of validated arrays: the unseen columns, over the images ``zsl_images`` names."""
    rows = targets[:, cols].any(axis=1) if zsl_images == "with-unseen" else np.ones(len(targets), dtype=bool)
    return {**_metrics(scores[np.ix_(rows, cols)], targets[np.ix_(rows, cols)], ks), "zsl_images": zsl_images}


def zsl_gzsl_metrics(
    scores: np.ndarray,
    targets: np.ndarray,
    label_names: list[str],
    unseen: list[str],
    ks: Sequence[int] = (3, 5),
    zsl_images: str = "with-unseen",
) -> dict:
    """{"zsl": metrics on the unseen labels over the images ``zsl_images`` names (ZSL_IMAGES), "gzsl": metrics on
    all labels and images}."""
    check_zsl_images(zsl_images, "zsl_gzsl_metrics")
    scores, targets, cols = _unseen_columns(scores, targets, label_names, unseen, "zsl_gzsl_metrics")
    return {"zsl": _zsl(scores, targets, cols, zsl_images, ks), "gzsl": _metrics(scores, targets, ks)}


def zsl_by_images(
    scores: np.ndarray,
    targets: np.ndarray,
    label_names: list[str],
    unseen: list[str],
    ks: Sequence[int] = (3, 5),
) -> dict:
    """{protocol: the ZSL metrics under it} for each protocol of ZSL_IMAGES, from the same scores."""
    scores, targets, cols = _unseen_columns(scores, targets, label_names, unseen, "zsl_by_images")
    return {protocol: _zsl(scores, targets, cols, protocol, ks) for protocol in ZSL_IMAGES}
