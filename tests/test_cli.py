from __future__ import annotations

from click.testing import CliRunner

from conftest import cli_without_torch, run_without_torch
from mirage_edge import __version__
from mirage_edge.cli import COMMANDS, cli


def test_help_does_not_import_torch():
    proc = cli_without_torch("--help")
    assert proc.returncode == 0, proc.stderr
    assert "Usage: mirage-edge" in proc.stdout
    for name in COMMANDS:
        assert name in proc.stdout


def test_every_subcommand_help_is_torch_free():
    for name in COMMANDS:
        proc = cli_without_torch(name, "--help")
        assert proc.returncode == 0, f"{name}: {proc.stderr}"


def test_version():
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.output


def test_import_is_torch_free():
    proc = run_without_torch("import mirage_edge, mirage_edge.errors, mirage_edge.config, mirage_edge.cli")
    assert proc.returncode == 0, proc.stderr
