"""Clinical measurements from segmentation masks of an OCT volume (torch-free: numpy + OpenCV).

Everything works on class-index masks `N x H x W` (N B-scans, H axial rows, W A-scans) and a
`VoxelSize` in mm. En-face maps are `N x W` (row i = B-scan i, column j = A-scan j); an en-face
sample at (i, j) sits at ``(i * spacing, j * lateral)`` mm.

* Which class is what (`class_roles`) is read from the class names, the way MIRAGE's evaluation
  does (`run_seg_eval.py` drops "bg", "background", "above ILM"): background (vitreous, below BM,
  "elsewhere", "invalid"), fluid (fluid, IRF, SRF, PED, cyst, edema), other tissue outside the retina
  (choroid, sclera) and, for the rest, retinal layers.
* Thickness (`thickness_maps`): per class, its pixels in each A-scan x the axial size (µm); total
  retinal thickness is the span from the first to the last retinal pixel (layers and fluid) of the
  A-scan, ILM to BM, so fluid pockets or a missed pixel inside the retina still count. NaN where an
  A-scan has no retina (or its B-scan could not be read).
* ETDRS grid (`etdrs_means`): central 1 mm, inner 1-3 mm and outer 3-6 mm rings (diameters) around
  the fovea, split into superior / nasal / inferior / temporal quadrants when the B-scan positions
  on the localizer and the laterality tell which way is which. Ring masks are computed in mm on the
  en-face samples, since en-face pixels are rarely square (B-scan spacing >> A-scan spacing);
  eyepy's `grids.grid` assumes square pixels, and is used in the tests as the independent check on
  square ones. Each region reports its mean and its coverage (the scanned share of its area).
* Fovea (`find_fovea`): the minimum of the total thickness, smoothed over ~0.25 mm, searched in the
  central half of the scan (the scan is centred on the fovea; the edges can be thin for other reasons).
* Fluid (`fluid_measures`): voxels x voxel volume per fluid class (mm^3), and an en-face map of the
  fluid height per A-scan (µm).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from mirage_edge.data.volume import VoxelSize
from mirage_edge.errors import InputError, VoxelSizeError

ETDRS_RADII_MM = (0.5, 1.5, 3.0)  # the 1, 3 and 6 mm circles of the ETDRS grid
QUADRANTS = ("superior", "nasal", "inferior", "temporal")
TOTAL = "total_retina"

_BACKGROUND = re.compile(r"\b(background|bg|above ilm|elsewhere|invalid|vitreous|below|under|outside|none)\b")
_FLUID = re.compile(r"\b(fluid|irf|srf|ped|cysts?|cystoid|edema|oedema)\b")
_OUTSIDE_RETINA = re.compile(r"\b(choroid|sclera)\b")


@dataclass(frozen=True)
class ClassRoles:
    """Class indices by role: `layers` (retinal layers), `fluid`, `other` (tissue outside the retina,
    e.g. choroid: it gets a thickness map but is not part of the total), `background`."""

    layers: tuple[int, ...]
    fluid: tuple[int, ...]
    other: tuple[int, ...]
    background: tuple[int, ...]

    @property
    def retina(self) -> tuple[int, ...]:
        """Classes between ILM and BM: the layers and the fluid inside or under them."""
        return tuple(sorted(self.layers + self.fluid))

    def names(self, classes: Sequence[str]) -> dict[str, list[str]]:
        roles = ("layers", "fluid", "other", "background")
        return {role: [classes[i] for i in getattr(self, role)] for role in roles}


def class_roles(classes: Sequence[str]) -> ClassRoles:
    """Roles of a segmentation model's classes, from their names (see the module docstring); class 0
    is background when no name says otherwise, as in every RetinaBench INFO.json."""
    roles: dict[str, list[int]] = {"layers": [], "fluid": [], "other": [], "background": []}
    for i, name in enumerate(classes):
        n = re.sub(r"[_\-/()]+", " ", name.lower())
        if _BACKGROUND.search(n) and not _FLUID.search(n):
            roles["background"].append(i)
        elif _FLUID.search(n):
            roles["fluid"].append(i)
        elif _OUTSIDE_RETINA.search(n):
            roles["other"].append(i)
        elif i == 0:
            roles["background"].append(i)
        else:
            roles["layers"].append(i)
    return ClassRoles(**{k: tuple(v) for k, v in roles.items()})


def _name(classes: Sequence[str], i: int) -> str:
    return re.sub(r"[^a-z0-9]+", "_", classes[i].lower()).strip("_") or f"class_{i}"


def map_names(classes: Sequence[str], ids: Sequence[int]) -> dict[int, str]:
    """File-safe, unique names for class maps (e.g. "GCL+IPL" -> "gcl_ipl")."""
    out: dict[int, str] = {}
    for i in ids:
        base = _name(classes, i)
        out[i] = base if base not in out.values() and base != TOTAL else f"{base}_{i}"
    return out


# --------------------------------------------------------------------------------- thickness
def thickness_maps(masks: np.ndarray, classes: Sequence[str], roles: ClassRoles, axial_mm: float,
                   valid: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """En-face thickness maps in µm, each N x W float32, from masks N x H x W.

    Keys: `TOTAL` (span of the retina per A-scan; NaN where an A-scan has no retina) and one per layer
    and "other" class (its pixel count per A-scan; 0 where absent). Rows of B-scans marked False in
    `valid` (N bools; unreadable B-scans) are NaN everywhere.
    """
    um = axial_mm * 1000.0
    out: dict[str, np.ndarray] = {}
    retina = np.isin(masks, roles.retina)
    has = retina.any(axis=1)  # N x W
    top = retina.argmax(axis=1)
    bottom = masks.shape[1] - 1 - retina[:, ::-1, :].argmax(axis=1)
    out[TOTAL] = np.where(has, (bottom - top + 1) * um, np.nan).astype(np.float32)
    for i, name in map_names(classes, roles.layers + roles.other).items():
        out[name] = ((masks == i).sum(axis=1) * um).astype(np.float32)
    if valid is not None:
        for m in out.values():
            m[~np.asarray(valid, bool)] = np.nan
    return out


# --------------------------------------------------------------------------------- fovea and ETDRS
def _smooth(m: np.ndarray, voxel: VoxelSize, mm: float = 0.25) -> np.ndarray:
    """NaN-aware box mean over about `mm` x `mm` of an N x W en-face map."""
    import cv2

    ky = max(1, int(round(mm / voxel.spacing)) | 1) if voxel.spacing > 0 else 1
    kx = max(1, int(round(mm / voxel.lateral)) | 1)
    ok = np.isfinite(m)
    num = cv2.blur(np.where(ok, m, 0).astype(np.float64), (kx, ky), borderType=cv2.BORDER_REPLICATE)
    den = cv2.blur(ok.astype(np.float64), (kx, ky), borderType=cv2.BORDER_REPLICATE)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def find_fovea(total: np.ndarray, voxel: VoxelSize) -> tuple[float, float] | None:
    """(B-scan index, A-scan index) of the fovea: the minimum of the smoothed total thickness map
    (N x W, µm) within the central half of the scan; None when that region has no thickness."""
    n, w = total.shape
    s = _smooth(total, voxel)
    i0, i1 = int(n * 0.25), max(int(math.ceil(n * 0.75)), int(n * 0.25) + 1)
    j0, j1 = int(w * 0.25), max(int(math.ceil(w * 0.75)), int(w * 0.25) + 1)
    region = s[i0:i1, j0:j1]
    if not np.isfinite(region).any():
        return None
    k = int(np.nanargmin(region))
    return float(i0 + k // region.shape[1]), float(j0 + k % region.shape[1])


def orientation(positions: np.ndarray | None, laterality: str | None) -> tuple[int, int, str] | None:
    """(row sign, column sign, nasal side) from B-scan positions on the localizer (x right, y down):
    row sign +1 when a higher B-scan index lies higher (superior) on the localizer, column sign +1
    when a higher A-scan index lies to the right; the nasal side of the localizer is "right" for a
    right eye (OD; the optic disc is right of the fovea in a fundus image) and "left" for OS. None when
    either is unknown."""
    if positions is None or laterality not in ("OD", "OS") or len(positions) < 2:
        return None
    dy = positions[-1, 0, 1] - positions[0, 0, 1]
    dx = positions[0, 1, 0] - positions[0, 0, 0]
    if dy == 0 or dx == 0:
        return None
    return (1 if dy < 0 else -1), (1 if dx > 0 else -1), ("right" if laterality == "OD" else "left")


def etdrs_regions(shape: tuple[int, int], voxel: VoxelSize, center: tuple[float, float],
                  orient: tuple[int, int, str] | None = None) -> dict[str, np.ndarray]:
    """Boolean N x W masks of the ETDRS regions on an en-face grid: "central", "inner", "outer" rings
    and, with `orient` (see `orientation`), "inner_superior" ... "outer_temporal"."""
    n, w = shape
    yy = (np.arange(n)[:, None] - center[0]) * voxel.spacing
    xx = (np.arange(w)[None, :] - center[1]) * voxel.lateral
    r = np.hypot(yy, xx)
    r0, r1, r2 = ETDRS_RADII_MM
    rings = {"central": r <= r0, "inner": (r > r0) & (r <= r1), "outer": (r > r1) & (r <= r2)}
    out = dict(rings)
    if orient is not None:
        row_sign, col_sign, nasal = orient
        # angle on the localizer, counter-clockwise from its right-hand side, superior up
        theta = np.degrees(np.arctan2(yy * row_sign, xx * col_sign)) % 360
        sides = {"superior": (theta >= 45) & (theta < 135), "left": (theta >= 135) & (theta < 225),
                 "inferior": (theta >= 225) & (theta < 315), "right": (theta >= 315) | (theta < 45)}
        named = {"superior": sides["superior"], "inferior": sides["inferior"],
                 "nasal": sides[nasal], "temporal": sides["left" if nasal == "right" else "right"]}
        for ring in ("inner", "outer"):
            for q in QUADRANTS:
                out[f"{ring}_{q}"] = rings[ring] & named[q]
    return out


def _region_area_mm2(name: str) -> float:
    r0, r1, r2 = ETDRS_RADII_MM
    ring = name.split("_")[0]
    full = {"central": math.pi * r0 ** 2, "inner": math.pi * (r1 ** 2 - r0 ** 2),
            "outer": math.pi * (r2 ** 2 - r1 ** 2)}[ring]
    return full / 4 if "_" in name else full


def etdrs_means(maps: dict[str, np.ndarray], voxel: VoxelSize, center: tuple[float, float],
                orient: tuple[int, int, str] | None = None) -> dict:
    """ETDRS grid means of every N x W map in `maps` around `center` (B-scan, A-scan index).

    Returns {"radii_mm", "coverage": {region: share of its area scanned, 0..1}, "means": {map: {region:
    mean or None}}}. A region's mean is over its scanned samples with a value (NaN excluded); None
    when there are none. Needs at least 2 B-scans and a B-scan spacing (`VoxelSizeError` otherwise).
    """
    shape = next(iter(maps.values())).shape
    if shape[0] < 2 or voxel.spacing <= 0:
        raise VoxelSizeError("an ETDRS grid needs at least 2 B-scans and the spacing between them "
                             f"(got {shape[0]} B-scan(s), spacing {voxel.spacing} mm)")
    regions = etdrs_regions(shape, voxel, center, orient)
    sample_mm2 = voxel.spacing * voxel.lateral
    coverage = {k: min(1.0, float(m.sum()) * sample_mm2 / _region_area_mm2(k)) for k, m in regions.items()}
    means: dict[str, dict[str, float | None]] = {}
    for name, m in maps.items():
        means[name] = {}
        for k, reg in regions.items():
            v = m[reg]
            v = v[np.isfinite(v)]
            means[name][k] = round(float(v.mean()), 3) if v.size else None
    return {"radii_mm": list(ETDRS_RADII_MM), "coverage": {k: round(c, 4) for k, c in coverage.items()},
            "means": means}


# --------------------------------------------------------------------------------- fluid
def fluid_measures(masks: np.ndarray, classes: Sequence[str], roles: ClassRoles, voxel: VoxelSize,
                   valid: np.ndarray | None = None) -> tuple[dict, np.ndarray]:
    """({"voxels", "volume_mm3" (None without a B-scan spacing), "area_mm2_per_bscan_max"}, N x W
    en-face fluid height in µm) over the fluid classes of `roles` (per class and "total")."""
    counts = {classes[i]: int((masks == i).sum()) for i in roles.fluid}
    counts["total"] = sum(counts.values())
    voxel_mm3 = voxel.axial * voxel.lateral * voxel.spacing
    fluid = np.isin(masks, roles.fluid)
    enface = (fluid.sum(axis=1) * voxel.axial * 1000.0).astype(np.float32)
    if valid is not None:
        enface[~np.asarray(valid, bool)] = np.nan
    per_bscan_mm2 = fluid.sum(axis=(1, 2)) * voxel.axial * voxel.lateral
    return ({"voxels": counts,
             "volume_mm3": ({k: float(f"{c * voxel_mm3:.6g}") for k, c in counts.items()}
                            if voxel.spacing > 0 else None),
             "area_mm2_max_bscan": float(f"{per_bscan_mm2.max(initial=0):.6g}"),
             "enface_max_height_um": round(float(np.nanmax(enface)) if np.isfinite(enface).any() else 0.0, 3)},
            enface)


def class_areas(mask: np.ndarray, n_classes: int) -> np.ndarray:
    """Pixels of each class in one H x W mask: K int64 counts."""
    if int(mask.max(initial=0)) >= n_classes:
        raise InputError(f"mask holds class {int(mask.max())}, the model has {n_classes} classes")
    return np.bincount(mask.ravel(), minlength=n_classes)


# --------------------------------------------------------------------------------- images
def render_map(m: np.ndarray, voxel: VoxelSize, orient: tuple[int, int, str] | None = None,
               vmax: float | None = None, center: tuple[float, float] | None = None) -> np.ndarray:
    """An N x W en-face map (µm) as an H' x W x 3 uint8 BGR image: turbo colours over [0, vmax]
    (default: the map's max), NaN grey, rows stretched to square pixels (N * spacing / lateral rows),
    oriented as the localizer (superior up) when `orient` is known, ETDRS circles around `center`."""
    import cv2

    finite = np.isfinite(m)
    top = float(vmax if vmax is not None else (m[finite].max() if finite.any() else 1.0)) or 1.0
    grey = np.clip(np.where(finite, m, 0) / top * 255, 0, 255).astype(np.uint8)
    img = cv2.applyColorMap(grey, cv2.COLORMAP_TURBO)
    img[~finite] = (128, 128, 128)
    n, w = m.shape
    rows = int(min(4096, max(n, round(n * voxel.spacing / voxel.lateral)))) if voxel.spacing > 0 else n
    img = cv2.resize(img, (w, rows), interpolation=cv2.INTER_NEAREST)
    sy, sx = rows / n, 1.0
    if center is not None:
        cy, cx = (center[0] + 0.5) * sy, (center[1] + 0.5) * sx
        for r_mm in ETDRS_RADII_MM:
            r = r_mm / voxel.lateral
            cv2.ellipse(img, (int(round(cx)), int(round(cy))), (int(round(r)), int(round(r))), 0, 0, 360,
                        (255, 255, 255), 1, cv2.LINE_AA)
    if orient is not None:
        row_sign, col_sign, _ = orient
        if row_sign > 0:  # a higher B-scan index is superior: put it at the top
            img = img[::-1]
        if col_sign < 0:
            img = img[:, ::-1]
    return np.ascontiguousarray(img)


__all__ = ["ClassRoles", "class_roles", "thickness_maps", "find_fovea", "orientation", "etdrs_regions",
           "etdrs_means", "fluid_measures", "class_areas", "render_map", "map_names", "ETDRS_RADII_MM",
           "QUADRANTS", "TOTAL"]
