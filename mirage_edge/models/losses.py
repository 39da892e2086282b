"""Masked pretraining losses (ARCHITECTURE.md §9), matching the official MaskedMSELoss /
MaskedCrossEntropyLoss: per-sample mean over masked pixels, NaN-ignoring batch mean, 0 when no
token of a modality is masked anywhere in the batch; total = plain sum over modalities."""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F

from mirage_edge.models.config import LAYERMAP


def pixel_mask(mask: torch.Tensor, grid: tuple[int, int], patch: tuple[int, int]) -> torch.Tensor:
    """Token mask B x (gh*gw) -> pixel mask B x (gh*ph) x (gw*pw) (each token covers its patch)."""
    b = mask.shape[0]
    m = mask.reshape(b, *grid).to(torch.float32)
    return m.repeat_interleave(patch[0], dim=1).repeat_interleave(patch[1], dim=2)


def masked_loss_per_sample(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                           grid: tuple[int, int], patch: tuple[int, int], kind: str) -> torch.Tensor:
    """Per-sample loss (B,) over masked pixels; NaN for a sample with nothing masked.

    kind "mse": pred/target B x C x H x W, squared error averaged over channels;
    kind "ce": pred B x K x H x W logits, target B x H x W int64 classes.
    """
    pm = pixel_mask(mask, grid, patch).to(pred.device)
    if kind == "mse":
        per_pixel = ((pred - target.to(pred.dtype)) ** 2).mean(dim=1)
    elif kind == "ce":
        per_pixel = F.cross_entropy(pred, target.long(), reduction="none")
    else:
        raise ValueError(f"unknown loss kind {kind!r}")
    return (per_pixel * pm).flatten(1).sum(1) / pm.flatten(1).sum(1)


def masked_loss(preds: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor],
                masks: Mapping[str, torch.Tensor], cfg) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(total, {modality: batch loss}) for every modality present in preds, targets and masks.

    `cfg` is the model's MirageConfig (grids and patches); targets are the model inputs.
    """
    losses: dict[str, torch.Tensor] = {}
    for m, pred in preds.items():
        if m not in targets or m not in masks:
            continue
        kind = "ce" if m == LAYERMAP else "mse"
        per = masked_loss_per_sample(pred, targets[m], masks[m], cfg.grid(m), tuple(cfg.patch_size[m]), kind)
        valid = ~torch.isnan(per)
        losses[m] = per[valid].mean() if bool(valid.any()) else pred.sum() * 0.0
    if not losses:
        raise ValueError("no modality has a prediction, a target and a mask")
    total = torch.stack(list(losses.values())).sum()
    return total, losses
