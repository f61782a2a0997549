"""Frozen image-tower features on disk, so each image goes through the tower once.

Two sources keep them, keyed by the tower (name, preprocessing, weights) and the file's content:
``FeatureCache`` (``cache.py``), one safetensors file per image, read into memory; and
``FeatureStore`` (``store.py``), memory-mapped shards for datasets larger than memory. Both are a
``FeatureSource``; ``FeatureLocation`` says which one a command uses and opens it, so training,
evaluation, calibration and the benchmark take either.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from ..distributed import World
from ..encoders import ImageTower
from .cache import FeatureCache
from .common import Features, default_cache_dir, encoded_batches, file_key, file_keys, first_of_each_content
from .store import FeatureStore, StoredRows, StoreWriter


class FeatureSource(Protocol):
    """What the cache and the store both provide."""

    folder: Path  # where this tower's features are
    encoded: int  # images run through the tower by this object

    def get(self, paths: list[Path], progress: bool = True, report: bool = True) -> Features:
        """Features of ``paths`` (extracting those not kept yet); unreadable images are left out (and
        reported on stderr if ``report``); none readable is an error."""
        ...

    def extract_missing(self, paths: list[Path], world: World = World(), progress: bool = True) -> dict[int, str]:
        """Run the first file of each content among ``paths`` not kept yet, or under torchrun this rank's share
        of them, through the tower (every rank calls it); {index into ``paths``: error} of those that failed."""
        ...

    def remove_leftovers(self) -> None:
        """Delete what killed writers left (while no other process writes here)."""
        ...

    def score_matrix(self, shape: tuple[int, int]) -> np.ndarray | None:
        """Where the scores of ``shape`` images x labels of these features go: None for memory, or a
        memory-mapped matrix beside a store that holds more than memory would."""
        ...


@dataclass(frozen=True)
class FeatureLocation:
    """Where a command keeps features: the per-image cache under ``cache`` (default folder if None),
    or with ``store`` a feature store under that folder."""

    cache: str | Path | None = None
    store: str | Path | None = None

    def open(self, tower: ImageTower, decode_workers: int | None = None) -> FeatureSource:
        if self.store is not None:
            return FeatureStore.for_tower(tower, self.store, decode_workers)
        return FeatureCache(tower, self.cache, decode_workers)


__all__ = ["FeatureCache", "FeatureLocation", "FeatureSource", "FeatureStore", "Features", "StoreWriter", "StoredRows",
           "default_cache_dir", "encoded_batches", "file_key", "file_keys", "first_of_each_content"]
