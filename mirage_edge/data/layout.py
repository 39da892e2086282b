"""RetinaBench folder layouts -> an index of samples (torch-free; no pixels are read here).

Layouts (the MIRAGE benchmark's, DESIGN.md §3; "RetinaBench" is our name for that task set):

* classification  ``<root>/{train,val,test}/<Class>/*.png``; evaluation-only ``<root>/<Class>/*.png``.
* segmentation    ``<root>/{train,val,test}/{bscan,semseg}/<id>.png`` + ``<root>/INFO.json``;
                  evaluation-only ``<root>/{bscan,semseg}/`` + ``INFO.json``.
* multimodal      ``<root>/{train,val,test}/{bscan,slo[,bscanlayermap][,semseg]}/<id>.(png|npy)``
                  (also without split folders — the MIRAGE pretraining layout), or a *triplet
                  folder* holding ``bscan.npy``, ``slo.npy``, ``bscanlayermap.npy`` (the official
                  example), read as a one-sample, one-volume set named after the folder.
* unlabelled      any folder of images (searched recursively), e.g. for distillation.
* cross-dataset   `cross_dataset(train_root, test_root)`: train/val from one set, test from another.

Sample ids are file stems; a stem ``<scan>_<slice>`` belongs to volume ``<scan>`` (the text before
the last underscore; a stem without one is its own volume), as MIRAGE's `run_seg_eval.py` groups
B-scans. Two files of one folder with the same stem (``x.png`` beside ``x.tif``) are refused: a
B-scan finds its mask by stem. Indexing reads no pixels, only the image headers of B-scans and masks
(`io.image_shape`) to pair equal sizes; mask values are checked when a mask is loaded
(`SegInfo.class_map`), the rest of the pixel-level validation lives in `mirage_edge.data.check`.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from mirage_edge.data.io import image_shape, is_image_file
from mirage_edge.errors import DataError

SPLITS = ("train", "val", "test")
IMAGE_DIR = "bscan"
MASK_DIR = "semseg"
EXTRA_MODALITIES = ("slo", "bscanlayermap")
MODALITY_DIRS = (IMAGE_DIR, MASK_DIR, *EXTRA_MODALITIES)
EVAL_SPLIT = "all"  # split name of evaluation-only sets
Task = Literal["auto", "segmentation", "classification", "multimodal", "unlabelled"]

# Labels MIRAGE's run_seg_eval.py leaves out of the scores (substring match, case-insensitive),
# plus "invalid" regions, which it excludes from both prediction and target.
BACKGROUND_WORDS = ("bg", "background", "above ilm")
INVALID_WORDS = ("invalid",)
LESION_WORDS = ("fluid", "cyst", "irf", "srf", "ped", "drusen", "lesion", "edema", "exudate",
                "hemorrhage", "shrm", "cnv", "atrophy")


def volume_id(stem: str) -> str:
    """Volume (scan) id of a B-scan file stem: '<scan>_<slice>' -> '<scan>'; no '_' -> the stem."""
    return stem.rsplit("_", 1)[0] if "_" in stem else stem


@dataclass(frozen=True)
class SegClass:
    index: int
    value: int
    label: str

    @property
    def kind(self) -> Literal["background", "invalid", "lesion", "layer"]:
        low = self.label.lower()
        if any(w in low for w in INVALID_WORDS):
            return "invalid"
        if any(w in low for w in BACKGROUND_WORDS):
            return "background"
        tokens = set(re.split(r"[^a-z]+", low))
        if tokens & set(LESION_WORDS) or any(w in low for w in LESION_WORDS if len(w) > 4):
            return "lesion"
        return "layer"


@dataclass(frozen=True)
class SegInfo:
    """Contents of INFO.json: class index -> pixel value in the mask PNGs and a label."""

    classes: tuple[SegClass, ...]
    path: Path | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def labels(self) -> list[str]:
        return [c.label for c in self.classes]

    @property
    def values(self) -> list[int]:
        return [c.value for c in self.classes]

    def indices(self, kind: str) -> list[int]:
        """Class indices of a kind: 'background', 'invalid', 'lesion' or 'layer'."""
        return [c.index for c in self.classes if c.kind == kind]

    @property
    def ignore(self) -> tuple[int, ...]:
        """Classes not scored (background-like and invalid), as MIRAGE's evaluation."""
        return tuple(c.index for c in self.classes if c.kind in ("background", "invalid"))

    def lut(self) -> np.ndarray:
        """int64 lookup table pixel value -> class index (-1 for values not in INFO.json)."""
        size = max(256, max(self.values) + 1)
        lut = np.full(size, -1, dtype=np.int64)
        for c in self.classes:
            lut[c.value] = c.index
        return lut

    def class_map(self, raw: np.ndarray, source: str | Path = "mask") -> np.ndarray:
        """Mask pixel values (H x W integers, as `read_image` returns them) -> class indices (H x W int64).

        Raises `DataError` naming `source` (the mask file) for a non-integer mask or pixel values
        that INFO.json does not list, instead of mapping them to a wrong or ignored class.
        """
        if not np.issubdtype(raw.dtype, np.integer):
            raise DataError(f"mask {source} has dtype {raw.dtype}; masks hold integer class values")
        lut = self.lut()
        values = np.unique(raw)
        bad = [int(v) for v in values if not 0 <= v < len(lut) or lut[v] < 0]
        if bad:
            listed = f"{bad[:10]}" + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
            raise DataError(f"mask {source} has pixel values {listed} that are not in "
                            f"{self.path or 'INFO.json'} (allowed: {self.values})")
        return lut[raw]

    def to_json(self) -> str:
        return json.dumps({str(c.index): {"value": c.value, "label": c.label} for c in self.classes}, indent=4)


def parse_info(data: object, source: str = "INFO.json") -> SegInfo:
    """Validate INFO.json content: {"0": {"value": int, "label": str}, ...}, indices 0..K-1."""
    if not isinstance(data, dict) or not data:
        raise DataError(f"{source} is malformed: expected a non-empty object mapping class index -> "
                        '{"value": int, "label": str}')
    classes = []
    for key, entry in data.items():
        try:
            index = int(key)
        except (TypeError, ValueError):
            raise DataError(f"{source} is malformed: class key {key!r} is not an integer index") from None
        if not isinstance(entry, dict) or set(entry) - {"value", "label"} or "value" not in entry \
                or "label" not in entry:
            raise DataError(f"{source} is malformed: class {key!r} must be {{\"value\": int, \"label\": str}}, "
                            f"got {entry!r}")
        value, label = entry["value"], entry["label"]
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
            raise DataError(f"{source} is malformed: class {key!r} value must be an integer 0..65535, got {value!r}")
        if not isinstance(label, str) or not label.strip():
            raise DataError(f"{source} is malformed: class {key!r} label must be a non-empty string, got {label!r}")
        classes.append(SegClass(index, value, label))
    classes.sort(key=lambda c: c.index)
    if [c.index for c in classes] != list(range(len(classes))):
        raise DataError(f"{source} is malformed: class indices must be 0..{len(classes) - 1}, "
                        f"got {[c.index for c in classes]}")
    values = [c.value for c in classes]
    if len(set(values)) != len(values):
        raise DataError(f"{source} is malformed: two classes share a pixel value ({values})")
    return SegInfo(tuple(classes))


def read_info(path: str | Path) -> SegInfo:
    """Read and validate an INFO.json file; errors name the file."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"INFO.json not found: {p} (segmentation sets need one: class index -> value, label)")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{p} is malformed: not valid JSON ({exc})") from exc
    info = parse_info(data, source=str(p))
    return SegInfo(info.classes, p)


@dataclass(frozen=True)
class Sample:
    """One item: its B-scan (or classification image) and what belongs to it."""

    id: str
    split: str
    image: Path
    volume: str
    mask: Path | None = None
    label: int | None = None
    extra: tuple[tuple[str, Path], ...] = ()  # (modality, path) pairs, e.g. ("slo", ...)

    def modality(self, name: str) -> Path | None:
        return dict(self.extra).get(name)


@dataclass
class DatasetIndex:
    """All samples of one dataset by split, plus classes and what was excluded (and why)."""

    root: Path
    task: str
    splits: dict[str, list[Sample]]
    classes: list[str] = field(default_factory=list)
    info: SegInfo | None = None
    modalities: tuple[str, ...] = (IMAGE_DIR,)
    excluded: list[tuple[str, str]] = field(default_factory=list)  # (file, reason), from skip_bad
    warnings: list[str] = field(default_factory=list)

    def samples(self, split: str | None = None) -> list[Sample]:
        """Samples of `split` (None = all splits, in split order)."""
        if split is None:
            return [s for ss in self.splits.values() for s in ss]
        if split not in self.splits:
            raise DataError(f"{self.root} has no split {split!r} (splits: {', '.join(self.splits) or 'none'})")
        return list(self.splits[split])

    def volumes(self, split: str | None = None) -> dict[str, list[Sample]]:
        out: dict[str, list[Sample]] = {}
        for s in self.samples(split):
            out.setdefault(s.volume, []).append(s)
        return out

    def counts(self) -> dict[str, dict[str, int]]:
        """split -> {"images": n, "volumes": v, <class>: n (classification)}."""
        out = {}
        for split, ss in self.splits.items():
            row = {"images": len(ss), "volumes": len({s.volume for s in ss})}
            if self.task == "classification":
                for i, c in enumerate(self.classes):
                    row[c] = sum(1 for s in ss if s.label == i)
            out[split] = row
        return out


def _images(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files of `folder`, sorted; `DataError` if two in one folder share a stem (x.png, x.tif):
    masks, paired modalities and sample ids are matched by stem, so either pairing would be a guess."""
    it = folder.rglob("*") if recursive else folder.iterdir()
    files = sorted(p for p in it if p.is_file() and is_image_file(p))
    groups: dict[tuple[Path, str], list[Path]] = {}
    for p in files:
        groups.setdefault((p.parent, p.stem), []).append(p)
    clashes = [g for g in groups.values() if len(g) > 1]
    if clashes:
        listed = "; ".join(" + ".join(str(p.relative_to(folder)) for p in g) for g in clashes[:10])
        raise DataError(f"ambiguous file names in {folder}: {listed} share a file stem (images, masks and "
                        "sample ids are matched by stem); keep one file per stem")
    return files


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _is_triplet(folder: Path) -> bool:
    names = {p.stem for p in folder.iterdir() if p.is_file() and is_image_file(p)}
    return IMAGE_DIR in names and bool(names & set(EXTRA_MODALITIES))


def detect_task(root: Path) -> str:
    """Guess the layout of `root` (see module docstring)."""
    if _is_triplet(root):
        return "multimodal"
    split_dirs = [root / s for s in SPLITS if (root / s).is_dir()]
    bases = split_dirs or [root]
    for base in bases:
        sub = {p.name for p in _subdirs(base)}
        if IMAGE_DIR in sub:
            if MASK_DIR in sub:
                return "segmentation"
            if sub & set(EXTRA_MODALITIES):
                return "multimodal"
            return "unlabelled"
    if all(_subdirs(b) and any(_images(d) for d in _subdirs(b)) for b in bases):
        return "classification"
    if split_dirs and not any(_subdirs(b) for b in bases):
        return "unlabelled"
    return "unlabelled"


def _split_bases(root: Path) -> dict[str, Path]:
    present = {s: root / s for s in SPLITS if (root / s).is_dir()}
    return present or {EVAL_SPLIT: root}


def scan_dataset(root: str | Path, task: Task = "auto", skip_bad: bool = False) -> DatasetIndex:
    """Index the dataset at `root` without reading pixels.

    Structural problems raise `DataError` naming the folder/file: no such folder, empty split or
    class folder, a B-scan without its mask (or a mask without its B-scan), a missing modality
    file, malformed or missing INFO.json. Pixel checks (readable, sizes, mask values) are in
    `check_dataset`, which calls this first. With `skip_bad=True` per-file problems (a B-scan
    without its mask, an orphan mask) exclude those files and are listed in `index.excluded`
    instead; folder-level problems (empty split, bad INFO.json) still raise.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder not found: {root}")
    if task == "auto":
        task = detect_task(root)  # type: ignore[assignment]
    if task == "segmentation":
        return _scan_modal(root, "segmentation", skip_bad)
    if task == "multimodal":
        return _scan_triplet(root) if _is_triplet(root) else _scan_modal(root, "multimodal", skip_bad)
    if task == "classification":
        return _scan_classification(root)
    if task == "unlabelled":
        return _scan_unlabelled(root)
    raise DataError(f"unknown task {task!r} for {root}; use segmentation, classification, multimodal or unlabelled")


def problems_error(root: Path, problems: list[tuple[str, str]], limit: int = 10) -> DataError:
    """One DataError listing per-file problems (file: reason), each naming the file."""
    lines = [f"  {f}: {r}" for f, r in problems[:limit]]
    more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
    return DataError(f"{len(problems)} problem(s) in dataset {root}:\n" + "\n".join(lines) + more
                     + "\n(fix the files, or pass skip_bad=True / --skip-bad to exclude them, reported)")


def _scan_modal(root: Path, task: str, skip_bad: bool = False) -> DatasetIndex:
    info = None
    info_path = root / "INFO.json"
    if task == "segmentation" or info_path.exists():
        info = read_info(info_path)
    splits: dict[str, list[Sample]] = {}
    modalities: set[str] = set()
    problems: list[tuple[str, str]] = []
    for split, base in _split_bases(root).items():
        img_dir = base / IMAGE_DIR
        if not img_dir.is_dir():
            raise DataError(f"{base} has no '{IMAGE_DIR}/' folder (expected {base}/{IMAGE_DIR}/<id>.png)")
        images = _images(img_dir)
        if not images:
            raise DataError(f"empty split: {img_dir} holds no images")
        present = [m for m in (MASK_DIR, *EXTRA_MODALITIES) if (base / m).is_dir()]
        if task == "segmentation" and MASK_DIR not in present:
            raise DataError(f"{base} has no '{MASK_DIR}/' folder with the masks for {img_dir}")
        by_mod = {m: {p.stem: p for p in _images(base / m)} for m in present}
        stems = {p.stem for p in images}
        bad: set[str] = set()
        for m, files in by_mod.items():
            kind = "mask" if m == MASK_DIR else f"'{m}' image"
            for p in images:
                if p.stem not in files:
                    bad.add(p.stem)
                    problems.append((str(p), f"B-scan without a {kind} (no {p.stem}.* in {base / m}/)"))
            for stem in sorted(set(files) - stems):
                problems.append((str(files[stem]), f"{kind} without a B-scan (no {stem}.* in {img_dir}/)"))
        # B-scans of different sizes are fine (preprocessing resizes each one, its mask alike), but a
        # mask must match its own B-scan pixel for pixel. Headers only: no decoding at index time.
        for p in images:
            mask = by_mod.get(MASK_DIR, {}).get(p.stem)
            if mask is None or p.stem in bad:
                continue
            ishape, mshape = image_shape(p), image_shape(mask)
            if ishape and mshape and ishape != mshape:
                bad.add(p.stem)
                problems.append((str(mask), f"size mismatch: mask {mask} is {mshape[0]}x{mshape[1]} but image "
                                            f"{p} is {ishape[0]}x{ishape[1]} (H x W)"))
        images = [p for p in images if p.stem not in bad]
        modalities.update(present)
        splits[split] = [
            Sample(id=p.stem, split=split, image=p, volume=volume_id(p.stem),
                   mask=by_mod[MASK_DIR][p.stem] if MASK_DIR in by_mod else None,
                   extra=tuple((m, by_mod[m][p.stem]) for m in EXTRA_MODALITIES if m in by_mod))
            for p in images
        ]
    if problems and not skip_bad:
        raise problems_error(root, problems)
    for split, ss in splits.items():
        if not ss:
            raise DataError(f"empty split: every B-scan of {root / split} was excluded ({len(problems)} problems)")
    mods = (IMAGE_DIR, *[m for m in EXTRA_MODALITIES if m in modalities])
    return DatasetIndex(root=root, task=task, splits=splits, classes=info.labels if info else [], info=info,
                        modalities=mods, excluded=problems)


def _scan_triplet(root: Path) -> DatasetIndex:
    files = {p.stem: p for p in _images(root)}
    extra = tuple((m, files[m]) for m in EXTRA_MODALITIES if m in files)
    info = read_info(root / "INFO.json") if (root / "INFO.json").exists() else None
    sample = Sample(id=root.name, split=EVAL_SPLIT, image=files[IMAGE_DIR], volume=root.name,
                    mask=files.get(MASK_DIR), extra=extra)
    return DatasetIndex(root=root, task="multimodal", splits={EVAL_SPLIT: [sample]},
                        classes=info.labels if info else [], info=info,
                        modalities=(IMAGE_DIR, *[m for m, _ in extra]))


def _scan_classification(root: Path) -> DatasetIndex:
    bases = _split_bases(root)
    per_split: dict[str, dict[str, list[Path]]] = {}
    for split, base in bases.items():
        class_dirs = _subdirs(base)
        if not class_dirs:
            raise DataError(f"empty split: {base} has no class folders (expected {base}/<Class>/*.png)")
        names = {d.name for d in class_dirs}
        paired = sorted(names & {MASK_DIR, *EXTRA_MODALITIES})
        if IMAGE_DIR in names and paired:  # bscan/ + semseg/ are modalities, not two classes
            kind = "segmentation" if MASK_DIR in names else "multimodal"
            folders = " + ".join(f"{d}/" for d in (IMAGE_DIR, *paired))
            raise DataError(f"{root} is a {kind} set ({base} has {folders}), not a "
                            f"classification set of <Class>/ folders; use it as a {kind} set (--task "
                            f"{'seg' if kind == 'segmentation' else 'multimodal'}) or give a folder with one "
                            "subfolder per class")
        per_split[split] = {}
        for d in class_dirs:
            imgs = _images(d)
            if not imgs:
                raise DataError(f"empty class: {d} holds no images")
            per_split[split][d.name] = imgs
    # Class order = sorted folder names of the training split (torchvision ImageFolder's rule).
    ref = per_split.get("train") or next(iter(per_split.values()))
    classes = sorted(ref)
    warnings = []
    for split, by_class in per_split.items():
        unknown = sorted(set(by_class) - set(classes))
        if unknown:
            raise DataError(f"{bases[split] / unknown[0]}: class {unknown[0]!r} is not in the training classes "
                            f"{classes}")
        absent = sorted(set(classes) - set(by_class))
        if absent:
            warnings.append(f"split {split!r} ({bases[split]}) has no images of class(es) {absent}")
    splits = {
        # the class folder is part of the id: one file name in two class folders is two samples (the
        # teacher cache and the augmentation seeds are keyed by id)
        split: [Sample(id=f"{c}/{p.stem}", split=split, image=p, volume=volume_id(p.stem), label=classes.index(c))
                for c in sorted(by_class) for p in by_class[c]]
        for split, by_class in per_split.items()
    }
    return DatasetIndex(root=root, task="classification", splits=splits, classes=classes, warnings=warnings)


def _scan_unlabelled(root: Path) -> DatasetIndex:
    images = [p for p in _images(root, recursive=True) if MASK_DIR not in p.relative_to(root).parts
              and not any(m in p.relative_to(root).parts for m in EXTRA_MODALITIES)]
    if not images:
        raise DataError(f"no images found under {root}")
    samples = [Sample(id=str(p.relative_to(root).with_suffix("")).replace("\\", "/"), split=EVAL_SPLIT, image=p,
                      volume=volume_id(p.stem)) for p in images]
    return DatasetIndex(root=root, task="unlabelled", splits={EVAL_SPLIT: samples})


def cross_dataset(train_root: str | Path, test_root: str | Path, task: Task = "auto") -> DatasetIndex:
    """A cross-dataset pair: train/val splits of `train_root`, test split from `test_root`.

    The test set's 'test' split is used if it has one, else all its samples. Classification class
    names (segmentation: INFO.json labels) must agree, else `DataError`.
    """
    tr = scan_dataset(train_root, task)
    te = scan_dataset(test_root, tr.task if task == "auto" else task)
    if tr.task != te.task:
        raise DataError(f"cross-dataset pair mixes a {tr.task} set ({tr.root}) with a {te.task} set ({te.root})")
    test = te.splits.get("test") or te.samples()
    if tr.task == "classification":
        unknown = sorted(set(te.classes) - set(tr.classes))
        if unknown:
            raise DataError(f"{te.root}: test classes {unknown} are not among the training classes {tr.classes}")
        test = [Sample(s.id, "test", s.image, s.volume, label=tr.classes.index(te.classes[s.label]))
                for s in test]
    elif tr.info is not None and te.info is not None and tr.info.labels != te.info.labels:
        raise DataError(f"{te.info.path}: classes {te.info.labels} differ from {tr.info.path}: {tr.info.labels}")
    else:
        test = [Sample(s.id, "test", s.image, s.volume, s.mask, s.label, s.extra) for s in test]
    splits = {k: v for k, v in tr.splits.items() if k != "test"}
    splits["test"] = test
    return DatasetIndex(root=tr.root, task=tr.task, splits=splits, classes=tr.classes, info=tr.info,
                        modalities=tr.modalities, warnings=tr.warnings + te.warnings)


__all__ = [
    "SPLITS", "EVAL_SPLIT", "SegClass", "SegInfo", "Sample", "DatasetIndex", "volume_id", "parse_info",
    "read_info", "detect_task", "scan_dataset", "cross_dataset",
]
