"""CLIPDecoder: the towers, the decoder head and the alignment projections, as one model.

Scoring goes through ``scoring.Scorer`` (``model.scorer``); the model folder is read and
written by ``model_folder``; training lives in ``training``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .alignment import Alignment
from .configs import HeadConfig, PriorConfig
from .decoding import (DEFAULT_BATCH_SIZE, PredictedBatch, checked_request, decode_workers, decoded_batches,
                       predict_scores)
from .encoders import Backbone, create_backbone
from .errors import ClipDecoderError
from .head import DecoderHead
from .model_folder import CONFIG_FILE, ModelConfig, ModelFolder
from .prior import ZeroShotPrior
from .prompts import DEFAULT_TEMPLATES, LabelEmbedder, check_templates
from .scoring import Scorer


class CLIPDecoder(nn.Module):
    """Zero-shot multi-label classifier: an independent probability for any label name."""

    def __init__(self, config: ModelConfig, backbone: Backbone | None = None,
                 label_cache: str | os.PathLike | None = None) -> None:
        """``label_cache``: a cache folder that keeps label embeddings on disk across processes
        (``caches.default_cache_dir()`` is the CLI's), so a known vocabulary needs no text tower."""
        super().__init__()
        backbone = backbone or create_backbone(config.backbone)
        if (backbone.text.dim, backbone.image.dim) != (config.head.text_dim, config.head.image_dim):
            raise ClipDecoderError(
                f"backbone {config.backbone!r} gives text/image dims"
                f" {backbone.text.dim}/{backbone.image.dim}, but the head expects"
                f" {config.head.text_dim}/{config.head.image_dim}"
            )
        self._config = config
        self.image_tower = backbone.image
        self.text_tower = backbone.text
        self.image_tower.requires_grad_(False)
        self.text_tower.requires_grad_(False)
        self.head = DecoderHead(config.head)
        self.alignment = Alignment(config.head.dim, backbone.text.dim, config.align_dim)
        embed_labels = LabelEmbedder(self.text_tower, folder=label_cache)
        self.zero_shot = ZeroShotPrior(self.image_tower, self.text_tower.dim,
                                       lambda names: embed_labels(names, config.templates))
        self.scorer = Scorer(self.head, self.alignment, embed_labels, config.templates, self.zero_shot, config.prior,
                             config.labels)
        self.eval()

    @property
    def config(self) -> ModelConfig:
        """The model's settings as its config.json holds them; the prior in use and the trained labels
        are the scorer's (``set_prior``, ``set_trained_labels``)."""
        return replace(self._config, prior=self.scorer.prior, labels=self.scorer.trained_labels)

    @classmethod
    def create(
        cls,
        backbone: str = "offline",
        templates: Sequence[str] = DEFAULT_TEMPLATES,
        align_dim: int = ModelConfig.align_dim,
        prior: PriorConfig = PriorConfig(),
        image_tower_trained: bool = False,
        **head_options,
    ) -> CLIPDecoder:
        """An untrained model on the named backbone; ``head_options`` override HeadConfig's
        defaults, which are the head ``clip-decoder train`` trains; ``PriorConfig.off()`` turns the
        prior off; ``image_tower_trained`` saves the image tower's weights with the head."""
        towers = create_backbone(backbone)
        try:
            head = HeadConfig(text_dim=towers.text.dim, image_dim=towers.image.dim, **head_options)
        except (TypeError, ValueError) as error:
            raise ClipDecoderError(f"bad head option: {error}") from error
        config = ModelConfig(backbone=backbone, head=head, align_dim=align_dim, templates=check_templates(templates),
                             prior=prior, image_tower_trained=image_tower_trained)
        return cls(config, towers)

    @property
    def templates(self) -> tuple[str, ...]:
        """The prompt templates labels are embedded through (the model's own)."""
        return self.scorer.templates

    @property
    def preprocess(self):
        """How an image becomes the image tower's input."""
        return self.image_tower.preprocess

    @property
    def backbone(self) -> str:
        return self._config.backbone

    @property
    def trained_labels(self) -> tuple[str, ...]:
        return self.scorer.trained_labels

    def default_thresholds(self):
        """The model's default decision (``predict`` and ``serve`` with no decision option)."""
        return self.config.default_thresholds()

    @property
    def embed_labels(self) -> LabelEmbedder:
        """Label names -> text embeddings through prompt templates, cached (the scorer's)."""
        return self.scorer.embed_labels

    def saved_modules(self) -> dict[str, nn.Module]:
        """What the model folder holds: frozen towers are rebuilt from their backbone name; the
        prior's class-name embeddings are kept when the prior is on."""
        modules = {"head": self.head, "alignment": self.alignment}
        if self.scorer.prior.on and self.zero_shot.conse:
            modules["prior"] = self.zero_shot
        if self._config.image_tower_trained:
            modules["image_tower"] = self.image_tower
        return modules

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write config.json and model.safetensors into ``directory`` (created if needed)."""
        if self.scorer.prior.on:
            self.zero_shot.prepare()
        return ModelFolder(directory).write(self.config, self.saved_modules())

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, label_cache: str | os.PathLike | None = None) -> CLIPDecoder:
        """Load a model folder written by save_pretrained, or a packaged model by name ("openclipart");
        never unpickles anything. ``label_cache`` as in ``__init__``."""
        folder = ModelFolder.find(directory)
        config = folder.read_config()
        try:
            model = cls(config, label_cache=label_cache)
        except ClipDecoderError as error:  # unknown backbone, towers that do not fit the head
            raise ClipDecoderError(f"{folder / CONFIG_FILE}: {error}") from error
        folder.load_weights(model.saved_modules())
        return model

    def set_prior(self, prior: PriorConfig) -> None:
        """Score with ``prior`` from now on (saved with the model). More weight trusts the towers' own
        zero-shot view (images far from the training set's), less the trained head; see README."""
        self.scorer = self.scorer.with_prior(prior)

    def set_trained_labels(self, labels: Sequence[str]) -> None:
        """Record the labels the head was trained on (config.json's ``labels``; their prior weight is
        ``PriorConfig.seen_weight``)."""
        self.scorer = self.scorer.with_trained_labels(labels)

    def set_decision_threshold(self, threshold: float) -> None:
        """The trained labels' threshold in the model's default decision (ModelConfig.default_thresholds)."""
        self._config = replace(self._config, decision_threshold=float(threshold))

    def train(self, mode: bool = True) -> CLIPDecoder:
        """Train mode for the head; the frozen towers stay in eval mode (BatchNorm, dropout)."""
        super().train(mode)
        self.image_tower.eval()
        self.text_tower.eval()
        return self

    @property
    def device(self) -> torch.device:
        return next(self.head.parameters()).device

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
        return predict_scores(self, images, labels, templates, batch_size, progress, shortlist=shortlist)

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
        labels = checked_request(labels, batch_size)
        if shortlist is not None and shortlist < 1:
            raise ClipDecoderError(f"shortlist must be at least 1, got {shortlist}")
        return self._predict_batches(list(images), labels, templates, batch_size, shortlist, attention)

    def _predict_batches(self, images, labels, templates, batch_size, shortlist, attention) -> Iterator[PredictedBatch]:
        was_training = self.training
        self.eval()
        try:
            vocabulary = self.scorer.vocabulary(labels, templates)
            for batch in decoded_batches(images, self.image_tower.preprocess, batch_size,
                                         workers=decode_workers(self.device.type)):
                if not batch.indices:  # every image of this batch failed
                    yield PredictedBatch([], np.zeros((0, len(labels)), dtype=np.float32), batch.failed)
                    continue
                with torch.inference_mode():
                    scored = self.scorer.score(self.image_tower(torch.from_numpy(batch.pixels).to(self.device)), vocabulary, shortlist, attention)
                maps = scored.attention.cpu().numpy() if attention else None
                yield PredictedBatch(batch.indices, scored.probabilities.cpu().numpy(), batch.failed, maps)
        finally:
            self.train(was_training)
