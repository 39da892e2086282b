"""`mirage-edge distill`: parse flags into a `DistillRecipe`, call `mirage_edge.distill.distill`.

Only click / stdlib / mirage_edge.config / errors at import time; torch loads inside the command.
"""
from __future__ import annotations

import json

import click

_TASKS = {"seg": "seg", "segmentation": "seg", "cls": "cls", "classification": "cls", "none": "none",
          "auto": "auto"}


def _size(text: str | None) -> int | list[int] | None:
    if text is None:
        return None
    parts = text.lower().split("x")
    if len(parts) > 2 or not all(p.strip().isdigit() for p in parts):
        raise click.BadParameter(f"{text!r}: expected S or HxW, e.g. 256 or 256x384")
    return int(parts[0]) if len(parts) == 1 else [int(p) for p in parts]


@click.command("distill")
@click.option("--recipe", default=None, metavar="NAME|PATH",
              help="Recipe TOML (a path, or a name in distill/recipes/, e.g. tiny-demo).")
@click.option("--teacher", default=None, metavar="NAME|PATH|hf:DIR",
              help="Teacher: registered name (mirage-large), checkpoint path (ours or official .pth) or hf:<dir>.")
@click.option("--random-teacher", is_flag=True, default=None,
              help="Distil from a randomly initialised registered teacher on purpose (tests, timing); the report "
                   "says so. Without it a registered name needs its official weights.")
@click.option("--teacher-config", default=None, metavar="JSON",
              help="Dimensions of an official checkpoint of a non-standard size (e.g. tiny_config.json).")
@click.option("--student", default=None, metavar="NAME",
              help="Student: mobilenetv4_conv_small, vit_tiny_c32, repvit_m0_9 or resnet18 "
                   "(also mobilenetv4_conv_small_050, vit_tiny_patch32, mobileone_s0, student-tiny; "
                   "see distill/README.md).")
@click.option("--data", "data_path", default=None, metavar="DIR", help="RetinaBench folder (or any image folder).")
@click.option("--task", type=click.Choice(sorted(_TASKS)), default=None,
              help="seg | cls (task-aware stage 2 needs a fine-tuned teacher) | none (feature KD only).")
@click.option("--qat/--no-qat", default=None, help="Quantization-aware INT8 training + Q/DQ ONNX export.")
@click.option("--baseline/--no-baseline", default=None,
              help="Also train the labels-only twin (same student, head, data, schedule and seed, no teacher) and "
                   "report the KD gain = distilled - twin (baseline.enabled).")
@click.option("--image-size", default=None, callback=lambda c, p, v: _size(v), metavar="S|HxW",
              help="Input size, multiples of 32: 256, or 256x384 to keep a 496 x 768 B-scan's aspect.")
@click.option("--out", "out_dir", default=None, help="Output folder (stage runs, student/, student_int8/, report.json).")
@click.option("--device", default=None, help="cpu | cuda | cuda:N | auto (default cpu).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out (finished stages are reused).")
@click.option("--overwrite", is_flag=True, help="Delete a non-empty --out first.")
@click.option("--json", "as_json", is_flag=True, help="Print the test report as JSON at the end.")
@click.option("--print-config", is_flag=True,
              help="Print the resolved recipe (extends, flags and overrides applied) as TOML and exit.")
@click.argument("overrides", nargs=-1)
def distill_cmd(recipe: str | None, teacher: str | None, random_teacher: bool | None, teacher_config: str | None,
                student: str | None,
                data_path: str | None, task: str | None, qat: bool | None, baseline: bool | None,
                image_size: int | list[int] | None,
                out_dir: str | None, device: str | None, resume: bool, overwrite: bool, as_json: bool,
                print_config: bool, overrides: tuple[str, ...]) -> None:
    """Distill a MIRAGE teacher into an edge student (feature KD, task KD, optional QAT INT8).

    OVERRIDES are recipe settings as key=value (e.g. stage1.epochs=3 qat.lr=5e-5), applied last.

    \b
    Examples:
      mirage-edge distill --recipe tiny-demo --data data/layers        # its teacher: random mirage-tiny, on purpose
      mirage-edge distill --recipe cls-tiny-vit --print-config      # the recipe as it would run
      mirage-edge distill --recipe mirage-large-mnv4-layers --teacher runs/teacher_seg --data data/layers --qat
      mirage-edge distill --teacher tiny_official.pth --teacher-config tiny_config.json --student student-tiny \\
          --data data/mm --task none --image-size 64
      torchrun --nproc-per-node 4 -m mirage_edge.cli distill --recipe mirage-large-mnv4-layers \\
          --teacher runs/teacher_seg --data data/layers --device cuda      # data-parallel, one GPU a process
    """
    from mirage_edge.config import dumps_toml
    from mirage_edge.distill.recipe import load_recipe

    rec = load_recipe(recipe, overrides, sets={
        "teacher.model": teacher, "teacher.random_weights": random_teacher or None,
        "teacher.config": teacher_config, "student.name": student,
        "data.path": data_path, "data.task": _TASKS[task] if task else None, "qat.enabled": qat,
        "baseline.enabled": baseline,
        "data.image_size": image_size, "out": out_dir, "run.device": device,
    })
    if print_config:
        click.echo(dumps_toml(rec.to_dict()), nl=False)
        return

    from mirage_edge.distill.loop import distill
    from mirage_edge.train import distributed as D

    from mirage_edge._io import output_errors

    try:
        # a write that fails mid-run (full disk, read-only): one line naming the file
        with output_errors(rec.out, f"; {rec.out} is incomplete (no report.json): continue it with --resume once "
                                    "it can be written"):
            result = distill(rec, resume=resume, overwrite=overwrite, log=lambda m: click.echo(m, err=True))
    except BaseException:
        D.shutdown_distributed(wait=False)
        raise
    D.shutdown_distributed()
    if not D.env_dist_info().is_main:
        return  # under torchrun rank 0 prints the summary
    test = result.report.get("test", {})
    if (result.report.get("teacher") or {}).get("random_weights"):
        click.echo(f"teacher: {rec.teacher.model} with RANDOM WEIGHTS (asked for): the figures below measure "
                   "imitation of a random network")
    click.echo(f"student: {result.student_dir}")
    if result.onnx_path:
        click.echo(f"int8:    {result.int8_dir} ({result.onnx_path.name}, explicit Q/DQ)")
    if "metric" in test:
        line = (f"test {test['metric']}: teacher {test['teacher_value']:.4f}  student {test['student_value']:.4f} "
                f"({100 * test['retention']:.1f}% of teacher)")
        if "int8_value" in test:
            line += f"  int8(ORT) {test['int8_value']:.4f} ({test['int8_minus_fp32_points']:+.2f} pts vs fp32)"
        click.echo(line)
    if "baseline_value" in test:
        lo, hi = test["kd_gain_ci95_points"]
        line = (f"labels-only twin {test['baseline_value']:.4f}  KD gain {test['kd_gain_points']:+.2f} pts "
                f"(95% CI {lo:+.2f} .. {hi:+.2f}, bootstrap over {test['ci_unit']}s)")
        if "kd_gain_int8_points" in test:
            line += f"  int8: twin {test['baseline_int8_value']:.4f}, KD gain {test['kd_gain_int8_points']:+.2f} pts"
        click.echo(line)
        if "teacher_weaker_than_baseline" in test:
            click.echo("note: " + test["teacher_weaker_than_baseline"])
    pick = result.report.get("validation")
    if pick:
        click.echo(f"validation: distilled {pick['distilled']:.4f}, labels-only twin {pick['baseline']:.4f} -> ship "
                   + ("student/ (student_int8/)" if pick["ship"] == "student" else
                      "baseline/ (baseline_int8/): the teacher did not help on validation"))
    if "feature_cosine" in test:
        click.echo(f"test feature cosine vs teacher: {test['feature_cosine']:.4f}")
    if as_json:
        click.echo(json.dumps(result.report, indent=1, default=str))


__all__ = ["distill_cmd"]
