"""Progress bars that never outlive their loop."""

from __future__ import annotations

import sys
from contextlib import closing, contextmanager
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


@contextmanager
def progress_bar(items: Iterable[T], description: str | None) -> Iterator[Iterable[T]]:
    """``items`` with a transient progress bar when stderr is a terminal (and a description is given).

    The bar's refresh thread stops however the loop ends: an error in the loop (a bad scan) would otherwise
    leave it running behind the error message.
    """
    if not description or not sys.stderr.isatty():
        yield items
        return
    from rich.progress import track

    with closing(track(items, description=description, transient=True)) as tracked:
        yield tracked
