"""`medvq` commands run in-process as a user types them, for the end-to-end tests."""

from __future__ import annotations

from pathlib import Path

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


def train_ok(method: str, data, out: Path, *flags) -> Path:
    """``medvq train METHOD --data DATA --out OUT FLAGS``, which must succeed; the run folder OUT."""
    cli_ok("train", method, "--data", data, "--out", out, *flags)
    return out


def evaluate_ok(run: Path, data, *, expect: str | None = None) -> Path:
    """``medvq evaluate RUN --data DATA`` into the folder ``eval`` next to the run, which must succeed (and print
    ``expect``); that folder."""
    out = run.parent / "eval"
    output = cli_ok("evaluate", run, "--data", data, "--out", out)
    assert expect is None or expect in output, output
    return out
