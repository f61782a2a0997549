"""Atomic file writes: a reader sees the old file or the new one, never half of one.

A write that fails (a full disk, no permission, an I/O error) leaves the old file as it was,
removes its temporary file and raises one line naming the file and the cause.
"""

from __future__ import annotations

import errno
import os
from contextlib import suppress
from pathlib import Path

from .errors import ClipDecoderError


def temporary_path(path: Path) -> Path:
    """Where ``path`` is written before it is renamed into place (beside it, so the rename is atomic)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_failure(path: Path, error: OSError, replaced: bool = False) -> str:
    """One line: which file could not be written, why (the errno's name too), and what is on the disk now."""
    code = errno.errorcode.get(error.errno or 0, "error")
    if replaced:  # only the final flush of its folder failed
        kept = "it was written but may not survive a power cut"
    else:
        kept = f"the previous {path.name} is unchanged" if path.exists() else "nothing was written"
    return f"cannot write {path}: {error.strerror or error} ({code}); {kept}"


def _write(path: Path, data: bytes | list, fsync: bool) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        for part in data if isinstance(data, list) else [data]:
            view = memoryview(part).cast("B")
            while view:
                view = view[os.write(descriptor, view):]
        if fsync:
            os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_files(files: dict[Path, bytes | str | list], fsync: bool = True) -> None:
    """Replace each file with its data (str is written as UTF-8; a list of buffers, e.g. a header and
    a numpy array, is written one after the other without joining them), atomically.

    Every file is written to a temporary file beside it first; only when all are written are
    they renamed into place, in order. With ``fsync`` (for files that must survive a power cut)
    the data and the folders are flushed to the disk.
    """
    temporaries: dict[Path, Path] = {}
    current, replaced = next(iter(files)), False
    try:
        for current, data in files.items():
            temporaries[current] = temporary_path(current)
            _write(temporaries[current], data.encode() if isinstance(data, str) else data, fsync)
        for current, temporary in temporaries.items():
            os.replace(temporary, current)
        replaced = True
        for current in {path.parent: path for path in files}.values() if fsync else ():
            descriptor = os.open(current.parent, os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
    except OSError as error:
        raise ClipDecoderError(write_failure(current, error, replaced)) from error
    finally:
        for temporary in temporaries.values():  # those not renamed: a failure, or an interrupt
            with suppress(OSError):
                temporary.unlink(missing_ok=True)


def remove_leftovers(folder: Path) -> None:
    """Delete the temporary files that writes killed part way left in ``folder`` (which only this process writes)."""
    for leftover in Path(folder).glob(".*.[0-9]*.tmp"):
        with suppress(OSError):
            leftover.unlink()


def write_file(path: str | os.PathLike, data: bytes | str | list, fsync: bool = True) -> None:
    """Replace ``path`` with ``data`` atomically (``write_files`` for one file)."""
    write_files({Path(path): data}, fsync)
