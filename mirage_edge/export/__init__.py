"""Export: nn.Module -> validated ONNX / OpenVINO / TensorRT artifacts (see mirage_edge.artifact).

    from mirage_edge.export import export_model, load_target
    dirs = export_model(model, "artifacts/", "cpu-openvino-int8", calib="data/layers")

`ExportTarget`/`load_target` are torch-free; `export_model` imports torch when called.
"""
from __future__ import annotations

from mirage_edge._lazy import lazy_exports
from mirage_edge.export.target import ExportTarget, load_target

__getattr__, __dir__ = lazy_exports(__name__, {
    "export_model": "mirage_edge.export.api",
    "plan_export": "mirage_edge.export.wrap",
}, globals())

__all__ = ["ExportTarget", "load_target", "export_model", "plan_export"]
