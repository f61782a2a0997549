"""The alignment projections: pooled image memory and label text into one shared space.

They train with the CLIP-style loss (``training.losses.contrastive_loss``) and serve inference
as the shortlist's cheap first stage. The projections and the temperature are registered
parameters, so they train and are saved (the authors' code made them plain tensors).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

MAX_LOGIT_SCALE = 100.0  # as CLIP: the learned temperature's scale is capped


class Alignment(nn.Module):
    """Two linear maps into a ``dim``-d space compared by cosine, and a learnable temperature."""

    def __init__(self, image_dim: int, text_dim: int, dim: int = 256, init_temperature: float = 0.07):
        super().__init__()
        self.image_proj = nn.Linear(image_dim, dim)
        self.text_proj = nn.Linear(text_dim, dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))

    def embed_images(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled memory (B, image_dim) -> unit vectors (B, dim)."""
        return F.normalize(self.image_proj(pooled), dim=-1)

    def embed_texts(self, text_embeddings: torch.Tensor) -> torch.Tensor:
        """Text embeddings (L, text_dim) -> unit vectors (L, dim)."""
        return F.normalize(self.text_proj(text_embeddings), dim=-1)

    def scale(self) -> torch.Tensor:
        """The inverse temperature, capped at MAX_LOGIT_SCALE."""
        return self.logit_scale.clamp(max=math.log(MAX_LOGIT_SCALE)).exp()
