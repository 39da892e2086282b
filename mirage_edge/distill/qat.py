"""INT8 quantization-aware training with NNCF, and its explicit Q/DQ ONNX export.

Why NNCF (details in distill/README.md): `nncf.quantize` on a torch module inserts trainable
fake-quantizers (weights per-channel symmetric, activations per-tensor, NNCF's "performance"
preset), calibrated on a few batches; the model then trains as usual. Exported with the quantizers
in ``ONNX_QUANTIZE_DEQUANTIZE_PAIRS`` mode through the TorchScript exporter, it becomes a standard
QuantizeLinear/DequantizeLinear ONNX graph that ONNX Runtime runs, OpenVINO compiles to INT8
kernels and TensorRT (explicit-precision INT8, the only INT8 path left in TensorRT 10/11) accepts.

Which ops stay in float is data: `QATSpec.ignored_types` / `ignored_names` (an NNCF IgnoredScope)
and `model_type="transformer"` (NNCF's ViT rules); the resolved settings and the quantizer count are
returned by :func:`prepare_qat` and stored in the QAT checkpoint.
"""
from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import nn

from mirage_edge._deps import require
from mirage_edge.distill.recipe import QATSpec
from mirage_edge.errors import ExportError
from mirage_edge.models.quantized import count_quantizers, qdq_export_mode, qdq_summary


def _nncf() -> Any:
    """The nncf module, for building fake-quant torch models (every NNCF torch model here is made by
    `prepare_qat` or `rebuild_qat`, so this is the one place to set NNCF up)."""
    # NNCF compiles its CPU fake-quant kernels (a torch C++ extension) on first use: ~1 min on 2 idle
    # cores, several under load - past NNCF's 60 s default, which then aborts the QAT run. Only the
    # default is raised; a user's setting wins.
    os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "900")
    return require("nncf", "quantization-aware training")


def prepare_qat(model: nn.Module, calib_inputs: Sequence[torch.Tensor], spec: QATSpec) -> tuple[nn.Module, dict[str, Any]]:
    """Insert NNCF fake-quantizers into `model` (calibrated on `calib_inputs`, each B x 1 x H x W).

    Returns (quantized model, info) where info records the quantization recipe (scheme, ignored
    scope, model type, number of quantizers) for the checkpoint and artifact metadata.
    """
    nncf = _nncf()
    kwargs: dict[str, Any] = {}
    if spec.model_type == "transformer":
        kwargs["model_type"] = nncf.ModelType.TRANSFORMER
    if spec.ignored_types or spec.ignored_names:
        kwargs["ignored_scope"] = nncf.IgnoredScope(types=list(spec.ignored_types), names=list(spec.ignored_names),
                                                    validate=False)
    model = model.eval()
    n_items = sum(int(x.shape[0]) for x in calib_inputs)
    with _quiet_nncf():
        qmodel = nncf.quantize(model, nncf.Dataset(list(calib_inputs)), preset=nncf.QuantizationPreset.PERFORMANCE,
                               subset_size=len(calib_inputs), **kwargs)  # NNCF counts dataset items (batches)
    info = {
        "library": "nncf", "version": nncf.__version__, "scheme": "int8",
        "weights": "per-channel symmetric", "activations": "per-tensor symmetric (NNCF performance preset)",
        "model_type": spec.model_type, "ignored_types": list(spec.ignored_types),
        "ignored_names": list(spec.ignored_names), "num_quantizers": count_quantizers(qmodel),
        "calibration_samples": n_items,
    }
    return qmodel, info


@contextlib.contextmanager
def _quiet_nncf() -> Iterator[None]:
    import logging

    log = logging.getLogger("nncf")
    old = log.level
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(old)


def export_qdq_onnx(model: nn.Module, path: str | Path, example: torch.Tensor, opset: int = 17,
                    input_name: str = "bscan", output_name: str = "output", dynamic_batch: bool = True) -> dict[str, int]:
    """Export an NNCF-quantized model (B x 1 x H x W -> output) as an explicit Q/DQ ONNX file, atomically.

    The TorchScript exporter is used because torch.export cannot trace NNCF's quantizer control flow.
    Returns op-type counts plus "compute_ops_quantized"; raises ExportError if the graph has no
    QuantizeLinear/DequantizeLinear or no conv/matmul fed by them.
    """
    onnx = require("onnx", "ONNX export")
    from mirage_edge._io import atomic_path

    path = Path(path)
    model = model.eval()
    dyn = {input_name: {0: "batch"}, output_name: {0: "batch"}} if dynamic_batch else None
    with qdq_export_mode(model), atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings():
        # NNCF quantizers read their level counts with .item(): harmless tracer warnings, constants by design
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            torch.onnx.export(model, (example,), str(tmp), dynamo=False, opset_version=opset,
                              input_names=[input_name], output_names=[output_name], dynamic_axes=dyn)
        except Exception as exc:  # torch raises many types here; surface them as one typed error
            raise ExportError(f"Q/DQ ONNX export of the QAT model failed: {exc}") from exc
        graph = onnx.load(str(tmp))
        counts: dict[str, int] = {}
        for node in graph.graph.node:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
        if not counts.get("QuantizeLinear") or not counts.get("DequantizeLinear"):
            raise ExportError(f"exported QAT graph has no QuantizeLinear/DequantizeLinear nodes: {counts}")
        if counts.get("FakeQuantize"):
            raise ExportError("exported QAT graph still holds OpenVINO FakeQuantize nodes (ONNX Runtime cannot run it)")
        quantized, _ = qdq_summary(tmp)
        if not quantized:
            raise ExportError(f"exported QAT graph has Q/DQ nodes but no compute op (conv/matmul) takes a quantized "
                              f"input: {counts}")
        counts["compute_ops_quantized"] = sum(quantized.values())
    return counts


def qat_config(model: nn.Module) -> dict[str, Any]:
    """NNCF's JSON-able description of the inserted quantizers (to rebuild them on load)."""
    nncf = _nncf()
    cfg = nncf.torch.get_config(model)
    json.dumps(cfg)  # fail early if NNCF ever returns something non-JSON
    return cfg


def rebuild_qat(model: nn.Module, config: dict[str, Any], example: torch.Tensor) -> nn.Module:
    """Re-insert the quantizers described by `qat_config` into a fresh FP32 `model` (weights loaded after)."""
    nncf = _nncf()
    del example  # NNCF 3.x rebuilds from the config alone (2.x needed an example input)
    return nncf.torch.load_from_config(model.eval(), config)


def ort_session(path: str | Path, threads: int = 0) -> Any:
    ort = require("onnxruntime", "evaluating the exported INT8 model")
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def ort_predict(session: Any, batches: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
    """Run an ONNX Runtime session on B x 1 x H x W batches; yields torch outputs."""
    name = session.get_inputs()[0].name
    for x in batches:
        yield torch.from_numpy(session.run(None, {name: x.numpy().astype("float32")})[0])


__all__ = ["prepare_qat", "export_qdq_onnx", "qdq_export_mode", "qat_config", "rebuild_qat", "count_quantizers",
           "ort_session", "ort_predict"]
