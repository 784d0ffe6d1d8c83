"""One writer per output folder: an exclusive, non-blocking lock on ``<folder>/.lock``.

Used by ``care-convert`` and ``care-anonymize``: a second run on the same output folder refuses at once
instead of deleting the first run's temporaries. The lock is ``fcntl.flock`` (released by the kernel when the
process dies, even by ``kill -9``); the lock file holds the writer's process ID only and is removed when the
lock is released, so a finished run leaves nothing behind. Without ``fcntl`` (Windows) nothing is locked.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

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
