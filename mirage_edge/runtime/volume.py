"""Whole-volume prediction and clinical measurements (torch-free):

    from mirage_edge.runtime.volume import predict_volume
    res = predict_volume("artifacts/onnx-fp32", "scan.vol")        # or a DICOM, a HEYEX XML export, a folder
    res.masks              # N x H x W class indices at the B-scan resolution
    res.areas_px           # N x K pixels of each class per B-scan (`areas_mm2()` in mm^2)
    res.thickness["total_retina"], res.etdrs, res.fluid        # layer / fluid models
    res.save("out/")       # masks/*.png, maps/*.png, measurements.json (the record, written last)

The volume is predicted in batches of `batch_size` B-scans: only one batch of images and model inputs
is held at a time (an image folder is also read one batch at a time), plus the N x H x W masks
(one byte per voxel). `model` is an artifact folder, a `Predictor`, or any object with `task`,
`classes` and `predict(list of H x W arrays) -> N x H' x W'` class masks (a PyTorch wrapper, a test
double). Measurements are planned before any inference: a model whose classes do not fit the
requested measurement (`MeasurementError`) or a volume without a voxel size (`VoxelSizeError`) fails
at once.

The record (`VolumeResult.record`) is one JSON object, versioned by `SCHEMA` / `SCHEMA_VERSION`, with
the input file's SHA-256 and the artifact's checksums. A report (HTML, issue #20 item 4) plugs into
`VolumeResult.save(out, report=fn)`: `fn(result, record, out) -> relative path` runs after the
images are written and before the record, and its path lands in ``record["outputs"]["report"]``;
`mirage_edge.runtime.report.write_report` is that function (report.html, jinja2 from the vendor extra).
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from mirage_edge import __version__
from mirage_edge.data.volume import Volume, VoxelSize
from mirage_edge.errors import ConfigError, DataError, InputError, MeasurementError, MirageEdgeError, \
    OutputError, VoxelSizeError
from mirage_edge.runtime import clinical

log = logging.getLogger(__name__)

SCHEMA = "mirage-edge/volume-measurements"
SCHEMA_VERSION = 1
RECORD_FILE = "measurements.json"
MEASURES = ("auto", "layers", "fluid", "none")
Progress = Callable[[int, int], None]  # (B-scans done, total)
Report = Callable[["VolumeResult", dict, Path], "str | None"]


class VolumeModel(Protocol):
    """What `predict_volume` needs of a model: a segmentation `task`, its `classes`, and
    `predict(list of H x W arrays) -> N x H' x W'` class-index masks."""

    task: str

    @property
    def classes(self) -> list[str]: ...

    def predict(self, images: Any) -> np.ndarray: ...


def plan_measures(task: str, classes: Sequence[str], measure: str,
                  voxel: VoxelSize | None) -> tuple[clinical.ClassRoles, tuple[str, ...]]:
    """(class roles, measurements to make) for a model and `measure` (auto | layers | fluid | none).

    Raises `MeasurementError` for a non-segmentation model or classes that cannot give the requested
    measurement, `VoxelSizeError` when a measurement is due and `voxel` is None.
    """
    if measure not in MEASURES:
        raise ConfigError(f"--measure must be one of {', '.join(MEASURES)}, got {measure!r}")
    if task != "segmentation":
        raise MeasurementError(f"volume prediction needs a segmentation model (masks to measure); this is a "
                               f"{task} model")
    roles = clinical.class_roles(classes)
    can = {"layers": bool(roles.layers), "fluid": bool(roles.fluid)}
    if measure in can and not can[measure]:
        want = ("no retinal layer class (names other than background, fluid, choroid)" if measure == "layers"
                else "no fluid class (names with fluid, IRF, SRF, PED, cyst or edema)")
        raise MeasurementError(f"--measure {measure}: the model's classes {list(classes)} have {want}; "
                               f"this model fits --measure {next((k for k, v in can.items() if v), 'none')}")
    todo = tuple(k for k, v in can.items() if v) if measure == "auto" else () if measure == "none" else (measure,)
    if todo and voxel is None:
        raise VoxelSizeError(f"{' and '.join(todo)} measurements need the voxel size, and this volume has none "
                             "(image folders carry no geometry): give --voxel-size AXIAL LATERAL SPACING in mm "
                             "(e.g. 0.0039 0.0114 0.12), or --measure none for masks only")
    return roles, todo


@dataclass
class VolumeResult:
    """Predictions and measurements of one volume.

    masks:      N x H x W class indices (uint8) at the B-scan resolution; 0 for failed B-scans.
    valid:      N bools, False for B-scans that could not be read or predicted (listed in `failed`).
    areas_px:   N x K pixels of each class per B-scan.
    thickness:  {map name: N x W µm} (layer models; see `clinical.thickness_maps`), else {}.
    fovea:      (B-scan, A-scan) index of the ETDRS centre, `fovea_source` "given" | "thickness-minimum".
    etdrs:      `clinical.etdrs_means` of the thickness maps, or None (`notes` say why).
    fluid:      `clinical.fluid_measures` (fluid models), else None; `fluid_map` N x W µm.
    """

    volume: Volume
    classes: list[str]
    masks: np.ndarray
    valid: np.ndarray
    areas_px: np.ndarray
    roles: clinical.ClassRoles
    measured: tuple[str, ...]
    model: dict[str, Any]
    input_sha256: str | None
    seconds: float
    failed: list[dict] = field(default_factory=list)
    thickness: dict[str, np.ndarray] = field(default_factory=dict)
    fovea: tuple[float, float] | None = None
    fovea_source: str | None = None
    etdrs: dict | None = None
    fluid: dict | None = None
    fluid_map: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)

    def areas_mm2(self) -> np.ndarray | None:
        """N x K class areas in mm^2 per B-scan, None without a voxel size."""
        v = self.volume.voxel_size
        return None if v is None else self.areas_px * (v.axial * v.lateral)

    def orientation(self) -> tuple[int, int, str] | None:
        return clinical.orientation(self.volume.positions, self.volume.laterality)

    def record(self, outputs: dict | None = None) -> dict[str, Any]:
        """The JSON record (no arrays but the per-B-scan areas and B-scan positions)."""
        mm2 = self.areas_mm2()
        bscans = []
        for i, name in enumerate(self.volume.names):
            row: dict[str, Any] = {"index": i, "name": name, "valid": bool(self.valid[i]),
                                   "areas_px": {c: int(n) for c, n in zip(self.classes, self.areas_px[i])}}
            if mm2 is not None:
                row["areas_mm2"] = {c: round(float(a), 6) for c, a in zip(self.classes, mm2[i])}
            bscans.append(row)
        vol = self.volume.describe()
        return {
            "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "mirage_edge_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "input": {"path": vol.pop("source"), "sha256": self.input_sha256, "format": vol.pop("format"),
                      "reader": vol.pop("reader")},
            "volume": vol,
            "model": self.model,
            "classes": self.classes,
            "class_roles": self.roles.names(self.classes),
            "measured": list(self.measured),
            "seconds": round(self.seconds, 3),
            "bscans": bscans,
            "failed": self.failed,
            "thickness": ({"maps_um": {k: _stats(m) for k, m in self.thickness.items()},
                           "fovea": ({"bscan": self.fovea[0], "ascan": self.fovea[1], "source": self.fovea_source}
                                     if self.fovea else None),
                           "etdrs": self.etdrs} if self.thickness else None),
            "fluid": self.fluid,
            "notes": self.notes,
            "outputs": outputs or {},
        }

    def save(self, out: str | Path, report: Report | None = None) -> dict[str, Any]:
        """Write masks/<name>.png (class indices), maps/<map>.png (en-face maps: thickness in µm with the
        ETDRS circles on the total, fluid height) and `RECORD_FILE` (written last, so a folder without it
        holds an unfinished run) into `out`; each file atomically. Returns the record.

        `report(result, record, out)` (optional) writes a report into `out` and returns its path
        relative to `out`, recorded under outputs.report.
        """
        from mirage_edge._io import atomic_write_text, check_output_dir, output_errors
        from mirage_edge.data.io import write_png

        out = check_output_dir(out, "--out")
        # maps/*.png colour 0 .. the map's max (µm), recorded in outputs.map_range_um for a legend
        outputs: dict[str, Any] = {"masks": [], "maps": {}, "map_range_um": {}}
        with output_errors(out, f"; {out} is incomplete (it has no {RECORD_FILE})"):
            for i, name in enumerate(self.volume.names):
                path = write_png(out / "masks" / f"{name}.png", self.masks[i])
                outputs["masks"].append(str(path.relative_to(out)))
            voxel, orient = self.volume.voxel_size, self.orientation()
            if voxel is not None:
                maps = {f"thickness_{k}": m for k, m in self.thickness.items()}
                if self.fluid_map is not None:
                    maps["fluid"] = self.fluid_map
                for key, m in maps.items():
                    top = float(np.nanmax(m)) if np.isfinite(m).any() else 0.0
                    grid = self.fovea if key == f"thickness_{clinical.TOTAL}" and self.etdrs else None
                    img = clinical.render_map(m, voxel, orient, vmax=top or 1.0, center=grid)
                    outputs["maps"][key] = str(write_png(out / "maps" / f"{key}.png", img).relative_to(out))
                    outputs["map_range_um"][key] = [0.0, round(top, 3)]
            record = self.record(outputs)
            if report is not None:
                rel = report(self, record, out)
                if rel:
                    outputs["report"] = str(rel)
            outputs["record"] = RECORD_FILE
            atomic_write_text(out / RECORD_FILE, json.dumps(record, indent=2, allow_nan=False) + "\n")
        return record


def _stats(m: np.ndarray) -> dict[str, float | None]:
    v = m[np.isfinite(m)]
    if not v.size:
        return {"mean": None, "min": None, "max": None, "measured_share": 0.0}
    return {"mean": round(float(v.mean()), 3), "min": round(float(v.min()), 3), "max": round(float(v.max()), 3),
            "measured_share": round(v.size / m.size, 4)}


def input_sha256(path: str | Path) -> str | None:
    """SHA-256 of the input: of the file, or for a folder of the `sha256sum`-style listing
    ("<sha256>  <name>" per file, sorted) of its files (a HEYEX XML export, a B-scan folder)."""
    from mirage_edge._io import sha256_file

    p = Path(path)
    if p.is_file():
        return sha256_file(p)
    if p.is_dir():
        lines = [f"{sha256_file(f)}  {f.name}\n" for f in sorted(p.iterdir()) if f.is_file()]
        return hashlib.sha256("".join(lines).encode()).hexdigest()
    return None


def model_info(model: Any) -> dict[str, Any]:
    """Task, classes, backend and, for an artifact, its folder, format, precision and checksums
    (model files from SHA256SUMS, verified on load, and the SHA-256 of SHA256SUMS itself)."""
    info: dict[str, Any] = {"task": model.task, "classes": list(model.classes),
                            "backend": getattr(model, "backend", type(model).__name__)}
    adir = getattr(model, "artifact_dir", None)
    meta = getattr(model, "meta", None)
    if adir is not None and meta is not None:
        from mirage_edge._io import sha256_file
        from mirage_edge.artifact import SUMS_FILE, read_sha256sums

        d = Path(adir)
        sums = read_sha256sums(d) if (d / SUMS_FILE).is_file() else {}
        info.update(artifact=str(d), name=meta.name, format=meta.format, precision=meta.precision,
                    files_sha256={f: sums.get(f) for f in meta.files},
                    artifact_sha256=sha256_file(d / SUMS_FILE) if (d / SUMS_FILE).is_file() else None)
    return info


def _predict_batch(model: Any, batch: list[tuple[int, np.ndarray]], keep_going: bool,
                   failed: list[dict], names: list[str]) -> list[tuple[int, np.ndarray]]:
    """[(index, H' x W' mask)]; with `keep_going` a B-scan the model refuses is listed in `failed`
    (found by predicting the batch's B-scans one at a time) instead of stopping the volume."""
    if not batch:
        return []
    try:
        return list(zip([i for i, _ in batch], np.asarray(model.predict([im for _, im in batch]))))
    except OutputError:
        raise
    except MirageEdgeError:
        if not keep_going:
            raise
    out = []
    for i, im in batch:
        try:
            out.append((i, np.asarray(model.predict([im]))[0]))
        except OutputError:
            raise
        except MirageEdgeError as exc:
            failed.append({"index": i, "name": names[i], "error": str(exc)})
    return out


def predict_volume(model: Any, volume: Volume | str | Path, *, batch_size: int = 8, measure: str = "auto",
                   voxel_size: VoxelSize | Sequence[float] | None = None, fovea: Sequence[float] | None = None,
                   keep_going: bool = False, progress: Progress | None = None, backend: str = "auto",
                   threads: int | None = None) -> VolumeResult:
    """Segment every B-scan of `volume` with `model` and measure the result.

    model:      an artifact folder (loaded with `backend`, `threads`), a `Predictor`, or a `VolumeModel`.
    volume:     a `Volume`, or a path for `mirage_edge.data.vendor.read_volume` (vendor file, DICOM,
                HEYEX XML export, image folder).
    measure:    "auto" (what the classes allow), "layers", "fluid" or "none" (masks and areas only).
    voxel_size: (axial, lateral, spacing) mm; overrides the file's, and is the only geometry of a folder.
    fovea:      (B-scan, A-scan) index of the ETDRS centre; default the total-thickness minimum.
    keep_going: an unreadable or refused B-scan is listed in `failed` (its row of the maps is NaN)
                instead of stopping the volume.
    progress:   called with (B-scans done, N) after each batch.
    Returns a `VolumeResult`; masks are N x H x W at the B-scan resolution.
    """
    t0 = time.perf_counter()
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    vs = voxel_size if voxel_size is None or isinstance(voxel_size, VoxelSize) else VoxelSize(*voxel_size)
    if isinstance(volume, Volume):
        vol = volume.with_voxel_size(vs)
    else:
        from mirage_edge.data.vendor import read_volume

        vol = read_volume(volume, vs)
    if isinstance(model, (str, Path)):
        from mirage_edge.runtime.predictor import Predictor

        model = Predictor.load(model, backend=backend, threads=threads)
    classes = list(model.classes)
    roles, todo = plan_measures(model.task, classes, measure, vol.voxel_size)
    n, h, w = vol.shape
    if fovea is not None and not (0 <= fovea[0] <= n - 1 and 0 <= fovea[1] <= w - 1):
        raise InputError(f"--fovea {fovea[0]} {fovea[1]} is outside the volume (B-scans 0..{n - 1}, "
                         f"A-scans 0..{w - 1})")
    masks = np.zeros((n, h, w), np.uint8 if len(classes) <= 256 else np.uint16)
    areas = np.zeros((n, len(classes)), np.int64)
    valid = np.zeros(n, bool)
    failed: list[dict] = []
    for start in range(0, n, batch_size):
        batch = []
        for i in range(start, min(n, start + batch_size)):
            try:
                batch.append((i, vol.bscan(i)))
            except DataError as exc:  # a damaged file in an image folder
                if not keep_going:
                    raise
                failed.append({"index": i, "name": vol.names[i], "error": str(exc)})
        for i, pred in _predict_batch(model, batch, keep_going, failed, vol.names):
            if pred.ndim != 2:
                raise InputError(f"the model returned a {pred.shape} prediction for B-scan {i}; expected an "
                                 "H x W class mask")
            masks[i] = pred if pred.shape == (h, w) else _resize(pred, (h, w))
            areas[i] = clinical.class_areas(masks[i], len(classes))
            valid[i] = True
        if progress is not None:
            progress(min(n, start + batch_size), n)
    res = VolumeResult(vol, classes, masks, valid, areas, roles, todo, model_info(model),
                       input_sha256(vol.source) if vol.source else None, 0.0, failed)
    if not valid.any():
        raise DataError(f"{vol.source or 'volume'}: none of its {n} B-scans could be predicted "
                        f"(first error: {failed[0]['error'] if failed else '?'})")
    _measure(res, fovea)
    res.seconds = time.perf_counter() - t0
    return res


def _resize(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from mirage_edge.data.preprocess import resize_mask

    return resize_mask(mask, size)


def _measure(res: VolumeResult, fovea: Sequence[float] | None) -> None:
    voxel = res.volume.voxel_size
    if not res.measured or voxel is None:
        return
    n = len(res.volume)
    if "layers" in res.measured:
        res.thickness = clinical.thickness_maps(res.masks, res.classes, res.roles, voxel.axial, res.valid)
        if n < 2 or voxel.spacing <= 0:
            res.notes.append(f"no ETDRS grid: it needs at least 2 B-scans and their spacing (got {n} B-scan(s), "
                             f"spacing {voxel.spacing} mm)")
        else:
            if fovea is not None:
                res.fovea, res.fovea_source = (float(fovea[0]), float(fovea[1])), "given"
            else:
                res.fovea, res.fovea_source = clinical.find_fovea(res.thickness[clinical.TOTAL], voxel), \
                    "thickness-minimum"
            if res.fovea is None:
                res.notes.append("no ETDRS grid: no retina in the central half of the scan to place the fovea on")
            else:
                res.etdrs = clinical.etdrs_means(res.thickness, voxel, res.fovea, res.orientation())
                if res.orientation() is None:
                    res.notes.append("ETDRS rings only: the quadrants need the B-scan positions on the localizer "
                                     "and the laterality")
                low = [k for k, c in res.etdrs["coverage"].items() if c < 0.9 and "_" not in k]
                if low:
                    res.notes.append(f"the scan covers less than 90% of the ETDRS region(s) {', '.join(low)}; "
                                     "their means are over the scanned part (see etdrs.coverage)")
    if "fluid" in res.measured:
        res.fluid, res.fluid_map = clinical.fluid_measures(res.masks, res.classes, res.roles, voxel, res.valid)
        if voxel.spacing <= 0:
            res.notes.append("no fluid volume: it needs the spacing between B-scans (areas per B-scan are given)")


__all__ = ["predict_volume", "VolumeResult", "VolumeModel", "plan_measures", "input_sha256", "model_info",
           "SCHEMA", "SCHEMA_VERSION", "RECORD_FILE", "MEASURES"]
