"""Distillation: MIRAGE teacher -> edge student (feature KD, task KD, QAT INT8), with a teacher cache.

Importing this package is torch-free; names resolve lazily::

    from mirage_edge.distill import distill, load_recipe
    result = distill(load_recipe("distill/recipes/tiny-demo.toml", ["data.path=data/layers"]))
    result.student_dir, result.onnx_path, result.report["test"]

    from mirage_edge.distill import load_student   # rebuild a saved student (FP32 or QAT INT8)
"""
from __future__ import annotations

from mirage_edge._lazy import lazy_exports

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
    "ProjectedStudent": "mirage_edge.models.projector",
}

__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
__all__ = list(_LAZY)
