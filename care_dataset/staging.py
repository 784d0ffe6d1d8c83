"""Staging folders for outputs written all or nothing: filled, then renamed into place (used by both packages)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


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
