"""Artifact-vs-PyTorch parity (torch-free numbers): thresholds from the target's [validation] table.

fp32 / fp16: max-abs difference and cosine of the raw outputs. INT8: agreement on the task's
decision - top-1 agreement (classification), prediction Dice vs torch fp32 (segmentation),
feature cosine (encoders) - plus the task metric for torch and artifact when labels exist.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from mirage_edge.artifact import QuantizationInfo
from mirage_edge.errors import ValidationError
from mirage_edge.export.target import ValidationConfig
from mirage_edge.metrics import mask_dice


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    den = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b / den) if den > 0 else float(np.array_equal(a, b))


def min_row_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Worst per-token (B x N x D) or per-position (B x C x H x W) cosine."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.ndim == 4:
        a = a.transpose(0, 2, 3, 1)
        b = b.transpose(0, 2, 3, 1)
    a = a.reshape(-1, a.shape[-1])
    b = b.reshape(-1, b.shape[-1])
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    num = (a * b).sum(1)
    cos = np.where(den > 0, num / np.where(den > 0, den, 1.0), 1.0)
    return float(cos.min())


def parity_numbers(task: str, output_kind: str, ref: np.ndarray, got: np.ndarray,
                   n_classes: int = 0) -> dict[str, float]:
    """Agreement numbers between torch outputs `ref` and artifact outputs `got` (same shapes)."""
    if ref.shape != got.shape:
        raise ValidationError(f"artifact output shape {list(got.shape)} differs from torch {list(ref.shape)}",
                              {"torch_shape": list(ref.shape), "artifact_shape": list(got.shape)})
    out: dict[str, float] = {}
    if output_kind == "mask":
        out["pixel_agreement"] = float((ref == got).mean())
        out["dice_vs_torch"] = mask_dice(got, ref, n_classes)
        return out
    if not np.isfinite(got).all():
        out["non_finite"] = float((~np.isfinite(got)).sum())
        got = np.nan_to_num(got, nan=0.0, posinf=0.0, neginf=0.0)
    diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    out["max_abs"] = float(diff.max())
    out["mean_abs"] = float(diff.mean())
    out["cosine"] = cosine(ref, got)
    if task == "classification":
        out["top1_agreement"] = float((ref.argmax(1) == got.argmax(1)).mean())
    elif task == "segmentation":
        rm, gm = ref.argmax(1), got.argmax(1)
        out["pixel_agreement"] = float((rm == gm).mean())
        out["dice_vs_torch"] = mask_dice(gm, rm, n_classes)
    else:
        out["min_token_cosine"] = min_row_cosine(ref, got) if ref.ndim >= 3 else out["cosine"]
    return out


# Child process for `run_opencv`: load once, run every batch, save the first output of each.
_OPENCV_CHILD = """
import sys, numpy as np, cv2
model, feeds_path, out_path, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
if threads > 0:
    cv2.setNumThreads(threads)
feeds = np.load(feeds_path)
names = [str(s) for s in feeds["__names__"]]
net = cv2.dnn.readNetFromONNX(model)
print("loaded", flush=True)
outs = {}
for b in range(int(feeds["__n__"])):
    for name in names:
        net.setInput(np.ascontiguousarray(feeds[f"{b}/{name}"]), name)
    outs[f"out{b}"] = np.asarray(net.forward())
np.savez(out_path, **outs)
"""


def run_opencv(model: str | Path, batches: list[dict[str, np.ndarray]], *, threads: int = 0,
               timeout: float = 600.0, python: str | None = None) -> np.ndarray:
    """OpenCV DNN output of the ONNX file `model` on `batches` ({input name: array} each), concatenated.

    `cv2.dnn.readNetFromONNX` + `forward` run in a fresh interpreter (`python`, default this one), so
    an OpenCV crash (issue #23: SIGSEGV in the importer) is a RuntimeError naming the signal and the
    stage, not the death of the exporting process. `python` may name another environment's
    interpreter to check another OpenCV version (e.g. 4.x). Torch-free.
    """
    with tempfile.TemporaryDirectory(prefix="mirage-edge-opencv-") as tmp:
        feeds_path, out_path = os.path.join(tmp, "feeds.npz"), os.path.join(tmp, "out.npz")
        arrays = {f"{b}/{k}": np.ascontiguousarray(v) for b, feed in enumerate(batches)
                  for k, v in feed.items()}
        names = np.array(list(batches[0]) if batches else [])
        np.savez(feeds_path, __n__=np.array(len(batches)), __names__=names, **arrays)
        try:
            proc = subprocess.run([python or sys.executable, "-c", _OPENCV_CHILD, str(model), feeds_path,
                                   out_path, str(threads)], capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"OpenCV DNN timed out after {timeout:g} s on {Path(model).name}") from exc
        if proc.returncode != 0:
            stage = "setInput/forward" if "loaded" in proc.stdout else "readNetFromONNX"
            if proc.returncode < 0:
                try:
                    sig = signal.Signals(-proc.returncode).name
                except ValueError:
                    sig = f"signal {-proc.returncode}"
                why = f"crashed ({sig}) in {stage}"
            else:
                lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
                err = next((ln for ln in reversed(lines) if "error:" in ln), lines[-1] if lines else "")
                why = f"failed in {stage}: {err[:300]}"
            raise RuntimeError(f"OpenCV DNN {why} [{Path(model).name}]")
        with np.load(out_path) as z:
            return np.concatenate([z[f"out{b}"] for b in range(len(batches))])


def task_metric(task: str, output_kind: str, outputs: np.ndarray, labels: np.ndarray,
                classes: list[str], volumes: list[str] | None = None) -> dict[str, float]:
    """The benchmark metric against labels, via `mirage_edge.metrics` (MIRAGE's definitions).

    classification: balanced accuracy (first key, used for the drop check) and accuracy;
    segmentation: mean per-volume foreground Dice. Returns {} when the metric is undefined.
    """
    from mirage_edge.metrics import classification_metrics, segmentation_metrics

    if task == "classification":
        z = outputs - outputs.max(axis=1, keepdims=True)
        probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        m = classification_metrics(labels, probs, num_classes=len(classes))
        return {"bacc": float(m["bacc"]), "accuracy": float(m["accuracy"])}
    masks = outputs if output_kind == "mask" else outputs.argmax(1)
    vols = volumes if volumes is not None else [str(i) for i in range(len(masks))]
    m = segmentation_metrics(list(masks), list(labels), vols, len(classes), compute_hd95=False)
    return {"dice": float(m["dice"])}


def check(numbers: dict[str, Any], task: str, output_kind: str, precision: str, cfg: ValidationConfig,
          what: str) -> None:
    """Raise ValidationError listing every failed threshold (and all the numbers)."""
    fails: list[str] = []

    def need(key: str, op: str, limit: float) -> None:
        if key not in numbers:
            return
        v = float(numbers[key])
        ok = v <= limit if op == "<=" else v >= limit
        if not ok or not np.isfinite(v):
            fails.append(f"{key} = {v:.6g} (needs {op} {limit:g})")

    if "non_finite" in numbers:
        fails.append(f"{int(numbers['non_finite'])} non-finite output values")
    if output_kind == "mask":
        if precision == "int8":
            need("dice_vs_torch", ">=", cfg.int8_min_dice)
        else:
            need("pixel_agreement", ">=", 0.999)
    elif precision in ("fp32", "fp16"):
        need("max_abs", "<=", cfg.fp32_max_abs if precision == "fp32" else cfg.fp16_max_abs)
        need("cosine", ">=", cfg.fp32_min_cosine if precision == "fp32" else cfg.fp16_min_cosine)
    elif task == "classification":
        need("top1_agreement", ">=", cfg.int8_min_top1_agreement)
    elif task == "segmentation":
        need("dice_vs_torch", ">=", cfg.int8_min_dice)
    else:
        need("cosine", ">=", cfg.int8_min_cosine)
    if "metric_drop" in numbers:
        need("metric_drop", "<=", cfg.max_metric_drop)
    if fails:
        raise ValidationError(f"{what} failed validation against PyTorch: " + "; ".join(fails), numbers)


def check_quantized(info: QuantizationInfo | None, cfg: ValidationConfig, what: str,
                    reference: tuple[int, str] | None = None) -> None:
    """Fail an INT8 artifact whose written file is not really quantized.

    `info` holds the counts taken from the written file (`count_quantization`); `reference` is
    (quantized compute ops, where) of the model's own Q/DQ graph - a QAT student's distill-time
    ONNX - which the artifact must match: fewer means quantizers were lost on the way.
    """
    if info is None:
        raise ValidationError(f"{what} is labelled int8 but has no quantization record", {})
    numbers = {"quantizers": info.quantizers, "compute_ops_quantized": info.compute_ops_quantized,
               "compute_ops_total": info.compute_ops_total, "quantized_share": info.quantized_share}
    fails = []
    if info.quantizers == 0 or info.compute_ops_quantized == 0:
        fails.append(f"{info.counted_in or 'the model file'} has {info.quantizers} quantizers and "
                     f"{info.compute_ops_quantized} of {info.compute_ops_total} compute ops quantized")
    elif info.quantized_share is not None and info.quantized_share < cfg.int8_min_quantized_share:
        fails.append(f"only {info.compute_ops_quantized} of {info.compute_ops_total} compute ops are quantized "
                     f"(share {info.quantized_share:.2f}, needs >= {cfg.int8_min_quantized_share:g})")
    if reference is not None and info.compute_ops_quantized < reference[0]:
        numbers["reference_compute_ops_quantized"] = reference[0]
        fails.append(f"{info.compute_ops_quantized} compute ops quantized where {reference[1]} has {reference[0]}")
    if fails:
        raise ValidationError(f"{what} is labelled int8 but is not quantized as it should be: " + "; ".join(fails),
                              numbers)
