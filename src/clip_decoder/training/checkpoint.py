"""Training checkpoints: nested state (dicts, lists, numbers, tensors) in ONE safetensors file.

Tensors are stored as safetensors entries, everything else as JSON in the file's metadata, so
loading never unpickles. Writes go to a temporary file that is then renamed over the old one:
a kill, a full disk or an I/O error at any moment leaves either the previous checkpoint or the
new one, never half of one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from ..atomic import write_file
from ..errors import ClipDecoderError

_TENSOR, _ITEMS = "__tensor__", "__items__"


def _split(value, tensors: dict[str, torch.Tensor]):
    """Replace each tensor in ``value`` by a reference to an entry of ``tensors``."""
    if isinstance(value, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = value.detach().cpu().clone().contiguous()
        return {_TENSOR: key}
    if isinstance(value, dict):
        if all(isinstance(key, str) for key in value):
            return {key: _split(item, tensors) for key, item in value.items()}
        return {_ITEMS: [[key, _split(item, tensors)] for key, item in value.items()]}  # int keys (optimizers)
    if isinstance(value, (list, tuple)):
        return [_split(item, tensors) for item in value]
    return value


def _join(value, tensors: dict[str, torch.Tensor]):
    """Inverse of ``_split``."""
    if isinstance(value, dict):
        if _TENSOR in value:
            return tensors[value[_TENSOR]]
        if _ITEMS in value:
            return {key: _join(item, tensors) for key, item in value[_ITEMS]}
        return {key: _join(item, tensors) for key, item in value.items()}
    if isinstance(value, list):
        return [_join(item, tensors) for item in value]
    return value


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write ``state`` to ``path`` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split(state, tensors)
    write_file(path, save(tensors, metadata={"state": json.dumps(skeleton)}))


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint written by ``save_checkpoint``."""
    try:
        with safe_open(str(path), framework="pt") as f:
            skeleton = json.loads((f.metadata() or {})["state"])
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    # RuntimeError: safetensors' answer when the file is replaced while it is being opened.
    except (SafetensorError, OSError, KeyError, ValueError, RuntimeError) as error:
        raise ClipDecoderError(f"checkpoint {path} is not readable ({error}); delete it to start again") from error
    return _join(skeleton, tensors)
