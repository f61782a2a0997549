"""The ZSL / GZSL evaluation of a model on a test set, and its table."""

from __future__ import annotations

import numpy as np

from .data.folder import LabelSplit, Sample, read_part, target_matrix, warn_label_coverage
from .errors import ClipDecoderError
from .features import FeatureLocation
from .metrics import check_zsl_images, zsl_gzsl_metrics
from .model import CLIPDecoder

METRIC_COLUMNS = ("mAP", "P@3", "R@3", "F1@3", "P@5", "R@5", "F1@5")


def evaluate_model(model: CLIPDecoder, data_dir, split: LabelSplit, features: FeatureLocation = FeatureLocation(),
                   progress: bool = True, zsl_images: str = "with-unseen") -> dict:
    """The metrics JSON (contract) of ``model`` on the folder's test part: ZSL (on the images ``zsl_images``
    names, metrics.ZSL_IMAGES) and GZSL.

    From a feature store (``features.store``) the features are read a few hundred rows at a time and the
    scores go to a memory-mapped matrix beside the store."""
    check_zsl_images(zsl_images, "evaluate_model")  # before the features are extracted
    if not split.unseen:
        raise ClipDecoderError("the label split has no unseen labels: ZSL needs some to rank")
    samples = read_part(data_dir, "test")
    warn_label_coverage(samples, split, split.all, "test")
    source = features.open(model.image_tower)
    got = source.get([s.image for s in samples], progress=progress)
    kept = [samples[i] for i in got.kept]
    out = source.score_matrix((len(kept), len(split.all)))
    return stored_metrics(model, got.tokens, got.pooled, kept, split, zsl_images, out)


def stored_metrics(model: CLIPDecoder, tokens, pooled, samples: list[Sample], split: LabelSplit,
                   zsl_images: str = "with-unseen", out: np.ndarray | None = None) -> dict:
    """The metrics JSON of ``model`` on stored features of ``samples`` (tensors, or a store's rows); the
    scores are held in memory, or written into ``out`` (images x labels, e.g. memory-mapped)."""
    labels = list(split.all)
    targets = target_matrix(samples, labels, dtype=np.int8)
    model.eval()
    scores = model.scorer.score_stored(tokens, pooled, model.scorer.vocabulary(labels), out=out)
    return zsl_gzsl_metrics(scores, targets, labels, list(split.unseen), zsl_images=zsl_images)


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
