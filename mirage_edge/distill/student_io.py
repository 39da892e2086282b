"""Student checkpoints.

FP32 students use the project's one model format (`mirage_edge.models.save_model`: a folder with
model.safetensors + config.json), so ``create_model("mirage", checkpoint=DIR)`` - and therefore
export and bench - load a distilled student like any teacher. Students are registry encoders
(`mirage_edge.models.students`); a projected student is the registry entry ``projected-student``.
Distillation facts (teacher name + weights SHA-256, preprocessing, recipe, classes) go under
``meta`` in config.json.

QAT INT8 students (NNCF fake-quant modules) are a folder::

    fp32/                 the FP32 architecture (save_model format) the quantizers were inserted into
    model.safetensors     the QAT state dict (weights + quantizer scales)
    qat.json              {"format": "mirage-edge-qat", "qat": {library, scheme, ignored scope, ...,
                          "nncf_config": ...}, "meta": {...}}
    model.onnx            the explicit Q/DQ ONNX export

`load_student(path)` rebuilds either kind and loads the weights strictly.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mirage_edge._io import atomic_path, atomic_write_text
from mirage_edge.errors import CheckpointError

QAT_FORMAT = "mirage-edge-qat"


def save_student(model: nn.Module, out_dir: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """FP32 student -> `out_dir` in the models format (meta stored under "meta")."""
    from mirage_edge.models.checkpoint import save_model

    return save_model(model, out_dir, extra=json.loads(json.dumps(meta or {}, default=str)))


def save_qat_student(qmodel: nn.Module, fp32: nn.Module, out_dir: str | Path, qat: dict[str, Any],
                     meta: dict[str, Any] | None = None) -> Path:
    """QAT student -> `out_dir` (layout in the module docstring); qat.json is written last."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_student(fp32, out / "fp32", meta)
    state = {k: v.detach().cpu().clone().contiguous() for k, v in qmodel.state_dict().items()}
    with atomic_path(out / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": QAT_FORMAT})
    doc = {"format": QAT_FORMAT, "version": 1, "qat": qat, "meta": meta or {}}
    atomic_write_text(out / "qat.json", json.dumps(doc, indent=1, default=str))
    return out


def load_student(path: str | Path) -> nn.Module:
    """Load an FP32 student (models format) or a QAT student folder; returns it in eval mode."""
    from safetensors.torch import load_file

    from mirage_edge.models.factory import create_model

    path = Path(path)
    qat_file = path / "qat.json"
    if not qat_file.is_file():
        return create_model("mirage", checkpoint=path).eval()
    doc = json.loads(qat_file.read_text())
    if doc.get("format") != QAT_FORMAT:
        raise CheckpointError(f"{qat_file}: format {doc.get('format')!r} is not {QAT_FORMAT!r}")
    from mirage_edge.distill.qat import rebuild_qat

    model = create_model("mirage", checkpoint=path / "fp32").eval()
    size = _input_size(model)
    model = rebuild_qat(model, doc["qat"]["nncf_config"], torch.zeros(1, 1, *size))
    state = load_file(str(path / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}/model.safetensors does not fit its fp32/ architecture: missing "
                              f"{sorted(missing)[:8]}, unexpected {sorted(unexpected)[:8]}")
    # export checks its INT8 artifacts against this graph's quantized ops (nothing lost on the way)
    model.mirage_edge_qat_onnx = str(path / "model.onnx")
    return model.eval()


def _input_size(model: nn.Module) -> tuple[int, int]:
    enc = getattr(model, "encoder", model)
    size = getattr(enc, "input_size", None)
    if not size or not size[0]:
        raise CheckpointError(f"cannot tell the input size of {type(model).__name__}")
    return int(size[0]), int(size[1])


__all__ = ["save_student", "save_qat_student", "load_student", "QAT_FORMAT"]
