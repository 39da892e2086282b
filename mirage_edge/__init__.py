"""mirage-edge: MIRAGE (retinal OCT/SLO foundation model) from GPU training to a quantized edge model.

Importing the package is cheap and torch-free; heavy names resolve lazily on first use.
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

# name -> module that defines it; resolved on first attribute access (PEP 562) so that
# `import mirage_edge` and `mirage-edge --help` never import torch.
_LAZY = {
    "create_model": "mirage_edge.models",
    "list_models": "mirage_edge.models",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mirage_edge' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
