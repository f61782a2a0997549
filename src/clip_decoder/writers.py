"""One image's result as a record (shared by ``clip-decoder predict`` and the service), and the
writers that print records as JSON Lines (the contract), CSV or a readable table."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from typing import TextIO

import numpy as np

from .decisions import Decider
from .errors import ClipDecoderError

FORMATS = ("jsonl", "csv", "table")
TABLE_TOP = 5  # labels shown per image in the table when no decision rule is given


def result_record(image: str, labels: Sequence[str], scores: np.ndarray, decided: list[str] | None) -> dict:
    """``{"image": ..., "scores": {label: probability}}`` with every label asked for (6 decimals), plus
    ``"labels"``, the decided ones, when a decision was made."""
    record = {"image": image, "scores": {label: round(float(s), 6) for label, s in zip(labels, scores)}}
    if decided is not None:
        record["labels"] = decided
    return record


class Writer:
    """Prints predictions as JSON Lines (the contract), CSV or a readable table."""

    def __init__(self, out: TextIO, fmt: str, labels: Sequence[str], decider: Decider) -> None:
        if fmt not in FORMATS:
            raise ClipDecoderError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
        self.out, self.format, self.labels, self.decider = out, fmt, list(labels), decider
        self.csv = csv.writer(out, lineterminator="\n") if fmt == "csv" else None
        if self.csv:
            self.csv.writerow(["image", *self.labels, *(["labels"] if decider.active else [])])

    def write(self, image: str, scores: np.ndarray) -> list[str] | None:
        """Print one image's scores (and decided labels); returns the decided labels (None: no decision)."""
        chosen = self.decider(self.labels, scores) if self.decider.active else None
        if self.format == "jsonl":
            self.out.write(json.dumps(result_record(image, self.labels, scores, chosen), ensure_ascii=False) + "\n")
        elif self.csv:
            self.csv.writerow([image, *(f"{float(s):.6f}" for s in scores), *(["|".join(chosen)] if chosen is not None else [])])
        else:
            shown = chosen if chosen is not None else Decider(top_k=TABLE_TOP)(self.labels, scores)
            score = dict(zip(self.labels, scores))
            cells = ", ".join(f"{label} {float(score[label]):.2f}" for label in shown)
            if not cells:  # nothing decided yes: name the best candidate, so the reader sees how near it came
                best = int(np.argmax(scores))
                cells = f"(no label; best: {self.labels[best]} {float(scores[best]):.2f})"
            self.out.write(f"{image}\t{cells}\n")
        self.out.flush()
        return chosen
