"""Report arithmetic: Pareto front, teacher ratios keyed on the same conditions, headline selection."""
from __future__ import annotations

import pytest

from mirage_edge.bench.hardware import HardwareInfo
from mirage_edge.bench.record import BenchRecord
from mirage_edge.bench.report import headline, latency_ratio, pareto_front, render_markdown, teacher_rows


def _r(model, role, backend, precision, ms, dice=None, retention=None, batch=1, threads=2, task="t", **kw):
    return BenchRecord(model=model, role=role, backend=backend, precision=precision, latency_median_ms=ms,
                       dice=dice, primary_metric="dice" if dice is not None else "", primary_value=dice,
                       metric_retention=retention, batch=batch, threads=threads, task=task, task_kind="seg",
                       input_h=512, input_w=512, **kw)


def test_pareto_front():
    pts = [(1.0, 0.5), (2.0, 0.9), (3.0, 0.8), (0.5, 0.4), (2.5, 0.95), (2.0, 0.7)]
    assert pareto_front(pts) == [(0.5, 0.4), (1.0, 0.5), (2.0, 0.9), (2.5, 0.95)]


def test_ratios_use_the_teacher_row_of_the_same_conditions():
    t1 = _r("teacher", "teacher", "torch", "fp32", 100.0, 0.8, batch=1)
    t8 = _r("teacher", "teacher", "torch", "fp32", 600.0, 0.8, batch=8)
    s1 = _r("student", "student", "openvino", "int8", 2.0, 0.79, batch=1)
    s8 = _r("student", "student", "openvino", "int8", 12.0, 0.79, batch=8)
    other = _r("student", "student", "openvino", "int8", 1.0, 0.79, threads=1)
    teachers = teacher_rows([t1, t8, s1, s8, other])
    assert latency_ratio(s1, teachers) == pytest.approx(0.02)
    assert latency_ratio(s8, teachers) == pytest.approx(0.02)
    assert latency_ratio(other, teachers) is None  # no teacher row at 1 thread


def test_headline_picks_fastest_int8_student_keeping_97_percent():
    rows = [_r("teacher", "teacher", "torch", "fp32", 50.0, 0.80),
            _r("teacher", "teacher", "openvino", "int8", 20.0, 0.80),
            _r("mirage-base", "reference", "torch", "fp32", 300.0, weights="random"),
            _r("mirage-large", "reference", "torch", "fp32", 900.0, weights="random"),
            _r("fast-bad", "student", "onnxruntime", "int8", 1.0, 0.70, retention=0.875),
            _r("good", "student", "openvino", "int8", 2.0, 0.79, retention=0.9875),
            _r("good", "student", "torch", "fp32", 10.0, 0.79, retention=0.9875)]
    h = headline(rows)["t"]
    assert h["student"].model == "good" and h["teacher_exported"].backend == "openvino"
    md = render_markdown(rows, HardwareInfo(cpu_model="X", threads=2))
    assert "**150.0x faster** than `mirage-base`" in md and "**450.0x faster** than `mirage-large`" in md
    assert "keeps **98.8%**" in md
