"""The two tower protocols every backbone implements, the pair that makes a backbone, and a
tokenising helper the transformers-based text towers share."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from ..images import Preprocess


@dataclass
class ImageFeatures:
    """What an image tower returns for a batch."""

    tokens: torch.Tensor  # (batch, tokens, dim): spatial tokens, the decoder's memory
    pooled: torch.Tensor  # (batch, dim): one vector per image


@runtime_checkable
class ImageTower(Protocol):
    """Maps preprocessed pixels (B, 3, H, W) to spatial tokens and a pooled vector."""

    name: str
    dim: int
    preprocess: Preprocess

    def __call__(self, pixels: torch.Tensor) -> ImageFeatures: ...

    def trainable_blocks(self) -> list[torch.nn.Module]:
        """The tower's parts in order from input to output, for fine-tuning only the last ones."""
        ...


@runtime_checkable
class TextTower(Protocol):
    """Maps texts to L2-normalised embeddings (len(texts), dim)."""

    name: str
    dim: int

    def encode(self, texts: list[str]) -> torch.Tensor: ...


@dataclass
class Backbone:
    """An image tower and a text tower, created together under one registry name."""

    name: str
    image: ImageTower
    text: TextTower


def tokenized_batches(
    tokenizer, texts: Sequence[str], device: torch.device, max_length: int, padding: bool | str = True,
    batch_size: int = 128,
) -> Iterator[dict[str, torch.Tensor]]:
    """Tokenise ``texts`` in batches (truncated to max_length), moved to ``device``."""
    for start in range(0, len(texts), batch_size):
        yield tokenizer(
            list(texts[start : start + batch_size]),
            padding=padding,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        ).to(device)


@contextmanager
def quiet_loading() -> Iterator[None]:
    """Silence transformers' per-load "Loading weights" bar, restoring the caller's setting."""
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()
