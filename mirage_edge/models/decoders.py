"""MIRAGE spatial output adapters: cross-attention decoders for the reconstruction (§8)."""
from __future__ import annotations

import torch
from torch import nn

from mirage_edge.models.layers import Block, CrossAttention, Mlp
from mirage_edge.models.pos_embed import build_sincos_pos_embed, resize_pos_embed

# (modality, start, end) of each block of the full token sequence, in sequence order.
Layout = list[tuple[str, int, int]]


class SpatialOutputAdapter(nn.Module):
    """Decoder for output modality `t`.

    forward(encoded B x (K+G) x D, ids_keep B x K, layout) -> B x C x H x W: raw intensities for
    images, raw class logits for the layer map. `ids_keep` are the positions (in the full
    sequence described by `layout`) of the K encoded patch tokens, in encoded order.
    """

    def __init__(self, target: str, dim_tokens_enc: int, dim: int, depth: int, num_heads: int,
                 mlp_ratio: float, eps: float, task_names: list[str], grid: tuple[int, int],
                 pos_grid: tuple[int, int], patch: tuple[int, int], num_channels: int,
                 num_global_tokens: int) -> None:
        super().__init__()
        self.target, self.grid, self.patch = target, tuple(grid), tuple(patch)
        self.num_channels = num_channels
        self.num_global_tokens = num_global_tokens
        # Registration order mirrors the official state dict (only cosmetic: loading is by name).
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer(
            "pos_emb", resize_pos_embed(build_sincos_pos_embed(tuple(pos_grid), dim), self.grid, "bilinear")
        )
        self.task_embeddings = nn.ParameterDict({t: nn.Parameter(torch.zeros(1, 1, dim)) for t in task_names})
        self.decoder = CrossAttention(dim, num_heads)
        self.context_norm = nn.LayerNorm(dim, eps=eps)
        self.query_norm = nn.LayerNorm(dim, eps=eps)
        self.out_norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.decoder_transformer = nn.Sequential(
            *[Block(dim, num_heads, mlp_ratio, True, eps) for _ in range(depth)]
        )
        self.out_proj = nn.Linear(dim, num_channels * self.patch[0] * self.patch[1])
        self.proj_context = nn.Linear(dim_tokens_enc, dim)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        for p in self.task_embeddings.values():
            nn.init.trunc_normal_(p, std=0.02)

    def forward(self, encoded: torch.Tensor, ids_keep: torch.Tensor, layout: Layout) -> torch.Tensor:
        b, k = ids_keep.shape
        z = self.proj_context(encoded)
        z_vis, z_glob = z[:, :k], z[:, k:]
        dim = z.shape[-1]
        total = layout[-1][2]
        # Full-length sequence: visible tokens back at their index, mask tokens elsewhere.
        idx = ids_keep.unsqueeze(-1).expand(-1, -1, dim)
        # Under autocast z is bf16/fp16 while the mask token parameter stays fp32: scatter needs one dtype.
        seq = self.mask_token.to(z.dtype).expand(b, total, dim).scatter(1, idx, z_vis)
        # Every input block gets its task embedding + this decoder's (target-grid) positions.
        pos = self.pos_emb.flatten(2).transpose(1, 2)  # 1 x (gh*gw) x Dd
        seq = seq + torch.cat([self.task_embeddings[name] + pos for name, _, _ in layout], dim=1)
        start, end = next((s, e) for name, s, e in layout if name == self.target)
        queries = seq[:, start:end]
        context = torch.cat([torch.gather(seq, 1, idx), z_glob], dim=1)
        x = self.decoder(self.query_norm(queries), self.context_norm(context))
        x = x + self.mlp(self.out_norm(x))
        x = self.decoder_transformer(x)
        return self.unpatchify(self.out_proj(x))

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """B x (gh*gw) x (C*P*P) -> B x C x (gh*P) x (gw*P); vector read as (C, Ph, Pw)."""
        (gh, gw), (ph, pw), c = self.grid, self.patch, self.num_channels
        b = x.shape[0]
        x = x.reshape(b, gh, gw, c, ph, pw).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, c, gh * ph, gw * pw)
