"""`mirage-edge data ...`: check a dataset, synthesize one, render the synthetic-vs-real figure.

Imports only click/stdlib at top level (``--help`` stays torch-free); work happens in the bodies.
"""
from __future__ import annotations

import json
from pathlib import Path

import click

_DEFAULT_REAL = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@click.group("data")
def data() -> None:
    """Datasets: validate RetinaBench folders, generate synthetic OCT sets, figures."""


@data.command("check")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--task", type=click.Choice(["auto", "segmentation", "classification", "multimodal", "unlabelled"]),
              default="auto", show_default=True, help="Layout to expect (auto-detected by default).")
@click.option("--skip-bad", is_flag=True, help="Exclude bad files (listed) instead of failing.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def check_cmd(directory: Path, task: str, skip_bad: bool, as_json: bool) -> None:
    """Index DIRECTORY, read every file, print counts, sizes, class pixel frequencies and every problem.

    Exits with status 1 if any problem was found (with --skip-bad: only if nothing usable is left).
    """
    from mirage_edge.data.check import check_dataset
    from mirage_edge.errors import DataError

    report = check_dataset(directory, task, skip_bad=skip_bad)  # type: ignore[arg-type]
    summary = report.summary()
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        _print_rich(summary)
    if report.problems:
        raise DataError(f"{len(report.problems)} problem(s) found in {directory} (listed above; "
                        "fix them or use --skip-bad)")


def _print_rich(s: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]{s['root']}[/bold]: {s['task']} — modalities {', '.join(s['modalities'])}; "
                  f"{s['checked_files']} samples checked")
    table = Table(title="samples per split")
    cols = sorted({k for row in s["splits"].values() for k in row}, key=lambda k: (k not in ("images", "volumes"), k))
    table.add_column("split")
    for c in cols:
        table.add_column(c, justify="right")
    for split, row in s["splits"].items():
        table.add_row(split, *[str(row.get(c, 0)) for c in cols])
    console.print(table)
    console.print("image sizes (HxW): " + ", ".join(f"{k} x{v}" for k, v in s["image_sizes"].items())
                  + "; dtypes: " + ", ".join(f"{k} x{v}" for k, v in s["dtypes"].items()))
    if s["pixel_fractions"]:
        pt = Table(title="class pixel fractions")
        pt.add_column("class")
        splits = list(s["pixel_fractions"])
        for sp in splits:
            pt.add_column(sp, justify="right")
        for label in s["classes"]:
            pt.add_row(label, *[f"{s['pixel_fractions'][sp].get(label, 0.0):.4f}" for sp in splits])
        console.print(pt)
    for w in s["warnings"]:
        console.print(f"[yellow]warning[/yellow]: {w}")
    for p in s["excluded"]:
        console.print(f"[yellow]excluded[/yellow] {p['file']}: {p['reason']}")
    for p in s["problems"]:
        console.print(f"[red]problem[/red] {p['file']}: {p['reason']}")
    if not s["problems"]:
        console.print("[green]no problems found[/green]" + (f" ({len(s['excluded'])} files excluded)"
                                                            if s["excluded"] else ""))


@data.command("synth")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--kind", type=click.Choice(["layers", "fluid", "cls", "multimodal"]), required=True)
@click.option("--n", "n", type=int, default=200, show_default=True, help="Number of B-scans.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--size", type=int, default=512, show_default=True, help="Image size (square, pixels).")
@click.option("--center", default="default", show_default=True,
              help="Device look: default (=spectralis), spectralis, cirrus, topcon, bioptigen (16-bit).")
@click.option("--splits", default="0.7,0.15,0.15", show_default=True, help="train,val,test fractions (sum 1).")
@click.option("--workers", type=int, default=None, help="Processes (default: all cores for large sets).")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output folder.")
def synth_cmd(out: Path, kind: str, n: int, seed: int, size: int, center: str, splits: str,
              workers: int | None, overwrite: bool) -> None:
    """Write a synthetic SD-OCT set in RetinaBench layout (exact labels; deterministic per seed).

    SYNTH.json is written last: a folder without it holds an unfinished set.
    """
    import time

    from mirage_edge.data.synth import synthesize
    from mirage_edge.errors import DataError

    try:
        fr = tuple(float(x) for x in splits.split(","))
    except ValueError:
        raise DataError(f"--splits must be three comma-separated numbers, got {splits!r}") from None
    t0 = time.perf_counter()
    path = synthesize(out, kind, n, seed=seed, size=size, center=center, splits=fr, workers=workers,
                      overwrite=overwrite, progress=True)
    meta = json.loads((path / "SYNTH.json").read_text())
    click.echo(f"wrote {n} {kind} B-scans ({size}x{size}, center {center}, seed {seed}) to {path} in "
               f"{time.perf_counter() - t0:.1f} s: " + ", ".join(f"{k} {v}" for k, v in meta["counts"].items()))


@data.command("figure")
@click.option("--out", "out", type=click.Path(path_type=Path), default=Path("docs/synthetic_vs_real.png"),
              show_default=True)
@click.option("--real", "real", type=click.Path(path_type=Path), default=_DEFAULT_REAL, show_default=True,
              help="Folder with real data (Duke_DME_fluid under real/, the MIRAGE example triplet).")
@click.option("--seed", type=int, default=0, show_default=True)
def figure_cmd(out: Path, real: Path, seed: int) -> None:
    """Render generated samples next to real ones (PNG)."""
    from mirage_edge.data.figure import synthetic_vs_real

    path = synthetic_vs_real(out, real, seed=seed)
    click.echo(f"wrote {path}")


__all__ = ["data"]
