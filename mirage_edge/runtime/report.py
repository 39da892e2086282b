"""The HTML report of one predicted OCT volume (torch-free; jinja2 from the `vendor` extra):

    from mirage_edge.runtime.report import write_report
    res = predict_volume("artifacts/onnx-fp32", "scan.vol")
    res.save("out/", report=write_report)       # out/report.html beside measurements.json

`mirage-edge predict MODEL VOLUME --out DIR` writes it by default (`--no-report` skips it).

One self-contained file a clinician-engineer can open anywhere: every image is a base64 ``data:`` URI,
the style sheet is inline, there is no script and nothing is fetched. Sections, top to bottom:

* headline numbers (central subfield thickness, total fluid volume, B-scans, fovea) and the notes and
  failed B-scans of the run;
* the localizer (SLO/NIR) with every B-scan's line, the selected B-scans highlighted and numbered,
  the fovea and the ETDRS circles; a volume without a localizer (an image folder) gets the en-face
  projection of its B-scans (mean over depth) instead, with the selected B-scans marked;
* selected B-scans (first, central, fovea or thinnest retina, most fluid, last), each as the B-scan and
  its mask overlay, with a colour legend of the classes;
* the en-face maps of `VolumeResult.save` (maps/*.png: thickness with the ETDRS circles, fluid) with
  their colour scale, and the ETDRS grid as a chart (inline SVG) of the total retinal thickness;
* tables: ETDRS means per map and region (with coverage), thickness map statistics, fluid volume per
  class, per-B-scan class areas (collapsed);
* provenance: model artifact, format, precision, backend, checksums, input file and its SHA-256,
  record schema and version, mirage-edge version, date.

Every number is the record's (`VolumeResult.record`, i.e. measurements.json): table cells carry the
exact value in ``data-value`` and show it rounded.
"""
from __future__ import annotations

import base64
import math
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mirage_edge._deps import require
from mirage_edge.runtime import clinical

if TYPE_CHECKING:
    from mirage_edge.runtime.volume import VolumeResult

REPORT_FILE = "report.html"
TEMPLATE = "volume_report.html.j2"
PURPOSE = "the HTML report of a volume, report.html; --no-report skips it"
MAX_WIDTH = 1024  # B-scans wider than this are shown downscaled (the masks on disk keep full size)
ALPHA = 0.45  # mask overlay opacity

# Overlay colours (RGB): retinal layers, fluid (blues, so fluid stands out from the layers), other tissue.
LAYER_COLOURS = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (245, 130, 48), (145, 30, 180),
                 (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40))
FLUID_COLOURS = ((0, 130, 200), (70, 240, 240), (0, 0, 128))
OTHER_COLOURS = ((170, 255, 195), (128, 128, 0))
LINE_BGR, SELECTED_BGR, FOVEA_BGR = (90, 200, 90), (0, 215, 255), (60, 60, 255)


# ------------------------------------------------------------------------------------ images
def data_uri(image: np.ndarray) -> str:
    """A ``data:image/png;base64,...`` URI of an H x W (grey) or H x W x 3 (BGR) uint8 image."""
    from mirage_edge.data.io import encode_png

    return "data:image/png;base64," + base64.b64encode(encode_png(image, compression=6)).decode("ascii")


def to_uint8(image: np.ndarray) -> np.ndarray:
    """An H x W image for display: uint8 kept, other dtypes stretched over their 0.5-99.5th percentile."""
    a = np.asarray(image)
    if a.dtype == np.uint8:
        return a
    a = a.astype(np.float32)
    ok = np.isfinite(a)
    if not ok.any():
        return np.zeros(a.shape, np.uint8)
    lo, hi = np.percentile(a[ok], (0.5, 99.5))
    scaled = (np.where(ok, a, lo) - lo) / (hi - lo) * 255 if hi > lo else np.zeros(a.shape)
    return np.clip(scaled, 0, 255).astype(np.uint8)


def class_colours(classes: list[str], roles: clinical.ClassRoles) -> list[tuple[int, int, int] | None]:
    """RGB overlay colour per class (None for background: left uncoloured)."""
    out: list[tuple[int, int, int] | None] = [None] * len(classes)
    groups = ((roles.layers, LAYER_COLOURS), (roles.fluid, FLUID_COLOURS), (roles.other, OTHER_COLOURS))
    for ids, palette in groups:
        for k, i in enumerate(ids):
            out[i] = palette[k % len(palette)]
    return out


def overlay(image: np.ndarray, mask: np.ndarray, colours: list[tuple[int, int, int] | None],
            alpha: float = ALPHA) -> np.ndarray:
    """H x W x 3 BGR: the uint8 B-scan (H x W) with every coloured class of `mask` (H x W) blended in."""
    rgb = np.repeat(image[..., None], 3, axis=2).astype(np.float32)
    for i, c in enumerate(colours):
        if c is None:
            continue
        where = mask == i
        if where.any():
            rgb[where] = (1 - alpha) * rgb[where] + alpha * np.array(c[::-1], np.float32)
    return rgb.clip(0, 255).astype(np.uint8)


def _fit_width(image: np.ndarray, nearest: bool = False) -> np.ndarray:
    import cv2

    h, w = image.shape[:2]
    if w <= MAX_WIDTH:
        return image
    size = (MAX_WIDTH, max(1, round(h * MAX_WIDTH / w)))
    return cv2.resize(image, size, interpolation=cv2.INTER_NEAREST if nearest else cv2.INTER_AREA)


def _upscale(image: np.ndarray, target: int = 512) -> tuple[np.ndarray, float]:
    """`image` enlarged by a whole factor until its longer side reaches `target` (lines and labels
    drawn on a 50-pixel localizer would be unreadable), and the factor."""
    import cv2

    s = max(1, math.ceil(target / max(image.shape[:2])))
    if s == 1:
        return image, 1.0
    return cv2.resize(image, (image.shape[1] * s, image.shape[0] * s), interpolation=cv2.INTER_NEAREST), float(s)


# ------------------------------------------------------------------------------------ B-scans
def select_bscans(result: "VolumeResult") -> list[dict[str, Any]]:
    """The B-scans shown: [{"index", "name", "labels"}] in index order, a B-scan picked for several
    reasons listed once. First, central, last (valid ones), the fovea (the ETDRS centre) or else the
    B-scan holding the thinnest retina, and the one with the most fluid (when any)."""
    valid = np.flatnonzero(result.valid)
    if not valid.size:
        return []

    def nearest(i: float) -> int:
        return int(valid[np.argmin(np.abs(valid - i))])

    n = len(result.volume)
    picks: list[tuple[str, int]] = [("first", int(valid[0])), ("central", nearest((n - 1) / 2))]
    if result.fovea is not None:
        how = "thickness minimum" if result.fovea_source == "thickness-minimum" else "given"
        picks.append((f"fovea ({how})", nearest(round(result.fovea[0]))))
    elif clinical.TOTAL in result.thickness and np.isfinite(result.thickness[clinical.TOTAL]).any():
        picks.append(("thinnest retina", int(np.nanargmin(result.thickness[clinical.TOTAL]) //
                                             result.thickness[clinical.TOTAL].shape[1])))
    if result.roles.fluid:
        fluid = result.areas_px[:, list(result.roles.fluid)].sum(axis=1)
        if fluid.max(initial=0) > 0:
            picks.append(("most fluid", int(np.argmax(fluid))))
    picks.append(("last", int(valid[-1])))
    by_index: dict[int, list[str]] = {}
    for label, i in picks:
        by_index.setdefault(i, [])
        if label not in by_index[i]:
            by_index[i].append(label)
    return [{"index": i, "name": result.volume.names[i], "labels": by_index[i]} for i in sorted(by_index)]


def bscan_figures(result: "VolumeResult", selected: list[dict[str, Any]],
                  record: dict[str, Any]) -> list[dict[str, Any]]:
    """Per selected B-scan: its image and mask overlay (data URIs), labels and the areas of the coloured
    classes present."""
    colours = class_colours(result.classes, result.roles)
    figures = []
    for sel in selected:
        i = sel["index"]
        image = to_uint8(result.volume.bscan(i))
        mask = result.masks[i]
        row = record["bscans"][i]
        areas = row.get("areas_mm2")
        figures.append({
            **sel,
            "image": data_uri(_fit_width(image)),
            "overlay": data_uri(_fit_width(overlay(image, mask, colours), nearest=True)),
            "shape": list(image.shape),
            "areas": [{"name": c, "mm2": areas[c] if areas else None, "px": row["areas_px"][c]}
                      for c, colour in zip(result.classes, colours) if colour is not None and row["areas_px"][c]],
            "thickness_um": _row_mean(result.thickness.get(clinical.TOTAL), i),
        })
    return figures


def _row_mean(m: np.ndarray | None, i: int) -> float | None:
    if m is None or not np.isfinite(m[i]).any():
        return None
    return round(float(np.nanmean(m[i])), 1)


def legend(result: "VolumeResult") -> list[dict[str, str]]:
    """[{"name", "role", "colour" ("#rrggbb")}] of the coloured classes."""
    role_of = {i: role for role in ("layers", "fluid", "other") for i in getattr(result.roles, role)}
    names = {"layers": "retinal layer", "fluid": "fluid", "other": "outside the retina"}
    return [{"name": c, "role": names[role_of[i]], "colour": "#%02x%02x%02x" % colour}
            for i, (c, colour) in enumerate(zip(result.classes, class_colours(result.classes, result.roles)))
            if colour is not None]


# ------------------------------------------------------------------------------------ localizer
def localizer_figure(result: "VolumeResult", selected: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The localizer with the B-scan lines (selected ones highlighted and numbered), the fovea and the
    ETDRS circles: {"image", "caption", "kind": "localizer"}; None without a localizer or positions."""
    import cv2

    vol = result.volume
    if vol.localizer is None or vol.positions is None:
        return None
    img, s = _upscale(cv2.cvtColor(to_uint8(vol.localizer), cv2.COLOR_GRAY2BGR)
                      if np.asarray(vol.localizer).ndim == 2 else to_uint8(vol.localizer))
    img = np.ascontiguousarray(img)
    pos = vol.positions * s
    chosen = {sel["index"] for sel in selected}
    for i, ((x0, y0), (x1, y1)) in enumerate(pos):
        if i not in chosen:
            cv2.line(img, (round(x0), round(y0)), (round(x1), round(y1)), LINE_BGR, 1, cv2.LINE_AA)
    scale = max(1.0, img.shape[0] / 512)
    for i in sorted(chosen):
        (x0, y0), (x1, y1) = pos[i]
        cv2.line(img, (round(x0), round(y0)), (round(x1), round(y1)), SELECTED_BGR, max(1, round(scale)),
                 cv2.LINE_AA)
        cv2.putText(img, str(i), (round(x1) + 4, round(y1) + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.45 * scale,
                    SELECTED_BGR, max(1, round(scale)), cv2.LINE_AA)
    caption = (f"{len(pos)} B-scan lines on the {vol.localizer.shape[1]} x {vol.localizer.shape[0]} px localizer; "
               f"selected B-scans in yellow, numbered")
    hl, wl = vol.localizer.shape[:2]
    inside = (vol.positions >= -0.5) & (vol.positions <= np.array([wl, hl]) - 0.5)
    outside = int((~inside.all(axis=(1, 2))).sum())
    if outside:
        caption += (f" ({outside} of the {len(pos)} lines lie partly or wholly outside the localizer: the file's "
                    "B-scan positions do not match its localizer image)")
    w = vol.shape[2]
    if result.fovea is not None:
        fi, fj = result.fovea
        lo, hi = int(math.floor(fi)), min(int(math.ceil(fi)), len(pos) - 1)
        start = pos[lo, 0] + (pos[hi, 0] - pos[lo, 0]) * (fi - lo)
        end = pos[lo, 1] + (pos[hi, 1] - pos[lo, 1]) * (fi - lo)
        centre = start + (end - start) * (fj / max(1, w - 1))
        c = (round(centre[0]), round(centre[1]))
        cv2.drawMarker(img, c, FOVEA_BGR, cv2.MARKER_CROSS, round(12 * scale), max(1, round(scale)))
        caption += "; the fovea (red cross)"
        voxel = vol.voxel_size
        length_px = float(np.hypot(*(pos[lo, 1] - pos[lo, 0])))
        if voxel is not None and result.etdrs is not None and length_px > 0:
            px_per_mm = length_px / (max(1, w - 1) * voxel.lateral)
            for r in clinical.ETDRS_RADII_MM:
                cv2.circle(img, c, round(r * px_per_mm), FOVEA_BGR, 1, cv2.LINE_AA)
            caption += " and the ETDRS circles (1, 3, 6 mm)"
    return {"image": data_uri(img), "caption": caption, "kind": "localizer"}


def projection_figure(result: "VolumeResult", selected: list[dict[str, Any]]) -> dict[str, Any]:
    """Without a localizer: the en-face projection (each B-scan's mean over depth, N x W), rows
    stretched to square pixels and oriented as the maps, the selected B-scans marked."""
    import cv2

    from mirage_edge.errors import DataError

    vol = result.volume
    n, _, w = vol.shape
    proj = np.full((n, w), np.nan, np.float32)
    for i in range(n):
        if result.valid[i]:
            try:
                proj[i] = np.asarray(vol.bscan(i), np.float32).mean(axis=0)
            except DataError:  # unreadable since prediction: leave it grey
                pass
    grey = to_uint8(proj)
    grey[~np.isfinite(proj)] = 128
    voxel = vol.voxel_size
    rows = (int(min(4096, max(n, round(n * voxel.spacing / voxel.lateral)))) if voxel and voxel.spacing > 0 else n)
    img = cv2.cvtColor(cv2.resize(grey, (w, rows), interpolation=cv2.INTER_NEAREST), cv2.COLOR_GRAY2BGR)
    img, s = _upscale(img, 384)
    orient = result.orientation()
    flip_rows = orient is not None and orient[0] > 0
    step = img.shape[0] / n
    for sel in selected:
        i = sel["index"]
        y = round(((n - 1 - i) if flip_rows else i) * step + step / 2)
        cv2.line(img, (0, y), (img.shape[1] - 1, y), SELECTED_BGR, 1, cv2.LINE_AA)
        cv2.putText(img, str(i), (4, max(12, y - 3)), cv2.FONT_HERSHEY_SIMPLEX, 0.45, SELECTED_BGR, 1, cv2.LINE_AA)
    if orient is not None and orient[1] < 0:
        img = np.ascontiguousarray(img[:, ::-1])
    return {"image": data_uri(img), "kind": "projection",
            "caption": "no localizer in this volume: the en-face projection of its B-scans (mean over depth), "
                       "selected B-scans in yellow, numbered"}


# ------------------------------------------------------------------------------------ maps and ETDRS
def colour_bar() -> str:
    """The maps' colour scale (OpenCV's turbo, as `clinical.render_map` uses) as a data URI."""
    import cv2

    ramp = np.repeat(np.linspace(0, 255, 256).astype(np.uint8)[None, :], 12, axis=0)
    return data_uri(cv2.applyColorMap(ramp, cv2.COLORMAP_TURBO))


def map_figures(result: "VolumeResult", record: dict[str, Any], out: Path) -> list[dict[str, Any]]:
    """The maps `VolumeResult.save` wrote (outputs.maps), read back from `out` and embedded, total
    thickness and fluid first, then the layers in class order."""
    outputs = record.get("outputs") or {}
    maps, ranges = outputs.get("maps") or {}, outputs.get("map_range_um") or {}
    main = (f"thickness_{clinical.TOTAL}", "fluid")
    figures = []
    for key in [k for k in main if k in maps] + [k for k in maps if k not in main]:  # then in class order
        path = out / maps[key]
        if not path.is_file():
            continue
        title = ("total retinal thickness" if key == main[0] else "fluid height" if key == "fluid" else
                 f"{key.removeprefix('thickness_')} thickness")
        uri = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
        figures.append({"key": key, "title": title, "image": uri, "file": maps[key],
                        "range": ranges.get(key, [0.0, None]), "main": key in main})
    return figures


def orientation_text(result: "VolumeResult") -> str:
    orient = result.orientation()
    if orient is None:
        return ("unknown (no B-scan positions or laterality): one row per B-scan, B-scan 0 at the top, A-scan 0 "
                "at the left")
    return f"as on the localizer, superior up, nasal {orient[2]} ({result.volume.laterality})"


def _sector_path(r_in: float, r_out: float, a0: float, a1: float) -> str:
    """SVG path of the annular sector between radii r_in..r_out and angles a0..a1 (degrees,
    counter-clockwise from the right, superior up)."""
    def pt(r: float, a: float) -> str:
        return f"{r * math.cos(math.radians(a)):.2f},{-r * math.sin(math.radians(a)):.2f}"

    return (f"M{pt(r_out, a0)} A{r_out},{r_out} 0 0 0 {pt(r_out, a1)} L{pt(r_in, a1)} "
            f"A{r_in},{r_in} 0 0 1 {pt(r_in, a0)} Z")


def etdrs_chart(result: "VolumeResult", map_name: str = clinical.TOTAL, radius: float = 100.0) -> dict | None:
    """The classic ETDRS chart of one map's means as SVG drawing data: {"sectors": [{"name", "path" or
    "r", "x", "y", "value", "coverage"}], "labels": [{"text", "x", "y"}], "map"}; quadrant sectors when
    the orientation is known, the three rings otherwise. None without ETDRS means."""
    if result.etdrs is None or map_name not in result.etdrs["means"]:
        return None
    means, cover = result.etdrs["means"][map_name], result.etdrs["coverage"]
    r0, r1, r2 = (radius * r / clinical.ETDRS_RADII_MM[-1] for r in clinical.ETDRS_RADII_MM)
    sectors = [{"name": "central", "r": r0, "x": 0.0, "y": 0.0}]
    labels = []
    orient = result.orientation()
    if orient is not None and "inner_superior" in means:
        nasal = 0.0 if orient[2] == "right" else 180.0
        angles = {"superior": 90.0, "inferior": 270.0, "nasal": nasal, "temporal": (nasal + 180) % 360}
        for ring, (ri, ro) in (("inner", (r0, r1)), ("outer", (r1, r2))):
            for q, a in angles.items():
                mid = (ri + ro) / 2
                sectors.append({"name": f"{ring}_{q}", "path": _sector_path(ri, ro, a - 45, a + 45),
                                "x": mid * math.cos(math.radians(a)), "y": -mid * math.sin(math.radians(a))})
        for q, a in angles.items():
            labels.append({"text": q[0].upper(), "x": (r2 + 10) * math.cos(math.radians(a)),
                           "y": -(r2 + 10) * math.sin(math.radians(a))})
    else:
        for ring, (ri, ro) in (("inner", (r0, r1)), ("outer", (r1, r2))):
            path = _sector_path(ri, ro, 0, 180) + " " + _sector_path(ri, ro, 180, 360)
            sectors.append({"name": ring, "path": path, "x": 0.0, "y": -(ri + ro) / 2})
    for sec in sectors:
        sec.update(value=means.get(sec["name"]), coverage=cover.get(sec["name"]))
        sec["x"], sec["y"] = round(sec["x"], 2), round(sec["y"], 2)
    return {"map": map_name, "sectors": sectors, "labels": labels, "size": radius + 22}


# ------------------------------------------------------------------------------------ the page
def report_context(result: "VolumeResult", record: dict[str, Any], out: str | Path) -> dict[str, Any]:
    """Everything the template shows, from the result, its record and the maps saved in `out`."""
    out = Path(out)
    selected = select_bscans(result)
    thickness = record.get("thickness") or {}
    etdrs = thickness.get("etdrs")
    regions = list(etdrs["coverage"]) if etdrs else []
    fluid = record.get("fluid")
    central = (etdrs or {}).get("means", {}).get(clinical.TOTAL, {}).get("central")
    return {
        "record": record,
        "title": Path(record["input"]["path"] or "volume").name,
        "central_um": central,
        "fluid_total_mm3": ((fluid or {}).get("volume_mm3") or {}).get("total"),
        "n_bscans": len(result.volume), "n_failed": len(result.failed),
        "localizer": localizer_figure(result, selected) or projection_figure(result, selected),
        "bscans": bscan_figures(result, selected, record),
        "legend": legend(result),
        "maps": map_figures(result, record, out),
        "colour_bar": colour_bar(),
        "orientation": orientation_text(result),
        "etdrs": etdrs, "etdrs_regions": regions,
        "etdrs_chart": etdrs_chart(result),
        "fluid_classes": [c for c in (fluid or {}).get("voxels", {}) if c != "total"] + ["total"] * bool(fluid),
    }


def render_report(result: "VolumeResult", record: dict[str, Any], out: str | Path) -> str:
    """The report's HTML text (see the module docstring); `out` holds the maps `VolumeResult.save` wrote.

    Raises `MissingDependencyError` (extra `vendor`) without jinja2.
    """
    jinja2 = require("jinja2", PURPOSE)
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True)
    env.filters["num"] = format_number
    template = resources.files("mirage_edge.runtime").joinpath("templates", TEMPLATE).read_text("utf-8")
    return env.from_string(template).render(**report_context(result, record, out))


def write_report(result: "VolumeResult", record: dict[str, Any], out: str | Path) -> str:
    """Write `out`/report.html atomically; returns "report.html". The `report=` hook of
    `VolumeResult.save`: it runs after the masks and maps are written, before measurements.json."""
    from mirage_edge._io import atomic_write_text

    html = render_report(result, record, out)
    atomic_write_text(Path(out) / REPORT_FILE, html)
    return REPORT_FILE


def check_dependencies() -> None:
    """Raise `MissingDependencyError` now (before minutes of inference) when a report cannot be written."""
    require("jinja2", PURPOSE)


def format_number(value: Any, digits: int = 0, unit: str = "") -> str:
    """`value` with `digits` decimals, and with at least 3 significant digits below 1 (a fluid volume of
    0.00768 mm³ is not "0.0077"); "n/a" for None; `unit` appended."""
    if value is None:
        return "n/a"
    v = float(value)
    if 0 < abs(v) < 1:
        digits = max(digits, 2 - math.floor(math.log10(abs(v))))
    return f"{v:.{digits}f} {unit}".rstrip()


__all__ = ["write_report", "render_report", "report_context", "check_dependencies", "select_bscans",
           "class_colours", "overlay", "data_uri", "format_number", "REPORT_FILE", "TEMPLATE"]
