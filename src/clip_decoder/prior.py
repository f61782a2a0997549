"""The zero-shot prior: what the towers already know of an image and a label, with no training.

For an image it gives one unit vector in the text space; a label's prior is that vector's cosine
with the label's text embedding. Towers with an ImageNet classifier (the offline tower) give
CONSE's vector: the class-name embeddings of the image's top classes, weighted by their
probabilities (Norouzi et al. 2014), here softened by a temperature. Towers whose pooled vector
already lives in the text space (CLIP) give that vector, so the prior is the model's own zero-shot
score. ``PriorConfig`` says how much of it each logit gets.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import resources

import torch
from torch import nn
from torch.nn import functional as F

from .encoders import ImageTower

CONSE_TOP = 10  # ImageNet classes averaged per image
CONSE_TEMPERATURE = 1.0  # Norouzi et al.'s CONSE: the classifier's own probabilities


@dataclass
class PriorConfig:
    """How the prior enters each logit: + weight x (cos(the image's prior vector, the label's text) - offset).

    Labels the head was trained on get ``seen_weight``: the head learned them from examples and
    knows them better than the prior does. Every other label gets ``weight``: there the head only
    transfers, and the prior carries what the towers know. ``temperature`` softens the ImageNet
    classifier's distribution before CONSE's top classes are averaged (classifier towers only).
    ``offset`` is the prior's mean cosine over the training images and labels (set by training),
    so that the prior moves no probability on average. The defaults were chosen on nested splits
    of the seen labels and the dev photos (docs/EXPERIMENTS.md); 0 and 0 turn the prior off.
    """

    weight: float = 20.0
    seen_weight: float = 10.0
    temperature: float = 3.0
    offset: float = 0.0

    def __post_init__(self) -> None:
        if self.weight < 0 or self.seen_weight < 0 or self.temperature <= 0:
            raise ValueError(f"prior weights must be >= 0 and its temperature > 0, got {self}")

    @property
    def on(self) -> bool:
        return bool(self.weight or self.seen_weight)

    @classmethod
    def off(cls) -> PriorConfig:
        return cls(weight=0.0, seen_weight=0.0)

    def to_dict(self) -> dict:
        return asdict(self)


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
    """Pooled image features (B, image_dim) -> unit vectors (B, text_dim) in the text space.

    ``embed_texts`` (label names -> embeddings) is called once, on first use, to embed the
    ImageNet class names of a classifier tower; the embeddings are a buffer, so a saved model
    keeps them and loading one never re-embeds them.
    """

    def __init__(self, image_tower: ImageTower, text_dim: int, embed_texts: Callable[[tuple[str, ...]], torch.Tensor],
                 temperature: float = PriorConfig.temperature) -> None:
        super().__init__()
        # Not submodules: the tower's weights belong to the model, not to the prior.
        self.tower_name, self.embed_texts, self.temperature = image_tower.name, embed_texts, temperature
        self.imagenet_logits = getattr(image_tower, "imagenet_logits", None)
        self.conse = self.imagenet_logits is not None
        self.available = self.conse or image_tower.dim == text_dim
        self.register_buffer("class_embeddings", torch.zeros(len(imagenet_class_names()) if self.conse else 0, text_dim))
        self.ready = not self.conse

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

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        if not self.available:
            raise ValueError(f"image tower {self.tower_name} has neither an ImageNet classifier nor a pooled"
                             " vector in the text space: it gives no zero-shot prior")
        if not self.conse:
            return F.normalize(pooled.float(), dim=-1)
        self.prepare()
        probabilities = (self.imagenet_logits(pooled.float()) / self.temperature).softmax(dim=-1)
        top = probabilities.topk(CONSE_TOP, dim=-1)
        weights = torch.zeros_like(probabilities).scatter_(1, top.indices, top.values)
        weights = weights / weights.sum(dim=1, keepdim=True)
        return F.normalize(weights @ self.class_embeddings, dim=-1)
