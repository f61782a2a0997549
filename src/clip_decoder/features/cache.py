"""A disk cache of frozen image-tower features: each image is encoded once.

Entries live under ``<root>/<tower key>/<sha256 of the file>.safetensors`` where the tower key
hashes the tower's name, preprocessing and weights, so a changed backbone, preprocessing or
fine-tuned tower never reuses stale features. Tokens are stored in float16 (half the disk, scores
move by ~1e-3), the pooled vector in float32. Entries are written atomically (temporary file,
rename): a kill or a full disk leaves no half entry, and a failed write is one error naming it. An entry that is unreadable, has the wrong keys, shapes or dtypes, non-finite values,
or was written for other file content is reported and recomputed, never used.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from tqdm.auto import tqdm

from ..atomic import remove_leftovers, write_file
from ..decoding import DEFAULT_BATCH_SIZE
from ..distributed import World
from ..encoders import ImageTower
from .common import Features, encoded_batches, file_keys, first_of_each_content, kept_indices, tower_folder


class FeatureCache:
    """Image-tower features on disk, keyed by tower, preprocessing and file content."""

    def __init__(
        self, tower: ImageTower, root: str | Path | None = None, decode_workers: int | None = None
    ) -> None:
        self.tower = tower
        self.decode_workers = decode_workers  # threads decoding ahead of the tower; 0: in turn; None: by device
        self.folder = tower_folder(tower, root, "features")
        self.encoded = 0  # images run through the tower by this cache object
        self.rebuilt = 0  # entries found corrupt or stale and recomputed

    def _read(self, entry: Path) -> dict[str, torch.Tensor] | None:
        """The entry's tensors if it exists and is sound; None if it is missing or must be rebuilt."""
        if not entry.is_file():
            return None
        try:
            with safe_open(str(entry), framework="pt") as f:
                source = (f.metadata() or {}).get("source_sha256")
                tensors = {key: f.get_tensor(key) for key in f.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError):  # RuntimeError: replaced while being opened
            tensors, source = {}, None
        if source == entry.stem and self._sound(tensors):
            return tensors
        self.rebuilt += 1
        print(f"warning: feature cache entry {entry} is corrupt or stale; recomputing it", file=sys.stderr)
        return None

    def _sound(self, tensors: dict[str, torch.Tensor]) -> bool:
        """Whether an entry holds finite (N, dim) float16 tokens and a (dim,) float32 pooled vector."""
        tokens, pooled = tensors.get("tokens"), tensors.get("pooled")
        return (
            tokens is not None and pooled is not None and set(tensors) == {"tokens", "pooled"}
            and tokens.dtype == torch.float16 and tokens.ndim == 2 and tokens.shape[0] > 0
            and tokens.shape[1] == self.tower.dim and pooled.dtype == torch.float32
            and tuple(pooled.shape) == (self.tower.dim,)
            and bool(torch.isfinite(tokens).all()) and bool(torch.isfinite(pooled).all())
        )

    def _write(self, entry: Path, tokens: torch.Tensor, pooled: torch.Tensor) -> None:
        # No fsync: an entry lost in a power cut is found corrupt and recomputed.
        write_file(entry, save({"tokens": tokens.half().contiguous(), "pooled": pooled.float().contiguous()},
                               metadata={"source_sha256": entry.stem}), fsync=False)

    def remove_leftovers(self) -> None:
        """Delete the temporary files of writes that were killed part way."""
        remove_leftovers(self.folder)

    def score_matrix(self, shape: tuple[int, int]) -> np.ndarray | None:
        return None  # the features are in memory, and so are their scores

    def extract_missing(self, paths: list[Path], world: World = World(), progress: bool = True) -> dict[int, str]:
        """Encode the first file of each content among ``paths`` that has no entry yet, or under torchrun this
        rank's share of them (every rank lists them before any writes); {index into ``paths``: error} of
        those that could not be decoded."""
        keys, _ = file_keys(paths)
        missing = [index for index in first_of_each_content(keys) if not self._entry(keys[index]).is_file()]
        world.barrier()
        return self._encode(paths, world.shard(missing), keys, DEFAULT_BATCH_SIZE, progress)

    @torch.inference_mode()
    def get(self, paths: list[Path], batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = True,
            report: bool = True) -> Features:
        """Features for ``paths``; unreadable images are left out (and reported on stderr if ``report``)."""
        keys, failed = file_keys(paths)
        stored = {key: tensors for key in set(keys.values()) if (tensors := self._read(self._entry(key))) is not None}
        missing = first_of_each_content(keys, stored)
        encoded = {}
        failed.update(self._encode(paths, missing, keys, batch_size, progress, encoded))
        stored.update(encoded)
        failed_keys = {keys[index]: message for index, message in failed.items() if index in keys}
        for index, key in keys.items():  # the other copies of content that failed above
            if key not in stored and index not in failed:
                failed[index] = failed_keys[key]
        kept = kept_indices(len(paths), failed, report)
        return Features(tokens=torch.stack([stored[keys[i]]["tokens"] for i in kept]),
                        pooled=torch.stack([stored[keys[i]]["pooled"] for i in kept]), kept=kept, failed=failed)

    def _entry(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def _encode(self, paths: list[Path], wanted: list[int], keys: dict[int, str], batch_size: int, progress: bool,
                encoded: dict[str, dict[str, torch.Tensor]] | None = None) -> dict[int, str]:
        """Run ``paths[i]`` for i in ``wanted`` through the tower into new entries (and ``encoded``, by key, when
        given); returns {index: error} of those that could not be decoded."""
        failed = {}
        # In a with block, the bar ends its line even when a write fails: the error is then a line of its own.
        with tqdm(total=len(wanted), desc="extract features", unit="img", disable=not progress or not wanted) as bar:
            sources = [paths[index] for index in wanted]
            for indices, failures, tokens, pooled in encoded_batches(self.tower, sources, batch_size, self.decode_workers):
                failed.update({wanted[k]: message for k, message in failures.items()})
                for row, k in enumerate(indices):
                    key = keys[wanted[k]]
                    self._write(self._entry(key), tokens[row], pooled[row])
                    if encoded is not None:
                        encoded[key] = {"tokens": tokens[row], "pooled": pooled[row]}
                self.encoded += len(indices)
                bar.update(len(indices) + len(failures))
        return failed
