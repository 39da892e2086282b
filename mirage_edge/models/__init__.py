"""Models: registry + factory, the MIRAGE teacher, heads, task models, checkpoints.

Importing this package is torch-free (the CLI imports `mirage_edge.models.cli`); names resolve
lazily on first use.

    from mirage_edge.models import create_model, register_model, list_models, save_model
"""
from __future__ import annotations

from mirage_edge._lazy import lazy_exports
from mirage_edge.models.registry import get_model_fn, is_model, list_models, register_model

_LAZY = {
    "create_model": "mirage_edge.models.factory",
    "load_model": "mirage_edge.models.checkpoint",
    "save_model": "mirage_edge.models.checkpoint",
    "convert": "mirage_edge.models.checkpoint",
    "MIRAGE": "mirage_edge.models.mirage",
    "MirageConfig": "mirage_edge.models.config",
    "PretrainedCfg": "mirage_edge.models.config",
    "ConvNeXtSegHead": "mirage_edge.models.heads",
    "ClsHead": "mirage_edge.models.heads",
    "SegmentationModel": "mirage_edge.models.task",
    "ClassificationModel": "mirage_edge.models.task",
    "segmentation_model": "mirage_edge.models.task",
    "classification_model": "mirage_edge.models.task",
    "masked_loss": "mirage_edge.models.losses",
    "resolve_weights": "mirage_edge.models.weights",
}

__all__ = ["get_model_fn", "is_model", "list_models", "register_model", *_LAZY]

__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
