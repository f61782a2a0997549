"""Decision thresholds per label: the one reader (and writer) of a thresholds file.

Two forms are read: a plain ``{label: T}`` object, and the table ``clip-decoder calibrate`` writes
beside a model (``thresholds.json``): ``{"labels": {label: T}, "default": T, "new_labels": T,
"trained_labels": [...], ...}``. In the calibrated form a label without its own threshold gets
``default`` if the model was trained on it and ``new_labels`` if not: the seen labels' default does
not transfer to new labels, which score lower (docs/CALIBRATION.md). In the plain form it gets
the fallback the caller gives (``predict --threshold``, else 0.5).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .atomic import write_file
from .errors import ClipDecoderError

DEFAULT_THRESHOLD = 0.5  # sigmoid(0): where a logit changes sign; what models from before their own rule use
# A model's default decision for the labels it was not trained on: no labelled data exists for them, so
# it was chosen on held-out labels (nested splits of the seen labels) and the dev photos, for models
# whose prior weight grows with the classifier's confidence (format 5; docs/EXPERIMENTS.md). Trained labels
# get the model's own threshold.
NEW_LABEL_THRESHOLD = 0.86  # about sigmoid(1.82)


@dataclass(frozen=True)
class Thresholds:
    """Per-label thresholds, and what a label without its own gets."""

    labels: Mapping[str, float] = field(default_factory=dict)
    default: float | None = None  # for the trained labels without their own (calibrated form)
    new_labels: float | None = None  # for the labels the model was not trained on (calibrated form)
    trained_labels: frozenset[str] = frozenset()

    def for_labels(self, labels: Sequence[str], fallback: float | None = None) -> np.ndarray:
        """One threshold per label: its own; else, with ``fallback`` (``--threshold``) given, that; else the
        calibrated default (trained labels) or new-label threshold (the others); else DEFAULT_THRESHOLD."""
        def threshold(label: str) -> float:
            if label in self.labels:
                return self.labels[label]
            if fallback is not None:
                return fallback
            calibrated = self.default if label in self.trained_labels else self.new_labels
            return DEFAULT_THRESHOLD if calibrated is None else calibrated

        return np.array([threshold(label) for label in labels], dtype=np.float64)

    def falling_back_to(self, rule: Thresholds) -> Thresholds:
        """These thresholds; in the plain form (no fallbacks of its own), a label without its own threshold
        gets ``rule``'s (a model's default decision)."""
        if self.default is not None or self.new_labels is not None:
            return self
        return Thresholds({**rule.labels, **self.labels}, rule.default, rule.new_labels, rule.trained_labels)

    @classmethod
    def read(cls, path: str | Path) -> Thresholds:
        """A thresholds file of either form, checked; any problem is one error naming the file."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8-sig"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ClipDecoderError(f"cannot read thresholds file {path}: {error}") from error
        return cls.from_dict(data, path)

    @classmethod
    def from_dict(cls, data, path: str | Path = "thresholds") -> Thresholds:
        """Thresholds of either form from parsed JSON; problems are named as ``path``'s."""
        if not isinstance(data, dict):
            raise ClipDecoderError(f"thresholds file {path}: expected a JSON object {{label: threshold}}")
        if not isinstance(data.get("labels"), dict):  # the plain form
            return cls(_checked(path, data))
        fallbacks = _checked(path, {key: data[key] for key in ("default", "new_labels") if key in data})
        trained = data.get("trained_labels", [])
        if not isinstance(trained, list) or not all(isinstance(label, str) for label in trained):
            raise ClipDecoderError(f"thresholds file {path}: 'trained_labels' must be a list of label names")
        return cls(_checked(path, data["labels"]), fallbacks.get("default"), fallbacks.get("new_labels"), frozenset(trained))


def model_rule(trained_labels: Sequence[str], decision_threshold: float | None) -> Thresholds:
    """A model's default decision (``predict`` and ``serve`` with no decision option): its trained labels at
    ``decision_threshold``, every other label at NEW_LABEL_THRESHOLD; a model without a threshold of its own
    (from before them) decides at DEFAULT_THRESHOLD."""
    if decision_threshold is None:
        return Thresholds()
    return Thresholds(default=decision_threshold, new_labels=NEW_LABEL_THRESHOLD, trained_labels=frozenset(trained_labels))


def best_threshold(scores: np.ndarray, targets: np.ndarray) -> tuple[float, float]:
    """(threshold, F1): the score cut ``score >= threshold`` with the best F1 (ties: the higher cut)."""
    scores, targets = np.asarray(scores, dtype=np.float64).ravel(), np.asarray(targets).ravel() > 0
    positives = int(targets.sum())
    if positives == 0:
        raise ClipDecoderError("cannot choose a threshold without a positive example")
    order = np.argsort(-scores, kind="stable")
    sorted_scores, hits = scores[order], np.cumsum(targets[order])
    kept = np.arange(1, len(scores) + 1)
    last = np.r_[sorted_scores[1:] != sorted_scores[:-1], True]  # cut only between distinct scores
    f1 = np.where(last, 2 * hits / (kept + positives), -1.0)
    best = int(np.argmax(f1))
    return float(sorted_scores[best]), float(f1[best])


def _checked(path: str | Path, values: dict) -> dict[str, float]:
    for label, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ClipDecoderError(f"thresholds file {path}: threshold of {label!r} must be a number in [0, 1], got {value!r}")
    return {label: float(value) for label, value in values.items()}


def write_thresholds(path: str | Path, table: dict) -> Path:
    """Write a thresholds table atomically (a failed write leaves the previous file)."""
    write_file(path, json.dumps(table, indent=2, ensure_ascii=False) + "\n")
    return Path(path)
