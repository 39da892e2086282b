"""Edge students: timm backbones behind the same features API as the MIRAGE teacher.

A student is a :class:`StudentEncoder`: a timm model built with ``pretrained=False`` (never a
download), ``in_chans=1`` and no classifier, whose last feature map has stride 32 so that at the
teacher's 512 x 512 input its 16 x 16 grid lines up with the teacher's 16 x 16 B-scan tokens (patch
32). At other resolutions (e.g. the tiny teacher's patch 8) the distillation projector resamples the
student grid to the teacher grid (see `mirage_edge.models.projector`).

Features API (shared with the teacher, so task heads, export and bench treat both alike):

* ``forward_features(x) -> B x N x C`` tokens of the stride-32 grid, row-major, no global token
  (``num_global_tokens == 0``); ``x`` is ``B x 1 x H x W`` in [0, 1] or a dict ``{"bscan": x}``.
* ``forward_feature_map(x) -> B x C x H/32 x W/32`` (the same features as an image).
* ``forward_intermediates(x, indices) -> list of B x C_i x h_i x w_i`` stage outputs (timm's
  ``forward_intermediates``; strides differ per stage, see ``feature_info``).
* ``token_grid(H, W) -> (H // 32, W // 32)``, ``embed_dim``, ``num_global_tokens`` (0), ``input_size``,
  ``patch_size`` — the encoder protocol of `mirage_edge.models.task`.

Registered names (timm names, plus short aliases). Supported students: ``mobilenetv4_conv_small``
(``mnv4-small``), ``vit_tiny_c32`` (``vit-tiny-32c``: ViT-Tiny with 32 px patches whose patch
embedding is a convolutional stem of five 3 x 3 stride-2 convs and a 1 x 1 projection, Xiao et al.
2021 "Early convolutions help transformers see better", built from timm's ``ConvStem`` +
``HybridEmbed``; no class token, built for ``img_size``), ``repvit_m0_9`` (``repvit-m0.9``) and
``resnet18`` (``resnet-18``). Registered but not supported (they miss the teacher's accuracy in our
distillation budget, see distill/README.md): ``vit_tiny_patch32`` (``vit-tiny-32``; the same ViT-Tiny
with timm's linear 32 x 32 patchify, which does not learn few-pixel lesions at 128 px) and
``mobileone_s0`` (``mobileone-s0``). ``student-tiny`` (timm ``test_efficientnet``, ~0.1 M params) is
for tests.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from mirage_edge.errors import ConfigError, InputError
from mirage_edge.models.config import as_pair
from mirage_edge.models.registry import register_model

STRIDE = 32


@dataclass
class StudentConfig:
    """Architecture of a student (everything needed to rebuild it; saved into checkpoints).

    name:        registered student name (e.g. "mobilenetv4_conv_small").
    timm_name:   timm architecture actually built.
    img_size:    input size the student is built for, an int (square) or [H, W] (matters for ViTs only).
    timm_kwargs: extra keyword arguments for `timm.create_model` (e.g. patch_size=32).
    reparameterized: True once re-parameterisable blocks (MobileOne, RepViT) were fused for deploy.
    input_scale: the input is upsampled (bilinear) by this factor inside the model, so the stride-32
                 grid is `input_scale` x finer in input pixels (e.g. 2: a 128 px input gives 8 x 8
                 tokens, the grid of a teacher with 16 px patches). The deployed model still takes
                 img_size; the resize is part of the graph.
    """

    name: str
    timm_name: str
    img_size: int | list[int] = 512
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    reparameterized: bool = False
    input_scale: int = 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# name -> (timm name, timm kwargs, one-line description with the CPU evidence behind the choice)
STUDENTS: dict[str, tuple[str, dict[str, Any], str]] = {
    "mobilenetv4_conv_small": (
        "mobilenetv4_conv_small", {},
        "MobileNetV4-conv-small, 2.5 M params; fastest at cos>=0.99 (OV INT8 1.8-2.1 ms @512, 2 cores)"),
    "mobilenetv4_conv_small_050": (
        "mobilenetv4_conv_small_050", {},
        "MobileNetV4-conv-small at half width, 1.0 M params; with a depthwise FPN head 2.1x faster than the "
        "full-width student with its default head (OV INT8 @512; 10 Dice points less on Duke, distill/README.md)"),
    "vit_tiny_patch32": (
        "vit_tiny_patch16_224", {"patch_size": 32, "class_token": False, "global_pool": "avg"},
        "ViT-Ti/32 (linear patchify), 5.6 M params; not supported: misses few-pixel lesions at 128 px"),
    "vit_tiny_c32": (
        "vit_tiny_patch16_224", {"conv_stem": [16, 32, 64, 128, 256], "class_token": False, "global_pool": "avg"},
        "ViT-Ti/32 with a conv stem (5 x 3x3 s2 + 1x1), 5.8 M params; the teacher's token grid at 512 px, "
        "and unlike the linear patchify it learns few-pixel lesions (distill/README.md)"),
    "repvit_m0_9": (
        "repvit_m0_9", {},
        "RepViT-M0.9, 4.7 M params; best hybrid fp32 efficiency (OV bf16 12.7 ms @512)"),
    "mobileone_s0": (
        "mobileone_s0", {},
        "MobileOne-S0, 1.0 M params deployed; INT8-friendly (OV INT8 2.9-3.7 ms @512, cos 0.999)"),
    "resnet18": (
        "resnet18", {},
        "ResNet-18, 11.2 M params; the most INT8-friendly on CPU (OV INT8 10.3 ms vs bf16 19.4 / fp32 37.7 @512; "
        "ORT U8S8 13.9 vs fp32 37.6 ms)"),
    "student-tiny": (
        "test_efficientnet", {},
        "timm test_efficientnet (MobileNet-like, ~0.1 M params): tests and demos only"),
}
ALIASES = {
    "mnv4-small": "mobilenetv4_conv_small",
    "mnv4-small-050": "mobilenetv4_conv_small_050",
    "vit-tiny-32": "vit_tiny_patch32",
    "vit-tiny-32c": "vit_tiny_c32",
    "repvit-m0.9": "repvit_m0_9",
    "mobileone-s0": "mobileone_s0",
    "resnet-18": "resnet18",
}
_VIT_FAMILIES = ("vit_", "deit_")


def _is_vit(timm_name: str) -> bool:
    return timm_name.startswith(_VIT_FAMILIES)


def _conv_stem_embed(channels: Sequence[int]) -> Any:
    """timm embed_layer for a ViT whose tokens come from a conv stem: one 3 x 3 stride-2 conv + BN + ReLU per
    entry of `channels` (so stride 2 ** len(channels), must be 32), then a 1 x 1 conv to the embed dim."""
    from timm.layers import HybridEmbed
    from timm.models.vision_transformer_hybrid import ConvStem

    chs = [int(c) for c in channels]
    if 2 ** len(chs) != STRIDE or min(chs, default=0) < 1:
        raise ConfigError(f"conv_stem needs {STRIDE.bit_length() - 1} positive channel counts (stride {STRIDE}), "
                          f"got {channels}")

    def embed(img_size: Any, in_chans: int, embed_dim: int, **kwargs: Any) -> nn.Module:
        # the last ConvStem layer is a plain conv with bias: the 1 x 1 projection to embed_dim
        stem = ConvStem(in_chans=in_chans, depth=len(chs) + 1, channels=(*chs, embed_dim),
                        kernel_size=(3,) * len(chs) + (1,), stride=(2,) * len(chs) + (1,))
        kwargs.pop("patch_size", None)
        return HybridEmbed(stem, img_size=img_size, patch_size=1, in_chans=in_chans, embed_dim=embed_dim,
                           proj=False, **kwargs)

    return embed


class StudentEncoder(nn.Module):
    """A timm backbone with the teacher's features API (see module docstring). Input B x 1 x H x W."""

    def __init__(self, cfg: StudentConfig) -> None:
        super().__init__()
        import timm

        self.cfg = cfg
        kwargs = dict(cfg.timm_kwargs)
        if cfg.input_scale not in (1, 2, 4):
            raise ConfigError(f"student {cfg.name!r}: input_scale must be 1, 2 or 4, got {cfg.input_scale}")
        if _is_vit(cfg.timm_name):
            # fixed-size positional table for the deployment resolution (no resize in forward)
            h, w = as_pair(cfg.img_size)
            kwargs.setdefault("img_size", (h * cfg.input_scale, w * cfg.input_scale))
            if "conv_stem" in kwargs:
                kwargs["embed_layer"] = _conv_stem_embed(kwargs.pop("conv_stem"))
        try:
            self.body = timm.create_model(cfg.timm_name, pretrained=False, in_chans=1, num_classes=0, **kwargs)
        except (RuntimeError, TypeError, ValueError) as exc:
            raise ConfigError(f"cannot build student {cfg.name!r} (timm {cfg.timm_name!r}, {kwargs}): {exc}") from exc
        self._vit = _is_vit(cfg.timm_name)
        self.embed_dim = int(self.body.num_features)
        self.num_global_tokens = 0
        self.patch_size = (STRIDE // cfg.input_scale, STRIDE // cfg.input_scale)  # in input pixels
        self.input_size = as_pair(cfg.img_size)
        self.input_scale = cfg.input_scale
        info = getattr(self.body, "feature_info", None) or []
        # (channels, stride) of every stage forward_intermediates can return (stride in the body's pixels)
        self.stage_info: list[tuple[int, int]] = [(int(d["num_chs"]), int(d["reduction"])) for d in info]
        if self.stage_info and self.stage_info[-1][1] != STRIDE:
            raise ConfigError(f"student {cfg.name!r}: last stage has stride {self.stage_info[-1][1]}, need {STRIDE}")
        if cfg.reparameterized:
            self.reparameterize()

    # -- features API ------------------------------------------------------------------------
    @staticmethod
    def _image(x: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
        if isinstance(x, Mapping):
            if "bscan" not in x:
                raise InputError(f"students take a B-scan only; got modalities {sorted(x)}")
            x = x["bscan"]
        if x.dim() != 4 or x.shape[1] != 1:
            raise InputError(f"student input must be B x 1 x H x W, got {tuple(x.shape)}")
        return x

    def _body_input(self, x: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
        """B x 1 x H x W -> B x 1 x sH x sW, s = input_scale."""
        x = self._image(x)
        s = self.cfg.input_scale
        if s == 1:
            return x
        return nn.functional.interpolate(x, size=(x.shape[-2] * s, x.shape[-1] * s), mode="bilinear",
                                         align_corners=False)

    def token_grid(self, h: int, w: int) -> tuple[int, int]:
        """Token grid (rows, cols) for an H x W input: H * input_scale / 32 (encoder protocol, models/task.py)."""
        s = self.cfg.input_scale
        return int(h) * s // STRIDE, int(w) * s // STRIDE

    def grid_size(self, hw: Sequence[int] | None = None) -> tuple[int, int]:
        h, w = hw if hw is not None else self.input_size
        return self.token_grid(h, w)

    def forward_feature_map(self, x: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
        """B x 1 x H x W -> B x C x sH/32 x sW/32 (s = input_scale, 1 by default)."""
        x = self._body_input(x)
        if self._vit:
            tokens = self.body.forward_features(x)  # B x (prefix + N) x C
            tokens = tokens[:, getattr(self.body, "num_prefix_tokens", 0):]
            gh, gw = x.shape[-2] // STRIDE, x.shape[-1] // STRIDE
            return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], gh, gw)
        return self.body.forward_features(x)

    def forward_features(self, x: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
        """B x 1 x H x W -> B x N x C tokens (row-major stride-32 grid, no global token)."""
        fmap = self.forward_feature_map(x)
        return fmap.flatten(2).transpose(1, 2)

    def forward_intermediates(self, x: torch.Tensor | Mapping[str, torch.Tensor],
                              indices: Sequence[int]) -> list[torch.Tensor]:
        """Stage outputs B x C_i x h_i x w_i for stage `indices` (negative counts from the end)."""
        x = self._body_input(x)
        n = len(self.stage_info)
        idx = [i % n for i in indices]
        # timm: an int means "the last n"; a list selects stages by index
        return list(self.body.forward_intermediates(x, indices=idx, intermediates_only=True))

    def forward(self, x: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.forward_features(x)

    @property
    def mirage_edge_spec(self) -> dict[str, Any]:
        """Registry name + kwargs that rebuild this encoder (used by mirage_edge.models.save_model)."""
        return {"name": self.cfg.name, "kwargs": {"img_size": self.cfg.img_size,
                                                  "reparameterized": self.cfg.reparameterized,
                                                  "input_scale": self.cfg.input_scale,
                                                  **{k: v for k, v in self.cfg.timm_kwargs.items()
                                                     if k not in STUDENTS[self.cfg.name][1]}}}

    # -- deployment ---------------------------------------------------------------------------
    def reparameterize(self) -> "StudentEncoder":
        """Fuse re-parameterisable branches (MobileOne, RepViT) into single convs, in place."""
        from timm.utils.model import reparameterize_model

        self.body = reparameterize_model(self.body, inplace=True)
        self.cfg.reparameterized = True
        return self


def build_student(name: str, img_size: int | Sequence[int] = 512, input_scale: int = 1,
                  **timm_kwargs: Any) -> StudentEncoder:
    """Student `name` (registered name or alias) built for `img_size` (int or (H, W)) inputs, upsampled by
    `input_scale` inside the model (see StudentConfig)."""
    key = ALIASES.get(name, name)
    if key not in STUDENTS:
        raise ConfigError(f"unknown student {name!r}; known: {', '.join(sorted([*STUDENTS, *ALIASES]))}")
    timm_name, base_kwargs, _ = STUDENTS[key]
    reparam = bool(timm_kwargs.pop("reparameterized", False))
    h, w = as_pair(img_size)
    cfg = StudentConfig(name=key, timm_name=timm_name, img_size=h if h == w else [h, w],
                        timm_kwargs={**base_kwargs, **timm_kwargs}, reparameterized=reparam,
                        input_scale=int(input_scale))
    return StudentEncoder(cfg)


def student_from_config(cfg: Mapping[str, Any]) -> StudentEncoder:
    """Rebuild a student from ``StudentConfig.to_dict()`` output (e.g. a checkpoint's config.json)."""
    from mirage_edge.config import from_dict

    return StudentEncoder(from_dict(StudentConfig, dict(cfg), source="student config"))


def _hw(size: int | Sequence[int]) -> str:
    h, w = as_pair(size)
    return f"{h}x{w}"


def is_student(name: str) -> bool:
    return ALIASES.get(name, name) in STUDENTS


def _register(name: str, alias: str | None = None) -> None:
    def builder(pretrained: bool = False, img_size: int | Sequence[int] | None = None,
                input_size: int | Sequence[int] | None = None, **kwargs: Any) -> StudentEncoder:
        if pretrained:
            # students start from random weights: no download ever (offline, licence-clean)
            raise ConfigError(f"student {name!r} has no pretrained weights; distill it from a teacher")
        if input_size is not None:  # the teachers' keyword (export --input-size, bench registry rows)
            size = as_pair(input_size)
            if img_size is not None and size != as_pair(img_size) and _is_vit(STUDENTS[name][0]):
                # its learned positional table has one entry per token of img_size (a checkpoint's)
                raise ConfigError(f"student {name!r} is a ViT with a fixed {_hw(img_size)} input (learned "
                                  f"positional table); it cannot run at {_hw(size)}: drop --input-size")
            img_size = size
        return build_student(name, img_size=512 if img_size is None else img_size, **kwargs)

    builder.__doc__ = STUDENTS[name][2]
    register_model(builder, name=name)
    if alias:
        register_model(builder, name=alias)


for _name in STUDENTS:
    _register(_name, next((a for a, n in ALIASES.items() if n == _name), None))


@register_model(name="projected-student")
def projected_student(pretrained: bool = False, student: str = "student-tiny", img_size: int | Sequence[int] = 512,
                      reparameterized: bool = False, teacher_dim: int = 192, teacher_grid: Sequence[int] = (16, 16),
                      num_global_tokens: int = 1, layer_map: Mapping[str, int] | None = None,
                      upsample: str = "bilinear", input_scale: int = 1,
                      input_size: int | Sequence[int] | None = None) -> nn.Module:
    """A student + its learned projector into a teacher's token space (`mirage_edge.models.projector`):
    the encoder of distilled "drop-in" task models, rebuilt from checkpoints by this entry.
    `upsample` defaults to "bilinear" here because checkpoints written before it existed used it.
    `input_size` (export --input-size) rebuilds it for another size: the teacher grid scales
    with it (a teacher with P px patches has size / P tokens), so every weight keeps its shape."""
    from mirage_edge.models.projector import ProjectedStudent

    if pretrained:
        raise ConfigError("projected-student has no pretrained weights; load a distilled checkpoint instead")
    if input_size is not None:
        size, base = as_pair(input_size), as_pair(img_size)
        if size != base and _is_vit(STUDENTS[ALIASES.get(student, student)][0]):
            raise ConfigError(f"distilled student ({student}) is a ViT with a fixed {_hw(base)} input "
                              f"(learned positional table); it cannot run at {_hw(size)}: drop --input-size")
        grid = tuple(int(g) for g in teacher_grid)
        # one teacher token is base / grid px on each axis; the student's stride-32 map is input_scale x finer
        multiples = [math.lcm(b // math.gcd(b, g), STRIDE // math.gcd(STRIDE, input_scale)) for b, g in zip(base, grid)]
        if any(s % m for s, m in zip(size, multiples)):
            raise ConfigError(f"distilled student ({student}, built for {_hw(base)}, teacher grid {grid[0]}x{grid[1]}) "
                              f"needs an input size that is a multiple of {multiples[0]} x {multiples[1]}; got {_hw(size)}")
        teacher_grid = tuple(s * g // b for s, g, b in zip(size, grid, base))
        img_size = size
    enc = build_student(student, img_size=img_size, input_scale=input_scale, reparameterized=reparameterized)
    return ProjectedStudent(enc, teacher_dim, teacher_grid, num_global_tokens,
                            {int(k): int(v) for k, v in (layer_map or {}).items()}, upsample=upsample)

__all__ = ["StudentConfig", "StudentEncoder", "STUDENTS", "ALIASES", "build_student", "student_from_config",
           "is_student", "STRIDE"]
