"""CLIP and SigLIP towers through transformers, from the hub or a local folder: ``hf:<id or path>``.

Image tokens are the vision tower's last hidden state (patch tokens, CLS dropped), passed through
the model's final norm and, for CLIP, its visual projection, so they live in the joint space.
The pooled vector is the model's own image embedding, in the text tower's space (the towers'
zero-shot view is "joint"). Label embeddings come from the text tower.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..errors import ClipDecoderError
from ..images import Preprocess
from .base import Backbone, ImageFeatures, TokenizerSpec, quiet_loading, tokenized_batches
from .registry import register_backbone

SUPPORTED_MODEL_TYPES = ("clip", "siglip")
_PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


def preprocess_from_config(config: dict) -> Preprocess:
    """Translate a transformers ``preprocessor_config.json`` into our Preprocess."""
    size = config.get("size", 224)
    crop = config.get("crop_size", size)
    do_crop = config.get("do_center_crop", "crop_size" in config)

    def side(value: int | dict, key: str) -> int:
        return value if isinstance(value, int) else int(value.get(key) or value["height"])

    if do_crop:
        image_size, resize_size = side(crop, "height"), side(size, "shortest_edge")
    else:
        image_size, resize_size = side(size, "shortest_edge"), None
    if config.get("do_normalize", True):
        mean, std = tuple(config["image_mean"]), tuple(config["image_std"])
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    resample = _PIL_RESAMPLE.get(config.get("resample", 3), "bicubic")
    return Preprocess(
        image_size=image_size, resize_size=resize_size, mean=mean, std=std, resample=resample
    )


class HFImageTower(nn.Module):
    """Patch tokens and pooled embedding of a CLIP / SigLIP vision tower."""

    zero_shot = "joint"

    def __init__(self, name: str, model: nn.Module, preprocess: Preprocess) -> None:
        super().__init__()
        self.name = f"{name}@{preprocess.image_size}"
        self.preprocess = preprocess
        self.vision_model = model.vision_model
        # CLIP: CLS token first and a projection into the joint space; SigLIP: neither.
        self.projection = getattr(model, "visual_projection", None)
        self.has_cls_token = model.config.model_type == "clip"
        self.dim = model.config.projection_dim if self.projection is not None else (
            model.config.vision_config.hidden_size
        )
        # What the model's training made of a cosine (zero_shot.ZeroShotTagger): CLIP's softmax scale; SigLIP's
        # sigmoid scale and bias, an independent probability per label.
        self.logit_scale = float(model.logit_scale.detach().exp())
        bias = getattr(model, "logit_bias", None)
        self.logit_bias = None if bias is None else float(bias.detach())

    def trainable_blocks(self) -> list[nn.Module]:
        """The tower in training order, input to output: embeddings, each layer, final norms."""
        vision = self.vision_model
        # CLIP's pre-norm is spelled pre_layrnorm by transformers. SigLIP's attention-pooling head
        # is left out: the tokens do not go through it, so it would get no gradient.
        starts = [m for m in (vision.embeddings, getattr(vision, "pre_layrnorm", None)) if m is not None]
        ends = [m for m in (vision.post_layernorm, self.projection) if m is not None]
        return [nn.ModuleList(starts), *vision.encoder.layers, nn.ModuleList(ends)]

    def forward(self, pixels: torch.Tensor) -> ImageFeatures:
        out = self.vision_model(pixel_values=pixels)
        tokens, pooled = out.last_hidden_state, out.pooler_output
        if self.has_cls_token:
            # CLIP applies its final norm to the CLS token only; apply it to the patches too.
            tokens = self.vision_model.post_layernorm(tokens[:, 1:])
        if self.projection is not None:
            tokens, pooled = self.projection(tokens), self.projection(pooled)
        return ImageFeatures(tokens=tokens, pooled=pooled)


class HFTextTower(nn.Module):
    """L2-normalised text embeddings of a CLIP / SigLIP text tower."""

    def __init__(self, name: str, model: nn.Module, tokenizer, cache_key: str) -> None:
        super().__init__()
        self.name, self.cache_key = name, cache_key
        self.text_model = model.text_model
        self.projection = getattr(model, "text_projection", None)
        self.tokenizer = tokenizer
        text_config = model.config.text_config
        self.dim = model.config.projection_dim if self.projection is not None else (
            getattr(text_config, "projection_size", None) or text_config.hidden_size
        )
        self.max_length = model.config.text_config.max_position_embeddings
        # SigLIP was trained on text padded to its full length; CLIP on text padded per batch.
        self.padding = "max_length" if model.config.model_type == "siglip" else True

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        device = next(self.text_model.parameters()).device
        chunks = [torch.empty(0, self.dim, device=device)]
        for batch in tokenized_batches(self.tokenizer, texts, device, self.max_length, self.padding):
            # SigLIP's text tower was trained without an attention mask.
            mask = batch.get("attention_mask") if self.padding is True else None
            chunks.append(self.embed_tokens(batch["input_ids"], mask))
        return torch.cat(chunks)

    def embed_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (T, S) and their mask (None for SigLIP) -> unit embeddings (T, dim): the tower after its tokenizer."""
        pooled = self.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        if self.projection is not None:
            pooled = self.projection(pooled)
        return nn.functional.normalize(pooled.float(), dim=-1)

    def tokenizer_spec(self) -> TokenizerSpec:
        """How ``encode`` tokenizes: the fast tokenizer and its settings (for an export without transformers)."""
        padded = self.padding == "max_length"
        return TokenizerSpec(self.tokenizer, self.max_length, pad_to_max_length=padded, attention_mask=not padded)


def _weights_stamp(model_id: str, cached_file) -> str:
    """The weights file's size and time: label embeddings on disk are kept under them, so a folder
    trained again (same path, new weights) gets new ones."""
    for name in ("model.safetensors", "model.safetensors.index.json"):  # one file, or shards and their index
        try:
            stat = Path(cached_file(model_id, name)).stat()
        except (OSError, TypeError):  # TypeError: no such file, in some transformers versions (a None path)
            continue
        return f"{stat.st_size}-{stat.st_mtime_ns}"
    raise OSError(f"no model.safetensors in {model_id}")


@register_backbone("hf")
def hf_backbone(model_id: str | None) -> Backbone:
    """Load a transformers CLIP or SigLIP model (hub id or local folder)."""
    if not model_id:
        raise ClipDecoderError("backbone 'hf' needs a model: 'hf:<hub id or local folder>'")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import cached_file

    try:
        with quiet_loading():
            # safetensors only: a folder or repo offering pickled weights alone is refused.
            model = AutoModel.from_pretrained(model_id, use_safetensors=True)
            tokenizer = AutoTokenizer.from_pretrained(model_id)
        with open(cached_file(model_id, "preprocessor_config.json"), encoding="utf-8") as f:
            preprocess = preprocess_from_config(json.load(f))
        stamp = _weights_stamp(model_id, cached_file)
    except (OSError, ValueError, KeyError) as error:
        raise ClipDecoderError(f"cannot load hf model {model_id!r}: {error}") from error
    if model.config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ClipDecoderError(
            f"hf model {model_id!r} is a {model.config.model_type!r} model;"
            f" supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    model.eval()
    name = f"hf:{model_id}"
    return Backbone(
        name=name,
        image=HFImageTower(name, model, preprocess),
        text=HFTextTower(name, model, tokenizer, f"{name}/{stamp}"),
    )
