"""INT8 that is INT8: a QAT segmentation student (as `distill --qat` saves it and the demo exports it:
in-graph argmax at a mask stride) keeps its trained quantizers in every written artifact, and an
artifact labelled int8 whose written graph is not quantized fails export."""
from __future__ import annotations

import collections

import pytest

from test_export_support import target  # also skips without torch/ORT/OV

import torch  # noqa: E402

from mirage_edge.artifact import load_verified_meta  # noqa: E402
from mirage_edge.errors import ValidationError  # noqa: E402

nncf = pytest.importorskip("nncf")
SIZE = 64
# the demo's export of its QAT student: argmax in the graph at 1/4 resolution (SegmentationModel.forward_mask)
DEMO_LIKE = dict(formats=["onnx", "openvino"], precisions=["int8"], seg_argmax=True, seg_mask_stride=4,
                 # parity thresholds for a random-weight student (the subject here is the quantizers)
                 validation={"n_inputs": 4, "int8_min_dice": 0.3})


@pytest.fixture(scope="module")
def qat_student(tmp_path_factory):
    """A QAT student folder (fp32/, model.safetensors, qat.json, distill-time Q/DQ model.onnx)."""
    from mirage_edge.distill.qat import export_qdq_onnx, prepare_qat, qat_config
    from mirage_edge.distill.recipe import QATSpec
    from mirage_edge.distill.student_io import save_qat_student
    from mirage_edge.models import create_model
    from mirage_edge.models.task import segmentation_model

    torch.manual_seed(0)
    torch.set_num_threads(2)
    enc = create_model("student-tiny", input_size=SIZE)
    fp32 = segmentation_model(enc, 4, preds_per_patch=64, class_dim=16, depth=0).eval()
    calib = [torch.rand(2, 1, SIZE, SIZE) for _ in range(2)]
    qmodel, info = prepare_qat(fp32, calib, QATSpec(subset_size=4, batch_size=2))
    out = tmp_path_factory.mktemp("qat") / "student_int8"
    out.mkdir()
    counts = export_qdq_onnx(qmodel, out / "model.onnx", torch.zeros(1, 1, SIZE, SIZE))
    save_qat_student(qmodel, fp32, out, {**info, "nncf_config": qat_config(qmodel),
                                         "onnx_ops": {k: counts[k] for k in ("QuantizeLinear", "DequantizeLinear")}})
    return out


def _onnx_counts(path):
    import onnx

    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def test_qat_seg_student_keeps_its_quantizers_in_onnx_and_openvino(qat_student, tmp_path):
    import openvino as ov

    from mirage_edge.export import export_model
    from mirage_edge.export.cli import load_source_model
    from mirage_edge.models.quantized import qdq_summary

    ref_quantized, _ = qdq_summary(qat_student / "model.onnx")
    ref_q = sum(ref_quantized.values())
    ref_ql = _onnx_counts(qat_student / "model.onnx")["QuantizeLinear"]
    assert ref_q > 5 and ref_ql > 5

    model, source, classes, pre = load_source_model(str(qat_student))
    dirs = {d.name: d for d in export_model(model, tmp_path, target(**DEMO_LIKE), classes=classes,
                                            preprocess=pre, source=source)}
    assert sorted(dirs) == ["onnx-int8", "openvino-int8"]

    onnx_file = _onnx_counts(dirs["onnx-int8"] / "model.onnx")
    assert onnx_file["QuantizeLinear"] == ref_ql and onnx_file["DequantizeLinear"] == onnx_file["QuantizeLinear"]
    assert onnx_file["ArgMax"] == 1  # the demo's output contract: the mask is computed in the graph
    meta = load_verified_meta(dirs["onnx-int8"])
    q = meta.quantization
    assert q.method == "qat-nncf" and q.counted_in == "model.onnx" and q.quantizers == ref_ql
    assert q.compute_ops_quantized == ref_q and q.quantized_share >= 0.7
    assert sum(q.quantized_ops.values()) == ref_q

    ir = ov.Core().read_model(str(dirs["openvino-int8"] / "model.xml"))
    ir_ops = collections.Counter(op.get_type_name() for op in ir.get_ordered_ops())
    ovq = load_verified_meta(dirs["openvino-int8"]).quantization
    assert ir_ops["FakeQuantize"] == ovq.quantizers > 0
    # every conv the distill-time graph quantized is an INT8 convolution in the IR
    assert ovq.counted_in == "model.xml" and ovq.compute_ops_quantized == ref_q
    assert ovq.quantized_ops.get("Convolution", 0) + ovq.quantized_ops.get("GroupConvolution", 0) == ref_q


def test_int8_label_on_a_float_graph_fails_export(qat_student, tmp_path, monkeypatch):
    """Before the fix forward_mask ran without NNCF's hooks and exported the FP32 graph as 'int8'."""
    from mirage_edge.export import export_model, wrap
    from mirage_edge.export.cli import load_source_model

    model, source, classes, pre = load_source_model(str(qat_student))
    monkeypatch.setattr(wrap, "call_with_quantizers", lambda model, method, *a, **kw: method(*a, **kw))
    t = target(**{**DEMO_LIKE, "formats": ["onnx"]})
    with pytest.raises(ValidationError, match=r"labelled int8 but is not quantized.*0 quantizers") as ei:
        export_model(model, tmp_path, t, classes=classes, preprocess=pre, source=source)
    assert ei.value.numbers["quantizers"] == 0
    assert not (tmp_path / "onnx-int8").exists()


def test_ptq_share_below_the_target_minimum_fails(tmp_path):
    from test_export_support import tiny_cnn

    from mirage_edge.export import export_model

    # only the Gemm head quantized: 1 of 4 compute ops
    t = target(formats=["onnx"], precisions=["int8"], quantization={"op_types": ["Gemm"], "calib_images": 4},
               validation={"n_inputs": 4})
    with pytest.raises(ValidationError, match=r"only 1 of 4 compute ops are quantized \(share 0.25, needs >= 0.5\)"):
        export_model(tiny_cnn(), tmp_path / "a", t)
    t = target(formats=["onnx"], precisions=["int8"], quantization={"op_types": ["Gemm"], "calib_images": 4},
               validation={"n_inputs": 4, "int8_min_quantized_share": 0.2})
    (d,) = export_model(tiny_cnn(), tmp_path / "b", t)
    q = load_verified_meta(d).quantization
    assert (q.compute_ops_quantized, q.compute_ops_total, q.quantized_share) == (1, 4, 0.25)


def test_export_takes_a_distill_run_folder_and_says_which_student(qat_student, tmp_path):
    import shutil

    from click.testing import CliRunner

    from mirage_edge.cli import cli

    run = tmp_path / "run"
    shutil.copytree(qat_student, run / "student_int8")
    shutil.copytree(qat_student / "fp32", run / "student")
    (run / "recipe.toml").write_text('name = "test"\n')
    common = ["--format", "onnx", "--set", "validation.n_inputs=2", "--set", "validation.int8_min_dice=0.3"]
    res = CliRunner().invoke(cli, ["export", str(run), "--precision", "int8", "--out", str(tmp_path / "a"), *common])
    assert res.exit_code == 0, res.output
    assert f"exporting {run / 'student_int8'}: the QAT INT8 student" in res.output
    assert load_verified_meta(tmp_path / "a" / "onnx-int8").quantization.method == "qat-nncf"
    res = CliRunner().invoke(cli, ["export", str(run), "--precision", "fp32", "--out", str(tmp_path / "b"), *common])
    assert res.exit_code == 0, res.output
    assert f"exporting {run / 'student'}: the FP32 student" in res.output
    shutil.rmtree(run / "student")
    res = CliRunner().invoke(cli, ["export", str(run), "--precision", "fp32", "--out", str(tmp_path / "c"), *common])
    assert res.exit_code != 0 and "without a finished student" in res.output


def test_openvino_count_sees_a_quantized_tensor_through_a_max_pool():
    """ResNet's QAT graph quantizes the stem's output once, before the max pool; the CPU plugin runs the
    pool on the quantized tensor and layer1's first conv in INT8. The IR count must say so (it did not,
    and `export` refused resnet18's QAT student: 25 of 26 where its Q/DQ ONNX has 26)."""
    import numpy as np
    import openvino as ov
    import openvino.opset13 as ops

    from mirage_edge.export.openvino import fq_summary

    x = ops.parameter([1, 4, 8, 8], np.float32, name="x")
    lo, hi = ops.constant(np.float32(0.0)), ops.constant(np.float32(4.0))
    w = ops.constant(np.ones((4, 4, 3, 3), np.float32))

    def conv(src):
        return ops.convolution(src, w, [1, 1], [1, 1], [1, 1], [1, 1])

    def pool(src):
        return ops.max_pool(src, [2, 2], [1, 1], [0, 0], [0, 0], [2, 2]).output(0)

    fq = ops.fake_quantize(x, lo, hi, lo, hi, 256)
    model = ov.Model([conv(pool(fq)), conv(fq), conv(pool(x))], [x])
    assert fq_summary(model) == ({"Convolution": 2}, {"Convolution": 1})  # the pool of a float tensor stays float
