"""RetinaBench layouts and validation: real data counts, every bad-file error names the file."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from mirage_edge.data.check import check_dataset, load_dataset
from mirage_edge.data.io import write_png
from mirage_edge.data.layout import cross_dataset, read_info, scan_dataset, volume_id
from mirage_edge.errors import DataError

INFO = {"0": {"value": 0, "label": "Background"}, "1": {"value": 50, "label": "RNFL"},
        "2": {"value": 100, "label": "Fluid"}}


def make_seg(root, splits=("train", "val", "test"), n=3, size=(20, 24), info=INFO):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    (root / "INFO.json").write_text(json.dumps(info))
    values = [c["value"] for c in info.values()]
    for sp in splits:
        for i in range(n):
            write_png(root / sp / "bscan" / f"scan{sp}_{i:02d}.png", rng.integers(0, 256, size).astype(np.uint8))
            write_png(root / sp / "semseg" / f"scan{sp}_{i:02d}.png", rng.choice(values, size).astype(np.uint8))
    return root


def make_cls(root, classes=("CNV", "NORMAL"), splits=("train", "val", "test"), n=2):
    rng = np.random.default_rng(0)
    for sp in splits:
        for c in classes:
            for i in range(n):
                write_png(root / sp / c / f"{c.lower()}p{i}_{i}.png", rng.integers(0, 256, (16, 16)).astype(np.uint8))
    return root


def test_duke_counts(real_data):
    report = check_dataset(real_data / "Duke_DME_fluid")
    assert report.ok and report.index.task == "segmentation"
    counts = report.index.counts()
    assert {k: v["images"] for k, v in counts.items()} == {"train": 66, "val": 22, "test": 22}
    assert {k: v["volumes"] for k, v in counts.items()} == {"train": 6, "val": 2, "test": 2}
    assert report.image_sizes == {"496x768": 110}
    assert report.index.info.labels == ["Background", "Fluid"]
    fr = report.pixel_fractions()
    assert 0.002 < fr["Fluid"] < 0.011
    assert report.index.info.indices("lesion") == [1] and report.index.info.ignore == (0,)


def test_example_triplet_is_one_volume_multimodal(example_data):
    idx = scan_dataset(example_data)
    assert idx.task == "multimodal" and idx.modalities == ("bscan", "slo", "bscanlayermap")
    (s,) = idx.samples()
    assert s.volume == "mirage_example" and s.modality("slo").name == "slo.npy"
    assert check_dataset(example_data).ok


def test_volume_ids():
    assert volume_id("subject01_annot03") == "subject01"
    assert volume_id("a_b_007") == "a_b"
    assert volume_id("single") == "single"


def test_seg_layouts_eval_only_and_info_kinds(tmp_path):
    idx = scan_dataset(make_seg(tmp_path / "s"))
    assert list(idx.splits) == ["train", "val", "test"]
    ev = tmp_path / "ev"
    make_seg(tmp_path / "tmp2", splits=("x",))
    shutil.move(str(tmp_path / "tmp2" / "x"), str(ev))
    shutil.copy(tmp_path / "tmp2" / "INFO.json", ev / "INFO.json")
    idx = scan_dataset(ev)
    assert list(idx.splits) == ["all"] and len(idx.samples()) == 3
    info = read_info(ev / "INFO.json")
    assert info.indices("layer") == [1] and info.indices("lesion") == [2]
    assert info.lut()[50] == 1 and info.lut()[51] == -1


def test_classification_and_cross_dataset(tmp_path):
    idx = scan_dataset(make_cls(tmp_path / "c"))
    assert idx.task == "classification" and idx.classes == ["CNV", "NORMAL"]
    assert idx.counts()["val"] == {"images": 4, "volumes": 4, "CNV": 2, "NORMAL": 2}
    tr = make_cls(tmp_path / "tr", splits=("train", "val"))
    te = make_cls(tmp_path / "te", classes=("NORMAL",), splits=("test",))
    pair = cross_dataset(tr, te)
    assert list(pair.splits) == ["train", "val", "test"]
    assert {s.label for s in pair.samples("test")} == {1}  # NORMAL keeps the training index
    bad = make_cls(tmp_path / "te2", classes=("DME",), splits=("test",))
    with pytest.raises(DataError, match="DME"):
        cross_dataset(tr, bad)


def test_one_file_name_in_two_class_folders_is_two_samples(tmp_path):
    """The teacher cache keys rows by sample id: a shared file name must not make two images one row."""
    from mirage_edge.data.preprocess import PreprocessSpec
    from mirage_edge.distill.data import DistillSamples

    root = tmp_path / "c"
    rng = np.random.default_rng(1)
    for sp in ("train", "val"):
        for c in ("CNV", "NORMAL"):
            write_png(root / sp / c / "img_001.png", rng.integers(0, 256, (16, 16)).astype(np.uint8))
    idx = scan_dataset(root)
    assert [s.id for s in idx.samples("train")] == ["CNV/img_001", "NORMAL/img_001"]
    ds = DistillSamples(idx, "train", PreprocessSpec(size=(16, 16)), ("bscan",))
    assert ds.sample_id(0) != ds.sample_id(1) and ds.fingerprint(0) != ds.fingerprint(1)


def _expect(root, fragment, **kw):
    with pytest.raises(DataError) as err:
        load_dataset(root, **kw)
    assert fragment in str(err.value), str(err.value)
    return str(err.value)


def test_unreadable_and_truncated_image(tmp_path):
    root = make_seg(tmp_path / "d")
    bad = root / "train" / "bscan" / "scantrain_01.png"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    msg = _expect(root, "scantrain_01.png")
    assert "truncated" in msg
    (root / "val" / "bscan" / "scanval_00.png").write_bytes(b"garbage")
    msg = _expect(root, "scanval_00.png")
    assert "2 problem(s)" in msg


def test_mask_values_not_in_info(tmp_path):
    root = make_seg(tmp_path / "d")
    write_png(root / "test" / "semseg" / "scantest_02.png", np.full((20, 24), 77, np.uint8))
    msg = _expect(root, "scantest_02.png")
    assert "77" in msg and "INFO.json" in msg


def test_size_mismatch(tmp_path):
    root = make_seg(tmp_path / "d")
    write_png(root / "val" / "semseg" / "scanval_01.png", np.zeros((10, 24), np.uint8))
    msg = _expect(root, "scanval_01.png")
    assert "size mismatch" in msg and "10x24" in msg and "20x24" in msg


def test_bscan_without_mask_and_orphan_mask(tmp_path):
    root = make_seg(tmp_path / "d")
    (root / "train" / "semseg" / "scantrain_02.png").unlink()
    msg = _expect(root, "scantrain_02.png")
    assert "without a mask" in msg
    root2 = make_seg(tmp_path / "e")
    write_png(root2 / "val" / "semseg" / "extra_00.png", np.zeros((20, 24), np.uint8))
    assert "without a B-scan" in _expect(root2, "extra_00.png")


def test_empty_split_and_empty_class(tmp_path):
    root = make_seg(tmp_path / "d")
    for p in (root / "val" / "bscan").iterdir():
        p.unlink()
    for p in (root / "val" / "semseg").iterdir():
        p.unlink()
    _expect(root, str(root / "val" / "bscan"))
    croot = make_cls(tmp_path / "c")
    (croot / "test" / "EMPTY").mkdir()
    assert "empty class" in _expect(croot, str(croot / "test" / "EMPTY"))


@pytest.mark.parametrize("content,fragment", [
    ("{not json", "not valid JSON"),
    ("[]", "non-empty object"),
    (json.dumps({"0": {"value": 0}}), "must be"),
    (json.dumps({"0": {"value": 0, "label": "a"}, "2": {"value": 1, "label": "b"}}), "indices must be 0..1"),
    (json.dumps({"0": {"value": 0, "label": "a"}, "1": {"value": 0, "label": "b"}}), "share a pixel value"),
    (json.dumps({"x": {"value": 0, "label": "a"}}), "not an integer"),
])
def test_malformed_info(tmp_path, content, fragment):
    root = make_seg(tmp_path / "d")
    (root / "INFO.json").write_text(content)
    msg = _expect(root, fragment)
    assert str(root / "INFO.json") in msg


def test_missing_info(tmp_path):
    root = make_seg(tmp_path / "d")
    (root / "INFO.json").unlink()
    _expect(root, "INFO.json not found")


def test_skip_bad_excludes_and_reports(tmp_path):
    root = make_seg(tmp_path / "d")
    (root / "train" / "bscan" / "scantrain_00.png").write_bytes(b"xx")
    (root / "train" / "semseg" / "scantrain_01.png").unlink()
    idx = load_dataset(root, skip_bad=True)
    assert [s.id for s in idx.samples("train")] == ["scantrain_02"]
    files = " ".join(f for f, _ in idx.excluded)
    assert "scantrain_00.png" in files and "scantrain_01.png" in files
    report = check_dataset(root, skip_bad=True)
    assert not report.problems and len(report.index.excluded) == 2 and not report.ok


def test_sixteen_bit_and_three_channel_grey(tmp_path):
    import cv2

    root = make_seg(tmp_path / "d", splits=("train",))
    g = np.random.default_rng(0).integers(0, 65536, (20, 24)).astype(np.uint16)
    write_png(root / "train" / "bscan" / "scantrain_00.png", g)
    g8 = np.random.default_rng(1).integers(0, 256, (20, 24)).astype(np.uint8)
    cv2.imwrite(str(root / "train" / "bscan" / "scantrain_01.png"), np.dstack([g8] * 3))
    report = check_dataset(root)
    assert report.ok and report.dtypes == {"uint16": 1, "uint8": 2}
