"""The model that ships in the package: loaded by name, used when no --model is given."""

from __future__ import annotations

import json

from clip_decoder import CLIPDecoder
from clip_decoder.cli import main


def test_the_packaged_model_loads_by_name_and_holds_the_prior():
    model = CLIPDecoder.from_pretrained("openclipart")
    assert model.config.backbone == "offline" and model.config.prior.on
    assert len(model.config.labels) == 68  # every label of the OpenClipart benchmark
    assert model.zero_shot.ready  # the class-name embeddings came with it, none computed


def test_predict_with_no_model_tags_a_photo_with_the_packaged_model(cat_photo, capsys):
    assert main(["predict", "--labels", "car,cat,pizza,guitar", str(cat_photo)]) == 0
    record = json.loads(capsys.readouterr().out)
    assert set(record["scores"]) == {"car", "cat", "pizza", "guitar"}
    assert max(record["scores"], key=record["scores"].get) == "cat"
    assert record["labels"] == ["cat"]  # the model's own rule decides: the cat, nothing else


def test_the_packaged_model_holds_its_decision_threshold_and_its_prior_centred_on_its_training_images():
    config = CLIPDecoder.from_pretrained("openclipart").config
    assert config.format_version == 5 and 0.5 < config.decision_threshold < 1  # chosen on its validation part
    prior = config.prior
    assert prior.centring == 0.5 and len(prior.reference_mean) == 384 and prior.offset > 0
