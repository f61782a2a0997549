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

DEFAULT_THRESHOLD = 0.5  # sigmoid(0): where a logit changes sign; for labels without a threshold of their own


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


def _checked(path: str | Path, values: dict) -> dict[str, float]:
    for label, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ClipDecoderError(f"thresholds file {path}: threshold of {label!r} must be a number in [0, 1], got {value!r}")
    return {label: float(value) for label, value in values.items()}


def write_thresholds(path: str | Path, table: dict) -> Path:
    """Write a thresholds table atomically (a failed write leaves the previous file)."""
    write_file(path, json.dumps(table, indent=2, ensure_ascii=False) + "\n")
    return Path(path)
