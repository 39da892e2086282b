"""The QAT stage of `distill`: NNCF fake-quant INT8 trained with the FP32 student as KD teacher.

Task students are trained on logit KD from the FP32 student (by default only that, so the INT8
model reproduces the FP32 one; `qat.alpha` < 1 / `qat.dice` > 0 add CE / generalized Dice on the
labels), encoder-only students on feature matching against the FP32 student's tokens. The result
is saved as a student checkpoint (with NNCF's quantizer config, so `load_student` rebuilds it) and
exported to an explicit Q/DQ ONNX graph whose ONNX Runtime output is checked against the torch
fake-quant model.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from mirage_edge.distill import evaluate as ev
from mirage_edge.distill.data import DistillSamples
from mirage_edge.distill.losses import feature_loss, task_kd_loss
from mirage_edge.distill.qat import export_qdq_onnx, ort_predict, ort_session, prepare_qat, qat_config
from mirage_edge.distill.recipe import DistillRecipe, TaskLossConfig
from mirage_edge.distill.stage import run_stage
from mirage_edge.distill.student_io import save_qat_student
from mirage_edge.train import distributed as D
from mirage_edge.train.checkpoint import unwrap


def run_qat(fp32: nn.Module, train: DistillSamples, task: str | None, recipe: DistillRecipe, out: Path,
            resume: bool, meta: dict[str, Any], log: Callable[[str], None], stage: str = "qat",
            out_name: str = "student_int8") -> tuple[Path, Path, dict[str, Any]]:
    """Prepare, train, save and export the INT8 student (stage run folder `out/stage`, checkpoint
    `out/out_name`). Returns (checkpoint dir, onnx path, info)."""
    spec = recipe.qat
    is_task = hasattr(fp32, "head") and task is not None
    kd_teacher = copy.deepcopy(fp32).eval().requires_grad_(False)
    n_batches = max(1, math.ceil(spec.subset_size / spec.batch_size))
    calib = [b["bscan"] for _, b in zip(range(n_batches), ev.batches(train, spec.batch_size))]
    qmodel, info = prepare_qat(copy.deepcopy(fp32), calib, spec)
    log(f"{stage}: {info['num_quantizers']} NNCF quantizers (model_type {spec.model_type}, "
        f"float ops {spec.ignored_types or 'none'})")
    short = "seg" if task == "segmentation" else "cls"
    tcfg = TaskLossConfig(alpha=spec.alpha, temperature=spec.temperature, dice=spec.dice)

    def loss_q(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        if spec.eval_mode:
            model.eval()  # idempotent; the trainer switches to train() at the start and after evaluations
        x = batch["bscan"]
        with torch.no_grad():
            ref = kd_teacher(x)
        pred = model(x)
        if is_task:
            return task_kd_loss(pred, ref, batch.get("label"), short, tcfg)
        return feature_loss(pred, ref, recipe.stage1.loss)

    summary = run_stage(stage, qmodel, loss_q, train, spec, recipe, out, resume, log,
                        recalibrate_bn=not spec.eval_mode)
    qmodel = unwrap(qmodel).eval()
    qdir = out / out_name
    onnx_path = qdir / "model.onnx"

    def export() -> dict[str, Any]:  # rank 0 writes the checkpoint and the graph; the others wait
        qdir.mkdir(parents=True, exist_ok=True)
        counts = export_qdq_onnx(qmodel, onnx_path, torch.zeros(1, 1, *recipe.data.hw), opset=spec.onnx_opset)
        # parity: ONNX Runtime INT8 graph vs the torch fake-quant model on real inputs
        x = calib[0][:4]
        with torch.no_grad():
            ref = qmodel(x).float()
        got = next(ort_predict(ort_session(onnx_path, recipe.run.threads), [x]))
        scale = float(ref.abs().max()) or 1.0
        diff = float((got - ref).abs().max())
        parity = {"max_abs_diff": diff, "rel_to_max": diff / scale}
        if is_task:
            parity["argmax_agreement"] = float((got.argmax(1) == ref.argmax(1)).float().mean())
        qinfo = {**info, "nncf_config": qat_config(qmodel),
                 "onnx_ops": {k: counts[k] for k in ("QuantizeLinear", "DequantizeLinear", "compute_ops_quantized")},
                 "ort_parity": parity}
        save_qat_student(qmodel, fp32, qdir, qinfo, meta)
        log(f"{stage}: INT8 student saved to {qdir}; Q/DQ ONNX {onnx_path} "
            f"({counts.get('QuantizeLinear')} QuantizeLinear), ORT vs torch max |diff| {diff:.3g}")
        return {k: v for k, v in qinfo.items() if k != "nncf_config"}

    return qdir, onnx_path, {**summary, **D.on_main(export)}


__all__ = ["run_qat"]
