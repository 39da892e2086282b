"""Issue #19 item 1: the teacher exports like a student. A registered name with --task and --num-classes
builds MIRAGE with a task head (official weights, or seeded random ones only with --random-weights), and
exports to ONNX / ORT INT8 / OpenVINO FP32 / OpenVINO INT8 (NNCF transformer preset, SmoothQuant, bias
correction) with validation, as does a fine-tuned teacher checkpoint (teacher-cpu-openvino-int8)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import one_line_error, requires_vnni

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")
pytest.importorskip("nncf")

from click.testing import CliRunner  # noqa: E402

from mirage_edge.artifact import load_verified_meta  # noqa: E402
from mirage_edge.cli import cli  # noqa: E402

SIZE = 64
# small calibration/validation sets: mirage-tiny at 64 px, a few seconds per artifact
SMALL = ["--input-size", str(SIZE), str(SIZE), "--calib-images", "4", "--set", "validation.n_inputs=4"]




@pytest.fixture(scope="module")
def teacher_artifacts(tmp_path_factory) -> Path:
    """mirage-tiny + a 3-class segmentation head, random weights, the four CPU forms (teacher-cpu)."""
    out = tmp_path_factory.mktemp("teacher") / "art"
    res = CliRunner().invoke(cli, ["export", "mirage-tiny", "--task", "segmentation", "--num-classes", "3",
                                   "--random-weights", "--target", "teacher-cpu", *SMALL, "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out


@requires_vnni
def test_registered_name_with_a_head_exports_validated_artifacts(teacher_artifacts):
    metas = {d.name: load_verified_meta(d) for d in sorted(teacher_artifacts.iterdir())}
    assert sorted(metas) == ["onnx-fp32", "onnx-int8", "openvino-fp32", "openvino-int8"]
    hashes = set()
    for name, meta in metas.items():
        assert meta.task == "segmentation" and len(meta.classes) == 3, name
        assert meta.outputs[0].kind == "logits" and meta.outputs[0].shape[1:] == [3, SIZE, SIZE]
        assert meta.source.model_name == "mirage-tiny"
        assert meta.build["weights"] == "random (seed 0)" and meta.build["head"]["num_classes"] == 3
        assert meta.build["head"]["type"] == "convnext" and meta.build["head"]["depth"] == 4  # the official head
        hashes.add(meta.build["weights_sha256"])
        # validated against torch before it was written
        assert meta.parity["n_inputs"] == 4 and meta.parity["dice_vs_torch"] >= 0.9, name
    assert len(hashes) == 1  # one model behind all four
    ov = metas["openvino-int8"].quantization
    assert ov.method == "nncf-ptq" and ov.model_type == "transformer"
    assert ov.notes[0] == "NNCF PTQ, TRANSFORMER model type, SmoothQuant (MatMul alpha 0.95), fast bias correction"
    assert ov.quantized_share >= 0.5 and metas["openvino-int8"].export_target["name"] == "teacher-cpu"
    assert metas["onnx-int8"].quantization.method == "ort-static-qdq"


@requires_vnni
def test_random_weights_are_seeded_and_the_artifact_computes_the_model(teacher_artifacts):
    from mirage_edge.export.registered import registered_model
    from mirage_edge.runtime import Predictor

    reg = registered_model("mirage-tiny", task="segmentation", num_classes=3, random_weights=True,
                           input_size=(SIZE, SIZE))
    meta = load_verified_meta(teacher_artifacts / "openvino-fp32")
    assert reg.build["weights_sha256"] == meta.build["weights_sha256"]  # the same command, the same weights
    x = np.random.default_rng(0).random((2, 1, SIZE, SIZE), dtype=np.float32)
    with torch.no_grad():
        want = reg.model(torch.from_numpy(x)).numpy()
    got = Predictor.load(teacher_artifacts / "openvino-fp32", threads=1).run(x)["logits"]
    np.testing.assert_allclose(got, want, atol=1e-3)


def test_random_weights_need_the_flag_and_a_head_needs_its_classes(tmp_path, monkeypatch):
    monkeypatch.setenv("MIRAGE_EDGE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MIRAGE_EDGE_OFFLINE", "1")
    out = ["--out", str(tmp_path / "o")]
    line = one_line_error("export", "mirage-tiny", "--task", "segmentation", "--num-classes", "3", *out)
    assert "mirage-tiny has no released weights; put the weights at" in line
    assert line.endswith("or --random-weights to export random weights on purpose (timing only)")
    line = one_line_error("export", "mirage-tiny", "--task", "segmentation", "--random-weights", *out)
    assert "give its class count with --num-classes K" in line
    line = one_line_error("export", "mirage-tiny", "--num-classes", "3", "--random-weights", *out)
    assert "--num-classes / --head build a task head: give --task segmentation or --task classification" in line
    line = one_line_error("export", "mirage-tiny", "--task", "segmentation", "--num-classes", "3", "--random-weights",
                           "--head", "depht=2", *out)
    assert "bad --head option for a segmentation head" in line and "depht" in line
    line = one_line_error("export", "mobilenetv4_conv_small", "--task", "segmentation", "--num-classes", "3", *out)
    assert "student architecture without weights of its own" in line
    ckpt = tmp_path / "ckpt"
    from mirage_edge.models import save_model
    from test_export_support import mirage_seg

    save_model(mirage_seg(), ckpt)
    line = one_line_error("export", str(ckpt), "--num-classes", "3", *out)
    assert "--num-classes / --head build a head on a registered model name" in line
    assert not any((tmp_path / "o").iterdir())  # refused before any artifact was written


def test_official_weights_are_used_when_found_locally(tmp_path, monkeypatch):
    """A registered name without --random-weights loads the weights from $MIRAGE_EDGE_HOME (never a
    download here): the encoder is the saved one, the head is fresh (and said to be)."""
    from mirage_edge.export.registered import registered_model
    from mirage_edge.models import create_model, save_model

    home = tmp_path / "home"
    monkeypatch.setenv("MIRAGE_EDGE_HOME", str(home))
    monkeypatch.setenv("MIRAGE_EDGE_OFFLINE", "1")
    torch.manual_seed(1)
    enc = create_model("mirage-tiny", input_size=SIZE, in_domains=["bscan"], out_domains=[]).eval()
    save_model(enc, home / "mirage-tiny")
    reg = registered_model("mirage-tiny", task="segmentation", num_classes=2, input_size=(SIZE, SIZE),
                           head={"depth": 1, "class_dim": 32})
    assert reg.build["weights"] == "official encoder, random segmentation head (seed 0)"
    assert reg.source.checkpoint == str(home / "mirage-tiny") and len(reg.source.checkpoint_sha256) == 64
    assert reg.build["head"]["depth"] == 1 and reg.build["head"]["class_dim"] == 32
    for k, v in enc.state_dict().items():
        assert torch.equal(reg.model.encoder.state_dict()[k], v), k


@requires_vnni
def test_fine_tuned_teacher_checkpoint_with_the_teacher_target(tmp_path):
    from mirage_edge.models import save_model
    from test_export_support import mirage_seg

    ckpt = save_model(mirage_seg(), tmp_path / "teacher")
    res = CliRunner().invoke(cli, ["export", str(ckpt), "--target", "teacher-cpu-openvino-int8", "--calib-images", "4",
                                   "--set", "validation.n_inputs=4", "--set", "seg_argmax=true",
                                   "--set", "seg_mask_stride=4", "--out", str(tmp_path / "art")])
    assert res.exit_code == 0, res.output
    meta = load_verified_meta(tmp_path / "art" / "openvino-int8")
    assert meta.task == "segmentation" and len(meta.classes) == 4 and meta.outputs[0].kind == "mask"
    assert meta.export_target["seg_mask_stride"] == 4 and meta.quantization.model_type == "transformer"
    assert "SmoothQuant (MatMul alpha 0.95)" in meta.quantization.notes[0]
    assert meta.source.checkpoint == str(ckpt) and "weights" not in meta.build


def test_nncf_recipe_arguments():
    import nncf

    from mirage_edge.export.openvino import nncf_ptq_kwargs
    from mirage_edge.export.target import QuantConfig

    kw, note = nncf_ptq_kwargs(nncf, QuantConfig(smooth_quant_matmul=0.5, smooth_quant_convolution=0.2), True, 8)
    adv = kw["advanced_parameters"]
    assert kw["model_type"] == nncf.ModelType.TRANSFORMER and kw["subset_size"] == 8
    assert (adv.smooth_quant_alphas.matmul, adv.smooth_quant_alphas.convolution) == (0.5, 0.2)
    assert not adv.disable_bias_correction
    assert note == ("NNCF PTQ, TRANSFORMER model type, SmoothQuant (MatMul alpha 0.5, Convolution alpha 0.2), "
                    "fast bias correction")
    kw, note = nncf_ptq_kwargs(nncf, QuantConfig(bias_correction=False, smooth_quant_matmul=-1), True, 4)
    assert kw["advanced_parameters"].disable_bias_correction and note.endswith("SmoothQuant off, bias correction off")
    kw, note = nncf_ptq_kwargs(nncf, QuantConfig(fast_bias_correction=False), False, 4)
    assert "model_type" not in kw and note == "NNCF PTQ, default model type, full bias correction"
