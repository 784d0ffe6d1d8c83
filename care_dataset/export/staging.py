"""An export's output folder, written all or nothing: built in a hidden sibling and renamed into place."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from care_dataset.export.errors import ExportError
from care_dataset.files import creation_problem, make_staging_dir, replace_folder


def check_output(output: Path, source: Path, overwrite: bool) -> None:
    """ExportError when `output` lies in `source`, exists without `overwrite`, or cannot be created."""
    output, source = output.resolve(), source.resolve()
    if output == source or source in output.parents:
        raise ExportError(f"{output}: the output must be outside the converted folder")
    if output.exists() and not overwrite:
        raise ExportError(f"{output} exists; pass --overwrite to replace it")
    if problem := creation_problem(output.parent):
        raise ExportError(f"{output}: {problem}")


@contextmanager
def staged_folder(output: Path) -> Iterator[Path]:
    """Yield an empty staging folder beside `output`; it replaces `output` when the block ends without error,
    else it is removed."""
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = make_staging_dir(output.parent, f".{output.name}.export-")
    try:
        yield staging
        replace_folder(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
