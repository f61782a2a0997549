"""What training minimises: asymmetric loss on seen labels and contrastive image-text alignment,
declared as loss terms in a registry, and the ``Objective`` that sums a recipe's weighted terms.

A new loss is one ``register_loss(LossTerm(...))`` and a method whose recipe names it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..alignment import Alignment
from ..distributed import gather_rows


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


@dataclass
class StepOutputs:
    """What a training step computed, for the loss terms: the model, its memory and logits, the batch's targets
    and the embeddings of its images' sentences."""

    model: nn.Module  # the CLIPDecoder being trained (its head and alignment)
    memory: torch.Tensor  # (B, N, d)
    logits: torch.Tensor  # (B, seen labels)
    targets: torch.Tensor  # (B, seen labels) 0/1
    sentences: torch.Tensor  # (B, text_dim): each image's sentence naming its labels


@dataclass(frozen=True)
class LossTerm:
    """One term of the training objective, declared once (``register_loss``); a method's recipe names its terms."""

    name: str  # also the key of its value in the training log
    compute: Callable[[StepOutputs], torch.Tensor]
    weight: float | str = 1.0  # its weight: a number, or the TrainConfig option that holds it
    trains: tuple[str, ...] = ()  # the model's parts it trains besides the head, e.g. ("alignment",)


LOSS_TERMS: dict[str, LossTerm] = {}


def register_loss(term: LossTerm) -> LossTerm:
    """Add ``term`` to the registry (a name can be registered once)."""
    if term.name in LOSS_TERMS or term.name == "loss":
        raise ValueError(f"loss term {term.name!r} is registered already (or reserved)")
    LOSS_TERMS[term.name] = term
    return term


_ASL = AsymmetricLoss()
register_loss(LossTerm("cls", lambda out: _ASL(out.logits, out.targets)))
register_loss(LossTerm("clip", lambda out: contrastive_loss(out.model.alignment, out.memory.mean(dim=1), out.sentences),
                       weight="clip_weight", trains=("alignment",)))


class Objective(nn.Module):
    """A batch's training loss as one module (what DDP wraps): the tower when it trains, the head, and the
    weighted loss terms of a recipe."""

    def __init__(self, model: nn.Module, losses: dict[str, float], finetune: bool) -> None:
        super().__init__()
        self.model, self.losses, self.finetune = model, losses, finetune

    def forward(self, inputs: torch.Tensor, label_embeddings: torch.Tensor, targets: torch.Tensor,
                sentence_embeddings: torch.Tensor) -> dict[str, torch.Tensor]:
        """Tokens (or pixels when the tower trains), seen-label embeddings, targets and sentence
        embeddings -> the total loss ("loss") and each term's value."""
        tokens = self.model.image_tower(inputs).tokens if self.finetune else inputs
        head = self.model.head
        memory = head.memory(tokens.float())
        logits = head.decode(memory, head.queries(label_embeddings))
        outputs = StepOutputs(self.model, memory, logits, targets, sentence_embeddings)
        values = {name: LOSS_TERMS[name].compute(outputs) for name in self.losses}
        total = None
        for name, weight in self.losses.items():
            total = weight * values[name] if total is None else total + weight * values[name]
        return {"loss": total, **values}
