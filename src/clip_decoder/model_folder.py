"""The model folder (contract): config.json + model.safetensors, and what training and calibration
write beside them; ``ModelFolder`` reads and writes all of it, and never unpickles."""

from __future__ import annotations

import json
import os
import reprlib
from dataclasses import asdict, dataclass, fields
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from .atomic import write_file, write_files
from .configs import HeadConfig, PriorConfig
from .errors import ClipDecoderError
from .prompts import DEFAULT_TEMPLATES, SINGLE_TEMPLATE, check_labels, check_templates
from .thresholds import Thresholds, model_rule, write_thresholds

if TYPE_CHECKING:  # torch only to read and write weights: the command line's parser reads this module without it
    import torch
    from torch import nn

# 5: the prior's confidence weight (prior.confidence_weight; folders before it score without it);
# 4: the trained labels the prior is off on (prior.head_only);
# 3: the prior's reference mean and centring share, and the trained labels' decision threshold;
# 2: the prior's settings are one object, "prior" (1 had prior_weight, prior_offset)
FORMAT_VERSION = 5
# Model folders that ship inside the package, by name (`make model` rebuilds them).
PACKAGED_MODELS = ("openclipart",)
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
THRESHOLDS_FILE = "thresholds.json"  # written by `clip-decoder calibrate`
TRAIN_LOG_FILE, TRAINING_FILE, CURVES_FILE = "train_log.jsonl", "training.json", "curves.png"  # written by training
CHECKPOINT_FILE = "checkpoint.safetensors"  # a training run's state, until the model folder is written
# What config.json must hold for each field type of ModelConfig and HeadConfig (ints are sizes or
# versions, so positive); a field of a type missing here is left to the dataclass.
_JSON_TYPES = {"str": ((str,), "a string"), "int": ((int,), "a positive integer"), "float": ((int, float), "a number"),
               "bool": ((bool,), "true or false"),
               "float | None": ((int, float, type(None)), "a number or null"), "HeadConfig": ((dict,), "an object"), "PriorConfig": ((dict,), "an object"),
               "tuple[str, ...]": ((list,), "a list"), "tuple[float, ...]": ((list,), "a list of numbers")}


def _check_json_types(data: dict, config_class: type, source: str, prefix: str = "") -> None:
    """Raise ClipDecoderError naming ``source`` when a field in ``data`` has the wrong JSON type."""
    for item in fields(config_class):
        if item.name not in data or item.type not in _JSON_TYPES:
            continue
        value, (types, description) = data[item.name], _JSON_TYPES[item.type]
        wrong_bool = isinstance(value, bool) and bool not in types
        if wrong_bool or not isinstance(value, types) or (item.type == "int" and value < 1):
            raise ClipDecoderError(f"{source}: '{prefix}{item.name}' must be {description}, got {reprlib.repr(value)}")


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model; written as config.json. Frozen: a change is a new config."""

    backbone: str
    head: HeadConfig
    align_dim: int = 256
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    labels: tuple[str, ...] = ()  # the labels seen in training
    # True when training changed the image tower (train --finetune-image-tower): its weights
    # are then saved with the head instead of being rebuilt from the backbone name.
    image_tower_trained: bool = False
    # How the zero-shot prior enters each logit (prior.PriorConfig); its reference mean and offset are set by training.
    prior: PriorConfig = PriorConfig()
    # The trained labels' decision threshold, chosen by training on its validation part (the best
    # micro-F1 there); None in models from before it (format 2): they decide at 0.5.
    decision_threshold: float | None = None
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.decision_threshold is not None and not 0.0 <= self.decision_threshold <= 1.0:
            raise ValueError(f"decision_threshold must be in [0, 1], got {self.decision_threshold}")

    def default_thresholds(self) -> Thresholds:
        """The model's default decision (``predict`` and ``serve`` with no decision option): its trained
        labels at ``decision_threshold``, every other label at thresholds.NEW_LABEL_THRESHOLD."""
        return model_rule(self.labels, self.decision_threshold)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["templates"], data["labels"] = list(self.templates), list(self.labels)
        return data

    @classmethod
    def from_dict(cls, data: dict, source: str = CONFIG_FILE) -> ModelConfig:
        """Parse a config dict; any problem raises ClipDecoderError naming ``source``."""
        if not isinstance(data, dict):
            raise ClipDecoderError(f"{source}: expected a JSON object, got {type(data).__name__}")
        _check_json_types(data, cls, source)
        for name, config_class in (("head", HeadConfig), ("prior", PriorConfig)):  # (their own fields too)
            if isinstance(data.get(name), dict):
                _check_json_types(data[name], config_class, source, prefix=f"{name}.")
        version = data.get("format_version", 0)
        if isinstance(version, int) and version > FORMAT_VERSION:
            raise ClipDecoderError(
                f"{source}: format_version {version} was written by a newer clip-decoder"
                f" (this one reads up to {FORMAT_VERSION}); upgrade clip-decoder"
            )
        try:
            return cls(
                backbone=str(data["backbone"]),
                head=HeadConfig(**data["head"]),
                align_dim=int(data.get("align_dim", 256)),
                # (a folder from before templates were recorded was made with one)
                templates=check_templates(data.get("templates", SINGLE_TEMPLATE)),
                labels=tuple(check_labels(data.get("labels", []))),
                image_tower_trained=bool(data.get("image_tower_trained", False)),
                prior=_prior_config(data),
                decision_threshold=data.get("decision_threshold"),
                format_version=int(version),
            )
        except ClipDecoderError as error:
            raise ClipDecoderError(f"{source}: {error}") from error
        except (AttributeError, KeyError, TypeError, ValueError) as error:
            raise ClipDecoderError(f"{source}: not a valid clip-decoder config ({error!r})") from error


def _prior_config(data: dict) -> PriorConfig:
    """The prior's settings; a folder from before them (format 1: one weight for every label, the
    classifier's own probabilities) keeps its scores, and one from before the prior has it off, as one from
    before the confidence weight (format 4) keeps its weights fixed."""
    if "prior" in data:
        return PriorConfig(**{"confidence_weight": 0.0, **data["prior"]})
    weight = float(data.get("prior_weight", 0.0))
    return PriorConfig(weight=weight, seen_weight=weight, confidence_weight=0.0, temperature=1.0,
                       offset=float(data.get("prior_offset", 0.0)))


def _weights_mismatch(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> str:
    """One line saying how the weights ``found`` differ from those ``expected`` ('' when they fit)."""
    problems = [f"{key} missing" for key in expected if key not in found]
    problems += [f"{key} unexpected" for key in found if key not in expected]
    problems += [f"{key} has shape {list(found[key].shape)}, the model needs {list(value.shape)}"
                 for key, value in expected.items() if key in found and found[key].shape != value.shape]
    return "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")


def _flat_state(modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{key}": value for prefix, module in modules.items() for key, value in module.state_dict().items()}


class ModelFolder:
    """A model folder: its config and weights, the thresholds calibrated for it and the files its
    training wrote (``train_log.jsonl``, ``training.json``, ``curves.png``, the run's checkpoint)."""

    def __init__(self, path: str | os.PathLike, packaged: bool = False) -> None:
        self.path, self.packaged = Path(path), packaged  # packaged: it ships inside the library

    @classmethod
    def find(cls, name_or_path: str | os.PathLike) -> ModelFolder:
        """The folder itself, or a packaged model's (PACKAGED_MODELS) when no such folder exists."""
        path = Path(name_or_path)
        if path.is_dir() or str(name_or_path) not in PACKAGED_MODELS:
            return cls(path)
        return cls(Path(str(resources.files("clip_decoder") / "models" / str(name_or_path))), packaged=True)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def read_config(self) -> ModelConfig:
        """The checked config.json; a missing folder or file is named in the error."""
        if not self.path.is_dir():
            raise ClipDecoderError(f"model folder {self.path} does not exist (packaged models: {', '.join(PACKAGED_MODELS)})")
        for path in (self / CONFIG_FILE, self / WEIGHTS_FILE):
            if not path.is_file():
                raise ClipDecoderError(f"model folder {self.path} has no {path.name}")
        try:
            data = json.loads((self / CONFIG_FILE).read_text(encoding="utf-8-sig"))  # -sig: a BOM from an editor is fine
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ClipDecoderError(f"{self / CONFIG_FILE}: not valid JSON ({error})") from error
        return ModelConfig.from_dict(data, source=str(self / CONFIG_FILE))

    def load_weights(self, modules: dict[str, nn.Module]) -> None:
        """Load model.safetensors into ``modules`` (name -> module); weights that do not fit are refused, naming them."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        weights_path = self / WEIGHTS_FILE
        try:
            tensors = load_file(weights_path)
        except (SafetensorError, OSError, ValueError) as error:
            raise ClipDecoderError(f"{weights_path}: not a readable safetensors file ({error})") from error
        mismatch = _weights_mismatch(_flat_state(modules), tensors)
        if mismatch:
            raise ClipDecoderError(f"{weights_path}: weights do not fit the model in {CONFIG_FILE}: {mismatch}")
        for prefix, module in modules.items():
            module.load_state_dict({k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")})

    def write(self, config: ModelConfig, modules: dict[str, nn.Module]) -> Path:
        """Write config.json and the weights of ``modules`` (name -> module), creating the folder."""
        from safetensors.torch import save

        self.path.mkdir(parents=True, exist_ok=True)
        tensors = {key: value.detach().cpu().contiguous() for key, value in _flat_state(modules).items()}
        # Both files are written in full before either replaces the old one (a crash or a full disk
        # leaves the old folder); the weights are renamed into place first.
        write_files({self / WEIGHTS_FILE: save(tensors, metadata={"format": "pt"}),
                     self / CONFIG_FILE: json.dumps(config.to_dict(), indent=2) + "\n"})
        return self.path

    def thresholds(self) -> Thresholds:
        """The thresholds ``clip-decoder calibrate`` stored here (``predict --calibrated``)."""
        path = self / THRESHOLDS_FILE
        if not path.is_file():
            raise ClipDecoderError(f"{path} does not exist; run `clip-decoder calibrate --model {self.path} ...` first")
        return Thresholds.read(path)

    def default_rule(self) -> Thresholds:
        """The model's default decision (ModelConfig.default_thresholds)."""
        return self.read_config().default_thresholds()

    def writable(self) -> ModelFolder:
        """This folder, if files may be added to it: a packaged model's folder is part of the library."""
        if self.packaged:
            raise ClipDecoderError(f"{self.path.name!r} is a packaged model, part of the library; copy its folder into"
                                   " one of your own and write there")
        return self

    def write_thresholds(self, table: dict) -> Path:
        """Store a calibration table as thresholds.json (atomically)."""
        return write_thresholds(self.writable() / THRESHOLDS_FILE, table)

    def write_json(self, name: str, data: dict) -> None:
        """One of the folder's JSON files (training.json), atomically."""
        write_file(self / name, json.dumps(data, indent=2) + "\n")

    def write_train_log(self, history: list[dict]) -> None:
        """train_log.jsonl: one JSON record per finished epoch, rewritten whole (atomically) each time."""
        write_file(self / TRAIN_LOG_FILE, "".join(json.dumps(record) + "\n" for record in history), fsync=False)
