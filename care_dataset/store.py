"""Slice storage: one group per case (zarr v3 with sharding, or HDF5) and one reader for both.

Physical layout under a converted folder (see docs/format.md):

    slices.zarr/<case_id>/{image,label}   zarr v3 arrays, one slice per chunk, one shard per case
    slices_h5/<case_id>.h5:{image,label}  HDF5 datasets, one slice per chunk

``image`` is int16 HU with shape (n, H, W), ``label`` uint8 with the same shape; ``n`` counts the kept
axial slices of the case in the canonical orientation (row 0 = patient anterior, column 0 = patient right).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_NAME = "care-slices"
FORMAT_VERSION = "1.0"
STORAGE_FORMATS = ("zarr", "h5")
ZARR_DIR = "slices.zarr"
H5_DIR = "slices_h5"
TMP_DIR = ".tmp"


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as sorted, indented JSON through a temporary file and an atomic rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=True) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def content_checksum(image: np.ndarray, label: np.ndarray) -> str:
    """SHA-256 of the arrays' C-order bytes (image then label): identical for zarr and HDF5 copies."""
    digest = hashlib.sha256()
    for array in (image, label):
        digest.update(memoryview(np.ascontiguousarray(array)).cast("B"))  # the bytes, without a copy
    return digest.hexdigest()


def _case_path(root: Path, storage: str, case_id: str) -> Path:
    if storage == "zarr":
        return root / ZARR_DIR / case_id
    if storage == "h5":
        return root / H5_DIR / f"{case_id}.h5"
    raise ValueError(f"unknown storage format {storage!r}; expected one of {STORAGE_FORMATS}")


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
    return _case_path(Path(root), storage, case_id).exists()


def remove_case(root: Path, storage: str, case_id: str) -> None:
    path = _case_path(Path(root), storage, case_id)
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
    final = _case_path(root, storage, case_id)
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
EMPTY_CHUNK = 2**64 - 1  # offset and length of a chunk that holds only the fill value (zarr v3 sharding)


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


def shard_path(array_dir: Path) -> Path:
    """The one shard file of an array written here (a single (n, H, W) shard, chunk key encoding "default")."""
    return array_dir / "c" / "0" / "0" / "0"


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
    tmp = folder / ".zarr.json.tmp"
    tmp.write_text(json.dumps(metadata, indent=2))
    os.replace(tmp, folder / "zarr.json")


def shard_codec() -> Any:
    """The numcodecs Blosc codec of :data:`SHARD_CODEC`, which compresses every chunk of a shard."""
    import numcodecs

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
    from google_crc32c import value as crc32c  # what zarr >= 3.1 computes the index checksum with

    codec = shard_codec()

    def encode_chunk(position: int) -> bytes:
        chunk = data[position]
        return codec.encode(np.ascontiguousarray(chunk)) if chunk.any() else b""

    if _encode_threads > 1 and len(data) > 1:
        from concurrent.futures import ThreadPoolExecutor  # Blosc releases the GIL

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
    import h5py

    n, h, w = image.shape
    with h5py.File(path, "w", track_order=True) as f:
        for name, data in (("image", image), ("label", label)):
            f.create_dataset(name, data=data, chunks=(1, h, w), compression="gzip", compression_opts=1,
                             shuffle=True, track_times=False)


class SplitSlices:
    """One numbering of the stored slices of a split's cases, in split order: what a reader of cases offers
    as a flat slice dataset (`CareDataset` and `care_dataset.published.PublishedDataset`).

    A reader defines ``cases`` (per case ``num_slices``, ``kept_slices``, ``spacing``),
    ``_ordered_ids(split)`` (the split's case IDs, all of them sorted for ``None``), ``read_slice`` and an
    ``_index_cache`` dict.
    """

    cases: dict[str, dict]
    _index_cache: dict[str, np.ndarray]

    def _ordered_ids(self, split: str | None) -> list[str]:
        raise NotImplementedError

    def read_slice(self, case_id: str, position: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def case_ids(self, split: str | None = None) -> list[str]:
        return list(self._ordered_ids(split))

    def slice_index(self, split: str | None = None) -> np.ndarray:
        """(N, 2) int64 table of (case number within ``case_ids(split)``, stored position) for every slice."""
        key = split or ""
        if key not in self._index_cache:
            rows = [np.stack([np.full(self.cases[c]["num_slices"], i), np.arange(self.cases[c]["num_slices"])], 1)
                    for i, c in enumerate(self.case_ids(split))]
            self._index_cache[key] = np.concatenate(rows).astype(np.int64) if rows else np.zeros((0, 2), np.int64)
        return self._index_cache[key]

    def num_slices(self, split: str | None = None) -> int:
        return int(len(self.slice_index(split)))

    def sample(self, split: str | None, i: int) -> dict:
        """Slice ``i`` of a split as the common sample dict (also produced from a Hugging Face dataset).

        Keys: image (H, W) int16 HU, label (H, W) uint8, case_id str, slice_index int (axial index in the
        case's canonical volume), spacing (x, y, z) mm.
        """
        case_number, position = self.slice_index(split)[i]
        case_id = self._ordered_ids(split)[case_number]
        image, label = self.read_slice(case_id, int(position))
        geometry = self.cases[case_id]
        return {
            "image": image,
            "label": label,
            "case_id": case_id,
            "slice_index": int(geometry["kept_slices"][position]),
            "spacing": tuple(float(s) for s in geometry["spacing"]),
        }


class CareDataset(SplitSlices):
    """Read a converted CARE folder: manifest, splits, per-case geometry and slices.

    Handles to zarr groups / HDF5 files are opened lazily per process, so an instance can be handed to
    DataLoader workers (fork or spawn) safely.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        manifest_path = self.root / "dataset.json"
        if not manifest_path.exists():
            raise FileNotFoundError(f"{self.root}: not a converted CARE folder (no dataset.json)")
        self.manifest: dict = read_json(manifest_path)
        if self.manifest.get("format") != FORMAT_NAME:
            raise ValueError(f"{self.root}: dataset.json format is {self.manifest.get('format')!r}, not {FORMAT_NAME!r}")
        major = str(self.manifest.get("format_version", "0")).split(".")[0]
        if major != FORMAT_VERSION.split(".")[0]:
            raise ValueError(f"{self.root}: format version {self.manifest.get('format_version')} is not readable "
                             f"by this reader (version {FORMAT_VERSION})")
        self.storage: str = self.manifest["storage"]
        self.cases: dict[str, dict] = read_json(self.root / "cases.json")
        self.splits: dict[str, list[str]] = {k: v for k, v in read_json(self.root / "splits.json").items()
                                             if isinstance(v, list)}
        self._handles: dict[str, Any] = {}
        self._pid = os.getpid()
        self._index_cache: dict[str, np.ndarray] = {}
        self._ids_cache: dict[str, list[str]] = {}

    def __getstate__(self) -> dict:
        # Open zarr/HDF5 handles are per process and cannot be pickled (spawned DataLoader workers).
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state

    @property
    def class_names(self) -> list[str]:
        """Class names indexed by label value (0 = background)."""
        return list(self.manifest["classes"])

    @property
    def num_classes(self) -> int:
        return len(self.manifest["classes"])

    def _ordered_ids(self, split: str | None) -> list[str]:
        """``case_ids(split)`` without a copy per call (``sample`` is on the training hot path)."""
        if split is None:
            if "" not in self._ids_cache:
                self._ids_cache[""] = sorted(self.cases)
            return self._ids_cache[""]
        if split not in self.splits:
            raise KeyError(f"no split {split!r}; this dataset has {sorted(self.splits)}")
        return self.splits[split]

    def _arrays(self, case_id: str) -> Any:
        if os.getpid() != self._pid:
            self._handles.clear()
            self._pid = os.getpid()
        handle = self._handles.get(case_id)
        if handle is None:
            if case_id not in self.cases:
                raise KeyError(f"unknown case {case_id!r}")
            path = _case_path(self.root, self.storage, case_id)
            if self.storage == "zarr":
                handle = (_open_zarr_slices(path / "image"), _open_zarr_slices(path / "label"))
            else:
                import h5py

                f = h5py.File(path, "r")
                handle = (f["image"], f["label"])
            self._handles[case_id] = handle
        return handle

    def missing_cases(self, case_ids: list[str]) -> list[str]:
        """The cases among ``case_ids`` whose stored slices are absent (a cheap check of the files, not of
        their contents). A zarr array without its shard file counts as absent: zarr omits the shard only when
        every slice is all zeros, which a stored case (every slice holds a labelled class) never is."""
        def present(case_id: str) -> bool:
            path = _case_path(self.root, self.storage, case_id)
            if self.storage == "zarr":
                return all((path / name / "zarr.json").is_file() and shard_path(path / name).is_file()
                           for name in ("image", "label"))
            return path.is_file()

        return [case_id for case_id in case_ids if not present(case_id)]

    def read_case(self, case_id: str) -> tuple[np.ndarray, np.ndarray]:
        """Whole case: image (n, H, W) int16, label (n, H, W) uint8."""
        image, label = self._arrays(case_id)
        return np.asarray(image[...]), np.asarray(label[...])

    def read_labels(self, case_id: str) -> np.ndarray:
        """Every stored label slice of a case, without reading the image: (n, H, W) uint8."""
        _, label = self._arrays(case_id)
        return np.asarray(label[...])

    def read_slice(self, case_id: str, position: int) -> tuple[np.ndarray, np.ndarray]:
        """One stored slice (position in 0..n-1): image (H, W) int16, label (H, W) uint8."""
        image, label = self._arrays(case_id)
        return np.asarray(image[position]), np.asarray(label[position])

    def __repr__(self) -> str:
        splits = ", ".join(f"{k}: {len(v)} cases" for k, v in self.splits.items())
        return f"CareDataset({str(self.root)!r}, storage={self.storage}, {splits})"


class ShardedSlices:
    """Read one slice of a single-shard zarr array written by :func:`write_case` without zarr's call overhead.

    zarr's synchronous API costs about 1-2 ms per call (an event-loop round trip and a re-read of the shard
    index), which dominates random slice access in training. The layout written here is fixed (one shard,
    one (1, H, W) chunk per slice, bytes + Blosc inner codecs, index at the end with crc32c), so the shard
    index is read once and each slice is one ``pread`` and one Blosc decompression, following the zarr v3
    sharding specification. A whole-array read (``[...]`` or ``[:]``) is one read of the shard and one
    decompression per chunk into the result; any other key goes through zarr itself. Tests check both paths
    agree with zarr.
    """

    def __init__(self, array_dir: Path, array: Any):
        import numcodecs.blosc

        self._array = array
        self._decompress = numcodecs.blosc.decompress
        self.shape = tuple(array.shape)
        self.dtype = np.dtype(array.dtype.to_native_dtype() if hasattr(array.dtype, "to_native_dtype") else array.dtype)
        self._shard_path = shard_path(array_dir)
        n = self.shape[0]
        index_bytes = 16 * n + 4
        with open(self._shard_path, "rb") as f:
            f.seek(-index_bytes, os.SEEK_END)
            index = f.read(index_bytes)
        self._index = np.frombuffer(index[:-4], dtype="<u8").reshape(n, 2)
        self._fd: int | None = None

    def __getitem__(self, key: Any) -> np.ndarray:
        if key is Ellipsis or (isinstance(key, slice) and key == slice(None)):
            return self._read_all()
        if not isinstance(key, (int, np.integer)):
            return np.asarray(self._array[key])
        position = int(key)
        if not -self.shape[0] <= position < self.shape[0]:
            raise IndexError(f"slice {position} out of range for {self.shape[0]} slices")
        offset, nbytes = (int(v) for v in self._index[position])
        if offset == EMPTY_CHUNK:  # the fill value
            return np.zeros(self.shape[1:], self.dtype)
        if self._fd is None:
            self._fd = os.open(self._shard_path, os.O_RDONLY)
        raw = self._decompress(os.pread(self._fd, nbytes, offset))
        return np.frombuffer(raw, dtype=self.dtype.newbyteorder("<")).reshape(self.shape[1:])

    def _read_all(self) -> np.ndarray:
        stored = np.zeros(self.shape, self.dtype.newbyteorder("<"))
        with open(self._shard_path, "rb") as f:
            shard = memoryview(f.read())
        for position, (offset, nbytes) in enumerate(self._index.tolist()):
            if offset != EMPTY_CHUNK:
                self._decompress(shard[offset:offset + nbytes], stored[position])
        return stored.astype(self.dtype, copy=False)

    def __del__(self, _close=os.close) -> None:  # bound here: at interpreter exit the module's os may be gone
        if getattr(self, "_fd", None) is not None:
            _close(self._fd)


def _open_zarr_slices(array_dir: Path) -> Any:
    """A :class:`ShardedSlices` when the array has the layout this module writes, else the zarr array."""
    import zarr

    array = zarr.open_array(str(array_dir), mode="r")
    meta = read_json(array_dir / "zarr.json")
    codecs = meta.get("codecs", [])
    expected_chunk = [1, *meta["shape"][1:]]
    if (len(codecs) == 1 and codecs[0]["name"] == "sharding_indexed"
            and meta["chunk_grid"]["configuration"]["chunk_shape"] == meta["shape"]
            and meta["chunk_key_encoding"] == {"name": "default", "configuration": {"separator": "/"}}):
        config = codecs[0]["configuration"]
        inner = [c["name"] for c in config["codecs"]]
        index = [c["name"] for c in config["index_codecs"]]
        if (config["chunk_shape"] == expected_chunk and inner == ["bytes", "blosc"]
                and config["codecs"][0].get("configuration", {}).get("endian", "little") == "little"
                and index == ["bytes", "crc32c"] and config.get("index_location", "end") == "end"):
            return ShardedSlices(array_dir, array)
    return array


def open_dataset(path: str | Path) -> CareDataset:
    """Open a converted CARE folder (zarr or HDF5 storage)."""
    return CareDataset(path)
