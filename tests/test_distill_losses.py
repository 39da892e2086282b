"""Distillation losses against independent computations."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mirage_edge import config as C
from mirage_edge.distill.losses import (feature_loss, kd_kl, normalize_tokens, task_kd_loss,
                                        token_cosine)
from mirage_edge.distill.recipe import FeatureLossConfig, TaskLossConfig
from mirage_edge.errors import ConfigError


def test_feature_loss_terms_match_manual():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    cfg = FeatureLossConfig(mse=0.5, cosine=2.0, smooth_l1=0.25, norm="layernorm")
    loss, parts = feature_loss(s, t, cfg)
    ln = lambda x: (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-6)
    mse = ((ln(s) - ln(t)) ** 2).mean()
    cos = 1 - (s * t).sum(-1) / (s.norm(dim=-1) * t.norm(dim=-1))
    d = (ln(s) - ln(t)).abs()
    sl1 = torch.where(d < 1, 0.5 * d ** 2, d - 0.5).mean()
    expect = 0.5 * mse + 2.0 * cos.mean() + 0.25 * sl1
    assert abs(float(loss) - float(expect)) < 1e-5
    assert abs(parts["cos"] - float(cos.mean())) < 1e-6
    zero, _ = feature_loss(t, t, cfg)
    assert float(zero) < 1e-6
    assert abs(float(token_cosine(t, t)) - 1) < 1e-6


def test_feature_loss_rejects_shape_mismatch_and_bad_weights():
    with pytest.raises(ValueError, match="student tokens"):
        feature_loss(torch.zeros(1, 4, 8), torch.zeros(1, 5, 8), FeatureLossConfig())
    with pytest.raises(ConfigError):
        C.from_dict(FeatureLossConfig, {"mse": 0.0, "cosine": 0.0}, source="x.toml")
    with pytest.raises(ConfigError, match="norm"):
        C.from_dict(FeatureLossConfig, {"norm": "batch"}, source="x.toml")
    assert torch.allclose(normalize_tokens(torch.ones(1, 2, 3) * 3, "l2").norm(dim=-1), torch.ones(1, 2))


def test_kd_kl_is_hinton_kd():
    torch.manual_seed(1)
    s, t = torch.randn(4, 6), torch.randn(4, 6)
    T = 3.0
    expect = F.kl_div(F.log_softmax(s / T, 1), F.softmax(t / T, 1), reduction="batchmean") * T * T
    assert abs(float(kd_kl(s, t, T)) - float(expect)) < 1e-5
    assert float(kd_kl(t, t, T)) < 1e-6
    # per-pixel: mean over pixels of the per-pixel KL
    sp, tp = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    flat = kd_kl(sp.permute(0, 2, 3, 1).reshape(-1, 3), tp.permute(0, 2, 3, 1).reshape(-1, 3), 2.0)
    assert abs(float(kd_kl(sp, tp, 2.0)) - float(flat)) < 1e-5


def test_task_kd_loss_mix():
    torch.manual_seed(3)
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    y = torch.tensor([0, 1, 2, 3])
    cfg = TaskLossConfig(alpha=0.25, temperature=2.0)
    loss, parts = task_kd_loss(s, t, y, "cls", cfg)
    expect = 0.25 * kd_kl(s, t, 2.0) + 0.75 * F.cross_entropy(s, y)
    assert abs(float(loss) - float(expect)) < 1e-5 and set(parts) == {"kd", "ce"}
    seg_loss, seg_parts = task_kd_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4),
                                       torch.randint(0, 3, (2, 4, 4)), "seg", cfg)
    assert "gdice" in seg_parts and torch.isfinite(seg_loss)
    only_kd, p2 = task_kd_loss(s, t, None, "cls", cfg)
    assert set(p2) == {"kd"} and abs(float(only_kd) - float(kd_kl(s, t, 2.0))) < 1e-6
    with pytest.raises(ConfigError, match="alpha"):
        C.from_dict(TaskLossConfig, {"alpha": 1.5}, source="r.toml")


def test_class_weights_weigh_the_label_cross_entropy():
    """stage2.loss.class_weights: the fluid-weighted CE of the real-scan teacher, for the student and its
    labels-only twin alike; the KD term is untouched."""
    from mirage_edge.distill.losses import label_loss

    torch.manual_seed(0)
    s, t = torch.randn(2, 2, 8, 8), torch.randn(2, 2, 8, 8)
    y = (torch.rand(2, 8, 8) > 0.9).long()
    cfg = TaskLossConfig(alpha=0.5, temperature=2.0, dice=0.0, class_weights=[1.0, 5.0])
    got, parts = task_kd_loss(s, t, y, "seg", cfg)
    want = 0.5 * kd_kl(s, t, 2.0) + 0.5 * F.cross_entropy(s, y, weight=torch.tensor([1.0, 5.0]))
    assert torch.allclose(got, want, atol=1e-6)
    plain, _ = label_loss(s, y, "seg")
    weighted, _ = label_loss(s, y, "seg", class_weights=[1.0, 5.0])
    assert not torch.allclose(plain, weighted)
    with pytest.raises((ValueError, ConfigError), match="class_weights"):
        C.from_dict(TaskLossConfig, {"class_weights": [1.0, -1.0]}, source="t")
