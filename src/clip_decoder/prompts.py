"""Prompt templates, label names, prompt ensembling and a cache of label embeddings (in memory and on disk).

Torch-free: the ONNX runtime (onnx_model) embeds labels with the same code; a torch text tower's
output is turned into numpy at the boundary, and ``LabelEmbedder.__call__`` gives torch back.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save

from .atomic import write_file
from .caches import keyed_folder
from .errors import ClipDecoderError

if TYPE_CHECKING:  # this module imports no torch: the ONNX runtime embeds labels through it too
    import torch

    from .encoders.base import TextTower

SINGLE_TEMPLATE: tuple[str, ...] = ("a photo of a {}.",)

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

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {"ensemble": ENSEMBLE_TEMPLATES, "single": SINGLE_TEMPLATE}
DEFAULT_TEMPLATE_SET = "ensemble"  # what models are created and trained with (docs/EXPERIMENTS.md)
DEFAULT_TEMPLATES = TEMPLATE_SETS[DEFAULT_TEMPLATE_SET]


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


def split_labels(texts: Iterable[str]) -> list[str]:
    """Label names from comma-separated texts (a --labels option, the service's form fields), stripped, empty ones dropped."""
    return [part.strip() for text in texts for part in text.split(",") if part.strip()]


class LabelEmbedder:
    """Embeds label names through prompt templates, averaging normalised embeddings.

    Embeddings are cached in memory per (text tower, templates, label), keeping the most recently
    used ``max_entries``; with a ``folder`` they are also kept on disk, one small safetensors file
    per label under ``folder/labels/<key of the tower and templates>``, so a later process finds
    them without running the text tower (which may then never load; encoders.base.TextTower).
    The tower's ``encode`` may return a torch tensor or a numpy array; ``arrays`` gives numpy,
    calling the embedder gives torch.
    """

    def __init__(self, tower: TextTower, max_entries: int = 200_000, folder: str | Path | None = None) -> None:
        self.tower = tower
        self.max_entries = max_entries
        self.folder = None if folder is None else Path(folder)
        self._cache: OrderedDict[tuple[str, tuple[str, ...], str], np.ndarray] = OrderedDict()
        self._folders: dict[tuple[str, ...], Path] = {}  # per template set

    def __call__(self, labels: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        """Embeddings (len(labels), dim) as a float32 torch tensor, L2-normalised, one row per label."""
        import torch

        return torch.from_numpy(self.arrays(labels, templates))

    def arrays(self, labels: Sequence[str], templates: Sequence[str]) -> np.ndarray:
        """Embeddings (len(labels), dim) as a float32 numpy array, L2-normalised, one row per label."""
        labels = check_labels(labels)
        templates = check_templates(templates)
        missing = self.missing(labels, templates)
        if missing:
            prompts = [template.format(label) for label in missing for template in templates]
            encoded = _as_array(self.tower.encode(prompts))
            per_label = encoded.reshape(len(missing), len(templates), -1).mean(axis=1)
            per_label /= np.maximum(np.linalg.norm(per_label, axis=1, keepdims=True), 1e-12)
            for label, embedding in zip(missing, per_label):
                self._cache[(self.tower.name, templates, label)] = embedding
                self._write(templates, label, embedding)
        rows = []
        for key in ((self.tower.name, templates, label) for label in labels):
            self._cache.move_to_end(key)
            rows.append(self._cache[key])
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)
        return np.stack(rows) if rows else np.empty((0, self.tower.dim), dtype=np.float32)

    def missing(self, labels: Sequence[str], templates: Sequence[str]) -> list[str]:
        """The labels among ``labels`` whose embedding through ``templates`` is neither in memory nor on
        disk (those on disk are read into memory), in order."""
        templates = check_templates(templates)
        missing = []
        for label in dict.fromkeys(labels):
            key = (self.tower.name, templates, label)
            if key not in self._cache:
                stored = self._read(templates, label)
                if stored is None:
                    missing.append(label)
                else:
                    self._cache[key] = stored
        return missing

    def __len__(self) -> int:
        return len(self._cache)

    def _entry(self, templates: tuple[str, ...], label: str) -> Path | None:
        if self.folder is None:
            return None
        if templates not in self._folders:
            spec = {"text tower": self.tower.cache_key, "templates": list(templates)}
            self._folders[templates] = keyed_folder(self.folder, "labels", spec)
        return self._folders[templates] / f"{hashlib.sha256(label.encode()).hexdigest()}.safetensors"

    def _read(self, templates: tuple[str, ...], label: str) -> np.ndarray | None:
        """The label's embedding on disk, or None (no folder, not there, or not sound: then it is embedded again)."""
        entry = self._entry(templates, label)
        if entry is None or not entry.is_file():
            return None
        try:
            with safe_open(str(entry), framework="np") as f:
                stored, embedding = (f.metadata() or {}).get("label"), f.get_tensor("embedding")
        except (SafetensorError, OSError, ValueError, RuntimeError):
            return None
        sound = stored == label and embedding.shape == (self.tower.dim,) and bool(np.isfinite(embedding).all())
        return embedding.astype(np.float32) if sound else None

    def _write(self, templates: tuple[str, ...], label: str, embedding: np.ndarray) -> None:
        entry = self._entry(templates, label)
        if entry is not None:  # no fsync: an entry lost in a power cut is embedded again
            write_file(entry, save({"embedding": np.ascontiguousarray(embedding)}, metadata={"label": label}), fsync=False)


def _as_array(encoded) -> np.ndarray:
    """A text tower's output (a torch tensor on any device, or a numpy array) as float32 numpy."""
    if hasattr(encoded, "detach"):
        encoded = encoded.detach().float().cpu().numpy()
    return np.asarray(encoded, dtype=np.float32)
