"""The MIRAGE teacher: multimodal MultiMAE-style ViT (ARCHITECTURE.md §1-§8).

Token order everywhere: modality blocks in the order of the input dict, patch tokens row-major
inside a block, the global token(s) last; no final LayerNorm. The state-dict key names are the
official `.pth` names, so official weights load without renaming.

Encoder protocol (shared with students, see `mirage_edge.models.task`): `embed_dim`,
`num_global_tokens`, `token_grid(h, w)`, `forward_features(x)` with x a B x 1 x H x W B-scan
tensor or a dict modality -> tensor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

from mirage_edge.errors import InputError
from mirage_edge.models.adapters import PatchedInputAdapter, SemSegInputAdapter
from mirage_edge.models.config import IMAGE_MODALITIES, LAYERMAP, MirageConfig
from mirage_edge.models.decoders import Layout, SpatialOutputAdapter
from mirage_edge.models.layers import Block, init_weights
from mirage_edge.models.masking import sample_task_masks

Inputs = "torch.Tensor | Mapping[str, torch.Tensor]"


@dataclass
class MaskedEncoding:
    """Result of `MIRAGE.encode_masked`.

    tokens: B x (K+G) x D (visible tokens in sequence order, then global); ids_keep: B x K
    positions in the full sequence; masks: modality -> B x N_m int64 (1 = masked); layout: the
    (modality, start, end) blocks of the full sequence (given modalities first, then absent ones).
    """

    tokens: torch.Tensor
    ids_keep: torch.Tensor
    masks: dict[str, torch.Tensor]
    layout: Layout


def _is_tracing() -> bool:
    return bool(torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export())


class MIRAGE(nn.Module):
    """MIRAGE encoder (+ optional reconstruction decoders), built from a `MirageConfig`.

    forward(x) == forward_features(x): B x N x D tokens.
    """

    def __init__(self, cfg: MirageConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.dim_tokens
        self.embed_dim = d
        self.num_global_tokens = cfg.num_global_tokens
        self.global_tokens = nn.Parameter(torch.zeros(1, cfg.num_global_tokens, d))
        adapters = {}
        for m in cfg.in_domains:
            patch, grid, pos_grid = cfg.patch_size[m], cfg.grid(m), cfg.pos_grid[m]
            if m == LAYERMAP:
                adapters[m] = SemSegInputAdapter(cfg.semseg_num_classes, cfg.semseg_dim_class_emb, d,
                                                 patch, grid, pos_grid)
            else:
                adapters[m] = PatchedInputAdapter(1, d, patch, grid, pos_grid)
        self.input_adapters = nn.ModuleDict(adapters)
        if cfg.out_domains:
            self.output_adapters = nn.ModuleDict({
                t: SpatialOutputAdapter(
                    t, d, cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_num_heads, cfg.decoder_mlp_ratio,
                    cfg.layernorm_eps, list(cfg.in_domains), cfg.grid(t), cfg.pos_grid[t], cfg.patch_size[t],
                    cfg.decoder_num_channels[t], cfg.num_global_tokens,
                ) for t in cfg.out_domains
            })
        else:
            self.output_adapters = None
        self.encoder = nn.ModuleList([
            Block(d, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, cfg.layernorm_eps) for _ in range(cfg.depth)
        ])
        if self.global_tokens.device.type != "meta":
            init_weights(self)
            nn.init.trunc_normal_(self.global_tokens, std=0.02)

    # ----------------------------------------------------------------- encoder protocol
    @property
    def modalities(self) -> list[str]:
        return list(self.cfg.in_domains)

    @property
    def default_modality(self) -> str:
        """The modality a plain tensor is taken as (bscan, else the first image modality)."""
        return "bscan" if "bscan" in self.cfg.in_domains else self.cfg.in_domains[0]

    @property
    def input_size(self) -> tuple[int, int]:
        return tuple(self.cfg.input_size[self.default_modality])  # type: ignore[return-value]

    @property
    def patch_size(self) -> tuple[int, int]:
        return tuple(self.cfg.patch_size[self.default_modality])  # type: ignore[return-value]

    def token_grid(self, h: int, w: int) -> tuple[int, int]:
        """Patch-token grid (rows, cols) for an H x W B-scan."""
        ph, pw = self.patch_size
        return h // ph, w // pw

    # ----------------------------------------------------------------- input handling
    def _as_dict(self, inputs: Inputs) -> dict[str, torch.Tensor]:
        if isinstance(inputs, torch.Tensor):
            return {self.default_modality: inputs}
        if not isinstance(inputs, Mapping) or not inputs:
            raise InputError("MIRAGE input must be a tensor (B x 1 x H x W B-scan) or a non-empty "
                             f"dict modality -> tensor; got {type(inputs).__name__}")
        return dict(inputs)

    def _check(self, m: str, x: torch.Tensor, batch: int | None) -> None:
        """Shape/dtype checks on static properties only (so export traces them away)."""
        if m not in self.input_adapters:
            raise InputError(f"unknown modality {m!r}; this model takes {self.modalities}")
        exp_h, exp_w = self.cfg.input_size[m]
        ph, pw = self.cfg.patch_size[m]
        if m == LAYERMAP:
            if x.dim() != 3:
                raise InputError(f"{m} must be B x H x W class indices, got shape {tuple(x.shape)}")
            if x.dtype not in (torch.int64, torch.int32):
                raise InputError(f"{m} must be an int64 class map, got dtype {x.dtype}")
            h, w = x.shape[-2:]
        else:
            if x.dim() != 4:
                raise InputError(f"{m} must be B x 1 x H x W, got shape {tuple(x.shape)}")
            if x.shape[1] != 1:
                raise InputError(f"{m} must have 1 channel (grey), got {x.shape[1]} channels "
                                 f"(shape {tuple(x.shape)})")
            if not x.is_floating_point():
                raise InputError(f"{m} must be float in [0, 1], got dtype {x.dtype}")
            h, w = x.shape[-2:]
        if h % ph or w % pw:
            raise InputError(f"{m} size {h}x{w} is not a multiple of the patch size {ph}x{pw}")
        if (h, w) != (exp_h, exp_w):
            raise InputError(
                f"{m} size {h}x{w} differs from the model's input size {exp_h}x{exp_w}; positional "
                f"tables are fixed at build time: create the model with input_size=({h}, {w}) or "
                f"call model.set_input_size(({h}, {w}))"
            )
        if batch is not None and x.shape[0] != batch:
            raise InputError(f"batch sizes differ between modalities ({m}: {x.shape[0]} vs {batch})")
        if m == LAYERMAP and not _is_tracing() and x.numel() and (
            int(x.min()) < 0 or int(x.max()) >= self.cfg.semseg_num_classes
        ):
            raise InputError(f"{m} values must be in 0..{self.cfg.semseg_num_classes - 1}, "
                             f"got {int(x.min())}..{int(x.max())}")

    def embed_inputs(self, inputs: Inputs) -> dict[str, torch.Tensor]:
        """Input adapter outputs: modality -> B x N_m x D (patch projection + positions)."""
        inputs = self._as_dict(inputs)
        batch = None
        out = {}
        for m, x in inputs.items():
            self._check(m, x, batch)
            batch = x.shape[0]
            out[m] = self.input_adapters[m](x)
        return out

    # ----------------------------------------------------------------- unmasked forward
    def _tokens(self, inputs: Inputs) -> torch.Tensor:
        toks = list(self.embed_inputs(inputs).values())
        glob = self.global_tokens.expand(toks[0].shape[0], -1, -1)
        return torch.cat([*toks, glob], dim=1)

    def forward_features(self, inputs: Inputs) -> torch.Tensor:
        """Encoder output B x N x D (dict order, row-major, global token(s) last, no final norm)."""
        x = self._tokens(inputs)
        for blk in self.encoder:
            x = blk(x)
        return x

    def forward(self, inputs: Inputs) -> torch.Tensor:
        return self.forward_features(inputs)

    def forward_intermediates(self, inputs: Inputs, indices: int | Sequence[int] = 1) -> list[torch.Tensor]:
        """Outputs of the chosen blocks (each B x N x D), in the order of `indices`.

        `indices`: an int n (the last n blocks) or block indices (negative counts from the end).
        """
        depth = len(self.encoder)
        if isinstance(indices, int):
            wanted = list(range(depth - indices, depth))
        else:
            wanted = [i + depth if i < 0 else i for i in indices]
        bad = [i for i in wanted if not 0 <= i < depth]
        if bad:
            raise InputError(f"block indices {bad} out of range for depth {depth}")
        keep = set(wanted)
        x = self._tokens(inputs)
        outs: dict[int, torch.Tensor] = {}
        for i, blk in enumerate(self.encoder):
            x = blk(x)
            if i in keep:
                outs[i] = x
            if i >= max(wanted):
                break
        return [outs[i] for i in wanted]

    # ----------------------------------------------------------------- masked (pretraining) forward
    def _layout(self, given: list[str]) -> Layout:
        layout, start = [], 0
        for m in given + [m for m in self.cfg.in_domains if m not in given]:
            gh, gw = self.cfg.grid(m)
            layout.append((m, start, start + gh * gw))
            start += gh * gw
        return layout

    def encode_masked(self, inputs: Inputs, task_masks: Mapping[str, torch.Tensor] | None = None,
                      num_encoded_tokens: int | None = None, alphas: float | Sequence[float] = 1.0,
                      generator: torch.Generator | None = None) -> MaskedEncoding:
        """Encode only the visible tokens (§6.1, §7).

        task_masks: modality -> B x N_m (1 = masked, 0 = visible); every sample must have the same
        number of visible tokens. Modalities of the model absent from `inputs` are fully masked
        (as the official wrapper does). Without masks, K = `num_encoded_tokens` tokens are drawn
        per sample with Dirichlet(alphas) shares over the given modalities.
        """
        embedded = self.embed_inputs(inputs)
        given = list(embedded)
        b = next(iter(embedded.values())).shape[0]
        device = self.global_tokens.device
        layout = self._layout(given)
        counts = {m: e - s for m, s, e in layout}
        if task_masks is None:
            n_given = sum(counts[m] for m in given)
            k = num_encoded_tokens if num_encoded_tokens is not None else max(1, round(n_given * 98 / 768))
            if not 0 < k <= n_given:
                raise InputError(f"num_encoded_tokens={k} must be in 1..{n_given} (visible tokens available)")
            masks = sample_task_masks(b, {m: counts[m] for m in given}, k, alphas, generator, device)
        else:
            masks = {}
            for m, mk in task_masks.items():
                if m not in counts:
                    raise InputError(f"task mask for unknown modality {m!r}; model has {self.modalities}")
                if tuple(mk.shape) != (b, counts[m]):
                    raise InputError(f"task mask {m!r} must be B x N = {b} x {counts[m]}, "
                                     f"got {tuple(mk.shape)}")
                masks[m] = mk.to(device=device, dtype=torch.long)
        for m, _, _ in layout:
            if m not in masks:
                masks[m] = torch.ones(b, counts[m], dtype=torch.long, device=device)
        for m in masks:
            if m not in given and bool((masks[m] == 0).any()):
                raise InputError(f"modality {m!r} is marked visible in task_masks but not given in inputs")
        mask_all = torch.cat([masks[m] for m, _, _ in layout], dim=1)
        visible = (mask_all == 0).sum(dim=1)
        if bool((visible != visible[0]).any()) or int(visible[0]) == 0:
            # The official code takes one count over the whole batch and silently encodes masked
            # tokens for some samples; we refuse instead.
            raise InputError("every sample needs the same, non-zero number of visible tokens; "
                             f"got {visible.tolist()}")
        k = int(visible[0])
        # Stable sort: visible tokens first in sequence order (the canonical order).
        ids_keep = torch.argsort(mask_all, dim=1, stable=True)[:, :k]
        d = self.embed_dim
        dtype = next(iter(embedded.values())).dtype
        full = torch.cat([embedded[m] if m in embedded
                          else torch.zeros(b, counts[m], d, device=device, dtype=dtype)
                          for m, _, _ in layout], dim=1)
        x = torch.gather(full, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
        x = torch.cat([x, self.global_tokens.expand(b, -1, -1)], dim=1)
        for blk in self.encoder:
            x = blk(x)
        return MaskedEncoding(x, ids_keep, {m: masks[m] for m, _, _ in layout}, layout)

    def forward_masked(self, inputs: Inputs, task_masks: Mapping[str, torch.Tensor] | None = None,
                       num_encoded_tokens: int | None = None, alphas: float | Sequence[float] = 1.0,
                       generator: torch.Generator | None = None
                       ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Pretraining forward: (predictions modality -> B x C x H x W, masks modality -> B x N_m).

        Predictions are raw intensities (bscan, slo) and raw 13-class logits (layer map), one per
        output adapter. See `encode_masked` for the masks; the loss is
        `mirage_edge.models.losses.masked_loss`.
        """
        if self.output_adapters is None:
            raise InputError("this MIRAGE model has no decoders (out_domains is empty)")
        enc = self.encode_masked(inputs, task_masks, num_encoded_tokens, alphas, generator)
        preds = {t: dec(enc.tokens, enc.ids_keep, enc.layout) for t, dec in self.output_adapters.items()}
        return preds, enc.masks

    def reconstruct(self, inputs: Inputs) -> dict[str, torch.Tensor]:
        """Decoder outputs with every given token visible (absent modalities predicted from the rest)."""
        inputs = self._as_dict(inputs)
        masks = {}
        for m, x in inputs.items():
            self._check(m, x, None)
            gh, gw = self.cfg.grid(m)
            masks[m] = torch.zeros(x.shape[0], gh * gw, dtype=torch.long, device=x.device)
        return self.forward_masked(inputs, task_masks=masks)[0]

    # ----------------------------------------------------------------- resizing
    @torch.no_grad()
    def set_input_size(self, size: int | tuple[int, int]) -> "MIRAGE":
        """Rebuild every positional table for image inputs of `size` (in place, returns self).

        Tables are regenerated from the sin-cos formula at `cfg.pos_grid` and resized from there
        (bicubic for images, bilinear for the layer map and decoders), which equals resizing the
        official checkpoint tables. Decoders need all modalities on one grid (kept by design).
        """
        cfg = self.cfg.with_input_size(size)
        for m, ad in self.input_adapters.items():
            ad.grid = cfg.grid(m)
            ad.pos_emb = ad.make_pos_emb(self.embed_dim, cfg.pos_grid[m], cfg.grid(m)).to(ad.pos_emb)
        if self.output_adapters is not None:
            from mirage_edge.models.pos_embed import build_sincos_pos_embed, resize_pos_embed

            for t, dec in self.output_adapters.items():
                dec.grid = cfg.grid(t)
                table = build_sincos_pos_embed(tuple(cfg.pos_grid[t]), cfg.decoder_dim)
                dec.pos_emb = resize_pos_embed(table, dec.grid, "bilinear").to(dec.pos_emb)
        self.cfg = cfg
        return self


def image_modalities(cfg: MirageConfig) -> list[str]:
    return [m for m in cfg.in_domains if m in IMAGE_MODALITIES]
