"""Score a finished distill run on another labelled set, with the run's own teacher and preprocessing.

    python -m mirage_edge.distill.heldout RUN --data DIR [--split test|val|train|all] [--teacher PATH]

RUN/recipe.toml (the resolved recipe `distill` saved) gives the teacher, task and preprocessing;
RUN/student and RUN/student_int8/model.onnx are scored by the same `test_report` as at the end of
`distill`: teacher, FP32 and INT8-ORT metrics, retention, agreement. A 240-image test split moves
in steps of 0.42 points per image, so an INT8 - FP32 difference of a point or so is best put on a
larger independent set (e.g. `mirage-edge data synth --seed 7`, `--split all`). Prints JSON.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from mirage_edge.errors import ConfigError, DataError, MirageEdgeError

SPLITS = ("train", "val", "test", "all")


def heldout_report(run: str | Path, data: str | Path, split: str = "test", teacher: str | None = None,
                   threads: int = 1) -> dict[str, Any]:
    """`test_report` of RUN's FP32 (and INT8, if any) student, and its labels-only twin if the run has
    one, on `split` of `data` ("all": every image)."""
    from mirage_edge.distill.data import DistillSamples, open_index
    from mirage_edge.distill.loop import test_report
    from mirage_edge.distill.recipe import load_recipe
    from mirage_edge.distill.student_io import load_student
    from mirage_edge.distill.teacher import build_teacher

    run = Path(run)
    if split not in SPLITS:
        raise ConfigError(f"split {split!r}: use one of {', '.join(SPLITS)}")
    if not (run / "recipe.toml").is_file():
        raise ConfigError(f"{run} is not a distill run folder (no recipe.toml)")
    if not (run / "student").is_dir():
        raise ConfigError(f"{run} has no student/: the run did not finish (continue it with `mirage-edge distill "
                          f"--resume`)")
    over = [f"data.path={json.dumps(str(data))}", f"run.threads={threads}"]
    if teacher:
        over.append(f"teacher.model={json.dumps(str(teacher))}")
    recipe = load_recipe(run / "recipe.toml", over)
    d = recipe.data
    index = open_index(d.path, d.task)
    trained = json.loads((run / "student" / "config.json").read_text()).get("meta", {}).get("classes")
    if trained is not None and list(index.classes) != list(trained):
        raise DataError(f"{data} has classes {list(index.classes)} (as task {d.task!r}), but {run} was distilled on "
                        f"{list(trained)}: not the same class map")
    if split != "all" and split not in index.splits:
        raise DataError(f"{data} has no {split!r} split (it has {', '.join(index.splits) or 'none'}); "
                        f"use --split all to score every image")
    t = build_teacher(recipe, lambda m: None)
    samples = DistillSamples(index, None if split == "all" else split, d.preprocess_spec(), t.modalities)
    task = d.labelled_task(samples.task)
    onnx, twin_onnx = run / "student_int8" / "model.onnx", run / "baseline_int8" / "model.onnx"
    twin = load_student(run / "baseline") if (run / "baseline" / "config.json").is_file() else None
    rep = test_report(t, load_student(run / "student"), onnx if onnx.is_file() else None, samples, task, recipe,
                      twin, twin_onnx if twin is not None and twin_onnx.is_file() else None)
    return {"run": str(run), "data": str(data), "split": split, "teacher": recipe.teacher.model, **rep}


@click.command(help=(__doc__ or "").split("\n")[0])
@click.argument("run")
@click.option("--data", required=True, help="a labelled set of the run's task (RetinaBench layout)")
@click.option("--split", default="test", show_default=True, type=click.Choice(SPLITS))
@click.option("--teacher", default=None, help="the teacher, if it moved since the run (default: the recipe's)")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True)
def main(run: str, data: str, split: str, teacher: str | None, threads: int) -> None:
    try:
        rep = heldout_report(run, data, split, teacher, threads)
    except MirageEdgeError as exc:
        raise SystemExit(f"error: {exc}") from None
    click.echo(json.dumps(rep, indent=1, default=str))


if __name__ == "__main__":
    main()
