"""The decoder head: shapes, per-label independence, attention maths, dropout, options."""

from __future__ import annotations

import pytest
import torch

from clip_decoder.configs import HeadConfig
from clip_decoder.head import DecoderHead


def logits(head: DecoderHead, tokens: torch.Tensor, label_embeddings: torch.Tensor) -> torch.Tensor:
    """Image tokens (B, N, image_dim) and label embeddings (L, text_dim) -> the head's logits (B, L)."""
    return head.decode(head.memory(tokens), head.queries(label_embeddings))


def small_head(**options) -> DecoderHead:
    torch.manual_seed(0)
    config = dict(text_dim=12, image_dim=20, dim=16, heads=4, ffn_dim=32, dropout=0.1, cosine_skip=False)
    return DecoderHead(HeadConfig(**{**config, **options})).eval()


@pytest.mark.parametrize("n_labels", [1, 7, 300])
def test_any_number_of_labels_gives_one_logit_per_image_and_label(n_labels):
    head = small_head()
    scores = logits(head, torch.randn(3, 9, 20), torch.randn(n_labels, 12))
    assert scores.shape == (3, n_labels)


@pytest.mark.parametrize("options", [dict(layers=1), dict(layers=2), dict(cosine_skip=True)])
def test_a_labels_logit_does_not_depend_on_the_other_labels(options):
    head = small_head(**options)
    tokens, labels = torch.randn(4, 9, 20), torch.randn(6, 12)
    full = logits(head, tokens, labels)
    torch.testing.assert_close(logits(head, tokens, labels[[2]]), full[:, [2]])
    permutation = torch.tensor([5, 0, 3, 1, 4, 2])
    torch.testing.assert_close(logits(head, tokens, labels[permutation]), full[:, permutation])
    changed = labels.clone()
    changed[0] = torch.randn(12)
    torch.testing.assert_close(logits(head, tokens, changed)[:, 1:], full[:, 1:])


def test_an_images_logits_do_not_depend_on_the_other_images():
    head = small_head()
    tokens, labels = torch.randn(5, 9, 20), torch.randn(3, 12)
    torch.testing.assert_close(logits(head, tokens[[3]], labels), logits(head, tokens, labels)[[3]])


def test_cross_attention_matches_the_textbook_formula():
    head = small_head()
    layer = head.layers[0]
    tokens, labels = torch.randn(2, 9, 20), torch.randn(3, 12)
    memory, queries = head.memory(tokens), head.queries(labels).queries
    q = layer.to_q(layer.norm_query(queries)).view(3, 4, 4).transpose(0, 1)  # (heads, L, head_dim)
    k = layer.to_k(memory).view(2, 9, 4, 4).transpose(1, 2)  # (B, heads, N, head_dim)
    v = layer.to_v(memory).view(2, 9, 4, 4).transpose(1, 2)
    weights = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1)  # sqrt(head_dim) = 2
    attended = layer.to_out((weights @ v).transpose(1, 2).reshape(2, 3, 16))
    x = layer.norm_attn(layer.norm_query(queries) + attended)
    x = layer.norm_ffn(x + layer.ffn(x))
    torch.testing.assert_close(head.decode(memory, head.queries(labels)), head.scorer(x).squeeze(-1))
    maps = head.attention_maps(memory, head.queries(labels))  # where each label looked: heads averaged
    torch.testing.assert_close(maps, weights.mean(dim=1))
    torch.testing.assert_close(maps.sum(dim=-1), torch.ones(2, 3))


def test_cosine_skip_adds_a_scaled_cosine_in_the_text_space():
    head = small_head(cosine_skip=True)
    tokens, labels = torch.randn(2, 9, 20), torch.randn(3, 12)
    memory = head.memory(tokens)
    decoder_only = head.decode(memory, head.queries(labels)._replace(directions=torch.zeros(3, 12)))
    image = head.skip_proj(memory.mean(dim=1))
    cosine = torch.nn.functional.cosine_similarity(image[:, None], labels[None], dim=-1)
    torch.testing.assert_close(logits(head, tokens, labels), decoder_only + head.skip_scale * cosine)
    assert not hasattr(small_head(), "skip_proj")  # off by default: ML-Decoder's head


def test_dropout_acts_in_training_only():
    head = small_head(dropout=0.5)
    tokens, labels = torch.randn(2, 9, 20), torch.randn(3, 12)
    torch.testing.assert_close(logits(head, tokens, labels), logits(head, tokens, labels))
    head.train()
    assert not torch.allclose(logits(head, tokens, labels), logits(head, tokens, labels))


def test_head_has_no_per_label_parameter():
    head = small_head()
    sizes = {name: p.shape for name, p in head.named_parameters()}
    assert sizes["query_proj.weight"] == (16, 12) and sizes["scorer.weight"] == (1, 16)
    assert sum(p.numel() for p in head.parameters()) == sum(p.numel() for p in small_head().parameters())


@pytest.mark.parametrize("options", [dict(dim=18, heads=4), dict(layers=0), dict(dropout=1.0)])
def test_invalid_head_configs_are_rejected(options):
    with pytest.raises(ValueError):
        HeadConfig(text_dim=12, image_dim=20, **options)
