"""Writing results so that a crash never leaves a half-written file: temp file + os.replace."""

from __future__ import annotations

import csv
import io
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

_UMASK = os.umask(0)
os.umask(_UMASK)


OUTPUT_MARKER = ".medvq-output"  # in every folder medvq writes results to: never read back as input scans


def mark_output(*folders: str | Path) -> None:
    """Create ``folders`` and mark them as medvq's output, so that scan searches skip them."""
    for folder in folders:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        marker = folder / OUTPUT_MARKER
        if not marker.exists():
            marker.write_text("written by medvq; scan folders under here are results, not inputs\n")


def result_folders(out: str | Path, inputs: Iterable[str | Path], *subfolders: str) -> list[Path]:
    """The folders a command that reads ``inputs`` and writes to ``out`` marks as output: ``out`` and its
    ``subfolders``; but not ``out`` itself when it is or holds one of the inputs (results written beside the
    scans), which would hide those scans from every later search of a folder above it, and refuse them."""
    out = Path(out)
    where = out.resolve()
    holds_inputs = any(where == p or where in p.parents for p in (Path(i).resolve() for i in inputs))
    return ([] if holds_inputs else [out]) + [out / s for s in subfolders]


def is_output_folder(folder: str | Path) -> bool:
    return (Path(folder) / OUTPUT_MARKER).is_file()


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; results should be readable like any file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_csv(path: str | Path, rows: list[dict]) -> None:
    """One row per dict (columns from the first row); floats with 6 significant digits."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_text(path, buffer.getvalue())


def atomic_save_npz(path: str | Path, **arrays: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)


def atomic_save_figure(fig, path: str | Path, **kwargs) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png", **kwargs)


class OutputWriter:
    """Writes results on background threads while the caller computes the next ones.

    At most ``max_pending`` writes wait at any time (``submit`` blocks beyond that, so memory stays
    bounded); the first error of a write is raised in the caller, at the next ``submit`` or on leaving the
    ``with`` block, which waits for every write.
    """

    def __init__(self, threads: int = 2, max_pending: int = 16):
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="medvq-writer")
        self._pending: list = []
        self._max_pending = max_pending

    def submit(self, fn, *args) -> None:
        self._pending.append(self._pool.submit(fn, *args))
        while len(self._pending) > self._max_pending or (self._pending and self._pending[0].done()):
            self._pending.pop(0).result()

    def __enter__(self) -> "OutputWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                for future in self._pending:
                    future.result()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=exc_type is not None)


def unique_stem(stem: str, used: set[str]) -> str:
    """``stem``, or ``stem_2``, ``stem_3``, ... if taken: output names that never overwrite each other (added to ``used``)."""
    candidate, k = stem, 1
    while candidate in used:
        k += 1
        candidate = f"{stem}_{k}"
    used.add(candidate)
    return candidate
