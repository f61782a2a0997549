"""Methods declared once: each names what it trains, how long, and how it scores unseen labels.

A method is one ``register_method`` call. The benchmark harness runs any registered method;
``clip-decoder train --method`` takes the ones that train a decoder head (``epochs`` set).
Adding a method touches nothing else.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..data.folder import LabelSplit
from ..encoders import Backbone
from ..errors import ClipDecoderError
from ..model import CLIPDecoder
from ..prompts import LabelEmbedder
from ..prior import CONSE_TEMPERATURE, CONSE_TOP, ZeroShotPrior
from .baselines import LINEAR_EPOCHS, ConSE, LinearMap
from .data import FeatureSet
from .loop import finish_training, fit

if TYPE_CHECKING:
    from .config import TrainConfig


# TrainConfig's options that say how the prior enters the scores; training does not depend on them.
PRIOR_OPTIONS = ("prior_weight", "seen_prior_weight", "prior_temperature")
# A trained method: stored features (tokens and pooled) and any label names -> scores (images, labels).
ScoreFunction = Callable[[FeatureSet, list[str]], np.ndarray]


@dataclass
class MethodRun:
    """One method, one seed, one label split: what a method gets to train on."""

    towers: CLIPDecoder  # the loaded towers, shared by every run
    parts: dict[str, FeatureSet]  # "train", "val" and "test" features
    split: LabelSplit
    config: TrainConfig  # the training options, with this run's method and seed
    progress: bool = False
    # Decoder heads trained so far on these parts, by what their training depends on: methods that
    # differ only in how the prior enters their scores share one training (the harness passes one dict).
    trained: dict = field(default_factory=dict)
    save_to: Path | None = None  # decoder methods write their trained model folder here

    def embedder(self) -> LabelEmbedder:
        """A label embedder of its own, so every run embeds its labels as a fresh model would."""
        return LabelEmbedder(self.towers.text_tower)


@dataclass(frozen=True)
class Method:
    """A zero-shot method as the benchmark runs it."""

    name: str
    summary: str  # one line for --help
    train: Callable[[MethodRun], ScoreFunction]  # train on the split's seen labels only
    recipe: Callable[[TrainConfig], str]  # what it trains and how, for the results page
    epochs: int | None = None  # set for decoder methods: their tuned length (docs/EXPERIMENTS.md)
    head: dict = field(default_factory=dict)  # HeadConfig options the method fixes
    alignment: bool = True  # decoder methods: whether the alignment loss trains
    prior: bool = True  # decoder methods: whether the zero-shot prior enters the logits (TrainConfig.model_prior)
    prior_options: dict = field(default_factory=dict)  # TrainConfig prior options the method fixes
    seeded: bool = True  # False: the result does not depend on the seed, so the benchmark runs it once
    ablation: bool = False  # True: run by the benchmark only when asked for by name


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


def method_names(ablations: bool = True) -> tuple[str, ...]:
    """Registered methods; without ``ablations``, those the benchmark runs by default."""
    return tuple(name for name, method in _METHODS.items() if ablations or not method.ablation)


def decoder_methods() -> tuple[str, ...]:
    """The methods ``clip-decoder train`` can train: a decoder head."""
    return tuple(name for name, method in _METHODS.items() if method.epochs is not None)


def fresh_model(towers: CLIPDecoder, config: TrainConfig) -> CLIPDecoder:
    """A new, seeded head for ``config.method`` on the already loaded towers of ``towers``."""
    torch.manual_seed(config.seed)
    head = replace(towers.config.head, **config.head_options)
    model_config = replace(towers.config, head=head, templates=config.template_set, prior=config.model_prior)
    model = CLIPDecoder(model_config, Backbone(towers.config.backbone, towers.image_tower, towers.text_tower))
    if model_config.prior.on:
        _share_class_embeddings(towers, model.prior, model_config.templates)
    return model


def _share_class_embeddings(towers: CLIPDecoder, prior: ZeroShotPrior, templates: tuple[str, ...]) -> None:
    """Give ``prior`` the towers' ImageNet class-name embeddings when they are made with the same
    templates: the 1,000 class names are embedded once for all runs, not once per run."""
    if prior.conse and templates == towers.config.templates:
        towers.prior.prepare()
        prior.load_state_dict(towers.prior.state_dict())


def _training_key(run: MethodRun) -> tuple:
    """What a decoder head's training depends on; the prior enters at scoring, so not its settings."""
    config = run.config
    options = {k: v for k, v in asdict(config).items() if k not in ("method", "head", *PRIOR_OPTIONS)}
    return (run.split.seen, json.dumps(options, sort_keys=True), json.dumps(config.head_options, sort_keys=True),
            config.loss_weights, config.num_epochs)


def _train_decoder(run: MethodRun) -> ScoreFunction:
    model, key = fresh_model(run.towers, run.config), _training_key(run)
    if key in run.trained:
        model.head.load_state_dict(run.trained[key]["head"])
        model.alignment.load_state_dict(run.trained[key]["alignment"])
        finish_training(model, run.parts["train"], run.split.seen)
    else:
        fit(model, run.parts["train"], run.parts["val"], run.split.seen, run.config, progress=run.progress)
        run.trained[key] = copy.deepcopy({"head": model.head.state_dict(), "alignment": model.alignment.state_dict()})
    if run.save_to is not None:
        model.save_pretrained(run.save_to)
    return lambda features, labels: model.scorer.score_stored(features.tokens, features.pooled,
                                                              model.scorer.vocabulary(labels))


def _decoder_recipe(config: TrainConfig) -> str:
    head = config.head_options
    skip = "with" if head["cosine_skip"] else "without"
    clip = config.loss_weights.clip
    loss = "ASL" + (f" + {clip} x alignment" if clip else "")
    mix = config.model_prior
    prior = (f"; + zero-shot prior (weight {mix.weight}, {mix.seen_weight} on trained labels, temperature"
             f" {mix.temperature})" if mix.on else "")
    return (f"head d {head['dim']}, FFN {head['ffn_dim']}, dropout {head['dropout']}, {skip} cosine skip;"
            f" {loss}; {config.num_epochs} epochs, batch {config.batch_size}, lr {config.lr},"
            f" weight decay {config.weight_decay}, EMA {config.ema_decay}; {config.templates} prompts{prior}")


def decoder_method(name: str, summary: str, epochs: int, head: dict | None = None, alignment: bool = True,
                   prior: bool = True, prior_options: dict | None = None, ablation: bool = False) -> Method:
    """A method that trains the decoder head (with ``head`` options fixed) for ``epochs``; ``prior_options``
    fix TrainConfig's prior options (how the prior enters its scores)."""
    return Method(name, summary, _train_decoder, _decoder_recipe, epochs, head or {}, alignment, prior,
                  prior_options or {}, ablation=ablation)


def _train_linear(run: MethodRun) -> ScoreFunction:
    embed, templates, train = run.embedder(), run.config.template_set, run.parts["train"]
    torch.manual_seed(run.config.seed)
    linear = LinearMap(train.pooled.shape[1], run.towers.text_tower.dim)
    linear.fit(train.pooled, train.targets(run.split.seen), embed(list(run.split.seen), templates), run.config.seed)
    return lambda features, labels: linear.score(features.pooled, embed(labels, templates))


def _prior(run: MethodRun, temperature: float) -> ZeroShotPrior:
    """A zero-shot prior on the run's towers at ``temperature``, its class names embedded."""
    embed, templates = run.embedder(), run.config.template_set
    prior = ZeroShotPrior(run.towers.image_tower, run.towers.text_tower.dim, lambda names: embed(names, templates),
                          temperature)
    _share_class_embeddings(run.towers, prior, templates)
    prior.prepare()  # (when the towers' templates differ: embedded here)
    return prior


def _train_conse(run: MethodRun) -> ScoreFunction:
    embed, templates = run.embedder(), run.config.template_set
    conse = ConSE(_prior(run, CONSE_TEMPERATURE))
    return lambda features, labels: conse.score(features.pooled, embed(labels, templates))


def _train_prior_alone(run: MethodRun) -> ScoreFunction:
    embed, templates = run.embedder(), run.config.template_set
    prior = _prior(run, run.config.prior_temperature)

    @torch.inference_mode()
    def score(features: FeatureSet, labels: list[str]) -> np.ndarray:
        return (prior(features.pooled) @ embed(labels, templates).float().T).numpy()
    return score


register_method(decoder_method(
    "clip-decoder", "CLIP-Decoder: the decoder head with the cosine skip, ASL + alignment loss, zero-shot prior",
    epochs=10))
register_method(decoder_method(
    "clip-decoder-no-prior", "ablation: CLIP-Decoder without the zero-shot prior", epochs=10, prior=False,
    ablation=True))
register_method(decoder_method(
    "clip-decoder-one-prior-weight", "ablation: CLIP-Decoder with the prior as it was: one weight (10) for every"
    " label, the ImageNet classifier's own probabilities (temperature 1)", epochs=10,
    prior_options={"prior_weight": 10.0, "seen_prior_weight": 10.0, "prior_temperature": 1.0}, ablation=True))
register_method(decoder_method(
    "clip-decoder-no-alignment", "ablation: CLIP-Decoder without the alignment loss", epochs=10, alignment=False,
    ablation=True))
register_method(decoder_method(
    "ml-decoder", "ML-Decoder's head (no cosine skip), ASL only, no prior", epochs=20, head={"cosine_skip": False},
    alignment=False, prior=False))
register_method(Method(
    "linear", "a linear map from the pooled image into the text space (DeViSE-style), ASL", _train_linear,
    lambda config: (f"linear map pooled image -> text space, cosine x learned scale, ASL, {LINEAR_EPOCHS} epochs;"
                    f" {config.templates} prompts")))
register_method(Method(
    "conse", "CONSE: the image tower's ImageNet classes' name embeddings, no training", _train_conse,
    lambda config: (f"the image tower's ImageNet classifier, top-{CONSE_TOP} class names' text embeddings;"
                    f" {config.templates} prompts"), seeded=False))
register_method(Method(
    "zero-shot-prior", "CLIP-Decoder's zero-shot prior alone (CONSE at the prior's temperature), no training",
    _train_prior_alone, lambda config: (f"the prior alone: CONSE's top-{CONSE_TOP} classes at temperature"
                                        f" {config.prior_temperature}; {config.templates} prompts"), seeded=False))
