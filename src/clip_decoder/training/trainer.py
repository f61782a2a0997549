"""One optimizer step: the training objective (what DDP wraps), AdamW, OneCycle and the weight EMA."""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..model import CLIPDecoder
from .distributed import World
from .losses import AsymmetricLoss, contrastive_loss, total_loss

if TYPE_CHECKING:
    from .config import TrainConfig


class Objective(nn.Module):
    """A batch's training loss as one module: the tower when it trains, the head, the alignment.

    ASL on the seen labels plus the alignment of the pooled memory with per-image sentences.
    """

    def __init__(self, model: CLIPDecoder, config: TrainConfig) -> None:
        super().__init__()
        self.model, self.finetune, self.weights = model, config.finetune_image_tower, config.loss_weights
        self.asl = AsymmetricLoss()

    def forward(self, inputs: torch.Tensor, label_embeddings: torch.Tensor, targets: torch.Tensor,
                sentence_embeddings: torch.Tensor) -> dict[str, torch.Tensor]:
        """Tokens (or pixels when the tower trains), seen-label embeddings, targets and sentence
        embeddings -> the total loss and its two parts."""
        tokens = self.model.image_tower(inputs).tokens if self.finetune else inputs
        head = self.model.head
        memory = head.memory(tokens.float())
        logits = head.decode(memory, head.queries(label_embeddings))
        classification = self.asl(logits, targets)
        alignment = contrastive_loss(self.model.alignment, memory.mean(dim=1), sentence_embeddings)
        return {"loss": total_loss(classification, alignment, self.weights), "cls": classification, "clip": alignment}


def parameter_groups(modules: nn.Module, weight_decay: float, lr: float) -> list[dict]:
    """Weight decay on matrices only; none on biases, norms and the temperature."""
    decay, no_decay = [], []
    for parameter in modules.parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay, "lr": lr}, {"params": no_decay, "weight_decay": 0.0, "lr": lr}]


class Trainer:
    """One training run's optimiser (AdamW), OneCycle schedule, weight EMA and step.

    What trains: the head and the alignment projections, plus the image tower's last
    ``tower_blocks`` blocks (all by default) at ``tower_lr`` when ``finetune_image_tower`` is set.
    """

    def __init__(self, model: CLIPDecoder, config: TrainConfig, total_steps: int, world: World = World()) -> None:
        self.model, self.config, self.world = model, config, world
        self.trained = nn.ModuleDict({"head": model.head, "alignment": model.alignment})
        groups = parameter_groups(self.trained, config.weight_decay, config.lr)
        if config.finetune_image_tower:
            blocks = model.image_tower.trainable_blocks()
            chosen = nn.ModuleList(blocks[-config.tower_blocks:] if config.tower_blocks else blocks)
            chosen.requires_grad_(True)
            self.trained["image_tower"] = model.image_tower
            groups += parameter_groups(chosen, config.weight_decay, config.tower_lr)
        groups = [group for group in groups if group["params"]]
        # fused: one kernel for all parameters, ~15% of a CPU step faster than the default.
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr, fused=True)
        # OneCycleLR divides by zero when the warm-up is exactly one step (e.g. 5 steps at 0.2).
        pct_start = config.pct_start / 2 if math.isclose(config.pct_start * total_steps, 1.0) else config.pct_start
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(
            self.optimizer, max_lr=[group["lr"] for group in groups], total_steps=total_steps, pct_start=pct_start
        )
        self.ema = AveragedModel(self.trained, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True)
        self.device = model.device
        objective = Objective(model, config)
        self.objective = objective if world.size == 1 else nn.parallel.DistributedDataParallel(
            objective, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def step(self, inputs: torch.Tensor, label_embeddings: torch.Tensor, targets: torch.Tensor,
             sentence_embeddings: torch.Tensor) -> dict[str, float]:
        """One optimizer step on this rank's share of a batch (tokens, or pixels when the tower
        trains), in ``accumulate`` micro-batches; returns the batch's mean losses over ranks."""
        self.optimizer.zero_grad(set_to_none=True)
        parts, totals = self.config.accumulate, {"loss": 0.0, "cls": 0.0, "clip": 0.0}
        micro = zip(*(x.tensor_split(parts) for x in (inputs, targets, sentence_embeddings)))
        for index, (x, t, e) in enumerate(micro):
            # DDP averages gradients over ranks only after the last micro-batch.
            last = index == parts - 1 or self.world.size == 1
            with contextlib.nullcontext() if last else self.objective.no_sync():
                with self.config.autocast(self.device):
                    out = self.objective(x.to(self.device), label_embeddings, t.to(self.device), e.to(self.device))
                (out["loss"] / parts).backward()
            for key in totals:
                totals[key] += out[key].item() / parts
        self.optimizer.step()
        self.scheduler.step()
        self.ema.update_parameters(self.trained)
        return self.world.mean(totals)

    def state_dict(self) -> dict:
        return {"trained": self.trained.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "ema": self.ema.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.trained.load_state_dict(state["trained"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.ema.load_state_dict(state["ema"])
