"""The one place for writing files all or nothing (used by both packages): atomic file writes, staging folders
renamed into place, and "can files be created here?"."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def temporary_path(path: Path) -> Path:
    """The hidden temporary name beside `path` that `atomic_file` writes first: ``.<name>.tmp<suffixes>``, so a
    writer that picks its format from the file name (SimpleITK, matplotlib) still finds it."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{''.join(path.suffixes)}")


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write; when the block ends without error it is renamed onto
    `path` in one step, otherwise removed. Readers never see a partly written `path`."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` through `atomic_file`."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write `obj` as sorted, 2-space indented ASCII JSON with a final newline through `atomic_file`."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=True) + "\n")


def make_staging_dir(parent: Path, prefix: str) -> Path:
    """A new hidden folder in `parent` with the permissions of a folder made by ``mkdir`` (umask applied),
    not the owner-only ones of ``tempfile.mkdtemp``: it may be renamed into the output as it is."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(folder, 0o777 & ~mask)
    return folder


def nearest_existing(path: Path) -> Path:
    """`path` (made absolute) or its nearest ancestor that exists: where creating it would begin. A symbolic
    link counts as existing even when it leads nowhere; a path inside a folder one may not search does not
    exist (``os.path``, not ``Path.exists``, which raises there before Python 3.13)."""
    path = Path(os.path.abspath(path))
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def creation_problem(folder: Path) -> str | None:
    """Why files cannot be created in `folder` (its missing parents made first), or None when they can.

    Creates and removes a temporary file in the nearest existing folder: that also finds read-only mounts and
    folders such as /proc, where ``os.access`` says yes to root. Nothing stays behind.
    """
    base = nearest_existing(folder)
    if os.path.islink(base) and not os.path.exists(base):
        return f"{base} is a symbolic link to {os.readlink(base)}, which does not exist"
    if not os.path.isdir(base):
        return f"{base} is a file, not a folder"
    try:
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as error:
        return f"cannot create files in {base} ({error.strerror or error})"
    return None


def previous_path(folder: Path) -> Path:
    """Where `replace_folder` moves the folder it replaces: ``.<name>.previous`` beside it."""
    return folder.with_name(f".{folder.name}.previous")


def replace_folder(staged: Path, folder: Path) -> None:
    """Put `staged` in place of `folder` as a whole: an existing `folder` is moved aside to
    `previous_path(folder)`, `staged` is renamed into place and the old folder removed; if that rename
    fails, the old folder is put back. A process killed between the two renames leaves the old folder
    at `previous_path(folder)` and no `folder`."""
    if not folder.exists():
        os.replace(staged, folder)
        return
    previous = previous_path(folder)
    shutil.rmtree(previous, ignore_errors=True)  # left by a run killed after its renames
    os.replace(folder, previous)
    try:
        os.replace(staged, folder)
    except OSError:
        os.replace(previous, folder)
        raise
    shutil.rmtree(previous, ignore_errors=True)
