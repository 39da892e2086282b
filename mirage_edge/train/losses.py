"""Fine-tuning losses: generalised Dice + cross-entropy for segmentation (ARCHITECTURE.md §11)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def generalized_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5,
                          ignore_index: int | None = None) -> torch.Tensor:
    """Generalised Dice loss (Sudre et al.) as in the official `CEGDice`.

    logits: B x K x H x W; target: B x H x W int64 in 0..K-1. Softmax over classes, one-hot target
    including background; per sample the class weight is 1 / (pixels of that class)^2, classes absent
    from the target get the sample's largest finite weight; `smooth` is added to numerator and
    denominator; mean over the batch. Pixels equal to `ignore_index` are left out.
    """
    k = logits.shape[1]
    probs = logits.float().softmax(dim=1)
    valid = None
    if ignore_index is not None:
        valid = (target != ignore_index)
        target = target.masked_fill(~valid, 0)
    onehot = F.one_hot(target.long(), k).permute(0, 3, 1, 2).to(probs.dtype)
    if valid is not None:
        v = valid.unsqueeze(1).to(probs.dtype)
        probs, onehot = probs * v, onehot * v
    dims = (2, 3)
    count = onehot.sum(dims)  # B x K
    w = 1.0 / (count * count)
    finite = torch.isfinite(w)
    max_w = torch.where(finite, w, torch.zeros_like(w)).amax(dim=1, keepdim=True)
    w = torch.where(finite, w, max_w)
    inter = (probs * onehot).sum(dims)
    union = (probs + onehot).sum(dims)
    dice = (2.0 * (w * inter).sum(1) + smooth) / ((w * union).sum(1) + smooth)
    return (1.0 - dice).mean()


def ce_gdice_loss(logits: torch.Tensor, target: torch.Tensor, ce_weight: float = 0.5,
                  dice_weight: float = 0.5, class_weights: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`ce_weight` x cross-entropy (per-class `class_weights` K, optional) + `dice_weight` x generalised
    Dice; returns (loss, parts)."""
    w = class_weights.to(logits.device) if class_weights is not None else None
    ce = F.cross_entropy(logits.float(), target.long(), weight=w)
    gd = generalized_dice_loss(logits, target)
    return ce_weight * ce + dice_weight * gd, {"ce": ce.detach(), "gdice": gd.detach()}


__all__ = ["generalized_dice_loss", "ce_gdice_loss"]
