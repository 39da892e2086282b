"""Optimiser parameter groups (weight-decay exclusions, layer-wise LR decay) and the per-step schedule.

Layer-wise decay follows the MIRAGE fine-tuning rule (ARCHITECTURE.md §11): with L transformer
blocks, input adapters / global token get layer id 0, block i gets i+1, the head L+1, and a
parameter's LR is `lr * decay ** (L + 1 - id)`. The defaults below work for any model whose
blocks are named `...blocks.<i>.` / `...encoder.<i>.` / `...layers.<i>.`; pass `layer_id_fn` for
anything else (e.g. a student with stages).

Why not `timm.optim.param_groups_layer_decay`: it would break parity with that rule.
* It numbers layers from `model.group_matcher()`; our task models (MIRAGE encoder + head, or a
  timm student wrapped as `encoder.*`, whose own matcher expects unprefixed names) have none, and
  timm's fallback (`auto_group_layers`) cuts the parameter list into runs of 12 tensors, not blocks.
* Even with a matcher, a parameter it does not match goes to the *head* group (scale 1), where the
  rule above puts anything that is neither a block nor a head at id 0 (scale decay ** (L + 1)).
* It renumbers the layers that exist, so a model without head parameters (an encoder alone)
  moves every block one decay factor up, where the rule keeps the head at L + 1.
The schedule is timm's (`CosineSchedule` below), which reproduces the official one exactly.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

# parameters never decayed even when not 1-D (learned tokens); matched as substrings of the name
DEFAULT_NO_DECAY = ("global_tokens", "mask_token", "cls_token", "pos_embed", "pos_emb")
_BLOCK_RE = re.compile(r"(?:^|\.)(?:blocks|encoder|layers)\.(\d+)\.")
_HEAD_HINTS = ("head", "decoder", "output_adapters", "classifier", "fc_norm")


def _in_head(name: str) -> bool:
    return any(h in name for h in _HEAD_HINTS)


def default_layer_id(name: str, num_layers: int) -> int:
    """0 for embeddings/adapters/tokens, i+1 for block i, num_layers+1 for heads/decoders."""
    if _in_head(name):  # before the block pattern: decoders have `blocks.<i>` of their own (ConvNeXt head)
        return num_layers + 1
    hits = _BLOCK_RE.findall(name)
    if hits:
        return min(int(hits[-1]) + 1, num_layers + 1)
    return 0


def count_layers(names: Iterable[str]) -> int:
    """Number of encoder blocks, from the highest `blocks.<i>.` index among non-head parameter names."""
    ids = [int(m) for n in names if not _in_head(n) for m in _BLOCK_RE.findall(n)[-1:]]
    return max(ids) + 1 if ids else 0


def param_groups(
    model: nn.Module,
    weight_decay: float,
    *,
    layer_decay: float = 1.0,
    no_decay: Sequence[str] = DEFAULT_NO_DECAY,
    layer_id_fn: Callable[[str, int], int] | None = None,
    num_layers: int | None = None,
) -> list[dict]:
    """Trainable parameters grouped by (decay?, layer LR scale).

    Decay is off for 1-D tensors, biases and any name containing an entry of `no_decay`. Each group
    carries `lr_scale` (applied by `CosineSchedule`) and `group_name` for logging.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters")
    L = count_layers(n for n, _ in model.named_parameters()) if num_layers is None else num_layers
    layer_id_fn = layer_id_fn or default_layer_id
    groups: dict[tuple[bool, int], dict] = {}
    for name, p in named:
        decay = not (p.ndim <= 1 or name.endswith(".bias") or any(k in name for k in no_decay))
        lid = layer_id_fn(name, L) if layer_decay != 1.0 else 0
        scale = layer_decay ** (L + 1 - lid) if layer_decay != 1.0 else 1.0
        key = (decay, lid)
        if key not in groups:
            groups[key] = {
                "params": [], "param_names": [], "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": scale, "group_name": f"layer{lid}_{'decay' if decay else 'no_decay'}",
            }
        groups[key]["params"].append(p)
        groups[key]["param_names"].append(name)
    return [groups[k] for k in sorted(groups)]


def build_adamw(
    model: nn.Module, lr: float, weight_decay: float, betas: Sequence[float] = (0.9, 0.999),
    eps: float = 1e-8, *, layer_decay: float = 1.0, no_decay: Sequence[str] = DEFAULT_NO_DECAY,
    layer_id_fn: Callable[[str, int], int] | None = None, fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW over `param_groups(...)`; `lr` is the peak LR the schedule scales."""
    groups = param_groups(model, weight_decay, layer_decay=layer_decay, no_decay=no_decay,
                          layer_id_fn=layer_id_fn)
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    kwargs = {"fused": fused} if fused is not None else {}
    return torch.optim.AdamW(groups, lr=lr, betas=(float(betas[0]), float(betas[1])), eps=eps, **kwargs)


@dataclass
class CosineSchedule:
    """Per-step LR: linear warm-up from 0 to `base_lr`, then half-cosine down to `min_lr` at `total_steps`.

    This is MIRAGE's per-iteration schedule (ARCHITECTURE.md §9, §11, §12), computed by timm's
    `CosineLRScheduler` with the warm-up as a prefix (so the cosine spans the steps after it).
    Stateless apart from its fields (the step comes from the loop), so resuming is exact.
    Each param group's LR is `lr_at(step) * group['lr_scale']` (layer-wise decay).
    """

    base_lr: float
    total_steps: int
    warmup_steps: int = 0
    min_lr: float = 0.0
    _timm: Any = field(default=None, init=False, repr=False, compare=False)

    def lr_at(self, step: int) -> float:
        fields = (self.base_lr, self.total_steps, self.warmup_steps, self.min_lr)
        if self._timm is None or self._timm[0] != fields:
            from timm.scheduler import CosineLRScheduler

            # timm schedulers write into an optimizer's param groups; one stand-in group reads the
            # unscaled LR, which `apply` then scales per group.
            probe = SimpleNamespace(param_groups=[{"lr": self.base_lr}])
            sched = CosineLRScheduler(probe, t_initial=max(1, self.total_steps - self.warmup_steps),
                                      lr_min=self.min_lr, warmup_t=self.warmup_steps, warmup_lr_init=0.0,
                                      warmup_prefix=True, t_in_epochs=False)
            self._timm = (fields, sched, probe.param_groups[0])
        _, sched, group = self._timm
        sched.step_update(step)
        return float(group["lr"])

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set every group's LR for optimizer step `step` (0-based); returns the unscaled LR."""
        lr = self.lr_at(step)
        for g in optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        return lr

    def state_dict(self) -> dict:
        return {"base_lr": self.base_lr, "total_steps": self.total_steps,
                "warmup_steps": self.warmup_steps, "min_lr": self.min_lr}

    def load_state_dict(self, state: dict) -> None:
        for k in ("base_lr", "total_steps", "warmup_steps", "min_lr"):
            if k in state:
                setattr(self, k, type(getattr(self, k))(state[k]))


__all__ = ["param_groups", "build_adamw", "CosineSchedule", "default_layer_id", "count_layers",
           "DEFAULT_NO_DECAY"]
