"""CLIPDecoder: encoders + head + alignment projections, saved as safetensors + JSON."""

from __future__ import annotations

import json
import os
import reprlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .atomic import atomic_write
from .decoding import DEFAULT_BATCH_SIZE, decoded_batches
from .encoders import Backbone, ImageFeatures, create_backbone
from .errors import ClipDecoderError
from .head import DecoderHead, HeadConfig, LabelQueries
from .images import load_image
from .losses import AsymmetricLoss, ContrastiveAlignment, LossWeights, total_loss
from .prompts import DEFAULT_TEMPLATES, LabelEmbedder, check_labels, check_templates

FORMAT_VERSION = 1
VOCABULARY_CACHE_SIZE = 8  # vocabularies whose per-label head work is kept for predict
# Exact scoring decodes at most this many (image, label) pairs at once: past it the intermediate
# tensors (pairs x FFN width) outgrow the CPU caches and the head runs memory-bound.
PAIRS_PER_CHUNK = 16_384
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# What config.json must hold for each field type of ModelConfig and HeadConfig (ints are sizes or
# versions, so positive); a field of a type missing here is left to the dataclass.
_JSON_TYPES = {"str": ((str,), "a string"), "int": ((int,), "a positive integer"), "float": ((int, float), "a number"),
               "bool": ((bool,), "true or false"), "HeadConfig": ((dict,), "an object"),
               "tuple[str, ...]": ((list,), "a list"), "list[str]": ((list,), "a list")}


def _check_json_types(data: dict, config_class: type, source: str, prefix: str = "") -> None:
    """Raise ClipDecoderError naming ``source`` when a field in ``data`` has the wrong JSON type."""
    for item in fields(config_class):
        if item.name not in data or item.type not in _JSON_TYPES:
            continue
        value, (types, description) = data[item.name], _JSON_TYPES[item.type]
        wrong_bool = isinstance(value, bool) and bool not in types
        if wrong_bool or not isinstance(value, types) or (item.type == "int" and value < 1):
            raise ClipDecoderError(f"{source}: '{prefix}{item.name}' must be {description}, got {reprlib.repr(value)}")


def _weights_mismatch(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> str:
    """One line saying how the weights ``found`` differ from those ``expected`` ('' when they fit)."""
    problems = [f"{key} missing" for key in expected if key not in found]
    problems += [f"{key} unexpected" for key in found if key not in expected]
    problems += [f"{key} has shape {list(found[key].shape)}, the model needs {list(value.shape)}"
                 for key, value in expected.items() if key in found and found[key].shape != value.shape]
    return "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model; written as config.json."""

    backbone: str
    head: HeadConfig
    align_dim: int = 256
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    labels: list[str] = field(default_factory=list)  # the labels seen in training
    # True when training changed the image tower (train --finetune-image-tower): its weights
    # are then saved with the head instead of being rebuilt from the backbone name.
    image_tower_trained: bool = False
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict:
        data = asdict(self)
        data["templates"] = list(self.templates)
        return data

    @classmethod
    def from_dict(cls, data: dict, source: str = CONFIG_FILE) -> ModelConfig:
        """Parse a config dict; any problem raises ClipDecoderError naming ``source``."""
        if not isinstance(data, dict):
            raise ClipDecoderError(f"{source}: expected a JSON object, got {type(data).__name__}")
        _check_json_types(data, cls, source)
        if isinstance(data.get("head"), dict):
            _check_json_types(data["head"], HeadConfig, source, prefix="head.")
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
                templates=check_templates(data.get("templates", DEFAULT_TEMPLATES)),
                labels=check_labels(data.get("labels", [])),
                image_tower_trained=bool(data.get("image_tower_trained", False)),
                format_version=int(version),
            )
        except ClipDecoderError as error:
            raise ClipDecoderError(f"{source}: {error}") from error
        except (AttributeError, KeyError, TypeError, ValueError) as error:
            raise ClipDecoderError(f"{source}: not a valid clip-decoder config ({error!r})") from error


@dataclass
class PredictedBatch:
    """One batch of predictions: rows of ``scores`` belong to the input positions in ``indices``."""

    indices: list[int]
    scores: np.ndarray  # (len(indices), n_labels) probabilities
    failed: dict[int, str]  # input position -> why that image could not be used
    attention: np.ndarray | None = None  # (len(indices), n_labels, N) with attention=True


@dataclass(frozen=True)
class Vocabulary:
    """A label set's share of inference, computed once and reused for every image."""

    labels: tuple[str, ...]
    queries: LabelQueries  # the head's per-label work
    aligned: torch.Tensor  # (L, align_dim) unit label texts in the alignment space: the shortlist's first stage


class CLIPDecoder(nn.Module):
    """Zero-shot multi-label classifier: an independent probability for any label name."""

    def __init__(self, config: ModelConfig, backbone: Backbone | None = None) -> None:
        super().__init__()
        backbone = backbone or create_backbone(config.backbone)
        if (backbone.text.dim, backbone.image.dim) != (config.head.text_dim, config.head.image_dim):
            raise ClipDecoderError(
                f"backbone {config.backbone!r} gives text/image dims"
                f" {backbone.text.dim}/{backbone.image.dim}, but the head expects"
                f" {config.head.text_dim}/{config.head.image_dim}"
            )
        self.config = config
        self.image_tower = backbone.image
        self.text_tower = backbone.text
        self.image_tower.requires_grad_(False)
        self.text_tower.requires_grad_(False)
        self.head = DecoderHead(config.head)
        self.alignment = ContrastiveAlignment(config.head.dim, backbone.text.dim, config.align_dim)
        self.asl = AsymmetricLoss()
        self.embed_labels = LabelEmbedder(self.text_tower)
        self._vocabularies: OrderedDict[tuple, Vocabulary] = OrderedDict()
        self.eval()

    @classmethod
    def create(
        cls,
        backbone: str = "offline",
        templates: Sequence[str] = DEFAULT_TEMPLATES,
        align_dim: int = 256,
        **head_options,
    ) -> CLIPDecoder:
        """An untrained model on the named backbone; ``head_options`` go to HeadConfig."""
        towers = create_backbone(backbone)
        try:
            head = HeadConfig(text_dim=towers.text.dim, image_dim=towers.image.dim, **head_options)
        except (TypeError, ValueError) as error:
            raise ClipDecoderError(f"bad head option: {error}") from error
        config = ModelConfig(
            backbone=backbone, head=head, align_dim=align_dim, templates=check_templates(templates)
        )
        return cls(config, towers)

    # ---- model folder: config.json + model.safetensors --------------------------------------

    def _saved_modules(self) -> dict[str, nn.Module]:
        # Frozen towers are rebuilt from their backbone name; only what trained is saved.
        modules = {"head": self.head, "alignment": self.alignment}
        if self.config.image_tower_trained:
            modules["image_tower"] = self.image_tower
        return modules

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write config.json and model.safetensors into ``directory`` (created if needed)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {
            f"{prefix}.{key}": value.detach().cpu().contiguous()
            for prefix, module in self._saved_modules().items()
            for key, value in module.state_dict().items()
        }
        # A crash never leaves a half-written file where a reader looks; the weights are
        # renamed into place first (the inner block ends first).
        with atomic_write(directory / CONFIG_FILE) as config, atomic_write(directory / WEIGHTS_FILE) as weights:
            save_file(tensors, weights, metadata={"format": "pt"})
            config.write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> CLIPDecoder:
        """Load a model folder written by save_pretrained; never unpickles anything."""
        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        if not directory.is_dir():
            raise ClipDecoderError(f"model folder {directory} does not exist")
        for path in (config_path, weights_path):
            if not path.is_file():
                raise ClipDecoderError(f"model folder {directory} has no {path.name}")
        try:
            data = json.loads(config_path.read_text(encoding="utf-8-sig"))  # -sig: a BOM from an editor is fine
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ClipDecoderError(f"{config_path}: not valid JSON ({error})") from error
        config = ModelConfig.from_dict(data, source=str(config_path))
        try:
            model = cls(config)
        except ClipDecoderError as error:  # unknown backbone, towers that do not fit the head
            raise ClipDecoderError(f"{config_path}: {error}") from error
        try:
            tensors = load_file(weights_path)
        except (SafetensorError, OSError, ValueError) as error:
            raise ClipDecoderError(f"{weights_path}: not a readable safetensors file ({error})") from error
        expected = {f"{prefix}.{key}": value for prefix, module in model._saved_modules().items()
                    for key, value in module.state_dict().items()}
        mismatch = _weights_mismatch(expected, tensors)
        if mismatch:
            raise ClipDecoderError(f"{weights_path}: weights do not fit the model in {config_path.name}: {mismatch}")
        for prefix, module in model._saved_modules().items():
            module.load_state_dict({k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")})
        return model

    # ---- training-time pieces ----------------------------------------------------------------

    def train(self, mode: bool = True) -> CLIPDecoder:
        """Train mode for the head; the frozen towers stay in eval mode (BatchNorm, dropout)."""
        super().train(mode)
        self.image_tower.eval()
        self.text_tower.eval()
        return self

    def forward(self, tokens: torch.Tensor, label_embeddings: torch.Tensor) -> torch.Tensor:
        """Image tokens (B, N, image_dim) and label embeddings (L, text_dim) -> logits (B, L)."""
        return self.head(tokens, label_embeddings)

    def loss(
        self,
        tokens: torch.Tensor,
        label_embeddings: torch.Tensor,
        targets: torch.Tensor,
        mask: torch.Tensor,
        sentence_embeddings: torch.Tensor,
        weights: LossWeights = LossWeights(),
    ) -> dict[str, torch.Tensor]:
        """ASL on the masked (seen) labels + alignment of pooled memory with per-image sentences."""
        memory = self.head.memory(tokens)
        logits = self.head.decode(memory, self.head.queries(label_embeddings))
        classification = self.asl(logits, targets, mask)
        alignment = self.alignment(memory.mean(dim=1), sentence_embeddings)
        return {
            "loss": total_loss(classification, alignment, weights),
            "cls": classification,
            "clip": alignment,
            "logits": logits,
        }

    # ---- inference ---------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.head.parameters()).device

    def encode_images(self, images: Sequence) -> ImageFeatures:
        """Paths or PIL images -> the image tower's features for the batch."""
        pixels = self.image_tower.preprocess.batch([load_image(image) for image in images])
        return self.image_tower(pixels.to(self.device))

    def _weights_key(self) -> tuple:
        """Changes whenever a weight is replaced or updated in place (load, optimizer step, .to())."""
        return tuple((p.data_ptr(), p._version, p.dtype) for p in self.parameters() if p.requires_grad)

    @torch.inference_mode()
    def vocabulary(self, labels: Sequence[str], templates: Sequence[str] | None = None) -> Vocabulary:
        """The per-label work for ``labels`` (embedding, query projection, first-layer query
        norm and projection), cached for the most recent vocabularies until the weights change."""
        labels = tuple(check_labels(labels))
        templates = tuple(templates or self.config.templates)
        key = (labels, templates, self._weights_key())
        if key not in self._vocabularies:
            embeddings = self.embed_labels(labels, templates).to(self.device)
            self._vocabularies[key] = Vocabulary(labels, self.head.queries(embeddings), self.alignment.embed_texts(embeddings))
            while len(self._vocabularies) > VOCABULARY_CACHE_SIZE:
                self._vocabularies.popitem(last=False)
        self._vocabularies.move_to_end(key)
        return self._vocabularies[key]

    @torch.inference_mode()
    def probabilities(self, tokens: torch.Tensor, vocabulary: Vocabulary, shortlist: int | None = None) -> torch.Tensor:
        """Image tokens (B, N, image_dim) -> probabilities (B, L) for the vocabulary's labels.

        With ``shortlist=K`` (approximate): a first stage scores every label by the cosine of the
        pooled memory and the label text in the alignment loss's shared space; only each image's
        top K labels go through the decoder. The others get ``floor * (1 + cosine) / 2``, where
        floor is the image's lowest decoded probability, so they rank below every decoded label
        and keep the first stage's order among themselves.
        """
        return self._probabilities(self.head.memory(tokens), vocabulary, shortlist)

    def _probabilities(self, memory: torch.Tensor, vocabulary: Vocabulary, shortlist: int | None) -> torch.Tensor:
        if shortlist is None or shortlist >= len(vocabulary.labels):
            step = max(1, PAIRS_PER_CHUNK // len(memory))
            chunks = [self.head.decode(memory, vocabulary.queries.select(slice(start, start + step)))
                      for start in range(0, len(vocabulary.labels), step)]
            return torch.sigmoid(torch.cat(chunks, dim=1).float())
        if shortlist < 1:
            raise ClipDecoderError(f"shortlist must be at least 1, got {shortlist}")
        cosine = (self.alignment.embed_images(memory.mean(dim=1)) @ vocabulary.aligned.T).float()
        top = cosine.topk(shortlist, dim=1).indices
        decoded = torch.sigmoid(self.head.decode(memory, vocabulary.queries.select(top)).float())
        floor = decoded.min(dim=1, keepdim=True).values
        return (floor * (1 + cosine) / 2).scatter_(1, top, decoded)

    def predict(
        self,
        images: Sequence,
        labels: Sequence[str],
        templates: Sequence[str] | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        progress: bool = False,
        shortlist: int | None = None,
    ) -> np.ndarray:
        """Independent probabilities (n_images, n_labels) for any label names.

        A label's score depends only on the image and that label, never on the other labels
        asked with it (except with ``shortlist``, an approximation for large vocabularies; see
        ``probabilities``). ``templates`` default to the ones the model was trained with.
        An image that cannot be read raises ClipDecoderError; ``predict_batches`` carries on instead.
        """
        if isinstance(images, (str, os.PathLike)) or isinstance(images, Image.Image):
            images = [images]
        images = list(images)
        batches = self.predict_batches(images, labels, templates, batch_size, shortlist)
        rows = []
        for batch in tqdm(batches, desc="predict", unit="batch", total=-(-len(images) // batch_size), disable=not progress):
            if batch.failed:
                raise ClipDecoderError(next(iter(batch.failed.values())))
            rows.append(batch.scores)
        return np.concatenate(rows) if rows else np.zeros((0, len(labels)), dtype=np.float32)

    def predict_batches(
        self,
        images: Sequence,
        labels: Sequence[str],
        templates: Sequence[str] | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        shortlist: int | None = None,
        attention: bool = False,
    ) -> Iterator[PredictedBatch]:
        """``predict`` batch by batch, for long runs: images that cannot be read are reported in
        each batch's ``failed`` and the others are scored. Images are decoded in a background
        thread while the towers run. ``attention=True`` adds each label's attention map over the
        image tokens (``DecoderHead.attention_maps``)."""
        labels = check_labels(labels)
        if not labels:
            raise ClipDecoderError("no labels to score")
        if batch_size < 1:
            raise ClipDecoderError(f"batch_size must be at least 1, got {batch_size}")
        if shortlist is not None and shortlist < 1:
            raise ClipDecoderError(f"shortlist must be at least 1, got {shortlist}")
        return self._predict_batches(list(images), labels, templates, batch_size, shortlist, attention)

    def _predict_batches(self, images, labels, templates, batch_size, shortlist, attention) -> Iterator[PredictedBatch]:
        was_training = self.training
        self.eval()
        try:
            vocabulary = self.vocabulary(labels, templates)
            for batch in decoded_batches(images, self.image_tower.preprocess, batch_size):
                if not batch.indices:  # every image of this batch failed
                    yield PredictedBatch([], np.zeros((0, len(labels)), dtype=np.float32), batch.failed)
                    continue
                with torch.inference_mode():
                    memory = self.head.memory(self.image_tower(batch.pixels.to(self.device)).tokens)
                    scores = self._probabilities(memory, vocabulary, shortlist).cpu().numpy()
                    maps = self.head.attention_maps(memory, vocabulary.queries).cpu().numpy() if attention else None
                yield PredictedBatch(batch.indices, scores, batch.failed, maps)
        finally:
            self.train(was_training)
