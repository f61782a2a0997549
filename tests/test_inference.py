"""The scoring path: the per-vocabulary cache, label chunks, per-image label subsets and the shortlist mode."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from clip_decoder import CLIPDecoder, ClipDecoderError
from clip_decoder.configs import PriorConfig
from clip_decoder.encoders import ImageFeatures

LABELS = [f"label {i}" for i in range(12)]


@pytest.fixture(scope="module")
def model(tiny_clip_dir):
    torch.manual_seed(0)
    # The head's own path; tests/test_prior.py covers what the prior adds.
    return CLIPDecoder.create(backbone=f"hf:{tiny_clip_dir}", dim=32, heads=4, ffn_dim=64, cosine_skip=True,
                              prior=PriorConfig.off())


def tokens(model, n=5):
    return torch.randn(n, 17, model.config.head.image_dim, generator=torch.Generator().manual_seed(1))


def probabilities(model, x, vocabulary, shortlist=None):
    return model.scorer.score(ImageFeatures(x, x.mean(dim=1)), vocabulary, shortlist).probabilities


def test_vocabulary_is_computed_once_and_matches_the_uncached_head(model):
    vocabulary = model.scorer.vocabulary(LABELS)
    assert model.scorer.vocabulary(LABELS) is vocabulary
    x = tokens(model)
    with torch.inference_mode():
        head, embeddings = model.head, model.embed_labels(LABELS, model.config.templates)
        expected = torch.sigmoid(head.decode(head.memory(x), head.queries(embeddings)))
    torch.testing.assert_close(probabilities(model, x, vocabulary), expected)


def test_exact_scoring_in_label_chunks_equals_one_pass(model, monkeypatch):
    import clip_decoder.scoring

    x = tokens(model)
    vocabulary = model.scorer.vocabulary(LABELS)
    one_pass = probabilities(model, x, vocabulary)
    monkeypatch.setattr(clip_decoder.scoring, "PAIRS_PER_CHUNK", 2 * len(x))  # chunks of 2 labels
    torch.testing.assert_close(probabilities(model, x, vocabulary), one_pass)


def test_vocabulary_cache_is_dropped_when_the_weights_change(model):
    vocabulary = model.scorer.vocabulary(LABELS)
    with torch.no_grad():
        model.head.query_proj.weight.mul_(1.5)  # in place, as an optimizer step does
    try:
        fresh = model.scorer.vocabulary(LABELS)
        assert fresh is not vocabulary and not torch.allclose(fresh.queries.q, vocabulary.queries.q)
    finally:
        with torch.no_grad():
            model.head.query_proj.weight.div_(1.5)


def test_each_image_can_have_its_own_labels(model):
    x = tokens(model)
    vocabulary = model.scorer.vocabulary(LABELS)
    index = torch.tensor([[0, 5, 7], [11, 2, 3], [4, 4, 1], [6, 8, 9], [10, 0, 2]])
    with torch.inference_mode():
        memory = model.head.memory(x)
        shared = model.head.decode(memory, vocabulary.queries)
        per_image = model.head.decode(memory, vocabulary.queries.select(index))
    torch.testing.assert_close(per_image, shared.gather(1, index))


@pytest.mark.parametrize("k", [1, 3, 11])
def test_shortlist_decodes_each_images_top_k_and_ranks_the_rest_below(model, k):
    x = tokens(model)
    vocabulary = model.scorer.vocabulary(LABELS)
    exact = probabilities(model, x, vocabulary)
    approximate = probabilities(model, x, vocabulary, shortlist=k)
    with torch.inference_mode():
        first_stage = model.alignment.embed_images(model.head.memory(x).mean(dim=1)) @ vocabulary.aligned.T
    top = first_stage.topk(k, dim=1).indices
    decoded = torch.zeros_like(exact, dtype=torch.bool).scatter_(1, top, True)
    torch.testing.assert_close(approximate[decoded], exact[decoded])  # decoded labels: exact scores
    floor = approximate.masked_fill(~decoded, 2).min(dim=1, keepdim=True).values
    rest = approximate.masked_fill(decoded, -1)
    assert (rest < floor).all()  # every other label ranks below the image's decoded ones
    for row in range(len(x)):  # ... in the first stage's order
        others = (~decoded[row]).nonzero().squeeze(1)
        order = first_stage[row, others].argsort()
        assert torch.all(approximate[row, others][order].diff() >= 0)


def test_shortlist_of_the_whole_vocabulary_is_exact(model):
    x = tokens(model)
    vocabulary = model.scorer.vocabulary(LABELS)
    torch.testing.assert_close(probabilities(model, x, vocabulary, shortlist=len(LABELS)), probabilities(model, x, vocabulary))


def test_predict_with_a_shortlist(model, cat_photo):
    images = [cat_photo, Image.new("RGB", (40, 30), (200, 20, 20))]
    exact = model.predict(images, LABELS)
    approximate = model.predict(images, LABELS, shortlist=4)
    assert approximate.shape == exact.shape
    assert ((np.abs(approximate - exact) < 1e-6).sum(axis=1) >= 4).all()  # at least the 4 decoded agree
    with pytest.raises(ClipDecoderError, match="shortlist must be at least 1"):
        model.predict(images, LABELS, shortlist=0)
