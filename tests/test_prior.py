"""The zero-shot prior: what it adds to each logit, CONSE as the prior alone, and the model folder."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import torch
from torch.nn import functional as F

from clip_decoder import CLIPDecoder
from clip_decoder.encoders import ImageFeatures
from clip_decoder.prior import imagenet_class_names
from clip_decoder.training.baselines import ConSE

LABELS = ["cat", "dog", "airplane", "pizza"]


def test_the_prior_adds_its_weighted_cosine_to_each_logit(tiny_clip_dir):
    torch.manual_seed(0)
    plain = CLIPDecoder.create(backbone=f"hf:{tiny_clip_dir}", dim=32, heads=4, ffn_dim=64, prior_weight=0.0)
    with_prior = CLIPDecoder(replace(plain.config, prior_weight=3.0))
    with_prior.head.load_state_dict(plain.head.state_dict())
    with_prior.alignment.load_state_dict(plain.alignment.state_dict())
    tokens = torch.randn(2, 17, plain.config.head.image_dim)
    features = ImageFeatures(tokens, torch.randn(2, plain.config.head.image_dim))
    p0 = plain.scorer.score(features, plain.scorer.vocabulary(LABELS)).probabilities
    p1 = with_prior.scorer.score(features, with_prior.scorer.vocabulary(LABELS)).probabilities
    # CLIP towers: the prior is the model's own zero-shot score, cos(image embedding, label text)
    cosine = F.normalize(features.pooled, dim=-1) @ with_prior.embed_labels(LABELS, plain.config.templates).T
    torch.testing.assert_close(torch.logit(p1.double()) - torch.logit(p0.double()), 3.0 * cosine.double(), atol=1e-4, rtol=0)


def test_conse_is_the_offline_prior_alone_and_ranks_the_photos_class_first(offline_model, cat_photo):
    pooled = offline_model.encode_images([cat_photo]).pooled
    labels = offline_model.embed_labels(LABELS, offline_model.config.templates)
    scores = ConSE(offline_model.prior).score(pooled, labels)
    assert scores.argmax() == 0
    np.testing.assert_allclose(scores, (offline_model.prior(pooled) @ labels.T).numpy(), atol=1e-6)
    assert offline_model.prior.class_embeddings.shape == (len(imagenet_class_names()), 384)


def test_a_model_with_the_prior_saves_the_class_embeddings_and_never_re_embeds_them(offline_model, tmp_path, cat_photo,
                                                                                  monkeypatch):
    model = CLIPDecoder.create(backbone="offline", prior_weight=5.0)
    scores = model.predict([cat_photo], LABELS)
    model.save_pretrained(tmp_path / "m")
    loaded = CLIPDecoder.from_pretrained(tmp_path / "m")
    embedded = []
    original = type(loaded.text_tower).encode
    monkeypatch.setattr(type(loaded.text_tower), "encode", lambda self, texts: (embedded.extend(texts), original(self, texts))[1])
    np.testing.assert_allclose(loaded.predict([cat_photo], LABELS), scores, atol=1e-6)
    assert len(embedded) == len(LABELS) * len(model.config.templates)  # the labels only, not 1,000 class names
    assert json.loads((tmp_path / "m" / "config.json").read_text())["prior_weight"] == 5.0


def test_a_folder_from_before_the_prior_loads_with_the_prior_off(tmp_path, cat_photo):
    before = CLIPDecoder.create(backbone="offline", prior_weight=0.0)  # what such a folder holds
    before.save_pretrained(tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    del config["prior_weight"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    loaded = CLIPDecoder.from_pretrained(tmp_path / "old")
    assert loaded.config.prior_weight == 0.0
    np.testing.assert_allclose(loaded.predict([cat_photo], LABELS), before.predict([cat_photo], LABELS), atol=1e-6)



def test_training_centres_the_prior_so_it_moves_no_score_on_average(trained, tiny_dataset):
    from clip_decoder.data.folder import training_parts
    from clip_decoder.features import FeatureCache

    out, cache, _ = trained
    model = CLIPDecoder.from_pretrained(out)
    assert model.config.prior_weight == 10.0 and model.config.prior_offset != 0.0
    train, _ = training_parts(tiny_dataset, 0.25)
    features = FeatureCache(model.image_tower, cache).get([s.image for s in train], progress=False)
    vocabulary = model.scorer.vocabulary(model.config.labels)
    with torch.inference_mode():
        shift = model.scorer.prior_logits(features.pooled, vocabulary)
    assert abs(float(shift.mean())) < 1e-4  # over the training images and labels; per image and label it varies
    assert float(shift.std()) > 0


def test_benchmark_models_share_the_towers_class_embeddings():
    from clip_decoder.training.config import TrainConfig
    from clip_decoder.training.methods import fresh_model

    # Towers whose label cache is empty, as the harness's are: a label embedded earlier in another
    # batch could differ in the last bit.
    towers = CLIPDecoder.create(backbone="offline")
    model = fresh_model(towers, TrainConfig())
    assert model.prior.ready and model.prior.class_embeddings.data_ptr() != towers.prior.class_embeddings.data_ptr()
    alone = CLIPDecoder.create(backbone="offline")  # embeds the class names itself
    alone.prior.prepare()
    assert torch.equal(model.prior.class_embeddings, alone.prior.class_embeddings)
