"""OpenVINO IR export: from our ONNX (fp32 / fp16-compressed), INT8 by NNCF PTQ or from a Q/DQ ONNX.

The IR is converted from the same ONNX file the ONNX artifact uses, so all formats share one graph.
NNCF PTQ uses ModelType.TRANSFORMER for models with attention (DESIGN §6: keeps ViT accuracy).
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from mirage_edge._deps import require
from mirage_edge.artifact import METADATA_KEY, QuantizationInfo
from mirage_edge.errors import ExportError
from mirage_edge.export.target import QuantConfig

_PRECISION_KEEPING = ("Convert", "Reshape", "Transpose", "MaxPool")  # walked through to a FakeQuantize
# Compute ops whose quantization we report (others are data movement / elementwise).
_COMPUTE = {"MatMul", "Convolution", "GroupConvolution", "ConvolutionBackpropData",
            "GroupConvolutionBackpropData", "Multiply", "Add",
            "Softmax", "MVN", "Gelu", "Divide", "Subtract", "ReduceMean", "Power", "Sqrt"}


def convert(onnx_path: Path) -> Any:
    """ONNX file -> ov.Model (Q/DQ pairs become FakeQuantize, i.e. an INT8 IR)."""
    ov = require("openvino", "OpenVINO export")
    try:
        return ov.convert_model(str(onnx_path))
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"OpenVINO cannot convert {onnx_path.name}: {exc}") from exc


def nncf_ptq_kwargs(nncf: Any, q: QuantConfig, transformer: bool, subset_size: int) -> tuple[dict[str, Any], str]:
    """Keyword arguments of `nncf.quantize` for the recipe `q` (NNCF 3.4: model_type, subset_size,
    fast_bias_correction, ignored_scope, advanced_parameters), and a one-line note of the
    algorithms they switch on (stored in the artifact's quantization notes)."""
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

    kw: dict[str, Any] = {"subset_size": subset_size, "fast_bias_correction": q.fast_bias_correction}
    adv: dict[str, Any] = {"disable_bias_correction": not q.bias_correction}
    parts = ["NNCF PTQ, " + ("TRANSFORMER model type" if transformer else "default model type")]
    if transformer:
        kw["model_type"] = nncf.ModelType.TRANSFORMER
        adv["smooth_quant_alphas"] = AdvancedSmoothQuantParameters(convolution=q.smooth_quant_convolution,
                                                                   matmul=q.smooth_quant_matmul)
        alphas = [f"{k} alpha {v:g}" for k, v in (("MatMul", q.smooth_quant_matmul),
                                                  ("Convolution", q.smooth_quant_convolution)) if v >= 0]
        parts.append(f"SmoothQuant ({', '.join(alphas)})" if alphas else "SmoothQuant off")
    parts.append(("fast " if q.fast_bias_correction else "full ") + "bias correction" if q.bias_correction
                 else "bias correction off")
    if q.ignored_patterns:
        kw["ignored_scope"] = nncf.IgnoredScope(patterns=list(q.ignored_patterns), validate=False)
        parts.append(f"ignored scope {list(q.ignored_patterns)}")
    kw["advanced_parameters"] = AdvancedQuantizationParameters(**adv)
    return kw, ", ".join(parts)


def quantize_nncf(model: Any, calib: list[dict[str, np.ndarray]], q: QuantConfig,
                  transformer: bool) -> tuple[Any, QuantizationInfo]:
    """NNCF post-training INT8 quantization of an ov.Model on `calib` feeds."""
    nncf = require("nncf", "OpenVINO INT8 quantization")
    n = sum(next(iter(f.values())).shape[0] for f in calib)
    kw, recipe = nncf_ptq_kwargs(nncf, q, transformer, n)
    try:
        qmodel = nncf.quantize(model, nncf.Dataset(calib), **kw)
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"NNCF quantization failed: {exc}") from exc
    quantized, floating = fq_summary(qmodel)
    info = QuantizationInfo(
        method="nncf-ptq", calibration_images=n, op_types_quantized=sorted(quantized), float_ops=floating,
        quantized_ops=quantized, activation_type="u8/i8 (NNCF performance preset)", weight_type="i8",
        per_channel=True, symmetric_activations=True, calibration_method="MinMax",
        model_type="transformer" if transformer else "default", notes=[recipe],
    )
    return qmodel, info


def fq_summary(model: Any) -> tuple[dict[str, int], dict[str, int]]:
    """Count compute ops fed by a FakeQuantize (quantized) vs. not (float), by op type."""
    quantized: Counter[str] = Counter()
    floating: Counter[str] = Counter()
    for op in model.get_ordered_ops():
        t = op.get_type_name()
        if t not in _COMPUTE:
            continue
        fed = False
        for inp in op.inputs():
            src = inp.get_source_output().get_node()
            # weights: Constant(i8) -> Convert -> [Subtract] -> Multiply; activations: FakeQuantize, possibly
            # through ops that keep the precision (the CPU plugin's low-precision transformations run a max
            # pool on the quantized tensor: ResNet's stem FakeQuantize -> MaxPool -> layer1's first conv)
            while src.get_type_name() in _PRECISION_KEEPING and src.get_input_size():
                src = src.input_value(0).get_node()
            if src.get_type_name() == "FakeQuantize":
                fed = True
                break
        (quantized if fed else floating)[t] += 1
    return dict(sorted(quantized.items())), dict(sorted(floating.items()))


# Ops with INT8 kernels in the CPU plugin: the denominator of an IR's quantized share.
_INT8_KERNELS = {"MatMul", "Convolution", "GroupConvolution", "ConvolutionBackpropData",
                 "GroupConvolutionBackpropData"}


def count_quantization(xml_path: Path, info: QuantizationInfo, counted_in: str) -> QuantizationInfo:
    """Fill `info`'s counts from the written IR at `xml_path` (FakeQuantize ops; compute ops fed
    by one), replacing the per-type tables with the IR's own op names."""
    ov = require("openvino", "OpenVINO inspection")
    model = ov.Core().read_model(str(xml_path))
    quantized, floating = fq_summary(model)
    info.quantized_ops, info.float_ops = quantized, floating
    info.quantizers = sum(op.get_type_name() == "FakeQuantize" for op in model.get_ordered_ops())
    info.compute_ops_quantized = sum(v for k, v in quantized.items() if k in _INT8_KERNELS)
    info.compute_ops_total = info.compute_ops_quantized + sum(v for k, v in floating.items() if k in _INT8_KERNELS)
    info.quantized_share = (info.compute_ops_quantized / info.compute_ops_total) if info.compute_ops_total else None
    info.counted_in = counted_in
    return info


def save(model: Any, xml_path: Path, meta_json: str | None, compress_to_fp16: bool) -> list[str]:
    """Write model.xml + model.bin (metadata in rt_info); returns the file names written."""
    ov = require("openvino", "OpenVINO export")
    if meta_json is not None:
        model.set_rt_info(meta_json, [METADATA_KEY, "metadata"])
    ov.save_model(model, str(xml_path), compress_to_fp16=compress_to_fp16)
    return [xml_path.name, xml_path.with_suffix(".bin").name]


def read_embedded_metadata(xml_path: Path) -> str | None:
    ov = require("openvino", "OpenVINO metadata")
    model = ov.Core().read_model(str(xml_path))
    if not model.has_rt_info([METADATA_KEY, "metadata"]):
        return None
    return str(model.get_rt_info([METADATA_KEY, "metadata"]).astype(str))


def runtime_hints(inference_precision: str) -> dict[str, str]:
    return {} if inference_precision == "default" else {"INFERENCE_PRECISION_HINT": inference_precision}
