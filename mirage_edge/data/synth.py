"""Synthetic SD-OCT datasets in RetinaBench layout, with exact labels (rendering: `synth_render`).

    synthesize(out_dir, kind, n, seed=0, size=512, center="default", splits=(0.7, 0.15, 0.15)) -> Path
    mirage-edge data synth --out DIR --kind {layers,fluid,cls,multimodal} --n N --seed S [--center NAME]

Kinds and layouts (`n` = number of B-scans in total):

* ``layers``     ``{split}/{bscan,semseg}/<vol>_<slice>.png`` + INFO.json with the 9 classes of
  `LAYER_CLASSES` (mask value = 25 x class index). Mostly healthy volumes, some with drusen.
* ``fluid``      same layout, classes Background / IRF / SRF / PED (mask value = 80 x index).
  Volumes are DME-like (cysts, exudates, some SRF), nAMD-like (PED, SRF, some cysts),
  CSC-like (SRF) or healthy; lesions are 3-D, so neighbouring slices agree.
* ``cls``        ``{split}/{CNV,DME,DRUSEN,NORMAL}/<patient>_<k>.png`` (Kermany's classes),
  balanced; every image of a class shows its pathology (clearly, but at realistic sizes).
* ``multimodal`` ``{split}/{bscan,slo,bscanlayermap}/<vol>_<slice>.png`` + INFO.json for the
  layer map (pixel = class index, as MIRAGE's layer maps): the SLO shows the volume's vessel
  tree, optic disc, fovea and the slice's scan line; the B-scan shows the same vessels' shadows.

Splits are by volume / patient (no scan in two splits), each with at least one volume.
`center` picks a device look (`synth_render.CENTERS`: default = spectralis, cirrus, topcon,
bioptigen (16-bit)). Output is a pure function of the arguments: the same seed gives the same
bytes (each volume has its own seed, so worker scheduling does not matter); `SYNTH.json` records
the parameters and counts (written last; it marks a complete set).

Realistic pixel fractions over a whole set (`PIXEL_FRACTION_RANGES`, tested). ``layers``
(measured, 1000 x 512 px, seed 0: 0.25 / 0.025 / 0.047 / 0.041 / 0.054 / 0.035 / 0.018 / 0.10 /
0.43): background above ILM 0.15-0.40, RNFL 0.015-0.04, GCL+IPL 0.03-0.065, INL+OPL 0.03-0.06,
ONL 0.04-0.08, photoreceptors 0.025-0.05, RPE-BM 0.012-0.03, choroid 0.07-0.14, background
below 0.30-0.55. The retina fills ~22 % of the height: about 1.5x the share of a 496-px Spectralis
scan (a deliberate axial zoom so thin layers stay >= 2 px at 128 px training sizes).
``fluid`` (measured, 300 x 256 px: 0.9954-0.9959 / 0.0023 / 0.0011-0.0013 / 0.0006-0.0011):
background 0.985-0.999, IRF 0.0005-0.01, SRF 0.0002-0.01, PED 0.0001-0.01 — fluid covers
~0.5 % of all pixels, as in Duke DME (0.2-1.1 % per split) and RETOUCH.
"""
from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mirage_edge._io import atomic_write_text, check_output_dir, output_error, output_errors
from mirage_edge.data import synth_render as R
from mirage_edge.data.io import encode_png
from mirage_edge.errors import DataError

KINDS = ("layers", "fluid", "cls", "multimodal")
PIXEL_FRACTION_RANGES: dict[str, dict[str, tuple[float, float]]] = {
    "layers": dict(zip(R.LAYER_CLASSES, [(0.15, 0.40), (0.015, 0.04), (0.03, 0.065), (0.03, 0.06), (0.04, 0.08),
                                         (0.025, 0.05), (0.012, 0.03), (0.07, 0.14), (0.30, 0.55)])),
    "fluid": dict(zip(R.FLUID_CLASSES, [(0.985, 0.999), (0.0005, 0.01), (0.0002, 0.01), (0.0001, 0.01)])),
}
VERSION = 1
LAYER_VALUE_STEP = 25
FLUID_VALUE_STEP = 80
SLO_FIELD = (0.17, 0.83, 0.17, 0.83)  # OCT raster inside the SLO (20 of 30 degrees)
_KIND_ID = {k: i for i, k in enumerate(KINDS)}


def _info(labels: Sequence[str], step: int) -> str:
    return json.dumps({str(i): {"value": i * step, "label": lab} for i, lab in enumerate(labels)}, indent=4)


def _split_counts(n_items: int, fractions: Sequence[float]) -> list[int]:
    """Items per split (largest remainder), at least one per split when there are enough."""
    f = np.asarray(fractions, dtype=np.float64)
    f = f / f.sum()
    raw = f * n_items
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts))[: n_items - counts.sum()]:
        counts[i] += 1
    if n_items >= len(f):
        for i in range(len(f)):
            while counts[i] == 0:
                j = int(np.argmax(counts))
                counts[j] -= 1
                counts[i] += 1
    return counts.tolist()


def _slices_per_volume(n: int) -> int:
    return int(np.clip(round(n / 12), 1, 16))


def sample_lesions(rng: np.random.Generator, disease: str, vol: R.VolumeParams,
                   single: bool) -> list[R.Lesion]:
    """Pathologies of one volume. `single`: one-image volume (cls) -> every lesion is cut at s=0.5."""
    out: list[R.Lesion] = []

    def s_pos() -> tuple[float, float]:
        if single:
            return 0.5, 1.0
        return float(rng.uniform(0.25, 0.75)), float(rng.uniform(0.3, 0.55))

    fx = vol.fovea_x
    if disease == "drusen":
        for _ in range(int(rng.integers(4, 9)) if single else int(rng.integers(2, 7))):
            s, rs = s_pos()
            out.append(R.Lesion("drusen", float(np.clip(fx + rng.normal(0, 0.18), 0.1, 0.9)), s,
                                float(rng.uniform(0.025, 0.055)), rs,
                                float(rng.uniform(0.022, 0.045) if single else rng.uniform(0.01, 0.03))))
    elif disease == "cnv":
        s, rs = s_pos()
        x = float(np.clip(fx + rng.normal(0, 0.06), 0.25, 0.75))
        out.append(R.Lesion("ped", x, s, float(rng.uniform(0.09, 0.16)), rs, float(rng.uniform(0.045, 0.08)),
                            fibro=bool(rng.random() < 0.8)))
        out.append(R.Lesion("srf", float(np.clip(x + rng.normal(0, 0.08), 0.2, 0.8)), s,
                            float(rng.uniform(0.1, 0.2)), rs, float(rng.uniform(0.015, 0.04))))
        if rng.random() < 0.4:
            out += _cysts(rng, fx, 2, 5, single)
    elif disease == "dme":
        out += _cysts(rng, fx, 6, 14, single) if single else _cysts(rng, fx, 8, 18, single)
        for _ in range(int(rng.integers(0, 6))):
            s, rs = s_pos()
            out.append(R.Lesion("exudate", float(np.clip(fx + rng.normal(0, 0.2), 0.05, 0.95)), s, 0.006, rs * 0.3,
                                0.0, depth=float(rng.uniform(0.6, 0.95))))
        if rng.random() < 0.3:
            s, rs = s_pos()
            out.append(R.Lesion("srf", float(fx + rng.normal(0, 0.04)), s, float(rng.uniform(0.05, 0.12)), rs,
                                float(rng.uniform(0.01, 0.025))))
    elif disease == "namd":
        s, rs = s_pos()
        x = float(np.clip(fx + rng.normal(0, 0.06), 0.25, 0.75))
        out.append(R.Lesion("ped", x, s, float(rng.uniform(0.07, 0.15)), rs, float(rng.uniform(0.03, 0.065)),
                            fibro=bool(rng.random() < 0.5)))
        if rng.random() < 0.8:
            out.append(R.Lesion("srf", float(np.clip(x + rng.normal(0, 0.08), 0.2, 0.8)), s,
                                float(rng.uniform(0.1, 0.2)), rs, float(rng.uniform(0.015, 0.04))))
        if rng.random() < 0.4:
            out += _cysts(rng, fx, 2, 6, single)
    elif disease == "csc":
        s, rs = s_pos()
        out.append(R.Lesion("srf", float(np.clip(fx + rng.normal(0, 0.05), 0.25, 0.75)), s,
                            float(rng.uniform(0.1, 0.22)), rs, float(rng.uniform(0.02, 0.05))))
        if rng.random() < 0.3:
            out.append(R.Lesion("ped", float(fx + rng.normal(0, 0.1)), s, float(rng.uniform(0.03, 0.06)), rs * 0.5,
                                float(rng.uniform(0.015, 0.03))))
    return out


def _cysts(rng: np.random.Generator, fx: float, lo: int, hi: int, single: bool) -> list[R.Lesion]:
    out = []
    for _ in range(int(rng.integers(lo, hi + 1))):
        s, rs = (0.5, 1.0) if single else (float(rng.uniform(0.2, 0.8)), float(rng.uniform(0.12, 0.3)))
        h = float(rng.uniform(0.02, 0.05) if single else rng.uniform(0.012, 0.04))
        out.append(R.Lesion("irf", float(np.clip(fx + rng.normal(0, 0.13), 0.08, 0.92)), s,
                            float(h * rng.uniform(0.7, 1.6)), rs, h, depth=float(rng.uniform(0.05, 0.5))))
    return out


def _disease_for(kind: str, rng: np.random.Generator, label: str | None) -> str:
    if kind == "cls":
        return {"CNV": "cnv", "DME": "dme", "DRUSEN": "drusen", "NORMAL": "normal"}[str(label)]
    if kind == "fluid":
        return str(rng.choice(["dme", "namd", "csc", "normal"], p=[0.38, 0.34, 0.18, 0.10]))
    return "drusen" if rng.random() < 0.25 else "normal"


def _write_png(path: Path, array: np.ndarray) -> None:
    # Plain writes (no fsync per file): a set is complete when SYNTH.json, written last and
    # atomically, exists; fsyncing thousands of PNGs would dominate the run time.
    data = encode_png(array)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    except OSError as exc:
        raise output_error(exc, path) from exc


def _render_job(job: dict[str, Any]) -> dict[str, Any]:
    """Render and write one volume (or one cls patient). Returns pixel counts for the summary."""
    kind, size, out = job["kind"], job["size"], Path(job["out"])
    style = R.CENTERS[job["center"]]
    rng = np.random.default_rng(np.random.SeedSequence(job["seed"]))
    n = job["n_slices"]
    single = kind == "cls"
    vol = R.sample_volume(rng, 1 if single else n, style)
    slo, vmask = R.render_slo(rng, vol, size, SLO_FIELD)
    vol.vessels_x, vol.vessels_w = R.vessels_along_rows(vmask, SLO_FIELD, max(n, 1))
    disease = _disease_for(kind, rng, job.get("label"))
    counts = np.zeros(len(R.FLUID_CLASSES if kind == "fluid" else R.LAYER_CLASSES), np.int64)
    base = out / job["split"]
    for i in range(n):
        v = vol
        k = i
        if single:  # a patient's images: same anatomy, new lesions and position, always pathological
            v = replace(vol, fovea_s=float(rng.uniform(0.4, 0.6)), vessels_x=[vol.vessels_x[i]],
                        vessels_w=[vol.vessels_w[i]])
            k = 0
        if i == 0 or single:
            v.lesions = sample_lesions(rng, disease, v, single)
        img, layers, fluid = R.render_bscan(rng, v, k, (size, size), style)
        name = f"{job['volume']}_{i:03d}.png"
        if kind == "cls":
            _write_png(base / job["label"] / name, img)
            continue
        _write_png(base / "bscan" / name, img)
        if kind == "layers":
            _write_png(base / "semseg" / name, (layers * LAYER_VALUE_STEP).astype(np.uint8))
            counts += np.bincount(layers.ravel(), minlength=len(counts))
        elif kind == "fluid":
            _write_png(base / "semseg" / name, (fluid * FLUID_VALUE_STEP).astype(np.uint8))
            counts += np.bincount(fluid.ravel(), minlength=len(counts))
        else:  # multimodal
            _write_png(base / "slo" / name, R.scan_line(slo, SLO_FIELD, (i + 0.5) / n))
            _write_png(base / "bscanlayermap" / name, layers)
            counts += np.bincount(layers.ravel(), minlength=len(counts))
    return {"split": job["split"], "volume": job["volume"], "n": n, "disease": disease, "counts": counts.tolist()}


def plan(kind: str, n: int, seed: int, splits: Sequence[float]) -> list[dict[str, Any]]:
    """The jobs (one per volume / patient) of a synthetic set, in a fixed order."""
    jobs = []
    spv = _slices_per_volume(n)
    split_names = ("train", "val", "test")
    if kind == "cls":
        classes = list(R.CLS_CLASSES)
        # Few images per patient: with 10 B-scans of only 2 patients per class, a model learns patient looks
        # (tilt, curvature, brightness) instead of the pathology and fails on new patients.
        spv = min(spv, 2)
        per_class = _split_counts(n, [1] * len(classes))
        for ci, cname in enumerate(classes):
            n_c = per_class[ci]
            n_p = max(len(split_names), int(np.ceil(n_c / spv))) if n_c >= len(split_names) else n_c
            sizes = _split_counts(n_c, [1] * n_p)  # images per patient
            p_split = _split_counts(n_p, splits)
            pi = 0
            for si, sname in enumerate(split_names):
                for _ in range(p_split[si]):
                    jobs.append({"kind": kind, "split": sname, "label": cname, "volume": f"{cname.lower()}{pi:04d}",
                                 "n_slices": sizes[pi], "seed": [seed, _KIND_ID[kind], ci, pi]})
                    pi += 1
        return [j for j in jobs if j["n_slices"] > 0]
    n_vol = int(np.ceil(n / spv))
    sizes = [spv] * (n_vol - 1) + [n - spv * (n_vol - 1)]
    v_split = _split_counts(n_vol, splits)
    vi = 0
    for si, sname in enumerate(split_names):
        for _ in range(v_split[si]):
            jobs.append({"kind": kind, "split": sname, "volume": f"vol{vi:04d}", "n_slices": sizes[vi],
                         "seed": [seed, _KIND_ID[kind], vi]})
            vi += 1
    return jobs


def synthesize(out_dir: str | Path, kind: str, n: int, seed: int = 0, size: int = 512, center: str = "default",
               splits: Sequence[float] = (0.7, 0.15, 0.15), workers: int | None = None,
               overwrite: bool = False, progress: bool = False) -> Path:
    """Write a synthetic RetinaBench-format set to `out_dir` and return its path (see module doc).

    `workers`: processes (default: CPU count, 1 for small sets); the bytes do not depend on it.
    An existing non-empty `out_dir` is an error unless `overwrite` (then it is replaced). `splits`
    must sum to 1. A folder that cannot be written raises `OutputError` before any work; a write that
    fails later (full disk) raises it naming the file, and the set stays without SYNTH.json (incomplete).
    """
    if kind not in KINDS:
        raise DataError(f"unknown synthetic kind {kind!r}; choose one of {', '.join(KINDS)}")
    if center not in R.CENTERS:
        raise DataError(f"unknown center {center!r}; choose one of {', '.join(R.CENTERS)}")
    if len(splits) != 3 or min(splits) < 0 or abs(sum(splits) - 1) > 1e-6:
        shown = ",".join(f"{x:g}" for x in splits)
        total = f" (sum {sum(splits):g})" if len(splits) == 3 and min(splits) >= 0 else ""
        raise DataError(f"splits must be three non-negative fractions train,val,test that sum to 1, got "
                        f"{shown}{total}")
    if workers is not None and workers < 0:
        raise DataError(f"workers must be >= 0 (0 = automatic), got {workers}")
    min_n = 12 if kind == "cls" else 3
    if n < min_n:
        raise DataError(f"--n must be at least {min_n} for kind {kind!r} (every split needs a volume"
                        f"{' of every class' if kind == 'cls' else ''}), got {n}")
    if not 32 <= size <= 2048:
        raise DataError(f"size must be within 32..2048 pixels, got {size}")
    out = check_output_dir(out_dir, "output folder")  # a file, read-only, full: refused before any work
    if any(out.iterdir()):
        if not overwrite:
            raise DataError(f"output folder {out} exists and is not empty (use overwrite=True / --overwrite)")
        shutil.rmtree(out)
    with output_errors(out, f"; {out} is incomplete (it has no SYNTH.json)"):
        return _synthesize(out, kind, n, seed, size, center, splits, workers, progress)


def _synthesize(out: Path, kind: str, n: int, seed: int, size: int, center: str, splits: Sequence[float],
                workers: int | None, progress: bool) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    jobs = plan(kind, n, seed, splits)
    for j in jobs:
        j.update(out=str(out), size=int(size), center=center)
    if kind in ("layers", "fluid"):
        labels = R.LAYER_CLASSES if kind == "layers" else R.FLUID_CLASSES
        atomic_write_text(out / "INFO.json", _info(labels, LAYER_VALUE_STEP if kind == "layers" else FLUID_VALUE_STEP))
    elif kind == "multimodal":
        atomic_write_text(out / "INFO.json", _info(R.LAYER_CLASSES, 1))
    workers = workers or (1 if n * size * size < 64 * 512 * 512 else min(os.cpu_count() or 1, 8))
    results = _run(jobs, workers, progress)
    counts: dict[str, int] = {}
    pixels: dict[str, list[int]] = {}
    for r in results:
        counts[r["split"]] = counts.get(r["split"], 0) + r["n"]
        pixels[r["split"]] = (np.asarray(pixels.get(r["split"], 0)) + np.asarray(r["counts"])).tolist()
    meta = {
        "generator": "mirage_edge.data.synth", "version": VERSION, "kind": kind, "n": n, "seed": seed,
        "size": [size, size], "center": center, "splits": list(splits),
        "classes": list(R.CLS_CLASSES if kind == "cls" else R.FLUID_CLASSES if kind == "fluid" else R.LAYER_CLASSES),
        "counts": counts,
        "volumes": {s: [{"id": r["volume"], "slices": r["n"], "disease": r["disease"]} for r in results
                        if r["split"] == s] for s in counts},
        "class_pixels": pixels if kind != "cls" else {},
    }
    atomic_write_text(out / "SYNTH.json", json.dumps(meta, indent=2))
    return out


def _run(jobs: list[dict[str, Any]], workers: int, progress: bool) -> list[dict[str, Any]]:
    bar = None
    if progress:
        from rich.progress import Progress

        bar = Progress(transient=True)
        bar.start()
        task = bar.add_task("synthesizing", total=sum(j["n_slices"] for j in jobs))
    try:
        if workers <= 1:
            results = []
            for j in jobs:
                results.append(_render_job(j))
                if bar:
                    bar.advance(task, j["n_slices"])
            return results
        import multiprocessing as mp

        # spawn: safe when the caller has torch (threads) loaded; ~0.3 s start per worker.
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
            results = []
            for j, r in zip(jobs, pool.map(_render_job, jobs, chunksize=1)):
                results.append(r)
                if bar:
                    bar.advance(task, j["n_slices"])
            return results
    finally:
        if bar:
            bar.stop()


__all__ = ["KINDS", "PIXEL_FRACTION_RANGES", "synthesize", "plan", "sample_lesions"]
