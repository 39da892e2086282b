"""mirage-edge: MIRAGE (retinal OCT/SLO foundation model) from GPU training to a quantized edge model.

Importing the package is cheap and torch-free; heavy names resolve lazily on first use.
"""
from __future__ import annotations

from mirage_edge._lazy import lazy_exports

__version__ = "0.1.0"

# `import mirage_edge` and `mirage-edge --help` must never import torch (see mirage_edge._lazy).
__getattr__, __dir__ = lazy_exports(__name__, {
    "create_model": "mirage_edge.models",
    "list_models": "mirage_edge.models",
}, globals())
