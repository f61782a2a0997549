"""A sharded feature store: a whole dataset's frozen-tower features on disk, read a batch at a time.

``FeatureCache`` keeps one file per image and hands back every feature stacked in memory: right
for predict and small sets, not for NUS-WIDE (161,789 training images of 49 x 1280 float16
tokens, ~20 GB, in every process). A ``FeatureStore`` keeps the same features (float16 tokens,
float32 pooled, keyed by the sha256 of the image file) in shards of ``SHARD_ROWS`` images under
``<root>/store/<tower key>/`` (the cache's tower key), three files a shard, named by one id:

    <id>.tokens.npy   (rows, N, D) float16
    <id>.pooled.npy   (rows, D) float32
    <id>.json         {"format": 1, "rows": n, "keys": [sha256 of each row's source file, ...]}

Shards are numpy ``.npy`` files opened with ``np.load(mmap_mode="r", allow_pickle=False)``: opening
reads only the header, a batch's rows are gathered from the mapping with one fancy index per
shard, and the mapped pages are the kernel's page cache, shared by every process on the node and
dropped under memory pressure, not memory of the process. safetensors (the cache's format) reads
contiguous slices only, so a shuffled batch would be one call per row; .npy is plain numpy, and
loading never unpickles.

Writes are the extraction's: rows are added as the tower produces them and a full shard (or the
last one) is written atomically, its two arrays first and its manifest last, so a manifest marks a
complete shard. An interrupted extraction loses at most each writer's unfinished shard; the next
one skips every stored key (resumable, like the cache). Under torchrun every rank writes its own
shards of its share of the images; the index is the union of the manifests, read when the store
is opened, so there is nothing to merge. A shard whose files are missing, truncated or of another
shape or dtype is refused with an error naming the file (not recomputed: a store is large; delete
the shard's three files to extract its images again).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..atomic import remove_leftovers, write_file
from ..caches import SPEC_FILE
from ..decoding import DEFAULT_BATCH_SIZE
from ..distributed import World
from ..encoders import ImageTower
from ..errors import ClipDecoderError
from .common import Features, encoded_batches, file_keys, first_of_each_content, kept_indices, tower_folder

SHARD_ROWS = 1024  # images per shard: 128 MB of offline-tower tokens, 300 MB of ViT-B/16's
FORMAT = 1


@dataclass
class Shard:
    """One complete shard: its memory-mapped arrays and the keys of its rows."""

    tokens: np.ndarray  # (rows, N, D) float16, memory-mapped
    pooled: np.ndarray  # (rows, D) float32, memory-mapped
    keys: list[str]


class StoredRows:
    """Rows of a store (tokens or pooled) in the order asked for, read on indexing.

    Stands where an in-memory tensor did: ``len``, ``shape`` and ``[rows]`` (a slice, or a tensor or
    array of row numbers), which returns a tensor holding just those rows.
    """

    def __init__(self, arrays: list[np.ndarray], shard: np.ndarray, row: np.ndarray) -> None:
        self.arrays, self.shard, self.row = arrays, shard, row  # row i is arrays[shard[i]][row[i]]

    def __len__(self) -> int:
        return len(self.shard)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.arrays[0].shape[1:])

    def __getitem__(self, index) -> torch.Tensor:
        wanted = np.arange(len(self))[index] if isinstance(index, slice) else np.asarray(index, dtype=np.int64)
        shards, rows = self.shard[wanted], self.row[wanted]
        out = np.empty((len(wanted), *self.arrays[0].shape[1:]), dtype=self.arrays[0].dtype)
        for shard in np.unique(shards):
            mine = shards == shard
            out[mine] = self.arrays[shard][rows[mine]]
        return torch.from_numpy(out)


def _npy(array: np.ndarray) -> list:
    """An .npy file's contents as [header, the array's own buffer]: written without a copy of the array."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(array))
    return [header.getvalue(), np.ascontiguousarray(array)]


class StoreWriter:
    """Adds rows to a store, one atomically written shard per ``shard_rows`` rows; ``flush`` writes the last.

    Rows are copied into one shard-sized buffer per array as they come: a writer holds one shard.
    """

    def __init__(self, store: FeatureStore, shard_rows: int = SHARD_ROWS) -> None:
        self.store, self.shard_rows = store, shard_rows
        self.keys: list[str] = []
        self.tokens = self.pooled = None  # the buffers, allocated with the first rows
        self.written = 0  # rows written to shards by this writer

    def add(self, keys: list[str], tokens: torch.Tensor | np.ndarray, pooled: torch.Tensor | np.ndarray) -> None:
        """Rows for ``keys``: tokens (n, N, D) float16, pooled (n, D) float32."""
        tokens, pooled = np.asarray(tokens, dtype=np.float16), np.asarray(pooled, dtype=np.float32)
        if self.tokens is None:
            self.tokens = np.empty((self.shard_rows, *tokens.shape[1:]), dtype=np.float16)
            self.pooled = np.empty((self.shard_rows, *pooled.shape[1:]), dtype=np.float32)
        start = 0
        while start < len(keys):
            end = min(len(keys), start + self.shard_rows - len(self.keys))
            filled = len(self.keys)
            self.tokens[filled : filled + end - start] = tokens[start:end]
            self.pooled[filled : filled + end - start] = pooled[start:end]
            self.keys += keys[start:end]
            if len(self.keys) == self.shard_rows:
                self.flush()
            start = end

    def flush(self) -> None:
        """Write the rows added so far as one shard."""
        if not self.keys:
            return
        rows, folder = len(self.keys), self.store.folder
        name = hashlib.sha256("\n".join(self.keys).encode()).hexdigest()[:20]
        write_file(folder / f"{name}.tokens.npy", _npy(self.tokens[:rows]))
        write_file(folder / f"{name}.pooled.npy", _npy(self.pooled[:rows]))
        manifest = {"format": FORMAT, "rows": rows, "keys": self.keys}
        write_file(folder / f"{name}.json", json.dumps(manifest) + "\n")  # last: the shard is complete
        self.written += rows
        self.keys = []


class FeatureStore:
    """Frozen-tower features of many images in memory-mapped shards, keyed by file content."""

    def __init__(self, folder: str | Path, tower: ImageTower | None = None,
                 decode_workers: int | None = None) -> None:
        """The store in ``folder`` (created if missing); ``tower`` (needed to extract) checks its width."""
        self.folder, self.tower, self.decode_workers = Path(folder), tower, decode_workers
        self.folder.mkdir(parents=True, exist_ok=True)
        self.encoded = 0  # images run through the tower by this store object
        self.refresh()

    @classmethod
    def for_tower(cls, tower: ImageTower, root: str | Path | None = None,
                  decode_workers: int | None = None) -> FeatureStore:
        """The store of ``tower``'s features under ``root`` (the cache's default folder if None)."""
        return cls(tower_folder(tower, root, "store"), tower, decode_workers)

    def refresh(self) -> None:
        """Read the shards' manifests (the index) and map their arrays; refuse a shard that is not sound."""
        self.shards: list[Shard] = []
        self.index: dict[str, tuple[int, int]] = {}  # key -> (shard, row)
        for manifest in sorted(self.folder.glob("*.json")):
            if manifest.name == SPEC_FILE:
                continue
            shard = self._open(manifest)
            for row, key in enumerate(shard.keys):
                self.index.setdefault(key, (len(self.shards), row))
            self.shards.append(shard)

    def remove_leftovers(self) -> None:
        """Delete what killed writers left: temporary files, and arrays of shards whose manifest was never
        written. Only while no other process writes to this store (under torchrun: rank 0, then a barrier)."""
        remove_leftovers(self.folder)
        for array in self.folder.glob("*.npy"):
            if not (self.folder / f"{array.name.split('.')[0]}.json").is_file():
                array.unlink(missing_ok=True)

    def _open(self, manifest: Path) -> Shard:
        name = manifest.name.removesuffix(".json")
        try:
            meta = json.loads(manifest.read_text())
            keys = meta["keys"]
            if meta.get("format") != FORMAT or meta["rows"] != len(keys):
                raise ValueError(f"format {meta.get('format')!r}, {meta['rows']} rows for {len(keys)} keys")
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise self._refused(manifest, error) from error
        arrays = []
        for part, dtype, ndim in (("tokens", np.float16, 3), ("pooled", np.float32, 2)):
            path = self.folder / f"{name}.{part}.npy"
            try:
                array = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as error:  # missing, truncated, not a .npy file
                raise self._refused(path, error) from error
            width = self.tower.dim if self.tower is not None else array.shape[-1]
            shape = arrays[0].shape[1:] if arrays else None
            if array.dtype != dtype or array.ndim != ndim or len(array) != len(keys) or array.shape[-1] != width or (
                    shape is not None and array.shape[-1] != shape[-1]):
                raise self._refused(path, f"{array.dtype} {array.shape}, expected {np.dtype(dtype)} with {len(keys)}"
                                          f" rows of width {width}")
            arrays.append(array)
        if self.shards and arrays[0].shape[1:] != self.shards[0].tokens.shape[1:]:
            raise self._refused(self.folder / f"{name}.tokens.npy", f"tokens {arrays[0].shape[1:]} per image, other"
                                f" shards {self.shards[0].tokens.shape[1:]}")
        return Shard(arrays[0], arrays[1], keys)

    def _refused(self, path: Path, why) -> ClipDecoderError:
        return ClipDecoderError(f"feature store shard {path} is corrupt or does not match the store ({why}); delete"
                                f" the shard's files ({path.name.split('.')[0]}.*) to extract its images again")

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def writer(self, shard_rows: int = SHARD_ROWS) -> StoreWriter:
        return StoreWriter(self, shard_rows)

    def rows(self, keys: list[str]) -> tuple[StoredRows, StoredRows]:
        """(tokens, pooled) of stored ``keys``, in that order, read on indexing."""
        missing = [key for key in keys if key not in self.index]
        if missing:
            raise ClipDecoderError(f"{len(missing)} image(s) are not in the feature store {self.folder}, first {missing[0]}")
        where = np.array([self.index[key] for key in keys], dtype=np.int64).reshape(-1, 2)
        return (StoredRows([s.tokens for s in self.shards], where[:, 0], where[:, 1]),
                StoredRows([s.pooled for s in self.shards], where[:, 0], where[:, 1]))

    def score_matrix(self, shape: tuple[int, int]) -> np.ndarray:
        """A float32 matrix memory-mapped from a file beside the store, its space allocated first (a full disk
        is then one error, not a crash on a later write); the file is unlinked at once, so it goes with the process."""
        path = self.folder / f".scores.{os.getpid()}.tmp"
        try:
            with open(path, "wb") as file:
                os.posix_fallocate(file.fileno(), 0, max(1, shape[0] * shape[1] * 4))
            scores = np.memmap(path, dtype=np.float32, mode="r+", shape=shape)
        except OSError as error:
            raise ClipDecoderError(f"cannot write the score matrix {path} ({shape[0]} x {shape[1]} float32):"
                                   f" {error.strerror or error}") from error
        finally:
            path.unlink(missing_ok=True)
        return scores

    def extract_missing(self, paths: list[Path], world: World = World(), progress: bool = True,
                        batch_size: int = DEFAULT_BATCH_SIZE, shard_rows: int = SHARD_ROWS) -> dict[int, str]:
        """Run the first file of each content among ``paths`` that is not stored yet, or under torchrun this
        rank's share of them (every rank lists them before any writes), through the tower into new shards;
        each file is hashed once. Unreadable files are left for ``get`` to report; returns {index into
        ``paths``: error} of the images that could not be decoded."""
        keys, _ = file_keys(paths)
        self.refresh()  # other processes may have written shards since this one last looked
        missing = first_of_each_content(keys, self.index)
        world.barrier()
        return self._encode(paths, world.shard(missing), keys, batch_size, progress, shard_rows)

    def get(self, paths: list[Path], batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = True,
            report: bool = True) -> Features:
        """Features of ``paths`` (extracting those not stored), read on indexing; unreadable images are
        left out (and reported on stderr if ``report``)."""
        keys, failed = file_keys(paths)
        self.refresh()
        failed.update(self._encode(paths, first_of_each_content(keys, self.index), keys, batch_size, progress))
        by_key = {keys[i]: message for i, message in failed.items() if i in keys}
        failed.update({i: by_key[key] for i, key in keys.items() if key not in self.index})  # copies of failed content
        kept = kept_indices(len(paths), failed, report)
        tokens, pooled = self.rows([keys[i] for i in kept])
        return Features(tokens, pooled, kept, failed)

    @torch.inference_mode()
    def _encode(self, paths: list[Path], wanted: list[int], keys: dict[int, str], batch_size: int, progress: bool,
                shard_rows: int = SHARD_ROWS) -> dict[int, str]:
        """Run ``paths[i]`` for i in ``wanted`` through the tower into new shards; {index: error} of those
        that could not be decoded."""
        if wanted and self.tower is None:
            raise ClipDecoderError(f"the feature store {self.folder} was opened without a tower: it cannot extract")
        failed, writer = {}, self.writer(shard_rows)
        with tqdm(total=len(wanted), desc="extract features", unit="img", disable=not progress or not wanted) as bar:
            sources = [paths[index] for index in wanted]
            for indices, failures, tokens, pooled in encoded_batches(self.tower, sources, batch_size, self.decode_workers):
                failed.update({wanted[k]: message for k, message in failures.items()})
                writer.add([keys[wanted[k]] for k in indices], tokens, pooled)
                self.encoded += len(indices)
                bar.update(len(indices) + len(failures))
        writer.flush()
        self.refresh()
        return failed
