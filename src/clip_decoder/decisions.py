"""Decisions: which of an image's scored labels it gets (top-K, a threshold, per-label thresholds)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import ClipDecoderError
from .thresholds import Thresholds


class Decider:
    """Turns one image's scores into the labels it gets, highest score first.

    With ``top_k`` only: the K best labels. With thresholds: the labels at or above their own
    threshold (``thresholds``; a label without one gets ``threshold`` if given, else the thresholds'
    own fallback: thresholds.Thresholds.for_labels), and at most ``top_k`` of them when both are
    given. With neither, no decision is made. ``for_options`` is what predict and serve decide by.
    """

    @classmethod
    def for_options(cls, model_rule: Thresholds, top_k: int | None = None, threshold: float | None = None,
                    thresholds: Thresholds | None = None) -> Decider:
        """The decision the options ask for; with none, the model's default rule (``model_rule``:
        ModelConfig.default_thresholds). Labels without a threshold of their own in a plain thresholds
        file get the model's rule too (or ``threshold``)."""
        if top_k is None and threshold is None and thresholds is None:
            return cls(thresholds=model_rule)
        return cls(top_k, threshold, thresholds.falling_back_to(model_rule) if thresholds is not None else None)

    def __init__(self, top_k: int | None = None, threshold: float | None = None,
                 thresholds: Thresholds | None = None) -> None:
        if top_k is not None and top_k < 1:
            raise ClipDecoderError(f"--top-k must be at least 1, got {top_k}")
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise ClipDecoderError(f"--threshold must be in [0, 1], got {threshold}")
        self.top_k, self.threshold, self.thresholds = top_k, threshold, thresholds
        self._cut: tuple[tuple[str, ...], np.ndarray] | None = None  # the last vocabulary's thresholds

    @property
    def active(self) -> bool:
        return self.top_k is not None or self.thresholded

    @property
    def thresholded(self) -> bool:
        return self.threshold is not None or self.thresholds is not None

    def cuts(self, labels: Sequence[str]) -> np.ndarray:
        """Each label's threshold (computed once per vocabulary)."""
        labels = tuple(labels)
        if self._cut is None or self._cut[0] != labels:
            self._cut = (labels, (self.thresholds or Thresholds()).for_labels(labels, self.threshold))
        return self._cut[1]

    def __call__(self, labels: Sequence[str], scores: np.ndarray) -> list[str]:
        order = sorted(range(len(labels)), key=lambda i: -float(scores[i]))
        if self.thresholded:
            cuts = self.cuts(labels)
            order = [i for i in order if scores[i] >= cuts[i]]
        return [labels[i] for i in order[: self.top_k]]
