"""Atomic file replacement: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_write(path: str | os.PathLike, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; rename it over ``path`` when the block
    succeeds (after an fsync if asked: for files that must survive a power cut), delete it if not."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield temporary
        if fsync:
            with temporary.open("rb") as f:
                os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
