"""The model's settings as plain dataclasses, torch-free: the head's sizes and how the zero-shot prior
enters each logit. The command line's options are generated from their ``help`` metadata, and the ONNX
runtime reads them without torch; the modules that act on them are ``head`` and ``prior``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field


@dataclass
class HeadConfig:
    """Sizes of the decoder head. The defaults are the head ``clip-decoder train`` trains: smaller
    than ML-Decoder's (d 768, FFN 2048, dropout 0.1), which trains 4x slower here without a better
    score, and with the cosine skip (docs/EXPERIMENTS.md). ``help`` metadata becomes CLI help."""

    text_dim: int
    image_dim: int
    dim: int = field(default=256, metadata={"help": "width of the decoder"})
    layers: int = field(default=1, metadata={"help": "cross-attention layers"})
    heads: int = field(default=8, metadata={"help": "attention heads"})
    ffn_dim: int = field(default=512, metadata={"help": "width of the feed-forward layer"})
    dropout: float = field(default=0.05, metadata={"help": "dropout in the decoder"})
    # Adds scale * cos(pooled memory mapped to the text space, label text embedding) to each
    # logit: a linear-map path beside the decoder that keeps the text space's geometry.
    cosine_skip: bool = field(default=True, metadata={
        "help": "add the pooled image's cosine with each label's text embedding to its logit"})

    def __post_init__(self) -> None:
        self.cosine_skip = bool(self.cosine_skip)
        if self.layers < 1:
            raise ValueError(f"the head needs at least one layer, got {self.layers}")
        if self.dim % self.heads:
            raise ValueError(f"head dim {self.dim} is not divisible by heads {self.heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout {self.dropout} is not in [0, 1)")

    def to_dict(self) -> dict:
        return asdict(self)



@dataclass(frozen=True)
class PriorConfig:
    """How the prior enters each logit: + w x (cos(p, t) - centring x t . m - offset), where p is the
    image's prior vector, t the label's text embedding (both unit) and m ``reference_mean``; the label's
    weight w is its base weight (below) plus ``confidence_weight`` x c, where c is how sure the towers are of
    the image (for an ImageNet tower the classifier's top probability; 1 for a tower whose pooled vector
    already lives in the text space). So the prior counts most where the classifier is sure, and a label
    with base weight 0 (trained labels ``head_only``, or the prior off) gets none.

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
    0 turn the prior off. With ``head_only_margin`` set, training turns the prior off on each trained
    label whose validation images the head alone ranks better, by more than that AP: ``head_only`` (set
    by training). Off by default: on clip art it gives the trained labels back the head's AP, but the
    labels it picks there (cat, car) are the ones photos need the prior for (docs/EXPERIMENTS.md).
    Frozen: a changed setting is a new config (``dataclasses.replace``). Fields with ``help``
    metadata are command-line options, ``--prior-<name>``.
    """

    weight: float = field(default=20.0, metadata={"help": "weight of the zero-shot prior in the logit of a label the"
                                                          " head was not trained on: more trusts the towers' own view"})
    seen_weight: float = field(default=5.0, metadata={"help": "the same for the labels the head was trained on;"
                                                               " both 0: the prior is off"})
    confidence_weight: float = field(default=10.0, metadata={
        "help": "added to each label's prior weight (both of the above, when not 0), times how sure the towers are"
                " of the image (the ImageNet classifier's top probability): the prior counts most where it is sure"})
    temperature: float = field(default=3.0, metadata={"help": "softens the ImageNet classifier's distribution before"
                                                              " CONSE's top classes make the prior (ImageNet towers)"})
    centring: float = field(default=0.5, metadata={"help": "share of each label's own mean prior over the training"
                                                           " images taken off its prior (1: per label, no hubs; 0: one"
                                                           " mean for every label)"})
    head_only_margin: float | None = field(default=None, metadata={
        "help": "turn the prior off on each trained label whose validation images the head alone ranks better, by"
                " more than this AP (e.g. 0.02; default: never). For test images like the training images: it costs"
                " photos"})
    reference_mean: tuple[float, ...] = ()
    offset: float = 0.0
    head_only: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if (min(self.weight, self.seen_weight, self.confidence_weight) < 0 or self.temperature <= 0
                or not 0 <= self.centring <= 1 or (self.head_only_margin is not None and self.head_only_margin < 0)):
            raise ValueError(f"prior weights must be >= 0, its temperature > 0, its centring in [0, 1] and its"
                             f" head-only margin >= 0, got weight {self.weight}, seen_weight {self.seen_weight},"
                             f" confidence_weight {self.confidence_weight},"
                             f" temperature {self.temperature}, centring {self.centring}, head_only_margin"
                             f" {self.head_only_margin}")
        object.__setattr__(self, "reference_mean", tuple(float(value) for value in self.reference_mean))
        object.__setattr__(self, "head_only", tuple(str(label) for label in self.head_only))

    @property
    def on(self) -> bool:
        return bool(self.weight or self.seen_weight)

    @classmethod
    def off(cls) -> PriorConfig:
        return cls(weight=0.0, seen_weight=0.0)

    def label_weights(self, labels: Sequence[str], trained_labels: Sequence[str]) -> list[float]:
        """Each label's prior weight: ``seen_weight`` for the trained labels (0 for those ``head_only``
        names), ``weight`` for the others."""
        trained, head_only = set(trained_labels), set(self.head_only)
        return [0.0 if label in head_only else self.seen_weight if label in trained else self.weight for label in labels]

    def confidence_gains(self, labels: Sequence[str], trained_labels: Sequence[str]) -> list[float]:
        """Each label's weight per unit of the image's confidence: ``confidence_weight`` where its base weight
        (``label_weights``) is not 0. A label's weight on an image is base + gain x the image's confidence."""
        return [self.confidence_weight if weight else 0.0 for weight in self.label_weights(labels, trained_labels)]

    def to_dict(self) -> dict:
        data = asdict(self)
        data["reference_mean"] = list(self.reference_mean)
        data["head_only"] = list(self.head_only)
        return data
