"""Training CLIP-Decoder: ASL on seen labels + the alignment loss, in one process or under torchrun.

Recipe (method.md): AdamW with OneCycle, no weight decay on biases, norms and the temperature,
an EMA of the weights, model selection by seen-label mAP on a validation part carved from the
training images. Unseen labels are never embedded here.

By default the towers are frozen and the head trains on cached features. With
``finetune_image_tower`` the image tower trains too, end to end on decoded images, at its own
lower learning rate. Under torchrun each rank takes a contiguous share of every global batch, so
the batches, and the result, are those of one process (dropout masks aside; see README).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from .atomic import atomic_write
from .checkpoint import load_checkpoint, save_checkpoint
from .data.folder import LabelSplit, Sample, target_matrix, training_parts, warn_label_coverage
from .decoding import decoded_batches
from .distributed import World, close_world, init_world
from .errors import ClipDecoderError
from .evaluate import score_tokens
from .features import FeatureCache
from .images import Preprocess
from .losses import LossWeights
from .metrics import mean_average_precision
from .model import CLIPDecoder
from .prompts import TEMPLATE_SETS, describe

# ml-decoder: the predecessor's head (no cosine skip) with the alignment loss off
METHODS = ("clip-decoder", "ml-decoder")
# Each method's best training length on the tuning split (docs/EXPERIMENTS.md).
DEFAULT_EPOCHS = {"clip-decoder": 10, "ml-decoder": 20}
PRECISIONS = ("auto", "fp32", "bf16")
CHECKPOINT_FILE = "checkpoint.safetensors"
CHECKPOINT_EVERY = 100  # optimizer steps between checkpoints, besides one at each epoch's end


@dataclass
class TrainConfig:
    """Training options; the defaults are the project's best (see docs/EXPERIMENTS.md)."""

    method: str = "clip-decoder"
    epochs: int | None = None  # None: the method's tuned length, DEFAULT_EPOCHS
    batch_size: int = 64  # images per optimizer step, over all ranks together
    lr: float = 1e-3
    weight_decay: float = 5e-2
    pct_start: float = 0.2
    ema_decay: float = 0.99
    clip_weight: float = 0.1
    templates: str = "ensemble"
    val_fraction: float = 0.1
    seed: int = 0
    # HeadConfig options; smaller than ML-Decoder's 768 / 2048, which trains 4x slower here
    # without a better score, and with the cosine skip (docs/EXPERIMENTS.md).
    head: dict = field(default_factory=lambda: {"dim": 256, "ffn_dim": 512, "dropout": 0.05, "cosine_skip": True})
    # End to end (the paper's setting): the image tower trains too, on decoded images.
    finetune_image_tower: bool = False
    tower_lr: float = 1e-5  # the image tower's peak learning rate when it trains
    tower_blocks: int | None = None  # train only the tower's last N blocks; None: all of them
    accumulate: int = 1  # micro-batches per optimizer step (less memory, same batch)
    precision: str = "auto"  # auto: bf16 autocast on a GPU, fp32 on CPU

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ClipDecoderError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
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

    @property
    def num_epochs(self) -> int:
        return self.epochs or DEFAULT_EPOCHS[self.method]

    @property
    def head_options(self) -> dict:
        """HeadConfig options for this method: ML-Decoder's head has no cosine skip."""
        return {**self.head, "cosine_skip": False} if self.method == "ml-decoder" else dict(self.head)

    @property
    def loss_weights(self) -> LossWeights:
        return LossWeights(cls=1.0, clip=0.0 if self.method == "ml-decoder" else self.clip_weight)

    def autocast(self, device: torch.device):
        """The forward's precision: bf16 autocast on CUDA unless fp32 is asked for; fp32 on CPU."""
        wanted = self.precision == "bf16" or (self.precision == "auto" and device.type == "cuda")
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=wanted)


class LabelledImages:
    """Targets and sentences of a list of samples (shared by the two kinds of training data)."""

    samples: list[Sample]

    def targets(self, labels: tuple[str, ...]) -> torch.Tensor:
        """0/1 targets (n, len(labels)); other labels are ignored."""
        return torch.from_numpy(target_matrix(self.samples, labels))

    def sentences(self, labels: tuple[str, ...]) -> list[str]:
        """Each image's sentence naming its labels among ``labels``, for the alignment loss."""
        names = set(labels)
        return [describe([label for label in sample.labels if label in names]) for sample in self.samples]


@dataclass
class FeatureSet(LabelledImages):
    """Cached features of the samples that could be read: the frozen-tower training data."""

    tokens: torch.Tensor
    pooled: torch.Tensor
    samples: list[Sample]

    @classmethod
    def build(cls, samples: list[Sample], cache: FeatureCache, progress: bool = True, world: World = World()) -> FeatureSet:
        """Features of ``samples``; under torchrun each rank extracts its share first, so every
        image goes through the tower once, then all ranks read them all from the cache."""
        if world.size > 1:
            with contextlib.suppress(ClipDecoderError):  # no readable image in this share: reported below
                cache.get([s.image for s in world.shard(samples)], progress=progress and world.is_main, report=False)
            world.barrier()
        features = cache.get([s.image for s in samples], progress=progress and world.is_main, report=world.is_main)
        return cls(features.tokens, features.pooled, [samples[i] for i in features.kept])

    def batches(self, index_lists: Iterable[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(rows, tokens) for each list of row indices."""
        for rows in index_lists:
            yield rows, self.tokens[rows]

    def scores(self, trained: nn.ModuleDict, label_embeddings: torch.Tensor, world: World) -> np.ndarray:
        """Probabilities (n, L) of every sample under the trained modules."""
        return score_tokens(trained["head"], self.tokens, label_embeddings)


@dataclass
class ImageSet(LabelledImages):
    """Samples decoded from their files at every step: the data for training the image tower."""

    samples: list[Sample]
    preprocess: Preprocess

    @classmethod
    def build(cls, samples: list[Sample], preprocess: Preprocess, progress: bool = True, world: World = World()) -> ImageSet:
        """Keep the samples whose image decodes (checked once, each rank its share), so that every
        step's batch has the size asked for on every rank."""
        failed = {}
        mine = world.shard(list(range(len(samples))))
        bar = tqdm(total=len(mine), desc="check images", unit="img", disable=not progress or not world.is_main)
        for batch in decoded_batches([samples[i].image for i in mine], preprocess):
            failed.update({mine[k]: message for k, message in batch.failed.items()})
            bar.update(len(batch.indices) + len(batch.failed))
        bar.close()
        failed = {k: v for part in world.all_gather_objects(failed) for k, v in part.items()}
        if world.is_main:
            for index in sorted(failed):
                print(f"error: {failed[index]}", file=sys.stderr)
        kept = [sample for index, sample in enumerate(samples) if index not in failed]
        if not kept:
            raise ClipDecoderError(f"none of the {len(samples)} images could be read")
        return cls(kept, preprocess)

    def batches(self, index_lists: Iterable[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(rows, pixels) for each list of row indices, decoded one batch ahead."""
        index_lists = list(index_lists)
        flat = torch.cat(index_lists) if index_lists else torch.zeros(0, dtype=torch.long)
        size = len(index_lists[0]) if index_lists else 1
        for batch in decoded_batches([self.samples[i].image for i in flat.tolist()], self.preprocess, size):
            if batch.failed:  # read fine when the run started: the file changed since
                raise ClipDecoderError(next(iter(batch.failed.values())))
            yield flat[batch.indices], batch.pixels

    @torch.inference_mode()
    def scores(self, trained: nn.ModuleDict, label_embeddings: torch.Tensor, world: World) -> np.ndarray:
        """Probabilities (n, L) of every sample through the trained tower and head; ranks share the work."""
        tower, head = trained["image_tower"], trained["head"]
        device = next(head.parameters()).device
        queries = head.queries(label_embeddings.to(device))
        mine = world.shard(self.samples)
        rows = [np.zeros((0, len(label_embeddings)), dtype=np.float32)]
        for batch in decoded_batches([sample.image for sample in mine], self.preprocess):
            tokens = tower(batch.pixels.to(device)).tokens
            rows.append(head.probabilities(tokens.float(), queries).cpu().numpy())
        return np.concatenate(world.all_gather_objects(np.concatenate(rows)))


def parameter_groups(modules: nn.Module, weight_decay: float, lr: float) -> list[dict]:
    """Weight decay on matrices only; none on biases, norms and the temperature."""
    decay, no_decay = [], []
    for parameter in modules.parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay, "lr": lr}, {"params": no_decay, "weight_decay": 0.0, "lr": lr}]


def encode_sentences(model: CLIPDecoder, sentences: list[str]) -> torch.Tensor:
    """Text embeddings (n, text_dim) of per-image sentences, each distinct sentence encoded once."""
    unique = {sentence: row for row, sentence in enumerate(dict.fromkeys(sentences))}
    encoded = model.text_tower.encode(list(unique)).float().cpu()
    return encoded[[unique[sentence] for sentence in sentences]]


class Objective(nn.Module):
    """A batch's training loss as one module (what DDP wraps): the tower when it trains, head, alignment."""

    def __init__(self, model: CLIPDecoder, config: TrainConfig) -> None:
        super().__init__()
        self.model, self.finetune, self.weights = model, config.finetune_image_tower, config.loss_weights

    def forward(self, inputs: torch.Tensor, label_embeddings: torch.Tensor, targets: torch.Tensor,
                sentence_embeddings: torch.Tensor) -> dict[str, torch.Tensor]:
        tokens = self.model.image_tower(inputs).tokens if self.finetune else inputs
        return self.model.loss(tokens.float(), label_embeddings, targets, torch.ones_like(targets),
                               sentence_embeddings, self.weights)


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


def fit(
    model: CLIPDecoder,
    train: FeatureSet | ImageSet,
    val: FeatureSet | ImageSet,
    seen: tuple[str, ...],
    config: TrainConfig,
    progress: bool = True,
    log=None,
    world: World = World(),
    checkpoint: Path | None = None,
    checkpoint_every: int = CHECKPOINT_EVERY,
    resume: dict | None = None,
) -> list[dict]:
    """Train ``model`` in place; keep the EMA weights with the best val mAP.

    With ``checkpoint``, the whole run's state is written there (atomically) every
    ``checkpoint_every`` steps and at each epoch's end; ``resume`` (a loaded checkpoint)
    continues such a run where it stopped, with the same result as if it had never stopped.
    """
    if config.batch_size % (world.size * config.accumulate):
        raise ClipDecoderError(f"batch size {config.batch_size} must be a multiple of the number of processes"
                               f" ({world.size}) times --accumulate ({config.accumulate})")
    generator = torch.Generator().manual_seed(config.seed)
    label_embeddings = model.embed_labels(list(seen), TEMPLATE_SETS[config.templates]).to(model.device)
    sentence_embeddings = encode_sentences(model, train.sentences(seen))
    steps_per_epoch = max(1, len(train.samples) // config.batch_size)  # the last partial batch is dropped
    trainer = Trainer(model, config, config.num_epochs * steps_per_epoch, world)
    train_targets, val_targets = train.targets(seen), val.targets(seen).numpy()
    run = {"epoch": 1, "step": 0, "totals": {"loss": 0.0, "cls": 0.0, "clip": 0.0}, "history": [],
           "best_map": -1.0, "best_state": None}
    if resume is not None:
        trainer.load_state_dict(resume["trainer"])
        run = {key: resume[key] for key in run}
        generator.set_state(resume["epoch_generator"])
        _set_rng_state(resume["rng"][world.rank])

    def save(epoch_generator: torch.Tensor) -> None:
        if checkpoint is None:  # the same on every rank, so no rank waits in the gather below
            return
        rng = world.all_gather_objects(_rng_state())
        if world.is_main:
            save_checkpoint(checkpoint, {**run, "trainer": trainer.state_dict(), "epoch_generator": epoch_generator,
                                         "rng": rng, "config": asdict(config), "world_size": world.size,
                                         "train_images": len(train.samples)})

    model.train()
    done = (run["epoch"] - 1) * steps_per_epoch + run["step"]
    bar = tqdm(total=config.num_epochs * steps_per_epoch, initial=done, desc=f"train {config.method}", unit="step",
               disable=not progress or not world.is_main)
    for epoch in range(run["epoch"], config.num_epochs + 1):
        model.train()
        started, epoch_generator = time.perf_counter(), generator.get_state()
        order = torch.randperm(len(train.samples), generator=generator)
        batches = (world.shard(order[s * config.batch_size : (s + 1) * config.batch_size])
                   for s in range(run["step"], steps_per_epoch))
        for rows, inputs in train.batches(batches):
            losses = trainer.step(inputs, label_embeddings, train_targets[rows], sentence_embeddings[rows])
            run["totals"] = {key: value + losses[key] / steps_per_epoch for key, value in run["totals"].items()}
            run["step"] += 1
            bar.update()
            if run["step"] % checkpoint_every == 0 and run["step"] < steps_per_epoch:
                save(epoch_generator)
        ema = trainer.ema.eval()
        val_map = 100 * mean_average_precision(val.scores(ema.module, label_embeddings, world), val_targets)
        record = {"epoch": epoch, **{k: round(v, 5) for k, v in run["totals"].items()}, "val_mAP_seen": round(val_map, 3),
                  "lr": trainer.optimizer.param_groups[0]["lr"], "seconds": round(time.perf_counter() - started, 2)}
        run["history"].append(record)
        if log is not None:
            log.write(json.dumps(record) + "\n")
            log.flush()
        bar.set_postfix(loss=f"{run['totals']['loss']:.3f}", val_mAP=f"{val_map:.1f}")
        # No val image with a seen label (nan mAP): nothing to select on, keep the latest.
        if val_map > run["best_map"] or math.isnan(val_map):
            run["best_map"], run["best_state"] = val_map, copy.deepcopy(ema.module.state_dict())
        run.update(epoch=epoch + 1, step=0, totals=dict.fromkeys(run["totals"], 0.0))
        save(generator.get_state())
    bar.close()
    trainer.trained.load_state_dict(run["best_state"])
    model.eval()
    return run["history"]


def plot_curves(history: list[dict], path: Path) -> None:
    """PNG of the training losses and the validation mAP per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for key in ("loss", "cls", "clip"):
        left.plot(epochs, [r[key] for r in history], label=key)
    left.set(xlabel="epoch", ylabel="training loss", yscale="log")
    left.legend()
    right.plot(epochs, [r["val_mAP_seen"] for r in history], color="tab:green")
    best = max(history, key=lambda r: r["val_mAP_seen"])
    right.axvline(best["epoch"], color="grey", linestyle=":", label=f"selected (epoch {best['epoch']})")
    right.set(xlabel="epoch", ylabel="validation mAP, seen labels (%)")
    right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def check_resumable(state: dict, config: TrainConfig, world: World, path: Path) -> None:
    """Refuse to continue a checkpoint with other options or another number of processes."""
    differ = sorted(key for key, value in asdict(config).items() if state["config"].get(key) != value)
    if differ:
        changes = ", ".join(f"{key} {state['config'].get(key)!r} -> {getattr(config, key)!r}" for key in differ)
        raise ClipDecoderError(f"{path} was written with other training options ({changes});"
                               " resume with the same options, or delete it to start again")
    if state["world_size"] != world.size:
        raise ClipDecoderError(f"{path} was written by {state['world_size']} processes; resume with the same number"
                               f" (this run has {world.size})")


def write_json(path: Path, data: dict) -> None:
    """Write a JSON file atomically (temporary file, then rename)."""
    with atomic_write(path) as temporary:
        temporary.write_text(json.dumps(data, indent=2) + "\n")


def train_model(
    data_dir: str | Path,
    split: LabelSplit,
    out: str | Path,
    backbone: str = "offline",
    config: TrainConfig | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    resume: bool = False,
    checkpoint_every: int = CHECKPOINT_EVERY,
) -> CLIPDecoder:
    """Train on the folder's train part (seen labels only) and write a model folder to ``out``.

    Runs as one process, or as one rank of a torchrun job (the same call on every rank).
    ``out/checkpoint.safetensors`` holds the run's state until the model folder is written;
    ``resume`` continues from it.
    """
    world = init_world()
    try:
        return _train_model(data_dir, split, Path(out), backbone, config or TrainConfig(), cache_dir, progress,
                            resume, checkpoint_every, world)
    finally:
        close_world(world)


def _train_model(data_dir, split: LabelSplit, out: Path, backbone: str, config: TrainConfig, cache_dir, progress: bool,
                 resume: bool, checkpoint_every: int, world: World) -> CLIPDecoder:
    torch.manual_seed(config.seed)
    model = CLIPDecoder.create(backbone=backbone, templates=TEMPLATE_SETS[config.templates], **config.head_options)
    model.config.labels = list(split.seen)
    model.config.image_tower_trained = config.finetune_image_tower
    model.to(torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu"))
    checkpoint, state = out / CHECKPOINT_FILE, None
    if resume and checkpoint.is_file():
        state = load_checkpoint(checkpoint)
        check_resumable(state, config, world, checkpoint)
    elif resume and world.is_main:
        print(f"no checkpoint in {out}: training from the start", file=sys.stderr)
    train_samples, val_samples = training_parts(data_dir, config.val_fraction)
    if world.is_main:
        warn_label_coverage(train_samples + val_samples, split, split.seen, "training")
    extracted = []
    if config.finetune_image_tower:
        preprocess = model.image_tower.preprocess
        train, val = (ImageSet.build(samples, preprocess, progress, world) for samples in (train_samples, val_samples))
    else:
        cache = FeatureCache(model.image_tower, cache_dir)
        train, val = (FeatureSet.build(samples, cache, progress, world) for samples in (train_samples, val_samples))
        extracted = world.all_gather_objects(cache.encoded)
    if state is not None and state["train_images"] != len(train.samples):
        raise ClipDecoderError(f"{checkpoint} was written for {state['train_images']} training images, the data now"
                               f" has {len(train.samples)}; delete it to start again")
    log = None
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        log = (out / "train_log.jsonl").open("w")
        for record in state["history"] if state else []:
            log.write(json.dumps(record) + "\n")
    try:
        history = fit(model, train, val, split.seen, config, progress, log, world, checkpoint, checkpoint_every, state)
    finally:
        if log is not None:
            log.close()
    if world.is_main:
        model.save_pretrained(out)
        best = max(history, key=lambda r: r["val_mAP_seen"])
        write_json(out / "training.json", {
            "config": {**asdict(config), "epochs": config.num_epochs}, "backbone": backbone, "processes": world.size,
            "train_images": len(train.samples), "val_images": len(val.samples),
            "images_encoded_per_process": extracted, "selected_epoch": best["epoch"], "val_mAP_seen": best["val_mAP_seen"]})
        plot_curves(history, out / "curves.png")
        checkpoint.unlink(missing_ok=True)
    world.barrier()
    return model
