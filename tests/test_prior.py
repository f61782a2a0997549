"""The zero-shot prior: what it adds to each logit, CONSE as the prior alone, and the model folder."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import image_features
from torch.nn import functional as F

from clip_decoder import CLIPDecoder
from clip_decoder.configs import PriorConfig
from clip_decoder.encoders import ImageFeatures
from clip_decoder.prior import imagenet_class_names
from clip_decoder.training.baselines import ConSE

LABELS = ["cat", "dog", "airplane", "pizza"]


def test_the_prior_adds_its_weighted_cosine_to_each_logit(tiny_clip_dir):
    torch.manual_seed(0)
    plain = CLIPDecoder.create(backbone=f"hf:{tiny_clip_dir}", dim=32, heads=4, ffn_dim=64, prior=PriorConfig.off())
    with_prior = CLIPDecoder(replace(plain.config, prior=PriorConfig(weight=3.0, seen_weight=3.0, confidence_weight=0.0)))
    with_prior.head.load_state_dict(plain.head.state_dict())
    with_prior.alignment.load_state_dict(plain.alignment.state_dict())
    tokens = torch.randn(2, 17, plain.config.head.image_dim)
    features = ImageFeatures(tokens, torch.randn(2, plain.config.head.image_dim))
    p0 = plain.scorer.score(features, plain.scorer.vocabulary(LABELS)).probabilities
    p1 = with_prior.scorer.score(features, with_prior.scorer.vocabulary(LABELS)).probabilities
    # CLIP towers: the prior is the model's own zero-shot score, cos(image embedding, label text)
    cosine = F.normalize(features.pooled, dim=-1) @ with_prior.embed_labels(LABELS, plain.config.templates).T
    torch.testing.assert_close(torch.logit(p1.double()) - torch.logit(p0.double()), 3.0 * cosine.double(), atol=1e-4, rtol=0)


def test_labels_the_head_was_trained_on_get_the_seen_weight_and_the_others_the_weight(tiny_clip_dir):
    torch.manual_seed(0)
    plain = CLIPDecoder.create(backbone=f"hf:{tiny_clip_dir}", dim=32, heads=4, ffn_dim=64, prior=PriorConfig.off())
    mixed = CLIPDecoder(replace(plain.config, prior=PriorConfig(weight=4.0, seen_weight=1.5, confidence_weight=0.0,
                                                                offset=0.1)))
    for model in (plain, mixed):
        model.head.load_state_dict(plain.head.state_dict())
        model.set_trained_labels(["dog", "pizza"])
    features = ImageFeatures(torch.randn(3, 17, plain.config.head.image_dim), torch.randn(3, plain.config.head.image_dim))
    logit = {name: torch.logit(m.scorer.score(features, m.scorer.vocabulary(LABELS)).probabilities.double())
             for name, m in (("plain", plain), ("mixed", mixed))}
    cosine = F.normalize(features.pooled, dim=-1) @ mixed.embed_labels(LABELS, plain.config.templates).T
    weights = torch.tensor([4.0, 1.5, 4.0, 1.5])  # cat, dog (trained), airplane, pizza (trained)
    torch.testing.assert_close(logit["mixed"] - logit["plain"], (weights * (cosine - 0.1)).double(), atol=1e-4, rtol=0)
    # the trained labels are saved with the model and keep their weight after loading
    assert mixed.config.labels == ("dog", "pizza")


def test_each_images_weight_grows_by_the_confidence_weight_times_the_classifiers_top_probability(offline_model,
                                                                                                 cat_photo, tiny_dataset):
    """weight on (image, label) = the label's weight + confidence_weight x the ImageNet classifier's top probability;
    a label whose weight is 0 (head_only) gets none of it."""
    pooled = image_features(offline_model, [cat_photo, tiny_dataset / "images" / "test-0.png"]).pooled
    features = ImageFeatures(torch.randn(2, 49, offline_model.config.head.image_dim), pooled)
    prior = PriorConfig(weight=4.0, seen_weight=1.5, confidence_weight=0.0, offset=0.05, head_only=("pizza",))
    logits = {}
    for gain in (0.0, 6.0):
        model = CLIPDecoder(replace(offline_model.config, prior=replace(prior, confidence_weight=gain)))
        model.head.load_state_dict(offline_model.head.state_dict())
        model.zero_shot.load_state_dict(offline_model.zero_shot.state_dict())
        model.set_trained_labels(["dog", "pizza"])
        logits[gain] = torch.logit(model.scorer.score(features, model.scorer.vocabulary(LABELS)).probabilities.double())
    top = offline_model.image_tower.imagenet_logits(pooled).softmax(-1).max(-1).values
    assert 0 < top.min() and top.max() < 1 and abs(float(top[0] - top[1])) > 0.05  # the two images differ
    torch.testing.assert_close(model.zero_shot.confidence(pooled), top)
    cosine = model.zero_shot(pooled, prior.temperature) @ model.embed_labels(LABELS, model.config.templates).T
    gains = torch.tensor([6.0, 6.0, 6.0, 0.0])  # cat, dog (trained), airplane; pizza: trained and head_only
    expected = gains * top[:, None] * (cosine - 0.05)
    torch.testing.assert_close(logits[6.0] - logits[0.0], expected.double(), atol=1e-4, rtol=0)


def test_a_tower_in_the_text_space_is_sure_of_every_image(tiny_clip_dir):
    model = CLIPDecoder.create(backbone=f"hf:{tiny_clip_dir}", dim=32, heads=4, ffn_dim=64)
    torch.testing.assert_close(model.zero_shot.confidence(torch.randn(3, model.config.head.image_dim)), torch.ones(3))


def test_the_temperature_softens_the_imagenet_distribution_before_conse_averages_its_top_classes(offline_model, cat_photo):
    pooled = image_features(offline_model, [cat_photo]).pooled
    prior = offline_model.zero_shot
    prior.prepare()
    logits = offline_model.image_tower.imagenet_logits(pooled)
    vectors = {}
    for temperature in (1.0, 3.0):
        probabilities = (logits / temperature).softmax(-1)
        top = probabilities.topk(10, dim=-1)
        expected = F.normalize(top.values @ prior.class_embeddings[top.indices[0]], dim=-1)
        vectors[temperature] = prior(pooled, temperature)
        torch.testing.assert_close(vectors[temperature], expected, atol=1e-5, rtol=0)
    assert not torch.allclose(vectors[1.0], vectors[3.0], atol=1e-3)  # a hotter softmax spreads the weight


def test_conse_keeps_the_classifiers_own_probabilities_and_the_prior_alone_takes_the_prior_temperature(
        offline_model, cat_photo, monkeypatch):
    from clip_decoder.encoders import Backbone
    from clip_decoder.training import methods
    from clip_decoder.training.config import TrainConfig
    from clip_decoder.training.data import FeatureSet

    offline_model.zero_shot.prepare()
    towers = Backbone("offline", offline_model.image_tower, offline_model.text_tower)
    shared = {offline_model.config.templates: offline_model.zero_shot.class_embeddings}  # as the harness holds them
    embedded = []  # the towers' class-name embeddings are shared: nothing but the labels is embedded
    original = type(offline_model.text_tower).encode
    monkeypatch.setattr(type(offline_model.text_tower), "encode",
                        lambda self, texts: (embedded.extend(texts), original(self, texts))[1])
    features = image_features(offline_model, [cat_photo])
    stored = FeatureSet(features.tokens, features.pooled, [])
    scores = {}
    for temperature in (1.0, 4.0):
        run = methods.MethodRun(towers, {}, None, TrainConfig(prior=PriorConfig(temperature=temperature)),
                                class_embeddings=shared)
        scores["conse", temperature] = methods.get_method("conse").train(run).score(stored, LABELS)
        scores["prior", temperature] = methods.get_method("zero-shot-prior").train(run).score(stored, LABELS)
    np.testing.assert_allclose(scores["conse", 1.0], scores["conse", 4.0], atol=1e-6)
    np.testing.assert_allclose(scores["prior", 1.0], scores["conse", 1.0], atol=1e-5)
    assert not np.allclose(scores["prior", 4.0], scores["prior", 1.0], atol=1e-3)
    assert len(embedded) == 4 * len(LABELS) * len(offline_model.config.templates)  # each run's own label embedder


def test_conse_is_the_offline_prior_alone_and_ranks_the_photos_class_first(offline_model, cat_photo):
    pooled = image_features(offline_model, [cat_photo]).pooled
    labels = offline_model.embed_labels(LABELS, offline_model.config.templates)
    scores = ConSE(offline_model.zero_shot).score(pooled, labels)  # the classifier's own probabilities
    assert scores.argmax() == 0
    np.testing.assert_allclose(scores, (offline_model.zero_shot(pooled, 1.0) @ labels.T).numpy(), atol=1e-6)
    assert offline_model.zero_shot.class_embeddings.shape == (len(imagenet_class_names()), 384)


def test_a_model_with_the_prior_saves_the_class_embeddings_and_never_re_embeds_them(offline_model, tmp_path, cat_photo,
                                                                                  monkeypatch):
    model = CLIPDecoder.create(backbone="offline", prior=PriorConfig(weight=5.0))
    scores = model.predict([cat_photo], LABELS)
    model.save_pretrained(tmp_path / "m")
    loaded = CLIPDecoder.from_pretrained(tmp_path / "m")
    embedded = []
    original = type(loaded.text_tower).encode
    monkeypatch.setattr(type(loaded.text_tower), "encode", lambda self, texts: (embedded.extend(texts), original(self, texts))[1])
    np.testing.assert_allclose(loaded.predict([cat_photo], LABELS), scores, atol=1e-6)
    assert len(embedded) == len(LABELS) * len(model.config.templates)  # the labels only, not 1,000 class names
    assert json.loads((tmp_path / "m" / "config.json").read_text())["prior"]["weight"] == 5.0


def test_a_folder_from_before_the_prior_loads_with_the_prior_off(tmp_path, cat_photo):
    before = CLIPDecoder.create(backbone="offline", prior=PriorConfig.off())  # what such a folder holds
    before.save_pretrained(tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    del config["prior"]
    config["format_version"] = 1
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    loaded = CLIPDecoder.from_pretrained(tmp_path / "old")
    assert not loaded.config.prior.on
    np.testing.assert_allclose(loaded.predict([cat_photo], LABELS), before.predict([cat_photo], LABELS), atol=1e-6)


def test_a_folder_with_one_prior_weight_keeps_its_scores(tmp_path, cat_photo):
    # format 1: one weight for every label and the classifier's own probabilities (temperature 1)
    legacy = PriorConfig(weight=10.0, seen_weight=10.0, confidence_weight=0.0, temperature=1.0, offset=0.25)
    before = CLIPDecoder.create(backbone="offline", prior=legacy)
    before.set_trained_labels(["cat"])
    before.save_pretrained(tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    del config["prior"]
    config.update(format_version=1, prior_weight=10.0, prior_offset=0.25)
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    loaded = CLIPDecoder.from_pretrained(tmp_path / "old")
    assert loaded.config.prior == legacy and loaded.config.labels == ("cat",)
    np.testing.assert_allclose(loaded.predict([cat_photo], LABELS), before.predict([cat_photo], LABELS), atol=1e-6)


def test_a_folder_from_before_the_confidence_weight_keeps_its_scores(tmp_path, cat_photo):
    # format 4: each label's weight the same on every image
    fixed = PriorConfig(weight=20.0, seen_weight=10.0, confidence_weight=0.0, offset=0.1)
    before = CLIPDecoder.create(backbone="offline", prior=fixed)
    before.set_trained_labels(["cat"])
    before.save_pretrained(tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    del config["prior"]["confidence_weight"]
    config["format_version"] = 4
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    loaded = CLIPDecoder.from_pretrained(tmp_path / "old")
    assert loaded.config.prior == fixed and PriorConfig().confidence_weight > 0
    np.testing.assert_allclose(loaded.predict([cat_photo], LABELS), before.predict([cat_photo], LABELS), atol=1e-6)


def test_bad_prior_settings_in_a_config_name_the_field(tmp_path):
    from clip_decoder.errors import ClipDecoderError

    CLIPDecoder.create(backbone="offline", prior=PriorConfig.off()).save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    config = json.loads(path.read_text())
    for bad, message in (({"weight": "lots"}, "'prior.weight' must be a number"),
                         ({"temperature": 0.0}, "temperature > 0"),
                         ({"confidence_weight": -1.0}, "confidence_weight -1.0"),
                         ({"colour": 1.0}, "not a valid clip-decoder config")):
        path.write_text(json.dumps({**config, "prior": {**config["prior"], **bad}}))
        with pytest.raises(ClipDecoderError, match=message):
            CLIPDecoder.from_pretrained(tmp_path / "m")



def test_training_centres_the_prior_on_the_training_images_each_label_by_the_centring_share(trained, tiny_dataset):
    from clip_decoder.data.folder import training_parts
    from clip_decoder.features import FeatureCache

    out, cache, _ = trained
    model = CLIPDecoder.from_pretrained(out)
    prior = model.config.prior
    assert replace(prior, reference_mean=(), offset=0.0) == PriorConfig() and len(prior.reference_mean) == model.text_tower.dim
    train, _ = training_parts(tiny_dataset, 0.25)
    features = FeatureCache(model.image_tower, cache).get([s.image for s in train], progress=False)
    # Trained labels and new ones, among them a "hub" near every image's prior vector: the reference mean itself.
    trained_labels = list(model.config.labels)
    vocabulary = model.scorer.vocabulary([*trained_labels, "a new label", "cat"])

    def shift(**changes):
        with torch.inference_mode():
            return model.scorer.with_prior(replace(prior, **changes)).prior_logits(features.pooled, vocabulary)

    default, per_label, uncentred = shift(), shift(centring=1.0, offset=0.0), shift(reference_mean=(), offset=0.0)
    # As trained (a share of each label's own mean, the rest one mean over the trained labels): no shift on average.
    assert abs(float(default[:, : len(trained_labels)].mean())) < 1e-3 and float(default.std()) > 0
    np.testing.assert_allclose(per_label.mean(dim=0).numpy(), 0, atol=1e-4)  # centring 1: every label's own mean is 0
    assert float(uncentred.mean(dim=0).abs().min()) > 1e-2  # uncentred, no label is at 0
    for other in (per_label, uncentred):  # per label, each is the default and a constant
        np.testing.assert_allclose((other - default).std(dim=0).numpy(), 0, atol=1e-4)
    assert not np.allclose((per_label - default).mean(dim=0).numpy(), 0, atol=1e-3)



def test_a_head_only_margin_turns_the_prior_off_on_the_trained_labels_the_head_ranks_better_alone(trained, tiny_dataset):
    from clip_decoder.data.folder import training_parts
    from clip_decoder.features import FeatureCache
    from clip_decoder.metrics import average_precision
    from clip_decoder.training.data import FeatureSet
    from clip_decoder.training.loop import finish_training

    out, cache, _ = trained
    model = CLIPDecoder.from_pretrained(out)
    seen = list(model.config.labels)
    assert model.config.prior.head_only_margin is None and model.config.prior.head_only == ()  # the default: never
    source = FeatureCache(model.image_tower, cache)
    train, val = (FeatureSet.build(samples, source, progress=False) for samples in training_parts(tiny_dataset, 0.25))
    model.set_prior(replace(model.config.prior, head_only_margin=0.02))
    finish_training(model, train, val, tuple(seen))  # what training does with `--prior-head-only-margin 0.02`
    prior, targets = model.config.prior, val.targets(seen).numpy()

    def scores(**changes):
        scorer = model.scorer.with_prior(replace(prior, **changes))
        return scorer.score_stored(val.tokens, val.pooled, scorer.vocabulary([*seen, "a new label"]))

    with_prior, alone, as_trained = scores(head_only=()), scores(head_only=(), seen_weight=0.0), scores()
    chosen = [label for j, label in enumerate(seen) if targets[:, j].any() and average_precision(alone[:, j], targets[:, j])
              > average_precision(with_prior[:, j], targets[:, j]) + 0.02]
    assert list(prior.head_only) == chosen and 0 < len(chosen) < len(seen)  # this tiny model: some, not all
    for j, label in enumerate([*seen, "a new label"]):  # those labels as the head alone scores them, the others not
        np.testing.assert_allclose(as_trained[:, j], (alone if label in chosen else with_prior)[:, j], atol=1e-6)
    assert prior.label_weights(["a new label", chosen[0], next(x for x in seen if x not in chosen)], seen) == [
        prior.weight, 0.0, prior.seen_weight]


def test_benchmark_models_share_the_towers_class_embeddings():
    from clip_decoder.encoders import create_backbone
    from clip_decoder.training.config import TrainConfig
    from clip_decoder.training.methods import MethodRun, decoder_method, untrained_model

    towers, shared = create_backbone("offline"), {}
    recipe = decoder_method("clip-decoder").recipe(TrainConfig())
    models = [untrained_model(recipe, towers) for _ in range(2)]
    embedded = []
    original = type(towers.text).encode
    type(towers.text).encode = lambda self, texts: (embedded.extend(texts), original(self, texts))[1]
    try:
        for model in models:
            MethodRun(towers, {}, None, TrainConfig(), class_embeddings=shared).share_class_embeddings(
                model.zero_shot, recipe.templates)
    finally:
        type(towers.text).encode = original
    assert len(embedded) == len(imagenet_class_names()) * len(recipe.templates)  # once for both models
    assert all(model.zero_shot.ready for model in models)
    assert models[0].zero_shot.class_embeddings.data_ptr() != models[1].zero_shot.class_embeddings.data_ptr()
    alone = CLIPDecoder.create(backbone="offline")  # embeds the class names itself
    alone.zero_shot.prepare()
    assert torch.equal(models[0].zero_shot.class_embeddings, alone.zero_shot.class_embeddings)


def test_methods_say_whether_they_use_the_zero_shot_view():
    """What bench --jobs N embeds the class names for (not for ML-Decoder and the linear map alone)."""
    from clip_decoder.configs import PriorConfig
    from clip_decoder.training.config import TrainConfig
    from clip_decoder.training.methods import get_method

    config = TrainConfig()
    uses = {name: get_method(name).uses_zero_shot(config) for name in
            ("clip-decoder", "clip-decoder-no-prior", "clip-decoder-one-prior-weight", "ml-decoder", "linear", "conse",
             "zero-shot-prior")}
    assert uses == {"clip-decoder": True, "clip-decoder-no-prior": False, "clip-decoder-one-prior-weight": True,
                    "ml-decoder": False, "linear": False, "conse": True, "zero-shot-prior": True}
    assert not get_method("clip-decoder").uses_zero_shot(replace(config, prior=PriorConfig.off()))


def test_benchmark_workers_start_with_the_class_embeddings_its_main_process_made(tiny_dataset, tmp_path):
    """bench --jobs N: the main process embeds the class names once; a worker's runs use those, embedding none."""
    from clip_decoder import benchmark
    from clip_decoder.features import FeatureLocation
    from clip_decoder.training.config import TrainConfig
    from clip_decoder.training.methods import MethodRun, decoder_method, untrained_model

    setup = benchmark.BenchmarkSetup(tiny_dataset, "offline", TrainConfig(), FeatureLocation(cache=tmp_path / "cache"),
                                     None, None, "with-unseen")
    handed = benchmark.BenchmarkRuns(setup, progress=False).embed_class_names()
    (templates, made), = handed.items()
    assert made.shape == (len(imagenet_class_names()), 384) and isinstance(made, np.ndarray)  # plain arrays to pickle
    threads = torch.get_num_threads()
    try:
        benchmark._start_worker(setup, threads, False, handed)  # as in a worker process
        worker = benchmark._WORKER_RUNS
    finally:
        benchmark._WORKER_RUNS = None
        torch.set_num_threads(threads)
    prior = untrained_model(decoder_method("clip-decoder").recipe(TrainConfig()), worker.towers).zero_shot
    worker.towers.text.encode = lambda texts: pytest.fail(f"a worker embedded {len(texts)} texts")
    MethodRun(worker.towers, worker.parts, None, TrainConfig(), class_embeddings=worker.class_embeddings
              ).share_class_embeddings(prior, templates)
    assert prior.ready and torch.equal(prior.class_embeddings, torch.from_numpy(made))


def test_predict_with_prior_weights_0_gives_the_no_prior_ablations_scores(trained, tiny_dataset, capsys):
    """--prior-weight 0 --prior-seen-weight 0 scores as the same head with the prior off (the no-prior ablation)."""
    from clip_decoder.cli import main

    out, _, _ = trained
    images = [str(tiny_dataset / "images" / f"test-{i}.png") for i in range(4)]
    labels = "red,green,white,black,purple"
    assert main(["predict", "--model", str(out), "--labels", labels, "--prior-weight", "0", "--prior-seen-weight", "0",
                 *images]) == 0
    zeroed = [json.loads(line)["scores"] for line in capsys.readouterr().out.splitlines()]
    ablation = CLIPDecoder.from_pretrained(out)
    ablation.set_prior(PriorConfig.off())
    expected = ablation.predict(images, labels.split(","))
    np.testing.assert_allclose([list(record.values()) for record in zeroed], expected, atol=1e-6)
    assert main(["predict", "--model", str(out), "--labels", labels, *images]) == 0  # with the model's own prior
    assert [json.loads(line)["scores"] for line in capsys.readouterr().out.splitlines()] != zeroed
    with pytest.raises(SystemExit) as refused:
        main(["predict", "--model", str(out), "--labels", labels, "--prior-weight", "-1", *images])
    assert refused.value.code == 2 and "--prior-weight: must be at least 0, got -1" in capsys.readouterr().err
