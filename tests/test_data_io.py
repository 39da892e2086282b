"""read_image / write_png: dtypes, channel handling, bad files."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from mirage_edge.data.io import read_image, write_png
from mirage_edge.errors import DataError


@pytest.mark.parametrize("dtype,hi", [(np.uint8, 255), (np.uint16, 65535)])
@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_round_trip_keeps_dtype(tmp_path, dtype, hi, suffix):
    img = np.random.default_rng(0).integers(0, hi + 1, (31, 47)).astype(dtype)
    p = tmp_path / f"x{suffix}"
    if suffix == ".png":
        write_png(p, img)
    else:
        import tifffile
        tifffile.imwrite(p, img)
    out = read_image(p)
    assert out.dtype == dtype and out.shape == (31, 47)
    np.testing.assert_array_equal(out, img)


def test_three_channel_grey_and_colour(tmp_path):
    g = np.random.default_rng(0).integers(0, 256, (20, 30), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "g3.png"), np.dstack([g, g, g]))
    np.testing.assert_array_equal(read_image(tmp_path / "g3.png"), g)
    bgr = np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "c.png"), bgr)
    out = read_image(tmp_path / "c.png")
    ref = np.rint(0.114 * bgr[..., 0] + 0.587 * bgr[..., 1] + 0.299 * bgr[..., 2]).astype(np.uint8)
    assert out.dtype == np.uint8
    assert np.abs(out.astype(int) - ref).max() == 0
    assert np.abs(out.astype(int) - cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)).max() <= 1


def test_float_tiff_and_npy(tmp_path):
    import tifffile
    x = np.random.default_rng(0).random((8, 9)).astype(np.float32)
    tifffile.imwrite(tmp_path / "f.tif", x)
    np.testing.assert_array_equal(read_image(tmp_path / "f.tif"), x)
    np.save(tmp_path / "a.npy", (x * 255).astype(np.uint8))
    assert read_image(tmp_path / "a.npy").dtype == np.uint8


def test_example_triplet(example_data):
    b = read_image(example_data / "bscan.npy")
    assert b.shape == (512, 512) and b.dtype == np.uint8


@pytest.mark.parametrize("case", ["missing", "empty", "truncated", "garbage", "stack"])
def test_bad_files_name_the_file(tmp_path, case):
    p = tmp_path / f"bad_{case}.png"
    img = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    if case == "empty":
        p.write_bytes(b"")
    elif case == "truncated":
        data = cv2.imencode(".png", img)[1].tobytes()
        p.write_bytes(data[: len(data) // 2])
    elif case == "garbage":
        p.write_bytes(b"not a png at all" * 10)
    elif case == "stack":
        p = tmp_path / "bad_stack.npy"
        np.save(p, np.zeros((3, 4, 5), np.uint8))
    with pytest.raises(DataError) as err:
        read_image(p)
    assert p.name in str(err.value)


def test_write_png_is_atomic_and_checks_dtype(tmp_path):
    p = tmp_path / "sub" / "m.png"
    write_png(p, np.ones((4, 4), np.uint8))
    assert p.is_file() and list(p.parent.iterdir()) == [p]
    with pytest.raises(DataError, match="dtype"):
        write_png(tmp_path / "f.png", np.ones((4, 4), np.float32))


def test_truncated_jpeg(tmp_path):
    img = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    data = cv2.imencode(".jpg", img)[1].tobytes()
    p = tmp_path / "cut.jpg"
    p.write_bytes(data[: len(data) - 200])
    with pytest.raises(DataError, match="cut.jpg"):
        read_image(p)
    p.write_bytes(data)
    assert read_image(p).shape == (64, 64)
