import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from clip_decoder.errors import ClipDecoderError
from clip_decoder.metrics import (
    average_precision,
    mean_average_precision,
    multilabel_metrics,
    per_image_metrics,
    precision_recall_f1_at_k,
    zsl_gzsl_metrics,
)


def test_ap_hand_computed():
    # ranks 1 and 3 are positives: precision 1 and 2/3, each worth half the recall
    assert average_precision(np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 1, 0])) == pytest.approx((1 + 2 / 3) / 2)
    assert average_precision(np.array([0.1, 0.2]), np.array([1, 1])) == pytest.approx(1.0)
    assert math.isnan(average_precision(np.array([0.1, 0.2]), np.array([0, 0])))


def test_ap_ties_form_one_threshold():
    # thresholds 0.9 (P=1, R=1/2) and 0.5 (3 images, 2 positives: P=2/3, R=1) -> 1/2 + 1/3;
    # ordering the tied positive first would wrongly give 1.0
    assert average_precision(np.array([0.9, 0.5, 0.5, 0.1]), np.array([1, 1, 0, 0])) == pytest.approx(5 / 6)
    assert average_precision(np.array([0.5, 0.5]), np.array([1, 0])) == pytest.approx(0.5)


@pytest.mark.parametrize("seed", range(6))
def test_ap_and_map_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    n, m = 200, 7
    if seed % 2:  # integer-valued scores: many ties
        scores = rng.integers(0, 5, size=(n, m)).astype(np.float64)
    else:
        scores = rng.random((n, m)).astype(np.float32 if seed == 2 else np.float64)
    targets = (rng.random((n, m)) < rng.uniform(0.02, 0.5)).astype(np.int64)
    targets[:, 3] = 0  # one label without positives
    expected = [average_precision_score(targets[:, j], scores[:, j]) for j in range(m) if j != 3]
    got = [average_precision(scores[:, j], targets[:, j]) for j in range(m) if j != 3]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    assert mean_average_precision(scores, targets) == pytest.approx(np.mean(expected), abs=1e-12)


def test_map_skips_labels_without_positives():
    scores = np.array([[0.9, 0.1, 0.3], [0.8, 0.7, 0.2], [0.1, 0.9, 0.6]])
    targets = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0]])
    ap0 = average_precision(scores[:, 0], targets[:, 0])  # ranks 1, 3 -> (1 + 2/3) / 2
    ap1 = average_precision(scores[:, 1], targets[:, 1])  # rank 2 -> 1/2
    assert (ap0, ap1) == pytest.approx(((1 + 2 / 3) / 2, 0.5))
    assert mean_average_precision(scores, targets) == pytest.approx((ap0 + ap1) / 2)
    assert math.isnan(mean_average_precision(scores, np.zeros_like(targets)))


def test_precision_recall_f1_at_k_hand_computed():
    scores = np.array([[0.9, 0.8, 0.1, 0.2], [0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]])
    targets = np.array([[1, 0, 0, 1], [0, 0, 1, 0], [1, 1, 0, 0]])
    # k=2: image 0 picks labels {0,1} -> 1 hit, image 1 {3,2} -> 1 hit, image 2 {3,2} -> 0 hits.
    # hits=2, P=2/(2*3)=1/3, R=2/5 (5 positives), F1=2*(1/3)(2/5)/(1/3+2/5)=4/11
    assert precision_recall_f1_at_k(scores, targets, 2) == pytest.approx((1 / 3, 2 / 5, 4 / 11))
    # k=5 > 4 labels: all labels taken, hits=5, still divided by k: P=5/15, R=1, F1=1/2
    assert precision_recall_f1_at_k(scores, targets, 5) == pytest.approx((1 / 3, 1.0, 0.5))
    assert precision_recall_f1_at_k(scores, np.zeros_like(targets), 1)[0] == 0.0


def test_top_k_ties_prefer_lower_label_index():
    scores = np.full((1, 4), 0.5)
    assert precision_recall_f1_at_k(scores, np.array([[0, 0, 1, 1]]), 2)[0] == 0.0
    assert precision_recall_f1_at_k(scores, np.array([[1, 1, 0, 0]]), 2)[0] == 1.0
    assert precision_recall_f1_at_k(np.array([[0.1, 0.9, 0.5, 0.5]]), np.array([[0, 0, 1, 0]]), 2)[0] == 0.5
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 3, size=(300, 10)).astype(float)
    targets = (rng.random((300, 10)) < 0.3).astype(int)
    for k in (1, 3, 5):
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        hits = np.take_along_axis(targets, top, axis=1).sum()
        assert precision_recall_f1_at_k(scores, targets, k)[0] == pytest.approx(hits / (k * 300))


def test_multilabel_metrics_keys_and_percent():
    rng = np.random.default_rng(1)
    scores, targets = rng.random((20, 6)), (rng.random((20, 6)) < 0.4).astype(int)
    out = multilabel_metrics(scores, targets)
    assert set(out) == {"mAP", "P@3", "R@3", "F1@3", "P@5", "R@5", "F1@5", "n_images", "n_labels"}
    assert out["mAP"] == pytest.approx(100 * mean_average_precision(scores, targets))
    assert (out["P@5"], out["R@5"], out["F1@5"]) == pytest.approx(
        tuple(100 * v for v in precision_recall_f1_at_k(scores, targets, 5))
    )
    assert (out["n_images"], out["n_labels"]) == (20, 6) and isinstance(out["n_images"], int)


NAMES = ["a", "b", "c", "d"]
SCORES = np.array([[0.9, 0.1, 0.8, 0.2], [0.1, 0.9, 0.3, 0.7], [0.9, 0.8, 0.1, 0.2]])
TARGETS = np.array([[0, 0, 1, 0], [0, 1, 0, 1], [1, 1, 0, 0]])  # image 2 has no unseen (c, d) positive


def test_zsl_drops_images_and_ranks_only_unseen_columns():
    out = zsl_gzsl_metrics(SCORES, TARGETS, NAMES, ["d", "c"], ks=(1, 2))
    assert set(out) == {"zsl", "gzsl"}
    assert set(out["zsl"]) == {"mAP", "P@1", "R@1", "F1@1", "P@2", "R@2", "F1@2", "n_images", "n_labels"}
    zsl = out["zsl"]
    assert (zsl["n_images"], zsl["n_labels"]) == (2, 2)
    # image 0: seen "a" (0.9) would take the top slot; among unseen, "c" (0.8) is top and a hit
    assert zsl["P@1"] == pytest.approx(100.0) and zsl["R@1"] == pytest.approx(100.0)
    assert zsl["mAP"] == pytest.approx(100.0) and zsl["P@2"] == pytest.approx(50.0)
    assert out["zsl"] == pytest.approx(multilabel_metrics(SCORES[:2][:, 2:], TARGETS[:2][:, 2:], ks=(1, 2)))
    gzsl = out["gzsl"]
    assert (gzsl["n_images"], gzsl["n_labels"]) == (3, 4)
    assert gzsl["P@1"] == pytest.approx(200 / 3)  # image 0's top is "a", a miss
    assert gzsl == pytest.approx(multilabel_metrics(SCORES, TARGETS, ks=(1, 2)))


@pytest.mark.parametrize(
    "scores, targets, names, unseen, match",
    [
        (SCORES, TARGETS, NAMES, ["c", "zebra"], "zebra"),
        (SCORES, TARGETS[:, :3], NAMES, ["c"], "shape"),
        (SCORES[0], TARGETS[0], NAMES, ["c"], "2-D"),
        (np.where(SCORES == 0.3, np.nan, SCORES), TARGETS, NAMES, ["c"], "NaN"),
        (SCORES, TARGETS * 2, NAMES, ["c"], "0/1"),
        (SCORES, TARGETS, NAMES[:3], ["c"], "label names"),
        (SCORES, TARGETS * [1, 1, 0, 0], NAMES, ["c", "d"], "undefined"),
        (SCORES, TARGETS, NAMES, [], "undefined"),
    ],
)
def test_zsl_gzsl_errors(scores, targets, names, unseen, match):
    with pytest.raises(ClipDecoderError, match=match):
        zsl_gzsl_metrics(scores, targets, names, unseen)


def test_bad_k_raises():
    with pytest.raises(ClipDecoderError, match="k must be"):
        precision_recall_f1_at_k(SCORES, TARGETS, 0)


def test_per_image_metrics_hand_computed():
    scores = np.array([[0.9, 0.5, 0.1], [0.2, 0.8, 0.7], [0.3, 0.2, 0.1]])
    targets = np.array([[1, 0, 1], [1, 0, 1], [0, 0, 0]])
    result = per_image_metrics(scores, targets)
    # image 1: best label right, AP (1/1 + 2/3) / 2; image 2: best label wrong, AP (1/2 + 2/3) / 2; image 3: no label
    assert result["top1_correct"] == 1 and result["images"] == 3
    assert result["per_image_AP"] == pytest.approx(100 * ((1 + 2 / 3) / 2 + (1 / 2 + 2 / 3) / 2) / 2)
