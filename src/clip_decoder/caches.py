"""Where caches live on disk: one root folder, and a folder per tower named by what it hashes.

Image features (``features``) and label embeddings (``prompts.LabelEmbedder``) are kept under
``<root>/<kind>/<key>``, where the key is the first 16 hex digits of the sha256 of a JSON spec of
everything the cached values depend on; a ``tower.json`` beside them holds that spec, for people.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .atomic import write_file

SPEC_FILE = "tower.json"


def default_cache_dir() -> Path:
    """``$CLIP_DECODER_CACHE`` or ``$XDG_CACHE_HOME/clip-decoder`` (``~/.cache/clip-decoder``)."""
    if os.environ.get("CLIP_DECODER_CACHE"):
        return Path(os.environ["CLIP_DECODER_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "clip-decoder"


def file_key(path: str | os.PathLike) -> str:
    """sha256 of the file's content (hex): what cache entries, store rows, library rows and an export's files are
    keyed or checked by. Read in blocks, so a large file is never held whole."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def spec_key(spec: dict) -> tuple[str, str]:
    """(key, JSON): the spec as sorted JSON and the 16 hex digits of its sha256 that name its folder."""
    text = json.dumps(spec, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16], text


def keyed_folder(root: str | Path | None, kind: str, spec: dict) -> Path:
    """``<root>/<kind>/<key of spec>`` (root: ``default_cache_dir()`` if None), created with its ``tower.json``."""
    key, text = spec_key(spec)
    folder = Path(root or default_cache_dir()) / kind / key
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / SPEC_FILE).is_file():
        write_file(folder / SPEC_FILE, text + "\n", fsync=False)
    return folder
