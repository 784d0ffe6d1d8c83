"""The converted folder's names and fixed values, shared by its writer and its reader (see docs/format.md):

    dataset.json, cases.json, splits.json, report.json
    slices.zarr/<case_id>/{image,label}   zarr v3 arrays, one slice per chunk, one shard per case
    slices_h5/<case_id>.h5:{image,label}  HDF5 datasets, one slice per chunk

``image`` is int16 HU with shape (n, H, W), ``label`` uint8 with the same shape; ``n`` counts the kept
axial slices of the case in the canonical orientation (row 0 = patient anterior, column 0 = patient right).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_NAME = "care-slices"
FORMAT_VERSION = "1.0"
STORAGE_FORMATS = ("zarr", "h5")
ZARR_DIR = "slices.zarr"
H5_DIR = "slices_h5"
TMP_DIR = ".tmp"
EMPTY_CHUNK = 2**64 - 1  # offset and length of a chunk that holds only the fill value (zarr v3 sharding)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def content_checksum(image: np.ndarray, label: np.ndarray) -> str:
    """SHA-256 of the arrays' C-order bytes (image then label): identical for zarr and HDF5 copies."""
    digest = hashlib.sha256()
    for array in (image, label):
        digest.update(memoryview(np.ascontiguousarray(array)).cast("B"))  # the bytes, without a copy
    return digest.hexdigest()


def whole_scan(geometry: dict) -> bool:
    """Whether a case's stored slices are every canonical slice of its scan (cases.json's ``kept_slices`` and
    ``canonical.size``), as a conversion with ``[slices] margin = "all"`` keeps them."""
    return list(geometry["kept_slices"]) == list(range(int(geometry["canonical"]["size"][2])))


def case_path(root: Path, storage: str, case_id: str) -> Path:
    """Where a case's arrays lie: its zarr group folder or its HDF5 file."""
    if storage == "zarr":
        return root / ZARR_DIR / case_id
    if storage == "h5":
        return root / H5_DIR / f"{case_id}.h5"
    raise ValueError(f"unknown storage format {storage!r}; expected one of {STORAGE_FORMATS}")


def shard_path(array_dir: Path) -> Path:
    """The one shard file of an array written here (a single (n, H, W) shard, chunk key encoding "default")."""
    return array_dir / "c" / "0" / "0" / "0"
