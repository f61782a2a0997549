"""Which images a tagging command reads: files, folders, glob patterns and list files, checked
before any model loads."""

from __future__ import annotations

import glob
import itertools
from collections.abc import Iterator, Sequence
from pathlib import Path

from .errors import ClipDecoderError
from .images import path_problem

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"}


def expand_images(inputs: Sequence[str], list_file: str | None = None) -> tuple[list[Path], list[str]]:
    """(paths, problems): files as given; folders expanded recursively; glob patterns
    ('photos/**/*.jpg') expanded; plus one path per line of ``list_file``. Order is kept, and a file
    named twice (the same file reached by two names, e.g. a photo and the folder holding it) is kept
    once, under its first name. A file that is missing, empty or a folder, a folder with no image
    files and a pattern that matches none become ``problems`` (one message each), to report beside
    the bad images rather than stop the run."""
    paths: dict[Path, Path] = {}  # the file itself -> its first name
    problems: list[str] = []
    for item in itertools.chain(inputs, _listed(list_file) if list_file else ()):
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                problems.append(f"folder {path} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
        elif not path.exists() and glob.has_magic(item):
            found = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
            if not found:
                problems.append(f"pattern {item!r} matches no file")
        elif problem := path_problem(path):
            problems.append(problem)
            continue
        else:
            found = [path]
        for file in found:
            paths.setdefault(file.resolve(), file)
    if not paths and not problems:
        raise ClipDecoderError("no images given")
    return list(paths.values()), problems


def _listed(list_file: str) -> Iterator[str]:
    """The non-empty lines of an image list, read as they come (a list of millions is never held as text)."""
    try:
        with open(list_file, encoding="utf-8-sig") as f:
            for line in f:
                if line.strip():
                    yield line.strip()
    except (OSError, UnicodeDecodeError) as error:
        raise ClipDecoderError(f"cannot read image list {list_file}: {error}") from error
