"""ONNX export: fp32 graph (torch.onnx), onnxslim, fp16 conversion, INT8 (QAT Q/DQ or PTQ).

INT8 follows DESIGN §6: explicit Q/DQ. From a fake-quantized (QAT) model the quantizers are
exported as QuantizeLinear/DequantizeLinear pairs; otherwise post-training quantization with ONNX
Runtime's static QDQ quantizer restricted to MatMul/Gemm/Conv (U8S8, per-channel weights; all-op
static INT8 wrecks ViT attention) or with NNCF. What stays in float is counted into the metadata.
"""
from __future__ import annotations

import warnings
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
            onnx.checker.check_model(model, full_check=True)
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
    rewrites = finalize_onnx(path)
    if rewrites:
        info["graph_rewrites"] = rewrites
    return info


# Ops the fp16 conversion keeps in float32 (on top of ORT's default block list).
_FP16_KEEP_FLOAT = ("LayerNormalization",)


def finalize_onnx(path: Path, *, uint8_activations: bool = False) -> dict[str, int]:
    """Normalise the ONNX file at `path` in place (`normalize_graph`) and run the full checker on it.

    Every ONNX file export writes goes through here (fp32/QAT graph, fp16, PTQ INT8), so each one
    passes `onnx.checker.check_model(full_check=True)` and loads in ONNX Runtime, OpenVINO and
    OpenCV DNN. `uint8_activations` only for files that become ONNX artifacts (never for a graph
    TensorRT builds from). Returns the rewrite counts (empty when nothing changed).
    """
    onnx = require("onnx", "ONNX export")
    model = onnx.load(str(path))
    done = normalize_graph(model, uint8_activations=uint8_activations)
    if done:
        onnx.save(model, str(path))
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # noqa: BLE001 - onnx raises ValidationError / InferenceError
        raise ExportError(f"{path.name} fails the ONNX checker (full check): {type(exc).__name__}: "
                          f"{str(exc)[:400]}") from exc
    return done


def normalize_graph(model: Any, *, uint8_activations: bool = False) -> dict[str, int]:
    """Runtime-portability rewrites, in place, that keep the computed function; returns the counts.

    gelu_canonicalized: dynamo's exact GELU `x * (0.5 * (1 + erf(x / sqrt2)))` becomes
        `(x * (1 + erf(x / sqrt2))) * 0.5` (TorchScript's form; bit-identical, x0.5 is exact).
        OpenCV DNN's GELU fusion half-matches the first form and then reads a constant out of a
        non-constant node: SIGSEGV in cv2.dnn.readNetFromONNX (issue #23). ORT and OpenVINO fuse
        the second form into their GELU kernels.
    gemm_bias_float: a Gemm bias fed by an int32 DequantizeLinear (ORT QDQ PTQ) becomes its float32
        value: OpenCV DNN fails "bufidx >= 0 in argTensor" on the int32 form; ORT still fuses QGemm.
    activations_to_uint8 (only if `uint8_activations`): in a graph that mixes int8 and uint8
        activation quantizers (NNCF PTQ / QAT: uint8 after ReLU, int8 elsewhere), the int8 Q/DQ
        pairs become uint8 with zero point + 128 (same function; bit-identical in ORT and
        OpenVINO). OpenCV 5.x cannot run a quantized op whose input and output activations differ
        in signedness ("inputs[0] == inputs[2]" in DequantizeLinear). Single-type graphs untouched.
    nodes_sorted: nodes moved to restore topological order (ORT's fp16 converter breaks it).
    nodes_named: unnamed nodes given unique names.
    """
    done = {"gelu_canonicalized": _canonicalize_gelu(model), "gemm_bias_float": _float_gemm_bias(model),
            "activations_to_uint8": _uint8_activations(model) if uint8_activations else 0,
            "nodes_sorted": _topo_sort(model),
            "nodes_named": _name_nodes(model)}
    return {k: v for k, v in done.items() if v}


def _constants(graph: Any) -> dict[str, Any]:
    """name -> TensorProto for initializers and Constant(value=...) nodes."""
    out = {i.name: i for i in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value":
            out[n.output[0]] = n.attribute[0].t
    return out


def _scalar(name: str, consts: dict[str, Any]) -> float | None:
    from onnx import numpy_helper

    t = consts.get(name)
    if t is None:
        return None
    a = numpy_helper.to_array(t)
    return float(a.reshape(-1)[0]) if a.size == 1 and a.dtype.kind == "f" else None


def _consumers(graph: Any) -> dict[str, list[Any]]:
    """tensor name -> the nodes that read it."""
    out: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def _canonicalize_gelu(model: Any) -> int:
    g = model.graph
    consts = _constants(g)
    producer = {o: n for n in g.node for o in n.output}
    consumers = _consumers(g)
    graph_outputs = {o.name for o in g.output}

    def sole(name: str, op: str) -> Any:
        users = consumers.get(name, [])
        ok = len(users) == 1 and users[0].op_type == op and name not in graph_outputs
        return users[0] if ok else None

    def other(node: Any, name: str) -> str | None:
        ins = list(node.input)
        return ins[1 - ins.index(name)] if len(ins) == 2 and name in ins else None

    def near(v: float | None, want: float) -> bool:
        return v is not None and abs(v - want) <= 1e-6 * max(1.0, abs(want))

    count = 0
    for erf in [n for n in g.node if n.op_type == "Erf"]:
        div = producer.get(erf.input[0])
        if div is None or div.op_type != "Div" or not near(_scalar(div.input[1], consts), 2 ** 0.5):
            continue
        x = div.input[0]
        add = sole(erf.output[0], "Add")
        if add is None or not near(_scalar(other(add, erf.output[0]) or "", consts), 1.0):
            continue
        half_mul = sole(add.output[0], "Mul")
        half = other(half_mul, add.output[0]) if half_mul is not None else None
        if half is None or not near(_scalar(half, consts), 0.5):
            continue
        outer = sole(half_mul.output[0], "Mul")
        if outer is None or other(outer, half_mul.output[0]) != x:
            continue
        # 0.5 * a -> x * a ; x * m -> m * 0.5 (output names and shapes unchanged)
        del half_mul.input[:]
        half_mul.input.extend([x, add.output[0]])
        del outer.input[:]
        outer.input.extend([half_mul.output[0], half])
        count += 1
    return count


def _float_gemm_bias(model: Any) -> int:
    from onnx import numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    count = 0
    for n in g.node:
        if n.op_type != "Gemm" or len(n.input) < 3 or not n.input[2]:
            continue
        dq = producer.get(n.input[2])
        if dq is None or dq.op_type != "DequantizeLinear" or not all(i in inits for i in dq.input if i):
            continue
        q = numpy_helper.to_array(inits[dq.input[0]])
        if q.dtype != np.int32 or q.ndim != 1:
            continue
        scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64)
        has_zero = len(dq.input) > 2 and dq.input[2]
        zero = numpy_helper.to_array(inits[dq.input[2]]).astype(np.int64) if has_zero else 0
        name = f"{dq.output[0]}_float"
        if name not in inits:
            bias = ((q.astype(np.int64) - zero) * scale).astype(np.float32)
            inits[name] = numpy_helper.from_array(bias, name)
            g.initializer.append(inits[name])
        n.input[2] = name
        count += 1
    if count:  # drop the DequantizeLinear nodes and int32 tensors nothing reads any more
        used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        for n in [n for n in g.node if n.op_type == "DequantizeLinear" and n.output[0] not in used]:
            g.node.remove(n)
        _drop_unused_initializers(g)
    return count


def _drop_unused_initializers(g: Any) -> None:
    used = {i for n in g.node for i in n.input}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)


def _uint8_activations(model: Any) -> int:
    from onnx import TensorProto, numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    users = _consumers(g)
    acts = [n for n in g.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits
            and len(n.input) > 2 and n.input[2] in inits]
    if not {TensorProto.INT8, TensorProto.UINT8} <= {inits[q.input[2]].data_type for q in acts}:
        return 0
    count = 0
    for q in acts:
        zp, dqs = q.input[2], users.get(q.output[0], [])
        if inits[zp].data_type != TensorProto.INT8 or not dqs or any(
                d.op_type != "DequantizeLinear" or list(d.input[1:3]) != list(q.input[1:3]) for d in dqs):
            continue
        name = f"{zp}_uint8"
        if name not in inits:
            shifted = (numpy_helper.to_array(inits[zp]).astype(np.int16) + 128).astype(np.uint8)
            inits[name] = numpy_helper.from_array(shifted, name)
            g.initializer.append(inits[name])
        for node in (q, *dqs):
            node.input[2] = name
        for vi in g.value_info:
            if vi.name == q.output[0]:
                vi.type.tensor_type.elem_type = TensorProto.UINT8
        count += 1
    if count:
        _drop_unused_initializers(g)
    return count


def _topo_sort(model: Any) -> int:
    g = model.graph
    ready = {i.name for i in g.input} | {i.name for i in g.initializer} | {""}
    nodes, order = list(g.node), []
    pending = nodes
    while pending:
        rest = []
        for n in pending:
            if all(i in ready for i in n.input):
                order.append(n)
                ready.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            return 0  # a cycle or a dangling input: leave it to the checker to report
        pending = rest
    moved = sum(a is not b for a, b in zip(order, nodes))
    if moved:
        del g.node[:]
        g.node.extend(order)
    return moved


def _name_nodes(model: Any) -> int:
    g = model.graph
    taken = {n.name for n in g.node if n.name}
    count = 0
    for i, n in enumerate(g.node):
        if not n.name:
            name, k = f"{n.op_type}_{i}", 0
            while name in taken:
                k += 1
                name = f"{n.op_type}_{i}_{k}"
            n.name = name
            taken.add(name)
            count += 1
    return count


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
        onnx.checker.check_model(slim, full_check=True)
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
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = onnx.load(str(src))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        half = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=False,
                                        op_block_list=[*DEFAULT_OP_BLOCK_LIST, *_FP16_KEEP_FLOAT])
    onnx.save(half, str(dst))
    # the converter appends the input Casts after their consumers: finalize_onnx re-sorts the nodes
    rewrites = finalize_onnx(dst)
    return {"fp16_converter": "onnxruntime.transformers.float16 (keep_io_types; fp32: "
                              + ", ".join(_FP16_KEEP_FLOAT) + ")", "fp16_graph_rewrites": rewrites}


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
    rewrites = finalize_onnx(dst)
    if rewrites.get("gemm_bias_float"):
        notes.append(f"{rewrites['gemm_bias_float']} Gemm biases kept in float32 instead of int32 Q/DQ "
                     "(OpenCV DNN cannot load int32-bias Gemm; ORT still fuses QGemm)")
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
    from mirage_edge.export.openvino import nncf_ptq_kwargs

    kw, recipe = nncf_ptq_kwargs(nncf, q, transformer, sum(next(iter(f.values())).shape[0] for f in calib))
    try:
        qm = nncf.quantize(onnx.load(str(src)), nncf.Dataset(calib), **kw)
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"NNCF quantization of {src.name} failed: {exc}") from exc
    onnx.save(qm, str(dst))
    n_u8 = finalize_onnx(dst, uint8_activations=True).get("activations_to_uint8", 0)
    notes = [recipe] + ([f"{n_u8} int8 activation Q/DQ pairs stored as uint8 (zero point + 128, same function): "
                         "OpenCV DNN 5.x cannot mix int8 and uint8 activations"] if n_u8 else [])
    quantized, floating = qdq_summary(dst)
    return QuantizationInfo(
        method="nncf-ptq", calibration_images=kw["subset_size"], op_types_quantized=sorted(quantized),
        float_ops=floating, quantized_ops=quantized, activation_type="QInt8/QUInt8 (NNCF preset)",
        weight_type="QInt8", per_channel=True, symmetric_activations=True, calibration_method="MinMax",
        model_type="transformer" if transformer else "default", notes=notes,
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
