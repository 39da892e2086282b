"""Image reading and writing for OCT data (torch-free: numpy + OpenCV, tifffile as a fallback).

`read_image(path)` always returns one 2-D grey array:

* dtype is kept for ``uint8`` and ``uint16`` (OCT devices write 8- or 16-bit); float images
  become ``float32``; ``bool`` becomes ``uint8``; other integer types become ``uint16`` when their
  values fit, else the call fails.
* ``H x W x 1`` is squeezed; ``H x W x 3`` / ``H x W x 4`` (alpha dropped) whose colour channels are
  identical ("3-channel grey", as many benchmark PNGs are) keeps one channel unchanged.
* Real colour is converted with the ITU-R BT.601 luma rule ``Y = 0.299 R + 0.587 G + 0.114 B``
  (the rule of ``cv2.COLOR_BGR2GRAY``, PIL ``convert("L")`` and torchvision ``Grayscale``), rounded
  half-to-even back to the input dtype.

Formats: PNG / TIFF / JPEG / BMP via ``cv2.imdecode(IMREAD_UNCHANGED)`` (bytes are read with
numpy so non-ASCII paths work), TIFF via ``tifffile`` when OpenCV cannot decode it (float TIFF,
unusual compression), and ``.npy`` arrays (the MIRAGE pretraining format). A file that is missing,
empty, truncated or not an image raises :class:`~mirage_edge.errors.DataError` naming the file; so
does a multi-page TIFF (a whole volume in one file), which would otherwise pass as its first page.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np

from mirage_edge._io import atomic_write_bytes
from mirage_edge.errors import DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp", ".npy")

# BT.601 luma weights in OpenCV's BGR channel order.
_LUMA_BGR = np.array([0.114, 0.587, 0.299], dtype=np.float64)


def is_image_file(path: str | Path) -> bool:
    """True for a file name with a suffix `read_image` understands (case-insensitive)."""
    p = Path(path)
    return p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")


def _decode(path: Path) -> np.ndarray:
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise DataError(f"cannot read image {path}: not a valid .npy array ({exc})") from exc
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise DataError(f"cannot read image {path}: {exc}") from exc
    if data.size == 0:
        raise DataError(f"cannot read image {path}: the file is empty")
    # libpng / libjpeg decode a truncated file partly (missing rows come back black) with only a
    # warning, so check the end markers ourselves.
    if suffix == ".png" and not _png_complete(data):
        raise DataError(f"cannot read image {path}: truncated PNG (no IEND chunk)")
    if suffix in (".jpg", ".jpeg") and b"\xff\xd9" not in data[-64:].tobytes():
        raise DataError(f"cannot read image {path}: truncated JPEG (no end-of-image marker)")
    img = None
    try:
        if suffix in (".tif", ".tiff"):
            ok, pages = cv2.imdecodemulti(data, cv2.IMREAD_UNCHANGED)  # imdecode would return page 1 only
            if ok:
                img = _one_page(pages, path)
        else:
            img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    except cv2.error:
        img = None
    if img is None and suffix in (".tif", ".tiff"):
        img = _read_tiff(path)
    if img is None:
        raise DataError(f"cannot read image {path}: not a readable image or truncated")
    return img


def _png_complete(data: np.ndarray) -> bool:
    # A complete PNG ends with the 12-byte IEND chunk: length 0, b"IEND", CRC.
    # (searched near the end: some writers append bytes after IEND)
    return data.size >= 20 and b"\x00\x00\x00\x00IEND" in data[-256:].tobytes()


def _read_tiff(path: Path) -> np.ndarray | None:
    try:
        import tifffile
    except ImportError:
        return None
    log.debug("%s: OpenCV cannot decode this TIFF, reading it with tifffile", path)
    try:
        with tifffile.TiffFile(path) as tif:
            arr = _one_page(tif.pages, path).asarray()
    except DataError:
        raise
    except Exception as exc:  # tifffile raises many kinds (TiffFileError, ValueError, struct.error)
        raise DataError(f"cannot read image {path}: not a readable TIFF ({exc})") from exc
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        arr = arr[..., [2, 1, 0, *range(3, arr.shape[-1])]]  # RGB(A) -> OpenCV's BGR(A)
    return arr


def _one_page(pages: Sequence[Any], path: Path) -> Any:
    if len(pages) != 1:
        raise DataError(
            f"cannot read image {path}: a TIFF with {len(pages)} pages, expected one B-scan per file. "
            f"Save each page as <scan>_<slice>.png (files sharing <scan> form one volume), or give the "
            f"Predictor the pages as one N x H x W array"
        )
    return pages[0]


def _to_grey(img: np.ndarray, path: Path) -> np.ndarray:
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim == 3 and img.shape[-1] in (3, 4):
        colour = img[..., :3]
        if np.array_equal(colour[..., 0], colour[..., 1]) and np.array_equal(colour[..., 0], colour[..., 2]):
            img = np.ascontiguousarray(colour[..., 0])
        else:
            y = colour.astype(np.float64) @ _LUMA_BGR
            if np.issubdtype(img.dtype, np.integer):
                info = np.iinfo(img.dtype)
                y = np.clip(np.rint(y), info.min, info.max)
            img = y.astype(img.dtype)
    if img.ndim != 2:
        raise DataError(
            f"cannot read image {path}: expected a 2-D grey image (or H x W x 3 grey), got shape {img.shape}"
        )
    if img.size == 0:
        raise DataError(f"cannot read image {path}: the image has no pixels ({img.shape})")
    return img


def _fix_dtype(img: np.ndarray, path: Path) -> np.ndarray:
    if img.dtype in (np.uint8, np.uint16):
        return img
    if img.dtype == np.bool_:
        return img.astype(np.uint8)
    if np.issubdtype(img.dtype, np.floating):
        out = img.astype(np.float32)
        if not np.isfinite(out).all():
            raise DataError(f"image {path} contains NaN or infinite values")
        return out
    if np.issubdtype(img.dtype, np.integer):
        lo, hi = int(img.min()), int(img.max())
        if lo >= 0 and hi <= 65535:
            return img.astype(np.uint8 if hi <= 255 else np.uint16)
        raise DataError(f"image {path} has dtype {img.dtype} with values {lo}..{hi} outside 0..65535")
    raise DataError(f"image {path} has unsupported dtype {img.dtype}")


def read_image(path: str | Path) -> np.ndarray:
    """Read one image as a 2-D grey array (H x W, uint8 / uint16 kept, floats as float32).

    Raises `DataError` naming `path` if the file is missing, empty, truncated, not an image,
    a multi-page/3-D stack, or has an unsupported dtype.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"image not found: {p}")
    img = _decode(p)
    img = _to_grey(np.asarray(img), p)
    return _fix_dtype(img, p)


def encode_png(array: np.ndarray, compression: int = 3) -> bytes:
    """PNG bytes of a 2-D uint8/uint16 (or bool) array; H x W x 3 arrays are written as BGR."""
    arr = np.asarray(array)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    if arr.dtype not in (np.uint8, np.uint16):
        raise DataError(f"write_png: dtype must be uint8 or uint16, got {arr.dtype}")
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (1, 3, 4)):
        raise DataError(f"write_png: expected H x W or H x W x {{1,3,4}}, got shape {arr.shape}")
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(arr), [cv2.IMWRITE_PNG_COMPRESSION, int(compression)])
    if not ok:
        raise DataError(f"write_png: OpenCV could not encode an array of shape {arr.shape}")
    return buf.tobytes()


def write_png(path: str | Path, array: np.ndarray, compression: int = 3) -> Path:
    """Write `array` (H x W uint8/uint16) as a PNG atomically (temp file + rename). Returns the path."""
    p = Path(path)
    atomic_write_bytes(p, encode_png(array, compression))
    return p


__all__ = ["IMAGE_SUFFIXES", "is_image_file", "read_image", "write_png", "encode_png"]
