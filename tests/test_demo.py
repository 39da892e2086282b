"""`mirage-edge demo --fast`: every stage runs offline, the bench table comes out, and a second run
reuses everything (and says so)."""
from __future__ import annotations

import pytest

from conftest import requires_vnni

from mirage_edge.bench.demo import DemoPlan, run_demo


@pytest.mark.slow
@requires_vnni
def test_fast_demo_end_to_end_and_resume(tmp_path):
    lines: list[str] = []
    res = run_demo(tmp_path / "demo", fast=True, log=lines.append)
    out = res.out
    assert (out / "teacher" / "best" / "config.json").is_file()
    assert (out / "distill" / "student" / "config.json").is_file()
    assert (out / "export" / "student-qat" / "onnx-int8" / "SHA256SUMS").is_file()
    assert (out / "export" / "student-qat" / "openvino-int8" / "SHA256SUMS").is_file()
    for f in ("records.csv", "records.json", "report.md", "pareto.png", "hardware.json"):
        assert (out / "bench" / f).is_file(), f
    rows = {(r.model, r.backend, r.precision): r for r in res.records}
    assert rows[("teacher", "torch", "fp32")].status == "ok"
    qat = rows[("student-qat", "onnxruntime", "int8")]
    assert qat.status == "ok" and qat.latency_median_ms > 0 and qat.dice is not None
    assert qat.metric_retention is not None and qat.teacher_agreement is not None
    assert rows[("mirage-base", "torch", "fp32")].weights == "random"
    assert all(r.status == "ok" for r in res.records), [(r.model, r.error) for r in res.records if r.status != "ok"]
    assert all(f"[{i}/5]" in "\n".join(lines) for i in range(1, 6))
    # the labels-only twin is benchmarked beside the distilled student, and the demo prints the KD gain
    assert rows[("student-labels-only", "torch", "fp32")].dice is not None
    assert any("KD gain" in line and "labels alone" in line for line in lines), lines
    # where the honest comparison with MIRAGE's own INT8 deployment is, when the demo did not time it
    assert any("--suite synthetic" in line and "--input-size 64" in line for line in lines), lines

    again: list[str] = []
    res2 = run_demo(tmp_path / "demo", fast=True, log=again.append)
    reused = [line for line in again if "reusing" in line]
    assert len(reused) == 5, again
    assert [r.latency_median_ms for r in res2.records] == [r.latency_median_ms for r in res.records]


def test_demo_refuses_a_folder_made_with_other_settings(tmp_path):
    from mirage_edge.errors import MirageEdgeError

    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "demo.json").write_text('{"plan": {"image_size": 512}}')
    with pytest.raises(MirageEdgeError, match="other settings"):
        run_demo(tmp_path / "demo", fast=True, log=lambda m: None)


def test_fast_plan_is_small():
    fast, full = DemoPlan.fast(), DemoPlan()
    assert fast.image_size < full.image_size and fast.n_images < full.n_images
    assert "mirage-large" in full.references and full.teacher_epochs > fast.teacher_epochs


def test_kd_gain_line_says_when_the_teacher_is_the_weak_one(tmp_path):
    import json

    from mirage_edge.bench.demo import _kd_gain_line

    test = {"metric": "dice", "teacher_value": 0.71, "student_value": 0.79, "baseline_value": 0.75,
            "kd_gain_points": 4.0, "kd_gain_ci95_points": [1.0, 7.0]}
    (tmp_path / "r.json").write_text(json.dumps({"test": test}))
    line = _kd_gain_line(tmp_path / "r.json")
    assert "KD gain +4.00 pts (95% CI +1.00 .. +7.00)" in line and "not converged" in line
    test.update(teacher_value=0.70, baseline_value=0.72,
                teacher_weaker_than_baseline="the teacher (dice 0.7000) is weaker than ...")
    (tmp_path / "r.json").write_text(json.dumps({"test": test}))
    assert "weaker than" in _kd_gain_line(tmp_path / "r.json")
    assert _kd_gain_line(tmp_path / "missing.json") == ""
