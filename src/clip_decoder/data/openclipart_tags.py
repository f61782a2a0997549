"""OpenClipart tag cleaning: raw dc:subject tags to labels, by the tables in ``openclipart_tags.json``."""

from __future__ import annotations

import json
import re
from importlib import resources

TABLES_FILE = "openclipart_tags.json"


def _load_tables() -> tuple[frozenset[str], dict[str, str], dict[str, str], dict[str, tuple[str, ...]]]:
    """(stop tags, synonyms, folder labels, implied parents) from the packaged JSON file (see its "about")."""
    data = json.loads(resources.files(__package__).joinpath(TABLES_FILE).read_text(encoding="utf-8"))
    return (
        frozenset(data["stop_tags"]),
        dict(data["synonyms"]),
        dict(data["folder_labels"]),
        {label: tuple(parents) for label, parents in data["implies"].items()},
    )


# Stop tags name nothing one would see (bookkeeping, categories, authors, places, colours, styles);
# synonyms map variants to a canonical label; folder labels name archive folders' concepts;
# IMPLIES gives each label its parents (a cat picture is a mammal picture).
STOP_TAGS, SYNONYMS, FOLDER_LABELS, IMPLIES = _load_tables()

_TAG_RE = re.compile(r"[a-z]+(?: [a-z]+){0,2}")  # no digits or punctuation, at most 3 words
# Words the plural rule may singularise into, besides the tags seen in the source.
_VOCABULARY = (STOP_TAGS | SYNONYMS.keys() | set(SYNONYMS.values())
               | set(FOLDER_LABELS.values()) | set(IMPLIES))


def normalise_tag(raw: str) -> str:
    """Lowercase a raw tag, turn underscores and hyphens into spaces and collapse spaces."""
    return " ".join(raw.lower().replace("_", " ").replace("-", " ").split())


def _singular(tag: str, known: set[str]) -> str:
    """Return the singular of a plural tag when that singular is a known tag or label."""
    for suffix, repl in (("ies", "y"), ("s", "")):
        if tag.endswith(suffix) and not tag.endswith("ss") and tag[: -len(suffix)] + repl in known:
            return tag[: -len(suffix)] + repl
    return tag


def clean_tags(raw_tags: list[str], known: frozenset[str] | set[str] = frozenset()) -> set[str]:
    """Map raw dc:subject tags to labels: normalise, singularise, merge synonyms, drop stop tags."""
    known = _VOCABULARY | known
    labels = set()
    for raw in raw_tags:
        for part in raw.split(","):
            tag = normalise_tag(part)
            tag = SYNONYMS.get(tag) or SYNONYMS.get(one := _singular(tag, known)) or one
            if _TAG_RE.fullmatch(tag) and tag not in STOP_TAGS:
                labels.add(tag)
    return labels


def folder_labels(folders: set[str]) -> set[str]:
    """The labels of the archive folders (of FOLDER_LABELS) among ``folders``."""
    return {FOLDER_LABELS[f] for f in folders if f in FOLDER_LABELS}


def with_parents(labels: set[str]) -> set[str]:
    """Add every label implied by IMPLIES, transitively."""
    todo, out = list(labels), set(labels)
    while todo:
        for parent in IMPLIES.get(todo.pop(), ()):
            if parent not in out:
                out.add(parent)
                todo.append(parent)
    return out
