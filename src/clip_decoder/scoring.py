"""The one path from image features and a vocabulary to probabilities.

predict, serve, evaluate, calibrate, training-time validation and the benchmark all score
through a ``Scorer``: a vocabulary's per-label work is computed once and cached, (image, label)
pairs are decoded in chunks, and ``shortlist=K`` (approximate) decodes only each image's K most
likely labels. A change to how a label is scored is a change here.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from .alignment import Alignment
from .configs import PriorConfig
from .encoders import ImageFeatures
from .errors import ClipDecoderError
from .head import DecoderHead, LabelQueries
from .metrics import average_precision
from .prior import ZeroShotPrior, prior_logits
from .prompts import LabelEmbedder, check_labels

VOCABULARY_CACHE_SIZE = 8  # vocabularies whose per-label work is kept
# At most this many (image, label) pairs are decoded at once: past it the intermediate tensors
# (pairs x FFN width) outgrow the CPU caches and the head runs memory-bound.
PAIRS_PER_CHUNK = 16_384
STORED_ROWS_PER_BATCH = 256  # stored features moved to the model's device at once


@dataclass(frozen=True)
class Vocabulary:
    """A label set's share of scoring, computed once and reused for every image."""

    labels: tuple[str, ...]
    queries: LabelQueries  # the head's per-label work
    aligned: torch.Tensor  # (L, align_dim) unit label texts in the alignment space: the shortlist's first stage


@dataclass
class Scores:
    """One batch's probabilities (B, L) and, when asked for, each label's attention over the tokens (B, L, N)."""

    probabilities: torch.Tensor
    attention: torch.Tensor | None = None


class Scorer:
    """Image features x a vocabulary -> independent probabilities, through one head and alignment.

    It holds the one ``PriorConfig`` in use: ``with_prior`` gives a scorer with another (the
    same modules and vocabulary cache), ``centred_prior`` the config centred on the training images.
    """

    def __init__(self, head: DecoderHead, alignment: Alignment, embed_labels: LabelEmbedder,
                 templates: Sequence[str], zero_shot: ZeroShotPrior | None = None,
                 prior: PriorConfig = PriorConfig.off(), trained_labels: Sequence[str] = ()) -> None:
        """``zero_shot`` (the prior vectors) and ``prior`` (how their cosine enters each logit) add
        the zero-shot prior; ``trained_labels`` are the labels the head was trained on."""
        self.head, self.alignment, self.embed_labels = head, alignment, embed_labels
        self.templates = tuple(templates)
        self.zero_shot, self.trained_labels = zero_shot, tuple(trained_labels)
        self.prior = self._checked(prior)
        self._vocabularies: OrderedDict[tuple, Vocabulary] = OrderedDict()

    def _checked(self, prior: PriorConfig) -> PriorConfig:
        if prior.on and (self.zero_shot is None or not self.zero_shot.available):
            tower = self.zero_shot.tower_name if self.zero_shot is not None else "this model's image tower"
            raise ClipDecoderError(f"{tower} gives no zero-shot prior; turn the prior off (weights 0)")
        return prior

    def with_prior(self, prior: PriorConfig) -> Scorer:
        """This scorer with ``prior`` instead of its own (sharing its modules and vocabulary cache)."""
        return self._with(prior=self._checked(prior))

    def with_trained_labels(self, labels: Sequence[str]) -> Scorer:
        """This scorer for a head trained on ``labels`` (their prior weight is ``PriorConfig.seen_weight``)."""
        return self._with(trained_labels=tuple(labels))

    def _with(self, **changes) -> Scorer:
        scorer = copy.copy(self)  # the vocabulary cache is shared: a vocabulary depends on the weights alone
        vars(scorer).update(changes)
        return scorer

    @property
    def device(self) -> torch.device:
        return next(self.head.parameters()).device

    def _weights_key(self) -> tuple:
        """Changes whenever a weight is replaced or updated in place (load, optimizer step, .to())."""
        parameters = [*self.head.parameters(), *self.alignment.parameters()]
        return tuple((p.data_ptr(), p._version, p.dtype) for p in parameters)

    @torch.inference_mode()
    def vocabulary(self, labels: Sequence[str], templates: Sequence[str] | None = None) -> Vocabulary:
        """The per-label work for ``labels`` (embedding, query projection, first-layer query norm
        and projection), cached for the most recent vocabularies until the weights change."""
        labels = tuple(check_labels(labels))
        templates = tuple(templates or self.templates)
        key = (labels, templates, self._weights_key())
        if key not in self._vocabularies:
            embeddings = self.embed_labels(labels, templates).to(self.device)
            self._vocabularies[key] = Vocabulary(labels, self.head.queries(embeddings), self.alignment.embed_texts(embeddings))
            while len(self._vocabularies) > VOCABULARY_CACHE_SIZE:
                self._vocabularies.popitem(last=False)
        self._vocabularies.move_to_end(key)
        return self._vocabularies[key]

    @torch.inference_mode()
    def score(self, features: ImageFeatures, vocabulary: Vocabulary, shortlist: int | None = None,
              attention: bool = False) -> Scores:
        """A batch of image features (on the model's device) -> probabilities (B, L).

        With ``shortlist=K`` (approximate): a first stage scores every label by the cosine of the
        pooled memory and the label text in the alignment space; only each image's top K labels
        go through the decoder. The others get ``floor * (1 + cosine) / 2``, where floor is the
        image's lowest decoded probability, so they rank below every decoded label and keep the
        first stage's order among themselves. ``attention=True`` adds each label's first-layer
        cross-attention over the image tokens (``DecoderHead.attention_maps``).
        """
        memory = self.head.memory(features.tokens.float())
        maps = self.head.attention_maps(memory, vocabulary.queries) if attention else None
        prior = self.prior_logits(features.pooled, vocabulary) if self.prior.on else 0.0
        return Scores(self._probabilities(memory, vocabulary, shortlist, prior), maps)

    def prior_logits(self, pooled: torch.Tensor, vocabulary: Vocabulary) -> torch.Tensor:
        """(B, L): weight x (cos(the image's prior vector, the label's text) - centring x the label's mean cosine
        over the training images - offset), as PriorConfig says; the weight is ``prior.seen_weight`` for labels
        the head was trained on (0 for ``prior.head_only``), ``prior.weight`` for the others, each plus
        ``prior.confidence_weight`` x the image's confidence (``ZeroShotPrior.confidence``)."""
        labels, trained = vocabulary.labels, self.trained_labels
        weights = torch.tensor(self.prior.label_weights(labels, trained), device=self.device)
        if self.prior.confidence_weight:
            gains = torch.tensor(self.prior.confidence_gains(labels, trained), device=self.device)
            weights = weights + gains * self.zero_shot.confidence(pooled)[:, None]
        reference_mean = self._reference_mean() if self.prior.reference_mean else None
        return prior_logits(self.zero_shot(pooled, self.prior.temperature), vocabulary.queries.directions, weights,
                            self.prior, reference_mean)

    def _reference_mean(self) -> torch.Tensor:
        mean = torch.tensor(self.prior.reference_mean, dtype=torch.float32, device=self.device)
        if mean.shape != (self.zero_shot.class_embeddings.shape[1],):
            raise ClipDecoderError(f"the prior's reference mean has {len(mean)} values; the text tower gives"
                                   f" {self.zero_shot.class_embeddings.shape[1]}")
        return mean

    @torch.inference_mode()
    def centred_prior(self, pooled: torch.Tensor, labels: Sequence[str], rows_per_batch: int = 4096) -> PriorConfig:
        """This scorer's prior centred on these images (pooled features, any device; the training images) and
        ``labels`` (the trained labels): their mean prior vector m becomes its reference mean, and the offset
        (1 - centring) x the labels' mean t . m, so that on an average image of theirs the prior moves no
        probability on average (at centring 1: no label's, hub or not). Each label's ranking of images changes
        only through the confidence weight (a per-image factor on the centre)."""
        if not self.prior.on:
            return self.prior
        total = sum(self.zero_shot(pooled[start : start + rows_per_batch].to(self.device), self.prior.temperature).sum(0)
                    for start in range(0, len(pooled), rows_per_batch))
        mean = total / len(pooled)
        shared = float((self.vocabulary(labels).queries.directions @ mean).mean())
        return replace(self.prior, reference_mean=tuple(mean.tolist()), offset=(1 - self.prior.centring) * shared)

    @torch.inference_mode()
    def head_only_labels(self, tokens: torch.Tensor, pooled: torch.Tensor, targets: np.ndarray,
                         labels: Sequence[str]) -> tuple[str, ...]:
        """The trained ``labels`` whose images (stored features and their targets (n, L); the validation part)
        the head alone ranks better than with the prior, by more than ``prior.head_only_margin`` AP (None:
        none): ``PriorConfig.head_only``. Labels without a positive image here keep the prior."""
        margin = self.prior.head_only_margin
        if margin is None or not self.prior.seen_weight:
            return ()
        with_prior = self.with_prior(replace(self.prior, head_only=()))
        alone = self.with_prior(replace(self.prior, seen_weight=0.0, head_only=()))
        prior_on, prior_off = (scorer.score_stored(tokens, pooled, scorer.vocabulary(labels))
                               for scorer in (with_prior, alone))

        def gain_alone(j: int) -> float:
            return average_precision(prior_off[:, j], targets[:, j]) - average_precision(prior_on[:, j], targets[:, j])
        return tuple(label for j, label in enumerate(labels) if targets[:, j].any() and gain_alone(j) > margin)

    def _probabilities(self, memory: torch.Tensor, vocabulary: Vocabulary, shortlist: int | None,
                       prior: torch.Tensor | float) -> torch.Tensor:
        if shortlist is None or shortlist >= len(vocabulary.labels):
            step = max(1, PAIRS_PER_CHUNK // len(memory))
            chunks = [self.head.decode(memory, vocabulary.queries.select(slice(start, start + step)))
                      for start in range(0, len(vocabulary.labels), step)]
            return torch.sigmoid(torch.cat(chunks, dim=1).float() + prior)
        if shortlist < 1:
            raise ClipDecoderError(f"shortlist must be at least 1, got {shortlist}")
        cosine = (self.alignment.embed_images(memory.mean(dim=1)) @ vocabulary.aligned.T).float()
        top = cosine.topk(shortlist, dim=1).indices
        decoded = self.head.decode(memory, vocabulary.queries.select(top)).float()
        decoded = torch.sigmoid(decoded + prior.gather(1, top) if torch.is_tensor(prior) else decoded)
        floor = decoded.min(dim=1, keepdim=True).values
        return (floor * (1 + cosine) / 2).scatter_(1, top, decoded)

    @torch.inference_mode()
    def score_stored(self, tokens: torch.Tensor, pooled: torch.Tensor, vocabulary: Vocabulary,
                     shortlist: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """Probabilities (n, L) of stored features (tokens (n, N, D), pooled (n, D), any device
        and dtype, or a store's ``StoredRows``), moved to the model's device a few hundred rows at a
        time; written into ``out`` (n, L) when given (e.g. a memory-mapped array), which is returned."""
        rows = [np.zeros((0, len(vocabulary.labels)), dtype=np.float32)]
        for start in range(0, len(tokens), STORED_ROWS_PER_BATCH):
            end = start + STORED_ROWS_PER_BATCH
            features = ImageFeatures(tokens[start:end].to(self.device), pooled[start:end].to(self.device))
            probabilities = self.score(features, vocabulary, shortlist).probabilities.cpu().numpy()
            if out is None:
                rows.append(probabilities)
            else:
                out[start:end] = probabilities
        return np.concatenate(rows) if out is None else out
