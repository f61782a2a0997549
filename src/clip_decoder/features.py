"""A disk cache of frozen image-tower features: each image is encoded once.

Entries live under ``<root>/<tower key>/<sha256 of the file>.safetensors`` where the tower key
hashes the tower's name and preprocessing, so a changed backbone or preprocessing never reuses
stale features. Tokens are stored in float16 (half the disk, scores move by ~1e-3), the pooled
vector in float32. Entries are written atomically; an unreadable entry is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .decoding import DEFAULT_BATCH_SIZE, DEFAULT_WORKERS, decoded_batches
from .encoders import ImageTower
from .errors import ClipDecoderError


def default_cache_dir() -> Path:
    """``$CLIP_DECODER_CACHE`` or ``$XDG_CACHE_HOME/clip-decoder`` (``~/.cache/clip-decoder``)."""
    if os.environ.get("CLIP_DECODER_CACHE"):
        return Path(os.environ["CLIP_DECODER_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "clip-decoder"


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
        spec = json.dumps({"tower": tower.name, "preprocess": tower.preprocess.to_dict()}, sort_keys=True)
        self.folder = Path(root or default_cache_dir()) / "features" / hashlib.sha256(spec.encode()).hexdigest()[:16]
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "tower.json").write_text(spec + "\n")
        self.encoded = 0  # images run through the tower by this cache object

    def _read(self, entry: Path) -> dict[str, torch.Tensor] | None:
        try:
            tensors = load_file(entry)
            return tensors if {"tokens", "pooled"} <= set(tensors) else None
        except (SafetensorError, OSError, ValueError):
            return None

    def _write(self, entry: Path, tokens: torch.Tensor, pooled: torch.Tensor) -> None:
        temporary = entry.with_suffix(f".{os.getpid()}.tmp")
        save_file({"tokens": tokens.half().contiguous(), "pooled": pooled.float().contiguous()}, temporary)
        os.replace(temporary, entry)

    @torch.inference_mode()
    def get(self, paths: list[Path], batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = True) -> CachedFeatures:
        """Features for ``paths``; unreadable images are reported on stderr and left out."""
        entries: dict[int, Path] = {}
        failed: dict[int, str] = {}
        for index, path in enumerate(paths):
            try:
                entries[index] = self.folder / f"{hashlib.sha256(Path(path).read_bytes()).hexdigest()}.safetensors"
            except OSError as error:
                failed[index] = f"cannot read image {str(path)!r}: {error.strerror or error}"
        results = {i: t for i, e in entries.items() if (t := self._read(e)) is not None}
        missing = [i for i in entries if i not in results]
        device = next(self.tower.parameters()).device
        bar = tqdm(total=len(missing), desc="extract features", unit="img", disable=not progress or not missing)
        # The next batch is decoded in background thread(s) while the tower runs on this one.
        sources = [paths[index] for index in missing]
        for batch in decoded_batches(sources, self.tower.preprocess, batch_size, workers=self.decode_workers):
            failed.update({missing[k]: message for k, message in batch.failed.items()})
            if batch.indices:
                features = self.tower(batch.pixels.to(device))
                # Converted once per batch, not per image: on 2 busy cores each small torch op
                # costs milliseconds. Contiguous, so that each row is an entry as it stands.
                tokens = features.tokens.to("cpu", torch.float16).contiguous()
                pooled = features.pooled.to("cpu", torch.float32).contiguous()
                for row, k in enumerate(batch.indices):
                    self._write(entries[missing[k]], tokens[row], pooled[row])
                    results[missing[k]] = {"tokens": tokens[row], "pooled": pooled[row]}
                self.encoded += len(batch.indices)
            bar.update(len(batch.indices) + len(batch.failed))
        bar.close()
        for index in sorted(failed):
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
