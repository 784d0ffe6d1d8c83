"""The published folder's Hugging Face side: its features, folder detection, loading and Arrow rows -> arrays.

A published folder (written by ``care-publish``) holds two configurations:

    slices   one row per stored axial slice: image (H, W) int16 HU, label (H, W) uint8, case_id,
             slice_index, spacing, label_classes (class values present in the slice, names in the feature),
             preview (a small windowed PNG of the slice, for the Hub's dataset viewer)
    volumes  one row per case: image and label as NIfTI (``datasets.Nifti``: nibabel images on the case's
             canonical grid, spanning its kept slices), case_id, kept_slices, the canonical geometry, checksum

When every case has the same in-plane size the ``slices`` arrays are ``Array2D`` features with that fixed
shape; otherwise they are nested ``List`` features (same Parquet storage, same decoded arrays).
``care_dataset.format.published.PublishedDataset`` reads a published folder with the interface of ``CareDataset``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np

SLICES = "slices"
VOLUMES = "volumes"
CONFIGS = (SLICES, VOLUMES)
SAMPLE_KEYS = ("image", "label", "case_id", "slice_index", "spacing")


def _slice_feature(shape: tuple[int, int] | None, dtype: str) -> Any:
    """Array2D with fixed in-plane ``shape``, else a list of lists."""
    from datasets import Array2D, List, Value  # deferred: datasets takes 1 s to import

    return Array2D(shape=tuple(shape), dtype=dtype) if shape is not None else List(List(Value(dtype)))


def slice_features(class_names: list[str], shape: tuple[int, int] | None) -> Any:
    """Features of the ``slices`` configuration; ``shape`` (H, W) or None for varying in-plane sizes."""
    from datasets import ClassLabel, Features, Image, List, Value  # deferred: datasets takes 1 s to import

    return Features({
        "image": _slice_feature(shape, "int16"),
        "label": _slice_feature(shape, "uint8"),
        "case_id": Value("string"),
        "slice_index": Value("int32"),
        "spacing": List(Value("float64"), length=3),
        "label_classes": List(ClassLabel(names=list(class_names))),
        "preview": Image(),
    })


def volume_features(class_names: list[str]) -> Any:
    """Features of the ``volumes`` configuration (one row per case)."""
    from datasets import ClassLabel, Features, List, Nifti, Value  # deferred: datasets takes 1 s to import

    return Features({
        "image": Nifti(),
        "label": Nifti(),
        "case_id": Value("string"),
        "kept_slices": List(Value("int32")),
        "size": List(Value("int32"), length=3),
        "spacing": List(Value("float64"), length=3),
        "origin": List(Value("float64"), length=3),
        "direction": List(Value("float64"), length=9),
        "label_classes": List(ClassLabel(names=list(class_names))),
        "checksum": Value("string"),
    })


def is_published_folder(path: str | Path) -> bool:
    """True for a folder whose README.md declares dataset ``configs`` or that holds Parquet files."""
    path = Path(path)
    readme = path / "README.md"
    if readme.is_file():
        text = readme.read_text(encoding="utf-8", errors="replace")
        if text.startswith("---") and "\nconfigs:" in text.split("\n---", 2)[0]:
            return True
    return path.is_dir() and any(path.rglob("*.parquet"))


def load_published(path: str | Path, config: str = SLICES, split: str | None = None,
                   streaming: bool = False) -> Any:
    """``datasets.load_dataset`` on a published folder, formatted as numpy with the stored dtypes."""
    import datasets  # deferred: datasets takes 1 s to import

    dataset = datasets.load_dataset(str(path), config, split=split, streaming=streaming)
    return dataset.with_format("numpy", dtype=None) if not streaming else dataset


def split_order(names: list[str]) -> list[str]:
    """Splits in publishing order: train, validation, test, then any other name alphabetically."""
    known = [n for n in ("train", "validation", "test") if n in names]
    return known + sorted(n for n in names if n not in known)


def _nested_to_numpy(scalar: Any, dtype: type) -> np.ndarray:
    """An Arrow 2-D list scalar (Array2D storage or nested List) as a writable (H, W) array."""
    rows = scalar.value.values if hasattr(scalar, "value") else scalar.values  # ExtensionScalar -> storage
    flat = rows.flatten().to_numpy(zero_copy_only=False)
    return np.array(flat, dtype=dtype, copy=True).reshape(len(rows), -1)


def storage_column(column: Any) -> Any:
    """An Arrow column with ``datasets``' extension types (Array2D, Array3D) replaced by their list storage,
    without a copy; reading the storage skips the per-access re-creation of the extension type."""
    import pyarrow as pa  # deferred: pyarrow takes 0.17 s to import; converted folders never need it

    chunks = [c.storage if isinstance(c, pa.ExtensionArray) else c for c in column.chunks]
    return pa.chunked_array(chunks, type=chunks[0].type if chunks else None)


def column_to_arrays(column: Any, dtype: type) -> np.ndarray:
    """The 2-D arrays of an Arrow column (Array2D storage or nested List, chunked or not) as one writable
    (n, H, W) array, without the ``datasets`` formatters; every row must have the same shape."""
    import pyarrow as pa  # deferred: pyarrow takes 0.17 s to import; converted folders never need it

    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    parts, shape = [], None
    for chunk in chunks:
        if not len(chunk):
            continue
        storage = chunk.storage if isinstance(chunk, pa.ExtensionArray) else chunk
        rows = storage.flatten()  # one (W,) list per image row; honours the chunk's offset
        heights, widths = np.diff(storage.offsets.to_numpy()), np.diff(rows.offsets.to_numpy())
        if heights.min() != heights.max() or widths.min() != widths.max() or \
                (shape is not None and shape != (heights[0], widths[0])):
            raise ValueError("the arrays of these rows differ in shape")
        shape = (int(heights[0]), int(widths[0]))
        parts.append(rows.flatten().to_numpy(zero_copy_only=False).reshape(len(storage), *shape))
    if not parts:
        return np.zeros((0, 0, 0), dtype)
    if len(parts) == 1:
        return np.array(parts[0], dtype=dtype, copy=True)
    return np.concatenate(parts).astype(dtype, copy=False)


def table_row_to_sample(table: Any, i: int = 0) -> dict:
    """Row ``i`` of an Arrow table of the ``slices`` configuration as the common sample dict.

    Reading Arrow directly keeps int16/uint8 and is several times faster than the ``numpy`` formatter.
    """
    return {
        "image": _nested_to_numpy(table.column("image")[i], np.int16),
        "label": _nested_to_numpy(table.column("label")[i], np.uint8),
        "case_id": table.column("case_id")[i].as_py(),
        "slice_index": int(table.column("slice_index")[i].as_py()),
        "spacing": tuple(float(s) for s in table.column("spacing")[i].as_py()),
    }


def iter_samples(stream: Any, batch_size: int = 64) -> Iterator[dict]:
    """Sample dicts from a streamed ``slices`` split (``load_dataset(..., streaming=True)``) with exact dtypes.

    Streaming formatters have no ``dtype=None``; this reads Arrow batches so images stay int16.
    """
    for table in stream.with_format("arrow").iter(batch_size=batch_size):
        for i in range(table.num_rows):
            yield table_row_to_sample(table, i)
