"""Subject-wise folds of a RetinaBench segmentation set, and each fold's dataset as a folder of links
(torch-free; no pixels are read).

Subjects: every B-scan of every split (train, val, test, or the one evaluation-only split) is pooled
and grouped by its volume id, the dataset's own subject rule (`mirage_edge.data.layout.volume_id`: the
file stem before its last underscore, ``subject07_annot03`` -> ``subject07``; a stem without one is its
own subject). Subjects are sorted in natural order (``s2`` before ``s10``) and cut into `folds`
contiguous groups of near-equal size (the first ``n % folds`` groups get one more).

Fold k: test = group k, val = group k-1 (mod folds), train = the other groups. The val group is the
one *before* the test group so that the last fold of a set whose official split is the same cut (Duke
DME: subjects 1-6 train, 7-8 val, 9-10 test, 5 folds of 2) is that official split. Every subject is
tested exactly once, and no subject is in two splits of a fold. At least 3 folds (train needs a group
of its own) and 2 subjects a fold (`MIN_SUBJECTS_PER_FOLD`: a fold's test and val Dice are then
means over subjects, not one subject's) are required.

A fold's dataset is ``<dir>/{train,val,test}/{bscan,semseg[,slo,bscanlayermap]}/<file>`` plus
``INFO.json``: symbolic links to the original files (copies where the file system refuses links), so
the training and distillation code reads it as any RetinaBench folder and the original set is never
written.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from mirage_edge.data.layout import IMAGE_DIR, MASK_DIR, Sample, scan_dataset
from mirage_edge.errors import ConfigError, DataError

MIN_SUBJECTS_PER_FOLD = 2
MIN_FOLDS = 3
SPLIT_NAMES = ("train", "val", "test")


def natural_key(text: str) -> list[object]:
    """Sort key that orders digit runs by value: 'subject2' < 'subject10'."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


@dataclass(frozen=True)
class Fold:
    """One fold: the subjects of each split (natural order)."""

    index: int
    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]

    def split_of(self, subject: str) -> str | None:
        for name in SPLIT_NAMES:
            if subject in getattr(self, name):
                return name
        return None

    def to_dict(self) -> dict[str, object]:
        return {"fold": self.index, "train": list(self.train), "val": list(self.val), "test": list(self.test)}


def subjects_of(root: str | Path) -> dict[str, list[Sample]]:
    """Subject id -> its B-scans (with masks), pooled over every split of the segmentation set `root`.

    Raises `DataError` for a folder that is not a segmentation set (named in the message), or when one
    file stem occurs in two splits (the fold folders could not hold both)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"--data {root}: no such folder")
    if not (root / "INFO.json").is_file():
        raise DataError(f"--data {root} is not a segmentation set: no INFO.json (expected "
                        f"{root}/{{train,val,test}}/{{{IMAGE_DIR},{MASK_DIR}}}/<subject>_<n>.png + INFO.json)")
    index = scan_dataset(root, "segmentation")
    out: dict[str, list[Sample]] = {}
    seen: dict[str, str] = {}
    for s in index.samples():
        if s.id in seen:
            raise DataError(f"--data {root}: B-scan {s.id!r} is in both the {seen[s.id]} and the {s.split} split")
        seen[s.id] = s.split
        out.setdefault(s.volume, []).append(s)
    return {k: out[k] for k in sorted(out, key=natural_key)}


def make_folds(subjects: list[str], folds: int, source: str = "--data") -> list[Fold]:
    """Cut `subjects` (in the given order) into `folds` contiguous groups; fold k tests group k,
    validates on group k-1 and trains on the rest (module docstring).

    Raises `ConfigError` for fewer than `MIN_FOLDS` folds and `DataError` for fewer than
    `MIN_SUBJECTS_PER_FOLD * folds` subjects, naming the counts."""
    if folds < MIN_FOLDS:
        raise ConfigError(f"--folds {folds}: cross-validation needs at least {MIN_FOLDS} folds "
                          "(one group tests, one validates, the rest train)")
    n = len(subjects)
    if n < MIN_SUBJECTS_PER_FOLD * folds:
        raise DataError(f"{source} has {n} subject(s) ({', '.join(subjects[:12]) or 'none'}); {folds} folds of "
                        f"{MIN_SUBJECTS_PER_FOLD} subjects need at least {MIN_SUBJECTS_PER_FOLD * folds}: "
                        "use fewer --folds")
    size, extra = divmod(n, folds)
    groups, start = [], 0
    for k in range(folds):
        end = start + size + (1 if k < extra else 0)
        groups.append(tuple(subjects[start:end]))
        start = end
    return [Fold(k, tuple(s for j, g in enumerate(groups) if j not in (k, (k - 1) % folds) for s in g),
                 groups[(k - 1) % folds], groups[k]) for k in range(folds)]


def _link(src: Path, dst: Path) -> str:
    """Symlink dst -> src (absolute); a copy where links are refused. Returns 'symlink' or 'copy'."""
    try:
        os.symlink(src, dst)
        return "symlink"
    except OSError:  # e.g. a file system or platform without symlinks for this user
        shutil.copy2(src, dst)
        return "copy"


def build_fold_data(fold: Fold, subjects: dict[str, list[Sample]], info: Path, out: Path) -> dict[str, object]:
    """Write fold `fold`'s dataset to `out` (replacing what is there): links to each subject's B-scan,
    mask and other modality files under `out/<split>/<modality>/`, and INFO.json.

    Returns {"dir", "links": "symlink" | "copy" | "mixed", "images": {split: count}}."""
    if out.exists() or out.is_symlink():
        shutil.rmtree(out) if out.is_dir() and not out.is_symlink() else out.unlink()
    out.mkdir(parents=True)
    kinds = {_link(info.resolve(), out / "INFO.json")}
    counts = {}
    for split in SPLIT_NAMES:
        n = 0
        for subject in getattr(fold, split):
            for s in subjects[subject]:
                files = [(IMAGE_DIR, s.image), (MASK_DIR, s.mask), *s.extra]
                for modality, path in files:
                    if path is None:
                        raise DataError(f"B-scan {s.image} has no mask in {MASK_DIR}/")
                    folder = out / split / modality
                    folder.mkdir(parents=True, exist_ok=True)
                    kinds.add(_link(Path(path).resolve(), folder / Path(path).name))
                n += 1
        counts[split] = n
    links = kinds.pop() if len(kinds) == 1 else "mixed"
    return {"dir": str(out), "links": links, "images": counts}


def plan_folds(data: str | Path, folds: int) -> tuple[list[Fold], dict[str, list[Sample]]]:
    """Subjects of `data` and its folds; the errors of `subjects_of` and `make_folds`."""
    subjects = subjects_of(data)
    return make_folds(list(subjects), folds, f"--data {data}"), subjects


def fold_json(fold: Fold, subjects: dict[str, list[Sample]]) -> str:
    """The fold's subjects and B-scan counts per split, as JSON text (fold.json)."""
    d = fold.to_dict()
    d["images"] = {split: sum(len(subjects[s]) for s in getattr(fold, split)) for split in SPLIT_NAMES}
    return json.dumps(d, indent=1)


__all__ = ["Fold", "subjects_of", "make_folds", "plan_folds", "build_fold_data", "fold_json", "natural_key",
           "MIN_SUBJECTS_PER_FOLD", "MIN_FOLDS"]
