"""Checks on an export's output folder before any work."""

from __future__ import annotations

from pathlib import Path

from care_dataset.export.errors import ExportError
from care_dataset.files import creation_problem


def check_output(output: Path, source: Path, overwrite: bool) -> None:
    """ExportError when `output` lies in `source`, exists without `overwrite`, or cannot be created."""
    output, source = output.resolve(), source.resolve()
    if output == source or source in output.parents:
        raise ExportError(f"{output}: the output must be outside the converted folder")
    if output.exists() and not overwrite:
        raise ExportError(f"{output} exists; pass --overwrite to replace it")
    if problem := creation_problem(output.parent):
        raise ExportError(f"{output}: {problem}")
