"""Issue #22, export and model loading: layer-map-free official configs, export --input-size of a distilled
student, --task that disagrees with the checkpoint, impossible numbers and unusable --out paths."""
from __future__ import annotations

import argparse
import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import one_line_error

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from click.testing import CliRunner  # noqa: E402

from mirage_edge.artifact import load_verified_meta  # noqa: E402
from mirage_edge.cli import cli  # noqa: E402
from mirage_edge.errors import ConfigError  # noqa: E402

SEMSEG_FIELDS = ("semseg_num_classes", "semseg_dim_class_emb", "semseg_interpolate_class_emb")
# fast single artifact: ONNX fp32, TorchScript exporter, 2 validation inputs
FAST = ["--format", "onnx", "--precision", "fp32", "--set", "validation.n_inputs=2",
        "--set", 'exporter="torchscript"']




def export_ok(*argv: str) -> Path:
    res = CliRunner().invoke(cli, ["export", *argv, *FAST])
    assert res.exit_code == 0, res.output
    return Path(res.output.strip().splitlines()[-1])


# -- item 2: official configs of models without the layer map ----------------------------------------------
@pytest.fixture(scope="module")
def no_layermap(mirage_ref, tmp_path_factory):
    """The tiny official .pth with every layer-map tensor dropped (as the bscan-slo release has none), and
    configs whose semseg fields are null / omitted and whose domains lack bscanlayermap."""
    root = tmp_path_factory.mktemp("nolm")
    with torch.serialization.safe_globals([argparse.Namespace]):
        ck = torch.load(mirage_ref / "tiny_official.pth", map_location="cpu", weights_only=True)
    ck["model"] = {k: v for k, v in ck["model"].items() if "bscanlayermap" not in k and "class_emb" not in k}
    args = vars(ck["args"])
    ck["args"] = argparse.Namespace(**{**args, "in_domains": ["bscan", "slo"], "out_domains": ["bscan", "slo"]})
    torch.save(ck, root / "nolm.pth")
    cfg = json.loads((mirage_ref / "tiny_config.json").read_text())
    cfg["in_domains"] = cfg["out_domains"] = ["bscan", "slo"]
    for key in ("input_size", "patch_size", "grid_size", "decoder_num_channels"):
        cfg[key].pop("bscanlayermap")
    (root / "null.json").write_text(json.dumps({**cfg, **dict.fromkeys(SEMSEG_FIELDS)}))
    (root / "omitted.json").write_text(json.dumps({k: v for k, v in cfg.items() if k not in SEMSEG_FIELDS}))
    return root


@pytest.mark.parametrize("variant", ["null", "omitted"])
def test_config_without_layer_map_loads_and_matches_reference(mirage_ref, no_layermap, variant):
    from mirage_edge.models import create_model

    model = create_model("mirage", checkpoint=no_layermap / "nolm.pth", config=no_layermap / f"{variant}.json")
    assert model.cfg.in_domains == ["bscan", "slo"] and "bscanlayermap" not in model.input_adapters
    ref = np.load(mirage_ref / "tiny_reference.npz")
    x = {m: torch.from_numpy(ref[f"input_{m}"]) for m in ("bscan", "slo")}
    with torch.no_grad():
        for key, names in [("tokens_bscan_slo", ("bscan", "slo")), ("tokens_bscan", ("bscan",)),
                           ("tokens_slo", ("slo",))]:
            got = model.eval().forward_features({m: x[m] for m in names}).double().numpy()
            np.testing.assert_allclose(got, ref[key], atol=1e-5, rtol=0)


def test_config_without_layer_map_via_info_and_convert(no_layermap, tmp_path):
    from mirage_edge.models import load_model

    cfg = str(no_layermap / "null.json")
    res = CliRunner().invoke(cli, ["info", "mirage", "--checkpoint", str(no_layermap / "nolm.pth"), "--config", cfg])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(cli, ["convert", str(no_layermap / "nolm.pth"), str(tmp_path / "conv"), "--config", cfg])
    assert res.exit_code == 0, res.output
    assert load_model(tmp_path / "conv").cfg.in_domains == ["bscan", "slo"]


def test_null_class_count_with_a_layer_map_is_named(mirage_ref, tmp_path):
    from mirage_edge.models.config import MirageConfig

    cfg = json.loads((mirage_ref / "tiny_config.json").read_text())
    (tmp_path / "c.json").write_text(json.dumps({**cfg, "semseg_num_classes": None}))
    with pytest.raises(ConfigError, match="semseg_num_classes is null but 'bscanlayermap'"):
        MirageConfig.load(tmp_path / "c.json")


# -- item 4: export --input-size of a distilled student -------------------------------------------------
@pytest.fixture(scope="module")
def students(tmp_path_factory):
    """Tiny students saved the way `distill` saves them: a drop-in segmentation student (projected
    student-tiny + seg head, 64 px, teacher grid 8 x 8), a plain conv student and a ViT student."""
    from mirage_edge.distill.student_io import save_student
    from mirage_edge.models import create_model
    from mirage_edge.models.task import segmentation_model

    root = tmp_path_factory.mktemp("students")
    torch.manual_seed(0)
    proj = create_model("projected-student", student="student-tiny", img_size=64, teacher_dim=32,
                        teacher_grid=(8, 8))
    save_student(segmentation_model(proj, 3, class_dim=8, depth=1).eval(), root / "seg", {"classes": ["a", "b", "c"]})
    save_student(create_model("student-tiny", img_size=64).eval(), root / "plain", {})
    save_student(create_model("vit_tiny_c32", img_size=64, depth=1).eval(), root / "vit", {})
    return root


def test_export_input_size_of_a_distilled_student(students, tmp_path):
    d = export_ok(str(students / "seg"), "--input-size", "96", "96", "--out", str(tmp_path / "a"))
    meta = load_verified_meta(d)
    assert meta.task == "segmentation" and meta.inputs[0].shape[-2:] == [96, 96]
    assert meta.outputs[0].shape[-2:] == [96, 96] and meta.parity["pixel_agreement"] == 1.0
    line = one_line_error("export", str(students / "seg"), "--input-size", "100", "100", "--out", str(tmp_path / "b"))
    assert line == ("error: distilled student (student-tiny, built for 64x64, teacher grid 8x8) needs an input "
                    "size that is a multiple of 32 x 32; got 100x100")
    line = one_line_error("export", str(students / "vit"), "--input-size", "96", "96", "--out", str(tmp_path / "c"))
    assert line == ("error: student 'vit_tiny_c32' is a ViT with a fixed 64x64 input (learned positional table); "
                    "it cannot run at 96x96: drop --input-size")
    d = export_ok(str(students / "seg"), "--input-size", "96", "128", "--out", str(tmp_path / "d"))
    meta = load_verified_meta(d)  # a B-scan's aspect: the teacher grid follows each axis
    assert meta.inputs[0].shape[-2:] == [96, 128] and meta.outputs[0].shape[-2:] == [96, 128]
    assert meta.parity["pixel_agreement"] == 1.0


# -- item 4: --task that disagrees with the checkpoint ---------------------------------------------------
def test_task_that_disagrees_with_the_checkpoint_is_refused(students, tmp_path):
    from mirage_edge.models import create_model, save_model
    from mirage_edge.models.task import segmentation_model

    torch.manual_seed(0)
    enc = create_model("mirage-tiny", input_size=64, depth=1, in_domains=["bscan"], out_domains=[])
    seg = save_model(segmentation_model(enc, 4, class_dim=16, depth=1), tmp_path / "seg")
    line = one_line_error("export", str(seg), "--task", "classification", *FAST, "--out", str(tmp_path / "o"))
    assert line == (f"error: {seg} is a segmentation model; --task classification does not fit "
                    "(leave --task out or give --task segmentation)")
    assert not (tmp_path / "o" / "onnx-fp32").exists()
    enc_dir = save_model(enc, tmp_path / "enc")
    line = one_line_error("export", str(enc_dir), "--task", "segmentation", *FAST, "--out", str(tmp_path / "o"))
    assert line == (f"error: {enc_dir} is an encoder model; --task segmentation does not fit "
                    "(leave --task out or give --task encoder)")
    # the checkpoint's own task given explicitly is only a check
    meta = load_verified_meta(export_ok(str(seg), "--task", "segmentation", "--out", str(tmp_path / "ok")))
    assert meta.task == "segmentation"
    # the encoder of a task model alone is a legitimate export (its tokens, no head)
    meta = load_verified_meta(export_ok(str(seg), "--task", "encoder", "--out", str(tmp_path / "enc_only")))
    assert meta.task == "encoder"


def test_forced_task_must_fit_the_output_of_a_plain_module(tmp_path):
    from test_export_support import target, tiny_cnn

    from mirage_edge.export import export_model

    with pytest.raises(ConfigError, match=r"TinyCNN outputs \(1, 3\) .*--task segmentation needs B x K x 64 x 64"):
        export_model(tiny_cnn(), tmp_path, target(task="segmentation"))


# -- item 5 (WEAK): impossible numbers and unusable --out paths -------------------------------------------
@pytest.mark.parametrize("argv, expected", [
    (["--input-size", "0", "0"], "input_size must be [H, W] with H, W >= 1, got [0, 0]"),
    (["--input-size", "-64", "64"], "input_size must be [H, W] with H, W >= 1, got [-64, 64]"),
    (["--calib-images", "0"], "quantization.calib_images must be >= 1, got 0"),
    (["--set", "batch.max=0"], "batch must satisfy 1 <= min <= opt <= max, got 1/1/0"),
    (["--set", "seg_mask_stride=0"], "seg_mask_stride must be >= 1, got 0"),
    (["--set", "validation.n_inputs=0"], "validation.n_inputs must be >= 1, got 0"),
    (["--set", "tensorrt.workspace_mb=-1"], "workspace_mb >= 1"),
])
def test_impossible_numbers_are_refused_up_front(students, tmp_path, argv, expected):
    line = one_line_error("export", str(students / "plain"), *argv, "--out", str(tmp_path / "o"))
    assert expected in line
    assert not (tmp_path / "o").exists()  # refused before anything was created


def test_size_not_a_multiple_of_the_stride(students, tmp_path):
    line = one_line_error("export", str(students / "plain"), "--input-size", "100", "100", *FAST,
                          "--out", str(tmp_path / "o"))
    assert line == (f"error: input size 100x100 is not a multiple of 32x32, the patch/stride of "
                    f"{students / 'plain'}; use e.g. 96x96")
    line = one_line_error("export", "mirage-tiny", "--input-size", "100", "100", "--out", str(tmp_path / "o"))
    assert "input size 100x100 is not a multiple of the patch size [32, 32]" in line


def test_out_path_that_is_a_file_or_read_only(students, tmp_path, monkeypatch):
    plain = str(students / "plain")
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert one_line_error("export", plain, "--out", str(afile)) == f"error: --out {afile} is a file, not a folder"
    assert one_line_error("export", plain, "--out", str(afile / "sub")) == (
        f"error: --out {afile / 'sub'} cannot be created: {afile} is a file, not a folder")
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:  # root writes through permission bits: make the write probe fail as a RO mount would
        from mirage_edge import _io

        def deny(*a, **k):
            raise PermissionError(errno.EROFS, os.strerror(errno.EROFS))

        monkeypatch.setattr(_io.tempfile, "TemporaryFile", deny)
        reason = os.strerror(errno.EROFS)
    else:
        ro.chmod(0o555)
        reason = os.strerror(errno.EACCES)
    try:
        assert one_line_error("export", plain, "--out", str(ro)) == f"error: --out {ro} is not writable: {reason}"
    finally:
        ro.chmod(0o755)
