"""mirage-tiny exports to ONNX (opset 18) and matches torch in ONNX Runtime within 1e-4."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from mirage_edge import create_model
from mirage_edge.models.task import segmentation_model

ort = pytest.importorskip("onnxruntime")


def _export_and_run(model, x, path, dynamo: bool) -> tuple[np.ndarray, np.ndarray]:
    kwargs = (dict(dynamic_shapes=({0: torch.export.Dim("batch")},)) if dynamo
              else dict(dynamic_axes={"image": {0: "batch"}, "out": {0: "batch"}}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), input_names=["image"], output_names=["out"],
                          opset_version=18, dynamo=dynamo, **kwargs)
    import onnx

    graph = onnx.load(str(path)).graph
    if model.__class__.__name__ == "MIRAGE":  # tables are constants: no resize in the encoder graph
        assert not any(n.op_type == "Resize" for n in graph.node)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model(x).numpy()
    return sess.run(None, {"image": x.numpy()})[0], expected


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_tiny_encoder_onnx(tmp_path, dynamo):
    torch.manual_seed(0)
    enc = create_model("mirage-tiny", in_domains=["bscan"], out_domains=[]).eval()
    x = torch.rand(2, 1, 512, 512)
    got, expected = _export_and_run(enc, x, tmp_path / "enc.onnx", dynamo)
    assert got.shape == (2, 257, 192)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_tiny_segmentation_model_onnx(tmp_path):
    torch.manual_seed(0)
    enc = create_model("mirage-tiny", input_size=128, in_domains=["bscan"], out_domains=[])
    seg = segmentation_model(enc, 4, preds_per_patch=16, class_dim=32, depth=2).eval()
    x = torch.rand(1, 1, 128, 128)
    got, expected = _export_and_run(seg, x, tmp_path / "seg.onnx", dynamo=False)
    assert got.shape == (1, 4, 128, 128)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
