"""Parquet shards of the published folder: rows of a converted folder's cases as Arrow tables, written with
fixed settings (same input -> same bytes).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from care_dataset.format.hf import SLICES
from care_dataset.format.layout import content_checksum
from care_dataset.format.reader import CareDataset
from care_dataset.format.span import case_span, span_geometry
from care_dataset.publish.errors import PublishError
from care_dataset.publish.nifti import nifti_cell
from care_dataset.publish.preview import preview_cell

ROW_GROUP_MAX_BYTES = 64 * 2**20
BYTE_STREAM_SPLIT_COLUMNS = ("image",)  # int16 HU: byte-stream split + zstd is ~25 % smaller than dictionary


@dataclass
class ShardFile:
    path: str  # relative to the published folder, POSIX separators
    num_bytes: int
    sha256: str


@dataclass
class SplitStats:
    num_examples: int = 0
    num_bytes: int = 0  # Arrow (in-memory) bytes, as dataset_info reports them
    files: list[ShardFile] = field(default_factory=list)


def nested_list_storage(arrays: list[np.ndarray]) -> Any:
    """Arrow list<...<list<values>>> storage of equal-ndim arrays (shapes may differ), as ``datasets`` stores
    Array2D/Array3D and nested List features."""
    ndim = arrays[0].ndim
    values: Any = pa.array(np.concatenate([np.ascontiguousarray(a).ravel() for a in arrays]))
    for level in reversed(range(ndim)):
        lengths = np.concatenate([np.full(int(np.prod(a.shape[:level])), a.shape[level], np.int64) for a in arrays])
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        if offsets[-1] > np.iinfo(np.int32).max:
            raise PublishError("a row group exceeds 2**31 values; lower --max-shard-mb")
        values = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), values)
    return values


def rows_to_table(rows: list[dict], schema: Any) -> Any:
    """One Arrow table from row dicts; array columns are built from numpy without Python lists."""
    columns = []
    for schema_field in schema:
        values = [row[schema_field.name] for row in rows]
        if isinstance(values[0], np.ndarray) and values[0].ndim >= 2:
            storage = nested_list_storage(values)
            if isinstance(schema_field.type, pa.ExtensionType):
                storage = pa.ExtensionArray.from_storage(schema_field.type, storage)
            columns.append(storage)
        else:
            columns.append(pa.array(values, type=schema_field.type))
    return pa.Table.from_arrays(columns, schema=schema)


def _leaves(name: str, pa_type: Any) -> list[tuple[str, Any]]:
    """(Parquet leaf column path, Arrow type) of one Arrow field: ``image.list.element.list.element`` for an
    Array2D, ``preview.bytes`` and ``preview.path`` for an encoded file (``Image``, ``Nifti``)."""
    if isinstance(pa_type, pa.ExtensionType):
        pa_type = pa_type.storage_type
    if pa.types.is_list(pa_type) or pa.types.is_large_list(pa_type) or pa.types.is_fixed_size_list(pa_type):
        return _leaves(f"{name}.list.element", pa_type.value_type)
    if pa.types.is_struct(pa_type):
        return [leaf for child in pa_type for leaf in _leaves(f"{name}.{child.name}", child.type)]
    return [(name, pa_type)]


def parquet_options(schema: Any) -> dict:
    """Fixed Parquet writer settings: zstd level 3, byte-stream split for int16 images, plain encoding for file
    bytes (PNG, NIfTI), dictionary for the rest."""
    dictionary, encoding = [], {}
    for schema_field in schema:
        for leaf, leaf_type in _leaves(schema_field.name, schema_field.type):
            if schema_field.name in BYTE_STREAM_SPLIT_COLUMNS and pa.types.is_integer(leaf_type):
                encoding[leaf] = "BYTE_STREAM_SPLIT"
            elif not pa.types.is_binary(leaf_type):
                dictionary.append(leaf)
    return dict(compression="zstd", compression_level=3, use_dictionary=dictionary, column_encoding=encoding,
                write_page_index=True, write_statistics=True)


class ShardWriter:
    """Parquet shards of one split: a new file starts before a row group would push it past ``max_bytes``."""

    def __init__(self, folder: Path, split: str, schema: Any, max_bytes: int):
        self.folder, self.split, self.schema, self.max_bytes = folder, split, schema, max_bytes
        self.paths: list[Path] = []
        self._writer: Any = None
        self._sink: Any = None
        self._last_group_bytes = 0

    def _open(self) -> None:
        path = self.folder / f"{self.split}-{len(self.paths):05d}.parquet.part"
        self.paths.append(path)
        self._sink = pa.OSFile(str(path), "wb")
        self._writer = pq.ParquetWriter(self._sink, self.schema, **parquet_options(self.schema))

    def write(self, table: Any) -> None:
        if self._writer is not None and self._sink.tell() + self._last_group_bytes > self.max_bytes:
            self.close()
        if self._writer is None:
            self._open()
        before = self._sink.tell()
        self._writer.write_table(table, row_group_size=table.num_rows)
        self._last_group_bytes = self._sink.tell() - before

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._sink.close()
            self._writer = self._sink = None


def _case_arrays(dataset: CareDataset, case_id: str) -> tuple[np.ndarray, np.ndarray, dict]:
    image, label = dataset.read_case(case_id)
    geometry = dataset.cases[case_id]
    if image.dtype != np.int16 or label.dtype != np.uint8:
        raise PublishError(f"case {case_id}: stored dtypes {image.dtype}/{label.dtype}, expected int16/uint8")
    if image.shape != label.shape or image.shape[0] != len(geometry["kept_slices"]):
        raise PublishError(f"case {case_id}: image {image.shape}, label {label.shape} and "
                           f"{len(geometry['kept_slices'])} kept slices in cases.json disagree")
    expected = geometry.get("checksum")
    if expected is not None and content_checksum(image, label) != expected:
        raise PublishError(f"case {case_id}: stored arrays do not match the checksum in cases.json")
    return image, label, geometry


def slice_rows(dataset: CareDataset, case_id: str) -> Iterator[dict]:
    """Rows of the ``slices`` configuration for one case, in stored order."""
    image, label, geometry = _case_arrays(dataset, case_id)
    spacing = [float(s) for s in geometry["spacing"]]
    for position, index in enumerate(geometry["kept_slices"]):
        yield {"image": image[position], "label": label[position], "case_id": case_id,
               "slice_index": int(index), "spacing": spacing,
               "label_classes": [int(v) for v in np.unique(label[position])],
               "preview": preview_cell(image[position], label[position])}


def volume_rows(dataset: CareDataset, case_id: str) -> Iterator[dict]:
    """The single ``volumes`` row of one case: its span as NIfTI image and label, its canonical geometry."""
    image, label, geometry = _case_arrays(dataset, case_id)
    canonical = geometry["canonical"]
    span = case_span(image, label, geometry["kept_slices"])
    grid = span_geometry(canonical, span.first_slice)
    yield {"image": nifti_cell(span.image, grid), "label": nifti_cell(span.label, grid), "case_id": case_id,
           "kept_slices": [int(k) for k in geometry["kept_slices"]],
           "size": [int(s) for s in canonical["size"]],
           "spacing": [float(s) for s in canonical["spacing"]],
           "origin": [float(s) for s in canonical["origin"]],
           "direction": [float(s) for s in canonical["direction"]],
           "label_classes": [int(v) for v in np.unique(label)],
           "checksum": content_checksum(image, label)}


def _row_bytes(row: dict) -> int:
    """The bytes of a row's arrays and encoded files (what decides its row group)."""
    arrays = sum(v.nbytes for v in row.values() if isinstance(v, np.ndarray))
    return int(arrays + sum(len(v["bytes"]) for v in row.values() if isinstance(v, dict)))


def write_split(dataset: CareDataset, config: str, split: str, folder: Path, schema: Any,
                max_bytes: int, progress: Any = None) -> SplitStats:
    """Write one split of one configuration as Parquet shards; returns its counts (files not yet renamed)."""
    make_rows = slice_rows if config == SLICES else volume_rows
    group_limit = max(1, min(ROW_GROUP_MAX_BYTES, max_bytes))
    stats = SplitStats()
    writer = ShardWriter(folder, split, schema, max_bytes)
    pending: list[dict] = []
    pending_bytes = 0

    def flush() -> None:
        nonlocal pending, pending_bytes
        table = rows_to_table(pending, schema)
        stats.num_examples += table.num_rows
        stats.num_bytes += table.nbytes
        writer.write(table)
        pending, pending_bytes = [], 0

    try:
        for case_id in dataset.case_ids(split):
            for row in make_rows(dataset, case_id):
                if pending and pending_bytes + _row_bytes(row) > group_limit:
                    flush()
                pending.append(row)
                pending_bytes += _row_bytes(row)
            if progress is not None:
                progress()
        if pending:
            flush()
    finally:
        writer.close()
    total = len(writer.paths)
    for number, part in enumerate(writer.paths):
        final = part.with_name(f"{split}-{number:05d}-of-{total:05d}.parquet")
        os.replace(part, final)
        stats.files.append(ShardFile(f"{config}/{final.name}", final.stat().st_size, _sha256(final)))
    return stats


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
