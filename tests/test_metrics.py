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
    zsl_by_images,
    zsl_gzsl_metrics,
)

KEYS = {"mAP", "P@3", "R@3", "F1@3", "P@5", "R@5", "F1@5", "n_images", "n_labels", "n_labels_without_positives"}


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
    assert set(out) == KEYS
    assert out["mAP"] == pytest.approx(100 * mean_average_precision(scores, targets))
    assert (out["P@5"], out["R@5"], out["F1@5"]) == pytest.approx(
        tuple(100 * v for v in precision_recall_f1_at_k(scores, targets, 5))
    )
    assert (out["n_images"], out["n_labels"]) == (20, 6) and isinstance(out["n_images"], int)
    targets[:, [1, 4]] = 0
    assert multilabel_metrics(scores, targets)["n_labels_without_positives"] == 2


NAMES = ["a", "b", "c", "d"]
SCORES = np.array([[0.9, 0.1, 0.8, 0.2], [0.1, 0.9, 0.3, 0.7], [0.9, 0.8, 0.1, 0.2]])
TARGETS = np.array([[0, 0, 1, 0], [0, 1, 0, 1], [1, 1, 0, 0]])  # image 2 has no unseen (c, d) positive


def test_zsl_drops_images_and_ranks_only_unseen_columns():
    out = zsl_gzsl_metrics(SCORES, TARGETS, NAMES, ["d", "c"], ks=(1, 2))
    assert set(out) == {"zsl", "gzsl"}
    assert set(out["zsl"]) == {"mAP", "P@1", "R@1", "F1@1", "P@2", "R@2", "F1@2", "n_images", "n_labels",
                               "n_labels_without_positives", "zsl_images"}
    zsl = out["zsl"]
    assert (zsl["n_images"], zsl["n_labels"], zsl["zsl_images"]) == (2, 2, "with-unseen")
    # image 0: seen "a" (0.9) would take the top slot; among unseen, "c" (0.8) is top and a hit
    assert zsl["P@1"] == pytest.approx(100.0) and zsl["R@1"] == pytest.approx(100.0)
    assert zsl["mAP"] == pytest.approx(100.0) and zsl["P@2"] == pytest.approx(50.0)
    assert out["zsl"] == pytest.approx({**multilabel_metrics(SCORES[:2][:, 2:], TARGETS[:2][:, 2:], ks=(1, 2)),
                                        "zsl_images": "with-unseen"})
    gzsl = out["gzsl"]
    assert (gzsl["n_images"], gzsl["n_labels"]) == (3, 4)
    assert gzsl["P@1"] == pytest.approx(200 / 3)  # image 0's top is "a", a miss
    assert gzsl == pytest.approx(multilabel_metrics(SCORES, TARGETS, ks=(1, 2)))


def test_zsl_on_every_image_keeps_the_images_without_an_unseen_label():
    scores = SCORES.copy()
    scores[2, 3] = 0.95  # image 2, which has no unseen label, scores "d" highest of all
    default = zsl_gzsl_metrics(scores, TARGETS, NAMES, ["d", "c"], ks=(1, 2))
    out = zsl_gzsl_metrics(scores, TARGETS, NAMES, ["d", "c"], ks=(1, 2), zsl_images="all")
    zsl = out["zsl"]
    assert (zsl["n_images"], zsl["n_labels"], zsl["zsl_images"]) == (3, 2, "all")
    # images 0 and 1 rank their unseen positive first (as in the default set); image 2 adds a miss
    assert (default["zsl"]["P@1"], zsl["P@1"]) == pytest.approx((100.0, 200 / 3))
    assert (default["zsl"]["R@1"], zsl["R@1"]) == pytest.approx((100.0, 100.0))
    # "d" over the three images: its positive (0.7) ranks second, AP 1/2; "c" stays 1
    assert (default["zsl"]["mAP"], zsl["mAP"]) == pytest.approx((100.0, 75.0))
    assert out["gzsl"] == default["gzsl"]
    both = zsl_by_images(scores, TARGETS, NAMES, ["d", "c"], ks=(1, 2))
    assert list(both) == ["with-unseen", "all"] and both["all"] == zsl and both["with-unseen"] == default["zsl"]


def test_an_unknown_zsl_image_set_is_named():
    with pytest.raises(ClipDecoderError, match="zsl_images must be one of with-unseen, all, got 'every'"):
        zsl_gzsl_metrics(SCORES, TARGETS, NAMES, ["c"], zsl_images="every")


# An independent implementation of LESA's definitions (hbdat/cvpr20_LESA, core/utils.py: compute_AP,
# evaluate_k, compute_F1 with mode 'overall'), written from them for these tests.
def lesa_ap(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per label: sklearn's AP (one step per distinct score), 0 for a label with no positive."""
    aps = np.zeros(scores.shape[1])
    for j in range(scores.shape[1]):
        s, y = scores[:, j], labels[:, j]
        if y.sum() == 0:
            continue
        recall_before = 0.0
        for threshold in np.unique(s)[::-1]:  # sum over thresholds of (recall gained) x precision there
            taken = s >= threshold
            hits = y[taken].sum()
            aps[j] += (hits / y.sum() - recall_before) * hits / taken.sum()
            recall_before = hits / y.sum()
    return aps


def lesa_prf(scores: np.ndarray, labels: np.ndarray, k: int, ties: str = "higher") -> tuple[float, float, float]:
    """Binarize each image's k best labels (an ascending argsort's last k: ties to the higher index; ``ties="lower"``
    sorts the reversed columns instead), then pooled P = TP / predicted, R = TP / positives, F1 from those."""
    if ties == "lower":
        order = scores.shape[1] - 1 - np.argsort(scores[:, ::-1], axis=1, kind="stable")
    else:
        order = np.argsort(scores, axis=1, kind="stable")
    predicted = np.zeros_like(labels)
    for i in range(len(scores)):
        predicted[i, order[i, -k:]] = 1
    tp = labels[predicted == 1].sum()
    p, r = tp / predicted.sum(), tp / labels.sum()
    with np.errstate(invalid="ignore"):  # no hit: nan, as LESA's
        return p, r, 2 * p * r / (p + r)


def lesa_zsl(scores, targets, cols, ks, ties="higher", rows=None) -> dict:
    """LESA's ZSL numbers (percent): the unseen columns on every test image (or only ``rows``)."""
    rows = np.ones(len(scores), dtype=bool) if rows is None else rows
    s, y = scores[np.ix_(rows, cols)], targets[np.ix_(rows, cols)]
    out = {"mAP": 100 * lesa_ap(s, y).mean()}
    for k in ks:
        out.update(zip((f"P@{k}", f"R@{k}", f"F1@{k}"), (100 * v for v in lesa_prf(s, y, k, ties))))
    return out


def random_case(seed: int, tied: bool):
    """80 images x 14 labels (8 unseen, in columns spread among the seen), with empty images and empty labels."""
    rng = np.random.default_rng(seed)
    n, m = 80, 14
    scores = (rng.integers(0, 4, size=(n, m)) / 4 if tied else rng.random((n, m))).astype(np.float32)
    targets = (rng.random((n, m)) < 0.15).astype(np.int64)
    unseen = [1, 2, 5, 6, 8, 10, 11, 13]
    targets[:10] = 0  # images with no label at all
    targets[10:30][:, unseen] = 0  # images with seen labels only
    targets[:, [5, 3]] = 0  # an unseen and a seen label with no positive
    return scores, targets, [f"l{j}" for j in range(m)], unseen


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("tied", [False, True])
def test_zsl_on_every_image_is_lesas_computation(seed, tied):
    scores, targets, names, unseen = random_case(seed, tied)
    ranked = -np.sort(-scores[:, unseen], axis=1)
    assert (ranked[:, 2] == ranked[:, 3]).any() == tied  # some image ties across its 3rd-best unseen score
    out = zsl_gzsl_metrics(scores, targets, names, [names[j] for j in unseen], zsl_images="all")
    zsl, gzsl = out["zsl"], out["gzsl"]
    assert (zsl["n_images"], zsl["n_labels"], zsl["n_labels_without_positives"]) == (80, 8, 1)
    assert gzsl["n_labels_without_positives"] == 2
    # our rule takes tied labels in label order; LESA's argsort the higher index (on untied scores: the same)
    ties = "lower" if tied else "higher"
    for ours, cols in ((zsl, unseen), (gzsl, list(range(14)))):
        reference = lesa_zsl(scores, targets, cols, (3, 5), ties)
        kept = (ours["n_labels"] - ours["n_labels_without_positives"]) / ours["n_labels"]
        assert ours["mAP"] * kept == pytest.approx(reference.pop("mAP"), abs=1e-9)  # LESA: empty labels as AP 0
        assert {key: ours[key] for key in reference} == pytest.approx(reference, abs=1e-9)
        if tied:  # which tied label is taken matters: LESA's own rule gives other numbers here
            assert lesa_zsl(scores, targets, cols, (3,), "higher")["P@3"] != pytest.approx(ours["P@3"], abs=1e-6)
    # the default set is ML-Decoder's: LESA's formulas on the images with an unseen label
    default = zsl_gzsl_metrics(scores, targets, names, [names[j] for j in unseen])["zsl"]
    reference = lesa_zsl(scores, targets, unseen, (3, 5), ties, rows=targets[:, unseen].any(axis=1))
    assert default["n_images"] == targets[:, unseen].any(axis=1).sum() < 80
    assert default["mAP"] * 7 / 8 == pytest.approx(reference.pop("mAP"), abs=1e-9)
    assert {key: default[key] for key in reference} == pytest.approx(reference, abs=1e-9)
    # the extra images add no hit, only precision's denominator: P scales by the share of images kept, R is equal
    for k in (3, 5):
        assert zsl[f"P@{k}"] == pytest.approx(default[f"P@{k}"] * default["n_images"] / 80, abs=1e-9)
        assert zsl[f"R@{k}"] == pytest.approx(default[f"R@{k}"], abs=1e-9)


def test_lesa_breaks_top_k_ties_toward_the_higher_label_index():
    scores, targets = np.full((1, 4), 0.5), np.array([[0, 0, 1, 1]])
    assert lesa_prf(scores, targets, 2)[0] == 1.0 and lesa_prf(scores, targets, 2, ties="lower")[0] == 0.0
    assert precision_recall_f1_at_k(scores, targets, 2)[0] == 0.0  # ours: the lower index
    rng = np.random.default_rng(0)
    scores, targets = rng.random((50, 6)), (rng.random((50, 6)) < 0.3).astype(int)
    np.testing.assert_allclose(lesa_ap(scores, targets),
                               [average_precision_score(targets[:, j], scores[:, j]) for j in range(6)], atol=1e-12)


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
