"""Write a converted folder's slices: one group per case (zarr v3 with sharding, or HDF5), each built under
``.tmp/`` and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np
from google_crc32c import value as crc32c  # what zarr >= 3.1 computes the index checksum with

from care_dataset.files import write_text_atomic
from care_dataset.format.layout import (EMPTY_CHUNK, FORMAT_NAME, FORMAT_VERSION, H5_DIR, STORAGE_FORMATS, TMP_DIR,
                                        ZARR_DIR, case_path, shard_path)


def init_store(root: Path, storage: str) -> None:
    """Create the storage container (idempotent)."""
    root = Path(root)
    (root / TMP_DIR).mkdir(parents=True, exist_ok=True)
    if storage == "zarr":
        if not (root / ZARR_DIR / "zarr.json").exists():
            _write_zarr_metadata(root / ZARR_DIR, zarr_group_metadata({"format": FORMAT_NAME,
                                                                        "format_version": FORMAT_VERSION}))
    elif storage == "h5":
        (root / H5_DIR).mkdir(parents=True, exist_ok=True)
    else:
        raise ValueError(f"unknown storage format {storage!r}; expected one of {STORAGE_FORMATS}")


def case_exists(root: Path, storage: str, case_id: str) -> bool:
    return case_path(Path(root), storage, case_id).exists()


def remove_case(root: Path, storage: str, case_id: str) -> None:
    path = case_path(Path(root), storage, case_id)
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def write_case(root: Path, storage: str, case_id: str, image: np.ndarray, label: np.ndarray) -> None:
    """Write one case's kept slices atomically: built under ``.tmp/`` then renamed into place.

    image: (n, H, W) int16 HU; label: (n, H, W) uint8.
    """
    root = Path(root)
    if image.dtype != np.int16 or label.dtype != np.uint8:
        raise TypeError(f"case {case_id}: expected int16 image and uint8 label, got {image.dtype} and {label.dtype}")
    if image.shape != label.shape or image.ndim != 3 or image.shape[0] == 0:
        raise ValueError(f"case {case_id}: image {image.shape} and label {label.shape} must be equal, 3-D, non-empty")
    final = case_path(root, storage, case_id)
    tmp = root / TMP_DIR / final.name
    if tmp.is_dir():
        shutil.rmtree(tmp)
    elif tmp.exists():
        tmp.unlink()
    tmp.parent.mkdir(parents=True, exist_ok=True)
    if storage == "zarr":
        _write_zarr_group(tmp, image, label)
    else:
        _write_h5_file(tmp, image, label)
    if final.exists():
        remove_case(root, storage, case_id)
    os.replace(tmp, final)


def set_encode_threads(threads: int) -> None:
    """Threads that compress one shard's chunks in this process (default: one per CPU)."""
    global _encode_threads
    _encode_threads = max(1, int(threads))


_encode_threads = os.cpu_count() or 1
SHARD_CODEC = {"cname": "zstd", "clevel": 3, "shuffle": "bitshuffle", "blocksize": 0}


def _write_zarr_group(path: Path, image: np.ndarray, label: np.ndarray) -> None:
    """A zarr v3 group of two single-shard arrays, written without zarr's per-call machinery (and import).

    The metadata and shard bytes are those zarr writes for the same arrays (tests/test_convert_speedpaths.py).
    """
    _write_zarr_metadata(path, zarr_group_metadata({}))
    for name, data in (("image", image), ("label", label)):
        _write_zarr_metadata(path / name, zarr_array_metadata(data.shape, data.dtype))
        shard = encode_shard(data)
        if shard:  # zarr writes no shard when every chunk holds only the fill value
            shard_file = shard_path(path / name)
            shard_file.parent.mkdir(parents=True)
            with open(shard_file, "wb") as f:
                f.writelines(shard)


def zarr_group_metadata(attributes: dict) -> dict:
    """``zarr.json`` of a zarr v3 group."""
    return {"attributes": attributes, "zarr_format": 3, "node_type": "group"}


def zarr_array_metadata(shape: tuple[int, ...], dtype: np.dtype) -> dict:
    """``zarr.json`` of a zarr v3 array of ``shape`` (n, H, W): one shard, one (1, H, W) chunk per slice,
    little-endian bytes then Blosc (:data:`SHARD_CODEC`), index at the end with CRC32C, fill value 0."""
    dtype = np.dtype(dtype)
    n, h, w = (int(v) for v in shape)
    bytes_codec = {"name": "bytes", "configuration": {"endian": "little"}} if dtype.itemsize > 1 else {"name": "bytes"}
    blosc = {"name": "blosc", "configuration": {"typesize": dtype.itemsize, **SHARD_CODEC}}
    sharding = {"chunk_shape": [1, h, w], "codecs": [bytes_codec, blosc],
                "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
                "index_location": "end"}
    return {
        "shape": [n, h, w],
        "data_type": dtype.name,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [n, h, w]}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": 0,
        "codecs": [{"name": "sharding_indexed", "configuration": sharding}],
        "attributes": {},
        "zarr_format": 3,
        "node_type": "array",
        "storage_transformers": [],
    }


def _write_zarr_metadata(folder: Path, metadata: dict) -> None:
    """``folder/zarr.json`` as zarr writes it (2-space indented JSON), through a temporary file."""
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / "zarr.json", json.dumps(metadata, indent=2))


def shard_codec() -> Any:
    """The numcodecs Blosc codec of :data:`SHARD_CODEC`, which compresses every chunk of a shard."""
    shuffles = {"noshuffle": numcodecs.Blosc.NOSHUFFLE, "shuffle": numcodecs.Blosc.SHUFFLE,
                "bitshuffle": numcodecs.Blosc.BITSHUFFLE}
    return numcodecs.Blosc(cname=SHARD_CODEC["cname"], clevel=SHARD_CODEC["clevel"],
                           shuffle=shuffles[SHARD_CODEC["shuffle"]], blocksize=SHARD_CODEC["blocksize"])


def encode_shard(data: np.ndarray) -> list[bytes]:
    """The shard of a :func:`zarr_array_metadata` array holding ``data``, as zarr writes it.

    data: (n, H, W), C-contiguous per slice. Chunks are Blosc-compressed with :data:`SHARD_CODEC` (all-zero
    chunks are left out, as zarr does with the fill value 0), in slice order, followed by the index of
    (offset, length) little-endian uint64 pairs and its CRC32C. Returns the pieces to write one after the
    other, or an empty list when every chunk is empty. tests/test_convert_speedpaths.py checks the bytes
    equal zarr's own.
    """
    codec = shard_codec()

    def encode_chunk(position: int) -> bytes:
        chunk = data[position]
        return codec.encode(np.ascontiguousarray(chunk)) if chunk.any() else b""

    if _encode_threads > 1 and len(data) > 1:  # Blosc releases the GIL
        with ThreadPoolExecutor(min(_encode_threads, len(data))) as pool:
            chunks = list(pool.map(encode_chunk, range(len(data))))
    else:
        chunks = [encode_chunk(k) for k in range(len(data))]
    if not any(chunks):
        return []
    index = np.full((len(data), 2), EMPTY_CHUNK, dtype="<u8")
    lengths = np.array([len(c) for c in chunks], dtype=np.uint64)
    stored = lengths > 0
    index[stored, 1] = lengths[stored]
    index[stored, 0] = np.cumsum(lengths)[stored] - lengths[stored]
    index_bytes = index.tobytes()
    return [c for c in chunks if c] + [index_bytes, crc32c(index_bytes).to_bytes(4, "little")]


def _write_h5_file(path: Path, image: np.ndarray, label: np.ndarray) -> None:
    import h5py  # deferred: h5py takes 0.17 s to import; zarr storage never needs it

    n, h, w = image.shape
    with h5py.File(path, "w", track_order=True) as f:
        for name, data in (("image", image), ("label", label)):
            f.create_dataset(name, data=data, chunks=(1, h, w), compression="gzip", compression_opts=1,
                             shuffle=True, track_times=False)
