"""Per-label decision thresholds chosen on labelled validation images, stored with the model.

For each label with at least ``min_positives`` positive validation images, the threshold is the
one that maximises that label's F1 there. The other training labels get the default: the single
threshold that maximises micro-F1 over all validation labels. Labels the model never saw get
thresholds.NEW_LABEL_THRESHOLD, the models' default for them: no labelled data exists to choose
it here (docs/CALIBRATION.md).
Written as ``thresholds.json`` beside the model (``ModelFolder.write_thresholds``), read by
``predict --calibrated`` through ``thresholds.Thresholds``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .data.folder import LabelSplit, read_part, target_matrix, training_parts
from .errors import ClipDecoderError
from .features import FeatureLocation
from .metrics import micro_prf
from .model import CLIPDecoder
from .thresholds import NEW_LABEL_THRESHOLD, Thresholds, best_threshold

MIN_POSITIVES = 5


def calibrate(scores: np.ndarray, targets: np.ndarray, labels: Sequence[str], min_positives: int = MIN_POSITIVES) -> dict:
    """The thresholds JSON for validation scores/targets (n_images, n_labels)."""
    if scores.shape != targets.shape or scores.shape[1] != len(labels):
        raise ClipDecoderError(f"calibrate: scores {scores.shape}, targets {targets.shape} and {len(labels)} labels disagree")
    default, _ = best_threshold(scores, targets)
    per_label = {}
    for column, label in enumerate(labels):
        if (targets[:, column] > 0).sum() >= min_positives:
            per_label[label] = round(best_threshold(scores[:, column], targets[:, column])[0], 6)
    return {"default": round(default, 6), "new_labels": NEW_LABEL_THRESHOLD, "labels": per_label,
            "trained_labels": list(labels), "min_positives": min_positives, "validation_images": int(scores.shape[0])}


def calibrate_model(model: CLIPDecoder, data_dir: str | Path, split: LabelSplit,
                    features: FeatureLocation = FeatureLocation(), val_fraction: float = 0.1, progress: bool = True) -> dict:
    """Choose thresholds on the folder's validation part (seen labels only) and measure them on
    its test part: the thresholds JSON with a ``held_out`` section (micro P/R/F1 in percent)."""
    source = features.open(model.image_tower)
    model.eval()

    def scored(samples, labels):
        got = source.get([s.image for s in samples], progress=progress)
        scores = model.scorer.score_stored(got.tokens, got.pooled, model.scorer.vocabulary(labels))
        return scores, target_matrix([samples[i] for i in got.kept], labels)

    _, val_samples = training_parts(data_dir, val_fraction)
    seen, everything = list(split.seen), list(split.all)
    table = calibrate(*scored(val_samples, seen), seen)
    thresholds, default_rule = Thresholds.from_dict(table), model.config.default_thresholds()
    test_scores, test_targets = scored(read_part(data_dir, "test"), everything)
    columns = {"seen": [everything.index(label) for label in seen],
               "unseen": [everything.index(label) for label in split.unseen], "all": list(range(len(everything)))}
    table["held_out"] = {
        name: {"own thresholds": micro_prf(test_scores[:, cols], test_targets[:, cols],
                                           thresholds.for_labels([everything[c] for c in cols])),
               "the model's default rule": micro_prf(test_scores[:, cols], test_targets[:, cols],
                                                      default_rule.for_labels([everything[c] for c in cols])),
               "0.5 everywhere": micro_prf(test_scores[:, cols], test_targets[:, cols], np.full(len(cols), 0.5))}
        for name, cols in columns.items() if cols
    }
    table["held_out"]["test_images"] = int(test_scores.shape[0])
    return table
