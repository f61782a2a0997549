"""Tagging with a tower's own zero-shot view and no trained head: ``predict`` / ``serve --backbone NAME``.

A tower whose pooled image vector lives in its text tower's space (CLIP, SigLIP: zero-shot view
"joint") scores a label by the cosine of the image's and the label text's embeddings. What that
cosine means is what the model was trained for:

- SigLIP was trained with a sigmoid per (image, text) pair, so its own probability is independent
  by construction: ``sigmoid(exp(logit_scale) x cos + logit_bias)``, and that is the score here.
- CLIP was trained with a softmax over each batch's texts, so a cosine alone is no probability. A
  label here gets CLIP's own softmax between two texts, the label's prompt and a neutral prompt
  (``NEUTRAL_LABEL`` through the same templates): ``sigmoid(exp(logit_scale) x (cos(label) -
  cos(neutral)))``. It is above 0.5 when the image is closer to the label than to "a photo of a
  thing", and it depends on no other label asked.

There is no trained head, so no heatmaps (an answer has none) and no shortlist; the default
decision is 0.5.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.nn import functional as F

from .decoding import (DEFAULT_BATCH_SIZE, PredictedBatch, checked_request, decode_workers, decoded_batches,
                       predict_scores)
from .encoders import Backbone, create_backbone
from .errors import ClipDecoderError
from .prompts import DEFAULT_TEMPLATES, LabelEmbedder, check_templates
from .thresholds import Thresholds

NEUTRAL_LABEL = "thing"  # CLIP's second text: "a photo of a thing." (through the templates)


class ZeroShotTagger:
    """A backbone's towers tagging with their own zero-shot view (see the module); keeps ``decoding.Tagger``."""

    def __init__(self, backbone: Backbone, templates: Sequence[str] = DEFAULT_TEMPLATES,
                 label_cache: str | os.PathLike | None = None) -> None:
        image = backbone.image
        if image.zero_shot != "joint" or getattr(image, "logit_scale", None) is None:
            raise ClipDecoderError(f"backbone {backbone.name!r} has no image-text space of its own to tag with (its"
                                   f" zero-shot view is {image.zero_shot!r}); tag with a trained model, --model"
                                   " (the packaged one by default)")
        self.image_tower, self.text_tower, self.backbone = image, backbone.text, backbone.name
        self.preprocess, self.templates, self.trained_labels = image.preprocess, check_templates(templates), ()
        self.scale, self.bias = image.logit_scale, image.logit_bias
        self.embed_labels = LabelEmbedder(self.text_tower, folder=label_cache)

    @classmethod
    def load(cls, backbone: str, templates: Sequence[str] = DEFAULT_TEMPLATES,
             label_cache: str | os.PathLike | None = None) -> ZeroShotTagger:
        """The towers of the backbone called ``backbone`` (``hf:<hub id or folder>``)."""
        return cls(create_backbone(backbone), templates, label_cache)

    def default_thresholds(self) -> Thresholds:
        """0.5 for every label: no label was trained, and 0.5 is where both rules' logit changes sign."""
        return Thresholds()

    @torch.inference_mode()
    def logits(self, pooled: torch.Tensor, labels: Sequence[str], templates: Sequence[str] | None = None) -> torch.Tensor:
        """Pooled image vectors (B, dim) -> each label's logit (B, L), by the tower's own rule (the module's)."""
        templates = check_templates(templates or self.templates)
        names = [*labels, *([] if self.bias is not None else [NEUTRAL_LABEL])]
        texts = torch.from_numpy(self.embed_labels.arrays(list(dict.fromkeys(names)), templates)).to(pooled.device)
        cosines = F.normalize(pooled.float(), dim=-1) @ texts.T
        if self.bias is not None:
            return self.scale * cosines + self.bias
        return self.scale * (cosines[:, : len(labels)] - cosines[:, names.index(NEUTRAL_LABEL)].unsqueeze(1))

    def predict(self, images: Sequence, labels: Sequence[str], templates: Sequence[str] | None = None,
                batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = False) -> np.ndarray:
        """Independent probabilities (n_images, n_labels), as ``CLIPDecoder.predict``."""
        return predict_scores(self, images, labels, templates, batch_size, progress)

    def predict_batches(self, images: Sequence, labels: Sequence[str], templates: Sequence[str] | None = None,
                        batch_size: int = DEFAULT_BATCH_SIZE, shortlist: int | None = None,
                        attention: bool = False) -> Iterator[PredictedBatch]:
        """``predict`` batch by batch, unreadable images reported in each batch's ``failed``; no attention maps
        (``attention`` gives None: there is no head whose attention to show)."""
        labels = checked_request(labels, batch_size)
        if shortlist is not None:
            raise ClipDecoderError("--shortlist needs a trained model (--model): a tower alone scores every label")
        return self._predict_batches(list(images), labels, templates, batch_size)

    def _predict_batches(self, images, labels, templates, batch_size) -> Iterator[PredictedBatch]:
        self.logits(torch.zeros(0, self.image_tower.dim), labels, templates)  # embeds the labels before any image
        device = next(iter(self.image_tower.parameters())).device
        for batch in decoded_batches(images, self.preprocess, batch_size, workers=decode_workers(device.type)):
            if not batch.indices:
                yield PredictedBatch([], np.zeros((0, len(labels)), dtype=np.float32), batch.failed)
                continue
            with torch.inference_mode():
                pooled = self.image_tower(torch.from_numpy(batch.pixels).to(device)).pooled
            scores = torch.sigmoid(self.logits(pooled, labels, templates)).cpu().numpy()
            yield PredictedBatch(batch.indices, scores, batch.failed)
