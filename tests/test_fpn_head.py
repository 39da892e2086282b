"""The FPN decoder for CNN students (stage2.head = {type = "fpn"}): builds, round-trips, distils, quantizes."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_seg_teacher

torch.set_num_threads(2)


@pytest.mark.parametrize("smooth", ["conv", "dw"])
def test_fpn_student_round_trips_and_refuses_a_vit(tmp_path, smooth):
    from mirage_edge.errors import ConfigError
    from mirage_edge.models import create_model, save_model
    from mirage_edge.models.students import build_student
    from mirage_edge.models.task import fpn_segmentation_model

    torch.manual_seed(0)
    m = fpn_segmentation_model(build_student("student-tiny", img_size=64), 3, dim=16, smooth=smooth).eval()
    assert m.head.stages == [1, 2, 3, 4]  # strides 4, 8, 16, 32
    # a default head writes no "smooth" key, so checkpoints saved before the option read the same
    assert m.head.config.get("smooth") == (None if smooth == "conv" else "dw")
    assert m.head.smooth[0].groups == (1 if smooth == "conv" else 16)
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        y = m(x)
        assert y.shape == (2, 3, 64, 64)
        assert m.forward_mask(x, stride=4).shape == (2, 64, 64)
    again = create_model("mirage", checkpoint=save_model(m, tmp_path / "fpn")).eval()
    with torch.no_grad():
        assert torch.equal(again(x), y)
    with pytest.raises(ConfigError, match="fpn head needs a CNN student"):
        fpn_segmentation_model(build_student("vit_tiny_patch32", img_size=64), 3)
    with pytest.raises(ConfigError, match="smooth must be 'conv' or 'dw'"):
        fpn_segmentation_model(build_student("student-tiny", img_size=64), 3, smooth="separable")


def test_half_width_mobilenetv4_takes_an_fpn_head():
    from mirage_edge.models.students import build_student
    from mirage_edge.models.task import fpn_segmentation_model

    enc = build_student("mnv4-small-050", img_size=(64, 96))
    full = build_student("mobilenetv4_conv_small", img_size=(64, 96))
    assert [s for _, s in enc.stage_info] == [s for _, s in full.stage_info]  # same strides, half the channels
    assert [c for c, _ in enc.stage_info] < [c for c, _ in full.stage_info]
    m = fpn_segmentation_model(enc, 2, dim=32, smooth="dw").eval()
    with torch.no_grad():
        assert m(torch.rand(1, 1, 64, 96)).shape == (1, 2, 64, 96)


def test_distill_with_an_fpn_head_and_its_twin(tmp_path):
    from mirage_edge.distill import distill, load_recipe

    data, teacher = tiny_seg_teacher(tmp_path)
    rec = load_recipe("tiny-demo", [
        f"data.path={json.dumps(str(data))}", f"teacher.model={json.dumps(str(teacher))}",
        f"cache.dir={json.dumps(str(tmp_path / 'cache'))}", f"out={json.dumps(str(tmp_path / 'run'))}",
        'stage2.mode="new_head"', 'stage2.head={type = "fpn", dim = 16, smooth = "dw"}', "qat.enabled=true", "baseline.enabled=true",
        "stage1.epochs=1", "stage2.epochs=1", "stage1.batch_size=4", "stage2.batch_size=4", "qat.epochs=1",
        "qat.batch_size=4", "qat.subset_size=4", "data.image_size=64", "run.progress=false", "run.eval_batch_size=8"])
    res = distill(rec, log=lambda m: None)
    head = json.loads((res.student_dir / "config.json").read_text())["head"]
    assert head["type"] == "fpn" and head["stages"] == [1, 2, 3, 4] and head["smooth"] == "dw"
    twin = json.loads((res.out_dir / "baseline" / "config.json").read_text())["head"]
    assert twin == head  # the twin has the distilled student's architecture
    test = res.report["test"]
    assert 0 <= test["student_value"] <= 1 and 0 <= test["int8_value"] <= 1 and "baseline_value" in test
    assert res.report["stages"]["qat"]["onnx_ops"]["compute_ops_quantized"] > 0
