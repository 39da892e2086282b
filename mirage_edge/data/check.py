"""Pixel-level dataset validation and summary (torch-free; threads, since OpenCV decoding frees the GIL).

`check_dataset(root)` indexes the set (`layout.scan_dataset`), then reads every file once in a
thread pool and records, per file, each problem found:

* unreadable / truncated / empty image or mask (`DataError` from `read_image`),
* a mask with pixel values that INFO.json does not list,
* an image / mask size mismatch, a non-integer mask or layer map,

plus statistics: image sizes and dtypes, class pixel frequencies (segmentation), volumes.
`load_dataset(..., skip_bad=False)` raises one `DataError` naming every bad file;
`skip_bad=True` drops those samples and keeps them in `index.excluded` (reported, never silent).
"""
from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mirage_edge.data.io import read_image
from mirage_edge.data.layout import DatasetIndex, Sample, SegInfo, Task, problems_error, scan_dataset
from mirage_edge.errors import DataError


@dataclass
class _SampleResult:
    problems: list[tuple[str, str]] = field(default_factory=list)
    shape: tuple[int, int] | None = None
    dtype: str | None = None
    class_pixels: np.ndarray | None = None  # counts per class index (segmentation)


def _check_sample(sample: Sample, info: SegInfo | None) -> _SampleResult:
    res = _SampleResult()
    try:
        img = read_image(sample.image)
        res.shape, res.dtype = img.shape, str(img.dtype)
    except DataError as exc:
        res.problems.append((str(sample.image), str(exc)))
        img = None
    if sample.mask is not None:
        mpath = str(sample.mask)
        try:
            mask = read_image(sample.mask)
        except DataError as exc:
            res.problems.append((mpath, str(exc)))
        else:
            if info is not None:
                try:  # the mapping training and distillation use, so a user meets the same error here
                    classes = info.class_map(mask, mpath)
                except DataError as exc:
                    res.problems.append((mpath, str(exc)))
                else:
                    res.class_pixels = np.bincount(classes.ravel(), minlength=info.num_classes)
            elif not np.issubdtype(mask.dtype, np.integer):
                res.problems.append((mpath, f"mask {mpath} has dtype {mask.dtype}; masks hold integer class "
                                            "values"))
            if img is not None and mask.shape != img.shape:
                res.problems.append((mpath, f"size mismatch: mask {mpath} is {mask.shape[0]}x{mask.shape[1]} but "
                                            f"image {sample.image} is {img.shape[0]}x{img.shape[1]} (H x W)"))
    for name, path in sample.extra:
        try:
            arr = read_image(path)
        except DataError as exc:
            res.problems.append((str(path), str(exc)))
            continue
        if name == "bscanlayermap" and not np.issubdtype(arr.dtype, np.integer):
            res.problems.append((str(path), f"layer map {path} has dtype {arr.dtype}; expected integer labels"))
    return res


@dataclass
class CheckReport:
    """What `check_dataset` found: the index (bad samples removed when skip_bad), problems, stats."""

    index: DatasetIndex
    problems: list[tuple[str, str]]
    image_sizes: dict[str, int]
    dtypes: dict[str, int]
    class_pixels: dict[str, np.ndarray]  # split -> pixel count per class index (segmentation)
    checked: int

    @property
    def ok(self) -> bool:
        return not self.problems and not self.index.excluded

    def pixel_fractions(self, split: str | None = None) -> dict[str, float]:
        """Class label -> fraction of mask pixels (one split, or all checked splits)."""
        info = self.index.info
        if info is None or not self.class_pixels:
            return {}
        counts = self.class_pixels[split] if split else sum(self.class_pixels.values())
        counts = np.asarray(counts, dtype=np.float64)
        total = counts.sum()
        return {lab: float(counts[i] / total) if total else 0.0 for i, lab in enumerate(info.labels)}

    def summary(self) -> dict[str, Any]:
        idx = self.index
        return {
            "root": str(idx.root),
            "task": idx.task,
            "modalities": list(idx.modalities),
            "classes": list(idx.classes),
            "splits": idx.counts(),
            "image_sizes": dict(self.image_sizes),
            "dtypes": dict(self.dtypes),
            "pixel_fractions": {s: self.pixel_fractions(s) for s in self.class_pixels},
            "checked_files": self.checked,
            "excluded": [{"file": f, "reason": r} for f, r in idx.excluded],
            "problems": [{"file": f, "reason": r} for f, r in self.problems],
            "warnings": list(idx.warnings),
        }


def check_dataset(root: str | Path | DatasetIndex, task: Task = "auto", skip_bad: bool = False,
                  splits: Sequence[str] | None = None, workers: int | None = None) -> CheckReport:
    """Index and read every file of the dataset (optionally only `splits`) and report problems.

    Never raises for per-file problems: they are in `report.problems` (and, with `skip_bad`, the
    bad samples are moved out of `report.index` into `index.excluded`). Folder-level problems
    (missing folder, empty split/class, malformed INFO.json, two files sharing a stem) raise `DataError`.
    """
    index = root if isinstance(root, DatasetIndex) else scan_dataset(root, task, skip_bad=True)
    structural = list(index.excluded) if not isinstance(root, DatasetIndex) else []
    wanted = [s for s in index.splits if splits is None or s in splits]
    jobs = [(split, s) for split in wanted for s in index.splits[split]]
    workers = workers or min(8, (os.cpu_count() or 2) * 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(lambda job: _check_sample(job[1], index.info), jobs))
    problems = list(structural)
    sizes: Counter[str] = Counter()
    dtypes: Counter[str] = Counter()
    pixels: dict[str, np.ndarray] = {}
    bad_ids: set[tuple[str, str]] = set()
    for (split, sample), res in zip(jobs, results):
        problems.extend(res.problems)
        if res.problems:
            bad_ids.add((split, sample.id))
            continue
        if res.shape is not None:
            sizes[f"{res.shape[0]}x{res.shape[1]}"] += 1
            dtypes[res.dtype or "?"] += 1
        if res.class_pixels is not None:
            pixels[split] = pixels.get(split, 0) + res.class_pixels.astype(np.int64)
    if skip_bad:
        new_splits = {k: [s for s in v if (k, s.id) not in bad_ids] for k, v in index.splits.items()}
        empty = [k for k, v in new_splits.items() if not v]
        if empty:
            raise DataError(f"empty split after excluding bad files: {index.root / empty[0]} "
                            f"({len(problems)} problems, first: {problems[0][0]}: {problems[0][1]})")
        index = replace(index, splits=new_splits, excluded=problems)
        reported: list[tuple[str, str]] = []
    else:
        reported = problems
    return CheckReport(index=index, problems=reported, image_sizes=dict(sizes), dtypes=dict(dtypes),
                       class_pixels=pixels, checked=len(jobs))


def load_dataset(root: str | Path, task: Task = "auto", skip_bad: bool = False, check: bool = True,
                 splits: Sequence[str] | None = None) -> DatasetIndex:
    """Index a dataset and (with `check`, the default) validate its pixels up front.

    Raises one `DataError` listing every bad file unless `skip_bad`, which excludes them and
    records them in `index.excluded`. `check=False` only indexes (structural checks still run).
    """
    if not check:
        return scan_dataset(root, task, skip_bad=skip_bad)
    if not skip_bad:
        scan_dataset(root, task)  # structural problems raise here, each naming its file
    report = check_dataset(root, task, skip_bad=skip_bad, splits=splits)
    if report.problems:
        raise problems_error(Path(root), report.problems)
    return report.index


def format_report(report: CheckReport) -> str:
    """Plain-text version of the summary (the CLI renders a rich table instead)."""
    s = report.summary()
    lines = [f"{s['root']}: {s['task']} ({', '.join(s['modalities'])}), {s['checked_files']} samples checked"]
    for split, row in s["splits"].items():
        lines.append(f"  {split}: " + ", ".join(f"{k}={v}" for k, v in row.items()))
    lines.append("  sizes: " + ", ".join(f"{k} ({v})" for k, v in s["image_sizes"].items()))
    for split, fr in s["pixel_fractions"].items():
        lines.append(f"  pixels {split}: " + ", ".join(f"{k}={v:.4f}" for k, v in fr.items()))
    for p in s["problems"]:
        lines.append(f"  PROBLEM {p['file']}: {p['reason']}")
    for p in s["excluded"]:
        lines.append(f"  EXCLUDED {p['file']}: {p['reason']}")
    for w in s["warnings"]:
        lines.append(f"  WARNING {w}")
    return "\n".join(lines)


__all__ = ["CheckReport", "check_dataset", "load_dataset", "format_report"]
