"""`mirage-edge predict ARTIFACT IMAGES... --out DIR` (torch-free, like the whole runtime).

One OCT volume (a Heidelberg .vol / .E2E / HEYEX XML export, a Topcon .fds, a DICOM OCT, or with
--volume a folder of B-scans) is predicted as a whole and measured (`mirage_edge.runtime.volume`).
"""
from __future__ import annotations

import json
from pathlib import Path

import click

from mirage_edge.errors import InputError

# Overlay colours (BGR) per class index; background (0) is left uncoloured.
_PALETTE = [(0, 0, 0), (0, 0, 255), (0, 255, 0), (255, 0, 0), (0, 255, 255), (255, 0, 255), (255, 255, 0),
            (0, 128, 255), (128, 0, 255), (255, 128, 0), (0, 255, 128), (128, 255, 0), (255, 0, 128),
            (128, 128, 255), (128, 255, 128), (255, 128, 128)]


def _expand(paths: tuple[str, ...]) -> list[Path]:
    from mirage_edge.data.io import is_image_file

    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(x for x in p.rglob("*") if x.is_file() and is_image_file(x)))
        elif p.exists():
            files.append(p)
        else:
            raise InputError(f"image not found: {p}")
    if not files:
        raise InputError(f"no images found in {', '.join(paths)}")
    return list(dict.fromkeys(files))  # a file named twice (itself and its folder) is predicted once


def check_unique_names(files: list[Path]) -> None:
    """Refuse inputs whose outputs would overwrite each other: masks/ and overlays/ are named
    `<stem>.png`, so a/x.png and b/x.png (or x.png beside x.tif) would share one. Raises `InputError`
    listing every clash, before any inference."""
    by_stem: dict[str, list[Path]] = {}
    for f in files:
        by_stem.setdefault(f.stem, []).append(f)
    clashes = [group for group in by_stem.values() if len(group) > 1]
    if clashes:
        listed = "; ".join(f"{' + '.join(map(str, g))} -> masks/{g[0].stem}.png" for g in clashes[:10])
        more = f" (and {len(clashes) - 10} more)" if len(clashes) > 10 else ""
        raise InputError(f"{len(clashes)} output name clash(es), inputs that would overwrite each other's mask "
                         f"and overlay: {listed}{more}; rename them or predict them into separate --out folders")


def _overlay(image, mask, alpha: float = 0.45):
    import numpy as np

    img = image.astype(np.float32)
    lo, hi = float(img.min()), float(img.max())
    grey = ((img - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(img)).astype(np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=2).astype(np.float32)
    colours = np.array([_PALETTE[i % len(_PALETTE)] for i in range(int(mask.max(initial=0)) + 1)], np.float32)
    fg = mask > 0
    rgb[fg] = (1 - alpha) * rgb[fg] + alpha * colours[mask[fg]]
    return rgb.clip(0, 255).astype(np.uint8)


# What `predict` writes into --out: --overwrite removes these (and nothing else) before a new run.
PREDICT_OUTPUTS = ("predictions.json", "predictions.csv", "features.npy", "masks", "overlays",
                   "measurements.json", "maps", "report.html")
COMPLETE_MARKER = "predictions.json"  # written last: a folder without it holds an unfinished run


def check_predict_out(out: Path, overwrite: bool = False) -> None:
    """Refuse an `--out` that cannot hold this run's predictions, before any work (`OutputError`):
    a file, an unwritable folder, or a non-empty folder (without `overwrite`: the two runs would mix;
    with it: files that predict did not write, which --overwrite must not delete)."""
    from mirage_edge._io import check_output_dir
    from mirage_edge.errors import OutputError

    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    check_output_dir(out, "--out")
    if not entries:
        return
    if not overwrite:
        shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
        raise OutputError(f"--out {out} is not empty ({shown}); pass --overwrite to replace the predictions "
                          "there, or choose a new folder")
    foreign = [e for e in entries if e not in PREDICT_OUTPUTS and not e.startswith(".")]
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise OutputError(f"--out {out} holds files that predict did not write ({shown}); --overwrite "
                          "replaces only an earlier predict output: choose a new folder")


def _clear_previous(out: Path) -> None:
    import shutil

    for name in (COMPLETE_MARKER, *PREDICT_OUTPUTS):  # the marker first: a half-cleared folder is incomplete
        p = out / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def _predict_chunk(predictor, chunk: list[Path], keep_going: bool, failed: list[dict]) -> list[tuple]:
    """[(file, image, prediction)] for the files of `chunk`; with `keep_going` a file that cannot be read
    or predicted is added to `failed` (file, error) instead of stopping the run."""
    from mirage_edge.data.io import read_image
    from mirage_edge.errors import OutputError, MirageEdgeError

    if not keep_going:
        images = [read_image(f) for f in chunk]
        return list(zip(chunk, images, predictor.predict(images)))
    good: list[tuple[Path, object]] = []
    for f in chunk:
        try:
            good.append((f, read_image(f)))
        except MirageEdgeError as exc:
            failed.append({"file": str(f), "error": str(exc)})
    if not good:
        return []
    try:
        preds = predictor.predict([im for _, im in good])
        return [(f, im, p) for (f, im), p in zip(good, preds)]
    except OutputError:
        raise
    except MirageEdgeError:  # one bad image spoils the batch: find it by predicting them one by one
        out = []
        for f, im in good:
            try:
                out.append((f, im, predictor.predict([im])[0]))
            except OutputError:
                raise
            except MirageEdgeError as exc:
                failed.append({"file": str(f), "error": str(exc)})
        return out


def write_predictions(predictor, files: list[Path], out: Path, batch_size: int = 8, *, overwrite: bool = False,
                      keep_going: bool = False) -> dict:
    """Run `predictor` over `files` in batches and write CSV/JSON or masks + overlays into `out`.

    `out` must be new or empty; with `overwrite` an earlier predict output there is removed first
    (`check_predict_out`). `predictions.json` is written last: a folder without it holds an unfinished
    run (stopped by an error). Fail-fast by default: the first unreadable image raises. With
    `keep_going` every good image is written and the bad ones are listed under "failed" (file, error)
    in the returned summary and in predictions.json.
    """
    import numpy as np

    from mirage_edge._io import atomic_write_text, output_errors
    from mirage_edge.data.io import write_png
    from mirage_edge.data.preprocess import resize_mask
    from mirage_edge.errors import ConfigError

    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    task, classes = predictor.task, predictor.classes
    if task == "segmentation":
        check_unique_names(files)
    check_predict_out(out, overwrite)
    records = []
    feats = []
    failed: list[dict] = []
    with output_errors(out, f"; {out} is incomplete (it has no {COMPLETE_MARKER})"):
        _clear_previous(out)
        for i in range(0, len(files), batch_size):
            for f, img, p in _predict_chunk(predictor, files[i:i + batch_size], keep_going, failed):
                rec: dict = {"file": str(f)}
                if task == "classification":
                    k = int(np.argmax(p))
                    rec.update(prediction=classes[k], index=k,
                               probabilities={c: float(v) for c, v in zip(classes, p)})
                elif task == "segmentation":
                    dtype = np.uint8 if p.max(initial=0) < 256 else np.uint16
                    mask = resize_mask(p, img.shape[-2:]).astype(dtype)
                    mpath = write_png(out / "masks" / f"{f.stem}.png", mask)
                    opath = write_png(out / "overlays" / f"{f.stem}.png", _overlay(img, mask.astype(np.int64)))
                    counts = np.bincount(mask.ravel(), minlength=len(classes))
                    rec.update(mask=str(mpath), overlay=str(opath),
                               fractions={c: float(n) / mask.size for c, n in zip(classes, counts)})
                else:
                    feats.append(np.asarray(p))
                    rec["row"] = len(feats) - 1
                records.append(rec)
        summary = {"artifact": str(predictor.artifact_dir), "task": task, "backend": predictor.backend,
                   "classes": classes, "predictions": records}
        if keep_going:
            summary["failed"] = failed
        if task == "classification":
            lines = ["file,prediction," + ",".join(f"p_{c}" for c in classes)]
            for r in records:
                lines.append(f"{r['file']},{r['prediction']},"
                             + ",".join(f"{r['probabilities'][c]:.6f}" for c in classes))
            atomic_write_text(out / "predictions.csv", "\n".join(lines) + "\n")
        elif task == "encoder" and feats:
            from mirage_edge._io import atomic_path

            with atomic_path(out / "features.npy") as tmp:
                with open(tmp, "wb") as fh:
                    np.save(fh, np.stack(feats))
            summary["features"] = str(out / "features.npy")
        atomic_write_text(out / COMPLETE_MARKER, json.dumps(summary, indent=2) + "\n")
    return summary


def is_volume_input(images: tuple[str, ...], volume_flag: bool) -> bool:
    """True when `predict` runs in volume mode: --volume, or one input that is a vendor file, a DICOM
    or a HEYEX XML export (an image folder stays a set of images unless --volume says otherwise)."""
    from mirage_edge.data.vendor import detect_format
    from mirage_edge.errors import ConfigError, MirageEdgeError

    if volume_flag:
        if len(images) != 1:
            raise ConfigError(f"--volume takes one volume (a file or a folder of its B-scans), got {len(images)} "
                              "inputs; predict them one at a time into separate --out folders")
        return True
    if len(images) != 1:
        return False
    try:
        return detect_format(images[0]) != "image-folder"
    except MirageEdgeError:  # a missing file or a plain image: the image path says what is wrong
        return False


def predict_volume_cmd(artifact: Path, source: str, out: Path, *, overwrite: bool, keep_going: bool, backend: str,
                       threads: int | None, batch_size: int, measure: str, voxel_size: tuple[float, ...] | None,
                       fovea: tuple[float, float] | None, report: bool = True) -> None:
    """The volume mode of `predict`: read, check the measurement plan, predict with a progress bar,
    write masks/, maps/, report.html (unless not `report`) and measurements.json (last) into `out`."""
    import sys

    from mirage_edge._io import output_errors
    from mirage_edge._log import quiet
    from mirage_edge.data.vendor import read_volume
    from mirage_edge.data.volume import VoxelSize
    from mirage_edge.errors import DataError
    from mirage_edge.runtime.predictor import Predictor
    from mirage_edge.runtime.volume import RECORD_FILE, plan_measures, predict_volume

    check_predict_out(out, overwrite)
    if report:  # jinja2 (extra vendor) is missing: say so now, not after minutes of inference
        from mirage_edge.runtime.report import check_dependencies

        check_dependencies()
    volume = read_volume(source, VoxelSize(*voxel_size) if voxel_size else None)
    predictor = Predictor.load(artifact, backend=backend, threads=threads)
    plan_measures(predictor.task, predictor.classes, measure, volume.voxel_size)  # before minutes of inference
    n = len(volume)
    bar_file = _Null() if quiet() else sys.stderr
    with click.progressbar(length=n, label=f"predicting {n} B-scans", file=bar_file, show_pos=True) as bar:
        done = [0]

        def step(k: int, total: int) -> None:
            bar.update(k - done[0])
            done[0] = k

        result = predict_volume(predictor, volume, batch_size=batch_size, measure=measure, fovea=fovea,
                                keep_going=keep_going, progress=step)
    with output_errors(out, f"; {out} is incomplete (it has no {RECORD_FILE})"):
        _clear_previous(out)
    write_report = None
    if report:
        from mirage_edge.runtime.report import write_report
    record = result.save(out, report=write_report)
    for item in result.failed:
        click.echo(f"failed: B-scan {item['index']} ({item['name']}): {item['error']}", err=True)
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    click.echo(f"{n} B-scan(s) of {source} -> {out} ({predictor.backend}, {result.seconds:.1f} s)"
               f"{_headline(record)}")
    if record["outputs"].get("report"):
        click.echo(f"report: {out / record['outputs']['report']}")
    if result.failed:
        raise DataError(f"{len(result.failed)} of {n} B-scan(s) failed (listed above); the "
                        f"{n - len(result.failed)} others are measured in {out / RECORD_FILE}")


class _Null:
    """A file that swallows the progress bar under -q."""

    def write(self, _: str) -> None:
        pass

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def _headline(record: dict) -> str:
    parts = []
    fluid = record.get("fluid") or {}
    if fluid.get("volume_mm3"):
        parts.append(f"fluid {fluid['volume_mm3']['total']:.4f} mm^3")
    etdrs = (record.get("thickness") or {}).get("etdrs") or {}
    central = etdrs.get("means", {}).get("total_retina", {}).get("central")
    if central is not None:
        parts.append(f"central subfield thickness {central:.0f} um")
    return ": " + ", ".join(parts) if parts else ""


@click.command("predict")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True)
@click.option("--out", "out", type=click.Path(path_type=Path), required=True,
              help="Output folder: new or empty (see --overwrite).")
@click.option("--overwrite", is_flag=True, help="Replace the predictions of an earlier run in --out.")
@click.option("--keep-going", is_flag=True,
              help="Write every image that can be read and list the bad ones at the end (exit status 1), "
                   "instead of stopping at the first.")
@click.option("--backend", default="auto", show_default=True,
              type=click.Choice(["auto", "onnxruntime", "openvino", "tensorrt"]))
@click.option("--threads", type=int, default=None, help="Inference threads (default or 0: the engine's).")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--volume", "volume_flag", is_flag=True,
              help="Take the one input (a folder of B-scans) as one OCT volume; vendor files and DICOM are "
                   "volumes without it.")
@click.option("--voxel-size", type=float, nargs=3, default=None, metavar="AXIAL LATERAL SPACING",
              help="Voxel size in mm (B-scan row, A-scan, between B-scans); overrides the file's, needed for "
                   "an image folder.")
@click.option("--measure", type=click.Choice(["auto", "layers", "fluid", "none"]), default="auto",
              show_default=True, help="Volume measurements: layer thickness + ETDRS grid, fluid volume, or none.")
@click.option("--fovea", type=float, nargs=2, default=None, metavar="BSCAN ASCAN",
              help="Centre of the ETDRS grid (B-scan and A-scan index); default: the thickness minimum.")
@click.option("--no-report", "no_report", is_flag=True,
              help="Volumes: skip report.html, the self-contained HTML report (it needs jinja2, in the vendor "
                   "extra).")
def predict_cmd(artifact: Path, images: tuple[str, ...], out: Path, overwrite: bool, keep_going: bool,
                backend: str, threads: int | None, batch_size: int, volume_flag: bool,
                voxel_size: tuple[float, ...] | None, measure: str, fovea: tuple[float, float] | None,
                no_report: bool) -> None:
    """Run an exported ARTIFACT on IMAGES (files or folders), or on one OCT volume.

    \b
    classification: predictions.csv + predictions.json (class probabilities)
    segmentation:   masks/<name>.png (class index per pixel, original size), overlays/<name>.png, JSON
    encoder:        features.npy + predictions.json
    volume:         masks/<bscan>.png, maps/*.png (thickness with the ETDRS grid, fluid), report.html
                    (the localizer, selected B-scans with overlays, maps and numbers), measurements.json

    A volume is a Heidelberg .vol / .E2E / HEYEX XML export, a Topcon .fds, a DICOM OCT file, or a folder
    of B-scans with --volume (pip install "mirage-edge[vendor]" for the vendor formats).

    predictions.json (measurements.json for a volume) is written last: an --out without it holds an
    unfinished run. With --keep-going it lists the images (B-scans) that failed under "failed".
    """
    from mirage_edge.errors import ConfigError, DataError
    from mirage_edge.runtime.predictor import Predictor

    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    if threads is not None and threads < 0:
        raise ConfigError(f"--threads must be >= 0 (0 = the engine's default), got {threads}")
    if is_volume_input(images, volume_flag):
        predict_volume_cmd(artifact, images[0], out, overwrite=overwrite, keep_going=keep_going, backend=backend,
                           threads=threads, batch_size=batch_size, measure=measure, voxel_size=voxel_size,
                           fovea=fovea, report=not no_report)
        return
    given = [flag for flag, v in (("--voxel-size", voxel_size), ("--fovea", fovea),
                                  ("--measure", measure != "auto"), ("--no-report", no_report)) if v]
    if given:
        raise ConfigError(f"{', '.join(given)} apply to one OCT volume: add --volume to take the folder as one "
                          "volume, or leave them out to predict separate images")
    files = _expand(images)
    check_predict_out(out, overwrite)  # before loading: nothing is done for an --out that cannot take it
    predictor = Predictor.load(artifact, backend=backend, threads=threads)
    summary = write_predictions(predictor, files, out, batch_size=batch_size, overwrite=overwrite,
                                keep_going=keep_going)
    failed = summary.get("failed", [])
    for item in failed:
        click.echo(f"failed: {item['file']}: {item['error']}", err=True)
    click.echo(f"{len(summary['predictions'])} image(s) -> {out} ({predictor.task}, {predictor.backend})")
    if failed:
        raise DataError(f"{len(failed)} of {len(files)} image(s) failed (listed above); the "
                        f"{len(summary['predictions'])} others are in {out}")
