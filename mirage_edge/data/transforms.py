"""Torch side of preprocessing: the training transform that reproduces `preprocess`, and augmentations.

`TorchPreprocess(spec)` applies `mirage_edge.data.preprocess.preprocess` with torch ops (batched,
any device), using the very same tap tables, so numpy and torch agree within float32 rounding
(tested < 1e-6 on 8- and 16-bit input). `Augment` adds the optional training augmentations to an
already preprocessed image (and its mask): horizontal flip, a small random affine, intensity
jitter. Evaluation uses no augmentation and is deterministic.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from mirage_edge.data.preprocess import PreprocessSpec, dtype_max, resize_taps
from mirage_edge.errors import InputError

_TORCH_MAX = {torch.uint8: 255.0, torch.uint16: 65535.0}


def _resize_axis(x: torch.Tensor, n_out: int, dim: int, method: str) -> torch.Tensor:
    n_in = x.shape[dim]
    if n_in == n_out:
        return x
    idx_np, w_np = resize_taps(n_in, n_out, method)
    idx = torch.from_numpy(np.array(idx_np)).to(x.device)
    w = torch.from_numpy(np.array(w_np)).to(x.device, x.dtype)
    shape = [1] * x.ndim
    shape[dim] = n_out
    out = None
    for k in range(idx.shape[1]):
        term = torch.index_select(x, dim, idx[:, k]) * w[:, k].reshape(shape)
        out = term if out is None else out + term
    return out


def torch_resize(x: torch.Tensor, size: tuple[int, int], interpolation: str = "area") -> torch.Tensor:
    """Resize the last two dims of float tensor `x` (... x H x W), rows first, like `preprocess.resize`."""
    x = _resize_axis(x, int(size[0]), x.ndim - 2, interpolation)
    return _resize_axis(x, int(size[1]), x.ndim - 1, interpolation)


def _minmax(x: torch.Tensor) -> torch.Tensor:
    lo = x.amin(dim=(-2, -1), keepdim=True)
    rng = x.amax(dim=(-2, -1), keepdim=True) - lo
    safe = torch.where(rng > 0, rng, torch.ones_like(rng))
    return torch.where(rng > 0, (x - lo) / safe, torch.zeros_like(x))


class TorchPreprocess(torch.nn.Module):
    """Torch twin of `preprocess(image, spec)`.

    forward(x, max_value=None): x is H x W, N x H x W or N x 1 x H x W (uint8, uint16 or float;
    numpy arrays are accepted too) — the shapes `preprocess` takes. Returns float32 1 x H' x W'
    for H x W input, else N x 1 x H' x W'. `max_value` overrides the dtype max used by "divide" (needed when a uint16
    image was already converted to float).
    """

    def __init__(self, spec: PreprocessSpec) -> None:
        super().__init__()
        self.spec = spec

    def forward(self, x: torch.Tensor | np.ndarray, max_value: float | None = None) -> torch.Tensor:
        spec = self.spec
        if isinstance(x, np.ndarray):
            scale = dtype_max(x.dtype, max_value if max_value is not None else spec.max_value)
            x = torch.from_numpy(np.ascontiguousarray(x.astype(np.float32)))
        else:
            if max_value is not None:
                scale = float(max_value)
            elif spec.max_value is not None:
                scale = float(spec.max_value)
            else:
                scale = _TORCH_MAX.get(x.dtype, 1.0)
            x = x.to(torch.float32)
        squeeze = x.ndim == 2
        if x.ndim == 2:
            x = x[None, None]
        elif x.ndim == 3:
            x = x[:, None]
        elif x.ndim != 4 or x.shape[1] != 1:
            raise InputError(f"TorchPreprocess expects H x W, N x H x W or N x 1 x H x W, got {tuple(x.shape)}")
        if spec.scaling == "divide":
            x = x / torch.tensor(scale, dtype=torch.float32)
        elif spec.minmax_order == "before_resize":
            x = _minmax(x)
        x = torch_resize(x, spec.size, spec.interpolation)
        if spec.scaling == "minmax" and spec.minmax_order == "after_resize":
            x = _minmax(x)
        x = x.clamp(0.0, 1.0).contiguous()
        return x[0] if squeeze else x

    def extra_repr(self) -> str:
        return repr(self.spec)


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentations (MIRAGE-like, milder by default). Probabilities in [0, 1]."""

    hflip: float = 0.5
    affine: float = 0.5          # probability of one random affine
    degrees: float = 8.0         # rotation +- degrees
    translate: float = 0.05      # +- fraction of the size
    scale: tuple[float, float] = (0.92, 1.08)
    intensity: float = 0.8       # probability of intensity jitter
    gain: tuple[float, float] = (0.8, 1.2)
    gamma: tuple[float, float] = (0.8, 1.25)
    speckle: float = 0.0         # probability of multiplicative speckle (OCT's own noise)
    speckle_std: float = 0.15    # its std: image * (1 + std * N(0, 1))


class Augment:
    """Random augmentation of a preprocessed image 1 x H x W in [0, 1] and an optional H x W mask.

    The same flip/affine is applied to the image (bilinear) and mask (nearest); borders replicate
    the edge (OCT: dark vitreous on top, choroid at the bottom), so no fake classes appear.
    Intensity jitter (gain, gamma) and speckle touch only the image, which is clipped back to [0, 1].
    Uses torch's global RNG (seeded per DataLoader worker) unless a generator is given.
    """

    def __init__(self, config: AugmentConfig | None = None, generator: torch.Generator | None = None) -> None:
        self.config = config or AugmentConfig()
        self.generator = generator

    def _u(self, lo: float = 0.0, hi: float = 1.0) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=self.generator))

    def __call__(self, image: torch.Tensor, mask: torch.Tensor | None = None):
        cfg = self.config
        if self._u() < cfg.hflip:
            image = image.flip(-1)
            mask = mask.flip(-1) if mask is not None else None
        if self._u() < cfg.affine:
            image, mask = self._affine(image, mask)
        if self._u() < cfg.intensity:
            image = (image.clamp(0, 1) ** self._u(*cfg.gamma)) * self._u(*cfg.gain)
        if cfg.speckle and self._u() < cfg.speckle:
            noise = torch.randn(image.shape, generator=self.generator, dtype=torch.float32)
            image = image * (1.0 + cfg.speckle_std * noise)
        image = image.clamp(0.0, 1.0)
        return image if mask is None else (image, mask)

    def _affine(self, image: torch.Tensor, mask: torch.Tensor | None):
        cfg = self.config
        angle = math.radians(self._u(-cfg.degrees, cfg.degrees))
        s = self._u(*cfg.scale)
        tx, ty = self._u(-cfg.translate, cfg.translate) * 2, self._u(-cfg.translate, cfg.translate) * 2
        h, w = image.shape[-2:]
        # affine_grid works in normalised coords; correct the rotation for non-square images.
        cos, sin = math.cos(angle) / s, math.sin(angle) / s
        theta = torch.tensor([[cos, -sin * h / w, tx], [sin * w / h, cos, ty]], dtype=torch.float32)
        grid = F.affine_grid(theta[None], [1, 1, h, w], align_corners=False)
        image = F.grid_sample(image[None].float(), grid, mode="bilinear", padding_mode="border",
                              align_corners=False)[0]
        if mask is not None:
            m = F.grid_sample(mask[None, None].float(), grid, mode="nearest", padding_mode="border",
                              align_corners=False)
            mask = m[0, 0].round().to(mask.dtype)
        return image, mask


__all__ = ["TorchPreprocess", "torch_resize", "Augment", "AugmentConfig"]
