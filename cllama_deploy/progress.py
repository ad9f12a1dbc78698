"""Rich progress bars and console output shared by every stage (all on stderr)."""

from __future__ import annotations

import contextlib
from typing import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


@contextlib.contextmanager
def progress(transient: bool = False) -> Iterator[Progress]:
    """A progress display for long steps; add tasks with ``p.add_task(description, total=...)``."""
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=transient,
    )
    with bar:
        yield bar
