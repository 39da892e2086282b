"""Learned projection of student features into the teacher's token space.

:class:`ProjectedStudent` wraps a student encoder (stride-32 feature map B x C x h x w) and maps it
to the teacher's B-scan token layout: B x (N + G) x D, N = gh * gw patch tokens in row-major order
followed by G global tokens (the teacher's `num_global_tokens`). The result is itself an encoder
with the teacher's features API (``embed_dim == D``), so the teacher's fine-tuned task head can run on
it unchanged ("drop-in" mode) and export/bench treat it like any encoder.

Grid alignment: at the teacher's 512 x 512 input with patch 32 the student's stride-32 grid equals
the teacher's 16 x 16 grid and no resampling happens. When the teacher grid is r times finer (a
teacher with 8 px patches at 128 px has 16 x 16 tokens, the student 4 x 4), the default
``upsample="shuffle"`` predicts the r x r tokens of each student cell from that cell (the last 1x1
conv outputs r^2 D channels, then PixelShuffle / ONNX DepthToSpace): a learned sub-pixel map, which
keeps detail that bilinear interpolation of the student map smears away (layer Dice of a
MobileNetV4 student on synthetic layers at 128 px: see distill/README.md). Otherwise the map is
resampled to the teacher grid first: average pooling when it is an integer multiple larger,
bilinear interpolation (align_corners=False) otherwise. Sizes are fixed at construction, so the
graph exports to ONNX.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def resample_to_grid(fmap: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """B x C x h x w -> B x C x gh x gw (identity, average pooling or bilinear; see module doc)."""
    h, w = fmap.shape[-2:]
    gh, gw = grid
    if (h, w) == (gh, gw):
        return fmap
    if h >= gh and w >= gw and h % gh == 0 and w % gw == 0:
        return F.avg_pool2d(fmap, kernel_size=(h // gh, w // gw))
    return F.interpolate(fmap, size=(gh, gw), mode="bilinear", align_corners=False)


def subpixel_factor(fmap_hw: Sequence[int], grid: Sequence[int]) -> int:
    """r when `grid` is exactly r (> 1) times finer than the map in both axes, else 1."""
    h, w = fmap_hw
    gh, gw = grid
    r = gh // h if h else 0
    return r if r > 1 and gh == r * h and gw == r * w else 1


class ConvProjector(nn.Module):
    """1x1 conv MLP C -> H -> D (GELU) on a feature map, brought to the teacher grid: B x N x D.

    fmap_hw: the student map's size (fixed for one input size); with `upsample="shuffle"` and a
    teacher grid r times finer, fc2 outputs r^2 D channels and PixelShuffle(r) lays them out (H
    is then r D: each student cell describes r^2 tokens)."""

    def __init__(self, in_dim: int, out_dim: int, grid: tuple[int, int], hidden: int | None = None,
                 fmap_hw: Sequence[int] | None = None, upsample: str = "shuffle") -> None:
        super().__init__()
        if upsample not in ("shuffle", "bilinear"):
            raise ValueError(f"upsample must be 'shuffle' or 'bilinear', not {upsample!r}")
        self.grid = tuple(grid)
        self.r = subpixel_factor(fmap_hw, grid) if fmap_hw and upsample == "shuffle" else 1
        hidden = hidden or out_dim * self.r
        self.fc1 = nn.Conv2d(in_dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, out_dim * self.r ** 2, 1)
        self.shuffle = nn.PixelShuffle(self.r) if self.r > 1 else nn.Identity()

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        if self.r == 1:
            fmap = resample_to_grid(fmap, self.grid)
        x = self.shuffle(self.fc2(self.act(self.fc1(fmap))))
        return x.flatten(2).transpose(1, 2)


class ProjectedStudent(nn.Module):
    """Student encoder + projectors: an encoder whose tokens live in the teacher's space.

    student:        a `StudentEncoder` (or anything with forward_feature_map / stage_info).
    teacher_dim:    D, the teacher's token width.
    teacher_grid:   (gh, gw) of the teacher's B-scan tokens at this input size.
    num_global_tokens: G, appended after the patch tokens (predicted from the pooled features).
    layer_map:      {teacher layer index: student stage index} for intermediate-layer matching.
    upsample:       "shuffle" (learned sub-pixel map where the teacher grid is r x finer) or
                    "bilinear" (resample the student map; checkpoints from before 28 Nov 2026).
    """

    def __init__(self, student: nn.Module, teacher_dim: int, teacher_grid: Sequence[int],
                 num_global_tokens: int = 1, layer_map: Mapping[int, int] | None = None,
                 upsample: str = "shuffle") -> None:
        super().__init__()
        self.student = student
        self.embed_dim = int(teacher_dim)
        self.teacher_grid = (int(teacher_grid[0]), int(teacher_grid[1]))
        self.num_global_tokens = int(num_global_tokens)
        self.input_size = tuple(getattr(student, "input_size", (0, 0)))
        self.patch_size = (self.input_size[0] // self.teacher_grid[0], self.input_size[1] // self.teacher_grid[1]) \
            if self.input_size[0] else (32, 32)
        self.upsample = upsample
        c = int(student.embed_dim)
        stride = int(stages[-1][1]) if (stages := getattr(student, "stage_info", None)) else 32
        scale = int(getattr(student, "input_scale", 1))  # the student upsamples its input by this
        hw = (self.input_size[0] * scale // stride, self.input_size[1] * scale // stride) if self.input_size[0] else None
        self.proj = ConvProjector(c, self.embed_dim, self.teacher_grid, fmap_hw=hw, upsample=upsample)
        if self.num_global_tokens:
            self.global_proj = nn.Sequential(nn.Linear(c, self.embed_dim), nn.GELU(),
                                             nn.Linear(self.embed_dim, self.embed_dim * self.num_global_tokens))
        self.layer_map = {int(k): int(v) for k, v in (layer_map or {}).items()}
        stages = getattr(student, "stage_info", [])
        self.inter_proj = nn.ModuleDict()
        for t_idx, s_idx in self.layer_map.items():
            if not -len(stages) <= s_idx < len(stages):
                raise ValueError(f"student stage {s_idx} out of range (student has {len(stages)} stages)")
            s_hw = (self.input_size[0] * scale // stages[s_idx][1], self.input_size[1] * scale // stages[s_idx][1]) \
                if self.input_size[0] else None
            self.inter_proj[str(t_idx)] = ConvProjector(stages[s_idx][0], self.embed_dim, self.teacher_grid,
                                                        fmap_hw=s_hw, upsample=upsample)

    # features API --------------------------------------------------------------------------------
    def token_grid(self, h: int, w: int) -> tuple[int, int]:
        """The teacher's grid (fixed at construction; the student is built for one input size)."""
        return self.teacher_grid

    def _tokens(self, fmap: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(fmap)  # B x N x D
        if not self.num_global_tokens:
            return tokens
        pooled = fmap.mean(dim=(2, 3))  # B x C
        glob = self.global_proj(pooled).reshape(fmap.shape[0], self.num_global_tokens, self.embed_dim)
        return torch.cat([tokens, glob], dim=1)

    def forward_features(self, x: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
        """B x 1 x H x W -> B x (N + G) x D in the teacher's token layout (patches row-major, globals last)."""
        return self._tokens(self.student.forward_feature_map(x))

    def forward_distill(self, x: torch.Tensor | Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """One student pass -> (tokens B x (N + G) x D, {teacher layer: B x N x D projected stage})."""
        if not self.layer_map:
            return self.forward_features(x), {}
        idx = sorted(set(self.layer_map.values()))
        stage_maps = self.student.forward_intermediates(x, idx)
        by_stage = dict(zip(idx, stage_maps))
        # a second trunk pass: simpler than threading timm's per-family final norm/head convs
        fmap = self.student.forward_feature_map(x)
        inter = {t: self.inter_proj[str(t)](by_stage[s]) for t, s in self.layer_map.items()}
        return self._tokens(fmap), inter

    def forward_intermediates(self, x: torch.Tensor | Mapping[str, torch.Tensor],
                              indices: Sequence[int]) -> list[torch.Tensor]:
        """Projected intermediates for teacher layer `indices` (each must be in `layer_map`)."""
        _, inter = self.forward_distill(x)
        missing = [i for i in indices if i not in inter]
        if missing:
            raise KeyError(f"teacher layers {missing} have no projector (layer_map: {self.layer_map})")
        return [inter[i] for i in indices]

    def forward(self, x: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.forward_features(x)

    @property
    def mirage_edge_spec(self) -> dict[str, Any]:
        """Registry entry ("projected-student") + kwargs that rebuild this module (models.save_model)."""
        inner = self.student.mirage_edge_spec
        return {"name": "projected-student",
                "kwargs": {"student": inner["name"], "img_size": inner["kwargs"]["img_size"],
                           "reparameterized": inner["kwargs"]["reparameterized"],
                           "input_scale": inner["kwargs"]["input_scale"], "teacher_dim": self.embed_dim,
                           "teacher_grid": list(self.teacher_grid), "num_global_tokens": self.num_global_tokens,
                           "layer_map": {str(k): v for k, v in self.layer_map.items()},
                           "upsample": self.upsample}}

    def describe(self) -> dict[str, Any]:
        return {"teacher_dim": self.embed_dim, "teacher_grid": list(self.teacher_grid),
                "num_global_tokens": self.num_global_tokens,
                "layer_map": {str(k): v for k, v in self.layer_map.items()}, "upsample": self.upsample}


__all__ = ["ProjectedStudent", "ConvProjector", "resample_to_grid", "subpixel_factor"]
