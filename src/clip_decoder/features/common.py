"""What the feature cache and the feature store share: content keys, the tower's folder, the
encoding loop, and the result of a ``get``."""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Container, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..caches import default_cache_dir, file_key, keyed_folder
from ..decoding import DEFAULT_BATCH_SIZE, decode_workers, decoded_batches
from ..encoders import ImageTower
from ..errors import ClipDecoderError

__all__ = ["Features", "default_cache_dir", "encoded_batches", "file_key", "file_keys", "first_of_each_content",
           "kept_indices", "tower_folder", "weights_fingerprint"]


@dataclass
class Features:
    """Features of the images that could be read, in input order, and the ones that could not."""

    tokens: torch.Tensor  # (n, N, D) float16: a tensor (cache), or a store's rows read on indexing (StoredRows)
    pooled: torch.Tensor  # (n, D) float32, likewise
    kept: list[int]  # indices into the requested paths
    failed: dict[int, str]  # index -> error message


def weights_fingerprint(tower: ImageTower) -> str:
    """sha256 of the tower's weights and buffers, so that a changed tower gets its own cache."""
    digest = hashlib.sha256()
    for name, tensor in tower.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tower_folder(tower: ImageTower, root: str | Path | None, kind: str) -> Path:
    """``<root>/<kind>/<key>``, the key hashing the tower's name, preprocessing and weights."""
    spec = {"tower": tower.name, "preprocess": tower.preprocess.to_dict(), "weights": weights_fingerprint(tower)}
    return keyed_folder(root, kind, spec)


def file_keys(paths: list[Path]) -> tuple[dict[int, str], dict[int, str]]:
    """({index: content key} of the files that could be read, {index: error} of the others)."""
    keys, failed = {}, {}
    for index, path in enumerate(paths):
        try:
            keys[index] = file_key(path)
        except OSError as error:
            failed[index] = f"cannot read image {str(path)!r}: {error.strerror or error}"
    return keys, failed


def first_of_each_content(keys: dict[int, str], kept: Container[str] = ()) -> list[int]:
    """The index of the first file of each content key not in ``kept``: files with the same content are encoded once."""
    first: dict[str, int] = {}
    for index, key in keys.items():
        if key not in kept:
            first.setdefault(key, index)
    return list(first.values())


def kept_indices(count: int, failed: dict[int, str], report: bool) -> list[int]:
    """The indices of ``count`` requested images that did not fail, the failures printed on stderr if ``report``;
    none kept is an error."""
    for index in sorted(failed) if report else ():
        print(f"error: {failed[index]}", file=sys.stderr)
    kept = [index for index in range(count) if index not in failed]
    if not kept:
        raise ClipDecoderError(f"none of the {count} images could be read")
    return kept


def encoded_batches(tower: ImageTower, paths: list[Path], batch_size: int = DEFAULT_BATCH_SIZE, workers: int | None = None
                    ) -> Iterator[tuple[list[int], dict[int, str], torch.Tensor, torch.Tensor]]:
    """(indices into ``paths``, failed {index: message}, tokens float16, pooled float32) per batch of images
    decoded (ahead, in ``workers`` threads; None: ``decode_workers`` for the tower's device) and run through
    the tower; the tensors are on the CPU, one row per index."""
    device = next(tower.parameters()).device
    workers = decode_workers(device.type) if workers is None else workers
    for batch in decoded_batches(paths, tower.preprocess, batch_size, workers=workers):
        tokens = pooled = torch.empty(0)
        if batch.indices:
            features = tower(torch.from_numpy(batch.pixels).to(device))
            # Converted once per batch, not per image: on 2 busy cores each small torch op
            # costs milliseconds. Contiguous, so that each row is an entry as it stands.
            tokens = features.tokens.to("cpu", torch.float16).contiguous()
            pooled = features.pooled.to("cpu", torch.float32).contiguous()
        yield batch.indices, batch.failed, tokens, pooled
