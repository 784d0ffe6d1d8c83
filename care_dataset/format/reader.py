"""Read a converted folder: manifest, splits, per-case geometry and slices, from zarr or HDF5 storage alike."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from care_dataset.format.layout import (EMPTY_CHUNK, FORMAT_NAME, FORMAT_VERSION, case_path, content_checksum,
                                        read_json, shard_path)


class SplitSlices:
    """One numbering of the stored slices of a split's cases, in split order: what a reader of cases offers
    as a flat slice dataset (`CareDataset` and `care_dataset.format.published.PublishedDataset`).

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
            path = case_path(self.root, self.storage, case_id)
            if self.storage == "zarr":
                handle = (_open_zarr_slices(path / "image"), _open_zarr_slices(path / "label"))
            else:
                import h5py  # deferred: h5py takes 0.17 s to import; zarr storage never needs it

                f = h5py.File(path, "r")
                handle = (f["image"], f["label"])
            self._handles[case_id] = handle
        return handle

    def missing_cases(self, case_ids: list[str]) -> list[str]:
        """The cases among ``case_ids`` whose stored slices are absent (a cheap check of the files, not of
        their contents). zarr omits a shard whose every slice holds the fill value: a label never does (every
        stored slice holds a labelled class), an image may (all 0 HU, converted with ``require_air = false``);
        an image without its shard counts as present only when the case's checksum says it is all fill value."""
        def present(case_id: str) -> bool:
            path = case_path(self.root, self.storage, case_id)
            if self.storage == "zarr":
                if not (all((path / name / "zarr.json").is_file() for name in ("image", "label"))
                        and shard_path(path / "label").is_file()):
                    return False
                return shard_path(path / "image").is_file() or self._holds_checksum(case_id)
            return path.is_file()

        return [case_id for case_id in case_ids if not present(case_id)]

    def _holds_checksum(self, case_id: str) -> bool:
        """Whether the stored slices read back give the checksum cases.json records for the case."""
        return content_checksum(*self.read_case(case_id)) == self.cases[case_id].get("checksum")

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
    """Read one slice of a single-shard zarr array written by ``care_dataset.format.writer.write_case`` without
    zarr's call overhead.

    zarr's synchronous API costs about 1-2 ms per call (an event-loop round trip and a re-read of the shard
    index), which dominates random slice access in training. The layout written here is fixed (one shard,
    one (1, H, W) chunk per slice, bytes + Blosc inner codecs, index at the end with crc32c), so the shard
    index is read once and each slice is one ``pread`` and one Blosc decompression, following the zarr v3
    sharding specification. A whole-array read (``[...]`` or ``[:]``) is one read of the shard and one
    decompression per chunk into the result; any other key goes through zarr itself. Tests check both paths
    agree with zarr. A shard zarr left out (every slice the fill value) reads as the fill value.
    """

    def __init__(self, array_dir: Path, array: Any):
        import numcodecs.blosc  # deferred: numcodecs takes 0.28 s to import; HDF5 storage never needs it

        self._array = array
        self._decompress = numcodecs.blosc.decompress
        self.shape = tuple(array.shape)
        self.dtype = np.dtype(array.dtype.to_native_dtype() if hasattr(array.dtype, "to_native_dtype") else array.dtype)
        self._fill = np.asarray(array.fill_value, self.dtype)
        self._shard_path = shard_path(array_dir)
        n = self.shape[0]
        if self._shard_path.is_file():
            index_bytes = 16 * n + 4
            with open(self._shard_path, "rb") as f:
                f.seek(-index_bytes, os.SEEK_END)
                index = f.read(index_bytes)
            self._index = np.frombuffer(index[:-4], dtype="<u8").reshape(n, 2)
        else:
            self._index = np.full((n, 2), EMPTY_CHUNK, dtype="<u8")
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
        if offset == EMPTY_CHUNK:
            return np.full(self.shape[1:], self._fill, self.dtype)
        if self._fd is None:
            self._fd = os.open(self._shard_path, os.O_RDONLY)
        raw = self._decompress(os.pread(self._fd, nbytes, offset))
        return np.frombuffer(raw, dtype=self.dtype.newbyteorder("<")).reshape(self.shape[1:])

    def _read_all(self) -> np.ndarray:
        stored = np.full(self.shape, self._fill, self.dtype.newbyteorder("<"))
        if (self._index[:, 0] == EMPTY_CHUNK).all():
            return stored.astype(self.dtype, copy=False)
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
    """A :class:`ShardedSlices` when the array has the layout ``care_dataset.format.writer`` writes, else the
    zarr array."""
    import zarr  # deferred: zarr takes 0.34 s to import; HDF5 storage never needs it

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
