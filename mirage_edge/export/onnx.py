"""ONNX export: fp32 graph (torch.onnx), onnxslim, fp16 conversion, INT8 (QAT Q/DQ or PTQ).

INT8 follows DESIGN §6: explicit Q/DQ. From a fake-quantized (QAT) model the quantizers are
exported as QuantizeLinear/DequantizeLinear pairs; otherwise post-training quantization with ONNX
Runtime's static QDQ quantizer restricted to MatMul/Gemm/Conv (U8S8, per-channel weights; all-op
static INT8 wrecks ViT attention) or with NNCF. What stays in float is counted into the metadata.
"""
from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from mirage_edge._deps import require
from mirage_edge.artifact import METADATA_KEY, QuantizationInfo
from mirage_edge.errors import ExportError
from mirage_edge.export.target import ExportTarget, QuantConfig
from mirage_edge.export.wrap import ExportPlan
from mirage_edge.models.quantized import INT8_ONNX_KERNELS, qdq_export_mode, qdq_summary

OUTPUT_NAMES = {"logits": "logits", "mask": "mask", "features": "features"}
_QDQ = ("QuantizeLinear", "DequantizeLinear")
# ONNX protos above this size need external data; we keep artifacts single-file below it.
_SINGLE_FILE_LIMIT = 1_900_000_000


def io_names(plan: ExportPlan) -> tuple[list[str], list[str]]:
    return list(plan.modalities), [OUTPUT_NAMES[plan.output_kind]]


def dynamic_axes(plan: ExportPlan, target: ExportTarget) -> dict[str, dict[int, str]]:
    """{tensor name: {axis: symbol}} for the batch axis and, if asked, H/W."""
    ins, outs = io_names(plan)
    axes: dict[str, dict[int, str]] = {}
    for name in ins:
        a: dict[int, str] = {}
        if target.batch.dynamic:
            a[0] = "batch"
        if target.dynamic_hw:
            a.update({2: f"{name}_height", 3: f"{name}_width"})
        if a:
            axes[name] = a
    if target.batch.dynamic:
        axes[outs[0]] = {0: "batch"}
    if target.dynamic_hw and plan.task == "segmentation":
        hw = {1: "height", 2: "width"} if plan.output_kind == "mask" else {2: "height", 3: "width"}
        axes.setdefault(outs[0], {}).update(hw)
    return axes


def export_torch_to_onnx(plan: ExportPlan, path: Path, target: ExportTarget) -> dict[str, Any]:
    """torch -> ONNX (opset >= 17), dynamic batch, simplified. Returns build facts for metadata.

    Fake-quantized models go through the TorchScript exporter (it maps fake-quant to Q/DQ);
    others use the dynamo exporter first and fall back to TorchScript.
    """
    torch = require("torch", "ONNX export")
    onnx = require("onnx", "ONNX export")
    ins, outs = io_names(plan)
    axes = dynamic_axes(plan, target)
    # Batch 2 example: torch.export specialises size-1 dims, which would pin the batch axis.
    example = plan.example_inputs(batch=2 if target.batch.dynamic else target.batch.opt)
    if plan.fake_quantized:
        order = ["torchscript"]
    elif target.exporter == "auto":
        order = ["dynamo", "torchscript"]
    else:
        order = [target.exporter]
    errors: list[str] = []
    for exporter in order:
        try:
            if path.exists():
                path.unlink()
            with warnings.catch_warnings(), torch.no_grad(), qdq_export_mode(plan.wrapper):
                warnings.simplefilter("ignore")
                if exporter == "dynamo":
                    torch.onnx.export(plan.wrapper, example, str(path), dynamo=True, opset_version=target.opset,
                                      input_names=ins, output_names=outs,
                                      dynamic_shapes=_dynamic_shapes(torch, axes, ins, target),
                                      external_data=False, verbose=False)
                else:
                    torch.onnx.export(plan.wrapper, example, str(path), dynamo=False,
                                      opset_version=min(max(target.opset, 17), 20), input_names=ins,
                                      output_names=outs, dynamic_axes=axes or None, do_constant_folding=True)
            model = onnx.load(str(path))
            onnx.checker.check_model(model)
            break
        except Exception as exc:  # noqa: BLE001 - collect and try the next exporter
            errors.append(f"{exporter}: {type(exc).__name__}: {str(exc)[:400]}")
    else:
        raise ExportError("ONNX export failed with every exporter: " + " | ".join(errors))
    _name_dynamic_dims(model, axes)
    onnx.save(model, str(path))
    info: dict[str, Any] = {"exporter": exporter, "opset": _opset(model), "exporter_fallbacks": errors}
    if target.simplify:
        info["simplified"] = _slim(path, info)
    return info


def _dynamic_shapes(torch: Any, axes: dict[str, dict[int, str]], ins: list[str], target: ExportTarget) -> Any:
    """torch.export dynamic_shapes for the wrapper's `*xs` (one dim spec per input, or None)."""
    if not any(axes.get(n) for n in ins):
        return None
    dims: dict[str, Any] = {}

    def dim(sym: str) -> Any:
        if sym not in dims:
            hi = max(target.batch.max, 2) if sym == "batch" else 8192
            dims[sym] = torch.export.Dim(sym, min=1, max=hi) if sym == "batch" else torch.export.Dim.DYNAMIC
        return dims[sym]

    return {"xs": tuple({ax: dim(sym) for ax, sym in axes.get(n, {}).items()} or None for n in ins)}


def _name_dynamic_dims(model: Any, axes: dict[str, dict[int, str]]) -> None:
    """Give graph inputs/outputs our symbolic dim names (dynamo names them s0, s1, ...)."""
    for value in [*model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        for ax, sym in axes.get(value.name, {}).items():
            if ax < len(dims) and not dims[ax].HasField("dim_value"):
                dims[ax].dim_param = sym


def _opset(model: Any) -> int:
    return int(next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0))


def _slim(path: Path, info: dict[str, Any]) -> bool:
    """Simplify with onnxslim in place (constant folding, dead nodes); keep the original on failure."""
    onnx = require("onnx", "ONNX export")
    onnxslim = require("onnxslim", "ONNX graph simplification")
    model = onnx.load(str(path))
    before = len(model.graph.node)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            slim = onnxslim.slim(model)
        onnx.checker.check_model(slim)
    except Exception as exc:  # noqa: BLE001 - simplification is an optimisation, never fatal
        info["simplify_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        return False
    onnx.save(slim, str(path))
    info["nodes_before_simplify"], info["nodes"] = before, len(slim.graph.node)
    return True


def convert_fp16(src: Path, dst: Path) -> dict[str, Any]:
    """fp32 ONNX -> fp16 weights/compute with float32 inputs/outputs (cast at the edges)."""
    onnx = require("onnx", "ONNX fp16 conversion")
    require("onnxruntime", "ONNX fp16 conversion")
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        half = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=False)
    onnx.save(half, str(dst))
    return {"fp16_converter": "onnxruntime.transformers.float16 (keep_io_types)"}


def quantize_ort(src: Path, dst: Path, calib: list[dict[str, np.ndarray]], q: QuantConfig,
                 work_dir: Path) -> QuantizationInfo:
    """Static QDQ PTQ with ONNX Runtime over `calib` feeds (one dict of N x 1 x H x W per batch)."""
    require("onnxruntime", "INT8 quantization")
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    notes = []
    pre = work_dir / "pre_quant.onnx"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=False)
    except Exception as exc:  # noqa: BLE001 - pre-processing is optional (fails on some graphs)
        notes.append(f"quant_pre_process failed ({type(exc).__name__}); quantized the raw export")
        pre = src

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(calib)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    extra = {"ActivationSymmetric": bool(q.symmetric_activations), "WeightSymmetric": True}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_static(
                str(pre), str(dst), _Reader(), quant_format=QuantFormat.QDQ, per_channel=q.per_channel,
                op_types_to_quantize=list(q.op_types) or None,
                activation_type=getattr(QuantType, q.activation_type), weight_type=getattr(QuantType, q.weight_type),
                calibrate_method=getattr(CalibrationMethod, q.calibration_method), extra_options=extra,
                nodes_to_exclude=_match_nodes(pre, q.ignored_patterns),
            )
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"ONNX Runtime static quantization of {src.name} failed: {exc}") from exc
    quantized, floating = qdq_summary(dst)
    return QuantizationInfo(
        method="ort-static-qdq", calibration_images=sum(next(iter(f.values())).shape[0] for f in calib),
        op_types_quantized=list(q.op_types), float_ops=floating, quantized_ops=quantized,
        activation_type=q.activation_type, weight_type=q.weight_type, per_channel=q.per_channel,
        symmetric_activations=q.symmetric_activations, calibration_method=q.calibration_method, notes=notes,
    )


def quantize_nncf_onnx(src: Path, dst: Path, calib: list[dict[str, np.ndarray]], q: QuantConfig,
                       transformer: bool) -> QuantizationInfo:
    """NNCF PTQ on the ONNX graph (produces Q/DQ)."""
    onnx = require("onnx", "INT8 quantization")
    nncf = require("nncf", "INT8 quantization")
    kw: dict[str, Any] = {"subset_size": sum(next(iter(f.values())).shape[0] for f in calib),
                          "fast_bias_correction": q.fast_bias_correction}
    if transformer:
        kw["model_type"] = nncf.ModelType.TRANSFORMER
    if q.ignored_patterns:
        kw["ignored_scope"] = nncf.IgnoredScope(patterns=list(q.ignored_patterns), validate=False)
    try:
        qm = nncf.quantize(onnx.load(str(src)), nncf.Dataset(calib), **kw)
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"NNCF quantization of {src.name} failed: {exc}") from exc
    onnx.save(qm, str(dst))
    quantized, floating = qdq_summary(dst)
    return QuantizationInfo(
        method="nncf-ptq", calibration_images=kw["subset_size"], op_types_quantized=sorted(quantized),
        float_ops=floating, quantized_ops=quantized, activation_type="QInt8/QUInt8 (NNCF preset)",
        weight_type="QInt8", per_channel=True, symmetric_activations=True, calibration_method="MinMax",
        model_type="transformer" if transformer else "default",
    )


def _match_nodes(path: Path, patterns: list[str]) -> list[str]:
    if not patterns:
        return []
    import re

    onnx = require("onnx", "INT8 quantization")
    names = [n.name for n in onnx.load(str(path), load_external_data=False).graph.node]
    return [n for n in names if any(re.search(p, n) for p in patterns)]


def count_quantization(path: Path, info: QuantizationInfo, counted_in: str) -> QuantizationInfo:
    """Fill `info`'s counts (quantizers, quantized / all compute ops, per-type tables) from the ONNX
    file at `path`: what the written graph holds, whatever the quantizer said it did."""
    onnx = require("onnx", "ONNX inspection")
    graph = onnx.load(str(path), load_external_data=False).graph
    quantized, floating = qdq_summary(path)
    info.quantized_ops, info.float_ops = quantized, floating
    info.quantizers = sum(n.op_type == "QuantizeLinear" for n in graph.node)
    info.compute_ops_quantized = sum(quantized.values())
    info.compute_ops_total = info.compute_ops_quantized + sum(v for k, v in floating.items() if k in INT8_ONNX_KERNELS)
    info.quantized_share = (info.compute_ops_quantized / info.compute_ops_total) if info.compute_ops_total else None
    info.counted_in = counted_in
    return info


def has_qdq(path: Path) -> bool:
    onnx = require("onnx", "ONNX inspection")
    return any(n.op_type in _QDQ for n in onnx.load(str(path), load_external_data=False).graph.node)


def embed_metadata(path: Path, meta_json: str) -> None:
    """Put the artifact metadata JSON into the model's metadata_props (key METADATA_KEY)."""
    onnx = require("onnx", "ONNX metadata")
    model = onnx.load(str(path))
    props = [p for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(props)
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, meta_json
    onnx.save(model, str(path))


def read_embedded_metadata(path: Path) -> str | None:
    onnx = require("onnx", "ONNX metadata")
    model = onnx.load(str(path), load_external_data=False)
    return next((p.value for p in model.metadata_props if p.key == METADATA_KEY), None)
