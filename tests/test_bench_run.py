"""End-to-end bench runs over toy runners and hand-built artifacts: records, ratios, accuracy
through the artifact, teacher agreement, the report and plot, and failures as rows."""
from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest

from mirage_edge.bench.record import read_records
from mirage_edge.bench.run import run_suite
from mirage_edge.bench.suite import BenchSuite
from mirage_edge.config import from_dict
from test_bench_toys import SIZE, make_onnx_artifact, make_seg_set

FAST = {"threads": [1], "batch_sizes": [1], "input_sizes": [SIZE], "warmup": 1, "min_warmup_s": 0.0,
        "min_iters": 5, "max_iters": 20, "budget_s": 0.05}


def _suite(tmp_path, models, tasks=None, isolate=False, **timing):
    data = make_seg_set(tmp_path / "seg")
    tasks = tasks or [{"name": "blocks", "kind": "seg", "path": str(data)}]
    return from_dict(BenchSuite, {"name": "toy", "root": str(tmp_path), "tasks": tasks, "models": models,
                                  "timing": {**FAST, "isolate": isolate, **timing}})


def _by_model(records):
    return {r.model: r for r in records}


def _dice(a, b):
    a, b = np.concatenate([x.ravel() for x in a]) == 1, np.concatenate([x.ravel() for x in b]) == 1
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def test_suite_rows_ratios_agreement_and_report(tmp_path):
    art = make_onnx_artifact(tmp_path / "export" / "teacher-onnx-fp32")
    suite = _suite(tmp_path, [
        {"label": "teacher", "role": "teacher", "factory": "test_bench_toys:teacher_seg",
         "artifacts": ["{root}/export/teacher-*"]},
        {"label": "student", "role": "student", "factory": "test_bench_toys:student_seg"},
        {"label": "broken", "factory": "test_bench_toys:broken_seg"},
    ])
    res = run_suite(suite, tmp_path / "out", progress=lambda m: None)
    recs = res.records
    teacher = next(r for r in recs if r.model == "teacher" and r.backend == "callable")
    onnx_row = next(r for r in recs if r.model == "teacher" and r.backend == "onnxruntime")
    student = _by_model(recs)["student"]
    broken = _by_model(recs)["broken"]

    assert teacher.status == onnx_row.status == student.status == "ok", [r.error for r in recs]
    assert teacher.latency_median_ms >= 4.0  # the toy sleeps 4 ms per call
    assert student.latency_median_ms >= 1.0
    assert teacher.latency_n >= 5 and teacher.throughput_ips == pytest.approx(1000 / teacher.latency_median_ms)
    assert teacher.peak_rss_mb > 0 and onnx_row.file_size_mb > 0 and onnx_row.load_time_s > 0
    # the ONNX artifact computes the same function as the toy teacher: identical masks and metrics
    assert onnx_row.teacher_agreement == pytest.approx(1.0)
    assert onnx_row.dice == pytest.approx(teacher.dice) and onnx_row.metric_retention == pytest.approx(1.0)
    assert onnx_row.eval_n == 6 and onnx_row.eval_input == f"{SIZE}x{SIZE}"
    # the student misses the half-bright strips: lower Dice, retention and agreement below 1
    assert teacher.dice > student.dice > 0
    assert student.metric_retention == pytest.approx(student.dice / teacher.dice)
    from mirage_edge.bench.accuracy import load_preds

    preds = sorted((tmp_path / "out" / "work").glob("preds_*.npz"))
    by_name = {p.name: load_preds(p, "seg") for p in preds}
    t_pred = next(v for k, v in by_name.items() if k.startswith("preds_000"))
    s_pred = next(v for k, v in by_name.items() if "student" in k)
    assert student.teacher_agreement == pytest.approx(_dice(s_pred, t_pred))
    assert 0 < student.teacher_agreement < 1
    # a failure is a row
    assert broken.status == "error" and broken.stage == "load" and "weights are unreadable" in broken.error

    # records on disk == records in memory; report numbers come from them
    on_disk = read_records(res.paths["csv"])
    assert [r.model for r in on_disk] == [r.model for r in recs]
    assert json.loads(res.paths["json"].read_text())[0]["latency_median_ms"] == recs[0].latency_median_ms
    report = res.paths["report"].read_text()
    ratio = student.latency_median_ms / teacher.latency_median_ms
    assert f"{ratio:.3f} ({1 / ratio:.1f}x)" in report
    assert "1.000 (1.0x)" in report  # the teacher against itself
    assert "weights are unreadable" in report and "## Machine" in report
    png = res.paths["plot"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    with open(res.paths["csv"], newline="") as fh:
        assert len(list(csv.DictReader(fh))) == len(recs)


def test_isolated_worker_crash_and_corrupted_artifact_are_rows(tmp_path):
    make_onnx_artifact(tmp_path / "export" / "good")
    make_onnx_artifact(tmp_path / "export" / "corrupt", corrupt=True)
    suite = _suite(tmp_path, [
        {"label": "teacher", "role": "teacher", "factory": "test_bench_toys:teacher_seg"},
        {"label": "crasher", "factory": "test_bench_toys:crashing_seg"},
        {"label": "good", "artifacts": ["{root}/export/good"]},
        {"label": "corrupt", "artifacts": ["{root}/export/corrupt"]},
    ], isolate=True)
    recs = _by_model(run_suite(suite, tmp_path / "out", progress=lambda m: None).records)
    assert recs["teacher"].status == "ok" and recs["good"].status == "ok"
    assert recs["good"].teacher_agreement == pytest.approx(1.0)
    assert recs["crasher"].status == "error" and recs["crasher"].stage == "worker"
    assert "SIGABRT" in recs["crasher"].error
    assert recs["corrupt"].status == "error" and recs["corrupt"].stage == "load"
    assert "checksum mismatch" in recs["corrupt"].error and "model.onnx" in recs["corrupt"].error
    assert recs["good"].rss_method.startswith("VmHWM of a fresh worker")


def test_missing_backend_missing_artifact_and_missing_dataset(tmp_path):
    from mirage_edge.artifact import ArtifactMeta, TensorSpec, write_meta, write_sha256sums
    from mirage_edge.data.preprocess import PreprocessSpec

    trt = tmp_path / "export" / "student-trt"
    trt.mkdir(parents=True)
    (trt / "model.engine").write_bytes(b"not really an engine")
    write_meta(trt, ArtifactMeta(task="segmentation", format="tensorrt", precision="int8", files=["model.engine"],
                                 inputs=[TensorSpec("image", [1, 1, SIZE, SIZE])],
                                 outputs=[TensorSpec("logits", [1, 2, SIZE, SIZE], kind="logits")],
                                 classes=["Background", "Fluid"],
                                 preprocessing={"image": PreprocessSpec(size=(SIZE, SIZE)).to_dict()}))
    write_sha256sums(trt)
    data = make_seg_set(tmp_path / "seg")
    suite = _suite(tmp_path, [
        {"label": "teacher", "role": "teacher", "factory": "test_bench_toys:teacher_seg"},
        {"label": "trt", "artifacts": ["{root}/export/student-trt"], "tasks": ["blocks"]},
        {"label": "ghost", "artifacts": ["{root}/export/nothing-*"], "tasks": ["blocks"]},
    ], tasks=[{"name": "blocks", "kind": "seg", "path": str(data)},
              {"name": "absent", "kind": "seg", "path": str(tmp_path / "no-such-dataset")}])
    recs = run_suite(suite, tmp_path / "out", progress=lambda m: None).records
    rows = {(r.model, r.task): r for r in recs}
    assert rows[("teacher", "blocks")].status == "ok"
    trt_row = rows[("trt", "blocks")]
    assert trt_row.status == "error" and trt_row.stage == "load"
    assert re.search(r"tensorrt", trt_row.error, re.I)
    assert rows[("ghost", "blocks")].status == "error" and "no artifact folder matches" in rows[("ghost", "blocks")].error
    skipped = rows[("-", "absent")]
    assert skipped.status == "skipped" and "dataset folder not found" in skipped.error
    assert ("teacher", "absent") not in rows  # a trained model is not run against a task that is not there


def test_an_onnx_artifact_runs_on_each_listed_runtime_and_filters_apply(tmp_path):
    make_onnx_artifact(tmp_path / "export" / "m" / "onnx-fp32")
    suite = _suite(tmp_path, [
        {"label": "teacher", "role": "teacher", "factory": "test_bench_toys:teacher_seg"},
        {"label": "both", "artifacts": ["{root}/export/m/*"], "backends": ["onnxruntime", "openvino"]},
        {"label": "auto", "artifacts": ["{root}/export/m/*"]},
        {"label": "student", "role": "student", "factory": "test_bench_toys:student_seg"},
    ])
    recs = run_suite(suite, tmp_path / "out", progress=lambda m: None).records
    both = sorted(r.backend for r in recs if r.model == "both")
    assert both == ["onnxruntime", "openvino"]
    assert all(r.status == "ok" and r.teacher_agreement == pytest.approx(1.0) for r in recs if r.model == "both")

    # --backend openvino: the ONNX artifact of "auto" runs on OpenVINO, the callable student is dropped,
    # the teacher stays (it anchors the ratios); --precision int8 would drop fp32 rows but not the teacher
    recs = run_suite(suite, tmp_path / "out2", backends=["openvino"], progress=lambda m: None).records
    assert {(r.model, r.backend) for r in recs} == {("teacher", "callable"), ("both", "openvino"),
                                                   ("auto", "openvino")}
    recs = run_suite(suite, tmp_path / "out3", precisions=["int8"], progress=lambda m: None).records
    assert {r.model for r in recs} == {"teacher", "student"}


def test_encoders_give_latency_only_rows(tmp_path):
    """An exported or saved encoder (features, no task head) cannot be scored on a task: its rows keep
    their latency with status ok and say why there is no metric, instead of an evaluation error."""
    from mirage_edge.models import create_model, save_model

    make_onnx_artifact(tmp_path / "export" / "enc" / "onnx-fp32", task="encoder")
    save_model(create_model("student-tiny", img_size=SIZE), tmp_path / "enc_ckpt")
    suite = _suite(tmp_path, [
        {"label": "teacher", "role": "teacher", "factory": "test_bench_toys:teacher_seg"},
        {"label": "enc", "artifacts": ["{root}/export/enc/*"]},
        {"label": "enc_ckpt", "checkpoint": "{root}/enc_ckpt"},
    ])
    recs = _by_model(run_suite(suite, tmp_path / "out", progress=lambda m: None).records)
    for label in ("enc", "enc_ckpt"):
        rec = recs[label]
        assert rec.status == "ok" and rec.latency_median_ms > 0, (label, rec.error)
        assert rec.primary_value is None and "encoder features (no task head): latency only" in rec.notes


def test_an_artifact_dynamic_in_h_and_w_is_timed_at_the_suite_size(tmp_path):
    """A fixed-size artifact is skipped at another size; one exported with dynamic H/W is timed there (the
    Duke student trained at 256 x 384 is timed at the reference's 512 x 512 from the file it ships in)
    and still evaluated at its own preprocessing size."""
    make_onnx_artifact(tmp_path / "export" / "fixed" / "onnx-fp32")
    make_onnx_artifact(tmp_path / "export" / "dyn" / "onnx-fp32", dynamic_hw=True)
    suite = _suite(tmp_path, [
        {"label": "teacher", "role": "teacher", "factory": "test_bench_toys:teacher_seg"},
        {"label": "fixed", "role": "student", "artifacts": ["{root}/export/fixed/*"]},
        {"label": "dyn", "role": "student", "artifacts": ["{root}/export/dyn/*"]},
    ], input_sizes=[2 * SIZE])
    records = run_suite(suite, tmp_path / "out", progress=lambda m: None).records
    recs = {r.model: r for r in records if r.backend == "onnxruntime"}
    assert recs["fixed"].status == "skipped" and f"height {SIZE}" in recs["fixed"].error
    dyn = recs["dyn"]
    assert dyn.status == "ok", dyn.error
    assert (dyn.input_h, dyn.input_w) == (2 * SIZE, 2 * SIZE) and dyn.latency_median_ms > 0
    teacher = next(r for r in records if r.model == "teacher")
    assert dyn.eval_input == f"{SIZE}x{SIZE}" and dyn.eval_n > 0
    assert dyn.primary_value == pytest.approx(teacher.primary_value)  # the toy artifact is the teacher's function
