"""Shared models and exported artifacts for the export / runtime / firmware tests (no tests here).

Exports are slow-ish (seconds), so each kind is built once per test session and reused by
test_export.py, test_runtime.py and test_firmware.py (memoised at module level).
"""
from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")

from torch import nn  # noqa: E402

SIZE = 64
_CACHE: dict[str, tuple[nn.Module, dict[str, Path]]] = {}
_ROOT: list[Path] = []


class TinyCNN(nn.Module):
    """A student-like classifier: conv stem + pointwise/depthwise convs + linear head (B x 1 x H x W -> B x K)."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16)
        self.pw = nn.Conv2d(16, 32, 1)
        self.bn = nn.BatchNorm2d(32)
        self.head = nn.Linear(32, num_classes)
        self.classes = [f"grade_{i}" for i in range(num_classes)]
        self.input_size = (SIZE, SIZE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.bn(self.pw(self.dw(x))))
        return self.head(x.mean(dim=(2, 3)))


def _root() -> Path:
    if not _ROOT:
        _ROOT.append(Path(tempfile.mkdtemp(prefix="mirage-edge-export-tests-")))
        atexit.register(shutil.rmtree, _ROOT[0], True)
    return _ROOT[0]


def tiny_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = TinyCNN().eval()
    with torch.no_grad():  # non-trivial BN statistics so folding is exercised
        model.bn.running_mean.uniform_(-0.2, 0.2)
        model.bn.running_var.uniform_(0.5, 1.5)
    return model


def mirage_seg(seed: int = 0) -> nn.Module:
    from mirage_edge.models import create_model
    from mirage_edge.models.task import segmentation_model

    torch.manual_seed(seed)
    return segmentation_model(create_model("mirage-tiny", input_size=SIZE), 4).eval()


def mirage_encoder(seed: int = 0) -> nn.Module:
    from mirage_edge.models import create_model

    torch.manual_seed(seed)
    return create_model("mirage-tiny", input_size=SIZE).eval()


def target(**kw):
    from mirage_edge.export.target import ExportTarget

    base = dict(formats=["onnx", "openvino"], precisions=["fp32", "int8"], quantization={"calib_images": 16},
                # int8 decision thresholds a little below the defaults: these are random-weight models
                # whose logits sit close together, and other CPUs' int8 kernels round differently.
                validation={"n_inputs": 8, "int8_min_top1_agreement": 0.75, "int8_min_dice": 0.85})
    for key, value in kw.items():  # tables merge, so a test overrides only what it names
        base[key] = {**base[key], **value} if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    from mirage_edge.config import from_dict

    return from_dict(ExportTarget, base)


def exported(kind: str) -> tuple[nn.Module, dict[str, Path]]:
    """(torch model, {"onnx-fp32": dir, ...}) for kind in cnn | seg | encoder; built once."""
    if kind not in _CACHE:
        from mirage_edge.export import export_model

        torch.set_num_threads(2)
        model = {"cnn": tiny_cnn, "seg": mirage_seg, "encoder": mirage_encoder}[kind]()
        dirs = export_model(model, _root() / kind, target())
        _CACHE[kind] = (model, {d.name: d for d in dirs})
    return _CACHE[kind]
