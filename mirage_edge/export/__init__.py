"""Export: nn.Module -> validated ONNX / OpenVINO / TensorRT artifacts (see mirage_edge.artifact).

    from mirage_edge.export import export_model, load_target
    dirs = export_model(model, "artifacts/", "cpu-openvino-int8", calib="data/layers")

`ExportTarget`/`load_target` are torch-free; `export_model` imports torch when called.
"""
from __future__ import annotations

import importlib
from typing import Any

from mirage_edge.export.target import ExportTarget, load_target

_LAZY = {"export_model": "mirage_edge.export.api", "plan_export": "mirage_edge.export.wrap"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mirage_edge.export' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = ["ExportTarget", "load_target", "export_model", "plan_export"]
