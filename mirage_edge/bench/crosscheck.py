"""Cross-check the bench's latency of one artifact against OpenVINO's own `benchmark_app`.

    mirage-edge bench crosscheck runs/export/student/openvino-int8 --threads 2 --rounds 5

Each round times the artifact twice, in fresh processes, back to back (the order alternates from
round to round, so a drift in load favours neither side):

- the bench: `python -m mirage_edge.bench.worker` on a timing-only spec, i.e. the exact code path of
  a `mirage-edge bench` row (OpenVINO backend, `threads` threads, batch `batch`, `seconds` of timed
  calls). It reports three medians timed call by call in that process: the row (fixed-shape model,
  input copied in, output copied out), the engine alone on a bound input, and `Predictor.run`;
- `benchmark_app -d CPU -hint latency -shape NAME[B,1,H,W] -t SECONDS -load_config CFG`, where CFG
  holds `INFERENCE_NUM_THREADS` and the artifact's own OpenVINO properties (an FP32 artifact asks
  for `INFERENCE_PRECISION_HINT=f32`; without it `benchmark_app` runs bf16 on avx512_bf16 CPUs and is
  up to 2x faster than the artifact as shipped). Its "Median:" line is the infer request's own
  latency on a pre-filled input (sync API, one stream).

The result gives every round's numbers, the per-round ratios bench / benchmark_app and their
median; on a shared CPU only the per-round ratios mean something, the absolute numbers follow the load.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mirage_edge.errors import ConfigError, MirageEdgeError, MissingDependencyError

APP = "benchmark_app"
# the bench row agrees with benchmark_app when the median per-round ratio is within this
AGREEMENT = 0.10

# benchmark_app prints latencies in ms, or in us when the average is below 1 ms
_LINE = {"median_ms": r"Median:\s+([0-9.]+)\s*(ms|us)\b", "average_ms": r"Average:\s+([0-9.]+)\s*(ms|us)\b",
         "min_ms": r"Min:\s+([0-9.]+)\s*(ms|us)\b", "max_ms": r"Max:\s+([0-9.]+)\s*(ms|us)\b",
         "throughput_fps": r"Throughput:\s+([0-9.]+)\s*(FPS)\b"}
# compiled-model properties benchmark_app prints that decide its speed
_PROPS = ("PERFORMANCE_HINT", "NUM_STREAMS", "INFERENCE_NUM_THREADS", "INFERENCE_PRECISION_HINT",
          "ENABLE_CPU_PINNING", "SCHEDULING_CORE_TYPE", "ENABLE_HYPER_THREADING")


@dataclasses.dataclass(frozen=True)
class AppResult:
    """What one `benchmark_app` run printed: latencies in ms (per infer request call) and the
    compiled model's properties."""

    median_ms: float
    average_ms: float | None
    min_ms: float | None
    max_ms: float | None
    throughput_fps: float | None
    properties: dict[str, str]


def parse_benchmark_app(text: str) -> AppResult:
    """Parse `benchmark_app` output (its log lines, e.g. "[ INFO ]    Median:        5.65 ms"; "us"
    below 1 ms, converted to ms).

    Raises `MirageEdgeError` when there is no "Median:" line (benchmark_app failed, or was run with
    a latency percentile other than 50, which prints another label)."""
    found: dict[str, float | None] = {}
    for key, pattern in _LINE.items():
        m = re.search(pattern, text)
        found[key] = None if m is None else float(m.group(1)) / (1000.0 if m.group(2) == "us" else 1.0)
    if found["median_ms"] is None:
        tail = " | ".join(line.strip() for line in text.strip().splitlines()[-3:])
        raise MirageEdgeError(f"{APP} printed no 'Median: ... ms' line; its last lines: {tail or '(nothing)'}")
    props: dict[str, str] = {}
    for key in _PROPS:
        m = re.search(rf"^\[ INFO \]\s+{key}:\s*(.+?)\s*$", text, flags=re.MULTILINE)
        if m:
            props[key] = m.group(1)
    return AppResult(median_ms=found["median_ms"], average_ms=found["average_ms"],  # type: ignore[arg-type]
                     min_ms=found["min_ms"], max_ms=found["max_ms"], throughput_fps=found["throughput_fps"],
                     properties=props)


def find_benchmark_app(exe: str | None = None) -> str:
    """The `benchmark_app` executable: `exe`, else on PATH, else beside this Python (a venv not
    activated). Raises `MissingDependencyError` naming the pip package that provides it."""
    for cand in ([exe] if exe else [APP, str(Path(sys.executable).with_name(APP))]):
        path = shutil.which(cand)
        if path:
            return path
    raise MissingDependencyError(f"{exe or APP} not found on PATH: it comes with the openvino pip package "
                                 "(pip install openvino); the cross-check needs it")


def app_command(app: str, model: Path, input_shapes: dict[str, list[int]], seconds: int,
                config_path: Path) -> list[str]:
    """`benchmark_app` in latency mode on a fixed input shape, with the properties of `config_path`."""
    shape = ",".join(f"{name}[{','.join(str(d) for d in dims)}]" for name, dims in input_shapes.items())
    return [app, "-m", str(model), "-d", "CPU", "-hint", "latency", "-shape", shape, "-t", str(int(seconds)),
            "-load_config", str(config_path)]


@dataclasses.dataclass
class CrosscheckResult:
    """Per-round medians (ms) of both sides and their ratios; `summary` holds the medians over rounds."""

    artifact: str
    model_file: str
    precision: str
    threads: int
    batch: int
    input: str
    rounds: int
    seconds: int
    app_command: list[str]
    app_properties: dict[str, str]
    openvino_properties: dict[str, str]
    per_round: list[dict[str, Any]]
    summary: dict[str, Any]
    machine: str = ""
    versions: str = ""
    timestamp: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "crosscheck", **dataclasses.asdict(self)}

    def lines(self) -> list[str]:
        """Human summary: one line per round, then the medians and the verdict."""
        out = [f"{self.artifact} ({self.precision}), batch {self.batch}, {self.input}, {self.threads} threads, "
               f"{self.rounds} rounds of {self.seconds} s per side"]
        for r in self.per_round:
            out.append(f"  round {r['round']}: bench row {r['bench_row_ms']:.3f} ms "
                       f"(engine {_opt(r['bench_engine_ms'])}, runtime {_opt(r['bench_runtime_ms'])}) | "
                       f"{APP} {r['app_median_ms']:.3f} ms | "
                       f"ratio {r['ratio_row']:.3f} | load {_opt(r['load_avg'], 1, '')}")
        s = self.summary
        out.append(f"median over rounds: bench row {s['bench_row_ms']:.3f} ms, {APP} {s['app_median_ms']:.3f} ms, "
                   f"ratio {s['ratio_row']:.3f} (engine alone {_opt(s['ratio_engine'], 3, '')}, "
                   f"Predictor.run {_opt(s['ratio_runtime'], 3, '')})")
        verdict = "agree" if s["agree"] else "DISAGREE"
        out.append(f"{verdict}: bench row / {APP} = {s['ratio_row']:.3f} (within {AGREEMENT:.0%} counts as agreement)")
        return out


def _opt(v: float | None, nd: int = 3, unit: str = " ms") -> str:
    return "-" if v is None else f"{v:.{nd}f}{unit}"


def _median(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.median(vals)) if vals else None


def openvino_artifact(artifact: str | Path, purpose: str) -> tuple[Path, Any]:
    """(folder, metadata) of an artifact OpenVINO can run (openvino or onnx), else a one-line error
    naming `purpose` (the cross-check, the breakdown)."""
    from mirage_edge.artifact import read_meta

    folder = Path(artifact)
    if not folder.is_dir():
        raise ConfigError(f"artifact folder not found: {folder}")
    meta = read_meta(folder)
    if meta.format not in ("openvino", "onnx"):
        raise ConfigError(f"{folder}: a {meta.format} artifact does not run on OpenVINO; {purpose} needs an "
                          "openvino or onnx artifact")
    return folder, meta


def crosscheck(artifact: str | Path, *, threads: int = 2, rounds: int = 5, seconds: int = 2, batch: int = 1,
               app: str | None = None, timeout_s: float = 600.0,
               progress: Callable[[str], None] | None = None) -> CrosscheckResult:
    """Time `artifact` with the bench's worker and with `benchmark_app`, interleaved over `rounds`."""
    from mirage_edge.bench.hardware import describe_hardware
    from mirage_edge.runtime.backends import model_file

    say = progress or (lambda _m: None)
    if threads < 1 or rounds < 1 or seconds < 1 or batch < 1:
        raise ConfigError("threads, rounds, seconds and batch must be >= 1, got "
                          f"{threads}, {rounds}, {seconds}, {batch}")
    folder, meta = openvino_artifact(artifact, "the cross-check")
    if len(meta.input_names) != 1:
        raise ConfigError(f"{folder}: the cross-check times single-input artifacts; this one takes {meta.input_names}")
    h, w = (int(v) for v in meta.preprocessing[meta.input_names[0]]["size"])
    if h != w:
        raise ConfigError(f"{folder}: the bench times square inputs; this artifact takes {h} x {w}")
    exe = find_benchmark_app(app)
    model = model_file(folder, meta.format, meta.files)
    ov_props = {k: str(v) for k, v in (meta.runtime.get("openvino") or {}).items() if str(v) != "default"}
    ov_props["INFERENCE_NUM_THREADS"] = str(threads)

    from mirage_edge import config as _config
    from mirage_edge.bench.runners import cpu_threads_env
    from mirage_edge.bench.suite import TimingConfig

    timing = _config.to_dict(TimingConfig(threads=[threads], batch_sizes=[batch], input_sizes=[h],
                                          budget_s=float(seconds), max_iters=1_000_000, min_warmup_s=0.3))
    spec = {"form": {"model": meta.name or folder.name, "role": "candidate", "kind": "artifact",
                     "source": str(folder.resolve()), "backend": "openvino", "task": None},
            "timing": timing, "base": {}, "isolated": True, "timing_only": True, "evaluate": False}
    env = cpu_threads_env(threads, "PASSIVE")  # what the bench's workers get
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p and Path(p).is_dir())
    per_round: list[dict[str, Any]] = []
    app_props: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="mirage-crosscheck-") as tmp:
        work = Path(tmp)
        (work / "spec.json").write_text(json.dumps(spec), encoding="utf-8")
        (work / "ov.json").write_text(json.dumps({"CPU": ov_props}), encoding="utf-8")
        cmd = app_command(exe, model, {meta.input_names[0]: [batch, 1, h, w]}, seconds, work / "ov.json")
        for rnd in range(1, rounds + 1):
            sides: dict[str, Any] = {}
            # alternate who goes first, so a steady change of load favours neither side
            for side in (("bench", "app") if rnd % 2 else ("app", "bench")):
                if side == "bench":
                    sides[side] = _run_bench(work, env, timeout_s)
                else:
                    sides[side] = _run_app(cmd, env, timeout_s)
            row, res = sides["bench"], sides["app"]
            app_props = res.properties or app_props
            entry = {"round": rnd, "first": "bench" if rnd % 2 else APP,
                     "bench_row_ms": row["latency_median_ms"], "bench_engine_ms": row.get("latency_engine_ms"),
                     "bench_runtime_ms": row.get("latency_runtime_ms"), "bench_n": row.get("latency_n"),
                     "app_median_ms": res.median_ms, "app_average_ms": res.average_ms, "app_min_ms": res.min_ms,
                     "ratio_row": row["latency_median_ms"] / res.median_ms,
                     "ratio_engine": _ratio(row.get("latency_engine_ms"), res.median_ms),
                     "ratio_runtime": _ratio(row.get("latency_runtime_ms"), res.median_ms),
                     "load_avg": row.get("load_avg")}
            per_round.append(entry)
            say(f"round {rnd}/{rounds}: bench {entry['bench_row_ms']:.3f} ms, {APP} {res.median_ms:.3f} ms, "
                f"ratio {entry['ratio_row']:.3f}")
        timed_call = row.get("timed_call", "")
    summary = {key: _median([r[key] for r in per_round])
               for key in ("bench_row_ms", "bench_engine_ms", "bench_runtime_ms", "app_median_ms", "ratio_row",
                           "ratio_engine", "ratio_runtime")}
    summary.update(bench_best_round_ms=min(r["bench_row_ms"] for r in per_round),
                   app_best_round_ms=min(r["app_median_ms"] for r in per_round),
                   load_avg_max=max((r["load_avg"] for r in per_round if r["load_avg"] is not None), default=None),
                   agree=abs(summary["ratio_row"] - 1.0) <= AGREEMENT, bench_timed_call=timed_call,
                   statistic="median over rounds of the per-round values")  # type: ignore[arg-type,operator]
    hw = describe_hardware(threads=threads)
    return CrosscheckResult(
        artifact=str(folder), model_file=str(model), precision=meta.precision, threads=threads, batch=batch,
        input=f"{h}x{w}", rounds=rounds, seconds=seconds, app_command=[Path(cmd[0]).name, *cmd[1:-1], "CFG.json"],
        app_properties=app_props, openvino_properties=ov_props, per_round=per_round, summary=summary,
        machine=hw.summary(), versions=hw.versions_str(),
        timestamp=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))


def _ratio(a: float | None, b: float) -> float | None:
    return None if a is None or not b else a / b


def _run_bench(work: Path, env: dict[str, str], timeout_s: float) -> dict[str, Any]:
    out = work / "out.json"
    out.unlink(missing_ok=True)
    try:
        proc = subprocess.run([sys.executable, "-m", "mirage_edge.bench.worker", str(work / "spec.json"), str(out)],
                              capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        raise MirageEdgeError(f"the bench worker did not finish within {timeout_s:.0f} s") from None
    if not out.is_file():
        tail = " | ".join((proc.stderr or "").strip().splitlines()[-3:])
        raise MirageEdgeError(f"the bench worker exited with code {proc.returncode}: {tail}")
    payload = json.loads(out.read_text(encoding="utf-8"))
    rows = payload.get("records") or []
    if not rows or rows[0].get("status") != "ok" or rows[0].get("latency_median_ms") is None:
        why = (rows[0].get("error") if rows else payload.get("error")) or "no row"
        raise MirageEdgeError(f"the bench could not time the artifact: {why}")
    return rows[0]


def _run_app(cmd: list[str], env: dict[str, str], timeout_s: float) -> AppResult:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        raise MirageEdgeError(f"{APP} did not finish within {timeout_s:.0f} s") from None
    return parse_benchmark_app((proc.stdout or "") + "\n" + (proc.stderr or ""))


def write_record(result: Any, path: str | Path) -> Path:
    """Write a cross-check or breakdown result (its `to_dict()`) as one JSON record, atomically."""
    from mirage_edge._io import atomic_write_text

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(p, json.dumps(result.to_dict(), indent=1) + "\n")
    return p


__all__ = ["AppResult", "CrosscheckResult", "parse_benchmark_app", "find_benchmark_app", "app_command", "crosscheck",
           "write_record", "AGREEMENT", "APP"]
