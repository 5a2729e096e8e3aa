"""`medvq` commands run in-process as a user types them, for the end-to-end tests."""

from __future__ import annotations

from typer.testing import CliRunner

from medvq.cli import app

_runner = CliRunner()


def cli(*args) -> tuple[int, str]:
    """Exit status and output of ``medvq ARGS`` (paths and numbers given as they are, passed as text)."""
    result = _runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def cli_ok(*args) -> str:
    """Output of ``medvq ARGS``; the test fails with that output unless the command exits 0."""
    code, output = cli(*args)
    assert code == 0, output
    return output
