"""Training options in one place: the defaults here are the CLI's defaults and the project's best.

Plain data: what a method makes of these options (its head, losses, prior and length) is its
``Recipe`` (``recipe.py``), resolved by the method registry (``methods.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..configs import PriorConfig
from ..errors import ClipDecoderError
from ..prompts import DEFAULT_TEMPLATE_SET, TEMPLATE_SETS

PRECISIONS = ("auto", "fp32", "bf16")


def option(default, help: str, group: str = "training", **argparse_options):
    """A TrainConfig field that is also a command-line option (``--name-with-dashes``)."""
    return field(default=default, metadata={"help": help, "group": group, **argparse_options})


@dataclass(frozen=True)
class TrainConfig:
    """Training options; the defaults are the project's best (see docs/EXPERIMENTS.md).

    Each field's metadata holds its command-line help (``cli_parser`` turns the fields into
    options), so an option is declared once, here; ``prior`` and ``head`` are declared in
    ``PriorConfig`` (``--prior-<name>``) and ``HeadConfig`` (``--<name>``).
    """

    method: str = option("clip-decoder", "which decoder head and losses to train")
    epochs: int | None = option(None, "default: the method's tuned length", type=int)
    batch_size: int = option(64, "images per optimizer step, over all processes together")
    lr: float = option(1e-3, "peak learning rate of the OneCycle schedule")
    weight_decay: float = option(5e-2, "AdamW, matrices only")
    pct_start: float = option(0.2, "share of the steps spent warming up (OneCycle)")
    ema_decay: float = option(0.99, "decay of the weights' moving average (the EMA weights are kept)")
    clip_weight: float = option(0.1, "weight of the alignment loss (methods that use it)")
    # How the zero-shot prior enters the trained model's scores (methods that use the prior).
    prior: PriorConfig = PriorConfig()
    templates: str = option(DEFAULT_TEMPLATE_SET, "prompt templates: an ensemble of 7, or a single one",
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
        if self.templates not in TEMPLATE_SETS:
            raise ClipDecoderError(f"unknown template set {self.templates!r}; choose from {', '.join(TEMPLATE_SETS)}")
        if (self.epochs is not None and self.epochs < 1) or self.batch_size < 1 or self.lr <= 0 or self.tower_lr <= 0:
            raise ClipDecoderError("epochs, batch size and learning rates must be positive")
        if self.precision not in PRECISIONS:
            raise ClipDecoderError(f"unknown precision {self.precision!r}; choose from {', '.join(PRECISIONS)}")
        if self.accumulate < 1 or self.batch_size % self.accumulate:
            raise ClipDecoderError(f"batch size {self.batch_size} is not a multiple of --accumulate {self.accumulate}")
        if self.tower_blocks is not None and self.tower_blocks < 1:
            raise ClipDecoderError(f"--tower-blocks must be at least 1, got {self.tower_blocks}")
