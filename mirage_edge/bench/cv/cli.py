"""`mirage-edge cv`: parse the options into a `CVSpec`, call `mirage_edge.bench.cv.run.run_cv`.

Only click and the standard library at import time; torch loads when a fold trains.
"""
from __future__ import annotations

import shlex

import click


def _command_line(params: dict) -> str:
    """The command as a shell line, rebuilt from the parsed options (the same under a test runner)."""
    args = ["mirage-edge", "cv", "--data", params["data"], "--folds", str(params["folds"])]
    for k in params["only"]:
        args += ["--fold", str(k)]
    if params["pretrain_config"]:
        args += ["--pretrain-config", params["pretrain_config"]]
        args += [a for s in params["pretrain_sets"] for a in ("--pretrain-set", s)]
    args += ["--teacher-config", params["teacher_config"]]
    args += [a for s in params["teacher_sets"] for a in ("--teacher-set", s)]
    for flag, key in (("--recipe", "recipe"), ("--student", "student"), ("--device", "device")):
        if params[key] is not None:
            args += [flag, params[key]]
    args += ["--baseline" if params["baseline"] else "--no-baseline"]
    args += [a for s in params["distill_sets"] for a in ("--distill-set", s)]
    args += ["--out", params["out"]]
    if params["report_dir"]:
        args += ["--report-dir", params["report_dir"]]
    return shlex.join(args)


@click.command("cv")
@click.option("--data", required=True, metavar="DIR",
              help="RetinaBench segmentation folder ({train,val,test}/{bscan,semseg}/ + INFO.json); all its splits "
                   "are pooled and regrouped by subject.")
@click.option("--folds", default=5, show_default=True, type=int,
              help="Number of folds: subjects are cut into this many groups (at least 2 subjects each).")
@click.option("--fold", "only", multiple=True, type=int, metavar="K",
              help="Run only fold K (0-based; repeatable); the report covers every finished fold.")
@click.option("--pretrain-config", default=None, metavar="TOML",
              help="`mirage-edge train pretrain` config run in every fold on that fold's train B-scans before "
                   "the teacher, which then starts from it (e.g. train/configs/pretrain_duke_cpu.toml).")
@click.option("--pretrain-set", "pretrain_sets", multiple=True, metavar="KEY=VALUE",
              help="Override of the pretrain config (repeatable), e.g. loop.epochs=50.")
@click.option("--teacher-config", required=True, metavar="TOML",
              help="`mirage-edge train finetune` config of the teacher "
                   "(e.g. train/configs/finetune_duke_tiny_cpu.toml).")
@click.option("--teacher-set", "teacher_sets", multiple=True, metavar="KEY=VALUE",
              help="Override of the teacher config (repeatable), e.g. loop.epochs=15.")
@click.option("--recipe", default=None, metavar="NAME|PATH", help="`mirage-edge distill` recipe (e.g. layers-tiny).")
@click.option("--student", default=None, metavar="NAME", help="Student (default: the recipe's).")
@click.option("--baseline/--no-baseline", default=True, show_default=True,
              help="Also train the labels-only twin of the student in every fold (the KD gain).")
@click.option("--distill-set", "distill_sets", multiple=True, metavar="KEY=VALUE",
              help="Override of the distill recipe (repeatable), e.g. stage2.epochs=5 data.image_size=256.")
@click.option("--device", default=None,
              help="Device of both stages: cpu | cuda | cuda:N | auto (default: each config's).")
@click.option("--out", required=True, metavar="DIR",
              help="Run folder: fold<k>/{data,teacher,distill}, cv.json, README.md. Rerun the same command to resume.")
@click.option("--report-dir", default=None, metavar="DIR",
              help="Also write cv.json and README.md here (no checkpoints), e.g. benchmarks/results/NAME.")
@click.option("--note", "notes", multiple=True, metavar="TEXT", help="A line for README.md's Notes (repeatable).")
@click.option("--dry-run", is_flag=True, help="Print the folds (subjects of each split) and exit; nothing is written.")
def cv_cmd(data: str, folds: int, only: tuple[int, ...], pretrain_config: str | None,
           pretrain_sets: tuple[str, ...], teacher_config: str, teacher_sets: tuple[str, ...],
           recipe: str | None, student: str | None, baseline: bool, distill_sets: tuple[str, ...],
           device: str | None, out: str, report_dir: str | None, notes: tuple[str, ...], dry_run: bool) -> None:
    """Subject-wise k-fold cross-validation of teacher fine-tuning + distillation.

    Every B-scan of DATA is grouped by subject (the file stem before its last '_': subject07_annot03 ->
    subject07); subjects in natural order are cut into FOLDS contiguous groups. Fold k tests group k,
    validates on group k-1 and trains on the rest, so every subject is tested once. Per fold: the
    teacher is fine-tuned (with --pretrain-config: from an encoder first pretrained by masked
    autoencoding on the fold's own train B-scans; best checkpoint on val, as `mirage-edge train
    finetune`), then distilled into
    the student beside its labels-only twin (as `mirage-edge distill --baseline`); each run evaluates the
    fold's test subjects once at its end. OUT/cv.json and OUT/README.md hold one row per fold plus mean
    ± std over folds, per-subject Dice, hardware, command, commit and wall time. A fold whose
    result.json exists is skipped, so rerunning the command resumes.

    \b
    Example (Duke DME, 10 subjects -> 5 folds of 2):
      mirage-edge cv --data ../shared/data/real/Duke_DME_fluid --folds 5 \\
          --teacher-config train/configs/finetune_duke_tiny_cpu.toml --teacher-set loop.epochs=15 \\
          --recipe layers-tiny --student mobilenetv4_conv_small --distill-set data.image_size=256 \\
          --distill-set 'stage2.mode="new_head"' --distill-set 'stage2.head={type = "fpn", dim = 64}' \\
          --out runs/cv-duke --report-dir benchmarks/results/duke-cv5
    """
    from mirage_edge.bench.cv.run import CVSpec, run_cv

    params = click.get_current_context().params
    spec = CVSpec(data=data, out=out, teacher_config=teacher_config, folds=folds, only=tuple(only),
                  pretrain_config=pretrain_config, pretrain_sets=tuple(pretrain_sets),
                  teacher_sets=tuple(teacher_sets), recipe=recipe, student=student, baseline=baseline,
                  distill_sets=tuple(distill_sets), device=device, report_dir=report_dir, notes=tuple(notes),
                  command=_command_line(params))
    if dry_run:
        plan = run_cv(spec, log=lambda m: click.echo(m, err=True), dry_run=True)
        click.echo(f"{len(plan['data']['subjects'])} subjects, {plan['data']['images']} B-scans, {folds} folds")
        for f in plan["fold_subjects"]:
            click.echo(f"fold {f['fold']}: test {', '.join(f['test'])} | val {', '.join(f['val'])} | "
                       f"train {', '.join(f['train'])}")
        return
    rec = run_cv(spec, log=lambda m: click.echo(m, err=True))
    summary = rec["summary"]
    for key in ("teacher", "student", "twin", "kd_gain_points"):
        if key in summary:
            s = summary[key]
            std = f" ± {s['std']:.4f}" if s["std"] is not None else ""
            click.echo(f"{key}: {s['mean']:.4f}{std} over {s['n']} fold(s)")
    click.echo(f"folds done: {rec['folds_done']} of {folds}; report: {out}/README.md, {out}/cv.json")


__all__ = ["cv_cmd"]
