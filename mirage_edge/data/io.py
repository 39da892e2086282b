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

Before decoding, the image size is read from the file header (`image_shape`): an image of more than
`pixel_limit()` pixels (default 100 megapixels; environment variable ``MIRAGE_EDGE_MAX_PIXELS``, 0 =
no limit) is refused, since a few-KB PNG can decode to gigabytes (a decompression bomb). Content that
is none of the formats above (whatever its suffix) is refused too: OpenCV would otherwise decode it
by its content (WebP, JPEG 2000, ...) without the size check.
"""
from __future__ import annotations

import logging
import os
import struct
from pathlib import Path
from typing import Any, BinaryIO, Sequence

import cv2
import numpy as np

from mirage_edge._io import atomic_write_bytes
from mirage_edge.errors import ConfigError, DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp", ".npy")

# BT.601 luma weights in OpenCV's BGR channel order.
_LUMA_BGR = np.array([0.114, 0.587, 0.299], dtype=np.float64)

MAX_PIXELS_ENV = "MIRAGE_EDGE_MAX_PIXELS"
DEFAULT_MAX_PIXELS = 100_000_000  # 10000 x 10000; OCT B-scans are well under 10 megapixels


def is_image_file(path: str | Path) -> bool:
    """True for a file name with a suffix `read_image` understands (case-insensitive)."""
    p = Path(path)
    return p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")


def pixel_limit() -> int:
    """Largest image (H * W pixels) `read_image` decodes: ``MIRAGE_EDGE_MAX_PIXELS``, else 100 M; 0 = any."""
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_PIXELS
    try:
        limit = int(raw)
    except ValueError:
        limit = -1
    if limit < 0:
        raise ConfigError(f"environment variable {MAX_PIXELS_ENV}={raw!r} must be a whole number of pixels "
                          f"(e.g. {DEFAULT_MAX_PIXELS}; 0 disables the limit)")
    return limit


def _tiff_shape(fh: BinaryIO, head: bytes) -> tuple[int, int] | None:
    # First IFD of a classic (42) or Big (43) TIFF: tags 256 ImageWidth, 257 ImageLength.
    bo = "<" if head[:2] == b"II" else ">"
    big = struct.unpack(bo + "H", head[2:4])[0] == 43
    if big:
        fh.seek(8)
        offset = struct.unpack(bo + "Q", fh.read(8))[0]
    else:
        offset = struct.unpack(bo + "I", head[4:8])[0]
    fh.seek(offset)
    count = struct.unpack(bo + ("Q" if big else "H"), fh.read(8 if big else 2))[0]
    size = 20 if big else 12
    entries = fh.read(min(count, 4096) * size)
    dims: dict[int, int] = {}
    for i in range(0, len(entries) - size + 1, size):
        tag, typ = struct.unpack(bo + "HH", entries[i:i + 4])
        value = entries[i + (12 if big else 8):i + size]
        fmt = {3: "H", 4: "I", 16: "Q"}.get(typ)  # SHORT, LONG, LONG8 (left-justified in the field)
        if tag in (256, 257) and fmt:
            dims[tag] = struct.unpack(bo + fmt, value[:struct.calcsize(fmt)])[0]
    return (dims[257], dims[256]) if len(dims) == 2 else None


def _jpeg_shape(fh: BinaryIO) -> tuple[int, int] | None:
    # Walk the marker segments up to the first SOFn frame header (C0..CF but DHT C4, JPG C8, DAC CC).
    fh.seek(2)
    while True:
        marker = fh.read(2)
        if len(marker) < 2 or marker[0] != 0xFF:
            return None
        code = marker[1]
        if code == 0xFF:  # fill byte
            fh.seek(-1, 1)
            continue
        if code in (0x01, *range(0xD0, 0xD9)):  # markers without a length
            continue
        if code == 0xDA:  # start of scan before any frame header
            return None
        length = struct.unpack(">H", fh.read(2))[0]
        if 0xC0 <= code <= 0xCF and code not in (0xC4, 0xC8, 0xCC):
            h, w = struct.unpack(">xHH", fh.read(5))
            return h, w
        fh.seek(length - 2, 1)


_MAGIC = ((b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8", "jpeg"), (b"II*\x00", "tiff"), (b"MM\x00*", "tiff"),
          (b"II+\x00", "tiff"), (b"MM\x00+", "tiff"), (b"BM", "bmp"), (b"\x93NUMPY", "npy"))


def _header(fh: BinaryIO) -> tuple[str, tuple[int, int] | None]:
    """(format, (H, W)) from the first bytes of an open image file; format "" when not recognised,
    (H, W) None when the header is cut short or damaged (the decoder then names the problem)."""
    head = fh.read(32)
    fmt = next((name for magic, name in _MAGIC if head.startswith(magic)), "")
    try:
        if fmt == "png":
            w, h = struct.unpack(">II", head[16:24])  # IHDR is always the first chunk
            return fmt, (h, w)
        if fmt == "jpeg":
            return fmt, _jpeg_shape(fh)
        if fmt == "tiff":
            return fmt, _tiff_shape(fh, head)
        if fmt == "bmp":
            if struct.unpack("<I", head[14:18])[0] == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
                w, h = struct.unpack("<HH", head[18:22])
            else:
                w, h = struct.unpack("<ii", head[18:26])  # height < 0: rows stored top-down
            return fmt, (abs(h), abs(w))
        if fmt == "npy":
            fh.seek(0)
            version = np.lib.format.read_magic(fh)
            shape = (np.lib.format.read_array_header_1_0(fh) if version == (1, 0)
                     else np.lib.format.read_array_header_2_0(fh))[0]
            return fmt, (int(shape[0]), int(shape[1])) if len(shape) >= 2 else None
    except (struct.error, ValueError, OSError):
        pass
    return fmt, None


def image_shape(path: str | Path) -> tuple[int, int] | None:
    """(H, W) of an image file read from its header only (nothing is decoded); None if unknown.

    Knows PNG, JPEG, TIFF (first page), BMP and .npy; cheap enough to run on every file of an index.
    """
    try:
        with open(path, "rb") as fh:
            return _header(fh)[1]
    except OSError:
        return None


def _check_header(path: Path, limit: int) -> None:
    try:
        with open(path, "rb") as fh:
            fmt, shape = _header(fh)
    except OSError as exc:
        raise DataError(f"cannot read image {path}: {exc}") from exc
    if not fmt:
        if path.stat().st_size == 0:
            return  # `_decode` says "the file is empty"
        what = "text, not" if _looks_like_text(path) else "not"
        raise DataError(f"cannot read image {path}: the content is {what} a PNG, TIFF, JPEG, BMP or .npy file")
    if shape is not None and limit and shape[0] * shape[1] > limit:
        h, w = shape
        raise DataError(
            f"image {path} is {h}x{w} pixels (H x W, {h * w / 1e6:.1f} megapixels), above the limit of "
            f"{limit} pixels that guards against decompression bombs; if the image is genuine, raise the "
            f"limit with the environment variable {MAX_PIXELS_ENV}={h * w} (0 disables the check)"
        )


def _looks_like_text(path: Path) -> bool:
    # A CSV, a note or an HTML error page saved under an image name: UTF-8 without control bytes.
    try:
        with open(path, "rb") as fh:
            head = fh.read(512)
        text = head.decode("utf-8", errors="ignore" if len(head) == 512 else "strict")
    except (OSError, UnicodeDecodeError):
        return False
    return bool(text) and all(c.isprintable() or c in "\t\r\n\f" for c in text)


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


def read_image(path: str | Path, max_pixels: int | None = None) -> np.ndarray:
    """Read one image as a 2-D grey array (H x W, uint8 / uint16 kept, floats as float32).

    Raises `DataError` naming `path` if the file is missing, empty, truncated, not an image,
    a multi-page/3-D stack, has an unsupported dtype, or has more than `max_pixels` pixels by its
    header (None: `pixel_limit()`, i.e. ``MIRAGE_EDGE_MAX_PIXELS`` or 100 M; 0: no limit).
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"image not found: {p}")
    _check_header(p, pixel_limit() if max_pixels is None else max_pixels)
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


__all__ = ["IMAGE_SUFFIXES", "MAX_PIXELS_ENV", "DEFAULT_MAX_PIXELS", "is_image_file", "image_shape",
           "pixel_limit", "read_image", "write_png", "encode_png"]
