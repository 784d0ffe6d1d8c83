"""Terminal output for the console scripts: a rich progress bar (only on a TTY), failure lines, summary table.

rich is imported when something is shown (``care-convert --quiet`` starts without it).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from care_dataset.convert import ConvertSummary


def stderr_console() -> Console:
    from rich.console import Console

    return Console(file=sys.stderr, highlight=False, soft_wrap=True)


def stdout_console() -> Console:
    from rich.console import Console

    return Console(file=sys.stdout, highlight=False, soft_wrap=True)


def terminal_progress() -> Progress | None:
    """A rich Progress on stderr when it is a terminal, else None (for callers that take an optional one)."""
    console = stderr_console()
    if not console.is_terminal:
        return None
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

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
        from rich.markup import escape

        console = self._progress.console if self._progress is not None else stderr_console()
        console.print(escape(message))


def summary_table(summary: ConvertSummary) -> Table:
    """Per split: cases, slices, voxels per class; then converted and failed counts."""
    from rich.table import Table

    table = Table(title=f"care-convert: {summary.converted} converted, {summary.failed} failed")
    table.add_column("split")
    table.add_column("cases", justify="right")
    table.add_column("slices", justify="right")
    for name in summary.class_names[1:]:
        table.add_column(f"{name} voxels", justify="right")
    for split, stats in summary.split_stats.items():
        table.add_row(split, str(stats["cases"]), str(stats["slices"]),
                      *(f"{stats['voxels'][name]:,}" for name in summary.class_names[1:]))
    return table


def print_summary(summary: ConvertSummary) -> None:
    from rich.markup import escape

    console = stdout_console()
    console.print(summary_table(summary))
    if summary.failed:
        console.print(f"{summary.failed} case(s) failed; reasons in {escape(str(summary.out_dir / 'report.json'))}")
