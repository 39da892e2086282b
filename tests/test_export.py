"""Export: ONNX / OpenVINO fp32 + int8 for mirage-tiny (encoder, segmentation) and a student-like CNN."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import requires_vnni

from test_export_support import SIZE, exported, target, tiny_cnn  # also skips without torch/ORT/OV

import torch  # noqa: E402

from mirage_edge.artifact import load_verified_meta  # noqa: E402
from mirage_edge.errors import ConfigError, ExportError, ValidationError  # noqa: E402
from mirage_edge.export.target import TARGETS_DIR, ExportTarget, load_target  # noqa: E402

CURATED = ["cpu-onnxruntime-int8", "cpu-openvino-int8", "jetson-tensorrt-fp16", "jetson-tensorrt-int8",
           "firmware-openvino-int8"]


def _ort(path, x):
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


# ------------------------------------------------------------------------------------------ targets
@pytest.mark.parametrize("name", CURATED)
def test_curated_targets_load(name):
    t = load_target(TARGETS_DIR / f"{name}.toml")
    assert t.name == name
    assert t.opset >= 17
    assert ExportTarget(**{k: v for k, v in vars(t).items()}) == t


def test_target_strict_errors(tmp_path):
    bad = tmp_path / "t.toml"
    bad.write_text('formats = ["onnx"]\n[quantization]\ncalib_imgs = 3\n')
    with pytest.raises(ConfigError, match=r"quantization\.calib_imgs.*t\.toml.*did you mean 'calib_images'"):
        load_target(bad)
    bad.write_text('precisions = ["int4"]\n')
    with pytest.raises(ConfigError, match="int4"):
        load_target(bad)
    with pytest.raises(ConfigError, match="not found.*curated targets"):
        load_target("no-such-target")
    assert load_target("cpu-openvino-int8", ["batch.max=4"]).batch.max == 4


# ------------------------------------------------------------------------------------------ artifacts
@pytest.mark.parametrize("kind", ["cnn", "seg", "encoder"])
def test_fp32_and_int8_artifacts(kind):
    model, dirs = exported(kind)
    assert sorted(dirs) == ["onnx-fp32", "onnx-int8", "openvino-fp32", "openvino-int8"]
    task = {"cnn": "classification", "seg": "segmentation", "encoder": "encoder"}[kind]
    for name, d in dirs.items():
        meta = load_verified_meta(d)
        assert (meta.task, f"{meta.format}-{meta.precision}") == (task, name)
        assert {p.name for p in d.iterdir()} == {*meta.files, "metadata.json", "SHA256SUMS"}
        assert meta.parity["n_inputs"] == 8
        if meta.precision == "fp32":
            assert meta.parity["max_abs"] <= 1e-4 and meta.parity["cosine"] > 0.99999
        else:
            assert meta.quantization is not None and meta.quantization.quantized_ops
            if task == "classification":
                assert meta.parity["top1_agreement"] >= 0.75
            elif task == "segmentation":
                assert meta.parity["dice_vs_torch"] >= 0.85
            assert meta.parity["cosine"] >= 0.95
        assert meta.preprocessing["bscan"]["size"] == [SIZE, SIZE]
        assert meta.export_target["precisions"] == ["fp32", "int8"]
        assert meta.versions["onnx"] and meta.mirage_edge_version
    q = load_verified_meta(dirs["onnx-int8"]).quantization
    assert q.method == "ort-static-qdq" and q.op_types_quantized == ["MatMul", "Gemm", "Conv"]
    assert q.activation_type == "QUInt8" and q.per_channel and q.calibration_images == 16
    assert "generated" in q.calibration_source
    if kind != "cnn":  # attention: softmax etc. stay in float and are recorded
        assert q.float_ops.get("Softmax", 0) >= 4
        ov_q = load_verified_meta(dirs["openvino-int8"]).quantization
        assert ov_q.method == "nncf-ptq" and ov_q.model_type == "transformer"


@pytest.mark.parametrize("kind", ["cnn", "encoder"])
def test_onnx_fp32_matches_torch_with_dynamic_batch(kind):
    import onnx

    model, dirs = exported(kind)
    path = dirs["onnx-fp32"] / "model.onnx"
    proto = onnx.load(str(path))
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim[1:]] == [1, SIZE, SIZE]
    x = np.random.default_rng(3).random((3, 1, SIZE, SIZE), dtype=np.float32)  # batch 3: not the export batch
    with torch.no_grad():
        ref = (model.forward_features(torch.from_numpy(x)) if kind == "encoder" else model(torch.from_numpy(x))).numpy()
    got = _ort(path, x)
    assert got.shape == ref.shape
    assert float(np.abs(got - ref).max()) < 1e-4


def test_metadata_embedded_in_model_files():
    import onnx
    import openvino as ov

    _, dirs = exported("cnn")
    text = (dirs["onnx-fp32"] / "metadata.json").read_text().strip()
    props = {p.key: p.value for p in onnx.load(str(dirs["onnx-fp32"] / "model.onnx")).metadata_props}
    assert json.loads(props["mirage_edge"]) == json.loads(text)
    m = ov.Core().read_model(str(dirs["openvino-int8"] / "model.xml"))
    embedded = m.get_rt_info(["mirage_edge", "metadata"]).astype(str)
    assert json.loads(embedded) == json.loads((dirs["openvino-int8"] / "metadata.json").read_text())


def test_int8_onnx_is_explicit_qdq_on_gemm_conv_only():
    import onnx

    _, dirs = exported("encoder")
    proto = onnx.load(str(dirs["onnx-int8"] / "model.onnx"))
    ops = [n.op_type for n in proto.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    producer = {o: n for n in proto.graph.node for o in n.output}
    inits = {i.name: i for i in proto.graph.initializer}
    for n in proto.graph.node:
        if n.op_type in ("MatMul", "Conv"):  # every GEMM/conv reads dequantized int8
            assert all(producer[i].op_type == "DequantizeLinear" for i in n.input[:2] if i in producer), n.name
    conv = next(n for n in proto.graph.node if n.op_type == "Conv")
    w_dq = producer[conv.input[1]]
    scale = onnx.numpy_helper.to_array(inits[w_dq.input[1]])
    assert scale.size == 192  # per-channel weight scales (one per output channel of the patch embedding)
    assert not any(n.op_type.startswith("QLinear") for n in proto.graph.node)  # explicit Q/DQ, not QOperator


# ------------------------------------------------------------------------------------------ failures
def test_validation_failure_lists_numbers_and_writes_nothing(tmp_path):
    from mirage_edge.export import export_model

    model = tiny_cnn()
    t = target(formats=["onnx"], precisions=["fp32"], validation={"n_inputs": 4, "fp32_max_abs": 0.0})
    (tmp_path / "onnx-fp32").mkdir()
    (tmp_path / "onnx-fp32" / "keep.txt").write_text("old artifact")
    with pytest.raises(ValidationError, match=r"onnx-fp32 artifact failed validation.*max_abs = .*needs <= 0") as ei:
        export_model(model, tmp_path, t)
    assert ei.value.numbers["max_abs"] > 0 and "cosine" in ei.value.numbers
    assert (tmp_path / "onnx-fp32" / "keep.txt").read_text() == "old artifact"  # old one untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx-fp32"]  # no staging left behind


@requires_vnni
def test_fake_quantized_model_exports_its_qdq_graph(tmp_path):
    nncf = pytest.importorskip("nncf")
    import onnx

    from mirage_edge.export import export_model

    torch.manual_seed(0)
    model = tiny_cnn()
    calib = [torch.rand(1, 1, SIZE, SIZE) for _ in range(4)]
    qat = nncf.quantize(model, nncf.Dataset(calib), subset_size=4)
    with pytest.raises(ExportError, match="int8 only"):
        export_model(qat, tmp_path, target(formats=["onnx"], precisions=["fp32"]))
    dirs = export_model(qat, tmp_path, target(formats=["onnx", "openvino"], precisions=["int8"]))
    for d in dirs:
        meta = load_verified_meta(d)
        assert meta.quantization.method == "qat-nncf"
        assert meta.parity["top1_agreement"] == 1.0 and meta.parity["cosine"] > 0.999
    ops = {n.op_type for n in onnx.load(str(dirs[0] / "model.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops


def test_fp16_and_seg_argmax(tmp_path):
    from mirage_edge.export import export_model
    from mirage_edge.runtime import Predictor

    dirs = export_model(tiny_cnn(), tmp_path / "fp16", target(precisions=["fp16"], validation={"n_inputs": 4}))
    for d in dirs:
        meta = load_verified_meta(d)
        assert meta.precision == "fp16" and meta.parity["max_abs"] < 5e-2
    from test_export_support import mirage_seg

    (d,) = export_model(mirage_seg(), tmp_path / "argmax", target(formats=["onnx"], precisions=["fp32"],
                                                                  seg_argmax=True, exporter="torchscript",
                                                                  validation={"n_inputs": 4}))
    meta = load_verified_meta(d)
    assert meta.outputs[0].name == "mask" and meta.outputs[0].dtype == "uint8"
    assert meta.parity["pixel_agreement"] >= 0.999
    masks = Predictor.load(d).predict(np.random.default_rng(0).integers(0, 255, (2, 80, 70), dtype=np.uint8))
    assert masks.shape == (2, SIZE, SIZE) and masks.dtype == np.uint8


def test_fp32_artifacts_compute_in_f32_whatever_the_int8_float_ops_are(tmp_path):
    """openvino.inference_precision is for the float ops of INT8 artifacts; an "fp32" artifact (ONNX or
    IR) always carries the f32 hint, so one target can make both (the demo exports each model once)."""
    from mirage_edge.export import export_model

    dirs = export_model(tiny_cnn(), tmp_path, target(openvino={"inference_precision": "default"},
                                                     validation={"n_inputs": 4}))
    hints = {d.name: load_verified_meta(d).runtime.get("openvino", {}) for d in dirs}
    assert hints == {"onnx-fp32": {"INFERENCE_PRECISION_HINT": "f32"}, "onnx-int8": {},
                     "openvino-fp32": {"INFERENCE_PRECISION_HINT": "f32"}, "openvino-int8": {}}


def test_seg_mask_stride_argmax_at_lower_resolution(tmp_path):
    import torch

    from mirage_edge.export import export_model
    from test_export_support import mirage_seg

    model = mirage_seg()
    x = torch.rand(2, 1, SIZE, SIZE)
    with torch.no_grad():
        full = model.forward_mask(x)
        coarse = model.forward_mask(x, 2)
        gh, gw = model.encoder.token_grid(SIZE, SIZE)
        tokens = model.encoder.forward_features(x)[:, : gh * gw]
        half = model.head(tokens, (gh, gw), (SIZE // 2, SIZE // 2)).argmax(1)
    assert torch.equal(full, model(x).argmax(1))
    assert coarse.shape == full.shape and torch.equal(coarse[:, ::2, ::2], half) and torch.equal(coarse[:, 1::2, 1::2], half)
    (d,) = export_model(model, tmp_path / "s2", target(formats=["onnx"], precisions=["fp32"], seg_argmax=True,
                                                       seg_mask_stride=2, exporter="torchscript",
                                                       validation={"n_inputs": 4}))
    meta = load_verified_meta(d)
    assert meta.outputs[0].name == "mask" and meta.parity["pixel_agreement"] >= 0.999
    assert _ort(d / "model.onnx", x.numpy()).shape == (2, SIZE, SIZE)


def test_calibration_folder_with_labels(tmp_path):
    from mirage_edge.data.io import write_png
    from mirage_edge.export import export_model
    from mirage_edge.export.data import synthetic_oct

    imgs = synthetic_oct(18, (72, 72), seed=4)
    for i, img in enumerate(imgs):
        write_png(tmp_path / "data" / "train" / f"grade_{i % 3}" / f"s{i}_0.png", img)
    t = target(formats=["onnx"], precisions=["int8"], quantization={"calib_images": 10},
               validation={"n_inputs": 8, "max_metric_drop": 1.0})
    (d,) = export_model(tiny_cnn(), tmp_path / "out", t, calib=tmp_path / "data")
    meta = load_verified_meta(d)
    assert meta.quantization.calibration_source == str(tmp_path / "data")
    assert meta.quantization.calibration_images == 10
    assert {"torch_accuracy", "artifact_accuracy", "metric_drop"} <= set(meta.parity)


def test_export_cli_from_checkpoint(tmp_path):
    from click.testing import CliRunner

    from mirage_edge._io import sha256_file
    from mirage_edge.cli import cli
    from mirage_edge.models import save_model
    from test_export_support import mirage_seg

    ckpt = save_model(mirage_seg(), tmp_path / "ckpt")
    args = ["export", str(ckpt), "--format", "onnx", "--precision", "fp32", "--set", "validation.n_inputs=2",
            "--set", 'exporter="torchscript"', "--out", str(tmp_path / "art")]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert res.output.strip().endswith(str(tmp_path / "art" / "onnx-fp32"))
    meta = load_verified_meta(tmp_path / "art" / "onnx-fp32")
    assert meta.task == "segmentation" and meta.build["exporter"] == "torchscript"
    assert meta.source.checkpoint == str(ckpt)
    assert meta.source.checkpoint_sha256 == sha256_file(ckpt / "model.safetensors")
    res = CliRunner().invoke(cli, ["export", str(ckpt), "--target", "nope"])
    assert res.exit_code == 2 and "export target not found" in res.output
    res = CliRunner().invoke(cli, ["export", "no-such-model", "--format", "onnx"])
    assert res.exit_code == 2 and "not a registered model name" in res.output


def test_onnx_int8_with_nncf_and_ignored_scope(tmp_path):
    pytest.importorskip("nncf")
    from mirage_edge.export import export_model

    t = target(formats=["onnx"], precisions=["int8"], quantization={"method": "nncf", "calib_images": 8},
               validation={"n_inputs": 4})
    (d,) = export_model(tiny_cnn(), tmp_path / "nncf", t)
    q = load_verified_meta(d).quantization
    assert q.method == "nncf-ptq" and q.model_type == "default" and q.quantized_ops.get("Conv", 0) >= 2
    # ORT recipe with the head kept in float by a node-name pattern
    t = target(formats=["onnx"], precisions=["int8"],
               quantization={"calib_images": 8, "ignored_patterns": ["(?i)gemm|linear|head"]}, validation={"n_inputs": 4})
    (d,) = export_model(tiny_cnn(), tmp_path / "ort", t)
    q = load_verified_meta(d).quantization
    assert "Gemm" not in q.quantized_ops and q.float_ops.get("Gemm", 0) + q.float_ops.get("MatMul", 0) >= 1


class _TinySeg(torch.nn.Module):
    """Student-like segmentation net: B x 1 x H x W -> B x 3 x H x W logits."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.b = torch.nn.Conv2d(8, 3, 1)
        self.input_size = (SIZE, SIZE)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_segmentation_folder_gives_dice_metric(tmp_path):
    from mirage_edge.data.io import write_png
    from mirage_edge.export import export_model
    from mirage_edge.export.data import synthetic_oct

    root = tmp_path / "seg"
    imgs = synthetic_oct(6, (SIZE, SIZE), seed=7)
    for i, img in enumerate(imgs):
        write_png(root / "bscan" / f"vol{i // 3}_{i % 3}.png", img)
        write_png(root / "semseg" / f"vol{i // 3}_{i % 3}.png", ((img > 80).astype(np.uint8) + (img > 160)) * 50)
    (root / "INFO.json").write_text(json.dumps({"0": {"value": 0, "label": "background"},
                                                "1": {"value": 50, "label": "layer"},
                                                "2": {"value": 100, "label": "fluid"}}))
    torch.manual_seed(0)
    t = target(formats=["onnx"], precisions=["fp32"], validation={"n_inputs": 4, "max_metric_drop": 0.01})
    (d,) = export_model(_TinySeg().eval(), tmp_path / "out", t, calib=root)
    meta = load_verified_meta(d)
    assert meta.task == "segmentation"
    assert 0.0 <= meta.parity["torch_dice"] <= 1.0
    assert abs(meta.parity["torch_dice"] - meta.parity["artifact_dice"]) < 1e-6 and meta.parity["metric_drop"] < 0.01


def test_dynamic_hw_is_checked_at_another_size(tmp_path):
    """dynamic_hw: a CNN student's graph runs at a size it was not exported at (checked and recorded); a
    ViT whose positional table the exporter traced as a constant is refused by name, not shipped broken."""
    from mirage_edge.export import export_model
    from mirage_edge.models.students import build_student
    from mirage_edge.models.task import fpn_segmentation_model
    from mirage_edge.runtime import Predictor
    from test_export_support import mirage_seg

    torch.manual_seed(0)
    cnn = fpn_segmentation_model(build_student("student-tiny", img_size=SIZE), 2, dim=8, smooth="dw").eval()
    (d,) = export_model(cnn, tmp_path / "cnn", target(formats=["onnx"], precisions=["fp32"], dynamic_hw=True,
                                                      seg_argmax=True, seg_mask_stride=4, validation={"n_inputs": 4}))
    meta = load_verified_meta(d)
    big = SIZE + 64
    assert meta.parity["dynamic_hw_check"] == {"size": [big, big], "output_shape": [1, big, big]}
    x = np.random.default_rng(1).random((1, 1, big, 2 * SIZE), dtype=np.float32)
    mask = Predictor.load(d).run(x)["mask"]
    with torch.no_grad():
        ref = cnn.forward_mask(torch.from_numpy(x), 4)
    assert mask.shape == (1, big, 2 * SIZE) and float((torch.from_numpy(mask).long() == ref).float().mean()) > 0.999
    with pytest.raises(ValueError, match="dynamic_hw cannot be used with tensorrt"):
        target(formats=["tensorrt"], dynamic_hw=True)
    with pytest.raises(ExportError, match=f"runs only at its export size {SIZE}x{SIZE}, not at {big}x{big}"):
        export_model(mirage_seg(), tmp_path / "vit", target(formats=["onnx"], precisions=["fp32"], dynamic_hw=True,
                                                            validation={"n_inputs": 4}))
