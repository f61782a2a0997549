"""Prompt templates, ensembling and the label-embedding cache."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from clip_decoder import ClipDecoderError
from clip_decoder.prompts import ENSEMBLE_TEMPLATES, LabelEmbedder, check_labels, check_templates, describe


class CountingTower:
    """A deterministic text tower (hash-seeded vectors) that counts the texts it encodes."""

    name, dim = "counting", 16

    def __init__(self) -> None:
        self.encoded: list[str] = []

    def encode(self, texts: list[str]) -> torch.Tensor:
        self.encoded.extend(texts)
        rows = [torch.randn(self.dim, generator=torch.Generator().manual_seed(sum(map(ord, t)) * 7919 + len(t))) for t in texts]
        return F.normalize(torch.stack(rows), dim=-1)


def test_ensemble_is_the_normalised_mean_of_template_embeddings():
    tower = CountingTower()
    templates = ("a photo of a {}.", "a drawing of a {}.")
    embedding = LabelEmbedder(tower)(["cat"], templates)
    parts = tower.encode(["a photo of a cat.", "a drawing of a cat."])
    torch.testing.assert_close(embedding[0], F.normalize(parts.mean(dim=0), dim=0))
    torch.testing.assert_close(embedding.norm(dim=1), torch.ones(1))


def test_each_label_is_embedded_once_per_tower_and_template_set():
    tower = CountingTower()
    embed = LabelEmbedder(tower)
    first = embed(["cat", "dog"])
    assert tower.encoded == ["a photo of a cat.", "a photo of a dog."]
    again = embed(["dog", "cat", "car"])
    assert tower.encoded[2:] == ["a photo of a car."]  # only the new label
    torch.testing.assert_close(again[:2], first[[1, 0]])
    embed(["cat"], ENSEMBLE_TEMPLATES)  # another template set is another key
    assert len(tower.encoded) == 3 + len(ENSEMBLE_TEMPLATES)


def test_cache_keeps_only_the_most_recent_labels():
    tower = CountingTower()
    embed = LabelEmbedder(tower, max_entries=2)
    embed(["a", "b"])
    embed(["a"])  # refresh a; b is now the oldest
    embed(["c"])
    assert len(embed) == 2
    embed(["a", "b"])
    assert tower.encoded[-1] == "a photo of a b."


@pytest.mark.parametrize("templates", [(), ("no slot",), ("{} and {}",)])
def test_bad_templates_are_rejected(templates):
    with pytest.raises(ClipDecoderError):
        check_templates(templates)


@pytest.mark.parametrize("labels, message", [("cat", "list of names"), (["cat", ""], "non-empty"), (["a", "a"], "twice")])
def test_bad_labels_are_rejected(labels, message):
    with pytest.raises(ClipDecoderError, match=message):
        check_labels(labels)


def test_describe_names_all_labels():
    assert describe([]) == "a photo."
    assert describe(["sky"]) == "a photo of sky."
    assert describe(["sky", "car", "road"]) == "a photo of sky, car and road."
