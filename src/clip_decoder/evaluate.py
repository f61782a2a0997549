"""The ZSL / GZSL evaluation of a model on a test set, and its table."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .data.folder import LabelSplit, Sample, read_part, target_matrix, warn_label_coverage
from .errors import ClipDecoderError
from .feature_store import FeatureStore
from .features import FeatureCache
from .metrics import check_zsl_images, zsl_gzsl_metrics
from .model import CLIPDecoder

METRIC_COLUMNS = ("mAP", "P@3", "R@3", "F1@3", "P@5", "R@5", "F1@5")


def evaluate_model(model: CLIPDecoder, data_dir, split: LabelSplit, cache_dir=None, progress: bool = True,
                   zsl_images: str = "with-unseen", store_dir=None) -> dict:
    """The metrics JSON (contract) of ``model`` on the folder's test part: ZSL (on the images ``zsl_images``
    names, metrics.ZSL_IMAGES) and GZSL.

    With ``store_dir`` the features come from a ``FeatureStore`` there (extracted into it if missing) a
    few hundred rows at a time, and the scores go to a memory-mapped matrix beside the store."""
    check_zsl_images(zsl_images, "evaluate_model")  # before the features are extracted
    if not split.unseen:
        raise ClipDecoderError("the label split has no unseen labels: ZSL needs some to rank")
    samples = read_part(data_dir, "test")
    warn_label_coverage(samples, split, split.all, "test")
    paths = [s.image for s in samples]
    if store_dir is None:
        features = FeatureCache(model.image_tower, cache_dir).get(paths, progress=progress)
        scores_dir = None
    else:
        store = FeatureStore.for_tower(model.image_tower, store_dir)
        features, scores_dir = store.get(paths, progress=progress), store.folder
    kept = [samples[i] for i in features.kept]
    return stored_metrics(model, features.tokens, features.pooled, kept, split, zsl_images, scores_dir)


def stored_metrics(model: CLIPDecoder, tokens, pooled, samples: list[Sample], split: LabelSplit,
                   zsl_images: str = "with-unseen", scores_dir: Path | None = None) -> dict:
    """The metrics JSON of ``model`` on stored features of ``samples`` (tensors, or a store's rows); the
    scores are held in memory, or with ``scores_dir`` in a memory-mapped matrix there."""
    labels = list(split.all)
    targets = target_matrix(samples, labels, dtype=np.int8)
    model.eval()
    out = None if scores_dir is None else score_matrix(scores_dir, (len(samples), len(labels)))
    scores = model.scorer.score_stored(tokens, pooled, model.scorer.vocabulary(labels), out=out)
    return zsl_gzsl_metrics(scores, targets, labels, list(split.unseen), zsl_images=zsl_images)


def score_matrix(folder: Path, shape: tuple[int, int]) -> np.ndarray:
    """A float32 matrix of ``shape`` memory-mapped from a file in ``folder``, its space allocated first (a full disk
    is then one error, not a crash on a later write); the file is unlinked at once, so it goes with the process."""
    path = Path(folder) / f".scores.{os.getpid()}.tmp"
    try:
        with open(path, "wb") as file:
            os.posix_fallocate(file.fileno(), 0, max(1, shape[0] * shape[1] * 4))
        scores = np.memmap(path, dtype=np.float32, mode="r+", shape=shape)
    except OSError as error:
        raise ClipDecoderError(f"cannot write the score matrix {path} ({shape[0]} x {shape[1]} float32):"
                               f" {error.strerror or error}") from error
    finally:
        path.unlink(missing_ok=True)
    return scores


def format_table(rows: dict[str, dict]) -> str:
    """A markdown table: one row per name, ZSL and GZSL metric columns (percent)."""
    header = "| | " + " | ".join(f"ZSL {c}" for c in METRIC_COLUMNS) + " | " + " | ".join(
        f"GZSL {c}" for c in METRIC_COLUMNS
    ) + " |"
    lines = [header, "|---" * (1 + 2 * len(METRIC_COLUMNS)) + "|"]
    for name, metrics in rows.items():
        cells = [f"{metrics[part][c]:.1f}" for part in ("zsl", "gzsl") for c in METRIC_COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
