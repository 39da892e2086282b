"""What to export from an nn.Module: task, inputs, outputs, classes, and an export-ready wrapper.

Any module taking B x 1 x H x W works: MIRAGE encoders (`forward_features(dict) -> B x N x D`),
timm students (`forward_features(x)`), the task models (`forward(x) -> logits`) and plain modules.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mirage_edge.artifact import mask_dtype
from mirage_edge.errors import ConfigError, ExportError
from mirage_edge.models.quantized import call_with_quantizers, fake_quant_kind
from mirage_edge.export.target import ExportTarget


class ExportWrapper(nn.Module):
    """Positional-tensor front for a model (exporters want plain tensors in, one tensor out).

    mode "features_dict": model.forward_features({modality: x, ...}) -> B x N x D
    mode "features":      model.forward_features(x)
    mode "forward":       model(x) -> logits (B x K or B x K x H x W) or features
    `argmax` adds a class-index output (B x H x W of `mask_dtype`) for segmentation.
    """

    def __init__(self, model: nn.Module, mode: str, modalities: list[str], argmax: bool = False,
                 mask_stride: int = 1, mask_dtype: torch.dtype = torch.uint8) -> None:
        super().__init__()
        self.model = model
        self.mode = mode
        self.modalities = list(modalities)
        self.argmax = argmax
        self.mask_stride = mask_stride
        self.mask_dtype = mask_dtype
        if mask_stride > 1 and not hasattr(model, "forward_mask"):
            raise ExportError(f"seg_mask_stride={mask_stride} needs a SegmentationModel (forward_mask); "
                              f"{type(model).__name__} has none")

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        if self.argmax and self.mask_stride > 1:
            # a QAT model's quantizers are bound to forward; forward_mask must run under them too
            return call_with_quantizers(self.model, self.model.forward_mask, xs[0], self.mask_stride,
                                        self.mask_dtype)
        if self.mode == "features_dict":
            out = self.model.forward_features(dict(zip(self.modalities, xs)))
        elif self.mode == "features":
            out = self.model.forward_features(xs[0])
        else:
            out = self.model(xs[0])
        if isinstance(out, (tuple, list)):  # some models return (logits, aux); export the first
            out = out[0]
        if isinstance(out, dict):
            raise ExportError(f"model returned a dict ({sorted(out)}); export needs a tensor output")
        if self.argmax:
            out = out.argmax(dim=1).to(self.mask_dtype)
        return out


@dataclass
class ExportPlan:
    """Resolved description of one model's export (shared by every format/precision)."""

    wrapper: ExportWrapper
    task: str
    modalities: list[str]
    input_sizes: dict[str, tuple[int, int]]  # modality -> (H, W)
    classes: list[str]
    output_kind: str  # logits | mask | features
    output_dtype: str  # float32, or the mask's (artifact.mask_dtype)
    output_shape: list[int]  # for batch 1
    fake_quantized: str  # "" | "nncf" | "torch"
    has_attention: bool
    notes: list[str] = field(default_factory=list)

    def example_inputs(self, batch: int = 1, seed: int = 0) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(seed)
        return tuple(torch.rand(batch, 1, *self.input_sizes[m], generator=g) for m in self.modalities)


_TASK_CLASSES = {"ClassificationModel": "classification", "SegmentationModel": "segmentation"}


def _as_hw(value: Any) -> tuple[int, int] | None:
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, int) for v in value):
        if len(value) == 2:
            return (int(value[0]), int(value[1]))
        if len(value) == 3:  # timm (C, H, W)
            return (int(value[1]), int(value[2]))
    return None


def _model_input_size(model: nn.Module, modality: str) -> tuple[int, int] | None:
    """The model's own input size for `modality`, from the attributes our models/timm expose."""
    candidates = [model, getattr(model, "encoder", None)]
    for m in candidates:
        if m is None:
            continue
        cfg_sizes = getattr(getattr(m, "cfg", None), "input_size", None)
        if isinstance(cfg_sizes, dict) and modality in cfg_sizes and _as_hw(tuple(cfg_sizes[modality])):
            return _as_hw(tuple(cfg_sizes[modality]))
        for attr in ("input_size", "img_size"):
            v = getattr(m, attr, None)
            if isinstance(v, dict):
                v = v.get(modality, next(iter(v.values()), None))
            hw = _as_hw(v)
            if hw:
                return hw
        for attr in ("pretrained_cfg", "default_cfg"):
            cfg = getattr(m, attr, None)
            if isinstance(cfg, dict) and _as_hw(cfg.get("input_size")):
                return _as_hw(cfg.get("input_size"))
        pe = getattr(m, "patch_embed", None)
        if pe is not None and _as_hw(getattr(pe, "img_size", None)):
            return _as_hw(pe.img_size)
    return None


def _model_modalities(model: nn.Module) -> list[str]:
    """Default export inputs: the model's default image modality (B-scan); others on request."""
    for m in (model, getattr(model, "encoder", None)):
        if m is not None and isinstance(getattr(m, "default_modality", None), str):
            return [m.default_modality]
    for m in (model, getattr(model, "encoder", None)):
        if m is None:
            continue
        mods = getattr(m, "modalities", None)
        if mods is None and getattr(m, "cfg", None) is not None:
            mods = getattr(m.cfg, "modalities", None)
        if isinstance(mods, dict):
            return [str(k) for k in mods]
        if isinstance(mods, (list, tuple)) and all(isinstance(x, str) for x in mods):
            return list(mods)
        if isinstance(mods, (list, tuple)):  # list of modality configs with .name
            names = [getattr(x, "name", None) for x in mods]
            if all(isinstance(n, str) for n in names):
                return names
    return ["bscan"]


def _model_classes(model: nn.Module, n: int) -> list[str]:
    for m in (model, getattr(model, "head", None)):
        for attr in ("classes", "class_names"):
            v = getattr(m, attr, None) if m is not None else None
            if isinstance(v, (list, tuple)) and len(v) == n and all(isinstance(c, str) for c in v):
                return list(v)
    return [f"class_{i}" for i in range(n)]


_ENCODER_PROTOCOL = ("embed_dim", "num_global_tokens", "token_grid", "forward_features")


def model_task(model: nn.Module) -> str | None:
    """The task `model` was built for: "classification" / "segmentation" (task models), "encoder"
    (MIRAGE and students: the encoder protocol of models/task.py), None for other modules."""
    own = getattr(model, "task", None)
    if own in ("classification", "segmentation"):
        return own
    if all(hasattr(model, a) for a in _ENCODER_PROTOCOL):
        return "encoder"
    return None


def model_label(model: nn.Module) -> str:
    """How errors name `model`: the checkpoint it was loaded from, else its class."""
    src = getattr(model, "mirage_edge_source", None)
    return str(src["path"]) if isinstance(src, dict) and src.get("path") else type(model).__name__


def size_multiple(model: nn.Module, modality: str) -> tuple[int, int]:
    """(mh, mw) every export input size must be a multiple of: the patch / stride of the encoder
    (and of a projected student's inner student). (1, 1) when the model declares none."""
    enc = getattr(model, "encoder", model)
    mh, mw = 1, 1
    for m in (enc, getattr(enc, "student", None)):
        cfg_patch = getattr(getattr(m, "cfg", None), "patch_size", None)
        patch = cfg_patch.get(modality) if isinstance(cfg_patch, dict) else getattr(m, "patch_size", None)
        hw = _as_hw(tuple(patch) if isinstance(patch, list) else patch)
        if hw and min(hw) > 0:
            mh, mw = math.lcm(mh, hw[0]), math.lcm(mw, hw[1])
    return mh, mw


def has_attention(model: nn.Module) -> bool:
    """True if the model has attention blocks (-> NNCF ModelType.TRANSFORMER)."""
    for mod in model.modules():
        name = type(mod).__name__.lower()
        if isinstance(mod, nn.MultiheadAttention) or "attention" in name or name == "attn":
            return True
    return False


def plan_export(model: nn.Module, target: ExportTarget, *, task: str | None = None,
                classes: list[str] | None = None) -> ExportPlan:
    """Decide task, inputs and outputs for `model` under `target` (runs one tiny forward pass)."""
    model.eval()
    task = task or target.task
    own = model_task(model)
    # a task model's encoder alone (--task encoder) is a legitimate export: its tokens, no head
    if own is not None and task not in ("auto", own) and not (task == "encoder" and own != "encoder"):
        # a checkpoint that knows its task gets it; a different --task would mislabel the artifact
        article = "an" if own == "encoder" else "a"
        raise ConfigError(f"{model_label(model)} is {article} {own} model; --task {task} does not fit "
                          f"(leave --task out or give --task {own})")
    modalities = list(target.modalities) or _model_modalities(model)
    cls_name = type(model).__name__
    uses_features = hasattr(model, "forward_features") and cls_name not in _TASK_CLASSES
    if task == "auto":
        task = _TASK_CLASSES.get(cls_name, "encoder" if uses_features else "auto")
    sizes: dict[str, tuple[int, int]] = {}
    for m in modalities:
        hw = tuple(target.input_size) if target.input_size else _model_input_size(model, m)
        if hw is None:
            raise ConfigError(
                f"cannot tell the input size of {cls_name}; set input_size = [H, W] in the export target"
            )
        sizes[m] = (int(hw[0]), int(hw[1]))  # type: ignore[index]
        mh, mw = size_multiple(model, m)
        if sizes[m][0] % mh or sizes[m][1] % mw:
            # timm pads non-multiples silently: the token grid would disagree with token_grid()
            raise ConfigError(f"input size {sizes[m][0]}x{sizes[m][1]} is not a multiple of {mh}x{mw}, the "
                              f"patch/stride of {model_label(model)}; use e.g. "
                              f"{_round_to(sizes[m][0], mh)}x{_round_to(sizes[m][1], mw)}")

    if task == "encoder" and hasattr(model, "forward_features"):
        mode = "features"
        if len(modalities) > 1 or _takes_dict(model, modalities, sizes):
            mode = "features_dict"
    else:
        mode = "forward"
        if len(modalities) != 1:
            raise ConfigError(f"task models take one B x 1 x H x W input; got modalities {modalities}")
    probe = ExportWrapper(model, mode, modalities)
    with torch.no_grad():
        out = probe(*(torch.rand(1, 1, *sizes[m]) for m in modalities))
    h, w = sizes[modalities[0]]
    if task == "classification" and out.ndim != 2 or \
            task == "segmentation" and (out.ndim != 4 or tuple(out.shape[-2:]) != (h, w)):
        want = "B x K logits" if task == "classification" else f"B x K x {h} x {w} logits"
        raise ConfigError(f"{model_label(model)} outputs {tuple(out.shape)} for a 1 x 1 x {h} x {w} input; "
                          f"--task {task} needs {want}")
    if task == "auto":
        if out.ndim == 2:
            task = "classification"
        elif out.ndim == 4 and tuple(out.shape[-2:]) == (h, w):
            task = "segmentation"
        else:
            task = "encoder"
    argmax = bool(target.seg_argmax and task == "segmentation")
    kind = {"classification": "logits", "segmentation": "mask" if argmax else "logits"}.get(task, "features")
    n_cls = int(out.shape[1]) if task in ("classification", "segmentation") else 0
    if classes is not None and task != "encoder" and len(classes) != n_cls:
        raise ConfigError(f"{len(classes)} class names given but the model outputs {n_cls} classes")
    names = (list(classes) if classes else _model_classes(model, n_cls)) if n_cls else []
    out_shape = list(out.shape)
    mask = mask_dtype(n_cls)
    if argmax:
        out_shape = [out_shape[0], *out_shape[2:]]
    return ExportPlan(
        # eval(): torch.onnx's TorchScript exporter restores the wrapper's mode on exit, and a fresh
        # module is in training mode, which would leave `model` in training mode after export.
        wrapper=ExportWrapper(model, mode, modalities, argmax=argmax,
                              mask_stride=target.seg_mask_stride if argmax else 1,
                              mask_dtype=getattr(torch, mask)).eval(),
        task=task, modalities=modalities, input_sizes=sizes, classes=names, output_kind=kind,
        output_dtype=mask if argmax else "float32",
        output_shape=out_shape, fake_quantized=fake_quant_kind(model), has_attention=has_attention(model),
    )


def _round_to(n: int, m: int) -> int:
    """The multiple of `m` nearest to `n` (at least `m`)."""
    return max(m, round(n / m) * m)


def _takes_dict(model: nn.Module, modalities: list[str], sizes: dict[str, tuple[int, int]]) -> bool:
    """MIRAGE encoders take {modality: tensor}; timm ones a tensor. Ask the model once."""
    x = torch.rand(1, 1, *sizes[modalities[0]])
    with torch.no_grad():
        try:
            model.forward_features({modalities[0]: x})
            return True
        except Exception:  # noqa: BLE001 - any failure means "not a dict API"
            return False
