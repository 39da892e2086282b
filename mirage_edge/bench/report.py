"""Reports made from records: markdown (tables + headline ratios), and a latency-vs-metric Pareto
plot (PNG, matplotlib Agg). Every number printed here is a field of a record or a ratio of two
records of the same run, so the report can be checked against records.csv / records.json.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable

from mirage_edge._io import atomic_path, atomic_write_text
from mirage_edge.bench.hardware import HardwareInfo
from mirage_edge.bench.timing import ROUND_MAX_CALL_MS
from mirage_edge.bench.record import (CLS_METRICS, PRIMARY_METRIC, SEG_METRICS, SOURCE_BACKENDS, BenchRecord,
                                      is_teacher_reference)

Key = tuple[str, int, int, int]  # task, threads, batch, input size

# The INT8 peak INT8 rows are compared with when the suite gives none (`timing.int8_peak_gops = 0`):
# measured, not a datasheet figure. ../shared/research/cpu_baseline/results/peak_flops.json,
# "ort_int8_u8s8_4096": a 4096^3 int8 matmul in ONNX Runtime (MLAS, U8S8), median of 12 calls at
# 2 threads on a 2-vCPU AMD EPYC (Zen 5, avx512_vnni) KVM guest. It holds for that CPU class only,
# so it applies to rows whose machine matches `INT8_PEAK_CPU` and that ran at `INT8_PEAK_THREADS`.
INT8_PEAK_GOPS = 1166.1
INT8_PEAK_THREADS = 2
INT8_PEAK_CPU = ("AMD EPYC", "avx512_vnni")  # cpu_model prefix, cpu flag
INT8_PEAK_SOURCE = ("ONNX Runtime (MLAS U8S8) 4096^3 int8 matmul, 2 threads, AMD EPYC avx512_vnni KVM guest "
                    "(../shared/research/cpu_baseline/results/peak_flops.json)")


def _key(r: BenchRecord) -> Key:
    return (r.task, r.threads, r.batch, r.input_h)


def _f(v: float | None, nd: int = 2) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:.{nd}f}"


def _ms(v: float | None) -> str:
    if v is None:
        return "–"
    return f"{v:.1f}" if v >= 100 else f"{v:.2f}" if v >= 1 else f"{v:.3f}"


def gops(r: BenchRecord) -> float | None:
    """Achieved GOP/s of a row (GFLOP/s for float rows): its GFLOPs at batch 1 x batch / median seconds."""
    if not r.gflops or not r.latency_median_ms:
        return None
    return r.gflops * r.batch / (r.latency_median_ms / 1e3)


def int8_peak(r: BenchRecord, timing: Any = None) -> float | None:
    """The INT8 peak (GOP/s) row `r` is compared with, or None: only INT8 rows on a CPU at the
    peak's thread count; `timing.int8_peak_gops` when set, else `INT8_PEAK_GOPS` on its CPU class."""
    if r.precision != "int8" or r.device != "cpu":
        return None
    peak = float(getattr(timing, "int8_peak_gops", 0.0) or 0.0)
    threads = int(getattr(timing, "peak_threads", INT8_PEAK_THREADS) or INT8_PEAK_THREADS)
    if not peak:
        model, flag = INT8_PEAK_CPU
        if not (r.cpu_model.startswith(model) and flag in r.cpu_flags.replace(",", " ").split()):
            return None
        peak, threads = INT8_PEAK_GOPS, INT8_PEAK_THREADS
    # the peak was measured at one thread count; other counts would need another measurement
    return peak if r.threads == threads else None


def peak_share(r: BenchRecord, timing: Any = None) -> float | None:
    """GOP/s / INT8 peak (0..1) of an INT8 CPU row; None where either is unknown."""
    achieved, peak = gops(r), int8_peak(r, timing)
    return None if achieved is None or not peak else achieved / peak


def teacher_rows(records: Iterable[BenchRecord]) -> dict[Key, BenchRecord]:
    """The teacher's PyTorch row per (task, threads, batch, size): the reference of every ratio."""
    out: dict[Key, BenchRecord] = {}
    for r in records:
        if is_teacher_reference(r) and r.ok and r.latency_median_ms:
            out.setdefault(_key(r), r)
    return out


def latency_ratio(r: BenchRecord, teachers: dict[Key, BenchRecord]) -> float | None:
    """This row's median latency / the teacher PyTorch FP32 median (same task, threads, batch, size)."""
    t = teachers.get(_key(r))
    if t is None or r.latency_median_ms is None:
        return None
    return r.latency_median_ms / t.latency_median_ms


def _speedup(a: BenchRecord | None, b: BenchRecord | None) -> float | None:
    if a is None or b is None or not a.latency_median_ms or not b.latency_median_ms:
        return None
    return b.latency_median_ms / a.latency_median_ms


def _faster(a: BenchRecord | None, b: BenchRecord | None, bold: bool = False) -> str:
    """'12.3x faster' / '1.4x slower': row a against row b (median latency)."""
    x = _speedup(a, b)
    if x is None:
        return "– vs"
    text = f"{x:.1f}x faster" if x >= 1 else f"{1 / x:.1f}x slower"
    return f"**{text}**" if bold else text


def _pick_key(r: BenchRecord) -> tuple[float, float]:
    """Order rows for "fastest": p50 (the median of the row's interleaved round medians when it was
    timed in rounds), ties broken by the best round."""
    best = r.latency_best_round_ms if r.latency_best_round_ms is not None else r.latency_median_ms
    return (float(r.latency_median_ms), float(best))  # type: ignore[arg-type]


def _fastest(rows: list[BenchRecord]) -> BenchRecord | None:
    rows = [r for r in rows if r.ok and r.latency_median_ms is not None]
    return min(rows, key=_pick_key) if rows else None


# Two rows closer than this at p50 are reported as too close to call on the machine that ran them.
CLOSE_CALL = 0.05


def runner_up(rows: list[BenchRecord], best: BenchRecord | None) -> tuple[BenchRecord | None, bool]:
    """(second-fastest row, too close to call): the runner-up of `best` among `rows`, and whether the
    two differ by less than `CLOSE_CALL` at p50 or their round medians overlap (each was faster in
    some round), in which case the order between them is not settled by this run."""
    others = [r for r in rows if r is not best and r.ok and r.latency_median_ms is not None]
    second = _fastest(others)
    if best is None or second is None:
        return second, False
    close = second.latency_median_ms <= best.latency_median_ms * (1 + CLOSE_CALL)  # type: ignore[operator]
    a, b = _round_medians(best), _round_medians(second)
    overlap = bool(a and b) and min(b) <= max(a)
    return second, close or overlap


def _round_medians(r: BenchRecord) -> list[float]:
    try:
        return [float(v) for v in r.latency_round_medians.split()] if r.latency_rounds > 1 else []
    except ValueError:  # a hand-edited record: fall back to the p50 alone
        return []


# A teacher deployment counts when its metric is within this of the teacher's PyTorch FP32 metric.
DEPLOYMENT_TOLERANCE = 0.01  # 1 point of Dice / BAcc


def deployments(rows: Iterable[BenchRecord], fp32: BenchRecord | None) -> list[BenchRecord]:
    """Rows (of one model) that count as its deployments: ok, timed, and - when `fp32` (its PyTorch
    FP32 row) has a metric - with a metric within `DEPLOYMENT_TOLERANCE` of it. Without a metric
    (random weights) every timed row counts: latency only."""
    ok = [r for r in rows if r.ok and r.latency_median_ms]
    if fp32 is None or fp32.primary_value is None:
        return ok
    floor = fp32.primary_value - DEPLOYMENT_TOLERANCE - 1e-9
    return [r for r in ok if r.primary_value is not None and r.primary_value >= floor]


def best_deployment(rows: list[BenchRecord], output: str = "") -> tuple[BenchRecord | None, bool]:
    """(fastest row, same contract): the fastest row whose output contract is `output` when one
    exists (the comparison is then like for like), else the fastest row of any contract."""
    same = [r for r in rows if output and r.output == output]
    best = _fastest(same) or _fastest(rows)
    return best, bool(same)


def describe_output(output: str) -> str:
    """'full logits' / 'class mask (argmax at stride 4)' for a record's `output`."""
    if output == "logits":
        return "full logits"
    if output.startswith("mask@"):
        s = output.split("@", 1)[1]
        return "class mask (argmax at full resolution)" if s == "1" else f"class mask (argmax at stride {s})"
    if output == "features":
        return "encoder features"
    return "output contract unknown"


def _p50_min(r: BenchRecord) -> str:
    return f"p50 {_ms(r.latency_median_ms)} ms, min {_ms(r.latency_min_ms)} ms"


def _times(a: BenchRecord, b: BenchRecord, bold: bool = True) -> str:
    """'**22.1x faster** at p50, 21.9x at min': row a against row b."""
    x = _speedup(a, b)
    lo = (b.latency_min_ms / a.latency_min_ms) if a.latency_min_ms and b.latency_min_ms else None
    if x is None:
        return "– vs"
    head = f"{x:.1f}x faster" if x >= 1 else f"{1 / x:.1f}x slower"
    tail = "" if lo is None else f", {lo:.1f}x at min"
    return (f"**{head}**" if bold else head) + f" at p50{tail}"


def _contract_note(a: BenchRecord, b: BenchRecord, same: bool) -> str:
    if same:
        return f"same output contract: {describe_output(a.output)}"
    return (f"{describe_output(b.output)}; output contracts differ: the student returns "
            f"{describe_output(a.output)}")


def headline(records: list[BenchRecord]) -> dict[str, Any]:
    """The figures the README quotes, per task, at the smallest batch and first thread count/size.

    best INT8 student = the fastest INT8 student row keeping >= 97 % of the teacher's primary
    metric, or the fastest INT8 student row if none does (the rule is printed with the result).
    """
    out: dict[str, Any] = {}
    ok = [r for r in records if r.ok and r.latency_median_ms is not None]
    if not ok:
        return out
    batch = min(r.batch for r in ok)
    for task in dict.fromkeys(r.task for r in ok):
        rows = [r for r in ok if r.task == task and r.batch == batch]
        threads, size = rows[0].threads, rows[0].input_h
        rows = [r for r in rows if r.threads == threads and r.input_h == size]
        teacher = next((r for r in rows if is_teacher_reference(r)), None)
        exported = _fastest([r for r in rows if r.role == "teacher" and not is_teacher_reference(r)])
        refs = {r.model: r for r in rows if r.role == "reference" and r.backend == "torch"}
        int8 = [r for r in rows if r.role == "student" and r.precision == "int8"]
        keeping = [r for r in int8 if r.metric_retention is not None and r.metric_retention >= 0.97]
        student = _fastest(keeping) or _fastest(int8)
        fp32 = [r for r in rows if r.role == "student" and r.backend == "torch" and r.primary_value is not None]
        twins = [r for r in rows if r.role == "baseline" and r.backend == "torch" and r.primary_value is not None]
        # the headline: the fastest student artifact against each model's fastest deployment
        arts = [r for r in rows if r.role == "student" and r.backend not in SOURCE_BACKENDS]
        kept = [r for r in arts if r.metric_retention is not None and r.metric_retention >= 0.97]
        art = _fastest(kept) or _fastest(arts)
        second, close = runner_up(kept if art in kept else arts, art)
        output = art.output if art is not None else ""
        t_best, t_same = best_deployment(deployments([r for r in rows if r.role == "teacher"], teacher), output)
        groups: dict[str, list[BenchRecord]] = {}
        for r in rows:
            if r.role == "reference":
                groups.setdefault(r.base_model or r.model, []).append(r)
        ref_best = {}
        for name, group in groups.items():
            torch_row = next((r for r in group if r.backend == "torch"), None)
            best, same = best_deployment(deployments(group, torch_row), output)
            if best is not None and any(r.backend not in SOURCE_BACKENDS for r in group):
                ref_best[name] = dict(fp32=torch_row, best=best, same=same)
        out[task] = dict(batch=batch, threads=threads, size=size, teacher=teacher, teacher_exported=exported,
                         references=refs, student=student, students_fp32=fp32, baselines=twins, student_rule="kept >= 97% of the teacher metric"
                         if student is not None and student in keeping else "fastest INT8 student (none kept >= 97%)",
                         student_artifact=art, artifact_rule="kept >= 97% of the teacher metric" if art in kept
                         else "none kept >= 97% of the teacher metric" if teacher and teacher.primary_value is not None
                         else "latency only", teacher_best=t_best, teacher_best_same_output=t_same,
                         reference_best=ref_best, artifact_runner_up=second, artifact_close_call=close)
    return out


def headline_comparison(h: dict[str, Any]) -> list[str]:
    """The headline of one task (markdown): the fastest student artifact vs the teacher's fastest
    deployment within 1 point of its PyTorch FP32 metric and vs each reference size's fastest
    deployment (latency only for random weights), with p50 and min and the output contract of
    both sides; each also vs PyTorch FP32."""
    a, t, tb = h.get("student_artifact"), h.get("teacher"), h.get("teacher_best")
    if a is None:
        return []
    lines = [f"- **Headline: fastest student artifact `{a.label}`** ({_p50_min(a)}; {describe_output(a.output)}; "
             f"{h['artifact_rule']})"]
    second = h.get("artifact_runner_up")
    if second is not None and h.get("artifact_close_call"):
        lines.append(f"  - too close to call on this machine: runner-up `{second.label}` {_p50_min(second)}"
                     f"{_rounds_text(a, second)}")
    if tb is not None:
        metric = ""
        if t is not None and t.primary_value is not None:
            metric = (f"within 1 pt of its PyTorch FP32 {t.primary_metric} ({_f(tb.primary_value, 4)} vs "
                      f"{_f(t.primary_value, 4)}), ")
        lines.append(f"  - vs the teacher's fastest deployment {'' if metric else '(no metric: latency only) '}"
                     f"`{tb.label}` ({metric}{_p50_min(tb)}; {_contract_note(a, tb, h['teacher_best_same_output'])}): "
                     f"{_times(a, tb)}"
                     + (f"; vs the teacher in PyTorch FP32 ({describe_output(t.output)}, {_p50_min(t)}): "
                        f"{_times(a, t, bold=False)}" if t is not None and t is not tb else ""))
    for name, ref in h.get("reference_best", {}).items():
        best, fp32 = ref["best"], ref["fp32"]
        rw = "random weights: latency only" if best.weights == "random" else (
            f"{best.primary_metric} {_f(best.primary_value, 4)}" if best.primary_value is not None else "no metric")
        lines.append(f"  - vs `{name}`'s fastest deployment `{best.label}` ({rw}; {_p50_min(best)}; "
                     f"{_contract_note(a, best, ref['same'])}): {_times(a, best)}"
                     + (f"; vs `{name}` PyTorch FP32 ({describe_output(fp32.output)}, {_p50_min(fp32)}): "
                        f"{_times(a, fp32, bold=False)}" if fp32 is not None and fp32 is not best else ""))
    return lines


def _rounds_text(a: BenchRecord, b: BenchRecord) -> str:
    ra, rb = _round_medians(a), _round_medians(b)
    if not ra or not rb:
        return ""
    return f" (round medians {' / '.join(_ms(v) for v in ra)} ms vs {' / '.join(_ms(v) for v in rb)} ms)"


def headline_summary(h: dict[str, Any]) -> str:
    """One plain line of the headline (plot subtitle): 'student openvino int8 6.04 ms: 1.6x vs teacher
    openvino int8 (9.69 ms), 22.1x vs mirage-base openvino int8 (174.0 ms)'. Speed-ups at p50."""
    a = h.get("student_artifact")
    if a is None:
        return ""
    parts = []
    refs = h.get("reference_best", {})
    for best, what in [(h.get("teacher_best"), "teacher's best deployment"),
                       *((ref["best"], f"{name}'s best deployment") for name, ref in refs.items())]:
        x = _speedup(a, best)
        if best is not None and x is not None:
            parts.append(f"{x:.1f}x vs {what} {best.backend} {best.precision} ({_ms(best.latency_median_ms)} ms)")
    return f"fastest student artifact {a.label} {_ms(a.latency_median_ms)} ms: " + ", ".join(parts) if parts else ""


def best_teacher_rows(records: Iterable[BenchRecord]) -> dict[tuple[Key, str], BenchRecord]:
    """Per (conditions, output contract): the teacher's fastest deployment within 1 point of its
    PyTorch FP32 metric, of that contract when one exists (key (k, "") holds the fastest of any)."""
    records = list(records)
    teachers = teacher_rows(records)
    groups: dict[Key, list[BenchRecord]] = {}
    for r in records:
        if r.role == "teacher":
            groups.setdefault(_key(r), []).append(r)
    out: dict[tuple[Key, str], BenchRecord] = {}
    for k, group in groups.items():
        rows = deployments(group, teachers.get(k))
        for output in {"", *(r.output for r in rows)}:
            best, _ = best_deployment(rows, output)
            if best is not None:
                out[(k, output)] = best
    return out


def _best_teacher_ratio(r: BenchRecord, best: dict[tuple[Key, str], BenchRecord]) -> str:
    """'3.2x' = the teacher's fastest deployment (same contract when there is one) / this row, at p50."""
    b = best.get((_key(r), r.output)) or best.get((_key(r), ""))
    x = _speedup(r, b)
    return "–" if x is None else f"{x:.1f}x"


def headline_lines(records: list[BenchRecord]) -> list[str]:
    lines: list[str] = []
    for task, h in headline(records).items():
        t, e, s = h["teacher"], h["teacher_exported"], h["student"]
        lines.append(f"### Task `{task or '(latency only)'}` — batch {h['batch']}, {h['size']}x{h['size']}, "
                     f"{h['threads']} threads")
        lines += headline_comparison(h)
        if t:
            lines.append(f"- Teacher, {t.label}: **{_ms(t.latency_median_ms)} ms** median"
                         + (f", {t.primary_metric} {_f(t.primary_value, 4)}" if t.primary_value is not None else ""))
        if e:
            lines.append(f"- Best exported teacher form, {e.label}: {_ms(e.latency_median_ms)} ms "
                         f"({_faster(e, t)} than {t.label if t else 'the teacher'})")
        if s:
            lines.append(f"- Best INT8 student ({h['student_rule']}): **{s.label}: {_ms(s.latency_median_ms)} ms**")
            if t:
                lines.append(f"  - {_faster(s, t)} than the teacher row ({t.label})")
            for name, ref in h["references"].items():
                rw = " (random weights)" if ref.weights == "random" else ""
                lines.append(f"  - {_faster(s, ref, bold=True)} than `{name}` PyTorch FP32{rw} "
                             f"({_ms(ref.latency_median_ms)} ms)")
            if s.metric_retention is not None:
                lines.append(f"  - keeps **{100 * s.metric_retention:.1f}%** of the teacher's {s.primary_metric} "
                             f"({_f(s.primary_value, 4)} vs {_f(t.primary_value if t else None, 4)}); "
                             f"agreement with the teacher {_f(s.teacher_agreement, 4)}")
        for b in h["baselines"]:
            for st in h["students_fp32"]:
                gain = 100 * (st.primary_value - b.primary_value)
                lines.append(f"- KD gain of {st.label} (PyTorch FP32) over the same student trained on labels alone "
                             f"({b.label}): **{gain:+.2f} points** of {b.primary_metric} ({_f(st.primary_value, 4)} vs "
                             f"{_f(b.primary_value, 4)})")
            if t and t.primary_value is not None and b.primary_value > t.primary_value:
                lines.append(f"  - the teacher ({_f(t.primary_value, 4)}) is weaker than {b.label}: retention of the "
                             "teacher is no evidence of a good student here")
        lines.append("")
    return lines


def _share(r: BenchRecord) -> str:
    """Quantized share of an int8 row's compute ops ("?" for an int8 row whose file was not counted)."""
    if r.precision != "int8":
        return "–"
    return "?" if r.quantized_share is None else f"{100 * r.quantized_share:.0f}%"


def _pct(share: float | None) -> str:
    return "–" if share is None else f"{100 * share:.1f}%"


def _table(records: list[BenchRecord], teachers: dict[Key, BenchRecord], timing: Any = None) -> list[str]:
    kinds = {r.task_kind for r in records}
    metrics = [m for m in (*CLS_METRICS, *SEG_METRICS) if any(getattr(r, m) is not None for r in records)]
    if not metrics:
        metrics = [PRIMARY_METRIC[k] for k in sorted(kinds) if k in PRIMARY_METRIC]
    head = (["model", "role", "backend", "precision", "int8 ops", "output", "threads", "batch", "input", "median ms",
             "min", "p90", "p99", "max", "n", "rounds", "engine ms", "runtime ms",
             "latency / teacher", "x best teacher", "img/s", "load s", "peak RSS MB",
             "size MB", "params M", "GFLOPs", "GOP/s", "% INT8 peak"] + metrics + ["retention", "agree", "notes"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    best = best_teacher_rows(records)
    for r in records:
        ratio = latency_ratio(r, teachers)
        ratio_s = "–" if ratio is None else f"{ratio:.3f} ({1 / ratio:.1f}x)" if ratio > 0 else "–"
        cells = [f"`{r.model}`", r.role, r.backend, r.precision, _share(r), r.output or "–", str(r.threads),
                 str(r.batch), f"{r.input_h}x{r.input_w}", _ms(r.latency_median_ms), _ms(r.latency_min_ms),
                 _ms(r.latency_p90_ms), _ms(r.latency_p99_ms), _ms(r.latency_max_ms), str(r.latency_n),
                 str(r.latency_rounds or "–"), _ms(r.latency_engine_ms), _ms(r.latency_runtime_ms), ratio_s,
                 _best_teacher_ratio(r, best), _f(r.throughput_ips, 1), _f(r.load_time_s, 2),
                 _f(r.peak_rss_mb, 0), _f(r.file_size_mb, 2), _f(r.params_m, 2), _f(r.gflops, 2), _f(gops(r), 1),
                 _pct(peak_share(r, timing))]
        cells += [_f(getattr(r, m), 2 if m == "hd95" else 4) for m in metrics]
        cells += [_f(None if r.metric_retention is None else 100 * r.metric_retention, 1) + ("%" if
                  r.metric_retention is not None else ""), _f(r.teacher_agreement, 4), r.notes.replace("|", "/")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render_markdown(records: list[BenchRecord], hw: HardwareInfo, *, suite: Any = None,
                    plot_name: str | None = "pareto.png") -> str:
    teachers = teacher_rows(records)
    name = records[0].suite if records else getattr(suite, "name", "")
    run_id = records[0].run_id if records else ""
    lines = [f"# mirage-edge benchmark: suite `{name}`", "", f"Run `{run_id}`. Records: `records.csv` / "
             "`records.json` (one row per model x backend x precision x threads x batch x input size x task).", ""]
    lines += ["## Machine", "", hw.markdown(), ""]
    tm = getattr(suite, "timing", None)
    rss = next((r.rss_method for r in records if r.rss_method), "")
    lines += ["## Method", ""]
    if tm is not None:
        lines.append(f"- Latency: wall time of one inference call on a preprocessed B x 1 x H x W float32 input "
                     f"(`time.perf_counter`, GC paused); {tm.warmup} warm-up calls (and >= {tm.min_warmup_s} s), then "
                     f"at least {tm.min_iters} and at most {tm.max_iters} timed calls, stopping after {tm.budget_s} s "
                     "of timed calls (`n` = calls timed; with few calls p99 is close to max).")
        rounds = max((r.latency_rounds for r in records), default=0)
        if rounds > 1:
            lines.append(f"- Rounds: rows under {ROUND_MAX_CALL_MS:.0f} ms per call were timed in {rounds} rounds "
                         f"(a fresh process each, the rows visited in alternating order, "
                         f"{tm.budget_s / rounds:.2g} s of timed calls per round); "
                         "`median ms` is the median of the round medians and every pick of a fastest row uses it. "
                         "Slower rows were timed once.")
        if tm.omp_wait_policy:
            lines.append(f"- Worker processes run with OMP_WAIT_POLICY={tm.omp_wait_policy} (idle OpenMP threads sleep "
                         "instead of spinning, which keeps PyTorch usable on a shared CPU).")
    loads = [r.load_avg for r in records if r.load_avg is not None]
    if loads:
        cpus = max((r.cpu_count for r in records), default=0)
        warn = (" **The CPU was shared with other work while timing: latencies are upper bounds.**"
                if cpus and max(loads) > cpus else "")
        lines.append(f"- 1-minute load average while timing: {min(loads):.1f}-{max(loads):.1f} on {cpus} CPUs.{warn}")
    lines += ["- Artifact rows time their engine on a model compiled for the row's input shape with one reused "
              "infer request, the input copied in and the output copied out (`timed_call`); timed call by call "
              "beside it: `engine ms` = the same request on its bound input without copies (what OpenVINO's "
              "`benchmark_app` reports) and `runtime ms` = the mirage-edge runtime's `Predictor.run` "
              "(dynamic batch axis, input and output validation).",
              "- Throughput = batch / median latency. Load time = building the model / session "
              "(incl. reading weights).",
              f"- Peak RSS: {rss or 'not measured'}.",
              "- GFLOPs: 2 x MACs of matmul/conv/attention of the PyTorch model at batch 1 "
              "(torch FlopCounterMode); exported rows reuse their PyTorch model's count.",
              "- GOP/s = GFLOPs x batch / median seconds (GFLOP/s for float rows; ops the model needs, not the "
              "ops the engine executes). `% INT8 peak` = GOP/s / " + _peak_text(tm) + ".",
              "- Accuracy: each row's own model or artifact, with its own preprocessing, on the task's split; "
              "retention = row metric / teacher PyTorch metric; agreement = same top-1 class (cls) or mean "
              "foreground Dice between the two predicted masks (seg).",
              "- Rows with random weights (reference sizes without official weights) are latency-only.",
              "- `latency / teacher`: this row's median / the teacher PyTorch FP32 median for the same task, "
              "threads, batch and input size, measured in this run.",
              "- `x best teacher`: how much faster this row is (p50) than the teacher's fastest deployment whose "
              "metric is within 1 point of its PyTorch FP32 metric, of the same output contract (`output`: "
              "`logits` = full logits, `mask@S` = class mask with the argmax at stride S) when the teacher has one.",
              "- Headline: the fastest student artifact (keeping >= 97% of the teacher's metric when metrics exist) "
              "vs the teacher's and each reference size's fastest deployment (reference sizes with random weights: "
              "latency only), same output contract preferred and stated, and vs PyTorch FP32.", ""]
    lines += ["## Headline", ""] + headline_lines(records)
    ran = [r for r in records if r.status == "ok"]
    for task in dict.fromkeys(r.task for r in ran):
        rows = [r for r in ran if r.task == task]
        kind = rows[0].task_kind
        lines += [f"## Results: task `{task or '(none)'}`" + (f" ({kind}; primary metric "
                  f"{PRIMARY_METRIC.get(kind, '?')})" if kind else ""), ""]
        lines += _table(rows, teachers, tm) + [""]
    bad = [r for r in records if r.status != "ok"]
    if bad:
        lines += ["## Not run or failed", "", "| model | backend | precision | task | source | status | stage | error |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in bad:
            lines.append(f"| `{r.model}` | {r.backend or '–'} | {r.precision or '–'} | {r.task or '–'} | "
                         f"`{r.source or '–'}` | {r.status} | {r.stage} | {r.error.replace('|', '/')} |")
        lines.append("")
    if plot_name:
        lines += ["## Latency vs. metric", "", f"![latency vs metric]({plot_name})", ""]
    return "\n".join(lines)


def _peak_text(tm: Any) -> str:
    """Where the INT8 peak of the Method section comes from."""
    peak = float(getattr(tm, "int8_peak_gops", 0.0) or 0.0)
    if peak:
        return (f"{peak:g} GOP/s (the suite's `timing.int8_peak_gops`), for INT8 CPU rows at "
                f"{getattr(tm, 'peak_threads', INT8_PEAK_THREADS)} threads")
    return (f"{INT8_PEAK_GOPS:g} GOP/s, the INT8 peak measured as an {INT8_PEAK_SOURCE}; shown for INT8 CPU rows "
            f"at {INT8_PEAK_THREADS} threads on a `{INT8_PEAK_CPU[0]}` CPU with `{INT8_PEAK_CPU[1]}` (a suite's "
            "`timing.int8_peak_gops` sets another)")


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Non-dominated points (lower latency, higher metric), sorted by latency."""
    front: list[tuple[float, float]] = []
    best = -math.inf
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    return front


def plot_pareto(records: list[BenchRecord], path: str | Path) -> Path | None:
    """Median latency (log x) vs primary metric, one panel per evaluated task. Points are numbered
    (fastest first) and listed beside the panel with their numbers; random-weight reference rows are
    labelled vertical lines (latency only). Returns None if nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r.ok and r.latency_median_ms]
    if not ok:
        return None
    batch = min(r.batch for r in ok)
    tasks = [t for t in dict.fromkeys(r.task for r in ok)
             if any(r.task == t and r.primary_value is not None for r in ok)]
    if not tasks:
        return None
    fig, axes = plt.subplots(len(tasks), 1, figsize=(12, 5.6 * len(tasks)), squeeze=False)
    heads = headline(records)
    colors = {"teacher": "tab:red", "student": "tab:blue", "reference": "tab:gray", "candidate": "tab:green"}
    markers = {"fp32": "o", "bf16": "D", "fp16": "D", "int8": "s"}
    for ax, task in zip(axes[:, 0], tasks):
        rows = [r for r in ok if r.task == task and r.batch == batch]
        threads, size = rows[0].threads, rows[0].input_h
        rows = sorted((r for r in rows if r.threads == threads and r.input_h == size),
                      key=lambda r: r.latency_median_ms)  # type: ignore[arg-type,return-value]
        scored = [r for r in rows if r.primary_value is not None]
        metric = scored[0].primary_metric
        listing = []
        for i, r in enumerate(scored, 1):
            ax.scatter(r.latency_median_ms, r.primary_value, c=colors.get(r.role, "k"),
                       marker=markers.get(r.precision, "o"), s=70, zorder=3, edgecolors="black", linewidths=0.5)
            # alternate above/below so neighbours with equal metric stay readable
            ax.annotate(str(i), (r.latency_median_ms, r.primary_value), textcoords="offset points",
                        xytext=(0, 7 if i % 2 else -13), ha="center", fontsize=8, fontweight="bold")
            listing.append(f"{i:>2}  {r.model} {r.backend} {r.precision}: {_ms(r.latency_median_ms)} ms, "
                           f"{metric} {r.primary_value:.3f}")
        front = pareto_front([(r.latency_median_ms, r.primary_value) for r in scored])  # type: ignore[misc]
        if len(front) > 1:
            ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="tab:blue", alpha=0.5,
                    lw=1.2, label="Pareto front")
        ys = [r.primary_value for r in scored]
        lo, hi = min(ys), max(ys)  # type: ignore[type-var]
        pad = max(0.03, 0.15 * (hi - lo))  # type: ignore[operator]
        for r in rows:
            if r.primary_value is None:
                ax.axvline(r.latency_median_ms, color="tab:gray", ls="--", lw=1)
                ax.text(r.latency_median_ms, hi + pad * 0.9, f"{r.model} {r.backend} {r.precision} "
                        f"{_ms(r.latency_median_ms)} ms\n({'random weights, ' if r.weights == 'random' else ''}"
                        "latency only)", fontsize=7, color="dimgray", rotation=90, va="top", ha="right")
                listing.append(f"  |  {r.model} {r.backend} {r.precision}: {_ms(r.latency_median_ms)} ms "
                               f"({'random weights, ' if r.weights == 'random' else ''}no metric)")
        teacher = next((r for r in scored if is_teacher_reference(r)), None)
        if teacher is not None:
            ax.axhline(teacher.primary_value, color="tab:red", ls=":", lw=1, label="teacher (PyTorch FP32)")
            ax.axhline(0.97 * teacher.primary_value, color="tab:red", ls="--", lw=0.8, alpha=0.5,
                       label="97% of teacher")
        ax.set_xscale("log")
        xs = [r.latency_median_ms for r in rows]
        ax.set_xlim(min(xs) / 1.5, max(xs) * 1.5)  # type: ignore[operator]
        ax.set_ylim(lo - pad, hi + pad)  # type: ignore[operator]
        ax.set_xlabel(f"median latency, ms (batch {batch}, {size}x{size}, {threads} threads; log scale)")
        ax.set_ylabel(f"{metric} ({task})")
        summary = headline_summary(heads.get(task, {}))
        if summary:  # the headline, wrapped to the panel's width
            import textwrap

            summary = "\n".join(textwrap.wrap(f"Headline: {summary} (p50)", 95))
        ax.set_title(f"{task}: latency vs {metric} (suite {rows[0].suite})" + (f"\n{summary}" if summary else ""),
                     fontsize=9 if summary else None)
        best = heads.get(task, {}).get("teacher_best")
        if best is not None and best.primary_value is not None:  # ring the teacher's best deployment
            ax.scatter(best.latency_median_ms, best.primary_value, s=260, facecolors="none", edgecolors="tab:red",
                       linewidths=1.2, zorder=2, label="teacher's fastest deployment (within 1 pt)")
        ax.grid(True, which="both", alpha=0.3)
        ax.text(1.02, 1.0, "\n".join(listing), transform=ax.transAxes, va="top", ha="left", fontsize=8,
                family="monospace")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 0.16))
    fig.text(0.01, 0.005, "red: teacher, blue: student, grey: reference; square: INT8, circle: FP32; "
             "| = latency-only row (dashed line)", fontsize=7, color="dimgray")
    fig.tight_layout()
    fig.subplots_adjust(right=0.6)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def write_report(records: list[BenchRecord], hw: HardwareInfo, out_dir: str | Path, *,
                 suite: Any = None) -> dict[str, Path]:
    """Write `report.md` and `pareto.png` (when some row has a metric) into `out_dir`."""
    from mirage_edge._deps import has

    out = Path(out_dir)
    paths: dict[str, Path] = {}
    # a device with only a runtime installed still gets records and the markdown report
    png = plot_pareto(records, out / "pareto.png") if has("matplotlib") else None
    if png is not None:
        paths["plot"] = png
    paths["report"] = out / "report.md"
    atomic_write_text(paths["report"], render_markdown(records, hw, suite=suite,
                                                       plot_name="pareto.png" if png else None) + "\n")
    return paths


def print_table(records: list[BenchRecord]) -> str:
    """Compact plain-text table for the terminal (the demo's last output)."""
    teachers = teacher_rows(records)
    best = best_teacher_rows(records)
    head = ["model", "backend", "prec", "output", "b", "input", "median ms", "min ms", "x teacher", "x best teacher",
            "metric", "retention", "status"]
    rows = [head]
    for r in records:
        ratio = latency_ratio(r, teachers)
        rows.append([r.model, r.backend or "-", r.precision or "-", r.output or "-", str(r.batch), f"{r.input_h}",
                     _ms(r.latency_median_ms), _ms(r.latency_min_ms),
                     "-" if not ratio else f"{1 / ratio:.1f}x", _best_teacher_ratio(r, best).replace("–", "-"),
                     f"{r.primary_metric} {_f(r.primary_value, 4)}" if r.primary_value is not None else "-",
                     f"{100 * r.metric_retention:.1f}%" if r.metric_retention is not None else "-",
                     r.status if r.ok else f"{r.status}: {r.error[:60]}"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows)


__all__ = ["render_markdown", "plot_pareto", "pareto_front", "write_report", "headline", "headline_lines", "teacher_rows",
           "latency_ratio", "print_table", "headline_comparison", "headline_summary", "best_deployment", "deployments",
           "best_teacher_rows", "describe_output", "DEPLOYMENT_TOLERANCE", "runner_up", "CLOSE_CALL", "gops", "int8_peak",
           "peak_share", "INT8_PEAK_GOPS", "INT8_PEAK_THREADS", "INT8_PEAK_CPU", "INT8_PEAK_SOURCE"]
