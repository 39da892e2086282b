"""The one preprocessing of mirage-edge (torch-free: numpy only): raw OCT image -> model input.

MIRAGE uses no mean/std normalisation (ARCHITECTURE.md §10-12):

* ``scaling="minmax"`` — per-image min-max to [0, 1], the official fine-tuning rule (segmentation
  scales *before* resizing, classification *after*; `minmax_order` picks which).
* ``scaling="divide"`` — divide by the dtype's maximum (255 for uint8, 65535 for uint16, or
  `max_value` for e.g. 12-bit data stored in uint16; float images are taken as already in [0, 1]),
  the pretraining / released-inference rule.

Pipeline of :func:`preprocess` (the torch training transform in `mirage_edge.data.transforms`
repeats it operation by operation, tested to agree within 1e-6)::

    x = float32(image)
    divide:              x = x / max_value
    minmax, "before":    x = (x - min) / (max - min)          (a constant image gives zeros)
    resize to spec.size  rows first, then columns, with a separable tap table (below)
    minmax, "after":     x = (x - min) / (max - min)
    clip to [0, 1]

Resizing is separable and expressed as a *tap table* per axis — for every output index, a few
source indices and float32 weights — so numpy and torch apply literally the same arithmetic:

* ``"linear"`` — half-pixel-centred linear interpolation with edge clamping; the semantics of
  ``cv2.INTER_LINEAR`` and ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False,
  antialias=False)``.
* ``"area"`` (default) — when shrinking an axis, each output pixel is the exact average of the
  source interval it covers (fractional coverage at the ends): ``cv2.INTER_AREA``'s downscaling.
  When enlarging an axis it falls back to ``"linear"``. Avoids the aliasing of plain linear
  down-sampling (e.g. 496 x 768 Spectralis scans -> 256 x 256), like skimage's anti-aliased resize.
* ``"nearest"`` — nearest source pixel with half-pixel centres (``cv2.INTER_NEAREST_EXACT``,
  torch ``"nearest-exact"``); the rule used for label masks (:func:`resize_mask`).
"""
from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping

import numpy as np

from mirage_edge.errors import ConfigError, InputError

Scaling = Literal["minmax", "divide"]
MinmaxOrder = Literal["before_resize", "after_resize"]
Interpolation = Literal["area", "linear", "nearest"]


@dataclass(frozen=True)
class PreprocessSpec:
    """How a raw grey image becomes a float32 model input (written into every artifact).

    size:          output (H, W) in pixels.
    scaling:       "minmax" (per image, MIRAGE fine-tuning) or "divide" (by the dtype max, MIRAGE
                   pretraining / released inference).
    minmax_order:  with "minmax": "before_resize" (MIRAGE segmentation) or "after_resize" (MIRAGE
                   classification). Ignored by "divide", whose order does not change the result.
    interpolation: "area" (anti-aliased shrinking, linear enlarging), "linear" or "nearest".
    max_value:     with "divide": the value that maps to 1.0; None = the dtype max (255 / 65535;
                   1.0 for float input). Set 4095 for 12-bit data stored as uint16.
    dtype:         output dtype; only "float32".
    """

    size: tuple[int, int] = (512, 512)
    scaling: Scaling = "minmax"
    minmax_order: MinmaxOrder = "before_resize"
    interpolation: Interpolation = "area"
    max_value: float | None = None
    dtype: Literal["float32"] = "float32"

    def __post_init__(self) -> None:
        size = tuple(int(s) for s in self.size)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"size must be (H, W) with positive ints, got {self.size!r}")
        object.__setattr__(self, "size", size)
        if self.scaling not in ("minmax", "divide"):
            raise ValueError(f"scaling must be 'minmax' or 'divide', got {self.scaling!r}")
        if self.minmax_order not in ("before_resize", "after_resize"):
            raise ValueError(f"minmax_order must be 'before_resize' or 'after_resize', got {self.minmax_order!r}")
        if self.interpolation not in ("area", "linear", "nearest"):
            raise ValueError(f"interpolation must be 'area', 'linear' or 'nearest', got {self.interpolation!r}")
        if self.max_value is not None and not self.max_value > 0:
            raise ValueError(f"max_value must be positive, got {self.max_value!r}")
        if self.dtype != "float32":
            raise ValueError(f"dtype must be 'float32', got {self.dtype!r}")

    # --- MIRAGE presets ----------------------------------------------------------------------
    @classmethod
    def for_segmentation(cls, size: int | tuple[int, int] = 1024) -> "PreprocessSpec":
        """MIRAGE segmentation fine-tuning: per-image min-max, then resize (paper size 1024)."""
        return cls(size=_pair(size), scaling="minmax", minmax_order="before_resize")

    @classmethod
    def for_classification(cls, size: int | tuple[int, int] = 512) -> "PreprocessSpec":
        """MIRAGE classification fine-tuning: resize, then per-image min-max (paper size 512)."""
        return cls(size=_pair(size), scaling="minmax", minmax_order="after_resize")

    @classmethod
    def for_pretraining(cls, size: int | tuple[int, int] = 512) -> "PreprocessSpec":
        """MIRAGE pretraining / released inference wrapper: divide by the dtype max."""
        return cls(size=_pair(size), scaling="divide")

    # --- serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        from mirage_edge.config import to_dict

        return to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str | None = None) -> "PreprocessSpec":
        from mirage_edge.config import from_dict

        return from_dict(cls, data, source=source or "preprocessing spec")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str | None = None) -> "PreprocessSpec":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{source or 'preprocessing spec'}: invalid JSON ({exc})") from exc
        return cls.from_dict(data, source=source)

    @classmethod
    def load(cls, path: str | Path) -> "PreprocessSpec":
        """Read a spec from a JSON/TOML file (a whole file, or its "preprocessing" table)."""
        from mirage_edge.config import read_file

        data = read_file(path)
        data = data.get("preprocessing", data) if isinstance(data.get("preprocessing"), dict) else data
        return cls.from_dict(data, source=str(path))

    def replace(self, **changes: Any) -> "PreprocessSpec":
        return dataclasses.replace(self, **changes)


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


# --- tap tables ----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def resize_taps(n_in: int, n_out: int, method: str) -> tuple[np.ndarray, np.ndarray]:
    """Tap table resizing one axis of length `n_in` to `n_out`.

    Returns (index int64 n_out x K, weight float32 n_out x K): out[j] = sum_k w[j,k] * in[idx[j,k]].
    Weights of each row sum to 1. Arrays are read-only (cached).
    """
    if n_in < 1 or n_out < 1:
        raise InputError(f"cannot resize an axis of length {n_in} to {n_out}")
    scale = n_in / n_out
    j = np.arange(n_out, dtype=np.float64)
    if method == "nearest":
        idx = np.minimum(np.floor((j + 0.5) * scale), n_in - 1).astype(np.int64)[:, None]
        w = np.ones((n_out, 1), dtype=np.float64)
    elif method == "linear" or (method == "area" and n_out >= n_in):
        src = np.maximum((j + 0.5) * scale - 0.5, 0.0)
        i0 = np.floor(src).astype(np.int64)
        lam = src - i0
        i0 = np.minimum(i0, n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        idx = np.stack([i0, i1], axis=1)
        w = np.stack([1.0 - lam, lam], axis=1)
    elif method == "area":
        # Output pixel j averages the source interval [j*scale, (j+1)*scale).
        k = int(np.ceil(scale)) + 1
        start = j * scale
        stop = (j + 1) * scale
        first = np.floor(start).astype(np.int64)
        idx = first[:, None] + np.arange(k)[None, :]
        lo = np.maximum(idx, start[:, None])
        hi = np.minimum(idx + 1, stop[:, None])
        w = np.clip(hi - lo, 0.0, None) / scale
        valid = idx < n_in
        w = np.where(valid, w, 0.0)
        idx = np.minimum(idx, n_in - 1)
    else:
        raise InputError(f"unknown interpolation {method!r}; use 'area', 'linear' or 'nearest'")
    idx = np.ascontiguousarray(idx, dtype=np.int64)
    w = np.ascontiguousarray(w, dtype=np.float32)
    idx.setflags(write=False)
    w.setflags(write=False)
    return idx, w


def _resize_axis(x: np.ndarray, n_out: int, axis: int, method: str) -> np.ndarray:
    n_in = x.shape[axis]
    if n_in == n_out:
        return x
    idx, w = resize_taps(n_in, n_out, method)
    shape = [1] * x.ndim
    shape[axis] = n_out
    out = None
    for k in range(idx.shape[1]):
        term = np.take(x, idx[:, k], axis=axis) * w[:, k].reshape(shape)
        out = term if out is None else out + term
    return out


def resize(x: np.ndarray, size: tuple[int, int], interpolation: str = "area") -> np.ndarray:
    """Resize the last two axes of float array `x` (... x H x W) to `size` (rows first, then columns)."""
    x = _resize_axis(x, int(size[0]), x.ndim - 2, interpolation)
    return _resize_axis(x, int(size[1]), x.ndim - 1, interpolation)


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an integer label mask (... x H x W), labels unchanged."""
    ih = resize_taps(mask.shape[-2], int(size[0]), "nearest")[0][:, 0]
    iw = resize_taps(mask.shape[-1], int(size[1]), "nearest")[0][:, 0]
    return mask[..., ih[:, None], iw[None, :]]


def dtype_max(dtype: np.dtype, max_value: float | None = None) -> float:
    """The value that "divide" scaling maps to 1.0 for images of `dtype`."""
    if max_value is not None:
        return float(max_value)
    dtype = np.dtype(dtype)
    if dtype == np.uint8:
        return 255.0
    if dtype == np.uint16:
        return 65535.0
    if np.issubdtype(dtype, np.floating) or dtype == np.bool_:
        return 1.0
    raise InputError(f"cannot scale images of dtype {dtype}; expected uint8, uint16 or float")


def _minmax(x: np.ndarray) -> np.ndarray:
    """Per-image min-max over the last two axes; constant images become 0."""
    lo = x.min(axis=(-2, -1), keepdims=True)
    rng = x.max(axis=(-2, -1), keepdims=True) - lo
    safe = np.where(rng > 0, rng, np.float32(1.0))
    return np.where(rng > 0, (x - lo) / safe, np.float32(0.0)).astype(np.float32, copy=False)


def preprocess(image: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Raw grey image(s) -> float32 model input in [0, 1].

    image: H x W -> returns 1 x H' x W'; N x H x W (or N x 1 x H x W) -> returns N x 1 x H' x W',
    with (H', W') = spec.size. uint8 / uint16 / float input. Raises `InputError` for other shapes,
    dtypes, or non-finite values.
    """
    arr = np.asarray(image)
    if arr.ndim == 4 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim not in (2, 3):
        raise InputError(f"preprocess expects H x W or N x H x W grey images, got shape {arr.shape}")
    if arr.shape[-1] < 1 or arr.shape[-2] < 1:
        raise InputError(f"preprocess got an empty image of shape {arr.shape}")
    scale = dtype_max(arr.dtype, spec.max_value)
    x = arr.astype(np.float32)
    if not np.isfinite(x).all():
        raise InputError("preprocess got NaN or infinite pixel values")
    if spec.scaling == "divide":
        x = x / np.float32(scale)
    elif spec.minmax_order == "before_resize":
        x = _minmax(x)
    x = resize(x, spec.size, spec.interpolation)
    if spec.scaling == "minmax" and spec.minmax_order == "after_resize":
        x = _minmax(x)
    x = np.clip(x, 0.0, 1.0).astype(np.float32, copy=False)
    return np.ascontiguousarray(x[None] if arr.ndim == 2 else x[:, None])


__all__ = [
    "PreprocessSpec", "preprocess", "resize", "resize_mask", "resize_taps", "dtype_max",
]
