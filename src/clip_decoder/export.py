"""``clip-decoder export``: a model as ONNX graphs and a manifest, to run without torch (``onnx_model``).

The model splits where its work does: per image (``image.onnx``: pixels -> tokens, the prior's
vector and its confidence), per label (``text.onnx``: token ids -> the label text's embedding, with ``tokenizer.json`` for
the tokenizers library) and per pair (``scoring.onnx``: tokens x label embeddings -> probabilities,
the decoder, the cosine skip and the prior term; ``attention.onnx``: where each label looked). Both the
number of images and the number of labels are dynamic, so a new label needs no new export. What a
consumer needs besides the graphs (preprocessing, templates, the prior's weights, the default decision)
is in ``manifest.json``, readable without this package (``onnx_model.ExportFolder``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import __version__
from .atomic import write_file
from .encoders.base import ExportableTextTower
from .errors import ClipDecoderError
from .model import CLIPDecoder
from .model_folder import THRESHOLDS_FILE, ModelFolder
from .caches import file_key
from .onnx_model import EXPORT_FORMAT, EXPORT_VERSION, GRAPHS, MANIFEST_FILE, TOKENIZER_FILE, ExportFolder
from .prior import prior_logits
from .thresholds import NEW_LABEL_THRESHOLD

OPSET = 18


class ImageGraph(nn.Module):
    """Pixels (B, 3, H, W) -> the tower's tokens (B, N, D) and, when the tower has a zero-shot view, the
    images' prior vectors (B, text_dim) at the model's temperature and their confidence (B,)."""

    def __init__(self, model: CLIPDecoder) -> None:
        super().__init__()
        self.tower, self.temperature = model.image_tower, model.scorer.prior.temperature
        self.zero_shot = model.zero_shot if model.zero_shot.available else None

    def forward(self, pixels: torch.Tensor):
        features = self.tower(pixels)
        if self.zero_shot is None:
            return features.tokens.float()
        return (features.tokens.float(), self.zero_shot(features.pooled, self.temperature),
                self.zero_shot.confidence(features.pooled))


class TextGraph(nn.Module):
    """Token ids (and mask) (T, S) -> unit text embeddings (T, text_dim): the text tower after its tokenizer."""

    def __init__(self, tower: ExportableTextTower, attention_mask: bool) -> None:
        super().__init__()
        self.tower, self.attention_mask = tower, attention_mask

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.tower.embed_tokens(input_ids, attention_mask)


class ScoringGraph(nn.Module):
    """Tokens (B, N, D), label embeddings (L, text_dim) and, with a prior, the images' prior vectors (B, text_dim)
    and each image-label pair's prior weight (B, L) -> probabilities (B, L), as ``Scorer.score`` gives them (no
    shortlist)."""

    def __init__(self, model: CLIPDecoder, with_prior: bool) -> None:
        super().__init__()
        self.head, self.config, self.with_prior = model.head, model.scorer.prior, with_prior
        mean = self.config.reference_mean
        self.register_buffer("reference_mean", torch.tensor(mean, dtype=torch.float32) if mean else None)

    def forward(self, tokens, label_embeddings, prior=None, prior_weights=None) -> torch.Tensor:
        queries = self.head.queries(label_embeddings)
        logits = self.head.decode(self.head.memory(tokens), queries).float()
        if self.with_prior:
            logits = logits + prior_logits(prior, queries.directions, prior_weights, self.config, self.reference_mean)
        return torch.sigmoid(logits)


class AttentionGraph(nn.Module):
    """Tokens (B, N, D) and label embeddings (L, text_dim) -> each label's first-layer attention over the tokens (B, L, N)."""

    def __init__(self, model: CLIPDecoder) -> None:
        super().__init__()
        self.head = model.head

    def forward(self, tokens, label_embeddings) -> torch.Tensor:
        return self.head.attention_maps(self.head.memory(tokens), self.head.queries(label_embeddings))


def model_sha256(model: CLIPDecoder) -> str:
    """A hash of what the model scores with: its config and the weights its folder holds."""
    from safetensors.torch import save

    state = {f"{name}.{key}": value.detach().cpu().contiguous()
             for name, module in model.saved_modules().items() for key, value in module.state_dict().items()}
    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    digest.update(save(state))
    return digest.hexdigest()


def _export(module: nn.Module, inputs: dict[str, torch.Tensor], dynamic: dict[str, dict[int, str]],
            outputs: list[str], path: Path) -> None:
    """One graph with the named dynamic axes, its weights beside it in ``path.data`` (ONNX Runtime maps that file:
    a start-up's peak memory holds one copy of the weights, not two); the exporter's own chatter is kept off stdout."""
    dims: dict[str, torch.export.Dim] = {}
    shapes = {name: {axis: dims.setdefault(dim, torch.export.Dim(dim)) for axis, dim in dynamic.get(name, {}).items()}
              for name in inputs}
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(), _quiet_loggers(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracing notes, not the user's business
        program = torch.onnx.export(module.eval(), kwargs=inputs, input_names=list(inputs), output_names=outputs,
                                    dynamic_shapes=shapes, opset_version=OPSET, dynamo=True, external_data=False,
                                    verbose=False)
        program.save(str(path), external_data=True)  # weights in PATH.data: ONNX Runtime maps them, no copy


@contextlib.contextmanager
def _quiet_loggers():
    """The exporter logs warnings about optional packages (torchvision's operators) that do not apply here."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _shapes(inputs: dict[str, torch.Tensor], dynamic: dict[str, dict[int, str]]) -> dict[str, list]:
    """Each input's shape for the manifest, its dynamic axes by name ("images", "labels", ...)."""
    return {name: [dynamic.get(name, {}).get(axis, size) for axis, size in enumerate(value.shape)]
            for name, value in inputs.items()}


def _max_difference(path: Path, inputs: dict[str, torch.Tensor], expected) -> float:
    """The largest absolute difference between ONNX Runtime's outputs of the graph at ``path`` and torch's."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    produced = session.run(None, {name: value.numpy() for name, value in inputs.items()})
    expected = expected if isinstance(expected, tuple) else (expected,)
    return max(float(np.abs(got - want.numpy()).max()) for got, want in zip(produced, expected))


def _prepare_folder(out: Path) -> None:
    """``out`` ready to take an export: missing, empty, or a former export (its manifest goes first, so a
    half-written folder is never read as whole, and its thresholds); any other folder is refused, untouched."""
    if out.exists() and not out.is_dir():
        raise ClipDecoderError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_FILE).is_file():
        raise ClipDecoderError(f"--out {out} is a folder that holds other files, not an export; choose an empty or new folder")
    out.mkdir(parents=True, exist_ok=True)
    for name in (MANIFEST_FILE, THRESHOLDS_FILE):  # (a former model's calibration must not outlive it)
        (out / name).unlink(missing_ok=True)


def _save_tokenizer(tower: ExportableTextTower, path: Path) -> dict:
    """Write the text tower's tokenizer as one tokenizer.json with its truncation and padding set; its settings."""
    from tokenizers import Tokenizer

    spec = tower.tokenizer_spec()
    backend = getattr(spec.tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ClipDecoderError(f"the text tower's tokenizer ({type(spec.tokenizer).__name__}) is not a fast tokenizer:"
                               " it cannot be saved as tokenizer.json")
    tokenizer = Tokenizer.from_str(backend.to_str())
    pad_id = spec.tokenizer.pad_token_id if spec.tokenizer.pad_token_id is not None else 0
    pad_token = spec.tokenizer.pad_token or tokenizer.id_to_token(pad_id)
    tokenizer.enable_truncation(spec.max_length)
    tokenizer.enable_padding(pad_id=pad_id, pad_token=pad_token, length=spec.max_length if spec.pad_to_max_length else None)
    write_file(path, tokenizer.to_str(), fsync=False)
    return {"max_length": spec.max_length, "pad_to_max_length": spec.pad_to_max_length,
            "attention_mask": spec.attention_mask}


def _export_image_side(model: CLIPDecoder, out: Path, with_prior: bool) -> tuple[float, tuple, torch.Tensor, torch.Tensor | None]:
    """image.onnx; (its difference from torch, its manifest shapes, sample tokens and prior vectors for the scoring side)."""
    size = model.image_tower.preprocess.image_size
    pixels, graph = torch.randn(2, 3, size, size), ImageGraph(model)
    with torch.no_grad():
        expected = graph(pixels)
    tokens, prior = expected[:2] if with_prior else (expected, None)
    dynamic = {"pixels": {0: "images"}}
    _export(graph, {"pixels": pixels}, dynamic, ["tokens", "prior", "confidence"][: 1 + 2 * with_prior], out / GRAPHS["image"])
    outputs = {"tokens": ["images", *tokens.shape[1:]],
               **({"prior": ["images", prior.shape[1]], "confidence": ["images"]} if with_prior else {})}
    return (_max_difference(out / GRAPHS["image"], {"pixels": pixels}, expected), ({"pixels": pixels}, dynamic, outputs),
            tokens, prior)


def _export_text_side(tower: ExportableTextTower, out: Path) -> tuple[float, tuple, dict]:
    """text.onnx and tokenizer.json; (the graph's difference from torch, its manifest shapes, the tokenizer's settings)."""
    settings = _save_tokenizer(tower, out / TOKENIZER_FILE)
    encoded = tower.tokenizer_spec().tokenizer(["a photo of a cat.", "a drawing of a red bicycle.", "dog"],
                                               padding="max_length" if settings["pad_to_max_length"] else True,
                                               truncation=True, max_length=settings["max_length"], return_tensors="pt")
    inputs = {"input_ids": encoded["input_ids"]}
    dynamic = {"input_ids": {0: "texts"} if settings["pad_to_max_length"] else {0: "texts", 1: "tokens"}}
    if settings["attention_mask"]:
        inputs["attention_mask"], dynamic["attention_mask"] = encoded["attention_mask"], dynamic["input_ids"]
    graph = TextGraph(tower, settings["attention_mask"])
    with torch.no_grad():
        expected = graph(**inputs)
    _export(graph, inputs, dynamic, ["embeddings"], out / GRAPHS["text"])
    shapes = (inputs, dynamic, {"embeddings": ["texts", tower.dim]})
    return _max_difference(out / GRAPHS["text"], inputs, expected), shapes, settings


def _export_pair_side(model: CLIPDecoder, out: Path, tokens: torch.Tensor, prior: torch.Tensor | None) -> tuple[dict, dict]:
    """scoring.onnx and attention.onnx; (their differences from torch, their manifest shapes)."""
    labels = torch.nn.functional.normalize(torch.randn(3, model.text_tower.dim), dim=-1)
    pair = {"tokens": tokens, "label_embeddings": labels}
    pair_dynamic = {"tokens": {0: "images"}, "label_embeddings": {0: "labels"}}
    weights = torch.tensor([20.0, 10.0, 0.0]) + torch.tensor([5.0, 5.0, 0.0]) * torch.rand(len(tokens), 1)
    with_prior = {"prior": prior, "prior_weights": weights} if prior is not None else {}
    prior_dynamic = {"prior": {0: "images"}, "prior_weights": {0: "images", 1: "labels"}} if prior is not None else {}
    graphs = {"scoring": (ScoringGraph(model, prior is not None), pair | with_prior, pair_dynamic | prior_dynamic,
                          {"probabilities": ["images", "labels"]}),
              "attention": (AttentionGraph(model), pair, pair_dynamic, {"attention": ["images", "labels", tokens.shape[1]]})}
    checks, shapes = {}, {}
    for name, (graph, graph_inputs, graph_dynamic, outputs) in graphs.items():
        with torch.no_grad():
            expected = graph(**graph_inputs)
        _export(graph, graph_inputs, graph_dynamic, list(outputs), out / GRAPHS[name])
        checks[name] = _max_difference(out / GRAPHS[name], graph_inputs, expected)
        shapes[name] = (graph_inputs, graph_dynamic, outputs)
    return checks, shapes


def export_model(model: CLIPDecoder, out: str | os.PathLike, source: str = "", log=None) -> dict:
    """Write ``model`` as ONNX graphs, its tokenizer and a manifest into ``out``; check each graph against torch
    on sample inputs (the largest difference is recorded); return the manifest. ``log`` gets progress lines."""
    log = log or (lambda text: print(text, file=sys.stderr))
    text_tower = model.text_tower
    if not isinstance(text_tower, ExportableTextTower):
        raise ClipDecoderError(f"backbone {model.config.backbone!r}: its text tower has no tokenizer_spec / embed_tokens,"
                               " so it cannot be exported")
    out = Path(out)
    _prepare_folder(out)
    model.eval()
    with_prior = model.zero_shot.available
    if with_prior:
        model.zero_shot.prepare()
    checks, shapes = {}, {}
    log(f"exporting the image side ({model.image_tower.name}) ...")
    checks["image"], shapes["image"], tokens, prior = _export_image_side(model, out, with_prior)
    log(f"exporting the label side ({text_tower.name}) ...")
    checks["text"], shapes["text"], tokenizer = _export_text_side(text_tower, out)
    log("exporting the scoring side (decoder head, cosine skip, prior term) ...")
    pair_checks, pair_shapes = _export_pair_side(model, out, tokens, prior)
    checks, shapes = checks | pair_checks, shapes | pair_shapes

    if source:
        thresholds = ModelFolder.find(source) / THRESHOLDS_FILE
        if thresholds.is_file():  # for `predict --runtime onnx --calibrated`
            shutil.copyfile(thresholds, out / THRESHOLDS_FILE)
    files = {name: {"bytes": (out / name).stat().st_size, "sha256": file_key(out / name)}
             for name in [*GRAPHS.values(), *(f"{graph}.data" for graph in GRAPHS.values()), TOKENIZER_FILE]}
    config = model.config
    manifest = {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_VERSION,
        "exported_by": f"clip-decoder {__version__}, torch {torch.__version__}",
        "opset": OPSET,
        "model": {"source": str(source), "backbone": config.backbone, "sha256": model_sha256(model)},
        "preprocess": model.image_tower.preprocess.to_dict(),
        "templates": list(config.templates),
        "text": {"tokenizer": TOKENIZER_FILE, "dim": text_tower.dim, **tokenizer,
                 "cache_key": f"onnx/{files[GRAPHS['text'] + '.data']['sha256']}/{files[TOKENIZER_FILE]['sha256']}"},
        "prior": {"view": model.image_tower.zero_shot, **config.prior.to_dict()} if with_prior else None,
        "decision": {"trained_labels": list(config.labels), "trained_threshold": config.decision_threshold,
                     "new_label_threshold": NEW_LABEL_THRESHOLD},
        "graphs": {name: {"file": GRAPHS[name], "inputs": _shapes(inputs, dynamic), "outputs": outputs}
                   for name, (inputs, dynamic, outputs) in shapes.items()},
        "files": files,
        "check": {"max_abs_difference": checks},
    }
    write_file(out / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
    ExportFolder(out).read_manifest()  # what was written reads back
    return manifest
