"""Torch datasets: tensors, dtypes, value mapping, volumes, augmentation, real data."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from mirage_edge.data import (ClassificationFolder, MultimodalFolder, PreprocessSpec,  # noqa: E402
                              SegmentationFolder, UnlabelledImages, preprocess, read_image)
from mirage_edge.data.transforms import Augment  # noqa: E402
from mirage_edge.errors import DataError  # noqa: E402
from test_data_layout import make_cls, make_seg  # noqa: E402

SPEC = PreprocessSpec(size=(32, 48))


def test_segmentation_folder_maps_values(tmp_path):
    root = make_seg(tmp_path / "d")
    ds = SegmentationFolder(root, "train", SPEC)
    assert len(ds) == 3 and ds.num_classes == 3 and ds.classes == ["Background", "RNFL", "Fluid"]
    item = ds[1]
    assert item["image"].shape == (1, 32, 48) and item["image"].dtype == torch.float32
    assert 0 <= item["image"].min() and item["image"].max() <= 1
    assert item["mask"].shape == (32, 48) and item["mask"].dtype == torch.int64
    assert set(item["mask"].unique().tolist()) <= {0, 1, 2}
    assert item["id"] == "scantrain_01" and item["volume"] == "scantrain"
    raw = read_image(root / "train" / "semseg" / "scantrain_01.png")
    np.testing.assert_array_equal(ds.read_mask(1), raw // 50)
    np.testing.assert_array_equal(item["image"].numpy(),
                                  preprocess(read_image(root / "train" / "bscan" / "scantrain_01.png"), SPEC))
    loader = torch.utils.data.DataLoader(ds, batch_size=2)
    batch = next(iter(loader))
    assert batch["image"].shape == (2, 1, 32, 48) and batch["mask"].shape == (2, 32, 48)


def test_split_errors_and_skip_bad(tmp_path):
    root = make_seg(tmp_path / "d")
    with pytest.raises(DataError, match="no split 'dev'"):
        SegmentationFolder(root, "dev", SPEC)
    (root / "val" / "bscan" / "scanval_00.png").write_bytes(b"bad")
    with pytest.raises(DataError, match="scanval_00.png"):
        SegmentationFolder(root, "val", SPEC)
    SegmentationFolder(root, "train", SPEC)  # only the requested split is checked
    ds = SegmentationFolder(root, "val", SPEC, skip_bad=True)
    assert len(ds) == 2 and "scanval_00.png" in ds.excluded[0][0]


def test_augment_is_optional_and_consistent(tmp_path):
    root = make_seg(tmp_path / "d")
    ev = SegmentationFolder(root, "train", SPEC)
    assert torch.equal(ev[0]["image"], ev[0]["image"])  # eval: deterministic
    g = torch.Generator().manual_seed(0)
    tr = SegmentationFolder(root, "train", SPEC, augment=Augment(generator=g))
    outs = [tr[0] for _ in range(4)]
    assert any(not torch.equal(o["image"], ev[0]["image"]) for o in outs)
    for o in outs:
        assert o["mask"].dtype == torch.int64 and set(o["mask"].unique().tolist()) <= {0, 1, 2}
        assert 0 <= o["image"].min() and o["image"].max() <= 1
    # a pure flip keeps image and mask aligned
    from mirage_edge.data.transforms import AugmentConfig
    flip = Augment(AugmentConfig(hflip=1.0, affine=0.0, intensity=0.0))
    img, mask = flip(ev[0]["image"], ev[0]["mask"])
    assert torch.equal(img, ev[0]["image"].flip(-1)) and torch.equal(mask, ev[0]["mask"].flip(-1))


def test_classification_folder(tmp_path):
    ds = ClassificationFolder(make_cls(tmp_path / "c", classes=("CNV", "DME", "NORMAL")), "test", SPEC)
    assert ds.classes == ["CNV", "DME", "NORMAL"] and ds.targets == [0, 0, 1, 1, 2, 2]
    item = ds[3]
    assert item["label"] == 1 and item["image"].shape == (1, 32, 48)


def test_multimodal_example(example_data):
    ds = MultimodalFolder(example_data, spec=PreprocessSpec(size=(512, 512), scaling="divide"))
    item = ds[0]
    assert item["bscan"].shape == (1, 512, 512) and item["slo"].shape == (1, 512, 512)
    lm = item["bscanlayermap"]
    assert lm.shape == (128, 128) and lm.dtype == torch.int64
    raw = np.load(example_data / "bscanlayermap.npy")
    np.testing.assert_array_equal(lm.numpy(), raw[2::4, 2::4])  # MIRAGE wrapper's nearest rows 2, 6, 10 ...
    np.testing.assert_allclose(item["bscan"][0].numpy(), np.load(example_data / "bscan.npy") / 255.0, atol=1e-7)
    assert item["volume"] == "mirage_example"


def test_real_duke_and_unlabelled(real_data):
    root = real_data / "Duke_DME_fluid"
    counts = {s: len(SegmentationFolder(root, s, PreprocessSpec(size=(64, 96)), check=False)) for s in
              ("train", "val", "test")}
    assert counts == {"train": 66, "val": 22, "test": 22}
    ds = SegmentationFolder(root, "test", PreprocessSpec(size=(64, 96)))
    assert len(set(ds.volume_ids)) == 2 and ds[0]["mask"].max() <= 1
    un = UnlabelledImages(root, PreprocessSpec(size=(32, 32)))
    assert len(un) == 110 and un[0]["image"].shape == (1, 32, 32)


def test_wrong_task_is_an_error(tmp_path):
    seg = make_seg(tmp_path / "d")
    with pytest.raises(DataError, match="segmentation set, not a classification set"):
        ClassificationFolder(seg, "train", SPEC)
    with pytest.raises(DataError, match="classification set, not a segmentation set"):
        SegmentationFolder(make_cls(tmp_path / "c"), "train", SPEC)


def test_synthetic_multimodal_folder(tmp_path):
    from mirage_edge.data import synthesize

    root = synthesize(tmp_path / "mm", "multimodal", 6, seed=0, size=64)
    ds = MultimodalFolder(root, "train", PreprocessSpec(size=(64, 64)), augment=True)
    item = ds[0]
    assert set(item) >= {"bscan", "slo", "bscanlayermap", "id", "volume"}
    assert item["bscanlayermap"].shape == (16, 16) and item["bscanlayermap"].max() <= 8
