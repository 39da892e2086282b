"""Quantized models: detect a fake-quantized (QAT / PTQ'd) torch model, switch its quantizers to ONNX
Q/DQ, keep them active in methods other than `forward`, and count what a Q/DQ ONNX graph quantizes.
Shared by distillation (QAT) and export, so it lives below both.

NNCF 3 attaches its quantizers as function hooks that run only inside the model's wrapped
`forward`. A task model's other entry points (`SegmentationModel.forward_mask`, the export path for
in-graph argmax at a stride) would silently run in float and export an FP32 graph under an INT8
label; :func:`call_with_quantizers` runs such a method under the same hook mode `forward` uses.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

from torch import nn

from mirage_edge._deps import require

# ops with INT8 kernels when their inputs come from DequantizeLinear: a graph's compute ops
INT8_ONNX_KERNELS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose", "MatMulInteger", "ConvInteger"})
_QDQ = ("QuantizeLinear", "DequantizeLinear")


def _nncf_quantizer_type() -> Any:
    """NNCF's quantizer module base class, or None without NNCF (an optional dependency)."""
    try:
        from nncf.torch.quantization.layers import BaseQuantizer  # type: ignore
    except Exception:  # noqa: BLE001 - not installed, or a broken install: no NNCF quantizers then
        return None
    return BaseQuantizer


def _nncf_quantizers(model: nn.Module) -> list[nn.Module]:
    base = _nncf_quantizer_type()
    return [] if base is None else [m for m in model.modules() if isinstance(m, base)]


def fake_quant_kind(model: nn.Module) -> str:
    """"nncf" / "torch" if `model` carries fake-quantizers (QAT / PTQ'd torch model), else ""."""
    from torch.ao.quantization import FakeQuantizeBase

    if _nncf_quantizers(model):
        return "nncf"
    return "torch" if any(isinstance(m, FakeQuantizeBase) for m in model.modules()) else ""


def count_quantizers(model: nn.Module) -> int:
    """Number of NNCF quantizer modules in `model` (0 without NNCF)."""
    return len(_nncf_quantizers(model))


@contextlib.contextmanager
def qdq_export_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily switch every NNCF quantizer to emit ONNX QuantizeLinear/DequantizeLinear pairs
    (their default is OpenVINO's FakeQuantize, which ONNX Runtime and TensorRT cannot run)."""
    quantizers = _nncf_quantizers(model)
    if not quantizers:  # no NNCF, or no NNCF quantizer: nothing to switch
        yield model
        return
    from nncf.torch.quantization.layers import QuantizerExportMode  # type: ignore

    old = [q._export_mode for q in quantizers]
    for q in quantizers:
        q.set_export_mode(QuantizerExportMode.ONNX_QUANTIZE_DEQUANTIZE_PAIRS)
    try:
        yield model
    finally:
        for q, mode in zip(quantizers, old):
            q.set_export_mode(mode)


def call_with_quantizers(model: nn.Module, method: Callable[..., Any], x: Any, *args: Any, **kwargs: Any) -> Any:
    """`method(x, *args, **kwargs)` (a bound method of `model` other than forward, taking the same
    first input as forward) with `model`'s NNCF quantizer hooks active; a plain call otherwise.

    Mirrors NNCF's own forward wrapper (nncf.torch.function_hook.wrapper.ForwardWithHooks): enter
    FunctionHookMode and pass the input through the model-input hooks. Hooks are keyed by module
    path and call order, so the ops `method` shares with forward get the same quantizers. The
    model-output hooks are not applied: they belong to forward's output, not to `method`'s.
    """
    try:
        from nncf.torch.function_hook.hook_executor_mode import FunctionHookMode  # type: ignore
        from nncf.torch.function_hook.wrapper import get_hook_storage, is_wrapped  # type: ignore
    except Exception:  # noqa: BLE001 - no NNCF 3 hooks: quantizers (if any) are modules and always run
        return method(x, *args, **kwargs)
    if not is_wrapped(model) or get_hook_storage(model).is_empty():
        return method(x, *args, **kwargs)
    with FunctionHookMode(model=model, hook_storage=get_hook_storage(model)) as ctx:
        (x,), _ = ctx.process_model_inputs((x,), {})
        return method(x, *args, **kwargs)


def qdq_summary(path: Path) -> tuple[dict[str, int], dict[str, int]]:
    """Count nodes fed by DequantizeLinear (quantized) vs. the rest (float), by op type."""
    onnx = require("onnx", "ONNX inspection")
    graph = onnx.load(str(path), load_external_data=False).graph
    producer = {o: n.op_type for n in graph.node for o in n.output}
    quantized: Counter[str] = Counter()
    floating: Counter[str] = Counter()
    for n in graph.node:
        if n.op_type in _QDQ or n.op_type == "Constant":
            continue
        # INT8 kernels exist for GEMM/conv fed by dequantized inputs; every other op (softmax,
        # norms, GELU, adds) computes in float between DQ and Q even when surrounded by Q/DQ.
        if n.op_type in INT8_ONNX_KERNELS and any(producer.get(i) == "DequantizeLinear" for i in n.input):
            quantized[n.op_type] += 1
        else:
            floating[n.op_type] += 1
    return dict(sorted(quantized.items())), dict(sorted(floating.items()))


__all__ = ["fake_quant_kind", "count_quantizers", "qdq_export_mode", "call_with_quantizers", "qdq_summary",
           "INT8_ONNX_KERNELS"]
