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
from dataclasses import asdict, dataclass, field
from importlib import resources

import torch
from torch import nn
from torch.nn import functional as F

from .encoders import ImageTower

CONSE_TOP = 10  # ImageNet classes averaged per image
CONSE_TEMPERATURE = 1.0  # Norouzi et al.'s CONSE: the classifier's own probabilities


@dataclass(frozen=True)
class PriorConfig:
    """How the prior enters each logit: + weight x (cos(p, t) - centring x t . m - offset), where p is the
    image's prior vector, t the label's text embedding (both unit) and m ``reference_mean``.

    Labels the head was trained on get ``seen_weight``: the head learned them from examples and
    knows them better than the prior does. Every other label gets ``weight``: there the head only
    transfers, and the prior carries what the towers know. ``temperature`` softens the ImageNet
    classifier's distribution before CONSE's top classes are averaged (classifier towers only).
    ``reference_mean`` is the mean prior vector over the training images (set by training, at
    ``temperature``), so t . m is the label's own mean cosine over them (the prior is linear in p).
    ``centring`` is the share of it taken off: at 1 a label whose text sits near every image's prior
    vector (a "hub": person, object) gets no more than any other label on an average image; at 0 every
    label is measured from one mean, which keeps what hubs also carry, how common a label is. The rest,
    (1 - centring) x the mean of t . m over the trained labels, is ``offset`` (set by training; models
    from before the reference mean, format 2, hold their one mean cosine there). The defaults were
    chosen on nested splits of the seen labels and the dev photos (docs/EXPERIMENTS.md); weights 0 and
    0 turn the prior off.
    Frozen: a changed setting is a new config (``dataclasses.replace``). Fields with ``help``
    metadata are command-line options, ``--prior-<name>``.
    """

    weight: float = field(default=20.0, metadata={"help": "weight of the zero-shot prior in the logit of a label the"
                                                          " head was not trained on: more trusts the towers' own view"})
    seen_weight: float = field(default=10.0, metadata={"help": "the same for the labels the head was trained on;"
                                                               " both 0: the prior is off"})
    temperature: float = field(default=3.0, metadata={"help": "softens the ImageNet classifier's distribution before"
                                                              " CONSE's top classes make the prior (ImageNet towers)"})
    centring: float = field(default=0.5, metadata={"help": "share of each label's own mean prior over the training"
                                                           " images taken off its prior (1: per label, no hubs; 0: one"
                                                           " mean for every label)"})
    reference_mean: tuple[float, ...] = ()
    offset: float = 0.0

    def __post_init__(self) -> None:
        if self.weight < 0 or self.seen_weight < 0 or self.temperature <= 0 or not 0 <= self.centring <= 1:
            raise ValueError(f"prior weights must be >= 0, its temperature > 0 and its centring in [0, 1], got weight"
                             f" {self.weight}, seen_weight {self.seen_weight}, temperature {self.temperature},"
                             f" centring {self.centring}")
        object.__setattr__(self, "reference_mean", tuple(float(value) for value in self.reference_mean))

    @property
    def on(self) -> bool:
        return bool(self.weight or self.seen_weight)

    @classmethod
    def off(cls) -> PriorConfig:
        return cls(weight=0.0, seen_weight=0.0)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["reference_mean"] = list(self.reference_mean)
        return data


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
