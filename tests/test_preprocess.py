"""Preprocessing: spec round trips, numpy semantics vs OpenCV, numpy == torch, torch-free import."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from conftest import run_without_torch
from mirage_edge.data.preprocess import PreprocessSpec, preprocess, resize, resize_mask
from mirage_edge.errors import ConfigError, InputError


def test_spec_json_round_trip():
    spec = PreprocessSpec(size=(256, 192), scaling="divide", minmax_order="after_resize",
                          interpolation="linear", max_value=4095.0)
    text = spec.to_json()
    assert json.loads(text)["size"] == [256, 192]
    again = PreprocessSpec.from_json(text)
    assert again == spec and isinstance(again.size, tuple)
    assert PreprocessSpec.from_dict(PreprocessSpec().to_dict()) == PreprocessSpec()


def test_spec_rejects_bad_values():
    with pytest.raises(ConfigError, match="scalling"):
        PreprocessSpec.from_dict({"scalling": "minmax"})
    with pytest.raises(ConfigError, match="scaling"):
        PreprocessSpec.from_dict({"scaling": "zscore"})
    with pytest.raises(ConfigError):
        PreprocessSpec.from_dict({"size": [0, 10]})
    with pytest.raises(ConfigError, match="invalid JSON"):
        PreprocessSpec.from_json("{nope")


def test_spec_load_from_file(tmp_path):
    p = tmp_path / "metadata.json"
    p.write_text(json.dumps({"preprocessing": {"size": [64, 64], "scaling": "divide"}}))
    assert PreprocessSpec.load(p) == PreprocessSpec(size=(64, 64), scaling="divide")


@pytest.mark.parametrize("shape,size", [((496, 768), (256, 256)), ((77, 91), (64, 64)), ((512, 512), (128, 128))])
@pytest.mark.parametrize("method,flag", [("linear", cv2.INTER_LINEAR), ("area", cv2.INTER_AREA),
                                         ("nearest", cv2.INTER_NEAREST_EXACT)])
def test_resize_matches_opencv(shape, size, method, flag):
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    ref = cv2.resize(x, size[::-1], interpolation=flag)
    assert np.abs(resize(x, size, method) - ref).max() < 1e-5


def test_resize_upscale_linear_matches_opencv():
    x = np.random.default_rng(1).random((40, 50), dtype=np.float32)
    ref = cv2.resize(x, (120, 90), interpolation=cv2.INTER_LINEAR)
    assert np.abs(resize(x, (90, 120), "linear") - ref).max() < 1e-4
    assert np.allclose(resize(x, (90, 120), "area"), resize(x, (90, 120), "linear"))


def test_preprocess_scaling_rules():
    img8 = np.array([[10, 20], [30, 110]], dtype=np.uint8)
    out = preprocess(img8, PreprocessSpec(size=(2, 2), scaling="minmax"))
    assert out.shape == (1, 2, 2) and out.dtype == np.float32
    np.testing.assert_allclose(out[0], [[0, 0.1], [0.2, 1.0]], atol=1e-7)
    out = preprocess(img8, PreprocessSpec(size=(2, 2), scaling="divide"))
    np.testing.assert_allclose(out[0], img8 / 255.0, atol=1e-7)
    img16 = img8.astype(np.uint16) * 300
    out = preprocess(img16, PreprocessSpec(size=(2, 2), scaling="divide"))
    np.testing.assert_allclose(out[0], img16 / 65535.0, atol=1e-7)
    out = preprocess(img16, PreprocessSpec(size=(2, 2), scaling="divide", max_value=33000))
    np.testing.assert_allclose(out[0], img16 / 33000.0, atol=1e-7)
    # constant image -> zeros, not NaN
    assert np.all(preprocess(np.full((5, 5), 7, np.uint8), PreprocessSpec(size=(3, 3)))[0] == 0)


def test_minmax_order_matters_and_after_spans_0_1():
    img = np.random.default_rng(0).integers(0, 256, (97, 131), dtype=np.uint8)
    before = preprocess(img, PreprocessSpec(size=(32, 32), minmax_order="before_resize"))
    after = preprocess(img, PreprocessSpec(size=(32, 32), minmax_order="after_resize"))
    assert after.min() == 0.0 and after.max() == 1.0
    assert before.max() < 1.0  # averaging shrinks the range when min-max happens first
    assert not np.allclose(before, after)


def test_preprocess_batch_shapes_and_errors():
    batch = np.random.default_rng(0).integers(0, 256, (3, 40, 60), dtype=np.uint8)
    spec = PreprocessSpec(size=(32, 48))
    out = preprocess(batch, spec)
    assert out.shape == (3, 1, 32, 48)
    np.testing.assert_array_equal(out[1], preprocess(batch[1], spec))
    assert preprocess(batch[:, None], spec).shape == (3, 1, 32, 48)
    with pytest.raises(InputError):
        preprocess(np.zeros((2, 3, 4, 5), np.uint8), spec)
    with pytest.raises(InputError):
        preprocess(np.zeros((4, 4), np.int64), PreprocessSpec(size=(4, 4), scaling="divide"))
    with pytest.raises(InputError, match="NaN"):
        preprocess(np.full((4, 4), np.nan, np.float32), spec)


def test_resize_mask_keeps_labels():
    m = np.random.default_rng(0).integers(0, 5, (50, 70)).astype(np.uint8)
    r = resize_mask(m, (20, 33))
    assert r.shape == (20, 33) and set(np.unique(r)) <= set(np.unique(m))
    np.testing.assert_array_equal(r, cv2.resize(m, (33, 20), interpolation=cv2.INTER_NEAREST_EXACT))


@pytest.mark.parametrize("dtype,hi", [(np.uint8, 255), (np.uint16, 65535), (np.uint16, 4095)])
@pytest.mark.parametrize("spec", [
    PreprocessSpec(size=(64, 64)),
    PreprocessSpec(size=(64, 48), minmax_order="after_resize", interpolation="linear"),
    PreprocessSpec(size=(128, 160), scaling="divide", interpolation="area"),
    PreprocessSpec(size=(50, 70), scaling="divide", interpolation="nearest"),
])
def test_numpy_equals_torch_transform(dtype, hi, spec):
    torch = pytest.importorskip("torch")
    from mirage_edge.data.transforms import TorchPreprocess

    rng = np.random.default_rng(hi)
    img = rng.integers(0, hi + 1, (3, 93, 141)).astype(dtype)
    ref = preprocess(img, spec)
    tp = TorchPreprocess(spec)
    got = tp(img).numpy()  # numpy input keeps the dtype max
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() < 1e-6
    # torch tensors: uint8 natively; uint16 as float with max_value
    t = torch.from_numpy(img.astype(np.float32))[:, None]  # N x 1 x H x W
    got_t = tp(t, max_value=255.0 if dtype == np.uint8 else 65535.0).numpy()
    assert np.abs(got_t - ref).max() < 1e-6
    one = tp(torch.from_numpy(img[0].astype(np.float32)), max_value=255.0 if dtype == np.uint8 else 65535.0)
    assert one.shape == ref[0].shape and np.abs(one.numpy() - ref[0]).max() < 1e-6


def test_preprocess_is_torch_free():
    proc = run_without_torch(
        """
        import sys, numpy as np
        import mirage_edge.data
        import mirage_edge.data.layout, mirage_edge.data.check, mirage_edge.data.synth, mirage_edge.data.cli
        from mirage_edge.data import preprocess, PreprocessSpec, read_image, check_dataset
        out = preprocess(np.zeros((10, 12), np.uint16), PreprocessSpec(size=(8, 8)))
        assert out.shape == (1, 8, 8)
        assert "torch" not in sys.modules
        """
    )
    assert proc.returncode == 0, proc.stderr


def test_mirage_presets():
    assert PreprocessSpec.for_segmentation(256) == PreprocessSpec(size=(256, 256), minmax_order="before_resize")
    assert PreprocessSpec.for_classification().minmax_order == "after_resize"
    assert PreprocessSpec.for_classification().size == (512, 512)
    assert PreprocessSpec.for_pretraining((64, 32)).scaling == "divide"
