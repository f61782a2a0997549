"""Training options in one place: the defaults here are the CLI's defaults and the project's best."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields

import torch

from ..errors import ClipDecoderError
from ..head import HeadConfig
from ..prior import PriorConfig
from ..prompts import DEFAULT_TEMPLATE_SET, TEMPLATE_SETS
from .losses import LossWeights
from .methods import PRIOR_OPTIONS, decoder_methods, get_method

PRECISIONS = ("auto", "fp32", "bf16")


def option(default, help: str, group: str = "training", **argparse_options):
    """A TrainConfig field that is also a command-line option (``--name-with-dashes``)."""
    return field(default=default, metadata={"help": help, "group": group, **argparse_options})


@dataclass
class TrainConfig:
    """Training options; the defaults are the project's best (see docs/EXPERIMENTS.md).

    Each field's metadata holds its command-line help (``cli.add_config_options`` turns the
    fields into options), so an option is declared once, here.
    """

    method: str = option("clip-decoder", "which decoder head and losses to train")
    epochs: int | None = option(None, "default: the method's tuned length", type=int)
    batch_size: int = option(64, "images per optimizer step, over all processes together")
    lr: float = option(1e-3, "peak learning rate of the OneCycle schedule")
    weight_decay: float = option(5e-2, "AdamW, matrices only")
    pct_start: float = option(0.2, "share of the steps spent warming up (OneCycle)")
    ema_decay: float = option(0.99, "decay of the weights' moving average (the EMA weights are kept)")
    clip_weight: float = option(0.1, "weight of the alignment loss (methods that use it)")
    prior_weight: float = option(PriorConfig.weight, "weight of the zero-shot prior in the logit of a label not trained"
                                 " on: prior_weight x cos(the towers' own view of the image, the label's text)"
                                 " (methods that use the prior)")
    seen_prior_weight: float = option(PriorConfig.seen_weight, "the same for the labels trained on, which the head"
                                      " knows from examples; both 0: the prior is off")
    prior_temperature: float = option(PriorConfig.temperature, "softens the ImageNet classifier's distribution before"
                                      " CONSE's top classes make the prior (offline towers)")
    templates: str = option(DEFAULT_TEMPLATE_SET, "prompt templates: one, or an ensemble of 7",
                            choices=tuple(TEMPLATE_SETS))
    val_fraction: float = option(0.1, "share of training images held out for model selection (when there is no val.csv)")
    seed: int = option(0, "seeds the head's initialisation, the batch order and dropout")
    # HeadConfig options that override its defaults (and are overridden by the method's own).
    head: dict = field(default_factory=dict)
    finetune_image_tower: bool = option(False, "train the image tower too, end to end on decoded images"
                                        " (slow on CPU; bf16 on a GPU)", group="long runs")
    tower_lr: float = option(1e-5, "with --finetune-image-tower: the tower's peak learning rate", group="long runs")
    tower_blocks: int | None = option(None, "with --finetune-image-tower: train only the tower's last N blocks"
                                      " (default: all)", group="long runs", type=int, metavar="N")
    accumulate: int = option(1, "split each batch into N micro-batches, one backward each (less memory)",
                             group="long runs", metavar="N")
    precision: str = option("auto", "auto: bf16 autocast on a GPU, fp32 on CPU", group="long runs", choices=PRECISIONS)

    def __post_init__(self) -> None:
        if self.method not in decoder_methods():
            raise ClipDecoderError(f"unknown method {self.method!r}; choose from {', '.join(decoder_methods())}")
        if self.templates not in TEMPLATE_SETS:
            raise ClipDecoderError(f"unknown template set {self.templates!r}; choose from {', '.join(TEMPLATE_SETS)}")
        if (self.epochs is not None and self.epochs < 1) or self.batch_size < 1 or self.lr <= 0 or self.tower_lr <= 0:
            raise ClipDecoderError("epochs, batch size and learning rates must be positive")
        if self.prior_weight < 0 or self.seen_prior_weight < 0 or self.prior_temperature <= 0:
            raise ClipDecoderError("prior weights must be at least 0 and the prior temperature positive")
        if self.precision not in PRECISIONS:
            raise ClipDecoderError(f"unknown precision {self.precision!r}; choose from {', '.join(PRECISIONS)}")
        if self.accumulate < 1 or self.batch_size % self.accumulate:
            raise ClipDecoderError(f"batch size {self.batch_size} is not a multiple of --accumulate {self.accumulate}")
        if self.tower_blocks is not None and self.tower_blocks < 1:
            raise ClipDecoderError(f"--tower-blocks must be at least 1, got {self.tower_blocks}")

    @property
    def num_epochs(self) -> int:
        return self.epochs or get_method(self.method).epochs

    @property
    def head_options(self) -> dict:
        """Every HeadConfig option: its default, unless the user's ``head`` or, last, the method
        sets it (ML-Decoder's head has no cosine skip)."""
        defaults = {item.name: item.default for item in fields(HeadConfig) if item.default is not MISSING}
        return {**defaults, **self.head, **get_method(self.method).head}

    @property
    def loss_weights(self) -> LossWeights:
        return LossWeights(cls=1.0, clip=self.clip_weight if get_method(self.method).alignment else 0.0)

    @property
    def model_prior(self) -> PriorConfig:
        """The prior settings of the model this trains: off for methods without the prior."""
        method = get_method(self.method)
        if not method.prior:
            return PriorConfig.off()
        options = {name: getattr(self, name) for name in PRIOR_OPTIONS} | method.prior_options
        return PriorConfig(weight=options["prior_weight"], seen_weight=options["seen_prior_weight"],
                           temperature=options["prior_temperature"])

    @property
    def template_set(self) -> tuple[str, ...]:
        return TEMPLATE_SETS[self.templates]

    def autocast(self, device: torch.device):
        """The forward's precision: bf16 autocast on CUDA unless fp32 is asked for; fp32 on CPU."""
        wanted = self.precision == "bf16" or (self.precision == "auto" and device.type == "cuda")
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=wanted)
