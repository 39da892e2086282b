"""Never a random teacher by accident (issue #22 item 3): a registered teacher name loads its official
weights or fails saying where to put them; random weights only when asked for, and the report says so."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

pytest.importorskip("torch")

from mirage_edge.cli import cli  # noqa: E402

FAST = ["stage1.epochs=1", "stage1.batch_size=4", "data.image_size=64", "run.progress=false"]


@pytest.fixture(scope="module")
def layers(tmp_path_factory):
    from mirage_edge.data.synth import synthesize

    return synthesize(tmp_path_factory.mktemp("teacher") / "layers", "layers", 8, seed=0, size=64)


def _distill(tmp_path, layers, *args):
    out = tmp_path / "run"
    res = CliRunner().invoke(cli, ["distill", "--recipe", "layers-tiny", "--data", str(layers), "--out", str(out),
                                   "--student", "student-tiny", "--task", "none", "--no-qat", *args, *FAST,
                                   f"cache.dir={json.dumps(str(tmp_path / 'c'))}"])
    return res, out


def test_official_name_without_weights_fails_saying_where_to_put_them(tmp_path, layers, monkeypatch):
    monkeypatch.setenv("MIRAGE_EDGE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MIRAGE_EDGE_OFFLINE", "1")
    res, out = _distill(tmp_path, layers, "--teacher", "mirage-large")
    assert res.exit_code != 0 and "put the weights at" in res.output and "Traceback" not in res.output
    assert not out.exists()  # nothing half-made blocks a rerun


def test_a_name_without_released_weights_needs_the_flag(tmp_path, layers):
    res, out = _distill(tmp_path, layers, "--teacher", "mirage-tiny")
    assert res.exit_code != 0 and "--random-teacher" in res.output and not out.exists()


def test_random_teacher_on_purpose_is_said_in_the_report(tmp_path, layers):
    res, out = _distill(tmp_path, layers, "--teacher", "mirage-tiny", "--random-teacher")
    assert res.exit_code == 0, res.output
    assert "RANDOM WEIGHTS" in res.output
    report = json.loads((out / "report.json").read_text())
    assert report["teacher"]["random_weights"] is True


def test_a_student_name_is_not_a_teacher(tmp_path, layers):
    res, out = _distill(tmp_path, layers, "--teacher", "resnet18")
    assert res.exit_code != 0 and "student architecture, not a MIRAGE teacher" in res.output and not out.exists()
