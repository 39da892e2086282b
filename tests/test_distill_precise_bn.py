"""Precise BatchNorm: running statistics re-estimated as exact averages, modes restored, no-op without BN."""
from __future__ import annotations

import torch
from torch import nn

from mirage_edge.distill.precise_bn import recalibrate_bn

torch.set_num_threads(2)


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5),
                         nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2))


def test_recalibrated_stats_are_exact_averages_and_modes_are_restored():
    torch.manual_seed(0)
    net = _net().eval()
    batches = [torch.rand(4, 1, 8, 8) * (i + 1) for i in range(3)]
    assert recalibrate_bn(net, batches) == 2
    # exact: the mean over batches of the per-batch means of the first BN's input
    with torch.no_grad():
        feats = [net[0](x) for x in batches]
    want_mean = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
    want_var = torch.stack([f.var((0, 2, 3), unbiased=True) for f in feats]).mean(0)
    torch.testing.assert_close(net[1].running_mean, want_mean)
    torch.testing.assert_close(net[1].running_var, want_var)
    assert not any(m.training for m in net.modules())          # eval mode kept, dropout untouched
    assert net[1].momentum == 0.1 and net[5].momentum == 0.1    # momentum restored
    # idempotent: the same inputs on the same weights give the same statistics
    before = {k: v.clone() for k, v in net.state_dict().items()}
    recalibrate_bn(net, batches)
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, before[k])


def test_no_batchnorm_or_no_inputs_is_a_no_op():
    vit_like = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    assert recalibrate_bn(vit_like, [torch.rand(2, 4)]) == 0
    net = _net().train()
    ref = net[1].running_var.clone()
    assert recalibrate_bn(net, []) == 0
    torch.testing.assert_close(net[1].running_var, ref)
    assert net.training
