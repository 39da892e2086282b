"""Non-square model inputs (issue #18: "a resolution and aspect that keep small fluid pockets visible").
A 496 x 768 B-scan squeezed to 256 x 256 loses 3x across and 1.9x down; `image_size = [H, W]` in
fine-tuning and `data.image_size = [H, W]` in distillation keep both axes alike. The teacher's
token grid, the student's build, the Q/DQ ONNX and the saved configs all follow [H, W]."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import one_line_error
from test_distill_pipeline import FAST

torch.set_num_threads(2)


def test_config_sizes_and_their_errors():
    from mirage_edge.config import ConfigError, from_dict
    from mirage_edge.distill.recipe import DataSpec
    from mirage_edge.train.config import FinetuneConfig

    assert from_dict(FinetuneConfig, {"image_size": [256, 384]}, source="t").hw == (256, 384)
    assert from_dict(FinetuneConfig, {"image_size": 96}, source="t").hw == (96, 96)
    assert DataSpec(image_size=[64, 96]).hw == (64, 96)
    assert DataSpec(image_size=[64, 96]).preprocess_spec().size == (64, 96)
    with pytest.raises((ValueError, ConfigError), match=r"int or \[H, W\]"):
        from_dict(FinetuneConfig, {"image_size": [64, 96, 3]}, source="t")
    with pytest.raises((ValueError, ConfigError), match="multiple of 32"):
        DataSpec(image_size=[64, 100])


def test_patch_check_names_the_axis(tmp_path):
    from mirage_edge.data.synth import synthesize

    data = synthesize(tmp_path / "layers", "layers", 4, 1, size=32)
    line = one_line_error("train", "finetune", "--data", str(data), "task=\"seg\"", "mode=\"full\"",
                          "image_size=[64, 72]", "model.name=\"mirage-tiny\"", "model.overrides={depth = 1}",
                          "--out", str(tmp_path / "run"))
    assert "image_size 64 x 72: 72 is not a multiple of the 32x32 patch of mirage-tiny; use e.g. 64 or 96" in line


def test_finetune_then_distill_at_a_bscan_aspect(tmp_path):
    """Teacher fine-tuned at 32 x 64, student distilled at 64 x 96 (the teacher's tables resampled):
    every saved form is built for the recipe's H x W, and the INT8 graph takes exactly that."""
    pytest.importorskip("nncf")
    onnx = pytest.importorskip("onnx")
    from mirage_edge.config import from_dict
    from mirage_edge.data.synth import synthesize
    from mirage_edge.distill import distill
    from mirage_edge.distill.recipe import load_recipe
    from mirage_edge.models import create_model
    from mirage_edge.train.config import FinetuneConfig
    from mirage_edge.train.finetune import run_finetune

    data = synthesize(tmp_path / "layers", "layers", 8, seed=0, size=64)
    cfg = from_dict(FinetuneConfig, {
        "task": "seg", "data": str(data), "out_dir": str(tmp_path / "teacher"), "image_size": [32, 64],
        "mode": "full", "test": False, "head": {"class_dim": 8, "depth": 1, "skip_dim": 4},
        "model": {"name": "mirage-tiny", "overrides": {"depth": 1}},
        "loop": {"epochs": 1, "batch_size": 4, "threads": 2}}, source="t")
    run_finetune(cfg)
    teacher = tmp_path / "teacher" / "best"
    arch = json.loads((teacher / "config.json").read_text())["encoder"]["architecture"]
    assert arch["input_size"]["bscan"] == [32, 64]
    t = create_model("mirage", checkpoint=str(teacher)).eval()
    with torch.no_grad():
        assert t(torch.rand(1, 1, 32, 64)).shape == (1, 9, 32, 64)

    rec = load_recipe("layers-tiny", [f"data.path={json.dumps(str(data))}", f"teacher.model={json.dumps(str(teacher))}",
                                      f"cache.dir={json.dumps(str(tmp_path / 'cache'))}",
                                      f"out={json.dumps(str(tmp_path / 'run'))}", "qat.enabled=true", *FAST,
                                      "data.image_size=[64, 96]"])
    logs: list[str] = []
    res = distill(rec, log=logs.append)
    assert any("resampled to 64x96" in m for m in logs)
    out = Path(res.out_dir)
    student = create_model("mirage", checkpoint=res.student_dir).eval()
    assert tuple(getattr(student.encoder, "input_size", (0, 0))) == (64, 96)
    with torch.no_grad():
        assert student(torch.rand(1, 1, 64, 96)).shape == (1, 9, 64, 96)
    assert json.loads((out / "student" / "config.json").read_text())["meta"]["preprocess"]["size"] == [64, 96]
    g = onnx.load(str(out / "student_int8" / "model.onnx")).graph
    assert [d.dim_value for d in g.input[0].type.tensor_type.shape.dim][-2:] == [64, 96]
    report = json.loads((out / "report.json").read_text())
    assert report["test"]["n"] > 0 and report["test"]["int8_value"] is not None


def test_validation_scores_masks_at_their_own_size(tmp_path):
    """What picks a checkpoint or a KD weight (val) is scored like the report's test: each mask at its
    file's size, not the mask resized to the model input (thin structures differ between the two)."""
    from mirage_edge.data import PreprocessSpec
    from mirage_edge.data.layout import scan_dataset
    from mirage_edge.data.synth import synthesize
    from mirage_edge.distill import evaluate as ev
    from mirage_edge.distill.data import DistillSamples
    from mirage_edge.distill.loop import _val_metric
    from mirage_edge.distill.recipe import load_recipe

    data = synthesize(tmp_path / "layers", "layers", 6, seed=0, size=96)
    val = DistillSamples(scan_dataset(data, "auto"), "val", PreprocessSpec(size=(32, 64)), labels=True)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 9, 3, padding=1))
    rec = load_recipe("layers-tiny", [f"data.path={json.dumps(str(data))}", "data.image_size=[32, 64]"])
    got = _val_metric(val, "segmentation", rec)(net)["val_metric"]
    logits, labels = ev.collect(val, net, 8)
    native = ev.headline("segmentation", ev.task_metrics("segmentation", logits, ev.native_truth(
        "segmentation", labels, val), val, hd95=False))[1]
    resized = ev.headline("segmentation", ev.task_metrics("segmentation", logits, labels, val, hd95=False))[1]
    assert got == pytest.approx(native, abs=1e-9) and abs(native - resized) > 1e-6


def test_distill_cli_takes_h_x_w():
    from click.testing import CliRunner

    from mirage_edge.cli import cli

    res = CliRunner().invoke(cli, ["distill", "--recipe", "layers-tiny", "--image-size", "64x96", "--print-config"])
    assert res.exit_code == 0 and "image_size = [64, 96]" in res.output
    res = CliRunner().invoke(cli, ["distill", "--recipe", "layers-tiny", "--image-size", "64x", "--print-config"])
    assert res.exit_code == 2 and "expected S or HxW" in res.output
