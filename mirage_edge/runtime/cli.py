"""`mirage-edge predict ARTIFACT IMAGES... --out DIR` (torch-free, like the whole runtime)."""
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


def write_predictions(predictor, files: list[Path], out: Path, batch_size: int = 8) -> dict:
    """Run `predictor` over `files` in batches and write CSV/JSON or masks + overlays into `out`."""
    import numpy as np

    from mirage_edge._io import atomic_write_text
    from mirage_edge.data.io import read_image, write_png
    from mirage_edge.data.preprocess import resize_mask

    task, classes = predictor.task, predictor.classes
    if task == "segmentation":
        check_unique_names(files)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    feats = []
    for i in range(0, len(files), batch_size):
        chunk = files[i:i + batch_size]
        images = [read_image(f) for f in chunk]
        pred = predictor.predict(images)
        for f, img, p in zip(chunk, images, pred):
            rec: dict = {"file": str(f)}
            if task == "classification":
                k = int(np.argmax(p))
                rec.update(prediction=classes[k], index=k,
                           probabilities={c: float(v) for c, v in zip(classes, p)})
            elif task == "segmentation":
                mask = resize_mask(p, img.shape[-2:]).astype(np.uint8 if p.max(initial=0) < 256 else np.uint16)
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
    if task == "classification":
        lines = ["file,prediction," + ",".join(f"p_{c}" for c in classes)]
        for r in records:
            lines.append(f"{r['file']},{r['prediction']}," + ",".join(f"{r['probabilities'][c]:.6f}" for c in classes))
        atomic_write_text(out / "predictions.csv", "\n".join(lines) + "\n")
    elif task == "encoder":
        from mirage_edge._io import atomic_path

        with atomic_path(out / "features.npy") as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, np.stack(feats))
        summary["features"] = str(out / "features.npy")
    atomic_write_text(out / "predictions.json", json.dumps(summary, indent=2) + "\n")
    return summary


@click.command("predict")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True)
@click.option("--out", "out", type=click.Path(path_type=Path), required=True, help="Output folder.")
@click.option("--backend", default="auto", show_default=True,
              type=click.Choice(["auto", "onnxruntime", "openvino", "tensorrt"]))
@click.option("--threads", type=int, default=None, help="Inference threads (default: the engine's).")
@click.option("--batch-size", type=int, default=8, show_default=True)
def predict_cmd(artifact: Path, images: tuple[str, ...], out: Path, backend: str, threads: int | None,
                batch_size: int) -> None:
    """Run an exported ARTIFACT on IMAGES (files or folders).

    \b
    classification: predictions.csv + predictions.json (class probabilities)
    segmentation:   masks/<name>.png (class index per pixel, original size), overlays/<name>.png, JSON
    encoder:        features.npy + predictions.json
    """
    from mirage_edge.runtime.predictor import Predictor

    predictor = Predictor.load(artifact, backend=backend, threads=threads)
    files = _expand(images)
    summary = write_predictions(predictor, files, out, batch_size=batch_size)
    click.echo(f"{len(summary['predictions'])} image(s) -> {out} ({predictor.task}, {predictor.backend})")
