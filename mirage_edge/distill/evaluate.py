"""Evaluation of teacher vs student (FP32 torch, INT8 ONNX Runtime): task metrics and agreement.

Task metrics come from `mirage_edge.metrics` (per-volume Dice for segmentation, BAcc & co. for
classification). Agreement with the teacher: segmentation "prediction Dice" (mean foreground Dice
between the student's and the teacher's argmax maps, the teacher's map taken as reference),
classification top-1 agreement, and the mean per-token cosine between the (projected) student
tokens and the teacher tokens.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np
import torch

from mirage_edge.distill.data import DistillSamples, collate
from mirage_edge.metrics import mask_dice

Predict = Callable[[torch.Tensor], torch.Tensor]


def batches(ds: DistillSamples, batch_size: int) -> Iterator[dict[str, Any]]:
    """Un-augmented (view 0) batches of `ds` in order."""
    for start in range(0, len(ds), batch_size):
        yield collate([ds.load(i, 0) for i in range(start, min(len(ds), start + batch_size))])


@torch.no_grad()
def collect(ds: DistillSamples, predict: Predict, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray | None]:
    """Run `predict` (B x 1 x H x W -> logits) over `ds`; returns (stacked logits float32, labels)."""
    outs, labels = [], []
    for b in batches(ds, batch_size):
        outs.append(predict(b["bscan"]).float().cpu().numpy())
        if "label" in b:
            labels.append(b["label"].numpy())
    return np.concatenate(outs), (np.concatenate(labels) if labels else None)


def native_truth(task: str, labels: np.ndarray, ds: DistillSamples) -> Any:
    """What test scores are computed against: segmentation masks at each file's own size (predictions
    are resized to them, nearest, as fine-tuning scores), so a student's, a teacher's and fine-tuning's
    Dice on one image agree; classification labels as they are."""
    if task != "segmentation":
        return labels
    return [ds.native_label(i) for i in range(len(ds))]


def task_metrics(task: str, logits: np.ndarray, labels: np.ndarray, ds: DistillSamples,
                 hd95: bool = True) -> dict[str, float]:
    """Headline metrics of one model: seg -> per-volume Dice etc.; cls -> BAcc etc."""
    from mirage_edge import metrics

    if task == "segmentation":
        pred = logits.argmax(1)
        vols = volumes(ds)
        names = ds.index.classes
        classes, ignore = seg_classes(ds, logits.shape[1])
        # MIRAGE scoring: background-like classes (by name) are not scored
        m = metrics.segmentation_metrics(pred, labels, vols, classes, ignore=ignore, compute_hd95=hd95)
        out = {k: float(v) for k, v in m.items() if isinstance(v, (int, float, np.floating, np.integer))}
        # per subject (= volume; Duke: 11 B-scans a subject): mean Dice over its scored classes
        per: dict[str, list[float]] = {}
        for r in m["per_volume"]:
            per.setdefault(r["volume"], []).append(r["dice"])
        out["per_volume_dice"] = {v: float(np.mean(d)) for v, d in per.items()}  # type: ignore[assignment]
        # lesion-style classes absent from some B-scans: does the model find the B-scans that have them?
        auc = metrics.presence_auroc(_softmax(logits), labels, metrics.scored_classes(classes, ignore))
        if auc:
            out["presence_auroc"] = float(np.mean(list(auc.values())))
            out["presence_auroc_per_class"] = {(names[c] if names else str(c)): v  # type: ignore[assignment]
                                               for c, v in auc.items()}
        return out
    m = metrics.classification_metrics(labels, _softmax(logits))
    return {k: float(v) for k, v in m.items() if isinstance(v, (int, float, np.floating, np.integer))}


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def volumes(ds: DistillSamples) -> list[str]:
    """Volume (subject) id of every sample, in order: the unit of per-volume Dice and of resampling."""
    return [s.volume for s in ds.samples]


def seg_classes(ds: DistillSamples, k: int) -> tuple[Any, Any]:
    """(classes, ignore) for `mirage_edge.metrics`: names when the set has them (background-like
    names are then not scored), else k classes with class 0 ignored."""
    names = ds.index.classes
    return (names, None) if names else (k, (0,))


def compare(task: str, logits_a: np.ndarray, logits_b: np.ndarray, labels: np.ndarray, ds: DistillSamples,
            n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Paired bootstrap of A's and B's headline metric on the same images (`metrics.paired_bootstrap`)."""
    from mirage_edge import metrics

    a, b = logits_a.argmax(1), logits_b.argmax(1)
    if task == "segmentation":
        classes, ignore = seg_classes(ds, logits_a.shape[1])
        return metrics.paired_bootstrap(task, a, b, labels, volumes(ds), classes, ignore, n_boot=n_boot, seed=seed)
    return metrics.paired_bootstrap(task, a, b, labels, n_boot=n_boot, seed=seed)


def headline(task: str, m: dict[str, float]) -> tuple[str, float]:
    """The metric the done-criteria use: mean foreground Dice (seg) or balanced accuracy (cls)."""
    keys = ("dice", "mean_dice", "dice_mean") if task == "segmentation" else ("bacc", "balanced_accuracy")
    for k in keys:
        if k in m:
            return k, m[k]
    cand = [k for k in m if ("dice" if task == "segmentation" else "bacc") in k.lower()]
    if not cand:
        raise KeyError(f"no {'Dice' if task == 'segmentation' else 'BAcc'} among metrics {sorted(m)}")
    return cand[0], m[cand[0]]


def agreement(task: str, student_logits: np.ndarray, teacher_logits: np.ndarray) -> dict[str, float]:
    s, t = student_logits.argmax(1), teacher_logits.argmax(1)
    if task == "segmentation":
        return {"pred_dice_vs_teacher": mask_dice(s, t, student_logits.shape[1]),
                "pixel_agreement": float((s == t).mean())}
    return {"top1_agreement": float((s == t).mean())}


@torch.no_grad()
def feature_cosine(ds: DistillSamples, student_tokens: Predict, teacher: Any, batch_size: int = 16) -> float:
    """Mean per-token cosine between student tokens (B x (N+G) x D) and the teacher's targets."""
    from mirage_edge.distill.losses import token_cosine

    total, n = 0.0, 0
    for b in batches(ds, batch_size):
        t = teacher.targets(b)["tokens"]
        s = student_tokens(b["bscan"])
        total += float(token_cosine(s, t)) * len(t)
        n += len(t)
    return total / max(n, 1)


__all__ = ["collect", "task_metrics", "compare", "volumes", "seg_classes", "headline", "agreement", "feature_cosine", "batches"]
