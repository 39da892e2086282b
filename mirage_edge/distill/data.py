"""Distillation data: samples of a RetinaBench folder with stable ids, fingerprints and views.

Built on the torch-free index of `mirage_edge.data.layout.scan_dataset` and the one numpy
preprocessing (`mirage_edge.data.preprocess`), so the student, the teacher and the deployed runtime
see identical pixels. Every item is::

    {"bscan": 1 x H x W float32 in [0, 1], "slo": 1 x H x W (if the teacher takes it),
     "label": int64 (cls) or H x W int64 (seg; -1 = ignore), "index": i, "view": v,
     "t_<name>": cached teacher target (float32), when a TeacherCache is attached}

Views: with ``views > 1`` sample i has `views` fixed augmented versions (flip/affine/intensity of
`mirage_edge.data.transforms.Augment`, generator seeded by (aug_seed, split/id, view)); each epoch
picks one at random (the trainer seeds that draw per epoch and sample). Teacher outputs are cached
per view, so augmentation and caching combine, as TinyViT stores its augmentation parameters.
"""
from __future__ import annotations

import copy
import hashlib
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from mirage_edge.data.io import read_image
from mirage_edge.data.layout import DatasetIndex, Sample, scan_dataset
from mirage_edge.data.preprocess import PreprocessSpec, preprocess, resize_mask
from mirage_edge.distill.cache import TeacherCache
from mirage_edge.distill.fingerprints import FileHashes, fingerprint_bytes
from mirage_edge.errors import DataError

TASKS = {"seg": "segmentation", "cls": "classification", "none": "unlabelled", "multimodal": "multimodal"}


def open_index(root: str | Path, task: str) -> DatasetIndex:
    """Index `root` for distillation `task` (seg | cls | none | multimodal | auto)."""
    layout = TASKS.get(task, task)
    return scan_dataset(root, task=layout if layout != "unlabelled" else "auto")  # type: ignore[arg-type]


def _seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:8], "little") & ((1 << 63) - 1)


def _root_tag(root: str | Path) -> str:
    """Short stable tag of a dataset folder (its resolved path)."""
    return hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:8]


class DistillSamples(Dataset):
    """Samples of one split for distillation (see module docstring).

    index: a `DatasetIndex`; split: its split name (None = all splits).
    spec: preprocessing (size = model input size). modalities: inputs to load (B-scan first).
    labels: load masks / class labels when the index has them.
    file_hashes: where the content hashes of the files are kept with their file status, so that an
    unchanged file is not read again to fingerprint it (None = `FileHashes.default_path()`;
    `FileHashes(None)` = read every file at every run).
    """

    def __init__(self, index: DatasetIndex, split: str | None, spec: PreprocessSpec,
                 modalities: Sequence[str] = ("bscan",), labels: bool = True, views: int = 1,
                 augment: Any = None, aug_seed: int = 0, limit: int = 0,
                 file_hashes: FileHashes | None = None) -> None:
        self.index = index
        self.samples: list[Sample] = index.samples(split)
        if limit:
            self.samples = self.samples[:limit]
        if not self.samples:
            raise DataError(f"{index.root}: split {split!r} has no samples")
        self.spec = spec
        self.modalities = list(modalities)
        for m in self.modalities[1:]:
            if any(s.modality(m) is None for s in self.samples):
                raise DataError(f"{index.root}: the teacher needs modality {m!r} but split {split!r} has no "
                                f"'{m}/' images (available: {list(index.modalities)})")
        self.task = index.task
        has_labels = self.task in ("segmentation", "classification") or any(s.mask is not None for s in self.samples)
        self.labels = bool(labels) and has_labels
        self.views = int(views)
        self.augment = augment
        self.aug_seed = int(aug_seed)
        self.cache: TeacherCache | None = None
        self._fp: list[str] | None = None
        self.file_hashes = file_hashes if file_hashes is not None else FileHashes(FileHashes.default_path())
        self.n_labelled = len(self.samples) if self.labels else 0
        self.extra_root: Path | None = None
        # the folder is part of a sample's id: two folders with the same split/id (data.path,
        # stage1.data, stage2.data) must not share - or keep overwriting - cached teacher outputs
        self._tags = [_root_tag(index.root)] * len(self.samples)

    def with_unlabelled(self, other: "DistillSamples") -> "DistillSamples":
        """A new set: these labelled samples, then `other`'s images (same preprocessing) unlabelled -
        label -1 (class) or an all -1 mask, which the stage-2 losses ignore. `self` is unchanged."""
        if self.n_labelled != len(self.samples):
            raise DataError(f"{self.index.root}: unlabelled samples can be added once, to a labelled set")
        if other.spec != self.spec or other.modalities != self.modalities:
            raise DataError(f"{other.index.root}: preprocessing or modalities differ from {self.index.root}")
        out = copy.copy(self)
        out.samples, out._tags = self.samples + other.samples, self._tags + other._tags
        out.extra_root, out.cache, out._fp = Path(other.index.root), None, None
        return out

    def __len__(self) -> int:
        return len(self.samples)

    # -- identity ----------------------------------------------------------------------------------
    def sample_id(self, i: int) -> str:
        s = self.samples[i]
        return f"{self._tags[i]}:{s.split}/{s.id}"

    def _paths(self, i: int) -> list[Path]:
        s = self.samples[i]
        return [s.image] + [s.modality(m) for m in self.modalities[1:]]  # type: ignore[misc]

    def fingerprint(self, i: int) -> str:
        """Content hash of every file the teacher reads for sample i (see `fingerprints`)."""
        return self.fingerprints()[i]

    def fingerprints(self) -> list[str]:
        """Content hash of each sample's files, computed for all samples at the first call: a file whose
        status (size, mtime, ctime, inode) matches `file_hashes`' record is not read again. One file:
        its hash; several (B-scan + SLO): the hash of their hashes."""
        if self._fp is None:
            paths = [self._paths(i) for i in range(len(self))]
            it = iter(self.file_hashes.hashes([p for ps in paths for p in ps]))
            hashes = [[next(it) for _ in ps] for ps in paths]
            self._fp = [h[0] if len(h) == 1 else fingerprint_bytes("\n".join(h).encode()) for h in hashes]
        return self._fp

    def describe(self) -> dict[str, Any]:
        return {"root": str(self.index.root), "n": len(self), "preprocess": asdict(self.spec),
                **({"unlabelled_root": str(self.extra_root), "n_unlabelled": len(self) - self.n_labelled}
                   if self.extra_root is not None else {}),
                "modalities": self.modalities, "views": self.views}

    # -- loading -------------------------------------------------------------------------------------
    def _image(self, path: Path) -> np.ndarray:
        return preprocess(read_image(path), self.spec)  # 1 x H x W float32

    def _label(self, s: Sample) -> np.ndarray | int | None:
        if s.mask is not None:
            return resize_mask(self._class_mask(s).astype(np.int64), self.spec.size)
        return s.label

    def _class_mask(self, s: Sample) -> np.ndarray:
        raw = read_image(s.mask)
        # values missing from INFO.json fail naming the mask, rather than becoming "ignore" (-1)
        return self.index.info.class_map(raw, s.mask) if self.index.info is not None else raw

    def native_label(self, i: int) -> np.ndarray | int | None:
        """Sample i's label as the file has it: a mask at its own size (H0 x W0, int16), not resized
        to the model's input - what test scores are computed against (§13) - or the class index."""
        s = self.samples[i]
        if not self.labels or i >= self.n_labelled:
            return None
        return self._class_mask(s).astype(np.int16) if s.mask is not None else s.label

    def load(self, i: int, view: int = 0) -> dict[str, Any]:
        """Item i in augmentation view `view` (no cache lookup)."""
        s = self.samples[i]
        item: dict[str, Any] = {"bscan": torch.from_numpy(self._image(s.image))}
        for m in self.modalities[1:]:
            item[m] = torch.from_numpy(self._image(s.modality(m)))  # type: ignore[arg-type]
        label = None
        if self.labels:
            if i < self.n_labelled:
                label = self._label(s)
            else:  # an added unlabelled image: "no label" in the shape the task expects
                label = np.full(self.spec.size, -1, np.int64) if self.task == "segmentation" else -1
        mask_t = torch.from_numpy(np.asarray(label)) if isinstance(label, np.ndarray) else None
        if view and self.augment is not None:
            from mirage_edge.data.transforms import Augment

            # seeded by split/id, not the folder: a moved dataset keeps its augmentations
            gen = torch.Generator().manual_seed(_seed(self.aug_seed, f"{s.split}/{s.id}", view))
            aug = Augment(self.augment, generator=gen)
            if mask_t is not None:
                item["bscan"], mask_t = aug(item["bscan"], mask_t)
            else:
                item["bscan"] = aug(item["bscan"])
        if mask_t is not None:
            item["label"] = mask_t.long()
        elif label is not None:
            item["label"] = torch.tensor(int(label), dtype=torch.long)
        item["index"] = i
        item["view"] = view
        return item

    def __getitem__(self, i: int) -> dict[str, Any]:
        # the trainer seeds torch's RNG per (epoch, sample), so this draw is reproducible on resume
        view = int(torch.randint(self.views, ())) if self.views > 1 else 0
        item = self.load(i, view)
        if self.cache is not None:
            for name, arr in self.cache.read(self.sample_id(i), view).items():
                item[f"t_{name}"] = torch.from_numpy(arr)
        return item


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors; ints become an int64 tensor."""
    out: dict[str, Any] = {}
    for k in items[0]:
        vals = [it[k] for it in items]
        out[k] = torch.stack(vals) if isinstance(vals[0], torch.Tensor) else torch.tensor(vals)
    return out


__all__ = ["DistillSamples", "open_index", "collate", "TASKS"]
