"""The Python API contract on the real offline backbone: create, predict, save, load, train parts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from clip_decoder import CLIPDecoder, ClipDecoderError
from clip_decoder.prompts import ENSEMBLE_TEMPLATES
from clip_decoder.training.losses import AsymmetricLoss, contrastive_loss
from clip_decoder.training.config import TrainConfig
from clip_decoder.training.methods import decoder_method, untrained_model

LABELS = ["cat", "dog", "car", "a red bicycle"]


@pytest.fixture(scope="module")
def saved_dir(offline_model, tmp_path_factory):
    return offline_model.save_pretrained(tmp_path_factory.mktemp("model"))


def test_predict_gives_independent_probabilities_for_paths_and_pil_images(offline_model, cat_photo):
    images = [cat_photo, Image.open(cat_photo), Image.new("RGBA", (30, 90), (0, 0, 255, 128))]
    scores = offline_model.predict(images, LABELS, batch_size=2)
    assert scores.shape == (3, 4) and scores.dtype == np.float32
    assert np.all((scores >= 0) & (scores <= 1))
    np.testing.assert_allclose(scores[0], scores[1], atol=1e-6)  # same photo, path or PIL
    np.testing.assert_allclose(offline_model.predict(cat_photo, LABELS), scores[:1], atol=1e-5)


def test_a_labels_score_does_not_depend_on_the_labels_asked_with_it(offline_model, saved_dir, cat_photo):
    together = offline_model.predict([cat_photo], LABELS)
    fresh = CLIPDecoder.from_pretrained(saved_dir)  # empty label cache: "dog" is embedded alone
    alone = fresh.predict([cat_photo], ["dog"])
    np.testing.assert_allclose(alone[:, 0], together[:, 1], atol=1e-5)
    reordered = fresh.predict([cat_photo], LABELS[::-1] + ["something else entirely"])
    np.testing.assert_allclose(reordered[:, :4], together[:, ::-1], atol=1e-5)


def test_save_and_load_round_trip_gives_identical_predictions(offline_model, saved_dir, cat_photo):
    assert sorted(p.name for p in saved_dir.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((saved_dir / "config.json").read_text())
    assert config["backbone"] == "offline" and config["templates"] == list(ENSEMBLE_TEMPLATES)
    assert config["head"]["dim"] == 256 and config["format_version"] == 5
    keys = load_file(saved_dir / "model.safetensors").keys()
    assert keys and all(k.startswith(("head.", "alignment.", "prior.")) for k in keys)
    assert "alignment.logit_scale" in keys and "alignment.text_proj.weight" in keys
    loaded = CLIPDecoder.from_pretrained(saved_dir)
    np.testing.assert_array_equal(loaded.predict([cat_photo], LABELS), offline_model.predict([cat_photo], LABELS))


def test_training_updates_the_head_and_the_alignment_projections_not_the_towers(offline_model):
    model = CLIPDecoder.create(backbone="offline", dim=64, heads=4, ffn_dim=64)
    model.train()
    assert model.head.training and not model.image_tower.training and not model.text_tower.training
    torch.manual_seed(0)
    tokens, labels = torch.randn(4, 49, 1280), torch.randn(5, 384)
    targets = torch.randint(0, 2, (4, 5)).float()
    mask = torch.tensor([1, 1, 1, 0, 0]).expand(4, 5)  # two unseen labels
    sentences = torch.nn.functional.normalize(torch.randn(4, 384), dim=-1)
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    assert set(before) >= {"alignment.image_proj.weight", "alignment.text_proj.weight", "alignment.logit_scale"}
    assert not any(name.startswith(("image_tower.", "text_tower.")) for name in before)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    memory = model.head.memory(tokens)
    logits = model.head.decode(memory, model.head.queries(labels))
    loss = AsymmetricLoss()(logits, targets, mask) + contrastive_loss(model.alignment, memory.mean(dim=1), sentences)
    loss.backward()
    for name in ("alignment.image_proj.weight", "alignment.text_proj.weight", "alignment.logit_scale", "head.query_proj.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name
    optimizer.step()
    for name in before:
        assert not torch.equal(before[name], model.get_parameter(name)), f"{name} did not change"


def write_config(folder, saved_dir, **changes):
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((saved_dir / "model.safetensors").read_bytes())
    config = json.loads((saved_dir / "config.json").read_text())
    for key, value in changes.items():
        if isinstance(value, dict):
            config[key].update(value)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_broken_model_folders_give_clear_errors(saved_dir, tmp_path):
    with pytest.raises(ClipDecoderError, match="does not exist"):
        CLIPDecoder.from_pretrained(tmp_path / "nowhere")
    only_config = tmp_path / "only-config"
    only_config.mkdir()
    (only_config / "config.json").write_text("{}")
    with pytest.raises(ClipDecoderError, match="has no model.safetensors"):
        CLIPDecoder.from_pretrained(only_config)
    corrupt = write_config(tmp_path / "corrupt", saved_dir)
    (corrupt / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ClipDecoderError, match="not a readable safetensors file"):
        CLIPDecoder.from_pretrained(corrupt)
    with pytest.raises(ClipDecoderError, match="do not fit"):
        CLIPDecoder.from_pretrained(write_config(tmp_path / "shapes", saved_dir, head={"dim": 64}))
    with pytest.raises(ClipDecoderError, match="unknown backbone 'resnet9000'"):
        CLIPDecoder.from_pretrained(write_config(tmp_path / "backbone", saved_dir, backbone="resnet9000"))
    with pytest.raises(ClipDecoderError, match="newer clip-decoder"):
        CLIPDecoder.from_pretrained(write_config(tmp_path / "newer", saved_dir, format_version=99))
    with pytest.raises(ClipDecoderError, match="not a valid clip-decoder config"):
        CLIPDecoder.from_pretrained(write_config(tmp_path / "keys", saved_dir, head={"colour": "red"}))
    bad_json = write_config(tmp_path / "json", saved_dir)
    (bad_json / "config.json").write_text("{not json")
    with pytest.raises(ClipDecoderError, match="not valid JSON"):
        CLIPDecoder.from_pretrained(bad_json)


def test_predict_rejects_bad_arguments(offline_model, cat_photo, tmp_path):
    with pytest.raises(ClipDecoderError, match="no labels"):
        offline_model.predict([cat_photo], [])
    with pytest.raises(ClipDecoderError, match="twice"):
        offline_model.predict([cat_photo], ["cat", "cat"])
    with pytest.raises(ClipDecoderError, match="missing.jpg"):
        offline_model.predict([cat_photo, tmp_path / "missing.jpg"], ["cat"])
    with pytest.raises(ClipDecoderError, match="bad head option"):
        CLIPDecoder.create(backbone="offline", dim=100, heads=8)


def test_the_hf_backbone_works_through_the_whole_api(tiny_clip_dir, tmp_path, cat_photo):
    model = CLIPDecoder.create(backbone=f"hf:{tiny_clip_dir}", dim=32, heads=4, ffn_dim=64)
    images = [cat_photo, Image.new("L", (10, 10), 128)]
    scores = model.predict(images, ["cat", "dog", "tree"])
    assert scores.shape == (2, 3)
    loaded = CLIPDecoder.from_pretrained(model.save_pretrained(tmp_path / "hf-model"))
    np.testing.assert_array_equal(loaded.predict(images, ["cat", "dog", "tree"]), scores)
    np.testing.assert_allclose(loaded.predict([cat_photo], ["cat"]), scores[:1, :1], atol=1e-6)  # alone: float noise only


def test_create_with_no_options_builds_the_model_train_trains_by_default(offline_model):
    trained_by_default = untrained_model(decoder_method("clip-decoder").recipe(TrainConfig()), "offline")
    assert offline_model.config == trained_by_default.config
    assert offline_model.config.head.dim == 256 and offline_model.config.head.cosine_skip
