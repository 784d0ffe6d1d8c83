"""What a conversion reports at its end: per split cases, slices and voxels; converted and failed counts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from care_dataset.convert.progress import stdout_console


@dataclass
class ConvertSummary:
    """What ``convert_dataset`` returns: counts per split and outcome, report.json's entries, and the lines
    only the operator's terminal may show."""

    out_dir: Path
    storage: str
    class_names: list[str]
    split_stats: dict[str, dict]
    converted: int
    failed: int
    report: list[dict]
    failures: list[tuple[str, str]]  # (raw folder, reason): terminal only, never written under out_dir
    warnings: list[str] = field(default_factory=list)  # terminal lines without identifying values

    @property
    def all_converted(self) -> bool:
        return self.failed == 0


def summary_table(summary: ConvertSummary) -> Table:
    """Per split: cases, slices, voxels per class; then converted and failed counts."""
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
    console = stdout_console()
    console.print(summary_table(summary))
    if summary.failed:
        console.print(f"{summary.failed} case(s) failed; reasons in {escape(str(summary.out_dir / 'report.json'))}")
