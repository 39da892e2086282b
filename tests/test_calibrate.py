"""The foreground logit offset chosen on validation (`mirage_edge.models.calibrate`): the search, the exact fold
into the head, and its use by `train finetune` (calibrated/) and `distill` (student and twin alike)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import one_line_error, tiny_seg_teacher
from test_distill_pipeline import FAST

from mirage_edge.models import calibrate
from mirage_edge.errors import ConfigError

torch.set_num_threads(2)


def _dice(lg: np.ndarray, truth: np.ndarray) -> float:
    p = lg.argmax(1) == 1
    return float(2 * (p & truth).sum() / max(1, p.sum() + truth.sum()))


def test_the_offset_is_the_validation_threshold_and_zero_without_evidence():
    truth = np.zeros((3, 8, 8), bool)
    truth[:, 2:4, 2:5] = True
    logits = np.zeros((3, 2, 8, 8), np.float32)
    logits[:, 1] = np.where(truth, -1.1, -3.0)  # under-confident: fluid p ~ 0.25 on the lesion, argmax misses it
    res = calibrate.choose_offset(logits, [1], lambda lg: _dice(lg, truth))
    assert res["val_before"] == 0.0 and res["val_after"] == 1.0
    assert 1.1 < res["offset"] < 3.0 and res["offset"] == min(b for b in calibrate.GRID if b > 1.1)  # nearest 0
    assert res["scores"]["0"] == 0.0 and res["classes"] == [1]
    flat = calibrate.choose_offset(logits, [1], lambda lg: 0.5)
    assert flat["offset"] == 0.0  # every offset ties: no change
    with pytest.raises(ConfigError, match="foreground classes"):
        calibrate.choose_offset(logits, [0, 1], lambda lg: 0.0)
    with pytest.raises(ConfigError, match="N x K x h x w"):
        calibrate.choose_offset(logits[:, :, 0], [1], lambda lg: 0.0)


@pytest.mark.parametrize("head", ["convnext", "fpn"])
def test_folding_adds_the_offset_to_those_logits_exactly(head):
    from mirage_edge.models import create_model
    from mirage_edge.models.students import build_student
    from mirage_edge.models.task import classification_model, fpn_segmentation_model, segmentation_model

    torch.manual_seed(0)
    if head == "convnext":
        enc = create_model("mirage-tiny", input_size=32, depth=1, in_domains=["bscan"], out_domains=[])
        model = segmentation_model(enc, 3, class_dim=8, depth=1).eval()
    else:
        model = fpn_segmentation_model(build_student("resnet18", img_size=64), 3, dim=16).eval()
    x = torch.rand(2, 1, *(32, 32) if head == "convnext" else (64, 64))
    before = model(x)
    calibrate.fold_offset(model, [1, 2], 1.75)
    after = model(x)
    torch.testing.assert_close(after[:, 1:], before[:, 1:] + 1.75, atol=1e-5, rtol=0)
    torch.testing.assert_close(after[:, 0], before[:, 0], atol=0, rtol=0)
    cls = classification_model(create_model("mirage-tiny", input_size=32, depth=1, in_domains=["bscan"],
                                            out_domains=[]), 3)
    with pytest.raises(ConfigError, match="cannot be folded"):
        calibrate.fold_offset(cls, [1], 1.0)


def test_finetune_saves_a_calibrated_checkpoint_that_a_run_folder_resolves_to(tmp_path):
    from mirage_edge.config import from_dict
    from mirage_edge.data.synth import synthesize
    from mirage_edge.models import create_model
    from mirage_edge.train.config import FinetuneConfig
    from mirage_edge.train.finetune import _datasets, _spec, evaluate_seg, resolve_checkpoint, run_finetune

    data = synthesize(tmp_path / "layers", "layers", 12, 3, size=64)
    cfg = from_dict(FinetuneConfig, {
        "task": "seg", "data": str(data), "out_dir": str(tmp_path / "run"), "mode": "full", "image_size": 64,
        "calibrate": True, "model": {"name": "mirage-tiny", "overrides": {"input_size": 64, "depth": 1}},
        "head": {"class_dim": 8, "depth": 1},
        "loop": {"max_steps": 4, "batch_size": 4, "progress": False, "threads": 2}}, source="test")
    out = run_finetune(cfg)
    cal = out["calibration"]
    assert cal["val_after"] >= cal["val_before"] and f"{cal['offset']:g}" in cal["scores"]
    ckpt = tmp_path / "run" / "calibrated"
    assert resolve_checkpoint(str(tmp_path / "run")) == str(ckpt)
    meta = json.loads((ckpt / "config.json").read_text())["meta"]
    assert meta["calibration"]["offset"] == cal["offset"] and meta["from"].endswith("best")
    assert json.loads((tmp_path / "run" / "test_metrics.json").read_text())["checkpoint"] == str(ckpt)
    # the saved checkpoint is what was chosen: its val Dice is the calibrated one, best/'s the uncalibrated one
    val = _datasets(cfg, _spec(cfg))["val"]
    for folder, want in ((ckpt, cal["val_after"]), (tmp_path / "run" / "best", cal["val_before"])):
        model = create_model("mirage", checkpoint=folder).eval()
        assert evaluate_seg(model, val, 4, hd95=False)["dice"] == pytest.approx(want, abs=1e-6)
    with pytest.raises(ValueError, match="calibrate"):
        from_dict(FinetuneConfig, {"task": "cls", "calibrate": True}, source="test")


@pytest.fixture(scope="module")
def seg_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("calibrate")
    return (root, *tiny_seg_teacher(root))


def test_distill_calibrates_the_student_and_its_twin_on_validation(seg_setup):
    from click.testing import CliRunner
    from safetensors.torch import load_file

    from mirage_edge.distill import load_student
    from mirage_edge.distill.cli import distill_cmd

    root, data, teacher = seg_setup
    out = root / "run"
    res = CliRunner().invoke(distill_cmd, [
        "--recipe", "tiny-demo", "--data", str(data), "--teacher", str(teacher), "--out", str(out), "--baseline",
        f"cache.dir={json.dumps(str(root / 'cache'))}", "stage2.calibrate=true", *FAST])
    assert res.exit_code == 0, res.output
    st = json.loads((out / "report.json").read_text())["stages"]
    for stage, saved in (("stage2", "student"), ("baseline", "baseline")):
        cal = st[stage]["calibration"]
        assert cal["val_after"] >= cal["val_before"] == pytest.approx(st[stage]["best"], abs=1e-6)
        assert f"{stage}: foreground logit offset" in res.output
        # the saved model is the trained one with the offset folded into its last bias, nothing else
        trained = load_file(str(out / ("stage2" if stage == "stage2" else "baseline_stage") / "final.safetensors"))
        key = next(k for k in trained if k.endswith("final_layer.bias"))
        bias = load_student(out / saved).head.final_layer.bias.detach()
        shift = torch.zeros_like(bias)
        shift[cal["classes"]] = cal["offset"]
        torch.testing.assert_close(bias, trained[key] + shift, atol=1e-6, rtol=0)
    pick = json.loads((out / "report.json").read_text())["validation"]
    assert (pick["distilled"], pick["baseline"]) == (st["stage2"]["calibration"]["val_after"],
                                                     st["baseline"]["calibration"]["val_after"])
    # benchmarks/calibration_ablation.py: each form with and without its offset, consistent with the report
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from calibration_ablation import ablate, main

    ab = ablate(out)
    test = json.loads((out / "report.json").read_text())["test"]
    assert ab["test/student/calibrated"]["dice"] == pytest.approx(test["student_value"], abs=1e-6)
    assert ab["test/twin/calibrated"]["dice"] == pytest.approx(test["baseline_value"], abs=1e-6)
    for stage, who in (("stage2", "student"), ("baseline", "twin")):
        assert ab[f"val/{who}/offset0"]["dice"] == pytest.approx(st[stage]["calibration"]["val_before"], abs=1e-6)
        assert ab[f"val/{who}/calibrated"]["offset"] == st[stage]["calibration"]["offset"]
    bad = CliRunner().invoke(main, [str(root)])
    assert bad.exit_code != 0 and "not a finished distill run folder" in bad.output


def test_distill_calibrate_needs_validation_and_is_refused_before_stage_1(seg_setup):
    root, data, teacher = seg_setup
    line = one_line_error("distill", "--recipe", "tiny-demo", "--teacher", str(teacher), "--data", str(data),
                          "--out", str(root / "noval"), *FAST, "stage2.calibrate=true", 'data.val_split="nope"')
    assert line.startswith("error: stage2.calibrate chooses a segmentation logit offset on validation data")
    assert not (root / "noval" / "stage1").exists()
