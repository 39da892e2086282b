"""`mirage-edge bench` and `mirage-edge demo` (click only at import; heavy work inside the bodies)."""
from __future__ import annotations

import click

from mirage_edge.errors import ConfigError

def _ints(values: tuple[str, ...], flag: str) -> list[int]:
    out = []
    for v in values:
        for part in str(v).split(","):
            if part.strip():
                try:
                    out.append(int(part))
                except ValueError:
                    raise ConfigError(f"{flag} expects integers, got {part!r}") from None
    return out


def _split(values: tuple[str, ...]) -> list[str]:
    return [p.strip() for v in values for p in v.split(",") if p.strip()]


@click.group("bench", invoke_without_command=True)
@click.option("--suite", "suite_name", default="synthetic", show_default=True,
              help="Suite TOML path or name in benchmarks/suites/ (synthetic, duke-dme-fluid, retinabench).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Output folder for records/report/plot [default: bench-out/<suite>].")
@click.option("--root", default=None, help="Runs folder for {root} in the suite (checkpoints, artifacts).")
@click.option("--data", default=None, help="Datasets folder for {data} in the suite.")
@click.option("--model", "models", multiple=True, help="Only these model labels (comma list; the teacher is kept).")
@click.option("--checkpoint", "checkpoints", multiple=True, type=click.Path(),
              help="Add a checkpoint folder as a model (repeatable); a distilled student (its meta names a "
                   "teacher) counts as a student in the headline, a labels-only twin as its baseline.")
@click.option("--artifact", "artifacts", multiple=True, type=click.Path(),
              help="Add an exported artifact folder as a model (repeatable); one whose metadata names a "
                   "teacher (a distilled student) counts as a student in the headline.")
@click.option("--backend", "backends", multiple=True,
              help="Only these backends: torch, onnxruntime, openvino, tensorrt (comma list).")
@click.option("--precision", "precisions", multiple=True, help="Only these precisions: fp32, bf16, fp16, int8.")
@click.option("--threads", multiple=True, help="Thread counts to time (comma list) [suite default].")
@click.option("--batch", "batches", multiple=True, help="Batch sizes to time (comma list).")
@click.option("--input-size", "sizes", multiple=True, help="Square input sizes to time, e.g. 512 (comma list).")
@click.option("--budget", type=float, default=None, help="Timed seconds per row after min-iters.")
@click.option("--min-iters", type=int, default=None)
@click.option("--max-iters", type=int, default=None)
@click.option("--no-isolate", is_flag=True, help="Run every row in this process (faster; no crash isolation).")
@click.option("--set", "overrides", multiple=True, help="Suite override key=value (e.g. timing.warmup=5).")
@click.option("--rounds", type=int, default=None,
              help="Timing rounds of the rows under 200 ms per call, interleaved across rows "
                   "[the suite's timing.rounds: 3].")
@click.pass_context
def bench_cmd(ctx: click.Context, suite_name: str, out_dir: str | None, root: str | None, data: str | None,
              models: tuple[str, ...], checkpoints: tuple[str, ...], artifacts: tuple[str, ...], backends: tuple[str, ...],
              precisions: tuple[str, ...], threads: tuple[str, ...], batches: tuple[str, ...],
              sizes: tuple[str, ...], budget: float | None, min_iters: int | None, max_iters: int | None,
              no_isolate: bool, overrides: tuple[str, ...], rounds: int | None) -> None:
    """Time and evaluate every model x backend x precision of a suite; write records and a report.

    \b
    Examples:
      mirage-edge bench --suite synthetic --root demo-out
      mirage-edge bench --suite duke-dme-fluid --data /data --root runs/duke --threads 1,2
      mirage-edge bench --suite synthetic --artifact runs/export/student-int8 --backend openvino
      mirage-edge bench crosscheck runs/export/student/openvino-int8 --threads 2 --rounds 5
      mirage-edge bench breakdown runs/export/student/openvino-int8 --threads 2
    """
    if ctx.invoked_subcommand is not None:
        return  # `mirage-edge bench crosscheck|breakdown ...`: the suite options do not apply
    from mirage_edge.bench.run import bench

    sets = list(overrides)
    for key, vals in (("threads", _ints(threads, "--threads")), ("batch_sizes", _ints(batches, "--batch")),
                      ("input_sizes", _ints(sizes, "--input-size"))):
        if vals:
            sets.append(f"timing.{key}={vals}")
    for key, val in (("budget_s", budget), ("min_iters", min_iters), ("max_iters", max_iters)):
        if val is not None:
            sets.append(f"timing.{key}={val}")
    if root:
        sets.append(f"root={_toml_str(root)}")
    if data:
        sets.append(f"data={_toml_str(data)}")
    result = bench(suite_name, out_dir=out_dir, overrides=sets, models=_split(models) or None,
                   backends=_split(backends) or None, precisions=_split(precisions) or None,
                   checkpoints=list(checkpoints), artifacts=list(artifacts), isolate=False if no_isolate else None,
                   rounds=rounds)
    from mirage_edge.bench.report import print_table

    click.echo(print_table(result.records))
    for name, path in result.paths.items():
        click.echo(f"{name}: {path}")


@bench_cmd.command("crosscheck")
@click.argument("artifact", type=click.Path(file_okay=False))
@click.option("--threads", type=int, default=2, show_default=True, help="Inference threads on both sides.")
@click.option("--rounds", type=int, default=5, show_default=True,
              help="Interleaved rounds (bench, then benchmark_app).")
@click.option("--seconds", type=int, default=2, show_default=True, help="Timed seconds per side and round.")
@click.option("--batch", type=int, default=1, show_default=True)
@click.option("--app", default=None, help="benchmark_app executable [on PATH or beside this Python].")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default=None,
              help="JSON record to write [bench-out/crosscheck/<model>-<folder>.json].")
def crosscheck_cmd(artifact: str, threads: int, rounds: int, seconds: int, batch: int, app: str | None,
                   out_path: str | None) -> None:
    """Time one artifact with the bench's own worker and with OpenVINO's benchmark_app, interleaved
    over several rounds; print both medians and their ratio, and write a JSON record.

    \b
    Example:
      mirage-edge bench crosscheck demo-out/export/student/openvino-int8 --threads 2 --rounds 5
    """
    from mirage_edge._log import progress
    from mirage_edge.bench.crosscheck import crosscheck

    _report(crosscheck(artifact, threads=threads, rounds=rounds, seconds=seconds, batch=batch, app=app,
                       progress=progress), "crosscheck", artifact, out_path)


@bench_cmd.command("breakdown")
@click.argument("artifact", type=click.Path(file_okay=False))
@click.option("--threads", type=int, default=2, show_default=True, help="Inference threads.")
@click.option("--iters", type=int, default=200, show_default=True,
              help="Profiled calls (each paired with an unprofiled one).")
@click.option("--batch", type=int, default=1, show_default=True)
@click.option("--names-from", type=click.Path(), default=None,
              help="Model file or artifact folder whose weight names label the ops [an ONNX sibling of the same "
                   "export, else the artifact itself].")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default=None,
              help="JSON record to write [bench-out/breakdown/<model>-<folder>.json].")
def breakdown_cmd(artifact: str, threads: int, iters: int, batch: int, names_from: str | None,
                  out_path: str | None) -> None:
    """Split one OpenVINO call of an artifact into encoder, head, output, unattributed nodes, call
    overhead and copies (OpenVINO performance counters); print ms and % per part, write a JSON record.

    \b
    Example:
      mirage-edge bench breakdown demo-out/export/student/openvino-int8 --threads 2 --iters 200
    """
    from mirage_edge._log import progress
    from mirage_edge.bench.breakdown import breakdown

    _report(breakdown(artifact, threads=threads, iters=iters, batch=batch, names_from=names_from,
                      progress=progress), "breakdown", artifact, out_path)


def _report(result, kind: str, artifact: str, out_path: str | None) -> None:
    """Print a crosscheck / breakdown result and write its JSON record [bench-out/KIND/<model>-<folder>.json]."""
    from pathlib import Path

    from mirage_edge.bench.crosscheck import write_record

    for line in result.lines():
        click.echo(line)
    folder = Path(artifact).resolve()
    default = Path("bench-out") / kind / f"{folder.parent.name}-{folder.name}.json"
    click.echo(f"record: {write_record(result, out_path or default)}")


def _toml_str(text: str) -> str:
    import json

    return json.dumps(text)


@click.command("demo")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="demo-out", show_default=True,
              help="Folder for everything the demo makes; a second run reuses what is there.")
@click.option("--fast", is_flag=True, help="One-minute smoke version (tiny data, few steps, short timing).")
@click.option("--force", is_flag=True, help="Redo every stage even if its output exists.")
@click.option("--threads", type=int, default=2, show_default=True, help="Threads for training and timing.")
def demo_cmd(out_dir: str, fast: bool, force: bool, threads: int) -> None:
    """Offline end-to-end run: synthetic data -> mirage-tiny teacher -> QAT student -> ONNX/OpenVINO
    (fp32, int8) -> synthetic benchmark suite; prints the table and the report/plot paths."""
    from mirage_edge.bench.demo import run_demo

    run_demo(out_dir, fast=fast, force=force, threads=threads)
