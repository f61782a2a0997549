"""Prompt templates, ensembling and the label-embedding cache."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from clip_decoder import ClipDecoderError
from clip_decoder.prompts import ENSEMBLE_TEMPLATES, SINGLE_TEMPLATE, LabelEmbedder, check_labels, check_templates, describe


class CountingTower:
    """A deterministic text tower (hash-seeded vectors) that counts the texts it encodes."""

    name, dim, cache_key = "counting", 16, "counting/v1"

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
    first = embed(["cat", "dog"], SINGLE_TEMPLATE)
    assert tower.encoded == ["a photo of a cat.", "a photo of a dog."]
    again = embed(["dog", "cat", "car"], SINGLE_TEMPLATE)
    assert tower.encoded[2:] == ["a photo of a car."]  # only the new label
    torch.testing.assert_close(again[:2], first[[1, 0]])
    embed(["cat"], ENSEMBLE_TEMPLATES)  # another template set is another key
    assert len(tower.encoded) == 3 + len(ENSEMBLE_TEMPLATES)


def test_cache_keeps_only_the_most_recent_labels():
    tower = CountingTower()
    embed = LabelEmbedder(tower, max_entries=2)
    embed(["a", "b"], SINGLE_TEMPLATE)
    embed(["a"], SINGLE_TEMPLATE)  # refresh a; b is now the oldest
    embed(["c"], SINGLE_TEMPLATE)
    assert len(embed) == 2
    embed(["a", "b"], SINGLE_TEMPLATE)
    assert tower.encoded[-1] == "a photo of a b."


def test_label_embeddings_kept_on_disk_are_found_by_the_next_process_without_the_text_tower(tmp_path):
    first = LabelEmbedder(CountingTower(), folder=tmp_path)
    expected = first(["cat", "dog"], ENSEMBLE_TEMPLATES)
    tower = CountingTower()
    later = LabelEmbedder(tower, folder=tmp_path)  # a new process: an empty memory cache
    assert later.missing(["dog", "cat", "car"], ENSEMBLE_TEMPLATES) == ["car"]
    torch.testing.assert_close(later(["dog", "cat"], ENSEMBLE_TEMPLATES), expected[[1, 0]], atol=0, rtol=0)
    assert tower.encoded == []  # identical embeddings, and the tower never ran
    later(["cat"], SINGLE_TEMPLATE)  # other templates, other embeddings
    assert tower.encoded == ["a photo of a cat."]
    for entry in (tmp_path / "labels").glob("*/*.safetensors"):
        entry.write_bytes(b"corrupt")  # a bad entry is embedded again, never used
    again = CountingTower()
    torch.testing.assert_close(LabelEmbedder(again, folder=tmp_path)(["cat", "dog"], ENSEMBLE_TEMPLATES), expected)
    assert len(again.encoded) == 2 * len(ENSEMBLE_TEMPLATES)
    other = CountingTower()
    other.cache_key = "counting/v2"  # other weights: nothing of v1's is used
    LabelEmbedder(other, folder=tmp_path)(["cat"], ENSEMBLE_TEMPLATES)
    assert len(other.encoded) == len(ENSEMBLE_TEMPLATES)


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
