"""Distillation losses: feature matching (stage 1), logit / pixel KD + task losses (stage 2).

Shapes: tokens B x N x D; classification logits B x K; segmentation logits B x K x H x W,
labels B x H x W (int64 class indices).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from mirage_edge.distill.recipe import FeatureLossConfig, Norm, TaskLossConfig
# the official CEGDice term, shared with fine-tuning
from mirage_edge.train.losses import generalized_dice_loss


def normalize_tokens(x: torch.Tensor, norm: Norm) -> torch.Tensor:
    """Per-token normalization over the last dim (B x N x D -> B x N x D), in float32."""
    x = x.float()
    if norm == "layernorm":
        return F.layer_norm(x, x.shape[-1:], eps=1e-6)
    if norm == "l2":
        return F.normalize(x, dim=-1, eps=1e-6)
    return x


def feature_loss(student: torch.Tensor, teacher: torch.Tensor, cfg: FeatureLossConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted MSE / cosine / smooth-L1 between B x N x D token maps. Returns (loss, parts)."""
    if student.shape != teacher.shape:
        raise ValueError(f"student tokens {tuple(student.shape)} != teacher tokens {tuple(teacher.shape)}")
    s = normalize_tokens(student, cfg.norm)
    t = normalize_tokens(teacher.detach(), cfg.norm)
    total = student.new_zeros((), dtype=torch.float32)
    parts: dict[str, float] = {}
    if cfg.mse:
        v = F.mse_loss(s, t)
        total = total + cfg.mse * v
        parts["mse"] = float(v.detach())
    if cfg.cosine:
        v = (1.0 - F.cosine_similarity(student.float(), teacher.detach().float(), dim=-1, eps=1e-6)).mean()
        total = total + cfg.cosine * v
        parts["cos"] = float(v.detach())
    if cfg.smooth_l1:
        v = F.smooth_l1_loss(s, t, beta=cfg.smooth_l1_beta)
        total = total + cfg.smooth_l1 * v
        parts["sl1"] = float(v.detach())
    return total, parts


def token_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean per-token cosine similarity of two B x N x D maps (a scalar; agreement metric)."""
    return F.cosine_similarity(a.float(), b.float(), dim=-1, eps=1e-6).mean()


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
          dim: int = 1) -> torch.Tensor:
    """Hinton KD: T^2 * KL(softmax(t/T) || softmax(s/T)) averaged over all non-class positions.

    Works for B x K (classification) and B x K x H x W (per-pixel KD), class axis `dim`.
    """
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=dim)
    log_p_t = F.log_softmax(teacher_logits.detach().float() / t, dim=dim)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=dim)  # B (x H x W)
    return kl.mean() * (t * t)


def task_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None,
                 task: str, cfg: TaskLossConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """Stage-2 loss for `task` "cls" (B x K logits, labels B) or "seg" (B x K x H x W, labels B x H x W).

    Without labels (unlabelled data) only the KD term is used; label -1 (a class, or every pixel of a
    mask) marks an unlabelled sample within a batch.
    """
    kd = kd_kl(student_logits, teacher_logits, cfg.temperature, dim=1)
    parts = {"kd": float(kd.detach())}
    if labels is None:
        return kd, parts
    # -1 = no label (unlabelled transfer images, stage2.data): KD only for those
    labelled = (labels.reshape(labels.shape[0], -1) >= 0).any(dim=1)  # B
    if not bool(labelled.any()):
        return kd, parts
    total, lparts = label_loss(student_logits, labels, task, ce_weight=1.0 - cfg.alpha, dice=cfg.dice,
                               start=cfg.alpha * kd, class_weights=cfg.class_weights)
    return total, {**parts, **lparts}


def label_loss(logits: torch.Tensor, labels: torch.Tensor, task: str, ce_weight: float = 1.0,
               dice: float = 0.0, start: torch.Tensor | float = 0.0,
               class_weights: Sequence[float] = ()) -> tuple[torch.Tensor, dict[str, float]]:
    """start + ce_weight * CE (per-class `class_weights`, K, if given) [+ dice * generalized Dice for
    "seg"]; label -1 = no label.

    logits B x K (x H x W), labels B (x H x W). With start = 0, the whole loss of the labels-only
    twin; stage 2 passes its KD term as `start` (kept first: the float sum order of earlier runs)."""
    labelled = (labels.reshape(labels.shape[0], -1) >= 0).any(dim=1)  # B
    w = torch.tensor(list(class_weights), dtype=torch.float32, device=logits.device) if class_weights else None
    ce = F.cross_entropy(logits.float(), labels.long(), weight=w, ignore_index=-1)
    parts = {"ce": float(ce.detach())}
    total = start + ce_weight * ce
    if task == "seg" and dice and bool(labelled.any()):
        gd = generalized_dice_loss(logits[labelled], labels[labelled], ignore_index=-1)
        parts["gdice"] = float(gd.detach())
        total = total + dice * gd
    return total, parts


__all__ = ["FeatureLossConfig", "TaskLossConfig", "feature_loss", "normalize_tokens", "token_cosine", "kd_kl",
           "generalized_dice_loss", "task_kd_loss", "label_loss"]
