"""Fixed 2-D sin-cos positional tables and their explicit resizing (ARCHITECTURE.md §3.3).

Tables are computed (or resized) once, when the model is built or a checkpoint is loaded, and
stored as buffers at the model's token grid; `forward` only adds them. Bicubic resizing inside
forward (as the official code does) is what breaks ONNX export, so it never happens there.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def build_sincos_pos_embed(grid: tuple[int, int], dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Sin-cos table, 1 x dim x gh x gw (float32), as MIRAGE/MultiMAE build it.

    For q = dim/4 and w_k = temperature^(-k/q), cell f (row-major, f = r*gw + c) gets
    ``[sin(a w), cos(a w), sin(b w), cos(b w)]`` with a = f // gh, b = f % gh. For square grids
    that is a = row, b = column; for non-square grids it is the official (transposed-enumeration)
    layout, kept for bit-compatibility.
    """
    gh, gw = grid
    if dim % 4:
        raise ValueError(f"sin-cos table width {dim} must be divisible by 4")
    q = dim // 4
    # float32 arithmetic on purpose: that is what the released tables were made with.
    omega = 1.0 / (temperature ** (torch.arange(q, dtype=torch.float32) / q))
    f = torch.arange(gh * gw)
    a = torch.div(f, gh, rounding_mode="floor").to(torch.float32)
    b = (f % gh).to(torch.float32)
    out_a = a[:, None] * omega[None, :]
    out_b = b[:, None] * omega[None, :]
    table = torch.cat([out_a.sin(), out_a.cos(), out_b.sin(), out_b.cos()], dim=1)  # (gh*gw) x dim
    return table.t().reshape(1, dim, gh, gw).contiguous()


def resize_pos_embed(table: torch.Tensor, grid: tuple[int, int], mode: str) -> torch.Tensor:
    """Resize a 1 x C x gh0 x gw0 table to `grid` (`mode` bicubic|bilinear, align_corners=False).

    Same call as the official run-time/loader resizing, so the numbers are identical. At the same
    size the table is returned unchanged (the official interpolate is the identity there too).
    """
    if tuple(table.shape[-2:]) == tuple(grid):
        return table
    if table.device.type == "meta":
        return torch.empty((*table.shape[:2], *grid), dtype=table.dtype, device="meta")
    out = F.interpolate(table.float(), size=tuple(grid), mode=mode, align_corners=False)
    return out.to(table.dtype)
