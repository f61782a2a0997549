"""A disk cache of frozen image-tower features: each image is encoded once.

Entries live under ``<root>/<tower key>/<sha256 of the file>.safetensors`` where the tower key
hashes the tower's name, preprocessing and weights, so a changed backbone, preprocessing or
fine-tuned tower never reuses stale features. Tokens are stored in float16 (half the disk, scores
move by ~1e-3), the pooled vector in float32. Entries are written atomically (temporary file,
rename): a kill or a full disk leaves no half entry, and a failed write is one error naming it. An entry that is unreadable, has the wrong keys, shapes or dtypes, non-finite values,
or was written for other file content is reported and recomputed, never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from tqdm.auto import tqdm

from .atomic import write_file
from .decoding import DEFAULT_BATCH_SIZE, DEFAULT_WORKERS, decoded_batches
from .encoders import ImageTower
from .errors import ClipDecoderError


def default_cache_dir() -> Path:
    """``$CLIP_DECODER_CACHE`` or ``$XDG_CACHE_HOME/clip-decoder`` (``~/.cache/clip-decoder``)."""
    if os.environ.get("CLIP_DECODER_CACHE"):
        return Path(os.environ["CLIP_DECODER_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "clip-decoder"


def weights_fingerprint(tower: ImageTower) -> str:
    """sha256 of the tower's weights and buffers, so that a changed tower gets its own cache."""
    digest = hashlib.sha256()
    for name, tensor in tower.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tower_spec(tower: ImageTower) -> tuple[str, str]:
    """(key, spec): the JSON of the tower's name, preprocessing and weights, and the 16 hex digits of its
    sha256 that name a tower's folder in the cache and in the store."""
    spec = json.dumps({"tower": tower.name, "preprocess": tower.preprocess.to_dict(),
                       "weights": weights_fingerprint(tower)}, sort_keys=True)
    return hashlib.sha256(spec.encode()).hexdigest()[:16], spec


def file_key(path: str | Path) -> str:
    """sha256 of the file's content: what cache entries and store rows are keyed by."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def file_keys(paths: list[Path]) -> tuple[dict[int, str], dict[int, str]]:
    """({index: content key} of the files that could be read, {index: error} of the others)."""
    keys, failed = {}, {}
    for index, path in enumerate(paths):
        try:
            keys[index] = file_key(path)
        except OSError as error:
            failed[index] = f"cannot read image {str(path)!r}: {error.strerror or error}"
    return keys, failed


def tower_folder(tower: ImageTower, root: str | Path | None, kind: str) -> Path:
    """``<root>/<kind>/<tower key>`` (root: the cache's default folder if None), created with a
    ``tower.json`` that says what the key hashes, for people."""
    key, spec = tower_spec(tower)
    folder = Path(root or default_cache_dir()) / kind / key
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "tower.json").is_file():
        write_file(folder / "tower.json", spec + "\n", fsync=False)
    return folder


def encoded_batches(tower: ImageTower, paths: list[Path], batch_size: int = DEFAULT_BATCH_SIZE,
                    workers: int = DEFAULT_WORKERS) -> Iterator[tuple[list[int], dict[int, str], torch.Tensor, torch.Tensor]]:
    """(indices into ``paths``, failed {index: message}, tokens float16, pooled float32) per batch of images
    decoded (ahead, in threads) and run through the tower; the tensors are on the CPU, one row per index."""
    device = next(tower.parameters()).device
    for batch in decoded_batches(paths, tower.preprocess, batch_size, workers=workers):
        tokens = pooled = torch.empty(0)
        if batch.indices:
            features = tower(batch.pixels.to(device))
            # Converted once per batch, not per image: on 2 busy cores each small torch op
            # costs milliseconds. Contiguous, so that each row is an entry as it stands.
            tokens = features.tokens.to("cpu", torch.float16).contiguous()
            pooled = features.pooled.to("cpu", torch.float32).contiguous()
        yield batch.indices, batch.failed, tokens, pooled


@dataclass
class CachedFeatures:
    """Features of the images that could be read, in input order, and the ones that could not."""

    tokens: torch.Tensor  # (n, N, D) float16
    pooled: torch.Tensor  # (n, D) float32
    kept: list[int]  # indices into the requested paths
    failed: dict[int, str]  # index -> error message


class FeatureCache:
    """Image-tower features on disk, keyed by tower, preprocessing and file content."""

    def __init__(
        self, tower: ImageTower, root: str | Path | None = None, decode_workers: int = DEFAULT_WORKERS
    ) -> None:
        self.tower = tower
        self.decode_workers = decode_workers  # threads decoding ahead of the tower; 0: in turn, no threads
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

    def entry(self, path: str | Path) -> Path:
        """Where the features of the file at ``path`` live: named by its content's sha256."""
        return self.folder / f"{file_key(path)}.safetensors"

    def distinct(self, paths: list[Path]) -> list[Path]:
        """``paths`` less the later copies of the same content (unreadable files are kept, to be reported)."""
        kept: dict[object, Path] = {}
        for path in paths:
            try:
                key: object = self.entry(path)
            except OSError:
                key = path
            kept.setdefault(key, path)
        return list(kept.values())

    @torch.inference_mode()
    def get(self, paths: list[Path], batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = True,
            report: bool = True) -> CachedFeatures:
        """Features for ``paths``; unreadable images are left out (and reported on stderr if ``report``)."""
        keys, failed = file_keys(paths)
        entries = {index: self.folder / f"{key}.safetensors" for index, key in keys.items()}
        stored = {e: t for e in set(entries.values()) if (t := self._read(e)) is not None}
        results = {i: stored[e] for i, e in entries.items() if e in stored}
        first = {}  # entry -> the first image needing it: files with the same content are encoded once
        for i, e in entries.items():
            if e not in stored:
                first.setdefault(e, i)
        missing = list(first.values())
        # In a with block, the bar ends its line even when a write fails: the error is then a line of its own.
        with tqdm(total=len(missing), desc="extract features", unit="img", disable=not progress or not missing) as bar:
            sources = [paths[index] for index in missing]
            for indices, failures, tokens, pooled in encoded_batches(self.tower, sources, batch_size, self.decode_workers):
                failed.update({missing[k]: message for k, message in failures.items()})
                for row, k in enumerate(indices):
                    self._write(entries[missing[k]], tokens[row], pooled[row])
                    results[missing[k]] = {"tokens": tokens[row], "pooled": pooled[row]}
                self.encoded += len(indices)
                bar.update(len(indices) + len(failures))
        for i, e in entries.items():  # the other copies of content encoded (or failed) above
            if i not in results and i not in failed:
                if first[e] in results:
                    results[i] = results[first[e]]
                else:
                    failed[i] = failed[first[e]]
        for index in sorted(failed) if report else ():
            print(f"error: {failed[index]}", file=sys.stderr)
        kept = sorted(results)
        if not kept:
            raise ClipDecoderError(f"none of the {len(paths)} images could be read")
        return CachedFeatures(
            tokens=torch.stack([results[i]["tokens"] for i in kept]),
            pooled=torch.stack([results[i]["pooled"] for i in kept]),
            kept=kept,
            failed=failed,
        )
