"""Torch-free runtime: `Predictor.load(artifact_dir).predict(images)` over ONNX Runtime / OpenVINO / TensorRT."""
from __future__ import annotations

from mirage_edge.runtime.predictor import Predictor

__all__ = ["Predictor"]
