"""Progress bars for long work (rich); silent when disabled or when stderr is not a terminal and CI is set."""

from __future__ import annotations

import os
import sys
from typing import Iterable, Iterator, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

T = TypeVar("T")

console = Console(stderr=True)


def progress_enabled(requested: bool | None = None) -> bool:
    if requested is not None:
        return requested
    return sys.stderr.isatty() and not os.environ.get("CONCEPTFIX_NO_PROGRESS")


def track(iterable: Iterable[T], *, total: int | None = None, description: str = "", enabled: bool | None = None) -> Iterator[T]:
    if not progress_enabled(enabled):
        yield from iterable
        return
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(description, total=total)
        for item in iterable:
            yield item
            progress.advance(task)
