"""Staging folders for outputs written all or nothing: filled, then renamed into place."""

from __future__ import annotations

import os
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
