"""Distillation: MIRAGE teacher -> edge student (feature KD, task KD, QAT INT8), with a teacher cache.

Importing this package is torch-free; names resolve lazily::

    from mirage_edge.distill import distill, load_recipe
    result = distill(load_recipe("distill/recipes/tiny-demo.toml", ["data.path=data/layers"]))
    result.student_dir, result.onnx_path, result.report["test"]

    from mirage_edge.distill import load_student   # rebuild a saved student (FP32 or QAT INT8)
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "distill": "mirage_edge.distill.loop",
    "DistillResult": "mirage_edge.distill.loop",
    "load_recipe": "mirage_edge.distill.recipe",
    "DistillRecipe": "mirage_edge.distill.recipe",
    "load_student": "mirage_edge.distill.student_io",
    "save_student": "mirage_edge.distill.student_io",
    "TeacherCache": "mirage_edge.distill.cache",
    "CacheKey": "mirage_edge.distill.cache",
    "Teacher": "mirage_edge.distill.teacher",
    "ProjectedStudent": "mirage_edge.distill.projector",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mirage_edge.distill' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = list(_LAZY)
