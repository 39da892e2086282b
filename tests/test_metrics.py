"""Metrics vs independent computations (scikit-learn, scipy brute force) incl. edge cases."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import cdist
from sklearn.metrics import (average_precision_score, balanced_accuracy_score, f1_score, matthews_corrcoef,
                             roc_auc_score)

from mirage_edge.errors import InputError
from mirage_edge.metrics import classification_metrics, hd95, segmentation_metrics


def _probs(rng, n, k):
    logits = rng.normal(size=(n, k))
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


@pytest.mark.parametrize("k", [2, 4, 7])
def test_classification_matches_sklearn(k):
    rng = np.random.default_rng(k)
    y = rng.integers(0, k, 200)
    y[:k] = np.arange(k)
    p = _probs(rng, 200, k)
    p[np.arange(200), y] += rng.random(200)  # some signal
    p /= p.sum(1, keepdims=True)
    m = classification_metrics(y, p)
    onehot = np.eye(k)[y]
    assert m["bacc"] == pytest.approx(balanced_accuracy_score(y, p.argmax(1)))
    assert m["auroc"] == pytest.approx(roc_auc_score(onehot, p, multi_class="ovr", average="weighted"))
    assert m["ap"] == pytest.approx(average_precision_score(onehot, p, average="weighted"))
    assert m["f1"] == pytest.approx(f1_score(y, p.argmax(1), average="weighted"))
    assert m["mcc"] == pytest.approx(matthews_corrcoef(y, p.argmax(1)))
    assert m["n"] == 200


def test_classification_binary_vector_and_perfect():
    y = np.array([0, 1, 1, 0, 1])
    p1 = np.array([0.1, 0.8, 0.6, 0.3, 0.9])
    m = classification_metrics(y, p1)
    assert m["auroc"] == pytest.approx(roc_auc_score(y, p1))
    assert m["bacc"] == 1.0 and m["mcc"] == 1.0
    assert m == classification_metrics(y, np.stack([1 - p1, p1], 1))


def test_classification_missing_class_and_errors():
    y = np.array([0, 0, 2, 2, 2])  # class 1 never occurs
    p = _probs(np.random.default_rng(0), 5, 3)
    m = classification_metrics(y, p)
    # weighted average over the present classes only (absent class has weight 0)
    exp = (2 * roc_auc_score(y == 0, p[:, 0]) + 3 * roc_auc_score(y == 2, p[:, 2])) / 5
    assert m["auroc"] == pytest.approx(exp)
    assert np.isnan(classification_metrics([1, 1], _probs(np.random.default_rng(0), 2, 3))["auroc"])
    with pytest.raises(InputError):
        classification_metrics([0, 3], np.full((2, 3), 1 / 3))
    with pytest.raises(InputError):
        classification_metrics([0, 1, 1], np.full((2, 3), 1 / 3))


def _edges_bruteforce(mask):
    pad = np.pad(mask, 1)
    interior = pad[:-2, 1:-1] & pad[2:, 1:-1] & pad[1:-1, :-2] & pad[1:-1, 2:] & mask
    return np.argwhere(mask & ~interior)


def _hd95_bruteforce(a, b):
    if not a.any() and not b.any():
        return 0.0
    if a.any() != b.any():
        return float("nan")
    pa, pb = _edges_bruteforce(a), _edges_bruteforce(b)
    d = cdist(pa, pb)
    return max(np.percentile(d.min(1), 95), np.percentile(d.min(0), 95))


def _blobs(rng, shape, n=3):
    m = np.zeros(shape, bool)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for _ in range(n):
        cy, cx, r = rng.integers(0, shape[0]), rng.integers(0, shape[1]), rng.integers(2, 12)
        m |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    return m


def test_hd95_matches_bruteforce():
    rng = np.random.default_rng(0)
    for _ in range(30):
        a, b = _blobs(rng, (40, 50)), _blobs(rng, (40, 50))
        assert hd95(a, b) == pytest.approx(_hd95_bruteforce(a, b))
    full = np.ones((10, 10), bool)  # touching the border: border pixels are surface
    assert hd95(full, full) == 0.0
    one = np.zeros((10, 10), bool)
    one[3, 4] = True
    two = np.zeros((10, 10), bool)
    two[7, 1] = True
    assert hd95(one, two) == pytest.approx(5.0)
    assert hd95(np.zeros((5, 5), bool), np.zeros((5, 5), bool)) == 0.0
    assert np.isnan(hd95(one, np.zeros((10, 10), bool)))


def _dice_ref(p, t, c):
    a, b = p == c, t == c
    return 2 * (a & b).sum() / (a.sum() + b.sum() + 1e-6), (a & b).sum() / ((a | b).sum() + 1e-6)


def test_segmentation_per_volume_3d_and_means():
    rng = np.random.default_rng(1)
    k = 4
    target = [rng.integers(0, k, (16, 20)) for _ in range(6)]
    pred = [np.where(rng.random(t.shape) < 0.7, t, rng.integers(0, k, t.shape)) for t in target]
    vols = ["a", "a", "a", "b", "b", "c"]
    m = segmentation_metrics(pred, target, vols, ["Background", "RNFL", "ONL", "Fluid"])
    assert m["num_volumes"] == 3 and m["classes"] == ["RNFL", "ONL", "Fluid"]
    rows = {(r["volume"], r["class"]): r for r in m["per_volume"]}
    for v, idx in {"a": [0, 1, 2], "b": [3, 4], "c": [5]}.items():
        P, T = np.stack([pred[i] for i in idx]), np.stack([target[i] for i in idx])
        for c in (1, 2, 3):
            d, j = _dice_ref(P, T, c)
            assert rows[(v, c)]["dice"] == pytest.approx(d)
            assert rows[(v, c)]["iou"] == pytest.approx(j)
            hds = [_hd95_bruteforce(pred[i] == c, target[i] == c) for i in idx]
            assert rows[(v, c)]["hd95"] == pytest.approx(np.nanmean(hds))
    assert m["dice"] == pytest.approx(np.mean([r["dice"] for r in m["per_volume"]]))
    assert set(m["groups"]) == {"layer", "lesion"}
    assert m["groups"]["lesion"]["dice"] == pytest.approx(np.mean([rows[(v, 3)]["dice"] for v in "abc"]))
    assert m["per_class"]["ONL"]["iou"] == pytest.approx(np.mean([rows[(v, 2)]["iou"] for v in "abc"]))


def test_segmentation_edge_cases():
    t = np.zeros((3, 8, 8), np.int64)  # all-background volume
    p = np.zeros_like(t)
    m = segmentation_metrics(p, t, ["v"] * 3, 2)
    row = m["per_volume"][0]
    assert row["dice"] == 0.0 and row["iou"] == 0.0 and row["hd95"] == 0.0  # MIRAGE's formula
    assert np.isnan(segmentation_metrics(p, t, ["v"] * 3, 2, skip_empty=True)["dice"])
    # class only in the prediction on one slice: HD95 NaN there, 0 on the empty slices -> mean 0
    p2 = p.copy()
    p2[1, 2:4, 2:4] = 1
    r = segmentation_metrics(p2, t, ["v"] * 3, 2)["per_volume"][0]
    assert r["dice"] == pytest.approx(0.0) and r["hd95"] == 0.0
    # one class missing in the target, present elsewhere
    t3 = np.zeros((2, 8, 8), np.int64)
    t3[:, :4] = 1
    m3 = segmentation_metrics(t3.copy(), t3, ["x", "x"], ["bg", "Layer", "Cyst"])
    assert m3["per_class"]["Layer"]["dice"] == pytest.approx(1.0)
    assert m3["per_class"]["Cyst"]["dice"] == 0.0 and m3["per_class"]["Cyst"]["hd95"] == 0.0
    # ignore=None drops background-like labels by name
    assert segmentation_metrics(t3, t3, ["x", "x"], ["Above ILM", "Layer", "Cyst"], ignore=None)["classes"] == \
        ["Layer", "Cyst"]


def test_segmentation_resizes_pred_and_handles_invalid():
    t = np.zeros((8, 8), np.int64)
    t[:4] = 1
    t[7] = 2  # invalid class
    p_small = np.zeros((4, 4), np.int64)
    p_small[:2] = 1
    m = segmentation_metrics([p_small], [t], ["v"], ["bg", "layer", "invalid"], invalid=(2,))
    assert m["classes"] == ["layer"]
    assert m["per_volume"][0]["dice"] == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(InputError):
        segmentation_metrics([t], [t, t], ["v"], 3)
    with pytest.raises(InputError):
        segmentation_metrics([t + 5], [t], ["v"], 3)


def test_paired_bootstrap_and_presence_take_masks_at_their_own_size():
    """distill scores the test split against each mask at its file's size: lists of masks, the
    predictions resized (nearest) to them, must give what arrays of equal size give."""
    import numpy as np

    from mirage_edge.metrics import paired_bootstrap, presence_auroc

    rng = np.random.default_rng(0)
    target = (rng.random((6, 8, 8)) > 0.8).astype(np.int64)
    target[0] = 0  # one slice without the class, so presence AUROC is defined
    a, b = target.copy(), np.zeros_like(target)
    a[:, 0, 0] = 1
    vols = ["v1"] * 3 + ["v2"] * 3
    ref = paired_bootstrap("segmentation", a, b, target, vols, 2, (0,), n_boot=200, seed=1)
    same = paired_bootstrap("segmentation", a, b, list(target), vols, 2, (0,), n_boot=200, seed=1)
    assert same == ref
    # targets at twice the size: each prediction pixel covers 2 x 2 target pixels
    big = [t.repeat(2, 0).repeat(2, 1) for t in target]
    up = paired_bootstrap("segmentation", a, b, big, vols, 2, (0,), n_boot=200, seed=1)
    assert up["a"] == pytest.approx(ref["a"]) and up["b"] == ref["b"] == 0.0
    probs = np.stack([1 - target, target], 1).astype(np.float64)
    probs[:, 1] += rng.random(probs[:, 1].shape) * 0.5
    auc = presence_auroc(probs, target, [1])
    assert 1 in auc and presence_auroc(probs, big, [1]) == auc
