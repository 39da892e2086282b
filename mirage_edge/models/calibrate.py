"""A foreground logit offset for segmentation, chosen on validation data and folded into the head.

A segmentation model trained on a lesion that covers ~0.1-1 % of the pixels is under-confident on
the smallest lesions: on Duke DME the default student's fluid probability on subject 9's pockets
peaked at 0.05-0.41, so argmax found none. Adding one offset `b` to the logits of every scored
(foreground) class before the argmax moves that decision; with two classes it is a probability
threshold of sigmoid(-b). `b` is picked on the validation split from a fixed grid (0 included, so
validation can only keep or gain), then added to the bias of the head's last 1x1 conv: the saved
checkpoint, its ONNX / INT8 exports and the torch-free runtime all carry the chosen decision, with
no post-processing step a deployment could forget. The upsampling after that conv is linear, so the
fold is exact.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from mirage_edge.errors import ConfigError

# logit units; -2..+4 covers foreground probability thresholds from 0.88 down to 0.018
GRID: tuple[float, ...] = tuple(float(b) for b in np.round(np.arange(-2.0, 4.0001, 0.25), 2))


def choose_offset(logits: np.ndarray, classes: Sequence[int], score: Callable[[np.ndarray], float],
                  grid: Sequence[float] = GRID) -> dict[str, Any]:
    """The offset for `classes` that maximises `score` on validation logits.

    logits: N x K x h x w; score(shifted logits N x K x h x w) -> the validation metric (higher is
    better). Ties go to the smallest |offset| (then the lower one): without evidence, no change.
    Returns {"offset", "val_before" (offset 0), "val_after", "scores": {offset: metric}}.
    """
    if logits.ndim != 4:
        raise ConfigError(f"calibration is for segmentation logits N x K x h x w, got shape {logits.shape}")
    k = logits.shape[1]
    cls = sorted({int(c) for c in classes})
    if not cls or cls[0] < 0 or cls[-1] >= k or len(cls) == k:
        raise ConfigError(f"calibration shifts some foreground classes of {k}, got {list(classes)}")
    grid = sorted({float(b) for b in grid} | {0.0})
    shift = np.zeros((1, k, 1, 1), dtype=logits.dtype)
    shift[0, cls] = 1.0
    scores = {b: float(score(logits + shift * np.asarray(b, logits.dtype))) for b in grid}
    best = max(grid, key=lambda b: (scores[b], -abs(b), -b))
    return {"offset": best, "classes": cls, "val_before": scores[0.0], "val_after": scores[best],
            "scores": {f"{b:g}": s for b, s in scores.items()}}


def final_conv(model: nn.Module) -> nn.Conv2d:
    """The head's last 1x1 conv (ConvNeXt and FPN segmentation heads), where the offset is folded."""
    layer = getattr(getattr(model, "head", None), "final_layer", None)
    if not isinstance(layer, nn.Conv2d) or layer.bias is None:
        raise ConfigError(f"{type(model).__name__} has no segmentation head with a biased final 1x1 conv "
                          "(head.final_layer): a logit offset cannot be folded into it")
    return layer


@torch.no_grad()
def fold_offset(model: nn.Module, classes: Sequence[int], offset: float) -> None:
    """Add `offset` to the final conv's bias of `classes`: the model's logits become logits + offset there."""
    bias = final_conv(model).bias
    bias[list(classes)] += float(offset)


def describe(result: dict[str, Any]) -> str:
    return (f"foreground logit offset {result['offset']:+g} chosen on validation "
            f"({result['val_before']:.4f} -> {result['val_after']:.4f})")


__all__ = ["GRID", "choose_offset", "fold_offset", "final_conv", "describe"]
