"""Timing you can trust (#19 item 3): parsing benchmark_app, the interleaved timer, rows timed in
rounds and the picks made from them, the fixed-shape artifact call, and an end-to-end cross-check
of a tiny artifact against benchmark_app. No timing is asserted (the test machine is shared):
only structure, and that every number is positive and finite."""
from __future__ import annotations

import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mirage_edge.bench.crosscheck import APP, app_command, find_benchmark_app, parse_benchmark_app
from mirage_edge.bench.record import BenchRecord
from mirage_edge.bench.report import headline, headline_comparison, runner_up
from mirage_edge.bench.timing import combine_rounds, measure_interleaved
from mirage_edge.errors import MirageEdgeError
from test_bench_toys import SIZE, make_onnx_artifact

# the tail of a real `benchmark_app -hint latency` run (OpenVINO 2026.4, one input)
APP_OUTPUT = """\
[Step 8/11] Querying optimal runtime parameters
[ INFO ] Model:
[ INFO ]   NETWORK_NAME: main_graph
[ INFO ]   NUM_STREAMS: 1
[ INFO ]   INFERENCE_NUM_THREADS: 2
[ INFO ]   INFERENCE_PRECISION_HINT: <Type: 'bfloat16'>
[ INFO ]   PERFORMANCE_HINT: LATENCY
[ INFO ]   ENABLE_CPU_PINNING: True
[ INFO ]   SCHEDULING_CORE_TYPE: SchedulingCoreType.ANY_CORE
[Step 11/11] Dumping statistics report
[ INFO ] Execution Devices: CPU
[ INFO ] Count:            885 iterations
[ INFO ] Duration:         5004.45 ms
[ INFO ] Latency:
[ INFO ]    Median:        5.65 ms
[ INFO ]    Average:       5.78 ms
[ INFO ]    Min:           4.52 ms
[ INFO ]    Max:           12.10 ms
[ INFO ] Throughput:   168.55 FPS
"""


def test_benchmark_app_output_is_parsed():
    res = parse_benchmark_app(APP_OUTPUT)
    assert (res.median_ms, res.average_ms, res.min_ms, res.max_ms) == (5.65, 5.78, 4.52, 12.10)
    assert res.throughput_fps == 168.55
    assert res.properties["INFERENCE_NUM_THREADS"] == "2" and res.properties["PERFORMANCE_HINT"] == "LATENCY"
    assert res.properties["INFERENCE_PRECISION_HINT"] == "<Type: 'bfloat16'>"
    assert "NETWORK_NAME" not in res.properties


def test_sub_millisecond_latencies_in_microseconds_are_converted():
    res = parse_benchmark_app("[ INFO ]    Median:        28.62 us\n[ INFO ]    Average:       31.05 us\n")
    assert res.median_ms == pytest.approx(0.02862) and res.average_ms == pytest.approx(0.03105)
    assert res.min_ms is None and res.properties == {}


def test_benchmark_app_failure_is_one_clear_line():
    with pytest.raises(MirageEdgeError, match="no 'Median: ... ms' line.*Exception: model not found") as err:
        parse_benchmark_app("[ ERROR ] something\nException: model not found\n")
    assert "\n" not in str(err.value)


def test_benchmark_app_command_fixes_shape_threads_and_properties(tmp_path):
    cmd = app_command("benchmark_app", tmp_path / "model.xml", {"bscan": [1, 1, 512, 512]}, 2, tmp_path / "c.json")
    assert cmd[cmd.index("-hint") + 1] == "latency" and cmd[cmd.index("-shape") + 1] == "bscan[1,1,512,512]"
    assert cmd[cmd.index("-t") + 1] == "2" and cmd[cmd.index("-load_config") + 1] == str(tmp_path / "c.json")


def test_missing_benchmark_app_names_the_package():
    with pytest.raises(MirageEdgeError, match="pip install openvino"):
        find_benchmark_app("no-such-benchmark-app-here")


def test_interleaved_timer_alternates_and_shares_the_budget():
    order: list[str] = []

    def call(name: str, cost: float):
        def fn():
            order.append(name)
            time.sleep(cost)
        return fn

    stats, samples = measure_interleaved({"a": call("a", 0.002), "b": call("b", 0.001)}, warmup=1, min_iters=4,
                                         max_iters=6, budget_s=0.0)
    assert set(stats) == {"a", "b"} and stats["a"].n == stats["b"].n == 4 == len(samples["a"])
    timed = order[2:]  # after one warm-up cycle
    assert timed[:4] == ["a", "b", "b", "a"]  # the order rotates every cycle
    assert stats["a"].median_ms >= 2.0 and stats["b"].median_ms >= 1.0
    with pytest.raises(ValueError):
        measure_interleaved({})


def test_rounds_combine_to_the_median_of_round_medians():
    c = combine_rounds([6.0, 9.5, 6.2], np.array([0.006, 0.0061, 0.0095, 0.0062, 0.0200]))
    assert c.median_ms == pytest.approx(6.2) and c.best_round_ms == pytest.approx(6.0) and c.rounds == 3
    assert c.max_ms == pytest.approx(20.0) and c.min_ms == pytest.approx(6.0) and c.n == 5
    with pytest.raises(ValueError):
        combine_rounds([], [0.001])


def _row(model: str, backend: str, p50: float, rounds: str, best: float | None = None) -> BenchRecord:
    meds = [float(v) for v in rounds.split()]
    return BenchRecord(model=model, role="student", backend=backend, precision="int8", task="t", task_kind="seg",
                       threads=2, latency_median_ms=p50, latency_min_ms=min(meds) * 0.9, output="mask@4",
                       latency_rounds=len(meds), latency_round_medians=rounds,
                       latency_best_round_ms=min(meds) if best is None else best)


def test_best_row_comes_from_the_rounds_not_one_lucky_sample():
    # ORT had one lucky round (5.0) but is slower in the other two; OpenVINO wins on the median of rounds
    ov = _row("student", "openvino", 6.1, "6.1 6.0 6.3")
    ort = _row("student", "onnxruntime", 7.4, "5.0 7.4 7.6")
    h = headline([ort, ov])["t"]
    assert h["student"] is ov and h["student_artifact"] is ov
    assert h["artifact_runner_up"] is ort and h["artifact_close_call"]  # ORT's 5.0 round beat OpenVINO's rounds
    assert any("too close to call" in line and "onnxruntime" in line for line in headline_comparison(h))


def test_clear_winner_is_not_a_close_call():
    ov = _row("student", "openvino", 6.1, "6.1 6.0 6.3")
    ort = _row("student", "onnxruntime", 9.0, "8.8 9.0 9.4")
    second, close = runner_up([ov, ort], ov)
    assert second is ort and not close
    old = BenchRecord(model="s", backend="onnxruntime", latency_median_ms=6.3)  # a record from before rounds
    assert runner_up([ov, old], ov) == (old, True)  # within 5 % at p50


def test_suite_rows_are_timed_in_rounds_and_artifact_rows_carry_their_parts(tmp_path):
    from mirage_edge.bench.run import run_suite
    from test_bench_run import _suite

    make_onnx_artifact(tmp_path / "export" / "m" / "onnx-fp32")
    suite = _suite(tmp_path, [
        {"label": "teacher", "role": "teacher", "factory": "test_bench_toys:teacher_seg"},
        {"label": "art", "role": "student", "artifacts": ["{root}/export/m/*"],
         "backends": ["onnxruntime", "openvino"]},
    ])
    res = run_suite(suite, tmp_path / "out", rounds=2, progress=lambda _m: None)
    ok = [r for r in res.records if r.ok]
    assert {(r.model, r.backend) for r in ok} == {("teacher", "callable"), ("art", "onnxruntime"), ("art", "openvino")}
    for r in ok:
        meds = [float(v) for v in r.latency_round_medians.split()]
        assert r.latency_rounds == 2 == len(meds), r.label
        assert r.latency_median_ms == pytest.approx(float(np.median(meds)), rel=1e-3)
        assert r.latency_best_round_ms == pytest.approx(min(meds), rel=1e-3)
        assert r.dice is not None  # round 1 still evaluates; later rounds only time
    by = {r.backend: r for r in ok}
    assert by["callable"].latency_engine_ms is None and by["callable"].latency_runtime_ms is None
    assert "reshaped to batch 1" in by["openvino"].timed_call
    assert "session.run" in by["onnxruntime"].timed_call
    for r in (by["openvino"], by["onnxruntime"]):
        assert r.latency_runtime_ms > 0
    assert by["openvino"].latency_engine_ms > 0
    rows = json.loads(res.paths["json"].read_text())
    assert all("_samples" not in row for row in rows)
    assert "| rounds | engine ms | runtime ms |" in res.paths["report"].read_text()


def test_crosscheck_end_to_end_on_a_tiny_artifact(tmp_path):
    app = shutil.which(APP) or shutil.which(str(Path(sys.executable).with_name(APP)))
    if app is None:
        pytest.skip(f"{APP} (openvino pip package) is not installed")
    from mirage_edge.bench.crosscheck import crosscheck, write_record

    art = make_onnx_artifact(tmp_path / "export" / "m" / "onnx-fp32")
    res = crosscheck(art, threads=1, rounds=2, seconds=1, app=app)
    assert res.input == f"{SIZE}x{SIZE}" and res.rounds == len(res.per_round) == 2
    assert [r["first"] for r in res.per_round] == ["bench", APP]
    for r in res.per_round:
        for key in ("bench_row_ms", "bench_engine_ms", "bench_runtime_ms", "app_median_ms", "ratio_row"):
            assert math.isfinite(r[key]) and r[key] > 0, key
    assert res.app_properties.get("INFERENCE_NUM_THREADS") == "1"
    assert res.openvino_properties["INFERENCE_NUM_THREADS"] == "1"
    assert isinstance(res.summary["agree"], bool) and res.summary["ratio_row"] > 0
    out = write_record(res, tmp_path / "cc" / "record.json")
    data = json.loads(out.read_text())
    assert data["kind"] == "crosscheck" and len(data["per_round"]) == 2
    assert any(line.startswith("median over rounds") for line in res.lines())


def test_crosscheck_cli_rejects_a_missing_folder_in_one_line(tmp_path):
    from click.testing import CliRunner

    from mirage_edge.cli import cli

    result = CliRunner().invoke(cli, ["bench", "crosscheck", str(tmp_path / "nothing")])
    assert result.exit_code != 0 and "artifact folder not found" in result.output
