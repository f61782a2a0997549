"""Baselines in the same harness: CONSE and a linear map into the text space (DeViSE-style).

(The third baseline, ML-Decoder, is the CLIP-Decoder head trained with the alignment loss off:
the ``ml-decoder`` entry of ``training.methods``.)
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..errors import ClipDecoderError
from ..prior import CONSE_TEMPERATURE, ZeroShotPrior
from .losses import AsymmetricLoss

LINEAR_EPOCHS = 30


class ConSE:
    """Convex combination of semantic embeddings (Norouzi et al. 2014): the zero-shot prior alone.

    An image's top ImageNet classes, weighted by their probabilities, average the text
    embeddings of those class names; a label scores by its cosine with that average.
    """

    def __init__(self, prior: ZeroShotPrior) -> None:
        if not prior.conse:
            raise ClipDecoderError(f"CONSE needs an image tower with an ImageNet classifier; {prior.tower_name} has none")
        self.prior = prior

    @torch.inference_mode()
    def score(self, pooled: torch.Tensor, label_embeddings: torch.Tensor) -> np.ndarray:
        return (self.prior(pooled, CONSE_TEMPERATURE) @ label_embeddings.float().T).numpy()


class LinearMap(nn.Module):
    """A linear map from the pooled image vector into the text space, scored by cosine.

    Trained on seen labels with the same asymmetric loss as the head: logit = scale * cos + bias.
    """

    def __init__(self, image_dim: int, text_dim: int) -> None:
        super().__init__()
        self.project = nn.Linear(image_dim, text_dim)
        self.scale = nn.Parameter(torch.tensor(10.0))
        self.bias = nn.Parameter(torch.tensor(-5.0))

    def forward(self, pooled: torch.Tensor, label_embeddings: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(self.project(pooled), dim=-1) @ label_embeddings.T + self.bias

    def fit(self, pooled: torch.Tensor, targets: torch.Tensor, label_embeddings: torch.Tensor, seed: int,
            epochs: int = LINEAR_EPOCHS, batch_size: int = 64, lr: float = 1e-3, weight_decay: float = 1e-2) -> LinearMap:
        """Train on (pooled, targets over the labels of label_embeddings)."""
        generator = torch.Generator().manual_seed(seed)
        loss = AsymmetricLoss()
        optimizer = torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=weight_decay)
        for _ in range(epochs):
            order = torch.randperm(len(pooled), generator=generator)
            for start in range(0, len(pooled), batch_size):
                batch = order[start : start + batch_size]
                value = loss(self(pooled[batch].float(), label_embeddings), targets[batch])
                optimizer.zero_grad(set_to_none=True)
                value.backward()
                optimizer.step()
        return self.eval()

    @torch.inference_mode()
    def score(self, pooled: torch.Tensor, label_embeddings: torch.Tensor) -> np.ndarray:
        return torch.sigmoid(self(pooled.float(), label_embeddings.float())).numpy()
