"""The committed suites: strict loading, the real Duke DME fluid data through an artifact, RetinaBench
with missing datasets listed as skipped, and the `mirage-edge bench` command line."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from conftest import ROOT
from mirage_edge.bench.record import read_records
from mirage_edge.bench.report import headline
from mirage_edge.bench.run import bench
from mirage_edge.bench.suite import load_suite, plan_forms
from mirage_edge.cli import cli
from mirage_edge.errors import ConfigError
from test_bench_toys import SIZE, make_onnx_artifact

SUITES = ROOT / "benchmarks" / "suites"
FAST = [f"timing.input_sizes=[{SIZE}]", "timing.threads=[1]", "timing.budget_s=0.05", "timing.min_iters=3",
        "timing.warmup=1", "timing.min_warmup_s=0.0"]


@pytest.mark.parametrize("name", ["synthetic", "duke-dme-fluid", "retinabench"])
def test_committed_suites_load(name):
    suite = load_suite(SUITES / f"{name}.toml")
    assert suite.name == name and suite.tasks and suite.models
    roles = {m.role for m in suite.models}
    assert "teacher" in roles and "reference" in roles
    assert {m.registry for m in suite.models if m.role == "reference"} == {"mirage-base", "mirage-large"}
    assert plan_forms(suite)


def test_retinabench_lists_every_public_task():
    suite = load_suite(SUITES / "retinabench.toml")
    names = {t.name for t in suite.tasks}
    assert {"OCTDL", "Kermany", "OCTID", "GAMMA", "OLIVES", "Noor_Eye_Hospital", "Duke_iAMD",
            "Harvard_Glaucoma"} <= names
    assert {"AROI", "Duke_DME", "GOALS", "RETOUCH"} <= names
    assert {t.kind for t in suite.tasks} == {"cls", "seg"}


def test_suite_is_strict(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text((SUITES / "synthetic.toml").read_text().replace("budget_s = 2.0", "budget = 2.0"))
    with pytest.raises(ConfigError, match=r"budget.*bad\.toml|bad\.toml.*budget"):
        load_suite(bad)
    wrong = tmp_path / "wrong.toml"
    wrong.write_text((SUITES / "synthetic.toml").read_text().replace('kind = "seg"', 'kind = "detection"'))
    with pytest.raises(ConfigError, match="kind"):
        load_suite(wrong)


def test_duke_dme_fluid_real_data_through_an_artifact(tmp_path, real_data):
    make_onnx_artifact(tmp_path / "runs" / "export" / "teacher" / "onnx-fp32")
    res = bench(SUITES / "duke-dme-fluid.toml", tmp_path / "out", models=["teacher"], isolate=False,
                overrides=[*FAST, f'data="{real_data}"', f'root="{tmp_path / "runs"}"'], progress=lambda m: None)
    rows = {r.backend or r.source: r for r in res.records}
    art = rows["onnxruntime"]
    assert art.status == "ok", art.error
    assert art.eval_n == 22  # test split: subjects 9-10, 11 annotated B-scans each
    assert art.dice is not None and 0.0 <= art.dice <= 1.0 and art.iou <= art.dice + 1e-9
    missing = next(r for r in res.records if r.status != "ok")
    assert missing.model == "teacher" and missing.stage == "load" and "checkpoint folder not found" in missing.error
    assert {r.model for r in res.records} == {"teacher"}  # --model filter dropped the others


def test_retinabench_missing_datasets_are_skipped_rows(tmp_path, real_data):
    data = tmp_path / "benchmark"
    data.mkdir()
    (data / "Duke_DME").symlink_to(real_data / "Duke_DME_fluid", target_is_directory=True)
    make_onnx_artifact(tmp_path / "runs" / "Duke_DME" / "export" / "teacher" / "onnx-fp32")
    res = bench(SUITES / "retinabench.toml", tmp_path / "out", models=["teacher"], isolate=False,
                overrides=[*FAST, f'data="{data}"', f'root="{tmp_path / "runs"}"'], progress=lambda m: None)
    skipped = {r.task for r in res.records if r.status == "skipped"}
    assert len(skipped) == 11 and "Duke_DME" not in skipped
    assert all("dataset folder not found" in r.error for r in res.records if r.status == "skipped")
    duke = [r for r in res.records if r.task == "Duke_DME" and r.status == "ok"]
    assert len(duke) == 1 and duke[0].eval_n == 22
    report = res.paths["report"].read_text()
    assert "OCTDL" in report and "dataset folder not found" in report


def test_bench_cli(tmp_path):
    make_onnx_artifact(tmp_path / "a" / "onnx-fp32", teacher="mirage-tiny")
    make_onnx_artifact(tmp_path / "b", corrupt=True)
    from test_bench_toys import make_seg_set

    make_seg_set(tmp_path / "data" / "layers")
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, [
        "bench", "--suite", "synthetic", "--root", str(tmp_path / "nothing"), "--data", str(tmp_path / "data"),
        "--model", "teacher", "--artifact", str(tmp_path / "a" / "onnx-fp32"), "--artifact", str(tmp_path / "b"),
        "--input-size", str(SIZE), "--threads", "1", "--budget", "0.05", "--min-iters", "3", "--no-isolate",
        "--set", "timing.warmup=1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    recs = read_records(out / "records.csv")
    by = {r.model: r for r in recs if r.model in ("a/onnx-fp32", f"{tmp_path.name}/b")}
    assert by["a/onnx-fp32"].status == "ok" and by["a/onnx-fp32"].dice is not None
    # its metadata names a teacher: a distilled student, so the headline's student artifact
    assert by["a/onnx-fp32"].role == "student" and by[f"{tmp_path.name}/b"].role == "candidate"
    assert headline(recs)["layers"]["student_artifact"].model == "a/onnx-fp32"
    assert by[f"{tmp_path.name}/b"].status == "error" and "checksum mismatch" in by[f"{tmp_path.name}/b"].error
    assert any(r.model == "teacher" and r.status == "error" for r in recs)  # no demo output under --root
    assert "report:" in result.output and (out / "report.md").is_file()


def test_bench_cli_bad_suite_is_a_clean_error():
    result = CliRunner().invoke(cli, ["bench", "--suite", "no-such-suite"])
    assert result.exit_code == 2
    assert "unknown suite 'no-such-suite'" in result.output and "synthetic" in result.output


def test_artifact_bench_is_torch_free(tmp_path):
    """A device with only a runtime installed can bench artifacts (PyTorch rows would be error rows)."""
    from conftest import run_without_torch

    make_onnx_artifact(tmp_path / "export" / "student" / "onnx-fp32")
    proc = run_without_torch(f"""
        import sys
        sys.path.insert(0, {str(ROOT / "tests")!r})
        from test_bench_toys import make_seg_set
        from mirage_edge.bench.run import bench
        make_seg_set(__import__("pathlib").Path({str(tmp_path / "data" / "layers")!r}))
        res = bench("synthetic", {str(tmp_path / "out")!r}, isolate=False, models=["student"],
                    overrides={FAST!r} + ['root="{tmp_path}"', 'data="{tmp_path / "data"}"'],
                    progress=lambda m: None)
        rows = {{(r.model, r.backend): r for r in res.records}}
        assert rows[("student", "onnxruntime")].status == "ok", rows
        assert rows[("student", "onnxruntime")].dice is not None
        assert rows[("teacher", "torch")].status == "error" and "torch" in rows[("teacher", "torch")].error
        assert "torch" not in sys.modules
        print("OK")
        """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK" in proc.stdout


def test_an_optional_row_without_artifacts_is_left_out(tmp_path):
    """duke-dme-fluid's student-fast row is optional: an empty root gives no row for it, while the
    required student-qat row still says which folder it did not find."""
    import dataclasses

    suite = dataclasses.replace(load_suite(SUITES / "duke-dme-fluid.toml"), root=str(tmp_path))
    forms = plan_forms(suite)
    assert not [f for f in forms if f.model.label == "student-fast"]
    (qat,) = [f for f in forms if f.model.label == "student-qat"]
    assert qat.problem == f"no artifact folder matches {tmp_path}/export/student-qat/*"
    (tmp_path / "export" / "student-fast" / "openvino-int8").mkdir(parents=True)
    assert [f.source for f in plan_forms(suite) if f.model.label == "student-fast"] == [
        str(tmp_path / "export" / "student-fast" / "openvino-int8")]


def test_adhoc_roles(tmp_path):
    """--checkpoint / --artifact folders take their role from what their metadata says they are."""
    from mirage_edge.bench.run import adhoc_role

    assert adhoc_role(make_onnx_artifact(tmp_path / "s" / "onnx-fp32", teacher="t"), artifact=True) == "student"
    assert adhoc_role(make_onnx_artifact(tmp_path / "c" / "onnx-fp32"), artifact=True) == "candidate"
    assert adhoc_role(tmp_path / "missing", artifact=True) == "candidate"
    for name, meta, role in [("student", {"teacher": {"name": "t"}}, "student"),
                             ("baseline", {"teacher": None, "labels_only": True}, "baseline"),
                             ("teacher", {"model_name": "mirage-tiny"}, "candidate")]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"meta": meta}))
        assert adhoc_role(tmp_path / name) == role, name
    (tmp_path / "qat" / "fp32").mkdir(parents=True)  # a QAT student: its meta is its fp32/ twin's
    (tmp_path / "qat" / "qat.json").write_text("{}")
    (tmp_path / "qat" / "fp32" / "config.json").write_text(json.dumps({"meta": {"teacher": "t"}}))
    assert adhoc_role(tmp_path / "qat") == "student"
    (tmp_path / "run" / "best").mkdir(parents=True)  # a run folder: its best/, as the loader resolves it
    (tmp_path / "run" / "best" / "config.json").write_text(json.dumps({"meta": {"labels_only": True}}))
    assert adhoc_role(tmp_path / "run") == "baseline"
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    assert adhoc_role(tmp_path / "bad") == "candidate"
