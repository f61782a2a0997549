"""The tower contract every backbone keeps (what a tower must provide and what it may), the pair
that makes a backbone, and helpers the transformers-based towers share."""

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


ZERO_SHOT_VIEWS = ("imagenet", "joint", None)


@runtime_checkable
class ImageTower(Protocol):
    """What every image tower provides: preprocessed pixels (B, 3, H, W) -> spatial tokens and a pooled vector.

    ``zero_shot`` declares how the tower sees an image with no training (the zero-shot prior,
    prior.py): ``"imagenet"``, it has an ImageNet classifier and implements ``ImageNetClassifier``
    (CONSE's view); ``"joint"``, its pooled vector lives in its text tower's embedding space
    (CLIP, SigLIP); ``None``, neither, and models on it keep the prior off. A joint tower may also
    give ``logit_scale`` and ``logit_bias`` (None without one): what its training made of a cosine,
    for tagging with no trained head (``zero_shot.ZeroShotTagger``).
    ``create_backbone`` checks the declaration (``check_backbone``).
    """

    name: str  # names the tower's weights and input size; feature caches are keyed by it (and the weights)
    dim: int  # width of each token and of the pooled vector
    preprocess: Preprocess
    zero_shot: str | None

    def __call__(self, pixels: torch.Tensor) -> ImageFeatures: ...

    def trainable_blocks(self) -> list[torch.nn.Module]:
        """The tower's parts in order from input to output, for fine-tuning only the last ones."""
        ...


@runtime_checkable
class ImageNetClassifier(Protocol):
    """What an image tower whose ``zero_shot`` is ``"imagenet"`` provides besides."""

    def imagenet_logits(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled features (B, dim) -> the 1,000 ImageNet logits (B, 1000), in the classes' usual order."""
        ...


@runtime_checkable
class TextTower(Protocol):
    """What every text tower provides: texts -> L2-normalised embeddings (len(texts), dim).

    ``cache_key`` names the tower's weights without loading them: label embeddings kept on disk
    (prompts.LabelEmbedder) are stored under it, so a tower may load its model on first ``encode``.
    """

    name: str
    dim: int
    cache_key: str

    def encode(self, texts: list[str]) -> torch.Tensor: ...


@dataclass(frozen=True)
class TokenizerSpec:
    """How a text tower tokenizes, for running it without transformers (clip_decoder.export): a transformers
    fast tokenizer (it saves as one tokenizer.json), truncation at ``max_length``, padding to the longest text
    or to ``max_length``, and whether the tower reads an attention mask."""

    tokenizer: object
    max_length: int
    pad_to_max_length: bool
    attention_mask: bool


@runtime_checkable
class ExportableTextTower(Protocol):
    """What a text tower provides besides to be exported to ONNX: its tokenizer's spec and its forward after it."""

    def tokenizer_spec(self) -> TokenizerSpec: ...

    def embed_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Token ids (T, S) and their mask (None when ``attention_mask`` is False) -> unit embeddings (T, dim)."""
        ...


@dataclass
class Backbone:
    """An image tower and a text tower, created together under one registry name."""

    name: str
    image: ImageTower
    text: TextTower


def check_backbone(backbone: Backbone) -> Backbone:
    """``backbone`` if its towers keep the contract above; else a ValueError saying what is missing."""
    image, text = backbone.image, backbone.text
    missing = [f"image tower .{name}" for name in ("name", "dim", "preprocess", "zero_shot", "trainable_blocks")
               if not hasattr(image, name)]
    missing += [f"text tower .{name}" for name in ("name", "dim", "cache_key", "encode") if not hasattr(text, name)]
    if missing:
        raise ValueError(f"backbone {backbone.name!r} does not keep the tower contract: no {', '.join(missing)}")
    if image.zero_shot not in ZERO_SHOT_VIEWS:
        raise ValueError(f"backbone {backbone.name!r}: zero_shot must be one of {ZERO_SHOT_VIEWS}, got {image.zero_shot!r}")
    if image.zero_shot == "imagenet" and not isinstance(image, ImageNetClassifier):
        raise ValueError(f"backbone {backbone.name!r}: an 'imagenet' tower needs imagenet_logits(pooled)")
    if image.zero_shot == "joint" and image.dim != text.dim:
        raise ValueError(f"backbone {backbone.name!r}: a 'joint' image tower's pooled vector ({image.dim}) must have"
                         f" its text tower's width ({text.dim})")
    return backbone


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
