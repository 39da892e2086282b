"""OCT device files -> `Volume`: `read_volume(path)` for every format, one library per format.

Which library reads which format, and why (the `vendor` extra: ``pip install "mirage-edge[vendor]"``):

=================  ==========================  ==============================================================
format             read with                   why
=================  ==========================  ==============================================================
Heidelberg .vol    eyepy ``import_heyex_vol``  eyepy returns the voxel size, laterality, the SLO localizer and
                                               each B-scan's start/end on it; oct-converter's VOL reader gives
                                               the B-scans without the localizer geometry.
HEYEX XML export   eyepy ``import_heyex_xml``  the only library that reads it (XML + one TIFF per B-scan).
Heidelberg .E2E    eyepy ``import_heyex_e2e``  same `EyeVolume` as .vol (scales, localizer, positions read
                                               from the file); oct-converter's E2E reader takes the lateral
                                               scale and B-scan spacing as arguments (defaults 0.01 / 0.05 mm,
                                               guesses), so thickness and volume would rest on guesses.
Topcon .fds        oct-converter ``FDS``       the only library that reads .fds; its pixel spacing comes from
                                               the file's PARAM_SCAN chunk. Positions follow eyepy's .fda rule
                                               (a horizontal raster across the fundus registration box).
Topcon .fda        eyepy ``import_topcon_fda`` eyepy wraps oct-converter's FDA reader and adds the positions.
DICOM OCT (OPT)    pydicom                     DICOM is a standard: PixelSpacing, SliceThickness, laterality and
                                               frame locations are plain attributes. eyepy has no DICOM reader;
                                               oct-converter's only wraps ``pydicom.dcmread(...).pixel_array``
                                               and refuses Zeiss files. Compressed frames (JPEG 2000, as Zeiss
                                               Cirrus writes) need pydicom's decoder plugins.
image folder       mirage-edge                 no library needed: read lazily with `read_image` (8/16-bit kept),
                                               sizes checked from the headers; no geometry (--voxel-size).
=================  ==========================  ==============================================================

Known limit: oct-converter 0.7.0 (latest) reads Topcon files with ``np.fromstring``, whose binary mode
NumPy 2.3 removed; with NumPy >= 2.3 the .fds/.fda readers fail, and `read_volume` says so
(`MissingDependencyError`) instead of passing the library's ValueError on.

Every library failure (a truncated or damaged file, a file of another kind) becomes a
`VolumeFormatError` naming the file, the format tried and the library's message.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mirage_edge._deps import require
from mirage_edge.data.io import is_image_file
from mirage_edge.data.volume import Volume, VoxelSize, read_image_folder
from mirage_edge.errors import DataError, MirageEdgeError, MissingDependencyError, VolumeFormatError

log = logging.getLogger(__name__)

# suffix -> format name; `read_volume` picks the reader from these (and from magic bytes without a suffix)
SUFFIXES = {".vol": "heyex-vol", ".xml": "heyex-xml", ".e2e": "heyex-e2e", ".sdb": "heyex-e2e",
            ".fds": "topcon-fds", ".fda": "topcon-fda", ".dcm": "dicom", ".dicom": "dicom"}
_MAGIC = ((b"HSF-OCT-", "heyex-vol"), (b"CMDb", "heyex-e2e"), (b"FOCT", "topcon-fds"))
FORMATS = ("heyex-vol", "heyex-xml", "heyex-e2e", "topcon-fds", "topcon-fda", "dicom", "image-folder")
# DICOM Ophthalmic Tomography Image Storage: the SOP class of an OCT volume
OPT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.5.4"


def detect_format(path: str | Path) -> str:
    """The format name of `path` (one of `FORMATS`), from the suffix, else the file's first bytes; a
    folder is a HEYEX XML export when it holds a HEYEX .xml, else an image folder.

    Raises `DataError` when `path` does not exist, `VolumeFormatError` when the format is unknown.
    """
    p = Path(path)
    if p.is_dir():
        if any(_is_heyex_xml(x) for x in p.glob("*.xml")):
            return "heyex-xml"
        if any(is_image_file(x) for x in p.iterdir() if x.is_file()):
            return "image-folder"
        raise VolumeFormatError(f"{p}: a folder with neither B-scan images nor a HEYEX XML export")
    if not p.is_file():
        raise DataError(f"volume not found: {p}")
    fmt = SUFFIXES.get(p.suffix.lower())
    if fmt:
        return fmt
    with open(p, "rb") as fh:
        head = fh.read(132)
    if not head:
        raise VolumeFormatError(f"{p}: the file is empty")
    if head[128:132] == b"DICM":
        return "dicom"
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    hint = (" (one image: predict it without --volume, or give the folder of all its B-scans)"
            if is_image_file(p) else "")
    raise VolumeFormatError(f"{p}: not an OCT volume format mirage-edge reads{hint}; known: Heidelberg .vol / "
                            ".E2E / HEYEX XML export, Topcon .fds / .fda, DICOM OCT (.dcm), or a folder of "
                            "B-scan images")


def _is_heyex_xml(p: Path) -> bool:
    try:
        with open(p, "rb") as fh:
            return b"<HEDX" in fh.read(4096)
    except OSError:
        return False


def read_volume(path: str | Path, voxel_size: VoxelSize | None = None, format: str = "auto") -> Volume:
    """Read an OCT volume file or folder into a `Volume` (N x H x W B-scans + geometry).

    format:     "auto" (`detect_format`) or one of `FORMATS`.
    voxel_size: overrides the file's (a warning is logged when they differ); the only source of
                geometry for an image folder.
    Raises `VolumeFormatError` (unknown, truncated or damaged file), `VolumeShapeError` (B-scans of
    different sizes), `MissingDependencyError` naming the `vendor` extra when its library is missing.
    """
    p = Path(path)
    fmt = detect_format(p) if format == "auto" else format
    if fmt not in FORMATS:
        raise VolumeFormatError(f"unknown volume format {fmt!r}; known: {', '.join(FORMATS)}")
    if fmt == "image-folder":
        return read_image_folder(p, voxel_size)
    if not p.exists():
        raise DataError(f"volume not found: {p}")
    if p.is_file() and p.stat().st_size == 0:
        raise VolumeFormatError(f"{p}: the file is empty")
    vol = _READERS[fmt](p)
    if voxel_size is not None and vol.voxel_size is not None and \
            not np.allclose(vol.voxel_size.as_tuple(), voxel_size.as_tuple(), rtol=1e-3):
        log.warning("%s: using the given voxel size %s mm instead of the file's %s mm", p, voxel_size.as_tuple(),
                    vol.voxel_size.as_tuple())
    return vol.with_voxel_size(voxel_size)


def _library_call(p: Path, fmt: str, library: str, call: Callable[[], Any]) -> Any:
    """`call()`, with any library failure turned into `VolumeFormatError` naming the file and format.
    Libraries raise anything on a damaged file (construct's StreamError, ValueError, OverflowError,
    KeyError ...), so everything but our own errors and interrupts is caught here."""
    try:
        return call()
    except (MirageEdgeError, KeyboardInterrupt, MemoryError):
        raise
    except ImportError as exc:  # a package the library needs for this format (eyepy: scikit-image, ...)
        raise MissingDependencyError(f"{library} cannot read {fmt} files here: {exc}; "
                                     'pip install "mirage-edge[vendor]"') from exc
    except Exception as exc:  # noqa: BLE001
        if "fromstring" in str(exc):
            raise MissingDependencyError(
                f"{library} cannot read {p} with NumPy {np.__version__}: it uses np.fromstring's binary mode, "
                f"which NumPy 2.3 removed; read Topcon files in an environment with numpy<2.3") from exc
        text = str(exc).strip().replace("\n", " ") or type(exc).__name__
        raise VolumeFormatError(f"cannot read {p} as {fmt} with {library}: {text[:300]} (the file may be "
                                "truncated, damaged or of another kind)") from exc


def _version(module: Any) -> str:
    return f"{module.__name__.split('.')[0]} {getattr(module, '__version__', '?')}"


def _laterality(value: Any) -> str | None:
    v = str(value or "").strip().upper()
    return {"OD": "OD", "R": "OD", "RIGHT": "OD", "OS": "OS", "L": "OS", "LEFT": "OS"}.get(v)


def _grey(img: Any) -> np.ndarray | None:
    """A localizer as one grey H x W array (RGB by BT.601 luma), or None."""
    if img is None:
        return None
    a = np.asarray(img)
    if a.ndim == 3 and a.shape[-1] in (3, 4):
        a = a[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    return a if a.ndim == 2 and a.size else None


def _spacing(value: Any) -> float:
    # a single-B-scan file reports 0, NaN or nothing between B-scans
    try:
        v = float(value)
    except (TypeError, ValueError):
        return 0.0
    return v if math.isfinite(v) and v > 0 else 0.0


# ------------------------------------------------------------------------------------------- eyepy
def _from_eyepy(ev: Any, p: Path, fmt: str, reader: str) -> Volume:
    """An eyepy `EyeVolume` -> `Volume` (eyepy: scale_y axial, scale_x lateral, scale_z between B-scans)."""
    data = np.asarray(ev.data)  # eyepy's display intensities (Heidelberg .vol: its "vol" transform to uint8)
    if data.dtype.kind == "f":
        data = data.astype(np.float32)
    voxel = None
    if str(ev.scale_unit).lower() == "mm":
        voxel = VoxelSize(float(ev.scale_y), float(ev.scale_x), _spacing(ev.scale_z))
    loc = ev.localizer
    localizer = _grey(loc.data) if loc is not None else None
    positions = None
    if localizer is not None:
        positions = np.array([[_eyepy_to_localizer(b.meta["start_pos"], b.meta, loc),
                               _eyepy_to_localizer(b.meta["end_pos"], b.meta, loc)] for b in ev[:]])
    return Volume(data, voxel, _laterality(ev.laterality), localizer, positions, str(p), fmt, reader)


def _eyepy_to_localizer(pos: Any, meta: Any, loc: Any) -> tuple[float, float]:
    # eyepy's own rule (EyeVolume._pos_to_localizer_region): mm / localizer scale; positions in degrees
    # are centred, so half the standard 30° field is added first.
    x, y = float(pos[0]), float(pos[1])
    if str(meta["pos_unit"]).lower() in ("pixel", "px"):
        return x, y
    offset = 15.0 if loc.scale_unit == "°" else 0.0
    return (x + offset) / float(loc.scale_x), (y + offset) / float(loc.scale_y)


def _read_eyepy(fmt: str, function: str) -> Callable[[Path], Volume]:
    def read(p: Path) -> Volume:
        ep = require("eyepy", f"reading {fmt} files")
        ev = _library_call(p, fmt, _version(ep), lambda: getattr(ep, function)(p))
        return _library_call(p, fmt, _version(ep), lambda: _from_eyepy(ev, p, fmt, _version(ep)))

    return read


# ---------------------------------------------------------------------------------- oct-converter
def _read_fds(p: Path) -> Volume:
    import importlib
    import importlib.metadata

    require("oct_converter", "reading Topcon .fds files")
    lib = f"oct-converter {importlib.metadata.version('oct-converter')}"
    FDS = _library_call(p, "topcon-fds", lib, lambda: importlib.import_module("oct_converter.readers").FDS)

    def read() -> Volume:
        reader = FDS(p)
        oct_volume = reader.read_oct_volume()
        data = np.stack([np.asarray(b) for b in oct_volume.volume])  # N x H x W uint16
        # oct-converter: pixel_spacing = [lateral (x_dimension_mm / width), spacing, axial (z_resolution_um/1000)]
        ps = oct_volume.pixel_spacing
        voxel = VoxelSize(float(ps[2]), float(ps[0]), _spacing(ps[1])) if ps else None
        localizer = positions = None
        if b"@IMG_OBS" in reader.chunk_dict:
            localizer = _grey(reader.read_fundus_image().image)
        box = (oct_volume.metadata or {}).get("regist_info", {}).get("bounding_box_in_fundus_pixels")
        if localizer is not None and box is not None and len(box) == 4:
            x0, y0, x1, y1 = map(float, box)
            ys = np.linspace(y0, y1, len(data)) if len(data) > 1 else np.array([(y0 + y1) / 2])
            positions = np.array([[[x0, y], [x1, y]] for y in ys])
        return Volume(data, voxel, _laterality(oct_volume.laterality), localizer, positions, str(p), "topcon-fds",
                      lib)

    return _library_call(p, "topcon-fds", lib, read)


# ---------------------------------------------------------------------------------------- pydicom
def _read_dicom(p: Path) -> Volume:
    pydicom = require("pydicom", "reading DICOM OCT files")
    lib = _version(pydicom)
    ds = _library_call(p, "dicom", lib, lambda: pydicom.dcmread(p))
    sop = str(ds.get("SOPClassUID", ""))
    if sop != OPT_SOP_CLASS:
        modality = ds.get("Modality", "?")
        raise VolumeFormatError(f"{p}: a DICOM file, but not an OCT volume (SOP class {sop or 'missing'}, "
                                f"modality {modality}); expected Ophthalmic Tomography Image Storage {OPT_SOP_CLASS}")
    pixels = _library_call(p, "dicom", lib, lambda: ds.pixel_array)
    data = np.asarray(pixels)
    if data.ndim == 2:
        data = data[None]
    if data.ndim != 3:
        raise VolumeFormatError(f"{p}: DICOM frames of shape {data.shape[1:]}; an OCT B-scan is one grey H x W "
                                "frame")
    shared = _first(ds, "SharedFunctionalGroupsSequence")
    measures = _first(shared, "PixelMeasuresSequence") or ds
    voxel = None
    if "PixelSpacing" in measures:
        axial, lateral = (float(v) for v in measures.PixelSpacing)  # DICOM: [row spacing, column spacing]
        voxel = VoxelSize(axial, lateral, _dicom_spacing(ds, measures))
    anatomy = _first(shared, "FrameAnatomySequence")
    lat = ds.get("ImageLaterality") or ds.get("Laterality") or \
        (anatomy.get("FrameLaterality") if anatomy is not None else None)
    return Volume(data, voxel, _laterality(lat), None, _dicom_positions(ds, len(data)), str(p), "dicom", lib)


def _first(ds: Any, keyword: str) -> Any:
    """The first item of sequence `keyword` of `ds`, or None."""
    if ds is None:
        return None
    seq = ds.get(keyword)
    return seq[0] if seq else None


def _dicom_spacing(ds: Any, measures: Any) -> float:
    """mm between B-scans: SpacingBetweenSlices, else the step of the per-frame ImagePositionPatient,
    else SliceThickness (what OCT writers, oct-converter's among them, store the B-scan spacing in)."""
    if ds.get("SpacingBetweenSlices") is not None:
        return _spacing(ds.SpacingBetweenSlices)
    frames = ds.get("PerFrameFunctionalGroupsSequence") or []
    pos = [np.asarray(f.PlanePositionSequence[0].ImagePositionPatient, float) for f in frames
           if f.get("PlanePositionSequence")]
    if len(pos) == len(frames) >= 2:
        step = float(np.median(np.linalg.norm(np.diff(np.stack(pos), axis=0), axis=1)))
        if step > 0:
            return step
    return _spacing(measures.get("SliceThickness"))


def _dicom_positions(ds: Any, n: int) -> np.ndarray | None:
    """B-scan start/end on the referenced localizer from the Ophthalmic Frame Location Sequence
    (ReferenceCoordinates: row, column pairs in image-relative pixels)."""
    frames = ds.get("PerFrameFunctionalGroupsSequence") or []
    out = []
    for f in frames:
        loc = _first(f, "OphthalmicFrameLocationSequence")
        has = loc is not None and "ReferenceCoordinates" in loc
        coords = [float(v) for v in loc.ReferenceCoordinates] if has else []
        if len(coords) < 4:
            return None
        out.append([[coords[1], coords[0]], [coords[-1], coords[-2]]])  # (row, col) -> (x, y)
    return np.array(out) if len(out) == n else None


_READERS: dict[str, Callable[[Path], Volume]] = {
    "heyex-vol": _read_eyepy("heyex-vol", "import_heyex_vol"),
    "heyex-xml": _read_eyepy("heyex-xml", "import_heyex_xml"),
    "heyex-e2e": _read_eyepy("heyex-e2e", "import_heyex_e2e"),
    "topcon-fda": _read_eyepy("topcon-fda", "import_topcon_fda"),
    "topcon-fds": _read_fds,
    "dicom": _read_dicom,
}

__all__ = ["read_volume", "detect_format", "FORMATS", "SUFFIXES", "OPT_SOP_CLASS"]
