"""Errors a user can act on. The CLI prints them as one line and exits with status 2."""

from __future__ import annotations

from pathlib import Path


class MedvqError(ValueError):
    """An input problem the user can fix: names the file (when there is one), the problem and the fix."""

    def __init__(self, problem: str, *, path: str | Path | None = None, fix: str | None = None):
        self.path = Path(path) if path is not None else None
        self.problem = problem
        self.fix = fix
        text = f"{self.path}: {problem}" if self.path is not None else problem
        if fix:
            text += f" ({fix})"
        super().__init__(text)


class ImageReadError(MedvqError):
    """An image file that cannot be read or holds no pixels."""


class DatasetError(MedvqError):
    """A data folder that does not hold what the command needs."""


class CheckpointError(MedvqError):
    """A run directory or checkpoint that does not match what loading expects."""
