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


class BlankScanError(ImageReadError):
    """A scan without a single valid pixel (saturated white or blank): nothing to score; skipped and counted."""


class DatasetError(MedvqError):
    """A data folder that does not hold what the command needs."""


class CheckpointError(MedvqError):
    """A run directory or checkpoint that does not match what loading expects."""


class TrainingDiverged(MedvqError):
    """A non-finite training loss: training stops at once, the last finished epoch's files are kept."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training, after ``epochs`` finished epochs of the run in ``run``."""

    def __init__(self, epochs: int, run: str | Path, resumable: bool = True):
        self.epochs, self.run, self.resumable = epochs, Path(run), resumable
        super().__init__(f"interrupted after epoch {epochs}")
