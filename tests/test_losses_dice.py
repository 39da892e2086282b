"""The one generalised Dice loss (official CEGDice term), shared by fine-tuning and distillation."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from mirage_edge.distill.losses import TaskLossConfig, kd_kl, task_kd_loss  # noqa: E402
from mirage_edge.train.losses import generalized_dice_loss  # noqa: E402


def _numpy_gdice(logits: np.ndarray, target: np.ndarray, ignore: int | None = None,
                 smooth: float = 1e-5) -> float:
    """ARCHITECTURE.md §11, written out per sample in float64 with explicit loops."""
    losses = []
    for x, t in zip(logits.astype(np.float64), target):
        e = np.exp(x - x.max(axis=0))
        p = e / e.sum(axis=0)
        keep = np.ones(t.shape, bool) if ignore is None else t != ignore
        k = x.shape[0]
        counts = np.array([np.sum((t == c) & keep) for c in range(k)], np.float64)
        w = np.zeros(k)
        w[counts > 0] = 1.0 / counts[counts > 0] ** 2
        w[counts == 0] = w.max()  # absent classes: the sample's largest finite weight
        num = den = 0.0
        for c in range(k):
            g = ((t == c) & keep).astype(np.float64)
            num += w[c] * np.sum(p[c] * g)
            den += w[c] * np.sum((p[c] + g) * keep)
        losses.append(1.0 - (2.0 * num + smooth) / (den + smooth))
    return float(np.mean(losses))


def test_matches_numpy_with_absent_classes_and_ignored_pixels():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 9, 7)).astype(np.float32)
    target = rng.integers(0, 4, size=(3, 9, 7))  # class 4 absent everywhere
    target[1][target[1] == 2] = 0  # class 2 absent from sample 1 only
    got = generalized_dice_loss(torch.from_numpy(logits), torch.from_numpy(target)).item()
    assert got == pytest.approx(_numpy_gdice(logits, target), rel=1e-5)

    target[0, :3] = -1  # unlabelled pixels leave both the prediction and the target sums
    target[2, :, :2] = -1
    got = generalized_dice_loss(torch.from_numpy(logits), torch.from_numpy(target), ignore_index=-1).item()
    assert got == pytest.approx(_numpy_gdice(logits, target, ignore=-1), rel=1e-5)


def test_perfect_prediction_is_zero_and_wrong_one_is_near_one():
    target = torch.tensor(np.random.default_rng(1).integers(0, 3, size=(2, 6, 6)))
    onehot = torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float()
    assert generalized_dice_loss(onehot * 50, target).item() < 1e-4
    assert generalized_dice_loss((1 - onehot) * 50, target).item() > 0.99


def test_distillation_uses_the_same_dice_and_ignores_unlabelled_pixels():
    rng = np.random.default_rng(2)
    s = torch.from_numpy(rng.normal(size=(2, 4, 8, 8)).astype(np.float32))
    t = torch.from_numpy(rng.normal(size=(2, 4, 8, 8)).astype(np.float32))
    labels = torch.from_numpy(rng.integers(0, 4, size=(2, 8, 8)))
    labels[0, :2] = -1
    cfg = TaskLossConfig(alpha=0.5, temperature=2.0, dice=1.0)
    total, parts = task_kd_loss(s, t, labels, "seg", cfg)
    assert parts["gdice"] == pytest.approx(_numpy_gdice(s.numpy(), labels.numpy(), ignore=-1), rel=1e-5)
    ce = torch.nn.functional.cross_entropy(s, labels, ignore_index=-1)
    torch.testing.assert_close(total, 0.5 * kd_kl(s, t, 2.0) + 0.5 * ce + parts["gdice"])
