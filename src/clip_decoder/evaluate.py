"""The ZSL / GZSL evaluation of a model on a test set, and its table."""

from __future__ import annotations

from .data.folder import LabelSplit, read_part, target_matrix, warn_label_coverage
from .errors import ClipDecoderError
from .features import FeatureCache
from .metrics import check_zsl_images, zsl_gzsl_metrics
from .model import CLIPDecoder

METRIC_COLUMNS = ("mAP", "P@3", "R@3", "F1@3", "P@5", "R@5", "F1@5")


def evaluate_model(model: CLIPDecoder, data_dir, split: LabelSplit, cache_dir=None, progress: bool = True,
                   zsl_images: str = "with-unseen") -> dict:
    """The metrics JSON (contract) of ``model`` on the folder's test part: ZSL (on the images ``zsl_images``
    names, metrics.ZSL_IMAGES) and GZSL."""
    check_zsl_images(zsl_images, "evaluate_model")  # before the features are extracted
    if not split.unseen:
        raise ClipDecoderError("the label split has no unseen labels: ZSL needs some to rank")
    samples = read_part(data_dir, "test")
    warn_label_coverage(samples, split, split.all, "test")
    features = FeatureCache(model.image_tower, cache_dir).get([s.image for s in samples], progress=progress)
    labels = list(split.all)
    targets = target_matrix([samples[i] for i in features.kept], labels)
    model.eval()
    scores = model.scorer.score_stored(features.tokens, features.pooled, model.scorer.vocabulary(labels))
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
