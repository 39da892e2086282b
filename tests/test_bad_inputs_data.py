"""Hostile or careless data: each bad input fails with a `DataError`/`InputError` naming the file(s),
and the CLI prints it as one line. Built from a few real Duke DME B-scans copied to tmp_path."""
from __future__ import annotations

import shutil
import struct
import zlib
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from conftest import one_line_error

from mirage_edge.data.check import check_dataset, load_dataset
from mirage_edge.data.io import image_shape, read_image, write_png
from mirage_edge.data.layout import scan_dataset
from mirage_edge.errors import ConfigError, DataError, InputError

DUKE = "Duke_DME_fluid"
FLUID = "subject01_annot05"  # a B-scan with fluid in its mask
OTHER = "subject01_annot00"


def duke_copy(real_data: Path, dest: Path, names: tuple[str, ...] = (FLUID, OTHER)) -> Path:
    """A train-only RetinaBench copy of a few Duke pairs (496 x 768 uint8, mask values 0/1)."""
    src = real_data / DUKE
    for sub in ("bscan", "semseg"):
        (dest / "train" / sub).mkdir(parents=True)
        for n in names:
            shutil.copy(src / "train" / sub / f"{n}.png", dest / "train" / sub / f"{n}.png")
    shutil.copy(src / "INFO.json", dest / "INFO.json")
    return dest




# -- 1a: B-scans of mixed sizes -------------------------------------------------------------------


def test_mixed_sizes_accepted_and_each_mask_follows_its_image(real_data, tmp_path):
    root = duke_copy(real_data, tmp_path / "d", names=(FLUID,))
    # the same scan again at 400 x 600 (image area-resized, mask nearest): a second device's size
    img, mask = (read_image(root / "train" / d / f"{FLUID}.png") for d in ("bscan", "semseg"))
    small_img = cv2.resize(img, (600, 400), interpolation=cv2.INTER_AREA)
    small_mask = cv2.resize(mask, (600, 400), interpolation=cv2.INTER_NEAREST)
    write_png(root / "train" / "bscan" / "small.png", small_img)
    write_png(root / "train" / "semseg" / "small.png", small_mask)
    report = check_dataset(root)
    assert report.ok and report.image_sizes == {"496x768": 1, "400x600": 1}

    pytest.importorskip("torch")
    from mirage_edge.data import PreprocessSpec, SegmentationFolder
    from mirage_edge.distill.data import DistillSamples, open_index

    spec = PreprocessSpec(size=(64, 96))
    ds = SegmentationFolder(root, "train", spec)
    big, small = (ds[[s.id for s in ds.samples].index(n)] for n in (FLUID, "small"))
    assert big["mask"].shape == small["mask"].shape == (64, 96)
    # both masks were resized from their own size to the model size: they still cover the same fluid
    fluid_big, fluid_small = big["mask"] == 1, small["mask"] == 1
    assert fluid_big.sum() > 20
    assert (fluid_big & fluid_small).sum() / (fluid_big | fluid_small).sum() > 0.8
    assert float((big["image"] - small["image"]).abs().mean()) < 0.05
    dist = DistillSamples(open_index(root, "seg"), "train", spec)
    assert [tuple(dist.load(i)["label"].shape) for i in range(2)] == [(64, 96)] * 2


def test_image_and_its_mask_differ_in_size(real_data, tmp_path):
    root = duke_copy(real_data, tmp_path / "d")
    bad_mask = root / "train" / "semseg" / f"{OTHER}.png"
    write_png(bad_mask, np.zeros((400, 600), np.uint8))
    for call in (lambda: scan_dataset(root), lambda: load_dataset(root)):
        with pytest.raises(DataError) as err:
            call()
        msg = str(err.value)
        image = root / "train" / "bscan" / f"{OTHER}.png"
        assert f"size mismatch: mask {bad_mask} is 400x600 but image {image} is 496x768 (H x W)" in msg
    report = check_dataset(root)  # data check lists it as a problem, reading headers only
    assert [f for f, _ in report.problems] == [str(bad_mask)]
    assert str(bad_mask) in "\n".join(r for _, r in report.problems)


# -- 1b: mask values not in INFO.json ---------------------------------------------------------------


def test_mask_values_outside_info(real_data, tmp_path):
    root = duke_copy(real_data, tmp_path / "d")
    mask_path = root / "train" / "semseg" / f"{OTHER}.png"
    mask = read_image(mask_path)
    mask[:10, :10], mask[-5:, -5:] = 7, 255
    write_png(mask_path, mask)
    info = root / "INFO.json"
    expected = f"mask {mask_path} has pixel values [7, 255] that are not in {info} (allowed: [0, 1])"
    with pytest.raises(DataError) as err:
        load_dataset(root)
    assert expected in str(err.value)
    # the index reads no mask pixels; loading the mask checks them, in training and distillation
    pytest.importorskip("torch")
    from mirage_edge.data import SegmentationFolder
    from mirage_edge.distill.data import DistillSamples, open_index

    ds = SegmentationFolder(root, "train", check=False)
    with pytest.raises(DataError) as err:
        ds[[s.id for s in ds.samples].index(OTHER)]
    assert expected in str(err.value)
    dist = DistillSamples(open_index(root, "seg"), "train", ds.spec)
    with pytest.raises(DataError) as err:
        dist.load([s.id for s in dist.samples].index(OTHER))
    assert expected in str(err.value)


# -- 1c: B-scan without a mask, mask without a B-scan -----------------------------------------------


def test_unmatched_names_are_listed(real_data, tmp_path):
    root = duke_copy(real_data, tmp_path / "d")
    (root / "train" / "semseg" / f"{OTHER}.png").unlink()
    shutil.copy(root / "train" / "semseg" / f"{FLUID}.png", root / "train" / "semseg" / "orphan_03.png")
    with pytest.raises(DataError) as err:
        scan_dataset(root)
    msg = str(err.value)
    assert "2 problem(s)" in msg
    assert f"{root / 'train' / 'bscan' / OTHER}.png: B-scan without a mask" in msg
    assert f"{root / 'train' / 'semseg' / 'orphan_03.png'}: mask without a B-scan" in msg


# -- 2: a segmentation folder is not a classification folder ------------------------------------------


def test_segmentation_folder_refused_as_classes(real_data, tmp_path):
    root = duke_copy(real_data, tmp_path / "d")
    with pytest.raises(DataError) as err:
        scan_dataset(root, "classification")
    assert f"{root} is a segmentation set ({root / 'train'} has bscan/ + semseg/), not a classification set" \
        in str(err.value)
    line = one_line_error("data", "check", str(root), "--task", "classification")
    assert "is a segmentation set" in line
    pytest.importorskip("torch")
    from mirage_edge.distill.data import open_index

    with pytest.raises(DataError, match="is a segmentation set"):
        open_index(root, "cls")  # distill --task cls


# -- 3: two files with one stem ----------------------------------------------------------------------------


def test_same_stem_in_bscan_folder_is_ambiguous(real_data, tmp_path):
    root = duke_copy(real_data, tmp_path / "d")
    bscan = root / "train" / "bscan"
    cv2.imwrite(str(bscan / f"{OTHER}.tif"), read_image(bscan / f"{OTHER}.png"))
    with pytest.raises(DataError) as err:
        scan_dataset(root)
    assert f"ambiguous file names in {bscan}: {OTHER}.png + {OTHER}.tif share a file stem" in str(err.value)
    line = one_line_error("data", "check", str(root))
    assert "ambiguous file names" in line and f"{OTHER}.tif" in line


def test_predict_refuses_clashing_output_names(tmp_path):
    from mirage_edge.runtime.cli import write_predictions

    files = []
    for sub, suffix in (("a", ".png"), ("b", ".png"), ("b", ".tif")):
        (tmp_path / sub).mkdir(exist_ok=True)
        files.append(tmp_path / sub / f"x{suffix}")
        cv2.imwrite(str(files[-1]), np.zeros((8, 8), np.uint8))
    fake = SimpleNamespace(task="segmentation", classes=["bg", "fluid"], predict=None)
    out = tmp_path / "out"
    with pytest.raises(InputError) as err:
        write_predictions(fake, files, out)
    assert str(err.value) == (
        "1 output name clash(es), inputs that would overwrite each other's mask and overlay: "
        f"{files[0]} + {files[1]} + {files[2]} -> masks/x.png; rename them or predict them into separate "
        "--out folders")
    assert not out.exists()  # refused before anything was written


# -- 4: decompression bombs --------------------------------------------------------------------------------


def png_header_only(path: Path, h: int, w: int) -> Path:
    """A ~100-byte PNG whose IHDR claims h x w 8-bit grey (image data: one zero row only)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(w + 1)))
                     + chunk(b"IEND", b""))
    return path


def test_pixel_limit_reads_the_header_first(tmp_path, monkeypatch):
    monkeypatch.delenv("MIRAGE_EDGE_MAX_PIXELS", raising=False)
    bomb = png_header_only(tmp_path / "bomb.png", 20000, 20000)
    assert bomb.stat().st_size < 1000 and image_shape(bomb) == (20000, 20000)
    with pytest.raises(DataError) as err:
        read_image(bomb)  # refused by the default 100 M limit before anything is decoded
    assert str(err.value) == (
        f"image {bomb} is 20000x20000 pixels (H x W, 400.0 megapixels), above the limit of 100000000 pixels "
        "that guards against decompression bombs; if the image is genuine, raise the limit with the "
        "environment variable MIRAGE_EDGE_MAX_PIXELS=400000000 (0 disables the check)")

    small = write_png(tmp_path / "small.png", np.zeros((64, 64), np.uint8))
    monkeypatch.setenv("MIRAGE_EDGE_MAX_PIXELS", "1000")
    with pytest.raises(DataError, match=r"small\.png is 64x64 pixels .* limit of 1000 pixels"):
        read_image(small)
    monkeypatch.setenv("MIRAGE_EDGE_MAX_PIXELS", "0")  # 0 disables the check
    assert read_image(small).shape == (64, 64)
    assert read_image(small, max_pixels=5000).shape == (64, 64)
    monkeypatch.setenv("MIRAGE_EDGE_MAX_PIXELS", "lots")
    with pytest.raises(ConfigError, match="MIRAGE_EDGE_MAX_PIXELS='lots' must be a whole number"):
        read_image(small)


def test_pixel_limit_in_predict_and_data_check(real_data, tmp_path, monkeypatch):
    from mirage_edge.runtime import predictor
    from mirage_edge.runtime.cli import write_predictions
    from mirage_edge.data import io

    assert predictor.read_image is io.read_image  # Predictor.predict(paths) reads through the limit too
    root = duke_copy(real_data, tmp_path / "d", names=(FLUID,))
    monkeypatch.setenv("MIRAGE_EDGE_MAX_PIXELS", "1000")
    image = root / "train" / "bscan" / f"{FLUID}.png"
    fake = SimpleNamespace(task="classification", classes=["a"], predict=None)
    with pytest.raises(DataError, match=f"{FLUID}.png is 496x768 pixels"):
        write_predictions(fake, [image], tmp_path / "out")
    line = one_line_error("data", "check", str(root))
    assert "problem(s) found" in line
    report = check_dataset(root)
    assert any("MIRAGE_EDGE_MAX_PIXELS" in r for _, r in report.problems)


def test_content_not_matching_a_known_format_is_refused(tmp_path):
    p = tmp_path / "scan.png"  # WebP bytes behind a .png name: OpenCV would decode it unchecked
    ok, buf = cv2.imencode(".webp", np.zeros((8, 8), np.uint8))
    p.write_bytes(buf.tobytes())
    with pytest.raises(DataError, match=r"scan\.png: the content is not a PNG, TIFF, JPEG, BMP or \.npy"):
        read_image(p)

