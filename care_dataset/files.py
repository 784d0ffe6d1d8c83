"""The one place for writing files all or nothing (used by both packages): atomic file writes (owner-only ones
too), new private files that never replace anything, staging folders renamed into place, "can files be created
here?", and one writer per output folder (its lock).

The lock: an exclusive, non-blocking ``fcntl.flock`` on ``<folder>/.lock``, taken by ``care-convert`` and
``care-anonymize``, so a second run on the same output folder refuses at once instead of deleting the first
run's temporaries. The kernel releases it when the process dies, even by ``kill -9``; the lock file holds the
writer's process ID only and is removed when the lock is released, so a finished run leaves nothing behind.
Without ``fcntl`` (Windows) nothing is locked.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


def temporary_path(path: Path) -> Path:
    """The hidden temporary name beside `path` that `atomic_file` writes first: ``.<name>.tmp<suffixes>``, so a
    writer that picks its format from the file name (SimpleITK, matplotlib) still finds it."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{''.join(path.suffixes)}")


@contextmanager
def atomic_file(path: Path, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write; when the block ends without error it is renamed onto
    `path` in one step, otherwise removed. Readers never see a partly written `path`.

    With `mode` (e.g. 0o600) the temporary file is created empty with exactly that mode before the block
    runs, so what is written to it never has wider permissions.
    """
    path = Path(path)
    tmp = temporary_path(path)
    try:
        if mode is not None:
            _create_empty(tmp, mode)
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _open_new(path: Path, mode: int) -> int:
    """A descriptor of a new file at `path` with exactly `mode` (umask not applied); FileExistsError when
    something is there already (never replaced, nor a link followed)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        Path(path).unlink(missing_ok=True)
        raise
    return fd


def _create_empty(path: Path, mode: int) -> None:
    """A new empty file at `path` with exactly `mode`; one left there before is replaced."""
    path.unlink(missing_ok=True)
    os.close(_open_new(path, mode))


def create_private_file(path: Path, data: bytes) -> None:
    """Create `path` holding `data`, mode 0600 from its first moment; FileExistsError when something is at
    `path` already (it is never replaced, nor a link followed). A failed write leaves no file."""
    fd = _open_new(path, 0o600)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        Path(path).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_folder(folder: Path, purpose: str) -> Iterator[Path]:
    """Yield an empty hidden staging folder beside `folder` (``.<name>.<purpose>-*``); when the block ends
    without error it takes `folder`'s place as a whole (`replace_folder`), otherwise it is removed."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = make_staging_dir(folder.parent, f".{folder.name}.{purpose}-")
    try:
        yield staging
        replace_folder(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_text_atomic(path: Path, text: str, mode: int | None = None) -> None:
    """Write `text` (UTF-8) to `path` through `atomic_file` (`mode` as there)."""
    with atomic_file(path, mode) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: Path, obj: Any, mode: int | None = None) -> None:
    """Write `obj` as sorted, 2-space indented ASCII JSON with a final newline through `atomic_file` (`mode` as
    there)."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=True) + "\n", mode)


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


# --- one writer per output folder -------------------------------------------------------------------------

LOCK_NAME = ".lock"
# flock errors of a file system that cannot lock at all: the run goes on, with a warning
UNLOCKABLE_ERRNOS = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL})
# Descriptors of the locks this process holds. A forked child (a conversion worker) closes its copies at
# once: the lock then lives and dies with the process that took it, and workers left behind by a killed
# run do not keep the folder locked.
_held: set[int] = set()


def _close_held_in_child() -> None:
    for fd in _held:
        try:
            os.close(fd)
        except OSError:
            pass
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_held_in_child)


class OutputLockedError(ValueError):
    """Another process holds the output folder's lock; one line for the user."""


def lock_path(folder: Path) -> Path:
    return Path(folder) / LOCK_NAME


def _holder(path: Path) -> str:
    try:
        pid = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return ""
    return f" (process {pid})" if pid.isdigit() else ""


def _acquire(path: Path, what: str) -> int | None:
    """Open and lock ``path``; retried when the file was removed by its previous holder meanwhile.

    None when the file system cannot lock files (some network and FUSE mounts)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputLockedError(f"output folder {path.parent} is being written by another "
                                    f"{what}{_holder(path)}; wait for it to finish") from None
        except OSError as err:
            os.close(fd)
            if err.errno in UNLOCKABLE_ERRNOS:
                return None
            raise
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # we locked a file its holder had just unlinked: lock the current one instead


@contextmanager
def hold_output_lock(folder: Path, what: str) -> Iterator[Path]:
    """Hold the exclusive lock of ``folder`` (created when missing) for the ``with`` block.

    ``what`` names the command for the refusal message, e.g. ``"care-convert"``. Raises OutputLockedError at
    once when another process holds the lock. Yields the lock file's path (callers must not delete it).
    A folder this call created is removed again on exit when it is still empty.
    """
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = lock_path(folder)
    if fcntl is None:  # pragma: no cover - Windows
        yield path
        return
    fd = _acquire(path, what)
    if fd is None:
        print(f"warning: {what}: the file system of {folder} cannot lock files; make sure no other run writes "
              "this output folder at the same time", file=sys.stderr)
        path.unlink(missing_ok=True)
        yield path
        return
    _held.add(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        yield path
    finally:
        path.unlink(missing_ok=True)  # before unlocking: a waiting opener then sees a changed inode and retries
        _held.discard(fd)
        os.close(fd)
        if created:
            try:
                folder.rmdir()
            except OSError:
                pass
