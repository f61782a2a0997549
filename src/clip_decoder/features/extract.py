"""``clip-decoder extract``: a dataset folder's images through the frozen image tower into a feature store.

Runs as one process, or as one rank of a torchrun job: each rank encodes its share of the images
not stored yet, so every image goes through the tower once. ``train --store`` and
``evaluate --store`` then find them there (and would extract what is missing themselves, but
evaluate in one process).
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..data.folder import read_part
from ..decoding import DEFAULT_BATCH_SIZE
from ..distributed import close_world, init_world, local_device
from ..encoders import ImageTower
from ..errors import ClipDecoderError
from .store import FeatureStore

PARTS = ("train", "val", "test")


def extract_features(data_dir: str | Path, store_dir: str | Path, tower: ImageTower, parts: tuple[str, ...] = PARTS,
                     progress: bool = True, batch_size: int = DEFAULT_BATCH_SIZE) -> dict:
    """Extract the images of the folder's ``parts`` (those it has; val.csv is optional) into the store of
    ``tower`` under ``store_dir``, ``batch_size`` images per forward; returns {"images": stored in all,
    "encoded_per_process": [...]}."""
    if batch_size < 1:
        raise ClipDecoderError(f"batch_size must be at least 1, got {batch_size}")
    world = init_world()
    try:
        tower.to(local_device())
        store = FeatureStore.for_tower(tower, store_dir)
        world.main_first(store.remove_leftovers)  # before any rank writes to it
        for part in parts:
            if part == "val" and not (Path(data_dir) / "val.csv").is_file():
                continue
            paths = [sample.image for sample in read_part(data_dir, part)]
            failed = store.extract_missing(paths, world, progress=progress and world.is_main, batch_size=batch_size)
            for message in failed.values():
                print(f"error: {message}", file=sys.stderr)
            world.barrier()
        store.refresh()
        return {"images": len(store), "folder": str(store.folder),
                "encoded_per_process": world.all_gather_objects(store.encoded)}
    finally:
        close_world(world)
