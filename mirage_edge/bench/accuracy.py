"""Accuracy through a runner: load a task's samples, predict with the row's own model/artifact and
its own preprocessing, score with `mirage_edge.metrics`, and compare predictions with the teacher's.

Classification: softmax probabilities -> BAcc, AUROC, AP, F1, MCC. Segmentation: argmax masks,
resized (nearest) back to each ground truth's size -> per-volume Dice and IoU, per-slice HD95
(background excluded), as `mirage_edge.metrics.segmentation_metrics` defines them.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from mirage_edge.bench.record import CLS_METRICS, PRIMARY_METRIC, SEG_METRICS
from mirage_edge.errors import DataError
from mirage_edge.metrics import mask_dice


@dataclasses.dataclass
class TaskData:
    """Samples of one split. Classification: `labels` (N,) int; segmentation: `masks` (H x W ints)."""

    name: str
    kind: str                       # cls | seg
    classes: list[str]
    images: list[np.ndarray]        # raw H x W grey images as read from disk
    names: list[str]
    volume_ids: list[str]
    labels: np.ndarray | None = None
    masks: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.images)


def load_task(task: Any, max_samples: int | None = None) -> TaskData:
    """Read `task.path/<task.split>` (RetinaBench layout) with the data package's torch-free index.

    Segmentation masks become class indices through INFO.json (pixel value -> index)."""
    from mirage_edge.data.io import read_image
    from mirage_edge.data.layout import scan_dataset

    root = Path(task.path)
    if not root.is_dir():
        raise DataError(f"dataset folder not found: {root}")
    index = scan_dataset(root, task="classification" if task.kind == "cls" else "segmentation")
    samples = index.samples(task.split)
    limit = max_samples if max_samples is not None else task.max_samples
    if limit:
        samples = samples[:limit]
    images = [read_image(s.image) for s in samples]
    names = [s.id for s in samples]
    vols = [s.volume for s in samples]
    if task.kind == "cls":
        labels = np.asarray([s.label for s in samples], dtype=np.int64)
        return TaskData(task.name, "cls", list(index.classes), images, names, vols, labels=labels)
    assert index.info is not None  # scan_dataset requires INFO.json for segmentation
    masks = [index.info.class_map(read_image(s.mask), s.mask) for s in samples]
    return TaskData(task.name, "seg", list(index.classes), images, names, vols, masks=masks)


def _softmax(logits: np.ndarray, axis: int = 1) -> np.ndarray:
    z = logits - logits.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def predict(runner: Any, data: TaskData, batch: int = 4) -> list[np.ndarray] | np.ndarray:
    """Run every sample through `runner` (its own preprocessing). cls -> N x K probabilities;
    seg -> list of H x W int masks at each ground truth's resolution."""
    from mirage_edge.data.preprocess import resize_mask

    probs: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    for start in range(0, len(data), batch):
        chunk = data.images[start:start + batch]
        x = np.stack([runner.preprocess(img) for img in chunk]).astype(np.float32, copy=False)
        logits = runner.infer(x)
        if data.kind == "cls":
            if logits.ndim != 2:
                raise DataError(f"classification task {data.name!r} needs B x K logits, the model gave {logits.shape}")
            probs.append(_softmax(logits.astype(np.float64)))
        else:
            if logits.ndim == 3 and not np.issubdtype(logits.dtype, np.floating):
                pred = logits.astype(np.int64)  # the graph already took the argmax (output kind "mask")
            elif logits.ndim == 4:
                pred = logits.argmax(axis=1).astype(np.int64)
            else:
                raise DataError(f"segmentation task {data.name!r} needs B x K x H x W logits, got {logits.shape}")
            for i, p in enumerate(pred):
                gt = data.masks[start + i]  # type: ignore[index]
                masks.append(resize_mask(p, gt.shape) if p.shape != gt.shape else p)
    return np.concatenate(probs) if data.kind == "cls" else masks


def score(data: TaskData, preds: list[np.ndarray] | np.ndarray) -> dict[str, float]:
    """Task metrics of `preds` against the ground truth (keys: CLS_METRICS or SEG_METRICS)."""
    from mirage_edge import metrics

    if data.kind == "cls":
        res = metrics.classification_metrics(data.labels, np.asarray(preds))
        wanted = CLS_METRICS
    else:
        from mirage_edge.data.layout import SegClass

        # MIRAGE's rule: background-like labels are not scored, "invalid" ground truth is copied
        invalid = [i for i, c in enumerate(data.classes) if SegClass(i, i, c).kind == "invalid"]
        res = metrics.segmentation_metrics(preds, data.masks, data.volume_ids, data.classes, ignore=None,
                                           invalid=invalid)
        wanted = SEG_METRICS
    out = {}
    lower = {str(k).lower(): v for k, v in res.items()}
    for key in wanted:
        value = lower.get(key)
        if isinstance(value, (int, float, np.floating)) and np.isfinite(value):
            out[key] = float(value)
    return out


def agreement(kind: str, preds: Any, teacher: Any) -> float:
    """How often the row agrees with the teacher on the same samples.

    cls: fraction with the same top-1 class. seg: mean over foreground classes (present in either)
    of the Dice between the two predicted masks, pooled over all pixels.
    """
    if kind == "cls":
        a, b = np.asarray(preds).argmax(1), np.asarray(teacher).argmax(1)
        return float((a == b).mean())
    return mask_dice(np.concatenate([np.ravel(p) for p in preds]), np.concatenate([np.ravel(t) for t in teacher]))


def save_preds(path: str | Path, kind: str, preds: Any) -> None:
    from mirage_edge._io import atomic_path

    arrays = {"probs": np.asarray(preds)} if kind == "cls" else {f"m{i}": m.astype(np.uint8 if m.max() < 256 else
                                                                                     np.int32) for i, m in enumerate(preds)}
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)


def load_preds(path: str | Path, kind: str) -> Any:
    with np.load(path) as z:
        if kind == "cls":
            return z["probs"]
        return [z[f"m{i}"] for i in range(len(z.files))]


def primary(kind: str, metrics: dict[str, float]) -> tuple[str, float | None]:
    name = PRIMARY_METRIC.get(kind, "")
    return name, metrics.get(name)


__all__ = ["TaskData", "load_task", "predict", "score", "agreement", "save_preds", "load_preds", "primary"]
