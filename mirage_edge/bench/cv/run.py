"""`run_cv(spec)`: k-fold subject-wise cross-validation of the whole chain, teacher fine-tune then
distillation (with the labels-only twin), one fold after another.

Per fold k (subjects: `mirage_edge.bench.cv.folds`)::

    OUT/plan.json             the folds and the resolved settings (a resumed run must match them)
    OUT/fold<k>/fold.json     the fold's subjects and B-scan counts per split
    OUT/fold<k>/data/         the fold's RetinaBench folder: links to the original files
    OUT/fold<k>/pretrain/     with --pretrain-config: `mirage-edge train pretrain` on the fold's train
                              B-scans (val/ for its loss; test/ never read); the teacher starts from its best/
    OUT/fold<k>/pretrain.json written when pretraining is done: its best checkpoint and wall seconds
    OUT/fold<k>/teacher/      `mirage-edge train finetune` run (best/ chosen on val, test_metrics.json)
    OUT/fold<k>/teacher.json  written when the teacher is done: its test metrics and wall seconds
    OUT/fold<k>/distill/      `mirage-edge distill` run (report.json: test of teacher, student, twin)
    OUT/fold<k>/result.json   written last: the fold's record (`mirage_edge.bench.cv.report.fold_result`)
    OUT/cv.json, OUT/README.md  over the finished folds, rewritten after each fold

The teacher is configured as `mirage-edge train finetune --config TEACHER_CONFIG --task seg --data
FOLD_DATA --out FOLD/teacher TEACHER_SETS...` would be, and the student as `mirage-edge distill --recipe
RECIPE --student STUDENT --teacher FOLD/teacher/best --data FOLD_DATA --baseline --out FOLD/distill
DISTILL_SETS...`. Every selection (the teacher's best checkpoint, distillation's validated choices) sees
the fold's val subjects only; its test subjects are evaluated once, at the end of each run.

Resume: a fold with result.json is skipped; a teacher with teacher.json is reused; an interrupted
teacher continues from its latest checkpoint and an interrupted distillation with `resume=True`
(finished stages reused). Every marker is written atomically, so an interruption loses at most the
step in progress. A rerun whose folds or settings differ from plan.json is refused.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mirage_edge import config as C
from mirage_edge._io import atomic_write_text, check_output_dir
from mirage_edge._log import progress
from mirage_edge.bench.cv import folds as F
from mirage_edge.bench.cv import report as R
from mirage_edge.errors import ConfigError

Log = Callable[[str], None]

# settings that may differ when a CV is resumed: paths of this fold and how fast it runs, not what it computes
_TEACHER_FREE = ("out_dir", "data", "loop.threads", "loop.progress", "loop.log_every", "loop.num_workers")
_PRETRAIN_FREE = ("out_dir", "data.dir", "loop.threads", "loop.progress", "loop.log_every", "loop.num_workers")
_RECIPE_FREE = ("out", "data.path", "teacher.model", "cache", "run.threads", "run.progress", "run.log_every")


@dataclass
class CVSpec:
    """What `mirage-edge cv` was asked for (the CLI's options, as they were given)."""

    data: str
    out: str
    teacher_config: str
    folds: int = 5
    pretrain_config: str | None = None     # `mirage-edge train pretrain` config run per fold before the teacher
    pretrain_sets: tuple[str, ...] = ()
    only: tuple[int, ...] = ()              # run only these folds (all when empty)
    teacher_sets: tuple[str, ...] = ()      # key=value overrides of the fine-tune config
    recipe: str | None = None               # distill recipe name or path (None: the recipe defaults)
    student: str | None = None
    baseline: bool = True
    distill_sets: tuple[str, ...] = ()      # key=value overrides of the distill recipe
    device: str | None = None               # both stages' device (None: each config's own)
    report_dir: str | None = None           # also write cv.json and README.md here (no checkpoints)
    notes: tuple[str, ...] = ()             # lines for README.md's Notes section
    command: str = ""


# ------------------------------------------------------------------------------------- configs
def pretrain_config(spec: CVSpec, data: str | Path, out_dir: str | Path) -> Any:
    """The `PretrainConfig` `mirage-edge train pretrain --config ... --data DATA --out OUT [--device ...]
    OVERRIDES` builds, or None without --pretrain-config."""
    from mirage_edge.train.config import PretrainConfig

    if not spec.pretrain_config:
        return None
    path = Path(spec.pretrain_config)
    if not path.is_file():
        raise ConfigError(f"--pretrain-config {path}: no such file (a `mirage-edge train pretrain` TOML, e.g. "
                          "train/configs/pretrain_duke_cpu.toml)")
    return C.load(PretrainConfig, path, spec.pretrain_sets, sets={
        "data.dir": str(data), "out_dir": str(out_dir), "loop.device": spec.device})


def teacher_config(spec: CVSpec, data: str | Path, out_dir: str | Path) -> Any:
    """The `FinetuneConfig` `mirage-edge train finetune --config ... --task seg --data DATA --out OUT
    [--device ...] OVERRIDES` builds (train.config.finetune_base, then file, flags, overrides). With
    --pretrain-config the teacher starts from the fold's pretrained encoder (OUT/../pretrain/best)."""
    from mirage_edge.train.config import FinetuneConfig, finetune_base

    path = Path(spec.teacher_config)
    if not path.is_file():
        raise ConfigError(f"--teacher-config {path}: no such file (a `mirage-edge train finetune` TOML, e.g. "
                          "train/configs/finetune_duke_tiny_cpu.toml)")
    task = C.read_config(path).get("task")
    if task not in (None, "seg"):
        raise ConfigError(f"--teacher-config {path} fine-tunes task {task!r}; cross-validation runs on "
                          "segmentation sets (task = \"seg\")")
    pretrained = str(Path(out_dir).parent / "pretrain" / "best") if spec.pretrain_config else None
    return C.load(FinetuneConfig, path, spec.teacher_sets, base=finetune_base("seg"), sets={
        "task": "seg", "data": str(data), "out_dir": str(out_dir), "loop.device": spec.device,
        "model.checkpoint": pretrained})


def distill_recipe(spec: CVSpec, data: str | Path, teacher: str | Path, out_dir: str | Path,
                   cache_dir: str | Path) -> Any:
    """The `DistillRecipe` `mirage-edge distill --recipe R --student S --teacher T --data DATA --task seg
    --[no-]baseline --out OUT [--device ...] OVERRIDES` builds; the teacher cache goes to `cache_dir`
    unless the recipe or the overrides name one (per-fold teachers are never shared, so the CV keeps its
    caches with it)."""
    from mirage_edge.distill.recipe import load_recipe

    sets = {"teacher.model": str(teacher), "student.name": spec.student, "data.path": str(data), "data.task": "seg",
            "baseline.enabled": spec.baseline, "out": str(out_dir), "run.device": spec.device}
    rec = load_recipe(spec.recipe, spec.distill_sets, sets=sets)
    if not rec.cache.dir:
        rec = load_recipe(spec.recipe, spec.distill_sets, sets={**sets, "cache.dir": str(cache_dir)})
    return rec


def _drop(d: dict[str, Any], dotted: tuple[str, ...]) -> dict[str, Any]:
    d = json.loads(json.dumps(d, default=str))
    for key in dotted:
        *parents, last = key.split(".")
        node = d
        for p in parents:
            node = node.get(p, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(last, None)
    return d


def resolved_settings(spec: CVSpec, out: Path) -> tuple[dict[str, Any], dict[str, int]]:
    """(settings, threads): the settings every fold runs with - the given options and the resolved
    teacher config and recipe, with the fold's own paths and the speed-only settings left out (what a
    resumed run must match) - and the threads of each stage (0 = torch's default)."""
    tcfg = teacher_config(spec, out / "fold0" / "data", out / "fold0" / "teacher")
    pcfg = pretrain_config(spec, out / "fold0" / "data", out / "fold0" / "pretrain")
    rec = distill_recipe(spec, out / "fold0" / "data", out / "fold0" / "teacher" / "best", out / "fold0" / "distill",
                         out / "cache")
    threads = {"teacher": int(tcfg.loop.threads or 0), "distill": int(rec.run.threads or 0)}
    pretrain: dict[str, Any] = {}
    if pcfg is not None:
        threads = {"pretrain": int(pcfg.loop.threads or 0), **threads}
        pretrain = {"pretrain_config": str(spec.pretrain_config), "pretrain_sets": list(spec.pretrain_sets),
                    "pretrain": _drop(C.to_dict(pcfg), _PRETRAIN_FREE)}
    teacher_free = _TEACHER_FREE + (("model.checkpoint",) if pcfg is not None else ())
    return {**pretrain, "teacher_config": str(spec.teacher_config), "teacher_sets": list(spec.teacher_sets),
            "recipe": spec.recipe, "student": rec.student.name, "baseline": spec.baseline,
            "distill_sets": list(spec.distill_sets), "teacher": _drop(C.to_dict(tcfg), teacher_free),
            "distill": _drop(rec.to_dict(), _RECIPE_FREE)}, threads


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new), key=str)
                for d in _diff(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [prefix.rstrip(".")] if old != new else []


# ------------------------------------------------------------------------------------- helpers
def git_commit(path: str | Path | None = None) -> str:
    """The commit of the checkout holding `path` (default: this package), '+dirty' when tracked files
    differ from it; 'unknown' outside a git checkout."""
    where = Path(path) if path else Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode:
            return "unknown"
        dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _check_plan(out: Path, plan: dict[str, Any]) -> None:
    saved = out / "plan.json"
    if saved.is_file():
        diff = _diff(_read_json(saved), json.loads(json.dumps(plan, default=str)))
        # the data folder may be given by another (relative) path; its subjects and folds must match
        diff = [d for d in diff if d not in ("data.path",)]
        if diff:
            shown = ", ".join(diff[:8]) + (f" and {len(diff) - 8} more" if len(diff) > 8 else "")
            raise ConfigError(f"--out {out} holds a cross-validation with other folds or settings ({shown} "
                              "differ from its plan.json); use another --out, or the same options to resume it")
    atomic_write_text(saved, json.dumps(plan, indent=1, default=str))


# ------------------------------------------------------------------------------------- one fold
def _resumable(run_dir: Path) -> bool:
    """True when a training run folder holds a checkpoint to continue from; a folder stopped before its
    first checkpoint holds nothing to keep and is removed."""
    from mirage_edge.train.checkpoint import latest_checkpoint

    resumed = latest_checkpoint(run_dir / "checkpoints") is not None
    if run_dir.exists() and not resumed:
        shutil.rmtree(run_dir)
    return resumed


def _pretrain(spec: CVSpec, fdir: Path, log: Log) -> dict[str, Any] | None:
    """Pretrain (or reuse) the fold's encoder on its own train B-scans; returns pretrain.json's content
    (None without --pretrain-config)."""
    if not spec.pretrain_config:
        return None
    marker = fdir / "pretrain.json"
    if marker.is_file():
        return _read_json(marker)
    from mirage_edge._io import output_errors
    from mirage_edge.train.pretrain import run_pretrain

    run_dir = fdir / "pretrain"
    cfg = pretrain_config(spec, fdir / "data", run_dir)
    resumed = _resumable(run_dir)
    log(f"  pretrain: {cfg.model.name} on {', '.join(cfg.data.modalities)} ({cfg.loop.epochs} epochs) "
        f"-> {run_dir}" + (" (resuming)" if resumed else ""))
    t0 = time.perf_counter()
    with output_errors(run_dir):
        fit = run_pretrain(cfg, resume="auto" if resumed else None)
    if fit.best_dir is None:
        raise ConfigError(f"the pretraining of {fdir.name} saved no best checkpoint: its data needs a "
                          "val/ split")
    info = {"dir": str(run_dir), "best": str(fit.best_dir), "best_step": fit.best_step,
            "best_val_loss": fit.best_metric, "seconds": time.perf_counter() - t0, "resumed": resumed}
    atomic_write_text(marker, json.dumps(info, indent=1, default=float))
    return info


def _teacher(spec: CVSpec, fdir: Path, log: Log) -> tuple[dict[str, Any], bool]:
    """Fine-tune (or reuse) the fold's teacher; returns (teacher.json content, resumed)."""
    marker = fdir / "teacher.json"
    if marker.is_file():  # finished in an earlier invocation
        info = _read_json(marker)
        return info, bool(info.get("resumed"))
    from mirage_edge._io import output_errors
    from mirage_edge.train.finetune import run_finetune

    run_dir = fdir / "teacher"
    cfg = teacher_config(spec, fdir / "data", run_dir)
    resumed = _resumable(run_dir)
    log(f"  teacher: fine-tuning {cfg.model.name} ({cfg.loop.epochs} epochs) -> {run_dir}"
        + (" (resuming)" if resumed else ""))
    t0 = time.perf_counter()
    with output_errors(run_dir):
        res = run_finetune(cfg, resume="auto" if resumed else None)
    fit = res["fit"]
    info = {"dir": str(run_dir), "best": str(fit.best_dir) if fit.best_dir else None, "best_step": fit.best_step,
            "val": res["val"], "test": res["test"], "seconds": time.perf_counter() - t0, "resumed": resumed}
    if "calibration" in res:  # the teacher config's `calibrate`: distil from the calibrated checkpoint
        info.update(calibration=res["calibration"], checkpoint=str(run_dir / "calibrated"))
    if fit.best_dir is None:
        raise ConfigError(f"the teacher of {fdir.name} saved no best checkpoint (no validation ran): give it "
                          "validation in its config (loop.eval_every)")
    atomic_write_text(marker, json.dumps(info, indent=1, default=float))
    return info, resumed


def _distill(spec: CVSpec, fdir: Path, teacher: dict[str, Any], cache_dir: Path,
             log: Log) -> tuple[dict[str, Any], float, bool]:
    """Distil (or reuse) the fold's student and twin; returns (report.json content, seconds, resumed)."""
    run_dir = fdir / "distill"
    if (run_dir / "report.json").is_file():  # finished in an earlier invocation
        report = _read_json(run_dir / "report.json")
        return report, float(report.get("seconds", 0.0)), False
    from mirage_edge._io import output_errors
    from mirage_edge.distill.loop import distill

    rec = distill_recipe(spec, fdir / "data", teacher.get("checkpoint", teacher["best"]), run_dir, cache_dir)
    resumed = run_dir.is_dir() and any(run_dir.iterdir())
    log(f"  distill: {rec.student.name} ({'with' if rec.baseline.enabled else 'without'} twin) -> {run_dir}"
        + (" (resuming)" if resumed else ""))
    t0 = time.perf_counter()
    with output_errors(run_dir):
        result = distill(rec, resume=resumed, log=lambda m: log(f"    {m}"))
    return result.report, time.perf_counter() - t0, resumed


def run_fold(spec: CVSpec, fold: F.Fold, subjects: dict[str, list[Any]], info_json: Path, out: Path,
             log: Log, commit: str = "unknown") -> dict[str, Any]:
    """Run (or finish) one fold and write its result.json (with `commit`, the code it ran on);
    returns the fold's record."""
    fdir = out / f"fold{fold.index}"
    fdir.mkdir(parents=True, exist_ok=True)
    meta = F.fold_json(fold, subjects)
    if not (fdir / "fold.json").is_file() or (fdir / "fold.json").read_text(encoding="utf-8") != meta \
            or not (fdir / "data" / "INFO.json").exists():
        built = F.build_fold_data(fold, subjects, info_json, fdir / "data")
        atomic_write_text(fdir / "fold.json", meta)
        log(f"  data: {built['images']} B-scans ({built['links']}s) in {built['dir']}")
    pretrain = _pretrain(spec, fdir, log)
    teacher, t_resumed = _teacher(spec, fdir, log)
    report, d_seconds, d_resumed = _distill(spec, fdir, teacher, out / "cache", log)
    seconds = {"teacher": float(teacher["seconds"]), "distill": d_seconds,
               "total": float(teacher["seconds"]) + d_seconds}
    if pretrain is not None:
        seconds = {"pretrain": float(pretrain["seconds"]), **seconds,
                   "total": seconds["total"] + float(pretrain["seconds"])}
    result = R.fold_result(json.loads(meta), teacher, report, seconds, t_resumed or d_resumed)
    result["report"] = str(fdir / "distill" / "report.json")
    result["commit"] = commit
    atomic_write_text(fdir / "result.json", json.dumps(result, indent=1, default=str))
    return result


# ------------------------------------------------------------------------------------- the whole CV
def _hardware(spec_threads: dict[str, int]) -> tuple[dict[str, Any], str]:
    from mirage_edge.bench.hardware import describe_hardware

    hw = describe_hardware(threads=max(spec_threads.values(), default=0))
    md = hw.markdown() + "\n" + "- Threads: " + ", ".join(f"{k} {v or 'default'}" for k, v in spec_threads.items())
    return {**hw.to_dict(), "threads_per_stage": spec_threads}, md


def write_reports(record: dict[str, Any], hardware_md: str, folders: list[Path], notes: tuple[str, ...]) -> None:
    """cv.json and README.md into each of `folders` (atomically)."""
    text, md = R.dumps(record), R.markdown(record, hardware_md, list(notes))
    for d in folders:
        atomic_write_text(d / "cv.json", text)
        atomic_write_text(d / "README.md", md)


def run_cv(spec: CVSpec, log: Log | None = None, dry_run: bool = False) -> dict[str, Any]:
    """Run the cross-validation described by `spec` (module docstring); returns the cv.json record
    (with `dry_run`: the plan, nothing written). Errors before any work: a data folder without
    subjects or with too few for the folds (`DataError`), a missing or bad teacher config, recipe or
    override, an unknown --fold (`ConfigError`), an unwritable --out (`OutputError`)."""
    log = log or progress
    t_start = time.perf_counter()
    folds, subjects = F.plan_folds(spec.data, spec.folds)
    bad = [k for k in spec.only if not 0 <= k < spec.folds]
    if bad:
        raise ConfigError(f"--fold {bad[0]}: folds are numbered 0..{spec.folds - 1}")
    out = Path(spec.out)
    settings, threads = resolved_settings(spec, out)  # bad configs, recipes and overrides fail here, before any work
    plan = {"data": {"path": str(spec.data), "resolved": str(Path(spec.data).resolve()), "subjects": list(subjects),
                     "images": sum(len(v) for v in subjects.values())},
            "folds": spec.folds, "fold_subjects": [f.to_dict() for f in folds], "settings": settings}
    start = settings["teacher"].get("model", {}).get("checkpoint")
    if start and not spec.pretrain_config:
        log(f"note: every fold's teacher starts from the same checkpoint {start}; if it was trained on images of "
            "this set, each fold's test subjects may be in it (--pretrain-config pretrains per fold instead)")
    if dry_run:
        return plan
    check_output_dir(out, "--out")
    report_dirs = [out] + ([check_output_dir(spec.report_dir, "--report-dir")] if spec.report_dir else [])
    _check_plan(out, plan)
    hardware, hardware_md = _hardware(threads)
    commit = git_commit()
    info_json = Path(spec.data) / "INFO.json"
    results: dict[int, dict[str, Any]] = {}

    def scan() -> None:
        # finished folds, also those this invocation does not run: another `--fold K` process on the same
        # --out may have finished one since this one started, so the table is re-read before each write
        for k in range(spec.folds):
            path = out / f"fold{k}" / "result.json"
            if k not in results and path.is_file():
                results[k] = _read_json(path)

    scan()

    def record() -> dict[str, Any]:
        scan()
        return R.cv_record(plan=plan, results=[results[k] for k in sorted(results)], command=spec.command,
                           commit=commit, hardware=hardware, invocation_seconds=time.perf_counter() - t_start)

    todo = [f for f in folds if not spec.only or f.index in spec.only]
    for fold in todo:
        scan()
        head = (f"fold {fold.index} [{fold.index + 1}/{spec.folds}]: test {', '.join(fold.test)}; "
                f"val {', '.join(fold.val)}; train {len(fold.train)} subjects")
        if fold.index in results:
            log(f"{head}: done before ({out / f'fold{fold.index}' / 'result.json'}), skipped")
            continue
        log(head)
        t0 = time.perf_counter()
        results[fold.index] = r = run_fold(spec, fold, subjects, info_json, out, log, commit)
        line = f"fold {fold.index} [{fold.index + 1}/{spec.folds}] done in {time.perf_counter() - t0:.0f} s: teacher " \
               f"{R.fmt_value(r.get('teacher'))}, student {R.fmt_value(r.get('student'))}"
        if r.get("twin") is not None:
            line += f", twin {R.fmt_value(r.get('twin'))}, KD gain {r['kd_gain_points']:+.2f} pts"
        log(line)
        write_reports(record(), hardware_md, report_dirs, spec.notes)
    rec = record()
    write_reports(rec, hardware_md, report_dirs, spec.notes)
    log(f"cross-validation: {len(rec['folds_done'])}/{spec.folds} folds done; "
        + ", ".join(str(d / "README.md") for d in report_dirs))
    return rec


__all__ = ["CVSpec", "run_cv", "run_fold", "pretrain_config", "teacher_config", "distill_recipe",
           "resolved_settings", "git_commit", "write_reports"]
