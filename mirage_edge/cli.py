"""`mirage-edge` command line: a thin click group.

Subcommands live next to the code they drive (`mirage_edge/<area>/cli.py`) and are imported only
when named, so `mirage-edge --help` stays fast and torch-free. Those modules import click at top
level and everything heavy inside the command bodies. Every `MirageEdgeError` becomes a one-line
message and its exit code; `--debug` shows the traceback instead.
"""
from __future__ import annotations

import importlib
import os
import sys

import click

from mirage_edge import __version__
from mirage_edge.errors import MirageEdgeError

# command name -> "module:attribute". Add a line here when an area gains a command.
COMMANDS: dict[str, str] = {
    "data": "mirage_edge.data.cli:data",
    "info": "mirage_edge.models.cli:info_cmd",
    "convert": "mirage_edge.models.cli:convert_cmd",
    "export": "mirage_edge.export.cli:export_cmd",
    "predict": "mirage_edge.runtime.cli:predict_cmd",
    "bench": "mirage_edge.bench.cli:bench_cmd",
    "demo": "mirage_edge.bench.cli:demo_cmd",
    "train": "mirage_edge.train.cli:train",
    "distill": "mirage_edge.distill.cli:distill_cmd",
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *COMMANDS])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in COMMANDS:
            module, attr = COMMANDS[name].split(":")
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except MirageEdgeError as exc:
            if ctx.meta.get("mirage_edge.debug") or os.environ.get("MIRAGE_EDGE_DEBUG"):
                raise
            click.secho(f"error: {exc}", fg="red", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="mirage-edge")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """MIRAGE for the edge: train, distill, quantize, export and benchmark retinal OCT models.

    \b
    Typical flow:
      mirage-edge data synth --out data/layers --kind layers --n 200
      mirage-edge train finetune --task seg --data data/layers
      mirage-edge distill --teacher runs/teacher --student mobilenetv4_conv_small --qat
      mirage-edge export runs/student --target export/targets/cpu-openvino-int8.toml
      mirage-edge bench --suite benchmarks/suites/synthetic.toml
    """
    ctx.meta["mirage_edge.debug"] = debug


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=argv, prog_name="mirage-edge")


if __name__ == "__main__":  # `python -m mirage_edge.cli` (used with torchrun)
    sys.exit(main())
