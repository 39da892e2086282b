"""Task metrics exactly as the MIRAGE benchmark computes them (ARCHITECTURE.md §13).

Classification (`classification_metrics`, scikit-learn, as `mutils/classification.py`):
balanced accuracy, AUROC (`roc_auc_score` of one-hot labels vs probabilities, one-vs-rest,
support-weighted), average precision (weighted), F1 (weighted), Matthews correlation. Binary
problems may pass probs N x 2 or N (the positive-class probability).

Segmentation (`segmentation_metrics`, as `run_seg_eval.py`): B-scans are grouped into volumes;
per volume and scored class, Dice ``2|A∩B| / (|A|+|B|+1e-6)`` and IoU ``|A∩B| / (|A∪B|+1e-6)``
over the whole 3-D stack (so a class absent from both prediction and ground truth of a volume
scores 0, as in MIRAGE; `skip_empty=True` makes it NaN instead); HD95 per 2-D slice in pixels —
MONAI ``compute_hausdorff_distance(percentile=95)``: surfaces are mask XOR its binary erosion
(cross structuring element), distances by Euclidean distance transform, the larger of the two
directed 95th percentiles — 0 when both masks are empty, NaN when exactly one is, averaged over
slices ignoring NaN. Means are over all (volume, class) rows; layer and lesion classes are also
reported apart when a dataset has both. Values are fractions (MIRAGE prints Dice/IoU x 100).
Predictions of another size are resized to the ground truth with nearest neighbour; ground-truth
pixels of "invalid" classes are copied into the prediction (and never scored).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from mirage_edge.errors import InputError

_EPS = 1e-6


# --- classification ----------------------------------------------------------------------------
def classification_metrics(y_true: Sequence[int] | np.ndarray, probs: np.ndarray,
                           num_classes: int | None = None) -> dict[str, float]:
    """y_true: (N,) int labels; probs: (N, K) class probabilities (or (N,) for binary).

    Returns {"bacc", "auroc", "ap", "f1", "mcc", "accuracy", "n"}. AUROC/AP are NaN when fewer
    than two classes occur in y_true; classes absent from y_true get weight 0 (as sklearn's
    weighted average), so they never raise.
    """
    from sklearn.metrics import (average_precision_score, balanced_accuracy_score, f1_score,
                                 matthews_corrcoef, roc_auc_score)

    y = np.asarray(y_true).astype(np.int64).ravel()
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim == 1 or (p.ndim == 2 and p.shape[1] == 1):
        p1 = p.ravel()
        p = np.stack([1 - p1, p1], axis=1)
    if p.ndim != 2 or p.shape[0] != y.shape[0]:
        raise InputError(f"probs must be N x K with N = len(y_true) = {y.shape[0]}, got shape {np.shape(probs)}")
    k = max(p.shape[1], num_classes or 0)
    if y.size == 0:
        raise InputError("classification_metrics needs at least one sample")
    if y.min() < 0 or y.max() >= k:
        raise InputError(f"labels must be in 0..{k - 1}, got {y.min()}..{y.max()}")
    if not np.isfinite(p).all():
        raise InputError("probs contain NaN or infinite values")
    pred = p.argmax(1)
    onehot = np.eye(k, dtype=np.int64)[y][:, : p.shape[1]]
    support = onehot.sum(0)
    present = (support > 0) & (support < len(y))
    auroc = ap = float("nan")
    if present.any():
        w = support[present] / support[present].sum()
        auroc = float(np.sum(w * [roc_auc_score(onehot[:, c], p[:, c]) for c in np.flatnonzero(present)]))
        ap = float(np.sum(w * [average_precision_score(onehot[:, c], p[:, c]) for c in np.flatnonzero(present)]))
    return {
        "bacc": float(balanced_accuracy_score(y, pred)),
        "auroc": auroc,
        "ap": ap,
        "f1": float(f1_score(y, pred, average="weighted", zero_division=0)),
        "mcc": float(matthews_corrcoef(y, pred)),
        "accuracy": float(np.mean(pred == y)),
        "n": int(y.size),
    }


# --- segmentation ------------------------------------------------------------------------------
def _surface(mask: np.ndarray) -> np.ndarray:
    from scipy.ndimage import binary_erosion

    return mask ^ binary_erosion(mask)


def hd95(pred: np.ndarray, target: np.ndarray) -> float:
    """95th-percentile symmetric Hausdorff distance (pixels) between two 2-D boolean masks.

    0 if both are empty, NaN if exactly one is (MIRAGE's rule); else MONAI semantics.
    """
    from scipy.ndimage import distance_transform_edt

    a, b = np.asarray(pred, bool), np.asarray(target, bool)
    ea, eb = a.any(), b.any()
    if not ea and not eb:
        return 0.0
    if ea != eb:
        return float("nan")
    # Crop to the union's bounding box (+1 px so the transform sees the same neighbourhood).
    rows = np.flatnonzero((a | b).any(1))
    cols = np.flatnonzero((a | b).any(0))
    r0, r1 = max(rows[0] - 1, 0), min(rows[-1] + 2, a.shape[0])
    c0, c1 = max(cols[0] - 1, 0), min(cols[-1] + 2, a.shape[1])
    a, b = a[r0:r1, c0:c1], b[r0:r1, c0:c1]
    sa, sb = _surface(a), _surface(b)
    d_ab = distance_transform_edt(~sb)[sa]
    d_ba = distance_transform_edt(~sa)[sb]
    return float(max(np.percentile(d_ab, 95), np.percentile(d_ba, 95)))


def _class_kind(name: str) -> str:
    from mirage_edge.data.layout import SegClass

    return SegClass(0, 0, name).kind


def _resize_nearest(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    from mirage_edge.data.preprocess import resize_mask

    return resize_mask(mask, shape)


def segmentation_metrics(pred: Sequence[np.ndarray] | np.ndarray, target: Sequence[np.ndarray] | np.ndarray,
                         volume_ids: Sequence[str], classes: int | Sequence[str], ignore: Sequence[int] | None = (0,),
                         invalid: Sequence[int] = (), skip_empty: bool = False,
                         compute_hd95: bool = True) -> dict[str, Any]:
    """Per-volume Dice / IoU (3-D) and per-slice HD95 (2-D), MIRAGE style.

    pred, target: N masks H x W of class indices (list, or an N x H x W array); pred is resized
    (nearest) to the target size when they differ. volume_ids: N volume ids (slices of one id form
    a volume). classes: the number of classes or their names (names enable the layer / lesion
    split and `ignore=None`, which drops background-like labels as MIRAGE: "bg", "background",
    "above ilm"). ignore: class indices not scored. invalid: classes whose ground-truth pixels are
    copied into the prediction and not scored.

    Returns {"dice", "iou", "hd95": means over (volume, class) rows; "per_class": {name: {...}};
    "groups": {"layer": {...}, "lesion": {...}} (only when both kinds are scored);
    "per_volume": [{"volume", "class", "name", "kind", "dice", "iou", "hd95", "slices"}, ...];
    "num_volumes", "classes"}.
    """
    preds = list(pred)
    targets = list(target)
    vols = [str(v) for v in volume_ids]
    if not (len(preds) == len(targets) == len(vols)):
        raise InputError(f"pred ({len(preds)}), target ({len(targets)}) and volume_ids ({len(vols)}) "
                         "must have the same length")
    if not preds:
        raise InputError("segmentation_metrics needs at least one slice")
    names = [f"class {i}" for i in range(classes)] if isinstance(classes, int) else [str(c) for c in classes]
    k = len(names)
    kinds = [_class_kind(n) if not isinstance(classes, int) else "layer" for n in names]
    if ignore is None:
        ignore = [i for i, kd in enumerate(kinds) if kd in ("background", "invalid")]
    skip = set(int(i) for i in ignore) | set(int(i) for i in invalid)
    scored = [c for c in range(k) if c not in skip]
    if not scored:
        raise InputError("no class left to score after ignore/invalid")

    by_vol: dict[str, list[int]] = {}
    for i, v in enumerate(vols):
        by_vol.setdefault(v, []).append(i)

    rows: list[dict[str, Any]] = []
    for v, idx in by_vol.items():
        conf = np.zeros((k, k), dtype=np.int64)  # [target, pred]
        hd_slices: dict[int, list[float]] = {c: [] for c in scored}
        for i in idx:
            t = np.asarray(targets[i]).astype(np.int64)
            p = np.asarray(preds[i]).astype(np.int64)
            if t.ndim != 2:
                raise InputError(f"target slice {i} must be H x W, got shape {t.shape}")
            if p.shape != t.shape:
                if p.ndim != 2:
                    raise InputError(f"pred slice {i} must be H x W, got shape {p.shape}")
                p = _resize_nearest(p, t.shape)
            if t.min() < 0 or t.max() >= k or p.min() < 0 or p.max() >= k:
                raise InputError(f"slice {i} (volume {v}) has class indices outside 0..{k - 1}")
            if invalid:
                inv = np.isin(t, list(invalid))
                p = np.where(inv, t, p)
            conf += np.bincount((t * k + p).ravel(), minlength=k * k).reshape(k, k)
            if compute_hd95:
                for c in scored:
                    hd_slices[c].append(hd95(p == c, t == c))
        for c in scored:
            inter = conf[c, c]
            size_t, size_p = conf[c, :].sum(), conf[:, c].sum()
            empty = size_t == 0 and size_p == 0
            dice = 2 * inter / (size_t + size_p + _EPS)
            iou = inter / (size_t + size_p - inter + _EPS)
            if skip_empty and empty:
                dice = iou = float("nan")
            hs = np.asarray(hd_slices[c], dtype=np.float64) if compute_hd95 else np.array([np.nan])
            hd = float(np.nanmean(hs)) if np.isfinite(hs).any() else float("nan")
            rows.append({"volume": v, "class": c, "name": names[c], "kind": kinds[c], "dice": float(dice),
                         "iou": float(iou), "hd95": hd, "slices": len(idx)})

    def agg(sel: list[dict[str, Any]]) -> dict[str, float]:
        out = {}
        for key in ("dice", "iou", "hd95"):
            vals = np.array([r[key] for r in sel], dtype=np.float64)
            out[key] = float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")
        return out

    result: dict[str, Any] = agg(rows)
    result["per_class"] = {names[c]: agg([r for r in rows if r["class"] == c]) for c in scored}
    groups = {kd: [r for r in rows if r["kind"] == kd] for kd in ("layer", "lesion")}
    if all(groups.values()):
        result["groups"] = {kd: agg(rs) for kd, rs in groups.items()}
    result["per_volume"] = rows
    result["num_volumes"] = len(by_vol)
    result["classes"] = [names[c] for c in scored]
    return result


def mask_dice(pred: np.ndarray, ref: np.ndarray, n_classes: int | None = None, background: int = 0) -> float:
    """Agreement of two label maps (any shape, e.g. N x H x W): mean Dice over the foreground classes
    present in either, pooled over all pixels (1.0 if none present). Used for student-vs-teacher and
    artifact-vs-torch agreement; `segmentation_metrics` is the per-volume benchmark metric."""
    pred = np.asarray(pred).astype(np.int64)
    ref = np.asarray(ref).astype(np.int64)
    n = int(n_classes or max(int(pred.max(initial=0)), int(ref.max(initial=0))) + 1)
    scores = []
    for c in range(n):
        if c == background:
            continue
        p, r = pred == c, ref == c
        denom = int(p.sum() + r.sum())
        if denom == 0:
            continue
        scores.append(2.0 * float(np.logical_and(p, r).sum()) / denom)
    return float(np.mean(scores)) if scores else 1.0


# --- uncertainty and paired comparisons ---------------------------------------------------------
def scored_classes(classes: int | Sequence[str], ignore: Sequence[int] | None = (0,)) -> list[int]:
    """Class indices `segmentation_metrics` scores (same rules: `ignore=None` drops background-like names)."""
    names = [f"class {i}" for i in range(classes)] if isinstance(classes, int) else [str(c) for c in classes]
    if ignore is None:
        ignore = [i for i, n in enumerate(names)
                  if not isinstance(classes, int) and _class_kind(n) in ("background", "invalid")]
    return [c for c in range(len(names)) if c not in set(int(i) for i in ignore)]


def _dice_counts(pred: np.ndarray, target: np.ndarray, scored: Sequence[int]) -> np.ndarray:
    """pred, target N x H x W -> N x C x 3 (intersection, |pred|, |target|) per slice and scored class."""
    out = np.empty((len(pred), len(scored), 3), dtype=np.float64)
    for j, c in enumerate(scored):
        p, t = pred == c, target == c
        out[:, j, 0] = np.logical_and(p, t).reshape(len(p), -1).sum(1)
        out[:, j, 1] = p.reshape(len(p), -1).sum(1)
        out[:, j, 2] = t.reshape(len(t), -1).sum(1)
    return out


def _resample_weights(volume_ids: Sequence[str], n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """n_boot x N bootstrap counts, drawn within each volume (stratified: every volume keeps its size)."""
    vols = np.asarray([str(v) for v in volume_ids])
    w = np.zeros((n_boot, len(vols)))
    for v in dict.fromkeys(vols):
        idx = np.flatnonzero(vols == v)
        w[:, idx] = rng.multinomial(len(idx), np.full(len(idx), 1.0 / len(idx)), size=n_boot)
    return w


def _volume_dice(counts: np.ndarray, volume_ids: Sequence[str], w: np.ndarray) -> np.ndarray:
    """Mean per-(volume, class) Dice for each weight row: counts N x C x 3, w R x N -> R."""
    vols = np.asarray([str(v) for v in volume_ids])
    rows = []
    for v in dict.fromkeys(vols):
        idx = np.flatnonzero(vols == v)
        s = np.einsum("rn,ncx->rcx", w[:, idx], counts[idx])  # R x C x 3
        rows.append(2 * s[..., 0] / (s[..., 1] + s[..., 2] + _EPS))
    return np.concatenate(rows, axis=1).mean(1)


def paired_bootstrap(task: str, pred_a: np.ndarray, pred_b: np.ndarray, target: np.ndarray,
                     volume_ids: Sequence[str] | None = None, classes: int | Sequence[str] = 2,
                     ignore: Sequence[int] | None = (0,), n_boot: int = 2000, seed: int = 0,
                     level: float = 0.95) -> dict[str, Any]:
    """Headline metric of A and B and of A - B, with percentile bootstrap CIs (paired: one resample
    of the test images scores both models).

    task "segmentation": pred_a, pred_b, target N x H x W class maps; the metric is
    `segmentation_metrics`' mean per-volume Dice (no HD95), B-scans resampled within their volume
    (every resample keeps each volume's slice count). task "classification": pred_* N predicted
    labels, target N labels; the metric is balanced accuracy over the classes present.

    Returns {"a", "b", "diff": point estimates; "a_ci", "b_ci", "diff_ci": [lo, hi];
    "n_boot", "level", "unit": "B-scan" | "image"}.
    """
    rng = np.random.default_rng(seed)
    if task == "segmentation" and isinstance(target, (list, tuple)):
        # masks at their own sizes (a test set's native resolution): each prediction resized to its mask
        if not (len(pred_a) == len(pred_b) == len(target)):
            raise InputError(f"paired_bootstrap needs as many predictions as targets, got {len(pred_a)}, "
                             f"{len(pred_b)}, {len(target)}")
    else:
        pred_a, pred_b, target = np.asarray(pred_a), np.asarray(pred_b), np.asarray(target)
        if not (pred_a.shape == pred_b.shape == target.shape):
            raise InputError(f"paired_bootstrap needs equal shapes, got {pred_a.shape}, {pred_b.shape}, "
                             f"{target.shape}")
    n = len(target)
    if task == "segmentation":
        vols = list(volume_ids) if volume_ids is not None else ["0"] * n
        scored = scored_classes(classes, ignore)
        w = np.vstack([np.ones((1, n)), _resample_weights(vols, n_boot, rng)])

        def counts(pred: Any) -> np.ndarray:
            if not isinstance(target, (list, tuple)):
                return _dice_counts(pred, target, scored)
            return np.concatenate([_dice_counts(_resize_nearest(np.asarray(p), np.shape(t))[None],
                                                np.asarray(t)[None], scored) for p, t in zip(pred, target)])

        ca, cb = counts(pred_a), counts(pred_b)
        va, vb = _volume_dice(ca, vols, w), _volume_dice(cb, vols, w)
        unit = "B-scan"
    elif task == "classification":
        classes_present = np.unique(target)
        w = np.vstack([np.ones((1, n)), rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot)])

        def bacc(pred: np.ndarray) -> np.ndarray:
            recalls = []
            for c in classes_present:
                m = target == c
                tot = w[:, m].sum(1)
                recalls.append(np.where(tot > 0, (w[:, m] * (pred[m] == c)).sum(1) / np.maximum(tot, 1), np.nan))
            return np.nanmean(np.stack(recalls, 1), axis=1)

        va, vb = bacc(pred_a), bacc(pred_b)
        unit = "image"
    else:
        raise InputError(f"paired_bootstrap: task must be segmentation or classification, got {task!r}")
    return _bootstrap_result(va, vb, n_boot, level, unit)


def _bootstrap_result(va: np.ndarray, vb: np.ndarray, n_boot: int, level: float, unit: str) -> dict[str, Any]:
    """Point estimates (row 0) and percentile CIs (the resamples) of A, B and A - B."""
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]

    def ci(v: np.ndarray) -> list[float]:
        return [float(x) for x in np.percentile(v[1:], q)]

    d = va - vb
    return {"a": float(va[0]), "b": float(vb[0]), "diff": float(d[0]), "a_ci": ci(va), "b_ci": ci(vb),
            "diff_ci": ci(d), "n_boot": n_boot, "level": level, "unit": unit}


def presence_auroc(probs: np.ndarray, target: np.ndarray, classes: Sequence[int]) -> dict[int, float]:
    """Per-B-scan presence AUROC for each class: score = the class's highest pixel probability in the
    slice, positive = the class occurs in the slice's ground truth. probs N x K x H x W, target N x H x W
    or a list of N masks at their own sizes (presence read at full resolution, where a few-pixel lesion
    still exists). A class present in every slice or in none gets no entry (AUROC undefined)."""
    from sklearn.metrics import roc_auc_score

    out = {}
    for c in classes:
        y = np.array([bool((np.asarray(t) == c).any()) for t in target])
        if y.all() or not y.any():
            continue
        out[int(c)] = float(roc_auc_score(y, probs[:, c].reshape(len(probs), -1).max(1)))
    return out


__all__ = ["classification_metrics", "segmentation_metrics", "hd95", "mask_dice", "scored_classes",
           "paired_bootstrap", "presence_auroc"]
