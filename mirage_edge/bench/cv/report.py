"""Cross-validation records and their report (torch-free): one fold's result from its distillation
report, the summary over folds, cv.json and README.md.

A fold's numbers are those of its `distill` report.json (`test` section: the teacher, the distilled
student, the labels-only twin and their INT8 forms, all evaluated by `distill` on the fold's test
subjects), copied, never recomputed, so the table equals the per-fold reports.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import statistics
from typing import Any

SCHEMA = "mirage-edge/cv"
SCHEMA_VERSION = 1

# (our name, key of the value in report["test"], key of its metrics table there)
MODELS = (("teacher", "teacher_value", "teacher"), ("student", "student_value", "student_fp32"),
          ("twin", "baseline_value", "baseline_fp32"), ("student_int8", "int8_value", "student_int8_ort"),
          ("twin_int8", "baseline_int8_value", "baseline_int8_ort"))
LABELS = {"teacher": "teacher", "student": "distilled FP32", "twin": "twin FP32", "student_int8": "distilled INT8",
          "twin_int8": "twin INT8"}
GAINS = (("kd_gain_points", "kd_gain_ci95_points"), ("kd_gain_int8_points", "kd_gain_int8_ci95_points"))
SUMMARY_KEYS = ("teacher_best_val", "teacher", "student", "twin", "kd_gain_points", "student_int8", "twin_int8", "kd_gain_int8_points",
                "teacher_own_eval", "seconds")


def fold_result(fold: dict[str, Any], teacher: dict[str, Any], report: dict[str, Any],
                seconds: dict[str, float], resumed: bool) -> dict[str, Any]:
    """One fold's record: its subjects and image counts (`fold`, as fold.json), the teacher fine-tune
    (`teacher`, as teacher.json), the values of the distill report's test section, per-subject Dice,
    and the wall seconds of each stage."""
    test = report.get("test") or {}
    values: dict[str, Any] = {name: test[key] for name, key, _ in MODELS if key in test}
    for gain, ci in GAINS:
        if gain in test:
            values[gain] = test[gain]
            values[gain.replace("_points", "_ci95_points")] = test.get(ci)
    per_subject = {name: dict(test[table]["per_volume_dice"]) for name, _, table in MODELS
                   if isinstance(test.get(table), dict) and "per_volume_dice" in test[table]}
    auroc = {name: test[table]["presence_auroc"] for name, _, table in MODELS
             if isinstance(test.get(table), dict) and "presence_auroc" in test[table]}
    stage2 = (report.get("stages") or {}).get("stage2") or {}
    out = {**fold, "metric": test.get("metric"), "test_images": test.get("n"), **values,
           "teacher_own_eval": teacher.get("test", {}).get("dice"),
           "teacher_best_val": teacher.get("val", {}).get("dice"), "teacher_best_step": teacher.get("best_step"),
           "per_subject": per_subject, "presence_auroc": auroc, "seconds": seconds, "resumed": resumed}
    if "alpha" in stage2:
        out["stage2_alpha"] = stage2["alpha"]
    if "teacher_weaker_than_baseline" in test:
        out["note"] = test["teacher_weaker_than_baseline"]
    return out


def _mean_std(values: list[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values)}


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and sample standard deviation (n - 1) over folds of every headline value, and the mean
    per-subject Dice over all tested subjects (each subject is tested in exactly one fold)."""
    out: dict[str, Any] = {}
    for key in SUMMARY_KEYS:
        vals = [r["seconds"]["total"] if key == "seconds" else r.get(key) for r in results]
        vals = [float(v) for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if vals:
            out[key] = _mean_std(vals)
    subjects: dict[str, list[float]] = {}
    for r in results:
        for name, per in r.get("per_subject", {}).items():
            subjects.setdefault(name, []).extend(float(v) for v in per.values())
    out["per_subject_mean"] = {name: _mean_std(v) for name, v in subjects.items()}
    return out


def per_subject_table(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """subject -> {"fold": k, model: Dice, ...} over the folds that ran."""
    from mirage_edge.bench.cv.folds import natural_key

    rows: dict[str, dict[str, Any]] = {}
    for r in results:
        for name, per in r.get("per_subject", {}).items():
            for subject, v in per.items():
                rows.setdefault(subject, {"fold": r["fold"]})[name] = v
    return {k: rows[k] for k in sorted(rows, key=natural_key)}


def cv_record(*, plan: dict[str, Any], results: list[dict[str, Any]], command: str, commit: str,
              hardware: dict[str, Any], invocation_seconds: float) -> dict[str, Any]:
    """The content of cv.json (schema `SCHEMA`, version `SCHEMA_VERSION`)."""
    done = sorted(r["fold"] for r in results)
    return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": command, "commit": commit,
            "fold_commits": {str(r["fold"]): r["commit"] for r in results if "commit" in r},
            "data": plan["data"], "folds_planned": plan["folds"],
            "folds_done": done, "complete": done == list(range(plan["folds"])),
            "fold_subjects": plan["fold_subjects"], "settings": plan["settings"],
            "metric": next((r["metric"] for r in results if r.get("metric")), None),
            "folds": sorted(results, key=lambda r: r["fold"]), "summary": summarize(results),
            "per_subject": per_subject_table(results), "hardware": hardware,
            "wall_seconds": {"folds_sum": sum(r["seconds"]["total"] for r in results),
                             "this_invocation": invocation_seconds}}


# ------------------------------------------------------------------------------------- markdown
def fmt_value(v: Any, digits: int = 4) -> str:
    """`v` with `digits` decimals; "-" for a missing or NaN value."""
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _gain(v: Any, ci: Any) -> str:
    if v is None:
        return "-"
    return f"{v:+.2f} [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else f"{v:+.2f}"


def _ms(s: dict[str, Any] | None, digits: int = 4, signed: bool = False) -> str:
    if not s:
        return "-"
    fmt = f"{{:{'+' if signed else ''}.{digits}f}}"
    std = f" ± {s['std']:.{digits}f}" if s["std"] is not None else ""
    return fmt.format(s["mean"]) + std


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min {s:02d} s" if h else f"{m} min {s:02d} s"


def _commit_line(record: dict[str, Any]) -> str:
    """The code the folds ran on (from their records) and, where it differs, the code writing the report."""
    by_commit: dict[str, list[str]] = {}
    for fold, c in sorted(record.get("fold_commits", {}).items()):
        by_commit.setdefault(c, []).append(fold)
    if not by_commit or set(by_commit) == {record["commit"]}:
        return f"- Commit: `{record['commit']}`"
    ran = "; ".join(f"`{c}` (folds {', '.join(f)})" for c, f in by_commit.items()) if len(by_commit) > 1 \
        else f"`{next(iter(by_commit))}`"
    return f"- Commit: the folds ran on {ran}; this report was written on `{record['commit']}`"


def markdown(record: dict[str, Any], hardware_md: str, notes: list[str] = ()) -> str:
    """README.md of a cross-validation: command, commit, hardware, wall time, one row per fold plus
    mean ± std over folds, and per-subject Dice."""
    results, summary = record["folds"], record["summary"]
    metric = record.get("metric") or "dice"
    metric = "Dice" if metric == "dice" else metric
    has = {k: any(r.get(k) is not None for r in results) for k in ("twin", "student_int8", "twin_int8")}
    cols = [("teacher_best_val", "teacher (best val)", False), ("teacher", LABELS["teacher"], False),
            ("student", LABELS["student"], False)]
    if has["twin"]:
        cols += [("twin", LABELS["twin"], False), ("kd_gain_points", "KD gain FP32 (pts, 95% CI)", True)]
    if has["student_int8"]:
        cols += [("student_int8", LABELS["student_int8"], False)]
    if has["twin_int8"]:
        cols += [("twin_int8", LABELS["twin_int8"], False), ("kd_gain_int8_points", "KD gain INT8 (pts, 95% CI)", True)]
    planned, done = record["folds_planned"], record["folds_done"]
    wall = record["wall_seconds"]
    lines = [f"# {planned}-fold subject-wise cross-validation: teacher fine-tune + distillation", ""]
    if not record["complete"]:
        missing = [k for k in range(planned) if k not in done]
        lines += [f"**Incomplete: folds {missing} have not run; the mean is over folds {done} only.**", ""]
    lines += ["```", record["command"], "```", "", _commit_line(record),
              f"- Data: `{record['data']['path']}` ({len(record['data']['subjects'])} subjects, "
              f"{record['data']['images']} B-scans, all splits pooled)",
              f"- Wall time: {_duration(wall['folds_sum'])} for the {len(done)} fold(s) "
              f"(this invocation {_duration(wall['this_invocation'])})",
              f"- Created: {record['created']}", "", "## Machine", "", hardware_md, ""]
    if notes:
        lines += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    head = ["fold", "test subjects", "val subjects", "train B-scans", *[c[1] for c in cols], "wall"]
    lines += [f"## Test {metric} per fold", "",
              "Each fold: the teacher fine-tuned on its train subjects (checkpoint chosen on its val subjects), "
              "then distilled into the student (every setting chosen on val); all models evaluated once, by "
              "`distill`, on the fold's test subjects. KD gain = distilled - twin in points, paired bootstrap 95% "
              "CI over the test B-scans within their subjects.", "",
              "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [str(r["fold"]), ", ".join(r["test"]), ", ".join(r["val"]), str(r["images"]["train"])]
        for key, _, gain in cols:
            cells.append(_gain(r.get(key), r.get(key.replace("_points", "_ci95_points"))) if gain
                         else fmt_value(r.get(key)))
        cells.append(f"{r['seconds']['total']:.0f} s" + (" (resumed)" if r.get("resumed") else ""))
        lines.append("| " + " | ".join(cells) + " |")
    cells = ["**mean ± std**", "", "", ""]
    cells += [_ms(summary.get(key), 2 if gain else 4, signed=gain) for key, _, gain in cols]
    cells.append(_ms(summary.get("seconds"), 0) + " s" if summary.get("seconds") else "-")
    lines += ["| " + " | ".join(cells) + " |", ""]
    weaker = [r["fold"] for r in results if r.get("note")]
    lines += ["Mean ± sample standard deviation (n - 1) over the folds. \"teacher (best val)\": the teacher's "
              f"{metric} on the fold's val subjects at the checkpoint kept. Teacher test {metric} as fine-tuning "
              f"itself measured it (its own evaluation, same test subjects): {_ms(summary.get('teacher_own_eval'))}."
              + (f" The teacher is weaker than the labels-only twin on the test subjects in {len(weaker)} of "
                 f"{len(results)} folds ({', '.join(map(str, weaker))})." if has["twin"] else ""), ""]
    subjects = record["per_subject"]
    if subjects:
        names = [n for n in LABELS if any(n in row for row in subjects.values())]
        lines += [f"## Test {metric} per subject", "",
                  "Mean Dice over the scored classes of each subject's B-scans, from the fold that tests it.", "",
                  "| subject | fold | " + " | ".join(LABELS[n] for n in names) + " |",
                  "|" + "---|" * (len(names) + 2)]
        for subject, row in subjects.items():
            lines.append(f"| {subject} | {row['fold']} | " + " | ".join(fmt_value(row.get(n)) for n in names) + " |")
        per = summary.get("per_subject_mean", {})
        lines += ["| **mean ± std over subjects** | | " + " | ".join(_ms(per.get(n)) for n in names) + " |", ""]
    lines += ["`cv.json` holds every number above, the resolved settings, the subjects of every split of every "
              "fold and the hardware.", ""]
    return "\n".join(lines)


def dumps(record: dict[str, Any]) -> str:
    return json.dumps(record, indent=1, default=str) + "\n"


__all__ = ["fold_result", "summarize", "per_subject_table", "cv_record", "markdown", "dumps", "fmt_value", "SCHEMA",
           "SCHEMA_VERSION"]
