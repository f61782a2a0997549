"""Tagging with an export (``clip-decoder export``) through ONNX Runtime: no torch, no transformers.

``ExportFolder`` reads and checks the folder (its manifest, its files); ``OnnxModel`` tags images with it
as ``CLIPDecoder`` does, through the same modules: the same preprocessing (``images``), decoding threads
and batches (``decoding``), label-embedding cache (``prompts``) and default decision (``thresholds``).
Only the towers and the head run in ONNX Runtime, the tokenizer in the tokenizers library.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from .caches import file_key
from .configs import PriorConfig
from .decoding import DEFAULT_BATCH_SIZE, PredictedBatch, checked_request, decoded_batches, predict_scores
from .errors import ClipDecoderError
from .images import Preprocess
from .prompts import LabelEmbedder, check_labels, check_templates
from .thresholds import Thresholds, model_rule

EXPORT_FORMAT = "clip-decoder-onnx"
# manifest.json's format_version; a newer one is refused (3: the prior's confidence weight, image.onnx's confidence
# output and prior weights per image-label pair; 2: the prior's head_only)
EXPORT_VERSION = 3
MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
THRESHOLDS_FILE = "thresholds.json"  # copied from the model folder when calibrate wrote one
GRAPHS = {"image": "image.onnx", "text": "text.onnx", "scoring": "scoring.onnx", "attention": "attention.onnx"}
# (image, label) pairs scored per run of the scoring graph, as the torch scorer chunks them (scoring.PAIRS_PER_CHUNK)
PAIRS_PER_CHUNK = 16_384
TEXTS_PER_BATCH = 128  # prompts per run of the text graph


class ExportFolder:
    """An export folder: manifest.json, the graphs and tokenizer.json it names (and maybe thresholds.json)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._manifest: dict | None = None

    @classmethod
    def find(cls, path: str | os.PathLike) -> ExportFolder:
        """The folder at ``path``, checked to hold an export (its manifest is read)."""
        folder = cls(path)
        folder.read_manifest()
        return folder

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def read_manifest(self) -> dict:
        """The checked manifest: a missing folder or file, another format or a newer version, a missing graph or
        one whose size is not the manifest's, each raise one line naming the file."""
        path = self / MANIFEST_FILE
        if not self.path.is_dir():
            raise ClipDecoderError(f"export folder {self.path} does not exist (write one with `clip-decoder export`)")
        if not path.is_file():
            raise ClipDecoderError(f"{self.path} holds no {MANIFEST_FILE}: not an export written by `clip-decoder export`"
                                   " (a model folder runs with --runtime torch)")
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ClipDecoderError(f"{path}: not valid JSON ({error})") from error
        if not isinstance(manifest, dict) or manifest.get("format") != EXPORT_FORMAT:
            raise ClipDecoderError(f"{path}: not a clip-decoder export manifest (format is not {EXPORT_FORMAT!r})")
        version = manifest.get("format_version")
        if not isinstance(version, int) or version > EXPORT_VERSION:
            raise ClipDecoderError(f"{path}: format_version {version!r} was written by another clip-decoder (this one"
                                   f" reads up to {EXPORT_VERSION}); export the model again with this version")
        try:
            files = {name: int(entry["bytes"]) for name, entry in manifest["files"].items()}
            for key in ("model", "preprocess", "templates", "text", "prior", "decision", "graphs"):
                manifest[key]  # noqa: B018 (present)
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise ClipDecoderError(f"{path}: not a complete export manifest (missing or bad {error})") from error
        for name, size in files.items():
            file = self / name
            if not file.is_file():
                raise ClipDecoderError(f"{file} is missing: the export is incomplete; export the model again")
            if file.stat().st_size != size:
                raise ClipDecoderError(f"{file} has {file.stat().st_size} bytes, the manifest says {size}: the export"
                                       " is damaged or incomplete; export the model again")
        self._manifest = manifest
        return manifest

    @property
    def manifest(self) -> dict:
        """The checked manifest, read once."""
        return self._manifest or self.read_manifest()

    def checked(self, name: str) -> Path:
        """The path of one of the export's files, its contents checked against the manifest's sha256 (a file is
        checked when it is first used: a damaged one is refused, naming it, instead of scoring wrongly)."""
        path, entry = self / name, self.manifest["files"].get(name)
        if entry is None:
            raise ClipDecoderError(f"{self / MANIFEST_FILE} does not list {name}: not an export of this version")
        if file_key(path) != entry.get("sha256"):
            raise ClipDecoderError(f"{path} does not match its sha256 in the manifest: the export is damaged;"
                                   " export the model again")
        return path

    def session(self, graph: str):
        """An ONNX Runtime session of one of GRAPHS; a file that does not load is named in the error."""
        import onnxruntime

        path = self.checked(GRAPHS[graph])
        self.checked(f"{GRAPHS[graph]}.data")  # its weights
        try:
            return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime raises its own types for a corrupt or foreign graph
            raise ClipDecoderError(f"{path}: not a loadable ONNX graph ({' '.join(str(error).split())[:300]})") from error

    def default_rule(self) -> Thresholds:
        """The model's default decision, as its manifest records it (ModelConfig.default_thresholds)."""
        decision = self.manifest["decision"]
        return model_rule(decision["trained_labels"], decision["trained_threshold"])

    def thresholds(self) -> Thresholds:
        """The thresholds `clip-decoder calibrate` stored with the model, copied into the export."""
        path = self / THRESHOLDS_FILE
        if not path.is_file():
            raise ClipDecoderError(f"{path} does not exist: the model was not calibrated before it was exported")
        return Thresholds.read(path)


class OnnxTextTower:
    """The exported text tower: texts -> unit embeddings (numpy), tokenized by the tokenizers library.

    Keeps the text-tower contract (encoders.base.TextTower) that ``LabelEmbedder`` relies on; the tokenizer and
    graph load on the first ``encode``, so labels already cached on disk never load them.
    """

    def __init__(self, folder: ExportFolder, manifest: dict) -> None:
        text = manifest["text"]
        self.folder, self.dim, self.cache_key = folder, int(text["dim"]), str(text["cache_key"])
        self.name = f"onnx:{manifest['model']['backbone']}"
        self.attention_mask = bool(text["attention_mask"])
        self._tokenizer = self._session = None

    def encode(self, texts: list[str]) -> np.ndarray:
        if self._session is None:
            from tokenizers import Tokenizer

            path = self.folder.checked(TOKENIZER_FILE)
            try:
                self._tokenizer = Tokenizer.from_file(str(path))
            except Exception as error:  # the tokenizers library raises its own exception type
                raise ClipDecoderError(f"{path}: not a readable tokenizer ({error})") from error
            self._session = self.folder.session("text")
        chunks = [np.empty((0, self.dim), dtype=np.float32)]
        for start in range(0, len(texts), TEXTS_PER_BATCH):
            encoded = self._tokenizer.encode_batch(list(texts[start : start + TEXTS_PER_BATCH]))
            feed = {"input_ids": np.array([item.ids for item in encoded], dtype=np.int64)}
            if self.attention_mask:
                feed["attention_mask"] = np.array([item.attention_mask for item in encoded], dtype=np.int64)
            chunks.append(self._session.run(None, feed)[0])
        return np.concatenate(chunks)


class OnnxModel:
    """An export, tagging images as ``CLIPDecoder`` does: ``predict`` / ``predict_batches`` with the same
    arguments, outputs and errors (no ``shortlist``: the export holds no first stage)."""

    def __init__(self, folder: ExportFolder, label_cache: str | os.PathLike | None = None) -> None:
        """``label_cache``: a folder keeping label embeddings on disk across processes, as CLIPDecoder's."""
        manifest = folder.manifest
        self.folder = folder
        try:
            self.preprocess = Preprocess.from_dict(manifest["preprocess"])
            self.templates = check_templates(manifest["templates"])
            self.trained_labels = tuple(check_labels(manifest["decision"]["trained_labels"]))
            self.backbone = str(manifest["model"]["backbone"])
            prior = manifest["prior"]
            self.has_prior = prior is not None
            self.gives_confidence = manifest["format_version"] >= 3  # image.onnx's confidence output came in format 3
            self.prior = PriorConfig.off()  # what of it this runtime uses: the weights and head_only
            if prior is not None:  # exports from before the confidence weight (version 2) score without it
                self.set_prior_weights(prior["weight"], prior["seen_weight"], prior.get("confidence_weight", 0.0))
                head_only = check_labels(prior.get("head_only", []))  # exports from before it have none
                self.prior = replace(self.prior, head_only=head_only)
            self.text_tower = OnnxTextTower(folder, manifest)
        except (ClipDecoderError, KeyError, TypeError, ValueError) as error:
            raise ClipDecoderError(f"{folder / MANIFEST_FILE}: not a valid export manifest ({error})") from error
        self.embed_labels = LabelEmbedder(self.text_tower, folder=label_cache)
        self._image, self._scoring = folder.session("image"), folder.session("scoring")
        self._attention = None

    @classmethod
    def load(cls, path: str | os.PathLike, label_cache: str | os.PathLike | None = None) -> OnnxModel:
        """The export in folder ``path``."""
        return cls(ExportFolder.find(path), label_cache)

    def set_prior_weights(self, weight: float | None = None, seen_weight: float | None = None,
                          confidence_weight: float | None = None) -> None:
        """The prior's weights for new and for trained labels and its confidence weight (None: keep the model's own)."""
        weight = self.prior.weight if weight is None else float(weight)
        seen_weight = self.prior.seen_weight if seen_weight is None else float(seen_weight)
        confidence = self.prior.confidence_weight if confidence_weight is None else float(confidence_weight)
        if not (weight >= 0 and seen_weight >= 0 and confidence >= 0):
            raise ClipDecoderError(f"prior weights must be >= 0, got weight {weight}, seen_weight {seen_weight},"
                                   f" confidence_weight {confidence}")
        if (weight or seen_weight) and not self.has_prior:
            raise ClipDecoderError(f"{self.backbone}'s image tower gives no zero-shot prior; turn the prior off (weights 0)")
        if confidence and self.has_prior and not self.gives_confidence:
            raise ClipDecoderError(f"{self.folder} was exported before the prior's confidence weight: export the model"
                                   f" again to use one (got confidence_weight {confidence})")
        self.prior = replace(self.prior, weight=weight, seen_weight=seen_weight, confidence_weight=confidence)

    def default_thresholds(self) -> Thresholds:
        """The model's default decision (``predict`` and ``serve`` with no decision option)."""
        return self.folder.default_rule()

    def predict(self, images: Sequence, labels: Sequence[str], templates: Sequence[str] | None = None,
                batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = False) -> np.ndarray:
        """Independent probabilities (n_images, n_labels), as ``CLIPDecoder.predict``."""
        return predict_scores(self, images, labels, templates, batch_size, progress)

    def predict_batches(self, images: Sequence, labels: Sequence[str], templates: Sequence[str] | None = None,
                        batch_size: int = DEFAULT_BATCH_SIZE, shortlist: int | None = None,
                        attention: bool = False) -> Iterator[PredictedBatch]:
        """``predict`` batch by batch, unreadable images reported in each batch's ``failed`` (as CLIPDecoder's)."""
        labels = checked_request(labels, batch_size)
        if shortlist is not None:
            raise ClipDecoderError("--shortlist is not available with --runtime onnx: the export scores every label")
        return self._predict_batches(list(images), labels, templates, batch_size, attention)

    def _predict_batches(self, images, labels, templates, batch_size, attention) -> Iterator[PredictedBatch]:
        embeddings = self.embed_labels.arrays(labels, check_templates(templates or self.templates))
        weights = np.array(self.prior.label_weights(labels, self.trained_labels), dtype=np.float32)
        gains = np.array(self.prior.confidence_gains(labels, self.trained_labels), dtype=np.float32)
        for batch in decoded_batches(images, self.preprocess, batch_size):
            if not batch.indices:  # every image of this batch failed
                yield PredictedBatch([], np.zeros((0, len(labels)), dtype=np.float32), batch.failed)
                continue
            outputs = self._image.run(None, {"pixels": batch.pixels})
            scores = self._scores(outputs, embeddings, weights, gains)
            maps = self._attention_maps(outputs[0], embeddings) if attention else None
            yield PredictedBatch(batch.indices, scores, batch.failed, maps)

    def _scores(self, image_outputs: list[np.ndarray], embeddings: np.ndarray, weights: np.ndarray,
                gains: np.ndarray) -> np.ndarray:
        """Probabilities (B, L); each pair's prior weight is its label's weight + gain x the image's confidence
        (PriorConfig), or the label's weight alone for an export from before the confidence output."""
        tokens = image_outputs[0]
        if self.has_prior and len(image_outputs) > 2:
            weights = weights[None, :] + gains[None, :] * image_outputs[2][:, None]
        step = max(1, PAIRS_PER_CHUNK // len(tokens))
        chunks = []
        for start in range(0, len(embeddings), step):
            feed = {"tokens": tokens, "label_embeddings": embeddings[start : start + step]}
            if self.has_prior:
                feed |= {"prior": image_outputs[1], "prior_weights": weights[..., start : start + step]}
            chunks.append(self._scoring.run(None, feed)[0])
        return np.concatenate(chunks, axis=1)

    def _attention_maps(self, tokens: np.ndarray, embeddings: np.ndarray) -> np.ndarray:
        if self._attention is None:
            self._attention = self.folder.session("attention")
        return self._attention.run(None, {"tokens": tokens, "label_embeddings": embeddings})[0]
