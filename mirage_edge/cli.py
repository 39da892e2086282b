"""`mirage-edge` command line: a thin click group.

Subcommands live next to the code they drive (`mirage_edge/<area>/cli.py`) and are imported only
when named, so `mirage-edge --help` stays fast and torch-free. Those modules import click at top
level and everything heavy inside the command bodies. Every `MirageEdgeError` becomes a one-line
message and its exit code; so does a missing optional package (a runtime-only install running a
toolkit command), which names the extra to install, and an `OSError` of a full disk, a read-only
file system or a refused permission (naming the file). `--debug` shows the traceback instead.

Logging: library modules log to `logging.getLogger(__name__)` under `mirage_edge` and never add
handlers; the CLI adds one for the length of a command (-q warnings only, default info, -v debug,
-vv debug from third-party libraries too).
"""
from __future__ import annotations

import errno
import importlib
import logging
import os
import sys

import click

from mirage_edge import __version__
from mirage_edge._deps import missing_dependency
from mirage_edge.errors import MirageEdgeError, OutputError

# errnos of an OSError that escapes a command and is shown as a one-line error, not a traceback
_USER_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM,
                          errno.ENOTDIR, errno.EISDIR})

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
    "cv": "mirage_edge.bench.cv.cli:cv_cmd",
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
            _fail(ctx, exc, exc)
        except ModuleNotFoundError as exc:
            # Commands import their heavy packages inside their bodies, so a runtime-only install
            # meets a missing toolkit package here rather than at startup.
            command = f"mirage-edge {ctx.invoked_subcommand}" if ctx.invoked_subcommand else ""
            _fail(ctx, exc, missing_dependency(exc, command))
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)
        except OSError as exc:
            # A write that failed outside the paths a command checks itself (full disk, read-only,
            # permission) is the user's to fix, not a bug: one line naming the file, as for ours.
            if exc.errno not in _USER_ERRNOS:
                raise
            _fail(ctx, exc, OutputError(_describe_os_error(exc), exc.errno, exc.filename))


def _describe_os_error(exc: OSError) -> str:
    from mirage_edge._io import DISK_FULL_ERRNOS, write_failure_reason

    reason = write_failure_reason(exc)
    if not exc.filename:
        return reason
    name = os.fsdecode(exc.filename)
    if exc.errno in DISK_FULL_ERRNOS:
        return f"cannot write {name}: {reason}"
    if exc.errno == errno.ENOTDIR:  # a file where a folder of the path should be: name it
        from pathlib import Path

        blocker = next((p for p in (Path(name), *Path(name).parents) if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            return f"{name}: {reason} ({blocker} is a file, not a folder)"
    return f"{name}: {reason}"


def _fail(ctx: click.Context, exc: BaseException, error: MirageEdgeError | None) -> None:
    """Print `error` in one line and exit with its code; re-raise `exc` under --debug or if unmapped."""
    if error is None or ctx.meta.get("mirage_edge.debug") or os.environ.get("MIRAGE_EDGE_DEBUG"):
        raise exc
    click.secho(f"error: {error}", fg="red", err=True)
    ctx.exit(error.exit_code)


class _EchoHandler(logging.Handler):
    """Writes through click, so output follows whatever stderr is current (CliRunner swaps it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.format(record)
            if record.levelno != logging.INFO:
                msg = f"{record.levelname.lower()}: {msg}"
            click.echo(msg, err=True)
        except Exception:
            self.handleError(record)


def _configure_logging(ctx: click.Context, quiet: bool, verbose: int) -> None:
    if quiet and verbose:
        raise click.UsageError("-q/--quiet and -v/--verbose exclude each other")
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    ours = logging.getLogger("mirage_edge")
    # -vv: the handler sits on the root logger, so third-party loggers (nncf, timm ...) reach it too.
    host = logging.getLogger() if verbose >= 2 else ours
    handler = _EchoHandler()
    saved = (ours.level, host.level)
    host.addHandler(handler)
    ours.setLevel(level)
    host.setLevel(level)

    def restore() -> None:  # leave a process that embeds the CLI (tests, notebooks) as it was
        host.removeHandler(handler)
        ours.setLevel(saved[0])
        host.setLevel(saved[1])

    ctx.call_on_close(restore)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="mirage-edge")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.option("-q", "--quiet", is_flag=True, help="Log warnings and errors only.")
@click.option("-v", "--verbose", count=True, help="Log debug messages (-vv: from third-party libraries too).")
@click.pass_context
def cli(ctx: click.Context, debug: bool, quiet: bool, verbose: int) -> None:
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
    _configure_logging(ctx, quiet, verbose)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=argv, prog_name="mirage-edge")


if __name__ == "__main__":  # `python -m mirage_edge.cli` (used with torchrun)
    sys.exit(main())
