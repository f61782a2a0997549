"""The training loop: epochs of steps, validation on seen labels, model selection, checkpoints.

``TrainingRun`` holds one run's state and exposes its epoch order and step, so benchmarks time
the real thing; ``fit`` runs it to the end, checkpointing and resuming on the way.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..decoding import decoded_batches
from ..distributed import World
from ..errors import ClipDecoderError
from ..metrics import mean_average_precision
from ..model import CLIPDecoder
from ..scoring import Scorer
from ..thresholds import best_threshold
from .checkpoint import save_checkpoint
from .data import FeatureSet, ImageSet, encode_sentences
from .recipe import Recipe
from .trainer import Trainer

CHECKPOINT_EVERY = 100  # optimizer steps between checkpoints, besides one at each epoch's end


@dataclass
class RunState:
    """Where a run stands: saved in checkpoints, so a resumed run continues exactly."""

    epoch: int = 1
    step: int = 0  # optimizer steps done in this epoch
    totals: dict = field(default_factory=dict)  # this epoch's mean losses so far (the total and each term)
    history: list = field(default_factory=list)  # one record per finished epoch
    best_map: float = -1.0
    best_state: dict | None = None  # the EMA weights of the best epoch


def _rng_state() -> dict:
    """This process's global random state (dropout masks come from it)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class TrainingRun:
    """One training run of ``model`` on the seen labels: its trainer, batch order and state."""

    def __init__(self, model: CLIPDecoder, train: FeatureSet | ImageSet, val: FeatureSet | ImageSet | None,
                 seen: tuple[str, ...], recipe: Recipe, world: World = World()) -> None:
        config = recipe.config
        if config.batch_size % (world.size * config.accumulate):
            raise ClipDecoderError(f"batch size {config.batch_size} must be a multiple of the number of processes"
                                   f" ({world.size}) times --accumulate ({config.accumulate})")
        self.model, self.train, self.val, self.seen, self.world = model, train, val, seen, world
        self.config = config
        self.generator = torch.Generator().manual_seed(config.seed)
        self.label_embeddings = model.embed_labels(list(seen), recipe.templates).to(model.device)
        self.sentence_embeddings, self.sentence_rows = encode_sentences(model.text_tower, train.sentences(seen))
        self.steps_per_epoch = max(1, len(train.samples) // config.batch_size)  # the last partial batch is dropped
        self.trainer = Trainer(model, recipe, recipe.epochs * self.steps_per_epoch, world)
        self.state = RunState(totals=self.zero_totals())
        ema = self.trainer.ema.module
        alignment = ema["alignment"] if "alignment" in ema else model.alignment
        self.ema_scorer = Scorer(ema["head"], alignment, model.embed_labels, recipe.templates)

    def zero_totals(self) -> dict[str, float]:
        return dict.fromkeys(self.trainer.loss_names, 0.0)

    @property
    def steps_done(self) -> int:
        return (self.state.epoch - 1) * self.steps_per_epoch + self.state.step

    def epoch_order(self) -> torch.Tensor:
        """A fresh permutation of the training rows for the next epoch (drawn from the run's generator)."""
        return torch.randperm(len(self.train.samples), generator=self.generator)

    def epoch_batches(self, order: torch.Tensor, first_step: int = 0) -> Iterator[torch.Tensor]:
        """This rank's rows of each step of an epoch from ``first_step``: its share of every global batch."""
        size = self.config.batch_size
        return (self.world.shard(order[s * size : (s + 1) * size]) for s in range(first_step, self.steps_per_epoch))

    def step(self, rows: torch.Tensor, inputs: torch.Tensor) -> dict[str, float]:
        """One optimizer step on ``inputs`` (tokens, or pixels when the tower trains) of training ``rows``."""
        # Targets are built per batch, not held for the whole set: (images x seen labels) grows with the data.
        losses = self.trainer.step(inputs, self.label_embeddings, self.train.targets(self.seen, rows),
                                   self.sentence_embeddings[self.sentence_rows[rows]])
        self.state.totals = {key: value + losses[key] / self.steps_per_epoch for key, value in self.state.totals.items()}
        self.state.step += 1
        return losses

    @torch.inference_mode()
    def validation_scores(self) -> np.ndarray:
        """Probabilities (val images, seen labels) under the EMA weights."""
        self.trainer.ema.eval()
        vocabulary = self.ema_scorer.vocabulary(self.seen)
        if isinstance(self.val, FeatureSet):
            return self.ema_scorer.score_stored(self.val.tokens, self.val.pooled, vocabulary)
        tower = self.trainer.ema.module["image_tower"]  # the tower trains: ranks share the work
        rows = [np.zeros((0, len(self.seen)), dtype=np.float32)]
        for batch in decoded_batches([sample.image for sample in self.world.shard(self.val.samples)], self.val.preprocess):
            rows.append(self.ema_scorer.score(tower(torch.from_numpy(batch.pixels).to(self.model.device)), vocabulary).probabilities.cpu().numpy())
        return np.concatenate(self.world.all_gather_objects(np.concatenate(rows)))

    def end_epoch(self, seconds: float) -> dict:
        """Validate the EMA weights, keep them if they are the best so far, and start the next epoch."""
        val_map = 100 * mean_average_precision(self.validation_scores(), self.val.targets(self.seen).numpy())
        record = {"epoch": self.state.epoch, **{k: round(v, 5) for k, v in self.state.totals.items()},
                  "val_mAP_seen": round(val_map, 3), "lr": self.trainer.optimizer.param_groups[0]["lr"],
                  "seconds": round(seconds, 2)}
        self.state.history.append(record)
        # No val image with a seen label (nan mAP): nothing to select on, keep the latest.
        if val_map > self.state.best_map or math.isnan(val_map):
            self.state.best_map, self.state.best_state = val_map, copy.deepcopy(self.trainer.ema.module.state_dict())
        self.state = RunState(epoch=self.state.epoch + 1, totals=self.zero_totals(), history=self.state.history,
                              best_map=self.state.best_map, best_state=self.state.best_state)
        return record

    def keep_best(self) -> None:
        """Load the selected EMA weights into the model."""
        self.trainer.trained.load_state_dict(self.state.best_state)

    def checkpoint(self, epoch_generator: torch.Tensor) -> dict:
        """The run's whole state, ``epoch_generator`` being the generator's state at the epoch's start."""
        return {**asdict(self.state), "trainer": self.trainer.state_dict(), "epoch_generator": epoch_generator,
                "rng": self.world.all_gather_objects(_rng_state()), "config": asdict(self.config),
                "world_size": self.world.size, "train_images": len(self.train.samples)}

    def resume(self, saved: dict) -> None:
        """Continue from ``checkpoint()``'s state, as if the run had never stopped."""
        self.trainer.load_state_dict(saved["trainer"])
        self.state = RunState(**{key: saved[key] for key in asdict(RunState())})
        self.generator.set_state(saved["epoch_generator"])
        _set_rng_state(saved["rng"][self.world.rank])


def fit(
    model: CLIPDecoder,
    train: FeatureSet | ImageSet,
    val: FeatureSet | ImageSet,
    seen: tuple[str, ...],
    recipe: Recipe,
    progress: bool = True,
    on_epoch: Callable[[list[dict]], None] | None = None,
    world: World = World(),
    checkpoint: Path | None = None,
    checkpoint_every: int = CHECKPOINT_EVERY,
    resume: dict | None = None,
) -> list[dict]:
    """Train ``model`` in place; keep the EMA weights with the best val mAP; return the epochs' records
    (``on_epoch`` is called with them after each epoch).

    With ``checkpoint``, the whole run's state is written there (atomically) every
    ``checkpoint_every`` steps and at each epoch's end; ``resume`` (a loaded checkpoint)
    continues such a run where it stopped, with the same result as if it had never stopped.
    """
    run = TrainingRun(model, train, val, seen, recipe, world)
    if resume is not None:
        run.resume(resume)

    def save(epoch_generator: torch.Tensor) -> None:
        if checkpoint is None:  # the same on every rank, so no rank waits in the gather below
            return
        state = run.checkpoint(epoch_generator)
        if world.is_main:
            save_checkpoint(checkpoint, state)

    # In a with block, the bar ends its line even when a write fails: the error is then a line of its own.
    with tqdm(total=recipe.epochs * run.steps_per_epoch, initial=run.steps_done, desc=f"train {recipe.method}",
              unit="step", disable=not progress or not world.is_main) as bar:
        for _ in range(run.state.epoch, recipe.epochs + 1):
            model.train()
            started, epoch_generator = time.perf_counter(), run.generator.get_state()
            for rows, inputs in train.batches(run.epoch_batches(run.epoch_order(), run.state.step)):
                run.step(rows, inputs)
                bar.update()
                if run.state.step % checkpoint_every == 0 and run.state.step < run.steps_per_epoch:
                    save(epoch_generator)
            record = run.end_epoch(time.perf_counter() - started)
            if on_epoch is not None:
                on_epoch(run.state.history)
            bar.set_postfix(loss=f"{record['loss']:.3f}", val_mAP=f"{record['val_mAP_seen']:.1f}")
            save(run.generator.get_state())
    run.keep_best()
    finish_training(model, train, val, seen)
    return run.state.history


def finish_training(model: CLIPDecoder, train: FeatureSet | ImageSet, val: FeatureSet | ImageSet,
                    seen: tuple[str, ...]) -> None:
    """What a trained model records of its training: the labels it was trained on, the prior centred on the
    training images, with ``prior.head_only_margin`` the trained labels the head ranks better alone on the
    validation part (PriorConfig.head_only), and the trained labels' decision threshold, the best micro-F1 cut there.
    (With a fine-tuned tower the stored features are not at hand: the prior stays uncentred and the model
    decides at 0.5.)"""
    model.eval()
    model.set_trained_labels(seen)
    if isinstance(train, FeatureSet):
        model.set_prior(model.scorer.centred_prior(train.pooled, seen))
    if isinstance(val, FeatureSet):
        targets = val.targets(seen).numpy()
        head_only = model.scorer.head_only_labels(val.tokens, val.pooled, targets, seen)
        model.set_prior(replace(model.scorer.prior, head_only=head_only))
        scores = model.scorer.score_stored(val.tokens, val.pooled, model.scorer.vocabulary(seen))
        if targets.any():
            model.set_decision_threshold(best_threshold(scores, targets)[0])
