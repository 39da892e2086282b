"""MIRAGE input adapters (ARCHITECTURE.md §3): modality tensor -> B x N x D tokens + fixed positions."""
from __future__ import annotations

import torch
from torch import nn

from mirage_edge.models.pos_embed import build_sincos_pos_embed, resize_pos_embed


class PatchedInputAdapter(nn.Module):
    """Image adapter (bscan, slo): Conv2d(C, D, P, stride P) -> row-major tokens + pos table.

    Input B x C x H x W float; output B x (gh*gw) x D. `pos_emb` (1 x D x gh x gw) is a persistent,
    non-trainable buffer precomputed for the model's grid (bicubic-resized from `pos_grid`).
    """

    pos_mode = "bicubic"

    def __init__(self, in_chans: int, dim: int, patch: tuple[int, int], grid: tuple[int, int],
                 pos_grid: tuple[int, int]) -> None:
        super().__init__()
        self.in_chans, self.patch, self.grid = in_chans, tuple(patch), tuple(grid)
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=self.patch, stride=self.patch)
        self.register_buffer("pos_emb", self.make_pos_emb(dim, pos_grid, grid))

    @classmethod
    def make_pos_emb(cls, dim: int, pos_grid: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
        return resize_pos_embed(build_sincos_pos_embed(tuple(pos_grid), dim), tuple(grid), cls.pos_mode)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)  # B x D x gh x gw
        return (x + self.pos_emb).flatten(2).transpose(1, 2)


class SemSegInputAdapter(PatchedInputAdapter):
    """Layer-map adapter: int64 B x H x W -> Embedding(13, E) -> Conv2d(E, D, P, stride P) + pos table.

    The positional table is resized bilinearly (the official run-time rule for this adapter).
    """

    pos_mode = "bilinear"

    def __init__(self, num_classes: int, dim_class_emb: int, dim: int, patch: tuple[int, int],
                 grid: tuple[int, int], pos_grid: tuple[int, int]) -> None:
        super().__init__(dim_class_emb, dim, patch, grid, pos_grid)
        self.num_classes = num_classes
        self.class_emb = nn.Embedding(num_classes, dim_class_emb)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        e = self.class_emb(x).permute(0, 3, 1, 2)  # B x E x H x W (channels first)
        return self.proj(e)
