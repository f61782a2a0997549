"""Write one benchmark's table into its own section of docs/BENCHMARKS.md."""

from __future__ import annotations

import platform
import re
from pathlib import Path

import torch

DOC = Path(__file__).resolve().parent.parent / "docs" / "BENCHMARKS.md"
HEADER = "# Benchmarks\n\nEach section is written by the script it names; `make bench` reruns them all.\n"


def machine() -> str:
    """One line naming the machine and the versions that matter."""
    return (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads,"
        f" Python {platform.python_version()}, torch {torch.__version__}"
    )


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section marked ``name`` in docs/BENCHMARKS.md."""
    text = DOC.read_text() if DOC.exists() else HEADER
    block = f"<!-- {name}:start -->\n{body.strip()}\n<!-- {name}:end -->"
    pattern = re.compile(rf"<!-- {re.escape(name)}:start -->.*?<!-- {re.escape(name)}:end -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else f"{text.rstrip()}\n\n{block}\n"
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(text)
