"""Optional-dependency checks: a missing package names the extra that brings it."""
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
    "onnxruntime": ("onnxruntime", "onnxruntime"),
    "openvino": ("openvino", "openvino"),
    "tensorrt": ("tensorrt", "tensorrt"),
    "cv2": ("opencv-python-headless", "(base install)"),
}


def has(module: str) -> bool:
    """True if `module` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(module: str, purpose: str = "") -> ModuleType:
    """Import `module` or raise `MissingDependencyError` naming the pip package and extra."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        pip_name, extra = _EXTRAS.get(module, (module, "all"))
        why = f" (needed for {purpose})" if purpose else ""
        hint = (
            f'pip install "mirage-edge[{extra}]"' if not extra.startswith("(") else f"pip install {pip_name}"
        )
        raise MissingDependencyError(f"{pip_name} is not installed{why}: {hint}  [{exc}]") from exc
