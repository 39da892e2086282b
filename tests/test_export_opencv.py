"""Issue #23: every exported ONNX passes the full ONNX checker and runs in ONNX Runtime, OpenVINO
and OpenCV DNN (checked in a child process), and the metadata says which runtimes verified it."""
from __future__ import annotations

import numpy as np
import pytest

from test_export_support import SIZE, target, tiny_cnn  # also skips without torch/ORT/OV

import torch  # noqa: E402

onnx = pytest.importorskip("onnx")
pytest.importorskip("cv2")

from mirage_edge.artifact import load_verified_meta  # noqa: E402
from mirage_edge.export import onnx as onnx_x  # noqa: E402
from mirage_edge.export import validate as val  # noqa: E402


class _GeluNet(torch.nn.Module):
    """Conv + LayerNorm + exact GELU MLP: the dynamo GELU decomposition that crashed OpenCV."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 16, 4, stride=4)
        self.norm = torch.nn.LayerNorm(16)
        self.fc1, self.fc2 = torch.nn.Linear(16, 32), torch.nn.Linear(32, 3)
        self.act = torch.nn.GELU()
        self.input_size = (SIZE, SIZE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.norm(self.conv(x).flatten(2).transpose(1, 2))
        return self.fc2(self.act(self.fc1(t))).mean(1)


def _dynamo_gelu(tmp_path):
    x = torch.rand(1, 8, 16)
    path = tmp_path / "gelu.onnx"
    torch.onnx.export(torch.nn.GELU().eval(), (x,), str(path), dynamo=True, opset_version=18,
                      input_names=["x"], output_names=["y"], verbose=False)
    return path, x.numpy()


def test_gelu_rewrite_is_exact_and_opencv_runs_it(tmp_path):
    import onnxruntime as ort

    path, x = _dynamo_gelu(tmp_path)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    before = ort.InferenceSession(str(path), so).run(None, {"x": x})[0]
    assert onnx_x.finalize_onnx(path) == {"gelu_canonicalized": 1}
    after = ort.InferenceSession(str(path), so).run(None, {"x": x})[0]
    np.testing.assert_array_equal(before, after)  # x * 0.5 is exact: bit-identical
    np.testing.assert_allclose(val.run_opencv(path, [{"x": x}]), before, atol=1e-6)
    assert onnx_x.finalize_onnx(path) == {}  # idempotent


def test_run_opencv_reports_a_crash_instead_of_dying(tmp_path, monkeypatch):
    path, x = _dynamo_gelu(tmp_path)
    monkeypatch.setattr(val, "_OPENCV_CHILD", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    with pytest.raises(RuntimeError, match="OpenCV DNN crashed \\(SIGSEGV\\) in readNetFromONNX"):
        val.run_opencv(path, [{"x": x}])


@pytest.mark.parametrize("batch", [{"dynamic": True}, {"dynamic": False, "min": 1, "opt": 1, "max": 1}])
def test_onnx_artifacts_are_verified_in_three_runtimes(tmp_path, batch):
    torch.manual_seed(0)
    t = target(formats=["onnx"], precisions=["fp32", "fp16", "int8"], batch=batch,
               quantization={"calib_images": 8}, validation={"n_inputs": 4})
    from mirage_edge.export import export_model

    for d in export_model(_GeluNet().eval(), tmp_path / "art", t):
        meta = load_verified_meta(d)
        onnx.checker.check_model(str(d / "model.onnx"), full_check=True)
        assert meta.parity["verified_runtimes"] == ["onnxruntime", "openvino", "opencv"], meta.parity
        assert meta.build["graph_rewrites"] == {"gelu_canonicalized": 1}
        ocv = meta.parity["runtimes"]["opencv"]
        assert ocv["verified"] and ocv["top1_agreement"] >= 0.75
        if meta.precision == "fp32":
            assert ocv["max_abs"] <= 1e-4 and ocv["cosine"] > 0.99999


def test_nncf_int8_mixed_signedness_is_stored_as_uint8(tmp_path):
    pytest.importorskip("nncf")
    from mirage_edge.export import export_model

    t = target(formats=["onnx"], precisions=["int8"], quantization={"method": "nncf", "calib_images": 8},
               validation={"n_inputs": 4})
    (d,) = export_model(tiny_cnn(), tmp_path / "nncf", t)
    meta = load_verified_meta(d)
    assert "opencv" in meta.parity["verified_runtimes"]
    graph = onnx.load(str(d / "model.onnx")).graph
    zps = {i.name: i.data_type for i in graph.initializer}
    acts = [n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in zps]
    assert acts and {zps[n.input[2]] for n in acts} == {onnx.TensorProto.UINT8}


def test_a_required_runtime_that_fails_fails_the_export(tmp_path, monkeypatch):
    from mirage_edge.errors import ValidationError
    from mirage_edge.export import export_model

    def broken(*a, **k):
        raise RuntimeError("OpenCV DNN crashed (SIGSEGV) in readNetFromONNX [model.onnx]")

    monkeypatch.setattr(val, "run_opencv", broken)
    with pytest.raises(ValidationError, match="fails in opencv"):
        export_model(tiny_cnn(), tmp_path / "a", target(formats=["onnx"], precisions=["fp32"]))
    (d,) = export_model(tiny_cnn(), tmp_path / "b", target(formats=["onnx"], precisions=["fp32"],
                                                            validation={"onnx_runtimes": ["onnxruntime"]}))
    meta = load_verified_meta(d)
    assert meta.parity["verified_runtimes"] == ["onnxruntime", "openvino"]
    assert "SIGSEGV" in meta.parity["runtimes"]["opencv"]["error"]
