"""Torch datasets over RetinaBench folders (see `mirage_edge.data.layout` for the layouts).

Every item is a dict:

* ``"image"``  float32 tensor 1 x H x W in [0, 1] (`PreprocessSpec`, the artifact's preprocessing)
* ``"mask"``   int64 H x W class indices (segmentation; pixel values mapped through INFO.json and
               resized with nearest neighbour to spec.size)
* ``"label"``  int (classification)
* ``"id"``     the sample id (file stem), ``"volume"`` its volume / scan id, ``"index"`` its position

`MultimodalFolder` items carry one entry per modality instead of "image": ``"bscan"``,
``"slo"`` (1 x H x W float) and ``"bscanlayermap"`` (int64 map at `layermap_size`, MIRAGE: 128).
Training augmentations are optional (`augment=True` or an `Augment`); evaluation is deterministic.
Datasets validate their split up front (`check=True`); bad files raise unless `skip_bad=True`,
which excludes and lists them in `dataset.excluded`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from mirage_edge.data.check import load_dataset
from mirage_edge.data.io import is_image_file, read_image
from mirage_edge.data.layout import EVAL_SPLIT, DatasetIndex, Sample, volume_id
from mirage_edge.data.preprocess import PreprocessSpec, preprocess, resize_mask
from mirage_edge.data.transforms import Augment
from mirage_edge.errors import DataError


def _resolve_split(index: DatasetIndex, split: str | None) -> list[Sample]:
    if split is None:
        return index.samples()
    if split not in index.splits and set(index.splits) == {EVAL_SPLIT}:
        raise DataError(f"{index.root} is an evaluation-only set without split folders; use split=None or "
                        f"'{EVAL_SPLIT}', not {split!r}")
    return index.samples(split)


def _augmenter(augment: bool | Augment | None) -> Augment | None:
    if augment is True:
        return Augment()
    return augment or None


class _FolderBase(Dataset):
    task = "auto"

    def __init__(self, root: str | Path | DatasetIndex, split: str | None = "train",
                 spec: PreprocessSpec | None = None, augment: bool | Augment | None = None,
                 skip_bad: bool = False, check: bool = True) -> None:
        if isinstance(root, DatasetIndex):
            self.index = root
        else:
            splits = None if split is None else [split]
            # Detect the layout, then insist it is ours: forcing a task would misread e.g. the
            # bscan/ and semseg/ folders of a segmentation set as two classes.
            self.index = load_dataset(root, "auto", skip_bad=skip_bad, check=check, splits=splits)
        if self.task not in ("auto", self.index.task) and not (self.task == "multimodal"
                                                                and self.index.task == "segmentation"):
            raise DataError(f"{self.index.root} looks like a {self.index.task} set, not a {self.task} set "
                            "(see mirage_edge.data.layout for the expected folders)")
        self.split = split
        self.samples = _resolve_split(self.index, split)
        self.spec = spec or PreprocessSpec()
        self.augment = _augmenter(augment)

    @property
    def excluded(self) -> list[tuple[str, str]]:
        return list(self.index.excluded)

    @property
    def volume_ids(self) -> list[str]:
        return [s.volume for s in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def _image(self, path: Path) -> torch.Tensor:
        return torch.from_numpy(preprocess(read_image(path), self.spec))

    def _meta(self, i: int) -> dict[str, Any]:
        s = self.samples[i]
        return {"id": s.id, "volume": s.volume, "index": i}


class SegmentationFolder(_FolderBase):
    """``<root>/{train,val,test}/{bscan,semseg}/*.png`` + INFO.json -> {"image", "mask", "id", "volume"}."""

    task = "segmentation"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.index.info is None:
            raise DataError(f"{self.index.root} has no INFO.json; a segmentation set needs one")
        self.info = self.index.info
        self.classes = self.info.labels

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    def read_mask(self, i: int) -> np.ndarray:
        """Ground-truth class indices at the original resolution (H0 x W0 int64), for metrics."""
        s = self.samples[i]
        if s.mask is None:
            raise DataError(f"{s.image} has no mask")
        return self.info.class_map(read_image(s.mask), s.mask)

    def __getitem__(self, i: int) -> dict[str, Any]:
        s = self.samples[i]
        image = self._image(s.image)
        mask = torch.from_numpy(np.ascontiguousarray(resize_mask(self.read_mask(i), self.spec.size)))
        if self.augment is not None:
            image, mask = self.augment(image, mask)
        return {"image": image, "mask": mask, **self._meta(i)}


class ClassificationFolder(_FolderBase):
    """``<root>/{train,val,test}/<Class>/*.png`` -> {"image", "label", "id", "volume"}.

    Class indices follow the sorted class folder names of the training split (torchvision's rule).
    """

    task = "classification"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.classes = list(self.index.classes)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def targets(self) -> list[int]:
        return [int(s.label) for s in self.samples]  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict[str, Any]:
        s = self.samples[i]
        image = self._image(s.image)
        if self.augment is not None:
            image = self.augment(image)
        return {"image": image, "label": int(s.label), **self._meta(i)}  # type: ignore[arg-type]


class MultimodalFolder(_FolderBase):
    """B-scan + paired modalities: {"bscan", "slo", "bscanlayermap", ["mask"], "id", "volume"}.

    Layouts: ``split/{bscan,slo,bscanlayermap}/`` (+ optional ``semseg/`` and INFO.json), without
    splits, or a triplet folder (``bscan.npy``, ``slo.npy``, ``bscanlayermap.npy``). The SLO is
    preprocessed like the B-scan; the layer map keeps its integer labels (resized with nearest
    neighbour to `layermap_size`, default spec.size // 4: 128 for MIRAGE's 512). Augmentation
    applies the same flip to every modality (the affine/intensity part only to the B-scan).
    """

    task = "multimodal"

    def __init__(self, root: str | Path | DatasetIndex, split: str | None = None,
                 spec: PreprocessSpec | None = None, augment: bool | Augment | None = None,
                 skip_bad: bool = False, check: bool = True, modalities: Sequence[str] | None = None,
                 layermap_size: tuple[int, int] | None = None) -> None:
        super().__init__(root, split, spec, augment, skip_bad, check)
        avail = self.index.modalities
        self.modalities = tuple(modalities) if modalities else tuple(avail)
        missing = [m for m in self.modalities if m not in avail]
        if missing:
            raise DataError(f"{self.index.root} has no {missing} modality (available: {list(avail)})")
        self.layermap_size = tuple(layermap_size or (max(1, self.spec.size[0] // 4), max(1, self.spec.size[1] // 4)))
        self.info = self.index.info

    def __getitem__(self, i: int) -> dict[str, Any]:
        s = self.samples[i]
        flip = self.augment is not None and float(torch.rand(())) < self.augment.config.hflip
        out: dict[str, Any] = {}
        for m in self.modalities:
            path = s.image if m == "bscan" else s.modality(m)
            if m == "bscanlayermap":
                arr = read_image(path).astype(np.int64)
                t = torch.from_numpy(np.ascontiguousarray(resize_mask(arr, self.layermap_size)))
            else:
                t = self._image(path)
            out[m] = t.flip(-1) if flip else t
        if s.mask is not None and self.info is not None:
            mask = self.info.class_map(read_image(s.mask), s.mask)
            m = torch.from_numpy(np.ascontiguousarray(resize_mask(mask, self.spec.size)))
            out["mask"] = m.flip(-1) if flip else m
        if self.augment is not None and "bscan" in out:
            cfg = self.augment.config
            aug = Augment(type(cfg)(**{**cfg.__dict__, "hflip": 0.0}), self.augment.generator)
            if "mask" in out:
                out["bscan"], out["mask"] = aug(out["bscan"], out["mask"])
            else:
                out["bscan"] = aug(out["bscan"])
        return {**out, **self._meta(i)}


class UnlabelledImages(Dataset):
    """Every image under `root` (recursively; masks and paired modalities left out), or a list of
    files -> {"image", "id", "volume", "index"}. For distillation and calibration.

    Each file is checked when read; bad files raise `DataError` naming the file unless
    `skip_bad=True` and `check=True`, which validates everything up front and excludes bad files
    (listed in `excluded`).
    """

    def __init__(self, root: str | Path | Sequence[str | Path], spec: PreprocessSpec | None = None,
                 augment: bool | Augment | None = None, skip_bad: bool = False, check: bool = False) -> None:
        from mirage_edge.data.layout import scan_dataset

        if isinstance(root, (str, Path)):
            index = scan_dataset(root, "unlabelled")
            self.samples = index.samples()
        else:
            paths = [Path(p) for p in root]
            bad = [p for p in paths if not is_image_file(p)]
            if bad:
                raise DataError(f"not an image file: {bad[0]}")
            self.samples = [Sample(id=p.stem, split=EVAL_SPLIT, image=p, volume=volume_id(p.stem)) for p in paths]
        self.excluded: list[tuple[str, str]] = []
        if check or skip_bad:
            from concurrent.futures import ThreadPoolExecutor

            def probe(s: Sample) -> str | None:
                try:
                    read_image(s.image)
                    return None
                except DataError as exc:
                    return str(exc)

            with ThreadPoolExecutor(max_workers=8) as pool:
                errors = list(pool.map(probe, self.samples))
            bad_rows = [(str(s.image), e) for s, e in zip(self.samples, errors) if e]
            if bad_rows and not skip_bad:
                from mirage_edge.data.layout import problems_error

                raise problems_error(Path(root) if isinstance(root, (str, Path)) else Path("."), bad_rows)
            self.excluded = bad_rows
            self.samples = [s for s, e in zip(self.samples, errors) if not e]
            if not self.samples:
                raise DataError(f"no readable images left under {root}")
        self.spec = spec or PreprocessSpec()
        self.augment = _augmenter(augment)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        s = self.samples[i]
        image = torch.from_numpy(preprocess(read_image(s.image), self.spec))
        if self.augment is not None:
            image = self.augment(image)
        return {"image": image, "id": s.id, "volume": s.volume, "index": i}


__all__ = ["SegmentationFolder", "ClassificationFolder", "MultimodalFolder", "UnlabelledImages"]
