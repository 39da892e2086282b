"""The runtime's OpenVINO backend compiles one model per input shape (batch reshaped, requests
reused, a bounded cache) and returns what the dynamic-batch model returned (#19 item 4)."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("openvino", reason="openvino is not installed")

from mirage_edge.errors import MirageEdgeError  # noqa: E402
from mirage_edge.runtime.backends import OpenVinoBackend  # noqa: E402
from mirage_edge.runtime.predictor import Predictor  # noqa: E402
from test_bench_toys import SIZE, make_onnx_artifact  # noqa: E402


def _dynamic_reference(path, x: np.ndarray) -> np.ndarray:
    """The backend before the change: the exported dynamic-batch model run as is."""
    import openvino as ov

    compiled = ov.Core().compile_model(ov.Core().read_model(str(path)), "CPU", {"INFERENCE_NUM_THREADS": "1"})
    return np.array(compiled.create_infer_request().infer({0: x})[compiled.outputs[0]], copy=True)


def test_outputs_match_the_dynamic_model_at_two_batch_sizes(tmp_path):
    art = make_onnx_artifact(tmp_path / "onnx-fp32")
    pred = Predictor.load(art, backend="openvino", threads=1)
    rng = np.random.default_rng(0)
    for batch in (1, 3, 1):
        x = rng.random((batch, 1, SIZE, SIZE), dtype=np.float32)
        got = pred.run(x)["logits"]
        assert got.shape == (batch, 2, SIZE, SIZE)
        np.testing.assert_allclose(got, _dynamic_reference(art / "model.onnx", x), atol=1e-6, rtol=0)
    assert sorted(pred.engine.cached_shapes()) == [((1, 1, SIZE, SIZE),), ((3, 1, SIZE, SIZE),)]


def test_the_shape_cache_is_bounded_and_returned_arrays_are_not_reused(tmp_path):
    art = make_onnx_artifact(tmp_path / "onnx-fp32")
    engine = OpenVinoBackend(art / "model.onnx", threads=1, max_shapes=2)
    assert engine.cached_shapes() == [((1, 1, SIZE, SIZE),)]  # batch 1 compiled at load
    outs = {}
    for batch in (2, 3, 4, 3):
        x = np.full((batch, 1, SIZE, SIZE), 0.75, np.float32)
        outs[batch] = engine.run({"image": x})["logits"]
        assert len(engine.cached_shapes()) <= 2
    assert engine.cached_shapes() == [((4, 1, SIZE, SIZE),), ((3, 1, SIZE, SIZE),)]  # least recently used first
    first = engine.run({"image": np.zeros((4, 1, SIZE, SIZE), np.float32)})["logits"]
    assert not np.shares_memory(first, outs[4]) and not np.array_equal(first, outs[4])  # outputs are copies


def test_an_input_that_does_not_fit_the_model_is_a_clean_error(tmp_path):
    art = make_onnx_artifact(tmp_path / "onnx-fp32")
    engine = OpenVinoBackend(art / "model.onnx", threads=1)
    with pytest.raises(MirageEdgeError, match=r"model\.onnx: input image of shape \[1, 1, 16, 16\] does not fit"):
        engine.run({"image": np.zeros((1, 1, 16, 16), np.float32)})
    with pytest.raises(MirageEdgeError, match="max_shapes must be >= 1"):
        OpenVinoBackend(art / "model.onnx", max_shapes=0)
