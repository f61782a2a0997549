"""Prompt templates, prompt ensembling and a cache of label embeddings."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch.nn import functional as F

from .encoders.base import TextTower
from .errors import ClipDecoderError

DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)

# A small ensemble in the spirit of CLIP's ImageNet prompts.
ENSEMBLE_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a close-up photo of a {}.",
    "a drawing of a {}.",
    "a photo showing {}.",
)

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {"default": DEFAULT_TEMPLATES, "ensemble": ENSEMBLE_TEMPLATES}
DEFAULT_TEMPLATE_SET = "ensemble"  # what models are created and trained with (docs/EXPERIMENTS.md)


def check_templates(templates: Sequence[str]) -> tuple[str, ...]:
    """Return templates as a tuple; each must hold exactly one '{}' slot for the label."""
    templates = tuple(templates)
    if not templates:
        raise ClipDecoderError("no prompt templates given")
    for template in templates:
        if not isinstance(template, str) or template.count("{}") != 1:
            raise ClipDecoderError(
                f"prompt template {template!r} must contain exactly one '{{}}' for the label"
            )
    return templates


def check_labels(labels: Sequence[str]) -> list[str]:
    """Return labels as a list of names; reject empty names, non-strings and repeats."""
    if isinstance(labels, str):
        raise ClipDecoderError("labels must be a list of names, not one string")
    labels = list(labels)
    seen: set[str] = set()
    for label in labels:
        if not isinstance(label, str) or not label.strip():
            raise ClipDecoderError(f"label {label!r} is not a non-empty string")
        if label in seen:
            raise ClipDecoderError(f"label {label!r} is given twice")
        seen.add(label)
    return labels


def describe(labels: Sequence[str]) -> str:
    """A sentence naming an image's labels, for the alignment loss: 'a photo of sky, car and road.'"""
    labels = list(labels)
    if not labels:
        return "a photo."
    if len(labels) == 1:
        return f"a photo of {labels[0]}."
    return f"a photo of {', '.join(labels[:-1])} and {labels[-1]}."


class LabelEmbedder:
    """Embeds label names through prompt templates, averaging normalised embeddings.

    Embeddings are cached per (text tower, templates, label), so a vocabulary is embedded once;
    the cache keeps the most recently used ``max_entries`` labels.
    """

    def __init__(self, tower: TextTower, max_entries: int = 200_000) -> None:
        self.tower = tower
        self.max_entries = max_entries
        self._cache: OrderedDict[tuple[str, tuple[str, ...], str], torch.Tensor] = OrderedDict()

    def __call__(self, labels: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES) -> torch.Tensor:
        """Embeddings (len(labels), dim), L2-normalised, one row per label."""
        labels = check_labels(labels)
        templates = check_templates(templates)
        keys = [(self.tower.name, templates, label) for label in labels]
        missing = self.missing(labels, templates)
        if missing:
            prompts = [template.format(label) for label in missing for template in templates]
            encoded = self.tower.encode(prompts).float().cpu()
            per_label = encoded.view(len(missing), len(templates), -1).mean(dim=1)
            for label, embedding in zip(missing, F.normalize(per_label, dim=-1)):
                self._cache[(self.tower.name, templates, label)] = embedding
        rows = []
        for key in keys:
            self._cache.move_to_end(key)
            rows.append(self._cache[key])
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)
        return torch.stack(rows) if rows else torch.empty(0, self.tower.dim)

    def missing(self, labels: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES) -> list[str]:
        """The labels among ``labels`` whose embedding through ``templates`` is not cached yet, in order."""
        templates = check_templates(templates)
        return list(dict.fromkeys(label for label in labels if (self.tower.name, templates, label) not in self._cache))

    def __len__(self) -> int:
        return len(self._cache)
