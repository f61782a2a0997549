"""The CLIP-Decoder head: ML-Decoder's cross-attention decoder with text-embedding queries.

Queries are label text embeddings through ONE shared projection, so the head holds no per-label
parameter and answers any vocabulary. Decoder layers have cross-attention and an FFN but no
self-attention between queries: each label's logit depends only on that label and the image.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from .configs import HeadConfig


class CrossAttentionLayer(nn.Module):
    """Post-norm decoder layer without self-attention, as in ML-Decoder."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        # ML-Decoder replaces self-attention by a residual of the query with itself;
        # what remains of it is this norm.
        self.norm_query = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.Linear(dim, dim)
        self.norm_attn = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_dim), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(ffn_dim, dim)
        )
        self.norm_ffn = nn.LayerNorm(dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, heads, n, head_dim)

    def project_queries(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The query side of the layer, which needs no image: (normed queries, attention q)."""
        normed = self.norm_query(queries)
        return normed, self.to_q(normed)

    def forward(
        self,
        queries: torch.Tensor,
        memory: torch.Tensor,
        projected: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """queries (1 or B, L, d) and memory (B, N, d) -> (B, L, d).

        A batch dimension of 1 on queries is shared by every image. ``projected`` is
        ``project_queries(queries)`` when the caller has it already (computed once per vocabulary).
        """
        batch = memory.shape[0]
        normed, q = projected if projected is not None else self.project_queries(queries)
        q = self._split(q).expand(batch, -1, -1, -1)
        k, v = self._split(self.to_k(memory)), self._split(self.to_v(memory))
        attended = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0
        )
        attended = self.to_out(attended.transpose(1, 2).flatten(2))
        x = self.norm_attn(normed + F.dropout(attended, self.dropout, self.training))
        return self.norm_ffn(x + F.dropout(self.ffn(x), self.dropout, self.training))


class LabelQueries(NamedTuple):
    """The vocabulary's share of the head's work, computed once per label set.

    Rows are labels: (L, ...) for a vocabulary shared by every image, or (B, K, ...) when each
    image has its own K labels (see ``select``).
    """

    queries: torch.Tensor  # decoder queries, d
    normed: torch.Tensor  # the first layer's normed queries, d
    q: torch.Tensor  # the first layer's attention queries, d
    directions: torch.Tensor  # unit text embeddings, text_dim, for the cosine skip

    def select(self, index: torch.Tensor | slice) -> LabelQueries:
        """Rows of a shared vocabulary: a slice or index (K,) -> a smaller shared vocabulary;
        an index (B, K) -> each image's own K labels, (B, K, ...) rows."""
        return LabelQueries(*(field[index] for field in self))


class DecoderHead(nn.Module):
    """Text-embedding queries x image-token memory -> one logit per (image, label)."""

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        self.config = config
        self.query_proj = nn.Linear(config.text_dim, config.dim)
        self.token_proj = nn.Linear(config.image_dim, config.dim)
        self.layers = nn.ModuleList(
            CrossAttentionLayer(config.dim, config.heads, config.ffn_dim, config.dropout)
            for _ in range(config.layers)
        )
        self.scorer = nn.Linear(config.dim, 1)  # shared by every label ("group-FC" in ZSL mode)
        if config.cosine_skip:
            self.skip_proj = nn.Linear(config.dim, config.text_dim)
            self.skip_scale = nn.Parameter(torch.tensor(10.0))

    def queries(self, label_embeddings: torch.Tensor) -> LabelQueries:
        """Label text embeddings (L, text_dim) -> what decode needs of them."""
        queries = F.relu(self.query_proj(label_embeddings))
        normed, q = self.layers[0].project_queries(queries)
        return LabelQueries(queries, normed, q, F.normalize(label_embeddings, dim=-1))

    def memory(self, tokens: torch.Tensor) -> torch.Tensor:
        """Image tokens (B, N, image_dim) -> decoder memory (B, N, d)."""
        return F.relu(self.token_proj(tokens))

    def decode(self, memory: torch.Tensor, queries: LabelQueries) -> torch.Tensor:
        """Memory (B, N, d) and a vocabulary's queries (shared or per image) -> logits (B, L)."""
        shared = queries.queries.ndim == 2
        if shared:
            queries = LabelQueries(*(field.unsqueeze(0) for field in queries))
        x = queries.queries
        for index, layer in enumerate(self.layers):
            x = layer(x, memory, (queries.normed, queries.q) if index == 0 else None)
        logits = self.scorer(x).squeeze(-1)
        if self.config.cosine_skip:
            logits = logits + self.skip_logits(memory, queries.directions)
        return logits

    def attention_maps(self, memory: torch.Tensor, queries: LabelQueries) -> torch.Tensor:
        """Where each label looked: the first layer's cross-attention weights over the image
        tokens, averaged over heads, (B, L, N); each row sums to 1."""
        layer = self.layers[0]
        q = layer._split(queries.q if queries.q.ndim == 3 else queries.q.unsqueeze(0))
        k = layer._split(layer.to_k(memory))
        weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)  # (B, heads, L, N)
        return weights.mean(dim=1)

    def skip_logits(self, memory: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
        """The cosine skip: scale * cos(skip_proj(mean memory), label direction) -> (B, L).

        ``directions`` is (1 or B, L, text_dim). It costs one small matmul per image and label,
        so it is also the shortlist's cheap first stage.
        """
        image = F.normalize(self.skip_proj(memory.mean(dim=1)), dim=-1)
        return self.skip_scale * (directions @ image.unsqueeze(-1)).squeeze(-1)
