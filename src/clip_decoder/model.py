"""CLIPDecoder: the towers, the decoder head and the alignment projections, as one model.

Scoring goes through ``scoring.Scorer`` (``model.scorer``); the model folder is read and
written by ``model_folder``; training lives in ``training``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from .alignment import Alignment
from .decoding import DEFAULT_BATCH_SIZE, decoded_batches
from .encoders import Backbone, ImageFeatures, create_backbone
from .errors import ClipDecoderError
from .head import DecoderHead, HeadConfig
from .images import load_image
from .model_folder import ModelConfig, load_weights, model_folder, read_model_config, write_model_folder
from .prompts import DEFAULT_TEMPLATE_SET, TEMPLATE_SETS, LabelEmbedder, check_labels, check_templates
from .prior import PriorConfig, ZeroShotPrior
from .scoring import Scorer


@dataclass
class PredictedBatch:
    """One batch of predictions: rows of ``scores`` belong to the input positions in ``indices``."""

    indices: list[int]
    scores: np.ndarray  # (len(indices), n_labels) probabilities
    failed: dict[int, str]  # input position -> why that image could not be used
    attention: np.ndarray | None = None  # (len(indices), n_labels, N) with attention=True


class CLIPDecoder(nn.Module):
    """Zero-shot multi-label classifier: an independent probability for any label name."""

    def __init__(self, config: ModelConfig, backbone: Backbone | None = None) -> None:
        super().__init__()
        backbone = backbone or create_backbone(config.backbone)
        if (backbone.text.dim, backbone.image.dim) != (config.head.text_dim, config.head.image_dim):
            raise ClipDecoderError(
                f"backbone {config.backbone!r} gives text/image dims"
                f" {backbone.text.dim}/{backbone.image.dim}, but the head expects"
                f" {config.head.text_dim}/{config.head.image_dim}"
            )
        self.config = config = replace(config, prior=replace(config.prior))  # its own prior settings: training sets the offset
        self.image_tower = backbone.image
        self.text_tower = backbone.text
        self.image_tower.requires_grad_(False)
        self.text_tower.requires_grad_(False)
        self.head = DecoderHead(config.head)
        self.alignment = Alignment(config.head.dim, backbone.text.dim, config.align_dim)
        embed_labels = LabelEmbedder(self.text_tower)
        self.prior = ZeroShotPrior(self.image_tower, self.text_tower.dim, lambda names: embed_labels(names, config.templates),
                                   config.prior.temperature)
        if config.prior.on and not self.prior.available:
            raise ClipDecoderError(f"backbone {config.backbone!r} gives no zero-shot prior; turn the prior off"
                                   " (weights 0)")
        self.scorer = Scorer(self.head, self.alignment, embed_labels, config.templates, self.prior, config.prior,
                             config.labels)
        self.eval()

    @classmethod
    def create(
        cls,
        backbone: str = "offline",
        templates: Sequence[str] = TEMPLATE_SETS[DEFAULT_TEMPLATE_SET],
        align_dim: int = ModelConfig.align_dim,
        prior: PriorConfig | None = None,
        **head_options,
    ) -> CLIPDecoder:
        """An untrained model on the named backbone; ``head_options`` override HeadConfig's
        defaults, which are the head ``clip-decoder train`` trains; ``prior`` defaults to
        PriorConfig() (``PriorConfig.off()`` turns it off)."""
        towers = create_backbone(backbone)
        try:
            head = HeadConfig(text_dim=towers.text.dim, image_dim=towers.image.dim, **head_options)
        except (TypeError, ValueError) as error:
            raise ClipDecoderError(f"bad head option: {error}") from error
        config = ModelConfig(backbone=backbone, head=head, align_dim=align_dim, templates=check_templates(templates),
                             prior=prior or PriorConfig())
        return cls(config, towers)

    @property
    def embed_labels(self) -> LabelEmbedder:
        """Label names -> text embeddings through prompt templates, cached (the scorer's)."""
        return self.scorer.embed_labels

    def saved_modules(self) -> dict[str, nn.Module]:
        """What the model folder holds: frozen towers are rebuilt from their backbone name; the
        prior's class-name embeddings are kept when the prior is on."""
        modules = {"head": self.head, "alignment": self.alignment}
        if self.config.prior.on and self.prior.conse:
            modules["prior"] = self.prior
        if self.config.image_tower_trained:
            modules["image_tower"] = self.image_tower
        return modules

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write config.json and model.safetensors into ``directory`` (created if needed)."""
        if self.config.prior.on:
            self.prior.prepare()
        return write_model_folder(directory, self.config, self.saved_modules())

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> CLIPDecoder:
        """Load a model folder written by save_pretrained, or a packaged model by name ("openclipart");
        never unpickles anything."""
        directory = model_folder(directory)
        config = read_model_config(directory)
        try:
            model = cls(config)
        except ClipDecoderError as error:  # unknown backbone, towers that do not fit the head
            raise ClipDecoderError(f"{Path(directory) / 'config.json'}: {error}") from error
        load_weights(directory, model.saved_modules())
        return model

    def set_trained_labels(self, labels: Sequence[str]) -> None:
        """Record the labels the head was trained on (config.json's ``labels``; their prior weight is
        ``PriorConfig.seen_weight``)."""
        self.config.labels = list(labels)
        self.scorer.seen = frozenset(labels)

    @torch.inference_mode()
    def center_prior(self, pooled: torch.Tensor, labels: Sequence[str], rows_per_batch: int = 4096) -> float:
        """Set the prior's offset to its mean cosine over these images (pooled features) and
        labels, so that the prior moves no probability on average; no ranking changes. Returns it."""
        if not self.config.prior.on:
            return 0.0
        directions = self.scorer.vocabulary(labels).queries.directions
        total = sum(float((self.prior(pooled[start : start + rows_per_batch].to(self.device)) @ directions.T).sum())
                    for start in range(0, len(pooled), rows_per_batch))
        self.config.prior.offset = total / (len(pooled) * len(labels))  # the scorer shares config.prior
        return self.config.prior.offset

    def train(self, mode: bool = True) -> CLIPDecoder:
        """Train mode for the head; the frozen towers stay in eval mode (BatchNorm, dropout)."""
        super().train(mode)
        self.image_tower.eval()
        self.text_tower.eval()
        return self

    @property
    def device(self) -> torch.device:
        return next(self.head.parameters()).device

    def encode_images(self, images: Sequence) -> ImageFeatures:
        """Paths or PIL images -> the image tower's features for the batch."""
        pixels = self.image_tower.preprocess.batch([load_image(image) for image in images])
        return self.image_tower(pixels.to(self.device))

    def predict(
        self,
        images: Sequence,
        labels: Sequence[str],
        templates: Sequence[str] | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        progress: bool = False,
        shortlist: int | None = None,
    ) -> np.ndarray:
        """Independent probabilities (n_images, n_labels) for any label names.

        A label's score depends only on the image and that label, never on the other labels
        asked with it (except with ``shortlist``, an approximation for large vocabularies; see
        ``Scorer.score``). ``templates`` default to the ones the model was trained with.
        An image that cannot be read raises ClipDecoderError; ``predict_batches`` carries on instead.
        """
        if isinstance(images, (str, os.PathLike)) or isinstance(images, Image.Image):
            images = [images]
        images = list(images)
        batches = self.predict_batches(images, labels, templates, batch_size, shortlist)
        rows = []
        for batch in tqdm(batches, desc="predict", unit="batch", total=-(-len(images) // batch_size), disable=not progress):
            if batch.failed:
                raise ClipDecoderError(next(iter(batch.failed.values())))
            rows.append(batch.scores)
        return np.concatenate(rows) if rows else np.zeros((0, len(labels)), dtype=np.float32)

    def predict_batches(
        self,
        images: Sequence,
        labels: Sequence[str],
        templates: Sequence[str] | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        shortlist: int | None = None,
        attention: bool = False,
    ) -> Iterator[PredictedBatch]:
        """``predict`` batch by batch, for long runs: images that cannot be read are reported in
        each batch's ``failed`` and the others are scored. Images are decoded in a background
        thread while the towers run. ``attention=True`` adds each label's attention map over the
        image tokens (``DecoderHead.attention_maps``)."""
        labels = check_labels(labels)
        if not labels:
            raise ClipDecoderError("no labels to score")
        if batch_size < 1:
            raise ClipDecoderError(f"batch_size must be at least 1, got {batch_size}")
        if shortlist is not None and shortlist < 1:
            raise ClipDecoderError(f"shortlist must be at least 1, got {shortlist}")
        return self._predict_batches(list(images), labels, templates, batch_size, shortlist, attention)

    def _predict_batches(self, images, labels, templates, batch_size, shortlist, attention) -> Iterator[PredictedBatch]:
        was_training = self.training
        self.eval()
        try:
            vocabulary = self.scorer.vocabulary(labels, templates)
            for batch in decoded_batches(images, self.image_tower.preprocess, batch_size):
                if not batch.indices:  # every image of this batch failed
                    yield PredictedBatch([], np.zeros((0, len(labels)), dtype=np.float32), batch.failed)
                    continue
                with torch.inference_mode():
                    scored = self.scorer.score(self.image_tower(batch.pixels.to(self.device)), vocabulary, shortlist, attention)
                maps = scored.attention.cpu().numpy() if attention else None
                yield PredictedBatch(batch.indices, scored.probabilities.cpu().numpy(), batch.failed, maps)
        finally:
            self.train(was_training)
