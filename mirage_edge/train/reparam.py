"""Input centring for training a patch projection from scratch, without changing the model.

Fine-tuning images are per-image min-max scaled to [0, 1] (ARCHITECTURE.md §10-§12), so every pixel
is >= 0 and the mean is far from 0 (~0.17 for OCT: mostly dark background). With such inputs the
gradient of a patch-projection filter, sum(delta * x), carries a large part shared by all its P x P
taps (mean * sum(delta)), and Adam moves the whole filter up or down together: tokens learn
brightness before shape, and a MIRAGE trained from scratch sits on its initial loss plateau for
many more epochs (synthetic `cls`: test BAcc 0.64 vs 0.81-0.86 after 30 epochs; train/README.md).
The official weights never met the problem (they start from ImageNet MultiMAE / MAE, whose inputs
are normalised).

`center_inputs(model, mean)` makes the projection compute `conv(x - mean)` during training, so its
gradient is `sum(delta * (x - mean))`, while the model stays the plain network on [0, 1] input:
`conv(x - mean) = conv(x) - mean * sum(W)` is folded into the bias whenever the weights are read
(`state_dict`: checkpoints, `save_model`, best/) and unfolded when they are loaded (resume). Saved
models, exports and the preprocessing spec are therefore unchanged.
"""
from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn


def _bias_shift(weight: torch.Tensor, mean: float) -> torch.Tensor:
    """mean * sum over the input taps of each output filter (C_out,)."""
    return mean * weight.detach().sum(dim=tuple(range(1, weight.dim())))


class CenteredInput:
    """Hooks on one Conv2d (with bias): forward on `x - mean`, state dicts in plain coordinates.

    Installing it changes neither the function nor the state dict (the bias absorbs the shift);
    only the gradients of the filter weights, and so the training, differ.
    """

    def __init__(self, conv: nn.Conv2d, mean: float) -> None:
        if conv.bias is None:
            raise ValueError("input centring folds into the bias; this convolution has none")
        self.conv, self.mean = conv, float(mean)
        with torch.no_grad():  # same function and same state dict as before: conv(x - mean) + b + mean*sum(W)
            conv.bias += _bias_shift(conv.weight, self.mean).to(conv.bias)
        self.handles = [
            conv.register_forward_pre_hook(self._pre_forward),
            # partial, not bound methods: torch tags state-dict hooks with an attribute
            conv.register_state_dict_post_hook(functools.partial(CenteredInput._fold, self)),
            conv.register_load_state_dict_pre_hook(functools.partial(CenteredInput._unfold, self)),
        ]

    def _pre_forward(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (args[0] - self.mean, *args[1:])

    def _fold(self, module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
        # plain bias = trained bias - mean * sum(W): the saved conv applied to raw x equals conv(x - mean)
        key = prefix + "bias"
        if key in state_dict:
            w = state_dict.get(prefix + "weight", module.weight)
            state_dict[key] = state_dict[key].detach() - _bias_shift(w, self.mean).to(state_dict[key])

    def _unfold(self, module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any, strict: bool,
                missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        key, wkey = prefix + "bias", prefix + "weight"
        if key in state_dict and wkey in state_dict:
            state_dict[key] = state_dict[key] + _bias_shift(state_dict[wkey], self.mean).to(state_dict[key])

    def remove(self) -> None:
        """Fold the centring into the bias for good and drop the hooks (the module is plain again)."""
        with torch.no_grad():
            self.conv.bias -= _bias_shift(self.conv.weight, self.mean).to(self.conv.bias)
        for h in self.handles:
            h.remove()
        self.handles = []


def center_inputs(model: nn.Module, mean: float) -> list[CenteredInput]:
    """Centre the input of every image patch projection of the MIRAGE encoder(s) in `model` (bscan,
    slo; not the layer-map adapter, whose input is an embedding). The parameters stay the same objects,
    so it can come before or after building the optimizer; checkpoints load through the hooks."""
    from mirage_edge.models.adapters import PatchedInputAdapter, SemSegInputAdapter

    out = [CenteredInput(m.proj, mean) for m in model.modules()
           if isinstance(m, PatchedInputAdapter) and not isinstance(m, SemSegInputAdapter)]
    if not out:
        raise ValueError(f"{type(model).__name__} has no MIRAGE image patch projection to centre")
    return out


__all__ = ["center_inputs", "CenteredInput"]
