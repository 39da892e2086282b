"""Data: RetinaBench loaders, validation, synthetic OCT, and the one preprocessing.

Importing this package is torch-free: `io` and `preprocess` (numpy + OpenCV) load eagerly, the
torch datasets / transforms resolve lazily on first attribute access.

    from mirage_edge.data import read_image, PreprocessSpec, preprocess        # torch-free
    from mirage_edge.data import SegmentationFolder, ClassificationFolder       # imports torch
"""
from __future__ import annotations

from mirage_edge._lazy import lazy_exports
from mirage_edge.data.io import read_image, write_png
from mirage_edge.data.preprocess import PreprocessSpec, preprocess, resize_mask

_LAZY = {
    # torch-free (numpy) but not needed at import time
    "scan_dataset": "mirage_edge.data.layout",
    "DatasetIndex": "mirage_edge.data.layout",
    "SegInfo": "mirage_edge.data.layout",
    "read_info": "mirage_edge.data.layout",
    "cross_dataset": "mirage_edge.data.layout",
    "check_dataset": "mirage_edge.data.check",
    "load_dataset": "mirage_edge.data.check",
    "CheckReport": "mirage_edge.data.check",
    "synthesize": "mirage_edge.data.synth",
    "classification_metrics": "mirage_edge.metrics",
    "segmentation_metrics": "mirage_edge.metrics",
    # torch
    "SegmentationFolder": "mirage_edge.data.datasets",
    "ClassificationFolder": "mirage_edge.data.datasets",
    "MultimodalFolder": "mirage_edge.data.datasets",
    "UnlabelledImages": "mirage_edge.data.datasets",
    "TorchPreprocess": "mirage_edge.data.transforms",
    "Augment": "mirage_edge.data.transforms",
}

__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
__all__ = ["read_image", "write_png", "PreprocessSpec", "preprocess", "resize_mask", *_LAZY]
