"""The zero-shot prior: what the towers already know of an image and a label, with no training.

For an image it gives one unit vector in the text space; a label's prior is that vector's cosine
with the label's text embedding. Towers with an ImageNet classifier (the offline tower) give
CONSE's vector: the class-name embeddings of the image's top classes, weighted by their
probabilities (Norouzi et al. 2014), here softened by a temperature. Towers whose pooled vector
already lives in the text space (CLIP) give that vector, so the prior is the model's own zero-shot
score. Which of the two a tower gives is its declared ``zero_shot`` view (encoders.base).
``PriorConfig`` says how much of it each logit gets; the scorer holds the one in use.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable
from importlib import resources

import torch
from torch import nn
from torch.nn import functional as F

from .configs import PriorConfig
from .encoders import ImageTower

CONSE_TOP = 10  # ImageNet classes averaged per image
CONSE_TEMPERATURE = 1.0  # Norouzi et al.'s CONSE: the classifier's own probabilities


def prior_logits(vectors: torch.Tensor, directions: torch.Tensor, weights: torch.Tensor, config: PriorConfig,
                 reference_mean: torch.Tensor | None) -> torch.Tensor:
    """The prior's share of each logit (B, L): weights (B, L) or (L,) x (cos(p, t) - centring x t . m - offset),
    for the images' prior vectors p (B, text_dim) and the labels' unit texts t (L, text_dim); m is the reference
    mean (None: no centring on it, as in models from before it). The torch scorer and the ONNX export both use it."""
    reference = config.centring * (directions @ reference_mean) if reference_mean is not None else 0.0
    return weights * (vectors @ directions.T - reference - config.offset)


@functools.cache
def imagenet_class_names() -> tuple[str, ...]:
    """The 1,000 ImageNet classes in the classifier's order, by their first name, made unique
    (two classes are called 'crane', two 'maillot'): the second becomes 'crane (2)'. Read once."""
    text = resources.files("clip_decoder.data").joinpath("imagenet_classes.txt").read_text(encoding="utf-8")
    names, counts = [], Counter()
    for line in filter(str.strip, text.splitlines()):
        name = line.split("\t", 1)[1].split(",")[0].strip()
        counts[name] += 1
        names.append(name if counts[name] == 1 else f"{name} ({counts[name]})")
    return tuple(names)


class ZeroShotPrior(nn.Module):
    """Pooled image features (B, image_dim) -> unit vectors (B, text_dim) in the text space, as the
    image tower's declared ``zero_shot`` view makes them (encoders.base.ImageTower).

    ``embed_texts`` (label names -> embeddings) is called once, on first use, to embed the
    ImageNet class names of a classifier tower; the embeddings are a buffer, so a saved model
    keeps them and loading one never re-embeds them.
    """

    def __init__(self, image_tower: ImageTower, text_dim: int,
                 embed_texts: Callable[[tuple[str, ...]], torch.Tensor]) -> None:
        super().__init__()
        # Not submodules: the tower's weights belong to the model, not to the prior.
        self.tower_name, self.view, self.embed_texts = image_tower.name, image_tower.zero_shot, embed_texts
        self.conse = self.view == "imagenet"
        self.classify = image_tower.imagenet_logits if self.conse else None
        self.register_buffer("class_embeddings", torch.zeros(len(imagenet_class_names()) if self.conse else 0, text_dim))
        self.ready = not self.conse

    @property
    def available(self) -> bool:
        return self.view is not None

    def prepare(self) -> None:
        """Embed the class names if that was not done (or loaded) yet."""
        if not self.ready:
            with torch.inference_mode():
                embeddings = self.embed_texts(imagenet_class_names()).float()
            self.class_embeddings.copy_(embeddings)
            self.ready = True

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self.ready = True

    def confidence(self, pooled: torch.Tensor) -> torch.Tensor:
        """How sure the towers are of each image (B,), in [0, 1]: an ImageNet tower's top class probability (at
        the classifier's own temperature); 1 for a tower whose pooled vector already lives in the text space."""
        if not self.conse:
            return torch.ones_like(pooled[:, 0], dtype=torch.float32)  # (B,), with B dynamic in an export
        return self.classify(pooled.float()).softmax(dim=-1).amax(dim=-1)

    def forward(self, pooled: torch.Tensor, temperature: float = CONSE_TEMPERATURE) -> torch.Tensor:
        """The prior vectors; ``temperature`` divides an ImageNet tower's logits (PriorConfig.temperature)."""
        if not self.available:
            raise ValueError(f"image tower {self.tower_name} declares no zero-shot view: it gives no prior")
        if not self.conse:
            return F.normalize(pooled.float(), dim=-1)
        self.prepare()
        probabilities = (self.classify(pooled.float()) / temperature).softmax(dim=-1)
        top = probabilities.topk(CONSE_TOP, dim=-1)
        weights = torch.zeros_like(probabilities).scatter_(1, top.indices, top.values)
        weights = weights / weights.sum(dim=1, keepdim=True)
        return F.normalize(weights @ self.class_embeddings, dim=-1)
