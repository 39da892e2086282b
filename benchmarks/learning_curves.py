"""Learning curves of fine-tuning runs: validation metric and train loss per epoch from each run's
metrics.jsonl, as curves.json (schema mirage-edge/learning-curves 1) and curves.png, with the
issue-#18 plateau figure (gain of the validation metric over the last 20 % of epochs).

    python benchmarks/learning_curves.py --out benchmarks/results/NAME LABEL=RUN_DIR [LABEL=RUN_DIR ...]
"""
from __future__ import annotations

import json
from pathlib import Path

import click

from mirage_edge._io import atomic_write_text


def read_run(run: Path, metric: str) -> dict:
    """eval / train events and the summary of one run folder (RUN/metrics.jsonl)."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise click.ClickException(f"{path} does not exist: not a fine-tuning run folder")
    evals, train, summary = [], [], {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            e = json.loads(line)
        except json.JSONDecodeError as exc:
            raise click.ClickException(f"{path}:{n}: not JSON ({exc})") from None
        if e.get("event") == "eval" and metric in e:
            evals.append({"epoch": e["epoch"], "step": e["step"], f"val_{metric}": round(float(e[metric]), 5)})
        elif e.get("event") == "train":
            train.append({"step": e["step"], "loss": round(float(e["loss"]), 5)})
        elif e.get("event") == "summary":
            # each (resumed) segment logs its own seconds; a test-only re-run logs ~0
            seconds = summary.get("seconds", 0.0) + float(e.get("seconds", 0.0))
            summary = {**{k: e[k] for k in ("best", "best_step") if k in e}, "seconds": seconds}
    if not evals:
        raise click.ClickException(f"{path} has no eval events with {metric!r}")
    return {"eval": evals, "train": train, "summary": summary, "plateau_gain_points": plateau_gain(evals, metric)}


def plateau_gain(evals: list[dict], metric: str) -> float:
    """Best validation value over the last 20 % of epochs minus the best before them, in points."""
    vals = [e[f"val_{metric}"] for e in evals]
    cut = max(1, int(round(len(vals) * 0.8)))
    return round(100 * (max(vals[cut:] or vals[-1:]) - max(vals[:cut])), 2)


@click.command()
@click.argument("runs", nargs=-1, required=True)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Folder for curves.json/png.")
@click.option("--metric", default="dice", show_default=True, help="Eval key in metrics.jsonl.")
def main(runs: tuple[str, ...], out_dir: str, metric: str) -> None:
    """RUNS: LABEL=RUN_DIR (a `mirage-edge train finetune` output folder)."""
    data = {}
    for item in runs:
        label, sep, run = item.partition("=")
        if not sep:
            raise click.ClickException(f"{item!r}: expected LABEL=RUN_DIR")
        data[label] = read_run(Path(run), metric)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"schema": "mirage-edge/learning-curves", "version": 1, "metric": f"val {metric}", "runs": data}
    atomic_write_text(out / "curves.json", json.dumps(doc, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, r in data.items():
        ax.plot([e["epoch"] for e in r["eval"]], [e[f"val_{metric}"] for e in r["eval"]], label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"val {metric}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    for label, r in data.items():
        best = max(e[f"val_{metric}"] for e in r["eval"])
        click.echo(f"{label}: best val {best:.4f}, gain over the last 20 % of epochs {r['plateau_gain_points']:+.2f} pts, "
                   f"{r['summary'].get('seconds', float('nan')):.0f} s")


if __name__ == "__main__":
    main()
