"""Training losses: asymmetric loss on seen labels, contrastive image-text alignment, their sum."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..alignment import Alignment
from .distributed import gather_rows


class AsymmetricLoss(nn.Module):
    """ASL (Ridnik et al. 2021) with a mask: entries where mask is 0 count neither way.

    Returns the masked sum divided by the number of images, so the value does not depend on
    the batch size. As in ML-Decoder's training, the focusing weight carries no gradient.
    """

    def __init__(self, gamma_neg: float = 4.0, gamma_pos: float = 0.0, clip: float = 0.05, eps: float = 1e-8):
        super().__init__()
        self.gamma_neg, self.gamma_pos, self.clip, self.eps = gamma_neg, gamma_pos, clip, eps

    def forward(
        self, logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        targets = targets.to(logits.dtype)
        p_pos = torch.sigmoid(logits)
        p_neg = 1.0 - p_pos
        if self.clip > 0:
            p_neg = (p_neg + self.clip).clamp(max=1.0)  # probability shifting for easy negatives
        loss = targets * torch.log(p_pos.clamp(min=self.eps)) + (1 - targets) * torch.log(
            p_neg.clamp(min=self.eps)
        )
        with torch.no_grad():
            p_true = p_pos * targets + p_neg * (1 - targets)
            gamma = self.gamma_pos * targets + self.gamma_neg * (1 - targets)
            focus = torch.pow(1.0 - p_true, gamma)
        loss = loss * focus
        if mask is not None:
            loss = loss * mask.to(logits.dtype)
        return -loss.sum() / logits.shape[0]


def contrastive_loss(alignment: Alignment, pooled: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
    """CLIP-style symmetric InfoNCE: pooled memory (B, image_dim) against one text embedding per
    image (B, text_dim); row i matches row i.

    Images whose sentences are identical get identical text rows; the loss then treats them
    exactly as if each were the other's positive, so no de-duplication is needed. Under torchrun
    the negatives are the whole global batch, gathered from every rank.
    """
    images = gather_rows(alignment.embed_images(pooled))
    texts = gather_rows(alignment.embed_texts(text_embeddings))
    logits = alignment.scale() * images @ texts.T
    targets = torch.arange(len(images), device=pooled.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


@dataclass(frozen=True)
class LossWeights:
    """Total loss = cls * ASL + clip * alignment (the authors' code defaults: 1 and 0.1)."""

    cls: float = 1.0
    clip: float = 0.1


def total_loss(classification: torch.Tensor, alignment: torch.Tensor, weights: LossWeights) -> torch.Tensor:
    """The weighted sum of the two losses."""
    return weights.cls * classification + weights.clip * alignment
