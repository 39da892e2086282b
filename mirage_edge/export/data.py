"""Calibration and validation inputs for export (torch-free): a data folder, or generated images.

Images go through the artifact's own preprocessing (`mirage_edge.data.preprocess`), so calibration
sees exactly what the runtime will feed. A RetinaBench folder also gives labels (classification
class folders, segmentation masks + INFO.json) for the task metric in validation.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mirage_edge.data.io import read_image
from mirage_edge.data.preprocess import PreprocessSpec, preprocess, resize_mask
from mirage_edge.errors import DataError


@dataclass
class ExportData:
    calib: list[dict[str, np.ndarray]]  # feeds, each {input: b x 1 x H x W float32}
    val: dict[str, np.ndarray]  # {input: N x 1 x H x W float32}
    val_labels: np.ndarray | None  # N (class index) or N x H x W (class-index masks)
    source: str  # what the images were
    notes: list[str]
    val_volumes: list[str] | None = None  # volume id per validation image (segmentation metric)

    @property
    def n_calib(self) -> int:
        return sum(next(iter(f.values())).shape[0] for f in self.calib)


def synthetic_oct(n: int, size: tuple[int, int], seed: int) -> np.ndarray:
    """N x H x W uint8 OCT-like B-scans: a few bright curved retinal layers under speckle noise.

    Only for calibration/validation when no data folder is given; range and texture resemble OCT
    more than uniform noise does, which matters for activation ranges in INT8 calibration.
    """
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = np.empty((n, h, w), dtype=np.uint8)
    for i in range(n):
        img = np.zeros((h, w), np.float32)
        curve = rng.uniform(0.25, 0.45) * h + rng.uniform(0.03, 0.1) * h * np.sin(
            2 * np.pi * (xx / w * rng.uniform(0.5, 1.5) + rng.uniform(0, 1)))
        y = curve.copy()
        for _ in range(rng.integers(4, 8)):
            thick = rng.uniform(0.01, 0.05) * h
            img += rng.uniform(0.3, 1.0) * np.exp(-0.5 * ((yy - y - thick / 2) / (thick / 2 + 1e-3)) ** 2)
            y = y + thick + rng.uniform(0.0, 0.03) * h
        speckle = rng.gamma(4.0, 0.25, size=(h, w)).astype(np.float32)
        img = img * speckle + 0.05 * rng.random((h, w), dtype=np.float32)
        out[i] = np.clip(img / max(float(img.max()), 1e-6) * 255, 0, 255).astype(np.uint8)
    return out


def _batches(x: dict[str, np.ndarray], batch: int) -> list[dict[str, np.ndarray]]:
    n = next(iter(x.values())).shape[0]
    return [{k: v[i:i + batch] for k, v in x.items()} for i in range(0, n - batch + 1, batch)]


def load_export_data(source: str | Path | None, specs: dict[str, PreprocessSpec], *, n_calib: int,
                     n_val: int, task: str, n_classes: int, calib_batch: int = 1, seed: int = 0) -> ExportData:
    """Calibration feeds + validation inputs (and labels when the folder has them).

    `source` None -> generated images (synthetic OCT, `seed`). A folder -> its images in a
    seeded random order: the first `n_calib` calibrate, the next `n_val` validate (reused with a
    note when the folder is too small).
    """
    names = list(specs)
    notes: list[str] = []
    if source is None or len(names) > 1:
        if source is not None:
            notes.append("multi-input model: folder images not used; generated inputs for every modality")
        val = {m: preprocess(synthetic_oct(n_val, specs[m].size, seed + 1000 + i), specs[m]) for i, m in enumerate(names)}
        cal = {m: preprocess(synthetic_oct(n_calib, specs[m].size, seed + i), specs[m]) for i, m in enumerate(names)}
        return ExportData(_batches(cal, calib_batch), val, None,
                          f"generated (synthetic OCT-like, seed {seed})", notes)

    from mirage_edge.data.layout import scan_dataset

    root = Path(source)
    index = scan_dataset(root)
    samples = index.samples()
    if not samples:
        raise DataError(f"no images found under {root}")
    order = np.random.default_rng(seed).permutation(len(samples))
    samples = [samples[i] for i in order]
    cal_s = samples[:n_calib]
    val_s = samples[n_calib:n_calib + n_val]
    if len(cal_s) < n_calib:
        notes.append(f"{root} has {len(samples)} images; calibrated on {len(cal_s)} instead of {n_calib}")
    if len(val_s) < n_val:
        val_s = samples[-min(n_val, len(samples)):]
        notes.append(f"{root} too small for separate validation images; {len(val_s)} overlap calibration")
    spec = specs[names[0]]
    cal = {names[0]: np.stack([preprocess(read_image(s.image), spec) for s in cal_s])}
    val = {names[0]: np.stack([preprocess(read_image(s.image), spec) for s in val_s])}
    labels = None
    if index.task == "classification" and task == "classification" and len(index.classes) == n_classes:
        labels = np.array([s.label for s in val_s], dtype=np.int64)
    elif index.task == "segmentation" and task == "segmentation" and index.info is not None \
            and index.info.num_classes == n_classes:
        try:
            labels = np.stack([resize_mask(index.info.class_map(read_image(s.mask), s.mask), spec.size)
                               for s in val_s if s.mask is not None])
        except DataError as exc:  # labels are optional here: validate without them, and say why
            notes.append(f"{exc}; labels not used (run `mirage-edge data check {root}`)")
            labels = None
    elif index.task in ("classification", "segmentation"):
        notes.append(f"{root} labels not used: dataset task {index.task} / classes do not match the model")
    return ExportData(_batches(cal, calib_batch), val, labels, str(root), notes, [s.volume for s in val_s])
