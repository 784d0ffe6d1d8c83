"""Terminal output of the console scripts: a rich progress bar (only on a terminal) and lines above it."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)


def stderr_console() -> Console:
    return Console(file=sys.stderr, highlight=False, soft_wrap=True)


def stdout_console() -> Console:
    return Console(file=sys.stdout, highlight=False, soft_wrap=True)


def terminal_progress() -> Progress | None:
    """A rich Progress on stderr when it is a terminal, else None (for callers that take an optional one)."""
    console = stderr_console()
    if not console.is_terminal:
        return None
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=console)


class CaseProgress:
    """Progress over ``total`` cases; a no-op unless ``enabled`` and stderr is a terminal."""

    def __init__(self, total: int, description: str = "converting", enabled: bool = True):
        self._progress = terminal_progress() if enabled else None
        if self._progress is not None:
            self._task = self._progress.add_task(description, total=total)

    def __enter__(self) -> CaseProgress:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()

    def advance(self, steps: int = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, steps)

    def print(self, message: str) -> None:
        """A line above the bar (or plain on stderr without one)."""
        console = self._progress.console if self._progress is not None else stderr_console()
        console.print(escape(message))
