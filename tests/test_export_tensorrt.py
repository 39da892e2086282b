"""TensorRT engines (fp16, int8 from Q/DQ) - need the tensorrt package and a CUDA GPU; skipped otherwise."""
from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.tensorrt


def _need_trt_gpu() -> None:
    from mirage_edge._deps import has

    if not has("tensorrt"):
        pytest.skip("tensorrt is not installed (pip install 'mirage-edge[tensorrt]'; JetPack ships it on Jetson)")
    try:
        from mirage_edge.runtime.backends import gpu_name

        gpu_name(0)
    except Exception as exc:  # noqa: BLE001 - no driver / no device / no cuda-python
        pytest.skip(f"no usable CUDA GPU for TensorRT: {exc}")


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_tensorrt_engine_export_and_runtime(tmp_path, precision):
    _need_trt_gpu()
    from test_export_support import SIZE, target, tiny_cnn

    from mirage_edge.artifact import load_verified_meta
    from mirage_edge.export import export_model
    from mirage_edge.export.data import synthetic_oct
    from mirage_edge.runtime import Predictor

    t = target(formats=["tensorrt"], precisions=[precision],
               quantization={"calib_images": 16, "activation_type": "QInt8", "symmetric_activations": True},
               batch={"dynamic": True, "min": 1, "opt": 2, "max": 4})
    (d,) = export_model(tiny_cnn(), tmp_path, t)
    meta = load_verified_meta(d)
    assert meta.files == ["model.engine"]
    assert meta.build["tensorrt_version"] and meta.build["gpu"]
    assert meta.build["profile_batch"] == [1, 2, 4]
    if precision == "int8":
        assert meta.quantization.symmetric_activations and meta.quantization.activation_type == "QInt8"
    p = Predictor.load(d)
    assert p.backend == "tensorrt"
    imgs = synthetic_oct(6, (SIZE, SIZE), seed=3)  # 6 > max batch 4: the runtime splits
    probs = p.predict(imgs)
    assert probs.shape == (6, 3) and np.allclose(probs.sum(1), 1, atol=1e-3)
    ref = Predictor.load(export_model(tiny_cnn(), tmp_path / "ref", target(formats=["onnx"], precisions=["fp32"]))[0])
    assert (probs.argmax(1) == ref.predict(imgs).argmax(1)).mean() >= 0.8
