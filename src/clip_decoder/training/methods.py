"""Methods declared once: each names what it trains, how long, and how it scores unseen labels.

Two kinds. A ``DecoderMethod`` trains the decoder head: it resolves the options into a
``Recipe`` (head options, loss terms, prior, epochs), and ``clip-decoder train --method`` offers
it. A ``ScoreMethod`` is anything else, a function from a run to a score function (CONSE and the
prior alone, which train nothing; the linear map). A method is one ``register_method`` call; the
benchmark harness runs any registered method, and adding one touches nothing else.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ..configs import HeadConfig, PriorConfig
from ..data.folder import LabelSplit
from ..encoders import Backbone, create_backbone
from ..errors import ClipDecoderError
from ..model import CLIPDecoder
from ..model_folder import ModelConfig
from ..prior import CONSE_TEMPERATURE, CONSE_TOP, ZeroShotPrior, imagenet_class_names
from ..prompts import TEMPLATE_SETS, LabelEmbedder
from ..thresholds import Thresholds
from .baselines import LINEAR_EPOCHS, ConSE, LinearMap
from .config import TrainConfig
from .data import FeatureSet
from .loop import finish_training, fit
from .losses import LOSS_TERMS
from .recipe import HEAD_DEFAULTS, Recipe

# A trained method: stored features (tokens and pooled) and any label names -> scores (images, labels).
ScoreFunction = Callable[[FeatureSet, list[str]], np.ndarray]


@dataclass(frozen=True)
class TrainedMethod:
    """What training a method gives: its score function and, for a decoder model, its default decision
    (ModelConfig.default_thresholds; None: its scores are not probabilities to decide on)."""

    score: ScoreFunction
    decision: Thresholds | None = None

FROM_OPTIONS = "options"  # a decoder method's prior: the one the options give (--prior-weight ...)


@dataclass
class MethodRun:
    """One method, one seed, one label split: what a method gets to train on."""

    backbone: Backbone  # the loaded towers, shared by every run
    parts: dict[str, FeatureSet]  # "train", "val" and "test" features
    split: LabelSplit
    config: TrainConfig  # the training options, with this run's seed
    progress: bool = False
    # Shared by the runs of one benchmark (the harness passes the same dicts): decoder heads trained so far,
    # by what their training depends on (methods that differ only in their prior share one training), and
    # the towers' ImageNet class-name embeddings per template set (embedded once for every run).
    trained: dict = field(default_factory=dict)
    class_embeddings: dict = field(default_factory=dict)
    save_to: Path | None = None  # decoder methods write their trained model folder here

    @property
    def templates(self) -> tuple[str, ...]:
        return TEMPLATE_SETS[self.config.templates]

    def embedder(self) -> LabelEmbedder:
        """A label embedder of its own, so every run embeds its labels as a fresh model would."""
        return LabelEmbedder(self.backbone.text)

    def share_class_embeddings(self, zero_shot: ZeroShotPrior, templates: tuple[str, ...]) -> ZeroShotPrior:
        """``zero_shot`` with the towers' class-name embeddings through ``templates``: computed by the first run
        that needs them (unless the harness computed them beforehand), copied for the others."""
        if zero_shot.conse:
            if templates not in self.class_embeddings:
                self.class_embeddings[templates] = embed_class_names(self.backbone, templates)
            zero_shot.load_state_dict({"class_embeddings": self.class_embeddings[templates]})  # (copied in)
        return zero_shot

    def zero_shot(self) -> ZeroShotPrior:
        """The towers' zero-shot prior, its class names embedded (through the run's templates)."""
        embed = self.embedder()
        prior = ZeroShotPrior(self.backbone.image, self.backbone.text.dim, lambda names: embed(names, self.templates))
        return self.share_class_embeddings(prior, self.templates)


def embed_class_names(backbone: Backbone, templates: tuple[str, ...]) -> torch.Tensor:
    """The ImageNet class names through ``templates`` (the class vectors of the prior and of CONSE), by a label
    embedder of their own, as a fresh model embeds them."""
    return LabelEmbedder(backbone.text)(imagenet_class_names(), templates).float()


@dataclass(frozen=True)
class DecoderMethod:
    """A method that trains the decoder head: ``head`` options and loss terms fixed, trained for ``epochs``
    unless told otherwise; its trained model scores with ``prior`` (FROM_OPTIONS: the options' prior;
    None: no prior)."""

    name: str
    summary: str  # one line for --help
    epochs: int  # its tuned length (docs/EXPERIMENTS.md)
    head: dict = field(default_factory=dict)
    losses: tuple[str, ...] = ("cls", "clip")
    prior: PriorConfig | str | None = FROM_OPTIONS
    ablation: bool = False  # True: run by the benchmark only when asked for by name
    seeded = True

    def recipe(self, config: TrainConfig) -> Recipe:
        """This method's training under ``config``: the options, with what the method fixes."""
        unknown = [name for name in self.losses if name not in LOSS_TERMS]
        if unknown:
            raise ClipDecoderError(f"method {self.name!r} names unregistered loss terms: {', '.join(unknown)}")
        weights = {name: _weight(LOSS_TERMS[name].weight, config) for name in self.losses}
        prior = config.prior if self.prior == FROM_OPTIONS else self.prior
        return Recipe(self.name, replace(config, method=self.name), {**HEAD_DEFAULTS, **config.head, **self.head},
                      weights, prior or PriorConfig.off(), config.epochs or self.epochs)

    def describe(self, config: TrainConfig) -> str:
        return self.recipe(config).describe()

    def uses_zero_shot(self, config: TrainConfig) -> bool:
        """Whether its model scores with the towers' zero-shot prior (and so needs the class-name embeddings)."""
        return self.recipe(config).prior.on

    def train(self, run: MethodRun) -> TrainedMethod:
        """Train (or take the head a method with the same training already trained), then score through the
        trained model's own scorer and decide by its default rule."""
        recipe = self.recipe(run.config)
        model, key = untrained_model(recipe, run.backbone), (run.split.seen, recipe.training_key())
        if recipe.prior.on:
            run.share_class_embeddings(model.zero_shot, recipe.templates)
        if key in run.trained:
            for part, state in run.trained[key].items():
                getattr(model, part).load_state_dict(state)
            finish_training(model, run.parts["train"], run.parts["val"], run.split.seen)
        else:
            fit(model, run.parts["train"], run.parts["val"], run.split.seen, recipe, progress=run.progress)
            run.trained[key] = copy.deepcopy({part: getattr(model, part).state_dict() for part in ("head", "alignment")})
        if run.save_to is not None:
            model.save_pretrained(run.save_to)
        return TrainedMethod(lambda features, labels: model.scorer.score_stored(features.tokens, features.pooled,
                                                                                model.scorer.vocabulary(labels)),
                             model.config.default_thresholds())


def untrained_model(recipe: Recipe, backbone: str | Backbone) -> CLIPDecoder:
    """The seeded, untrained model ``recipe`` trains: on the named backbone (created after seeding, so its
    own random initialisation comes first, as `clip-decoder train` always did) or on loaded towers."""
    torch.manual_seed(recipe.config.seed)
    towers = create_backbone(backbone) if isinstance(backbone, str) else backbone
    head = HeadConfig(text_dim=towers.text.dim, image_dim=towers.image.dim, **recipe.head)
    config = ModelConfig(backbone=towers.name, head=head, templates=recipe.templates, prior=recipe.prior,
                         image_tower_trained=recipe.config.finetune_image_tower)
    return CLIPDecoder(config, towers)


def _weight(weight: float | str, config: TrainConfig) -> float:
    return getattr(config, weight) if isinstance(weight, str) else weight


@dataclass(frozen=True)
class ScoreMethod:
    """A method that is not a decoder head: ``build`` trains what it needs on the run's seen labels (or
    nothing) and returns its score function; ``description`` is its line on the results page."""

    name: str
    summary: str
    build: Callable[[MethodRun], ScoreFunction]
    description: Callable[[TrainConfig], str]
    seeded: bool = True  # False: the result does not depend on the seed, so the benchmark runs it once
    ablation: bool = False
    zero_shot: bool = False  # True: it uses the towers' zero-shot view (MethodRun.zero_shot)

    def describe(self, config: TrainConfig) -> str:
        return self.description(config)

    def uses_zero_shot(self, config: TrainConfig) -> bool:
        return self.zero_shot

    def train(self, run: MethodRun) -> TrainedMethod:
        return TrainedMethod(self.build(run))


Method = DecoderMethod | ScoreMethod
_METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add ``method`` to the registry (a name can be registered once)."""
    if method.name in _METHODS:
        raise ValueError(f"method {method.name!r} is registered already")
    _METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in _METHODS:
        raise ClipDecoderError(f"unknown method {name!r}; choose from {', '.join(_METHODS)}")
    return _METHODS[name]


def decoder_method(name: str) -> DecoderMethod:
    """The decoder method called ``name`` (what `clip-decoder train --method` trains)."""
    method = get_method(name)
    if not isinstance(method, DecoderMethod):
        raise ClipDecoderError(f"method {name!r} trains no decoder head; choose from {', '.join(decoder_methods())}")
    return method


def method_names(ablations: bool = True) -> tuple[str, ...]:
    """Registered methods; without ``ablations``, those the benchmark runs by default."""
    return tuple(name for name, method in _METHODS.items() if ablations or not method.ablation)


def decoder_methods() -> tuple[str, ...]:
    """The methods ``clip-decoder train`` can train: a decoder head."""
    return tuple(name for name, method in _METHODS.items() if isinstance(method, DecoderMethod))


def _train_linear(run: MethodRun) -> ScoreFunction:
    embed, templates, train = run.embedder(), run.templates, run.parts["train"]
    torch.manual_seed(run.config.seed)
    linear = LinearMap(train.pooled.shape[1], run.backbone.text.dim)
    linear.fit(train.pooled, train.targets(run.split.seen), embed(list(run.split.seen), templates), run.config.seed)
    return lambda features, labels: linear.score(features.pooled[:], embed(labels, templates))  # ([:] reads a store's rows)


def _train_conse(run: MethodRun) -> ScoreFunction:
    embed, conse = run.embedder(), ConSE(run.zero_shot())
    return lambda features, labels: conse.score(features.pooled[:], embed(labels, run.templates))


def _train_prior_alone(run: MethodRun) -> ScoreFunction:
    embed, prior, temperature = run.embedder(), run.zero_shot(), run.config.prior.temperature

    @torch.inference_mode()
    def score(features: FeatureSet, labels: list[str]) -> np.ndarray:
        return (prior(features.pooled[:], temperature) @ embed(labels, run.templates).float().T).numpy()
    return score


register_method(DecoderMethod(
    "clip-decoder", "CLIP-Decoder: the decoder head with the cosine skip, ASL + alignment loss, zero-shot prior",
    epochs=10))
register_method(DecoderMethod(
    "clip-decoder-no-prior", "ablation: CLIP-Decoder without the zero-shot prior", epochs=10, prior=None,
    ablation=True))
register_method(DecoderMethod(
    "clip-decoder-one-prior-weight", "ablation: CLIP-Decoder with the prior as it was: one weight (10) for every"
    " label and image, the ImageNet classifier's own probabilities (temperature 1)", epochs=10,
    prior=PriorConfig(weight=10.0, seen_weight=10.0, confidence_weight=0.0, temperature=CONSE_TEMPERATURE),
    ablation=True))
register_method(DecoderMethod(
    "clip-decoder-head-only", "ablation: CLIP-Decoder with the prior off on the trained labels whose validation"
    " images the head alone ranks better by more than 0.02 AP (--prior-head-only-margin 0.02)", epochs=10,
    prior=PriorConfig(head_only_margin=0.02), ablation=True))
register_method(DecoderMethod(
    "clip-decoder-no-alignment", "ablation: CLIP-Decoder without the alignment loss", epochs=10, losses=("cls",),
    ablation=True))
register_method(DecoderMethod(
    "ml-decoder", "ML-Decoder's head (no cosine skip), ASL only, no prior", epochs=20, head={"cosine_skip": False},
    losses=("cls",), prior=None))
register_method(ScoreMethod(
    "linear", "a linear map from the pooled image into the text space (DeViSE-style), ASL", _train_linear,
    lambda config: (f"linear map pooled image -> text space, cosine x learned scale, ASL, {LINEAR_EPOCHS} epochs;"
                    f" {config.templates} prompts")))
register_method(ScoreMethod(
    "conse", "CONSE: the image tower's ImageNet classes' name embeddings, no training", _train_conse,
    lambda config: (f"the image tower's ImageNet classifier, top-{CONSE_TOP} class names' text embeddings;"
                    f" {config.templates} prompts"), seeded=False, zero_shot=True))
register_method(ScoreMethod(
    "zero-shot-prior", "CLIP-Decoder's zero-shot prior alone (CONSE at the prior's temperature), no training",
    _train_prior_alone, lambda config: (f"the prior alone: CONSE's top-{CONSE_TOP} classes at temperature"
                                        f" {config.prior.temperature}; {config.templates} prompts"),
    seeded=False, zero_shot=True))
