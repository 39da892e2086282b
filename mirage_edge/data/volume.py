"""One OCT volume type for every source (torch-free: numpy + OpenCV): `Volume`, `VoxelSize`, and the
plain image-folder reader. Vendor files (Heidelberg, Topcon, DICOM) are read by `mirage_edge.data.vendor`
into the same type.

Axes follow the B-scan: a volume is N B-scans of H x W pixels (H = axial/depth rows, W = lateral
A-scans). `VoxelSize` is in mm: ``axial`` (one row), ``lateral`` (one A-scan), ``spacing`` (between
neighbouring B-scans; 0 when it is not known or there is one B-scan). eyepy calls these scale_y,
scale_x and scale_z; DICOM PixelSpacing = [axial, lateral] and SliceThickness = spacing.

B-scan positions are on the localizer (SLO/NIR) image, in its pixel coordinates: ``positions[i]`` is
``[[x_start, y_start], [x_end, y_end]]`` of B-scan i (its first and last A-scan), x to the right,
y down.

An image folder is read lazily (`ImageStack`): only the headers up front (so B-scans of different
sizes are refused before any decoding), one B-scan per access after that, which keeps a long
volume's memory to the batch being predicted.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np

from mirage_edge.data.io import image_shape, is_image_file, read_image
from mirage_edge.errors import DataError, VolumeShapeError, VoxelSizeError

LATERALITIES = ("OD", "OS")


@dataclass(frozen=True)
class VoxelSize:
    """Size of one voxel in mm: `axial` (B-scan row), `lateral` (A-scan), `spacing` (between B-scans).

    `spacing` may be 0 (one B-scan, or not known); volumes and en-face measurements then refuse.
    """

    axial: float
    lateral: float
    spacing: float = 0.0

    def __post_init__(self) -> None:
        for name in ("axial", "lateral", "spacing"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (v == 0 and name != "spacing"):
                raise VoxelSizeError(f"voxel size {name} must be a positive number of mm, got {v!r}")
            object.__setattr__(self, name, float(v))
        # A B-scan row is microns, not millimetres: catch µm given where mm is meant.
        if max(self.axial, self.lateral, self.spacing) > 5:
            raise VoxelSizeError(f"voxel size {self.as_tuple()} mm is implausible for OCT (a voxel over 5 mm); "
                                 "give it in mm (e.g. 0.0039 0.0114 0.12), not in µm")

    def as_tuple(self) -> tuple[float, float, float]:
        return (self.axial, self.lateral, self.spacing)

    def as_dict(self) -> dict[str, float]:
        return {"axial": self.axial, "lateral": self.lateral, "spacing": self.spacing}


class ImageStack(Sequence[np.ndarray]):
    """N B-scan image files read one at a time (`stack[i]` -> H x W array); all are checked to be H x W
    by their headers when the stack is made."""

    def __init__(self, files: Sequence[Path], shape: tuple[int, int], dtype: np.dtype) -> None:
        self.files = list(files)
        self.shape = (len(self.files), *shape)
        self.dtype = np.dtype(dtype)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        img = read_image(self.files[i])
        if img.shape != self.shape[1:]:  # a header that lied, or a file changed since
            raise VolumeShapeError(f"{self.files[i]}: B-scan of {img.shape[0]} x {img.shape[1]} pixels in a "
                                   f"volume of {self.shape[1]} x {self.shape[2]} B-scans")
        return img


BScans = Union[np.ndarray, ImageStack]


@dataclass
class Volume:
    """An OCT volume and what is known of its geometry.

    bscans:      N x H x W (uint8 / uint16 / float32): an array, or an `ImageStack` read on access.
    voxel_size:  `VoxelSize` in mm, or None when the source has none (image folders).
    laterality:  "OD" (right eye), "OS" (left) or None.
    localizer:   Hl x Wl SLO/NIR image, or None.
    positions:   N x 2 x 2 float: B-scan i from (x, y) `positions[i, 0]` to `positions[i, 1]` in
                 localizer pixels, or None.
    source:      the file or folder read; `format` names the reader's format ("heyex-vol", "dicom-opt",
                 "image-folder", ...); `reader` the library and version that read it.
    names:       one name per B-scan (file stems for folders, else "bscan_000", ...).
    """

    bscans: BScans
    voxel_size: VoxelSize | None = None
    laterality: str | None = None
    localizer: np.ndarray | None = None
    positions: np.ndarray | None = None
    source: str = ""
    format: str = "array"
    reader: str = "mirage-edge"
    names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        shape = tuple(self.bscans.shape)
        if len(shape) != 3 or min(shape) < 1:
            raise VolumeShapeError(f"{self.source or 'volume'}: B-scans must be N x H x W with N, H, W >= 1, "
                                   f"got shape {shape}")
        n = shape[0]
        if self.laterality is not None and self.laterality not in LATERALITIES:
            raise DataError(f"{self.source or 'volume'}: laterality must be OD, OS or None, "
                            f"got {self.laterality!r}")
        if self.positions is not None:
            self.positions = np.asarray(self.positions, dtype=np.float64)
            if self.positions.shape != (n, 2, 2):
                raise DataError(f"{self.source or 'volume'}: B-scan positions must be {n} x 2 x 2, "
                                f"got {self.positions.shape}")
        if not self.names:
            self.names = [f"bscan_{i:03d}" for i in range(n)]
        elif len(self.names) != n:
            raise DataError(f"{self.source or 'volume'}: {len(self.names)} B-scan names for {n} B-scans")

    @property
    def shape(self) -> tuple[int, int, int]:
        """(N, H, W)."""
        return tuple(int(s) for s in self.bscans.shape)  # type: ignore[return-value]

    def __len__(self) -> int:
        return self.shape[0]

    def bscan(self, i: int) -> np.ndarray:
        """B-scan i as an H x W array (read from disk for an image folder)."""
        return np.asarray(self.bscans[i])

    def with_voxel_size(self, voxel_size: VoxelSize | None) -> "Volume":
        """This volume with `voxel_size` (None: unchanged)."""
        if voxel_size is None:
            return self
        from dataclasses import replace

        return replace(self, voxel_size=voxel_size)

    def describe(self) -> dict[str, Any]:
        """JSON-able facts of the volume (no pixels): shape, dtype, voxel size, laterality, localizer
        shape and the B-scan positions."""
        return {
            "source": self.source, "format": self.format, "reader": self.reader,
            "shape": list(self.shape), "dtype": str(np.dtype(self.bscans.dtype)),
            "voxel_size_mm": self.voxel_size.as_dict() if self.voxel_size else None,
            "laterality": self.laterality,
            "localizer_shape": list(self.localizer.shape) if self.localizer is not None else None,
            "bscan_positions_px": (np.round(self.positions, 3).tolist() if self.positions is not None else None),
        }


def natural_key(name: str) -> list[Any]:
    """Sort key that puts b2 before b10 (devices and exporters rarely zero-pad slice numbers)."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def read_image_folder(folder: str | Path, voxel_size: VoxelSize | None = None) -> Volume:
    """A folder of B-scan images (PNG/TIFF/JPEG/BMP/.npy, one per file, in natural name order) -> `Volume`.

    Read lazily (`ImageStack`). Raises `DataError` for a folder without images and `VolumeShapeError`,
    listing the files, when the B-scans differ in size. Image folders carry no geometry: pass
    `voxel_size` (the CLI's --voxel-size) for measurements.
    """
    root = Path(folder)
    files = sorted((p for p in root.iterdir() if p.is_file() and is_image_file(p)), key=lambda p: natural_key(p.name))
    if not files:
        raise DataError(f"no B-scan images in {root} (looked for .png, .tif, .jpg, .bmp, .npy)")
    shapes = [image_shape(f) for f in files]
    unknown = [f for f, s in zip(files, shapes) if s is None]
    if unknown:  # a header we cannot read: decode it now, `read_image` names the problem
        for f in unknown:
            shapes[files.index(f)] = read_image(f).shape
    check_same_size([str(f) for f in files], shapes, str(root))
    first = read_image(files[0])
    return Volume(ImageStack(files, first.shape, first.dtype), voxel_size=voxel_size, source=str(root),
                  format="image-folder", reader="mirage-edge", names=[f.stem for f in files])


def check_same_size(names: Sequence[str], shapes: Sequence[tuple[int, ...]], source: str) -> None:
    """Raise `VolumeShapeError` naming the odd B-scans when `shapes` are not all the same (the most
    common size is taken as the volume's)."""
    counts: dict[tuple[int, ...], int] = {}
    for s in shapes:
        counts[tuple(s)] = counts.get(tuple(s), 0) + 1
    if len(counts) <= 1:
        return
    common = max(counts, key=lambda s: counts[s])
    odd = [f"{n} ({s[0]} x {s[1]})" for n, s in zip(names, shapes) if tuple(s) != common]
    more = f" and {len(odd) - 5} more" if len(odd) > 5 else ""
    raise VolumeShapeError(f"{source}: B-scans of different sizes: most are {common[0]} x {common[1]} (H x W), "
                           f"but {', '.join(odd[:5])}{more}; a volume needs one B-scan size")


__all__ = ["VoxelSize", "Volume", "ImageStack", "read_image_folder", "check_same_size", "natural_key",
           "LATERALITIES"]
