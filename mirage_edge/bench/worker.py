"""Benchmark one model form: load, time every (threads, batch, input size), evaluate, write records.

Runs in-process (`run_form`) or, by default, in a fresh process per form
(`python -m mirage_edge.bench.worker SPEC.json OUT.json`): a crash or hang in one runtime (a
corrupted file can segfault a native library) then becomes an error row instead of ending the
run, and each row's peak RSS is that of a process which loaded only this model.

Each row times the calls of `runners.timed_calls` interleaved call by call: the row's own call
(artifacts: the engine on a fixed-shape model, input copied in, output copied out) and, beside it,
the engine alone and the runtime's `Predictor.run`. A spec with `timing_only` (a later round of
`run.run_suite`, or `crosscheck`) only loads and times: no FLOP count, no evaluation.

Peak RSS = the process's VmHWM after loading and timing (interpreter + libraries + model +
activations), read before accuracy evaluation; in-process runs reset VmHWM before each load
(`/proc/self/clear_refs`), so there it also includes whatever the parent process already held.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from mirage_edge.bench import timing as _timing
from mirage_edge.bench.record import PRIMARY_METRIC, BenchRecord
from mirage_edge.bench.runners import NotApplicable
from mirage_edge.errors import MirageEdgeError

RSS_ISOLATED = "VmHWM of a fresh worker process after load+timing (before eval)"
RSS_IN_PROCESS = "VmHWM reset before load, read after timing, in the shared bench process"


def _error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) < 600 else text[:600] + "..."


def make_runner(form: dict[str, Any]) -> Any:
    """The Runner for a planned form (see `suite.Form`), without loading it yet."""
    from mirage_edge.bench import runners

    kind, source = form["kind"], form["source"]
    task = form.get("task") or {}
    if kind == "factory":
        runner = runners.load_factory(source)()
        if not isinstance(runner, runners.Runner):
            raise MirageEdgeError(f"factory {source!r} returned {type(runner).__name__}, not a Runner")
        return runner
    if kind == "torch":
        from mirage_edge.bench.loaders import torch_runner

        return torch_runner(source, task_kind=task.get("kind", ""), num_classes=form.get("num_classes"),
                            input_size=form.get("input_size"), device=form.get("device", "cpu"),
                            head=form.get("head") or None)
    if kind == "artifact":
        from mirage_edge.bench.loaders import artifact_runner

        return artifact_runner(source, backend=form.get("backend") or "auto", device=form.get("device", "cpu"),
                               allowed=form.get("allowed_backends"))
    raise MirageEdgeError(f"unknown form kind {kind!r}")


def run_form(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Benchmark one form. `spec` keys: form, timing, base (record fields shared by the run),
    eval_batch, preds_path, isolated, allowed_backends, timing_only. Returns BenchRecord dicts, each
    with the row's timed calls in seconds under the extra key `_samples` (pooled over rounds by the
    caller, never serialised into records); never raises for a model's own failure (that becomes a
    row with `status="error"` and the failing `stage`)."""
    form, tm, base = spec["form"], spec["timing"], dict(spec.get("base", {}))
    task = form.get("task") or None
    base.update(model=form["model"], role=form["role"], source=form["source"], backend=form.get("backend", ""),
                task=task["name"] if task else "", task_kind=task["kind"] if task else "",
                device=tm.get("device", "cpu"),
                rss_method=RSS_ISOLATED if spec.get("isolated") else RSS_IN_PROCESS)

    def error_row(stage: str, exc: BaseException | str, **fields: Any) -> dict[str, Any]:
        rec = BenchRecord(**{**base, **fields})
        rec.status, rec.stage = "error", stage
        rec.error = exc if isinstance(exc, str) else _error_text(exc)
        return dataclasses.asdict(rec)

    if form.get("problem"):
        return [error_row("plan", form["problem"], threads=tm["threads"][0])]
    try:
        runner = make_runner({**form, "allowed_backends": spec.get("allowed_backends")})
    except NotApplicable:
        return []  # e.g. an OpenVINO IR when only onnxruntime was asked for
    except Exception as exc:  # noqa: BLE001 - every failure must become a row
        return [error_row("load", exc, threads=tm["threads"][0])]
    base.update(backend=runner.backend, precision=runner.precision, weights=runner.weights, device=runner.device,
                quantized_share=runner.quantized_share, output=runner.output, base_model=runner.base_model,
                notes="; ".join(n for n in (base.get("notes", ""), runner.notes, form.get("note", "")) if n))
    allowed, precisions = spec.get("allowed_backends"), spec.get("allowed_precisions")
    if (allowed is not None and runner.backend not in allowed) or (precisions and runner.precision not in precisions):
        return []  # filtered out by --backend/--precision or the model's backends, now that they are known
    if runner.task_kind not in ("", "encoder") and task and runner.task_kind != task["kind"]:
        return [error_row("plan", f"model is a {runner.task_kind} model but task {task['name']!r} is {task['kind']}",
                          threads=tm["threads"][0])]

    records: list[BenchRecord] = []
    samples: dict[int, list[float]] = {}  # id(record) -> the row's timed calls (s)
    timing_only = bool(spec.get("timing_only"))
    flops: dict[int, float | None] = {}  # per input size, counted once per form
    for threads in tm["threads"]:
        _timing.reset_peak_rss()
        t0 = time.perf_counter()
        try:
            runner.load(threads)
        except Exception as exc:  # noqa: BLE001
            records.append(BenchRecord(**error_row("load", exc, threads=threads)))
            continue
        load_s = time.perf_counter() - t0
        fixed_b, fixed_h, fixed_w = runner.fixed_input()
        rows: list[BenchRecord] = []
        for size in tm["input_sizes"]:
            for batch in tm["batch_sizes"]:
                rec = BenchRecord(**{**base, "threads": threads, "batch": batch, "input_h": size, "input_w": size,
                                     "load_time_s": load_s})
                rows.append(rec)
                mismatch = [f"{n} {v}" for n, v, want in (("batch", fixed_b, batch), ("height", fixed_h, size),
                                                         ("width", fixed_w, size)) if v is not None and v != want]
                if mismatch:
                    rec.status, rec.stage = "skipped", "latency"
                    rec.error = f"model input is fixed to {', '.join(mismatch)}"
                    continue
                try:
                    runner.set_input_size(size, size)
                except Exception as exc:  # noqa: BLE001
                    rec.status, rec.stage, rec.error = "error", "latency", _error_text(exc)
                    continue
                samples[id(rec)] = _time_row(runner, rec, tm, batch, size, threads)
        if timing_only:
            records.extend(rows)
            continue
        try:
            size_mb, params = runner.file_size_mb(), runner.params_m()
            for s in tm["input_sizes"]:
                if s not in flops:
                    runner.set_input_size(s, s)
                    flops[s] = runner.gflops(s, s)
        except Exception:  # noqa: BLE001 - descriptive numbers must not fail a row
            size_mb, params = None, None
        for rec in rows:
            rec.file_size_mb, rec.params_m, rec.gflops = size_mb, params, flops.get(rec.input_h)
        records.extend(rows)
    if not timing_only:
        _evaluate(runner, task, spec, records)
    runner.close()
    return [{**dataclasses.asdict(r), "_samples": samples.get(id(r), [])} for r in records]


def _time_row(runner: Any, rec: BenchRecord, tm: dict[str, Any], batch: int, size: int,
              threads: int) -> list[float]:
    """Time one row (see `runners.timed_calls`); returns the row call's samples in seconds."""
    from mirage_edge.bench.hardware import PowerSampler
    from mirage_edge.bench.runners import make_input, timed_calls

    x = make_input(batch, size, size)
    try:
        calls = timed_calls(runner, x, threads)
        with PowerSampler() as power:
            stats, samples = _timing.measure_interleaved(calls.fns(), warmup=tm["warmup"], min_iters=tm["min_iters"],
                                                         max_iters=tm["max_iters"], budget_s=tm["budget_s"],
                                                         min_warmup_s=tm["min_warmup_s"])
        what = calls.what
        del calls  # a fixed-shape copy of an artifact's model is released before the next row
    except Exception as exc:  # noqa: BLE001
        rec.status, rec.stage, rec.error = "error", "latency", _error_text(exc)
        return []
    row = stats["row"]
    rec.latency_median_ms, rec.latency_p90_ms, rec.latency_p99_ms = row.median_ms, row.p90_ms, row.p99_ms
    rec.latency_max_ms, rec.latency_mean_ms, rec.latency_min_ms = row.max_ms, row.mean_ms, row.min_ms
    rec.latency_n, rec.latency_rounds = row.n, 1
    rec.latency_round_medians, rec.latency_best_round_ms = f"{row.median_ms:.4g}", row.median_ms
    rec.throughput_ips = batch * 1000.0 / row.median_ms if row.median_ms > 0 else None
    rec.latency_engine_ms = stats["engine"].median_ms if "engine" in stats else None
    rec.latency_runtime_ms = stats["runtime"].median_ms if "runtime" in stats else None
    rec.timed_call = what
    rec.peak_rss_mb = _timing.peak_rss_mb()
    rec.power_w = power.mean_w
    rec.load_avg = _timing.load_average()
    return samples["row"]


def _evaluate(runner: Any, task: dict[str, Any] | None, spec: dict[str, Any], records: list[BenchRecord]) -> None:
    """Score the task once per form and copy the metrics into every row that ran."""
    targets = [r for r in records if r.status == "ok"]
    if not task or not targets:
        return
    why = ("random weights: latency only" if runner.weights == "random"
           else "encoder features (no task head): latency only" if runner.task_kind == "encoder"
           else "evaluation disabled" if not spec.get("evaluate", True) else "")
    if why:
        for r in targets:
            r.notes = "; ".join(n for n in (r.notes, why) if n)
        return
    from mirage_edge.bench import accuracy
    from mirage_edge.bench.suite import TaskSpec
    from mirage_edge.config import from_dict

    try:
        data = accuracy.load_task(from_dict(TaskSpec, task))
        size = tuple(runner.preprocess_spec().size)
        runner.set_input_size(*size)
        preds = accuracy.predict(runner, data, batch=spec.get("eval_batch", 4))
        metrics = accuracy.score(data, preds)
        if spec.get("preds_path"):
            accuracy.save_preds(spec["preds_path"], data.kind, preds)
    except Exception as exc:  # noqa: BLE001
        for r in targets:
            r.status, r.stage, r.error = "error", "eval", _error_text(exc)
        return
    name = PRIMARY_METRIC[data.kind]
    for r in targets:
        for key, value in metrics.items():
            setattr(r, key, value)
        r.eval_n, r.primary_metric, r.primary_value = len(data), name, metrics.get(name)
        r.eval_input = f"{size[0]}x{size[1]}"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m mirage_edge.bench.worker SPEC.json OUT.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(args[0]).read_text(encoding="utf-8"))
    try:
        rows = run_form(spec)
        payload: dict[str, Any] = {"records": rows}
    except BaseException as exc:  # noqa: BLE001 - report even harness bugs as data
        payload = {"records": [], "error": _error_text(exc), "traceback": traceback.format_exc()}
    from mirage_edge._io import atomic_write_text

    atomic_write_text(args[1], json.dumps(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
