"""Read a published Hugging Face folder (``care-publish``) through the interface of ``CareDataset``.

Only the ``slices`` configuration is read: its rows are ordered by split, case (as in splits.json) and stored
position, so one case is a contiguous run of rows and holds the stored slices of its ``volumes`` row. A slice
is one Arrow row and a whole case one contiguous Arrow slice of the memory-mapped table, both converted
without the ``datasets`` formatters. Per-case metadata comes from ``metadata/cases.json`` (a byte copy of
the converted folder's), checked against the rows; without it, from the Parquet columns.

``open_any(path)`` opens either kind of folder: a :class:`~care_dataset.format.reader.CareDataset` or a
:class:`PublishedDataset`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from care_dataset.error_text import error_line
from care_dataset.format.hf import (SLICES, VOLUMES, column_to_arrays, is_published_folder, load_published,
                                    storage_column)
from care_dataset.format.reader import CareDataset, SplitSlices, open_dataset

CONVERTED = "converted"
PUBLISHED = "published"
METADATA_DIR = "metadata"
MANIFEST_FILES = {CONVERTED: "dataset.json", PUBLISHED: f"{METADATA_DIR}/dataset.json"}


def source_kind(path: str | Path) -> str:
    """``"converted"`` for a folder with dataset.json, ``"published"`` for a Hugging Face dataset folder."""
    path = Path(path)
    if (path / "dataset.json").is_file():
        return CONVERTED
    if is_published_folder(path):
        return PUBLISHED
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: {'not a folder' if path.exists() else 'no such folder'}")
    raise FileNotFoundError(f"{path}: neither a converted CARE folder (dataset.json) nor a published "
                            "Hugging Face dataset folder (README.md with configs, or Parquet files)")


def manifest_path(path: str | Path) -> Path:
    """The dataset.json of a converted folder, or its copy under metadata/ in a published one."""
    return Path(path) / MANIFEST_FILES[source_kind(path)]


def open_any(path: str | Path) -> CareDataset | PublishedDataset:
    """A converted folder as a CareDataset, a published folder as a PublishedDataset (same reading interface)."""
    return open_dataset(path) if source_kind(path) == CONVERTED else PublishedDataset(path)


def check_parquet_footers(root: Path) -> None:
    """Read the footer of every Parquet file under ``root``: a truncated or foreign file fails here, naming it."""
    import pyarrow.parquet as pq  # deferred: pyarrow takes 0.17 s to import; converted folders never need it

    for file in sorted(root.rglob("*.parquet")):
        try:
            pq.read_metadata(file)
        except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
            raise ValueError(f"{file.relative_to(root).as_posix()}: not a readable Parquet file "
                             f"({error_line(error)})") from None


def _case_runs(table: Any) -> list[tuple[str, int, int]]:
    """(case ID, first row, row after the last) of each run of rows of one case in a ``slices`` table."""
    case_of_row = table.column("case_id").to_pylist()
    starts = [i for i in range(len(case_of_row)) if i == 0 or case_of_row[i] != case_of_row[i - 1]]
    return [(case_of_row[start], start, stop) for start, stop in zip(starts, starts[1:] + [len(case_of_row)])]


class PublishedDataset(SplitSlices):
    """A published folder read like a converted one: class_names, num_classes, splits, cases, case_ids,
    missing_cases, read_case, read_labels, read_slice, slice_index, num_slices and sample.

    Arrays are image (n, H, W) / (H, W) int16 HU and label uint8, writable copies. The memory-mapped Arrow
    tables pickle by file path, so an instance can be handed to DataLoader workers (fork or spawn).
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not is_published_folder(self.root):
            raise FileNotFoundError(f"{self.root.name or self.root}: not a published Hugging Face dataset folder")
        check_parquet_footers(self.root)
        from datasets.exceptions import DatasetsError  # deferred: datasets takes 1 s to import

        try:
            slices = load_published(self.root, SLICES)
        except DatasetsError as error:
            reason = error_line(error)
            if error.__cause__ is not None:  # the Parquet reader's reason
                reason += f" ({error_line(error.__cause__)})"
            raise ValueError(f"{SLICES} configuration: {reason}") from None
        if not len(slices):
            raise ValueError(f"{SLICES} configuration: no split")
        self.class_names: list[str] = list(next(iter(slices.values())).features["label_classes"].feature.names)
        self._tables = {split: dataset.data for split, dataset in slices.items()}  # datasets.table.Table
        # case_id -> (split, first row, number of rows); stored order per split
        self._rows: dict[str, tuple[str, int, int]] = {}
        stored: dict[str, list[str]] = {}
        slice_indices: dict[str, list[int]] = {}
        spacings: dict[str, list[float]] = {}
        for split, table in self._tables.items():
            stored[split] = []
            index_of_row = table.column("slice_index").to_numpy() if table.num_rows else None
            for case_id, start, stop in _case_runs(table):
                if case_id in self._rows:
                    raise ValueError(f"case {case_id}: its slices are not one contiguous run of rows of "
                                     f"the {SLICES} configuration")
                self._rows[case_id] = (split, start, stop - start)
                stored[split].append(case_id)
                slice_indices[case_id] = [int(k) for k in index_of_row[start:stop]]
                spacings[case_id] = [float(s) for s in table.column("spacing")[start].as_py()]
        metadata = self.root / METADATA_DIR
        if (metadata / "cases.json").is_file():
            self.manifest: dict = json.loads((metadata / "dataset.json").read_text())
            self.cases: dict[str, dict] = json.loads((metadata / "cases.json").read_text())
            self.splits: dict[str, list[str]] = {k: v for k, v in json.loads((metadata / "splits.json").read_text())
                                                 .items() if isinstance(v, list)}
            self._check_metadata(stored, slice_indices, spacings)
        else:
            self.manifest = {"classes": list(self.class_names)}
            self.splits = stored
            self.cases = {case_id: {"split": split, "num_slices": len(slice_indices[case_id]),
                                    "kept_slices": slice_indices[case_id], "spacing": spacings[case_id]}
                          for split, ids in stored.items() for case_id in ids}
            self._add_volume_geometry()
        self._all_ids = sorted(self.cases)
        self._index_cache: dict[str, np.ndarray] = {}
        self._columns: dict[tuple[str, str], Any] = {}  # (split, name) -> column as list storage, per process

    def __getstate__(self) -> dict:
        # the datasets tables pickle by file path; the storage views would pickle their bytes
        state = self.__dict__.copy()
        state["_columns"] = {}
        return state

    def _check_metadata(self, stored: dict[str, list[str]], slice_indices: dict[str, list[int]],
                        spacings: dict[str, list[float]]) -> None:
        """metadata/*.json must describe the rows: same classes, splits, case order, kept slices, spacing."""
        if list(self.manifest.get("classes", [])) != self.class_names:
            raise ValueError(f"{METADATA_DIR}/dataset.json classes {self.manifest.get('classes')} differ from the "
                             f"{SLICES} configuration's {self.class_names}")
        for split in set(self.splits) | set(stored):
            if self.splits.get(split, []) != stored.get(split, []):
                raise ValueError(f"split {split!r}: {METADATA_DIR}/splits.json lists {len(self.splits.get(split, []))}"
                                 f" cases, the {SLICES} configuration holds {len(stored.get(split, []))} (or in "
                                 "another order)")
        for case_id, kept in slice_indices.items():
            geometry = self.cases.get(case_id)
            if geometry is None:
                raise ValueError(f"case {case_id}: in the {SLICES} configuration but not in {METADATA_DIR}/cases.json")
            if geometry.get("kept_slices") != kept or [float(s) for s in geometry.get("spacing", [])] \
                    != spacings[case_id]:
                raise ValueError(f"case {case_id}: kept slices or spacing in {METADATA_DIR}/cases.json differ from "
                                 f"the {SLICES} configuration")

    def _add_volume_geometry(self) -> None:
        """Without metadata/, the canonical geometry and checksum of each case from the ``volumes`` Parquet
        columns (the arrays are not read)."""
        import pyarrow.parquet as pq  # deferred: pyarrow takes 0.17 s to import; converted folders never need it

        columns = ["case_id", "size", "spacing", "origin", "direction", "checksum"]
        for file in sorted((self.root / VOLUMES).glob("*.parquet")):
            for row in pq.read_table(file, columns=columns).to_pylist():
                geometry = self.cases.get(row["case_id"])
                if geometry is not None:
                    geometry["canonical"] = {key: row[key] for key in ("size", "spacing", "origin", "direction")}
                    geometry["checksum"] = row["checksum"]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _ordered_ids(self, split: str | None) -> list[str]:
        if split is None:
            return self._all_ids
        if split not in self.splits:
            raise KeyError(f"no split {split!r}; this dataset has {sorted(self.splits)}")
        return self.splits[split]

    def missing_cases(self, case_ids: list[str]) -> list[str]:
        """The cases among ``case_ids`` that have no rows in the ``slices`` configuration."""
        return [case_id for case_id in case_ids if case_id not in self._rows]

    def _read(self, case_id: str, name: str, dtype: type, position: int | None = None) -> np.ndarray:
        """Column ``name`` of a whole case (n, H, W), or of one stored position (1, H, W)."""
        location = self._rows.get(case_id)
        if location is None:
            raise KeyError(f"unknown case {case_id!r}")
        split, start, count = location
        if position is not None:
            if not -count <= position < count:
                raise IndexError(f"slice {position} out of range for {count} slices")
            start, count = start + position % count, 1
        column = self._columns.get((split, name))
        if column is None:
            column = self._columns[(split, name)] = storage_column(self._tables[split].column(name))
        return column_to_arrays(column.slice(start, count), dtype)

    def read_case(self, case_id: str) -> tuple[np.ndarray, np.ndarray]:
        """Whole case: image (n, H, W) int16, label (n, H, W) uint8."""
        return self._read(case_id, "image", np.int16), self._read(case_id, "label", np.uint8)

    def read_labels(self, case_id: str) -> np.ndarray:
        """Every stored label slice of a case, without reading the images: (n, H, W) uint8."""
        return self._read(case_id, "label", np.uint8)

    def read_slice(self, case_id: str, position: int) -> tuple[np.ndarray, np.ndarray]:
        """One stored slice (position in 0..n-1): image (H, W) int16, label (H, W) uint8."""
        position = int(position)
        return self._read(case_id, "image", np.int16, position)[0], self._read(case_id, "label", np.uint8, position)[0]

    def __repr__(self) -> str:
        splits = ", ".join(f"{k}: {len(v)} cases" for k, v in self.splits.items())
        return f"PublishedDataset({str(self.root)!r}, {splits})"
