"""Run a suite: prepare tasks, benchmark every form (isolated worker per form), time the fast rows
again in interleaved rounds, join the teacher comparisons, and write records (CSV/JSON), the machine
description, the markdown report and the latency-vs-metric plot.

Rounds: on a shared CPU one timing window per row decides nothing (the fastest of two close rows
flipped from run to run). Every form is timed in round 1 (with load, evaluation and peak RSS); rows
faster than `ROUND_MAX_CALL_MS` are timed again in `rounds - 1` later rounds, each a fresh
timing-only worker, the forms visited in alternating order; each round gets `budget_s / rounds`, so
a row's timed seconds stay what the suite asks. A row's p50 is the median of its round medians.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from mirage_edge import config as _config
from mirage_edge._io import atomic_write_text
from mirage_edge._log import progress as _progress
from mirage_edge.bench import accuracy
from mirage_edge.bench.hardware import HardwareInfo, describe_hardware
from mirage_edge.bench.record import BenchRecord, is_teacher_reference, record_from_dict, write_records
from mirage_edge.bench.timing import ROUND_MAX_CALL_MS, combine_rounds
from mirage_edge.bench.suite import BenchSuite, Form, allowed_backends, expand, plan_forms
from mirage_edge.bench.worker import run_form

Progress = Callable[[str], None]


@dataclasses.dataclass
class BenchResult:
    records: list[BenchRecord]
    hardware: HardwareInfo
    paths: dict[str, Path]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:80] or "x"


def prepare_tasks(suite: BenchSuite, progress: Progress) -> tuple[BenchSuite, dict[str, str]]:
    """Expand task paths, generate synthetic datasets that are missing; returns the suite with
    absolute task paths and {task name: problem} for tasks that cannot be evaluated."""
    problems: dict[str, str] = {}
    tasks = []
    for t in suite.tasks:
        path = Path(expand(t.path, suite, t.name)).expanduser()
        if not path.is_dir() and t.synth is not None:
            from mirage_edge.data.synth import synthesize

            progress(f"generating synthetic {t.synth.kind} data for task {t.name!r} -> {path}")
            synthesize(path, t.synth.kind, n=t.synth.n, seed=t.synth.seed, size=t.synth.size)
        if not path.is_dir():
            problems[t.name] = f"dataset folder not found: {path}"
        tasks.append(dataclasses.replace(t, path=str(path.resolve() if path.exists() else path)))
    return dataclasses.replace(suite, tasks=tasks), problems


def _task_classes(task: Any) -> int | None:
    try:
        from mirage_edge.data.layout import scan_dataset

        return len(scan_dataset(Path(task.path)).classes)
    except Exception:  # noqa: BLE001 - only a hint for building random-weight reference heads
        return None


def adhoc_role(path: str | Path, artifact: bool = False) -> str:
    """The bench role of a folder given on the command line, read from what it says it is: a
    distilled student (its metadata names a teacher) -> "student", so it can be the headline's
    student; a labels-only twin -> "baseline"; anything else (or unreadable: the row's load reports
    why) -> "candidate"."""
    try:
        if artifact:
            from mirage_edge.artifact import read_meta

            return "student" if read_meta(path).source.teacher else "candidate"
        from mirage_edge.bench.loaders import checkpoint_config

        meta = checkpoint_config(path)[2].get("meta") or {}
    except Exception:  # noqa: BLE001 - a bad folder becomes an error row at load, with its reason
        return "candidate"
    if not isinstance(meta, dict):
        return "candidate"
    return "baseline" if meta.get("labels_only") else "student" if meta.get("teacher") else "candidate"


def bench(suite: str | Path | BenchSuite, out_dir: str | Path | None = None, *, overrides: list[str] | None = None,
          models: list[str] | None = None, backends: list[str] | None = None, precisions: list[str] | None = None,
          checkpoints: list[str] | None = None, artifacts: list[str] | None = None, isolate: bool | None = None,
          rounds: int | None = None, progress: Progress | None = None) -> BenchResult:
    """The `mirage-edge bench` entry point: load a suite (path or object), add ad-hoc candidate
    checkpoints/artifacts (labelled by folder name, evaluated on every task), run it."""
    from mirage_edge.bench.suite import ModelSpec, load_suite

    if not isinstance(suite, BenchSuite):
        suite = load_suite(suite, overrides or [])
    elif overrides:
        suite = _config.load(BenchSuite, None, overrides, base=_config.to_dict(suite))
    extra = [ModelSpec(label=Path(p).name, checkpoint=str(p), role=adhoc_role(p)) for p in checkpoints or []]
    # an artifact folder is named after its format-precision; its parent names the model
    extra += [ModelSpec(label=f"{Path(p).resolve().parent.name}/{Path(p).name}", artifacts=[str(p)],
                        role=adhoc_role(p, artifact=True)) for p in artifacts or []]
    if extra:
        suite = dataclasses.replace(suite, models=[*suite.models, *extra])
        models = [*models, *(m.label for m in extra)] if models else None
    out = Path(out_dir) if out_dir else Path("bench-out") / _slug(suite.name)
    return run_suite(suite, out, backends=backends, precisions=precisions, models=models, isolate=isolate,
                     rounds=rounds, progress=progress)


def run_suite(suite: BenchSuite, out_dir: str | Path, *, backends: list[str] | None = None,
              precisions: list[str] | None = None, models: list[str] | None = None, isolate: bool | None = None,
              rounds: int | None = None, progress: Progress | None = None) -> BenchResult:
    """Benchmark every form of `suite` and write the records and report to `out_dir`; `rounds`
    (default: the suite's `timing.rounds`) = timing rounds of the fast rows."""
    say = progress or _progress
    out = Path(out_dir)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    tm = suite.timing
    isolated = tm.isolate if isolate is None else isolate
    rounds = tm.rounds if rounds is None else int(rounds)
    if rounds < 1:
        from mirage_edge.errors import ConfigError

        raise ConfigError(f"rounds must be >= 1, got {rounds}")
    round_timing = {**_config.to_dict(tm), "budget_s": tm.budget_s / rounds}
    hw = describe_hardware(threads=tm.threads[0])
    now = _dt.datetime.now(_dt.timezone.utc)
    base = dict(run_id=now.strftime("%Y%m%dT%H%M%SZ"), suite=suite.name, hardware=hw.summary(), cpu_model=hw.cpu_model,
                cpu_flags=" ".join(hw.cpu_flags), cpu_count=hw.cpu_count, jetson=hw.jetson_str(),
                versions=hw.versions_str(), timestamp=now.isoformat(timespec="seconds"))
    suite, problems = prepare_tasks(suite, say)
    records: list[BenchRecord] = []
    for name, why in problems.items():
        kind = next(t.kind for t in suite.tasks if t.name == name)
        records.append(BenchRecord(**base, model="-", role="-", task=name, task_kind=kind, status="skipped",
                                   stage="data", error=why))
        say(f"task {name!r} skipped: {why}")

    forms = [f for f in plan_forms(suite, backends, models)
             if not (f.task and f.task.name in problems and _evaluates(f))]
    classes = {t.name: _task_classes(t) for t in suite.tasks if t.name not in problems}
    # the deployments the suite asks the bench to build (or reuse from the cache) become artifact forms
    forms, failed = _resolve_exports(forms, suite, classes, problems, isolated, work, backends, precisions, say)
    records.extend(BenchRecord(**base, **row) for row in failed)
    forms.sort(key=lambda f: f.model.role != "teacher")  # teacher first: it anchors every ratio
    preds: dict[int, Path] = {}
    plans: list[tuple[dict[str, Any], list[BenchRecord], list[list[float]]]] = []  # per form: spec, rows, samples
    for i, form in enumerate(forms):
        t0 = time.perf_counter()
        say(f"[{i + 1}/{len(forms)}] {form.model.label} ({form.kind}: {form.source})")
        pred_path = work / f"preds_{i:03d}_{_slug(form.model.label)}.npz"
        pred_path.unlink(missing_ok=True)  # never join a previous run's predictions
        spec = {
            "form": {"model": form.model.label, "role": form.model.role, "kind": form.kind, "source": form.source,
                     "backend": form.backend, "problem": form.problem, "device": tm.device,
                     "task": _config.to_dict(form.task) if form.task else None,
                     "num_classes": classes.get(form.task.name) if form.task else None,
                     "input_size": tm.input_sizes[0], "head": form.model.head, "note": form.note},
            "timing": round_timing, "base": base, "eval_batch": suite.eval_batch,
            "evaluate": form.model.evaluate and not (form.task and form.task.name in problems),
            "preds_path": str(pred_path), "isolated": isolated,
            "allowed_backends": sorted(a) if (a := allowed_backends(form, backends)) is not None else None,
            "allowed_precisions": precisions if precisions and form.model.role != "teacher" else None,
        }
        rows = _run_isolated(spec, work / f"form_{i:03d}", tm.row_timeout_s, tm.threads[0], tm.omp_wait_policy) \
            if isolated else run_form(spec)
        samples = [r.pop("_samples", []) for r in rows]
        recs = [record_from_dict(r) for r in rows]
        plans.append((spec, recs, samples))
        if pred_path.is_file():
            preds[id(form)] = pred_path
        for r in recs:
            r._form = form  # type: ignore[attr-defined]  # joined below, never serialised
        records.extend(recs)
        for r in recs:
            lat = f"{r.latency_median_ms:.2f} ms" if r.latency_median_ms is not None else "-"
            metric = f" {r.primary_metric}={r.primary_value:.4f}" if r.primary_value is not None else ""
            say(f"    {r.label} b{r.batch} {r.input_h}px t{r.threads}: {r.status} {lat}{metric}"
                f"{'  ' + r.error if r.error else ''}")
        say(f"    ({time.perf_counter() - t0:.1f} s)")

    if rounds > 1:
        _more_rounds(plans, rounds, isolated, work, tm, say)
    _join_teacher(records, preds)
    _fill_descriptive(records)
    for r in records:
        r.__dict__.pop("_form", None)
    paths = write_records(records, out)
    paths["hardware"] = out / "hardware.json"
    atomic_write_text(paths["hardware"], json.dumps(hw.to_dict(), indent=1) + "\n")
    # the suite as run (placeholders expanded); JSON because TOML cannot hold an absent synth table
    atomic_write_text(out / "suite.json", json.dumps(_config.to_dict(suite), indent=1) + "\n")
    from mirage_edge.bench.report import write_report

    paths.update(write_report(records, hw, out, suite=suite))
    return BenchResult(records, hw, paths)


def _row_key(r: BenchRecord | dict[str, Any]) -> tuple[int, int, int]:
    get = r.get if isinstance(r, dict) else lambda k: getattr(r, k)
    return (int(get("threads")), int(get("batch")), int(get("input_h")))


def _more_rounds(plans: list[tuple[dict[str, Any], list[BenchRecord], list[list[float]]]], rounds: int,
                 isolated: bool, work: Path, tm: Any, say: Progress) -> None:
    """Time the fast rows of every form again in rounds 2..`rounds` (fresh timing-only workers, forms
    visited forwards then backwards) and fold each round into its row (`timing.combine_rounds`)."""
    fast = [i for i, (_, recs, _) in enumerate(plans)
            if any(r.ok and r.latency_median_ms is not None and r.latency_median_ms <= ROUND_MAX_CALL_MS for r in recs)]
    if not fast:
        return
    # per row: round medians, pooled samples, engine and runtime medians, load averages
    acc: dict[tuple[int, tuple[int, int, int]], dict[str, list[Any]]] = {}
    for i in fast:
        for r, smp in zip(plans[i][1], plans[i][2]):
            if r.ok and r.latency_median_ms is not None and r.latency_median_ms <= ROUND_MAX_CALL_MS:
                acc[(i, _row_key(r))] = {"med": [r.latency_median_ms], "samples": list(smp),
                                         "engine": [r.latency_engine_ms], "runtime": [r.latency_runtime_ms],
                                         "load": [r.load_avg], "rss": [r.peak_rss_mb]}
    for rnd in range(2, rounds + 1):
        t0 = time.perf_counter()
        order = fast[::-1] if rnd % 2 == 0 else fast
        say(f"timing round {rnd}/{rounds}: {len(order)} form(s) with rows under {ROUND_MAX_CALL_MS:.0f} ms")
        for i in order:
            spec = {**plans[i][0], "timing_only": True, "evaluate": False, "preds_path": None}
            rows = _run_isolated(spec, work / f"form_{i:03d}_round{rnd}", tm.row_timeout_s, tm.threads[0],
                                 tm.omp_wait_policy) if isolated else run_form(spec)
            for row in rows:
                slot = acc.get((i, _row_key(row)))
                if slot is None or row.get("status") != "ok" or row.get("latency_median_ms") is None:
                    continue  # a failed later round leaves the row with the rounds that ran
                slot["med"].append(row["latency_median_ms"])
                slot["samples"].extend(row.get("_samples", []))
                for key, field in (("engine", "latency_engine_ms"), ("runtime", "latency_runtime_ms"),
                                   ("load", "load_avg"), ("rss", "peak_rss_mb")):
                    slot[key].append(row.get(field))
        say(f"    ({time.perf_counter() - t0:.1f} s)")
    for i in fast:
        for r in plans[i][1]:
            slot = acc.get((i, _row_key(r)))
            if slot is None or not slot["samples"]:
                continue
            c = combine_rounds(slot["med"], slot["samples"])
            r.latency_median_ms, r.latency_best_round_ms, r.latency_rounds = c.median_ms, c.best_round_ms, c.rounds
            r.latency_round_medians = " ".join(f"{m:.4g}" for m in c.round_medians_ms)
            r.latency_p90_ms, r.latency_p99_ms, r.latency_max_ms = c.p90_ms, c.p99_ms, c.max_ms
            r.latency_mean_ms, r.latency_min_ms, r.latency_n = c.mean_ms, c.min_ms, c.n
            r.throughput_ips = r.batch * 1000.0 / c.median_ms if c.median_ms > 0 else None
            r.latency_engine_ms, r.latency_runtime_ms = _median(slot["engine"]), _median(slot["runtime"])
            # the worst load any round saw, so the report's "CPU was shared" warning stays conservative
            r.load_avg = max((v for v in slot["load"] if v is not None), default=r.load_avg)
            r.peak_rss_mb = max((v for v in slot["rss"] if v is not None), default=r.peak_rss_mb)


def _median(values: list[float | None]) -> float | None:
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return None
    mid = len(vals) // 2
    return vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2


def _resolve_exports(forms: list[Form], suite: BenchSuite, classes: dict[str, int | None],
                     problems: dict[str, str], isolated: bool, work: Path, backends: list[str] | None,
                     precisions: list[str] | None, say: Progress) -> tuple[list[Form], list[dict[str, Any]]]:
    """Replace each `export` form by artifact forms of its target's artifacts, built (or reused from
    the cache, `mirage_edge.bench.deploy`) at each timed input size. A failed export becomes an
    error row (stage "export"); a target none of whose artifacts pass --backend/--precision is skipped."""
    from mirage_edge.bench.deploy import default_cache_dir, job_target
    from mirage_edge.bench.loaders import RUNTIMES
    from mirage_edge.errors import MirageEdgeError

    out: list[Form] = []
    failed: list[dict[str, Any]] = []
    cache = Path(expand(suite.export_cache, suite)).expanduser() if suite.export_cache else default_cache_dir()
    tm = suite.timing
    for f in forms:
        if f.kind != "export":
            out.append(f)
            continue
        m, task = f.model, f.task
        tname = task.name if task else ""
        src = expand(m.checkpoint, suite, tname) if m.checkpoint else m.registry
        for size in tm.input_sizes:
            job = {"label": m.label, "source_kind": "checkpoint" if m.checkpoint else "registry", "source": src,
                   "task_kind": task.kind if task else "", "num_classes": classes.get(tname), "head": m.head,
                   "target": f.source, "sets": list(m.export_set), "input_size": size,
                   "calib": task.path if m.checkpoint and task and tname not in problems else None,
                   "cache": str(cache)}
            row = dict(model=m.label, role=m.role, source=f"{src} -> {f.source}", task=tname,
                       task_kind=task.kind if task else "", threads=tm.threads[0], input_h=size, input_w=size,
                       status="error", stage="export")
            try:
                target = job_target(job)  # torch-free: filter before minutes of export work
            except MirageEdgeError as exc:
                failed.append({**row, "error": f"{type(exc).__name__}: {exc}"[:800]})
                continue
            allowed = allowed_backends(f, backends)
            wanted = [(fmt, p) for fmt, p in target.combos()
                      if (allowed is None or set(RUNTIMES.get(fmt, ())) & allowed)
                      and (not precisions or m.role == "teacher" or p in precisions)]
            if not wanted:
                continue
            t0 = time.perf_counter()
            say(f"export {m.label}: {src} -> {target.name} at {size}x{size} (cache {cache})")
            stem = work / f"export_{_slug(m.label)}_{_slug(tname)}_{size}_{_slug(Path(f.source).stem)}"
            res = _run_export(job, stem, tm.row_timeout_s, tm.threads[0], tm.omp_wait_policy) if isolated \
                else _export_in_process(job, say)
            if "error" in res:
                say(f"    export failed: {res['error']}")
                failed.append({**row, "error": str(res["error"])[:800]})
                continue
            r = res["result"]
            how = "reused from the cache" if r["reused"] else f"built in {r['seconds']:.0f} s"
            say(f"    {how}: {r['folder']} ({time.perf_counter() - t0:.1f} s)")
            note = (f"exported by the bench from {src} ({r['weights']} weights) to {target.name}, {how} "
                    f"(cache key {r['key']})")
            runtimes = [b for b in m.backends if b in ("onnxruntime", "openvino", "tensorrt")] or [""]
            combos = {f"{fmt}-{p}" for fmt, p in wanted}
            out.extend(Form(m, "artifact", d, task, backend=b, note=note)
                       for d in r["artifacts"] if Path(d).name in combos for b in runtimes)
    return out, failed


def _export_in_process(job: dict[str, Any], say: Progress) -> dict[str, Any]:
    from mirage_edge.bench.deploy import build_or_reuse

    try:
        return {"result": build_or_reuse(job, log=lambda m: say(f"    {m}"))}
    except Exception as exc:  # noqa: BLE001 - a failed export is an error row, the suite goes on
        return {"error": f"{type(exc).__name__}: {exc}"}


def _run_export(job: dict[str, Any], stem: Path, timeout: float, threads: int,
                omp_wait_policy: str = "") -> dict[str, Any]:
    """`python -m mirage_edge.bench.deploy` in a fresh interpreter (torch, NNCF and the exporters stay
    out of the bench process; a native crash is an error row)."""
    from mirage_edge.bench.runners import cpu_threads_env

    spec_path, out_path = stem.with_suffix(".spec.json"), stem.with_suffix(".out.json")
    out_path.unlink(missing_ok=True)
    atomic_write_text(spec_path, json.dumps(job))
    env = cpu_threads_env(threads, omp_wait_policy)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p and Path(p).is_dir())
    try:
        proc = subprocess.run([sys.executable, "-m", "mirage_edge.bench.deploy", str(spec_path), str(out_path)],
                              capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"export did not finish within {timeout:.0f} s"}
    stem.with_suffix(".log").write_text(proc.stderr or "", encoding="utf-8")
    if out_path.is_file():
        return json.loads(out_path.read_text(encoding="utf-8"))
    tail = (proc.stderr or "").strip().splitlines()[-3:]
    return {"error": f"export process exited with code {proc.returncode} ({_signal_name(proc.returncode)}): "
                     + " | ".join(tail)}


def _evaluates(form: Form) -> bool:
    """Does this form need its task's data (trained weights, evaluation on)?"""
    random = form.kind in ("torch", "export") and form.model.registry and not form.model.checkpoint
    return form.model.evaluate and not random


def _run_isolated(spec: dict[str, Any], stem: Path, timeout: float, threads: int,
                  omp_wait_policy: str = "") -> list[dict[str, Any]]:
    """Run one form in a fresh interpreter; a crash, hang or non-zero exit becomes an error row."""
    from mirage_edge.bench.runners import cpu_threads_env

    spec_path, out_path = stem.with_suffix(".spec.json"), stem.with_suffix(".out.json")
    out_path.unlink(missing_ok=True)
    atomic_write_text(spec_path, json.dumps(spec))
    env = cpu_threads_env(threads, omp_wait_policy)
    # the worker imports exactly what this process can (suite factories may live outside the package)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p and Path(p).is_dir())
    status, error = "error", ""
    try:
        proc = subprocess.run([sys.executable, "-m", "mirage_edge.bench.worker", str(spec_path), str(out_path)],
                              capture_output=True, text=True, timeout=timeout, env=env)
        if out_path.is_file():
            payload = json.loads(out_path.read_text(encoding="utf-8"))
            if payload.get("records") or not payload.get("error"):
                return payload["records"]
            error = payload["error"]
        else:
            tail = (proc.stderr or "").strip().splitlines()[-3:]
            error = f"worker exited with code {proc.returncode} ({_signal_name(proc.returncode)}): " + " | ".join(tail)
    except subprocess.TimeoutExpired:
        status, error = "timeout", f"worker did not finish within {timeout:.0f} s"
    form, base = spec["form"], spec["base"]
    task = form.get("task") or {}
    rec = BenchRecord(**base, model=form["model"], role=form["role"], source=form["source"],
                      backend=form.get("backend", ""), task=task.get("name", ""), task_kind=task.get("kind", ""),
                      threads=threads, status=status, stage="worker", error=error[:800])
    return [dataclasses.asdict(rec)]


def _signal_name(code: int) -> str:
    if code >= 0:
        return "exit"
    import signal

    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def _join_teacher(records: list[BenchRecord], preds: dict[int, Path]) -> None:
    """Teacher agreement and metric retention against the teacher's PyTorch row of the same task."""
    teachers = {}
    for r in records:
        form = getattr(r, "_form", None)
        if form is not None and is_teacher_reference(r) and r.status == "ok" and r.task:
            teachers.setdefault(r.task, (r, form))
    cache: dict[int, Any] = {}

    def load(form: Form, kind: str) -> Any:
        if id(form) not in cache:
            cache[id(form)] = accuracy.load_preds(preds[id(form)], kind) if id(form) in preds else None
        return cache[id(form)]

    for r in records:
        form = getattr(r, "_form", None)
        if form is None or r.task not in teachers or r.status != "ok":
            continue
        t_rec, t_form = teachers[r.task]
        if r.primary_value is not None and t_rec.primary_value:
            r.metric_retention = r.primary_value / t_rec.primary_value
        mine, theirs = load(form, r.task_kind), load(t_form, r.task_kind)
        if mine is not None and theirs is not None and len(mine) == len(theirs):
            r.teacher_agreement = accuracy.agreement(r.task_kind, mine, theirs)


def _fill_descriptive(records: list[BenchRecord]) -> None:
    """Artifacts carry no parameter/FLOP counts: take them from the same model's PyTorch row."""
    torch_rows = [r for r in records if r.backend == "torch" and r.params_m is not None]
    ref = {(r.model, r.input_h): r for r in torch_rows}
    # a deployment exported by the bench from a registered name (mirage-base-int8) takes that name's row
    by_base = {(r.base_model, r.input_h): r for r in torch_rows if r.base_model and r.role == "reference"}
    for r in records:
        src = ref.get((r.model, r.input_h)) or (by_base.get((r.base_model, r.input_h)) if r.role == "reference"
                                                else None)
        if src is None or r is src:
            continue
        if r.params_m is None:
            r.params_m = src.params_m
        if r.gflops is None and src.gflops is not None:
            r.gflops = src.gflops
            r.notes = "; ".join(n for n in (r.notes, "params/GFLOPs from the PyTorch model") if n)


__all__ = ["bench", "run_suite", "BenchResult", "prepare_tasks"]
