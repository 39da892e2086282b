"""What the val-chosen foreground offset (`stage2.calibrate`, finetune `calibrate`) did: val and test
Dice of a `distill` run's teacher, student and labels-only twin with their offset and without it.
The offset is additive on the logits, so "without" is the saved model's logits minus the offset on
the shifted classes: exact, no retraining. Writes DISTILL_OUT/calibration_ablation.json.

    python benchmarks/calibration_ablation.py DISTILL_OUT

This reads the test split again, for every form: an ablation after the fact, never a way to choose.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from mirage_edge._io import atomic_write_text


def ablate(out: Path) -> dict[str, Any]:
    """{"<split>/<model>/<calibrated|offset0>": {"dice", "offset", "per_subject"}} for a distill run folder."""
    from mirage_edge.distill import evaluate as ev
    from mirage_edge.distill import load_student, loop
    from mirage_edge.distill.recipe import load_recipe

    for need in ("recipe.toml", "report.json"):
        if not (out / need).is_file():
            raise click.ClickException(f"{out / need} does not exist: not a finished distill run folder")
    rec = load_recipe(out / "recipe.toml")
    teacher = loop.build_teacher(rec, lambda m: None)
    _, val, test, _, _ = loop._datasets(rec, teacher)
    stages = json.loads((out / "report.json").read_text())["stages"]
    tmeta = Path(rec.teacher.model) / "config.json"
    forms = {"teacher": (teacher.model, json.loads(tmeta.read_text())["meta"].get("calibration")
                         if tmeta.is_file() else None),
             "student": (load_student(out / "student"), stages.get("stage2", {}).get("calibration"))}
    if (out / "baseline").is_dir():
        forms["twin"] = (load_student(out / "baseline"), stages.get("baseline", {}).get("calibration"))
    res: dict[str, Any] = {}
    for split, ds in (("val", val), ("test", test)):
        if ds is None:
            continue
        for name, (model, cal) in forms.items():
            logits, labels = ev.collect(ds, model.eval(), rec.run.eval_batch_size)
            truth = ev.native_truth("segmentation", labels, ds)
            for tag, undo in (("calibrated", 0.0), ("offset0", -(cal or {}).get("offset", 0.0))):
                x = logits.copy()
                if cal:
                    x[:, cal["classes"]] += undo
                m = ev.task_metrics("segmentation", x, truth, ds, hd95=False)
                res[f"{split}/{name}/{tag}"] = {"dice": m["dice"], "per_subject": m["per_volume_dice"],
                                                "offset": (cal or {}).get("offset", 0.0) if tag == "calibrated" else 0.0}
    return res


@click.command()
@click.argument("distill_out", type=click.Path(path_type=Path))
def main(distill_out: Path) -> None:
    res = ablate(distill_out)
    atomic_write_text(distill_out / "calibration_ablation.json", json.dumps(res, indent=1))
    for k, v in res.items():
        click.echo(f"{k:28s} dice {v['dice']:.4f}  offset {v['offset']:+g}")


if __name__ == "__main__":
    main()
