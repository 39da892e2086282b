"""Optional-dependency checks: a missing package names the extra that brings it.

`_EXTRAS` is the one table of which install brings which import; `require` (library code) and the
CLI's mapping of a stray `ModuleNotFoundError` (`missing_dependency`) both word their errors from it.
"""
from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from mirage_edge.errors import MissingDependencyError

# import name -> (pip name, extra of mirage-edge that installs it)
_EXTRAS = {
    "torch": ("torch", "toolkit"),
    "torchvision": ("torchvision", "toolkit"),
    "timm": ("timm", "toolkit"),
    "safetensors": ("safetensors", "toolkit"),
    "onnx": ("onnx", "toolkit"),
    "onnxscript": ("onnxscript", "toolkit"),
    "onnxslim": ("onnxslim", "toolkit"),
    "nncf": ("nncf", "toolkit"),
    "sklearn": ("scikit-learn", "toolkit"),
    "scipy": ("scipy", "toolkit"),
    "rich": ("rich", "toolkit"),
    "matplotlib": ("matplotlib", "toolkit"),
    "tifffile": ("tifffile", "toolkit"),
    "huggingface_hub": ("huggingface_hub", "hub"),
    "onnxruntime": ("onnxruntime", "onnxruntime"),
    "openvino": ("openvino", "openvino"),
    "tensorrt": ("tensorrt", "tensorrt"),
    "cuda": ("cuda-python", "tensorrt"),
    "eyepy": ("eyepy", "vendor"),
    "pydicom": ("pydicom", "vendor"),
    "jinja2": ("jinja2", "vendor"),
    "oct_converter": ("oct-converter", "topcon"),
    "cv2": ("opencv-python-headless", "(base install)"),
}


def has(module: str) -> bool:
    """True if `module` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _error(module: str, purpose: str, exc: ImportError) -> MissingDependencyError:
    pip_name, extra = _EXTRAS.get(module, (module, "all"))
    why = f" (needed for {purpose})" if purpose else ""
    hint = f'pip install "mirage-edge[{extra}]"' if not extra.startswith("(") else f"pip install {pip_name}"
    # When something *inside* the package is missing, the package is there but broken: say what.
    missing = getattr(exc, "name", None)
    detail = f"  [{exc}]" if missing is None or missing.partition(".")[0] != module else ""
    return MissingDependencyError(f"{pip_name} is not installed{why}: {hint}{detail}")


def require(module: str, purpose: str = "") -> ModuleType:
    """Import `module` or raise `MissingDependencyError` naming the pip package and extra."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise _error(module, purpose, exc) from exc


def missing_dependency(exc: ModuleNotFoundError, purpose: str = "") -> MissingDependencyError | None:
    """The named-extra error for a `ModuleNotFoundError` of an optional dependency, else None.

    None for anything outside `_EXTRAS` (a missing mirage_edge module, an unknown package): that is
    a bug to show with its traceback, not an extra to install.
    """
    top = (exc.name or "").partition(".")[0]
    return _error(top, purpose, exc) if top in _EXTRAS else None
