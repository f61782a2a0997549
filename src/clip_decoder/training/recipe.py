"""A decoder method's recipe: what one training run trains, resolved from the options once.

A method (``methods.DecoderMethod``) turns a ``TrainConfig`` into a ``Recipe``: every head option,
the weighted loss terms, the prior the trained model scores with, the number of epochs and the
prompt templates. The recipe owns the training objective; the trainer, the loop and the harness
read the recipe, never the method registry.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, fields

from ..configs import HeadConfig, PriorConfig
from ..model import CLIPDecoder
from ..prompts import TEMPLATE_SETS
from .config import TrainConfig
from .losses import LOSS_TERMS, Objective

HEAD_DEFAULTS = {item.name: item.default for item in fields(HeadConfig) if item.default is not MISSING}


@dataclass(frozen=True)
class Recipe:
    """One decoder method's training, resolved from ``config``."""

    method: str
    config: TrainConfig  # the options it was resolved from (seed, optimiser, batches, ...)
    head: dict  # every HeadConfig option but the towers' widths
    losses: dict[str, float]  # loss term (losses.LOSS_TERMS) -> its weight
    prior: PriorConfig  # how the prior enters the trained model's scores (PriorConfig.off(): not at all)
    epochs: int

    @property
    def templates(self) -> tuple[str, ...]:
        return TEMPLATE_SETS[self.config.templates]

    @property
    def trains(self) -> tuple[str, ...]:
        """The model's parts that train: the head, the parts its loss terms train, and the image tower when asked."""
        parts = ["head", *(part for name in self.losses for part in LOSS_TERMS[name].trains)]
        return tuple(dict.fromkeys(parts + (["image_tower"] if self.config.finetune_image_tower else [])))

    def objective(self, model: CLIPDecoder) -> Objective:
        """The module a training step minimises (and DDP wraps)."""
        return Objective(model, self.losses, self.config.finetune_image_tower)

    def training_key(self) -> str:
        """What the trained weights depend on: the options but the method's name and the prior, which enters
        at scoring. Methods with the same key train the same head (the harness trains it once)."""
        options = {k: v for k, v in asdict(self.config).items() if k not in ("method", "head", "prior")}
        return json.dumps([options, self.head, self.losses, self.epochs], sort_keys=True)

    def describe(self) -> str:
        """One line: what it trains and how, for the results page."""
        head, config, prior = self.head, self.config, self.prior
        skip = "with" if head["cosine_skip"] else "without"
        loss = " + ".join(name_of_loss(name, weight) for name, weight in self.losses.items() if weight)
        head_only = (f", off on the trained labels the head alone ranks better on the validation part by more than"
                     f" {prior.head_only_margin} AP" if prior.head_only_margin is not None else "")
        confidence = (f", each + {prior.confidence_weight} x the classifier's top probability"
                      if prior.confidence_weight else "")
        mixed = (f"; + zero-shot prior (weight {prior.weight}, {prior.seen_weight} on trained labels{confidence},"
                 f" temperature {prior.temperature}{head_only})" if prior.on else "")
        return (f"head d {head['dim']}, FFN {head['ffn_dim']}, dropout {head['dropout']}, {skip} cosine skip;"
                f" {loss}; {self.epochs} epochs, batch {config.batch_size}, lr {config.lr},"
                f" weight decay {config.weight_decay}, EMA {config.ema_decay}; {config.templates} prompts{mixed}")


def name_of_loss(name: str, weight: float) -> str:
    """How the results page names a weighted loss term: 'ASL', '0.1 x alignment', 'w x name'."""
    shown = {"cls": "ASL", "clip": "alignment"}.get(name, name)
    return shown if name == "cls" and weight == 1.0 else f"{weight} x {shown}"
