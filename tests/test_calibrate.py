"""Calibrated thresholds: the F1-optimal cut, the stored table, and predict --calibrated."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from clip_decoder import ClipDecoderError
from clip_decoder.calibrate import calibrate
from clip_decoder.cli import main
from clip_decoder.thresholds import NEW_LABEL_THRESHOLD, Thresholds, best_threshold


def f1_at(scores, targets, threshold):
    chosen = scores >= threshold
    tp = (chosen & targets).sum()
    return 2 * tp / (chosen.sum() + targets.sum())


@given(st.lists(st.tuples(st.sampled_from([0.1, 0.2, 0.35, 0.5, 0.8, 0.9]), st.booleans()), min_size=1, max_size=30))
def test_best_threshold_is_the_best_cut(pairs):
    scores = np.array([s for s, _ in pairs])
    targets = np.array([t for _, t in pairs])
    if not targets.any():
        with pytest.raises(ClipDecoderError, match="without a positive"):
            best_threshold(scores, targets)
        return
    threshold, f1 = best_threshold(scores, targets)
    assert f1 == pytest.approx(f1_at(scores, targets, threshold))
    assert f1 == pytest.approx(max(f1_at(scores, targets, t) for t in scores))


def test_calibrate_gives_own_thresholds_to_labels_with_enough_positives():
    rng = np.random.default_rng(0)
    targets = rng.random((40, 3)) < np.array([0.5, 0.05, 0.3])
    scores = np.clip(targets * 0.5 + rng.random((40, 3)) * 0.6, 0, 1)
    table = calibrate(scores, targets, ["a", "b", "c"], min_positives=5)
    assert set(table["labels"]) == {"a", "c"}  # "b" has fewer than 5 positives
    thresholds = Thresholds.from_dict(table).for_labels(["a", "b", "never seen"])
    assert list(thresholds) == [table["labels"]["a"], table["default"], table["new_labels"]]


def test_calibrate_and_predict_calibrated(trained, tiny_dataset, tmp_path, capsys):
    out, cache, _ = trained
    model = tmp_path / "model"
    shutil.copytree(out, model)
    split = str(tiny_dataset / "split.json")
    assert main(["calibrate", "--model", str(model), "--data", str(tiny_dataset), "--split", split,
                 "--val-fraction", "0.25", "--cache", str(cache)]) == 0
    assert "held-out test images (16)" in capsys.readouterr().out
    table = json.loads((model / "thresholds.json").read_text())
    assert set(table["held_out"]) == {"seen", "unseen", "all", "test_images"}
    image = str(tiny_dataset / "images" / "test-0.png")
    assert main(["predict", "--model", str(model), "--labels", "red,white", "--calibrated", image]) == 0
    record = json.loads(capsys.readouterr().out)
    limits = dict(zip(["red", "white"], Thresholds.read(model / "thresholds.json").for_labels(["red", "white"])))
    assert record["labels"] == [l for l in sorted(limits, key=lambda l: -record["scores"][l]) if record["scores"][l] >= limits[l]]
    assert limits["white"] == NEW_LABEL_THRESHOLD  # never trained on: the models' default for new labels


def test_predict_calibrated_needs_a_calibrated_model(trained, tiny_dataset, tmp_path, capsys):
    out, _, _ = trained
    image = str(tiny_dataset / "images" / "test-0.png")
    assert main(["predict", "--model", str(out), "--labels", "red", "--calibrated", image]) == 2
    assert "run `clip-decoder calibrate" in capsys.readouterr().err
    (tmp_path / "thresholds.json").write_text('{"default": 3, "labels": {}}')
    with pytest.raises(ClipDecoderError, match="threshold of 'default' must be a number in"):
        Thresholds.read(tmp_path / "thresholds.json")
