"""A ``torch.utils.data.Dataset`` of CARE slices over converted shards or a published Hugging Face dataset.

Both give the sample dict of ``CareDataset.sample``: image (H, W) int16 HU, label (H, W) uint8, case_id str,
slice_index int, spacing (x, y, z) mm; training code does not care which one it reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch.utils.data

from care_dataset.format.hf import SAMPLE_KEYS, table_row_to_sample
from care_dataset.format.published import CONVERTED, PUBLISHED, PublishedDataset, open_any, source_kind
from care_dataset.format.reader import CareDataset

__all__ = ["CONVERTED", "PUBLISHED", "CareSliceDataset", "source_kind"]


class CareSliceDataset(torch.utils.data.Dataset):
    """Slices of one split; ``source`` is a folder path (converted or published, opened with
    ``care_dataset.open_any``), a CareDataset, a PublishedDataset, or a loaded ``datasets.Dataset`` /
    ``DatasetDict`` of the ``slices`` configuration.

    ``transform`` (picklable, for spawn workers) is applied to the sample dict.
    """

    def __init__(self, source: Any, split: str = "train", transform: Callable[[dict], Any] | None = None):
        import datasets  # deferred: datasets takes 1 s to import; needed for a datasets.Dataset source only

        self.split = split
        self.transform = transform
        self._care: CareDataset | PublishedDataset | None = None
        self._hf: Any = None
        self._case_index: dict[str, list[int]] | None = None
        if isinstance(source, (str, Path)):
            source = open_any(source)
        if isinstance(source, (CareDataset, PublishedDataset)):
            self._care = source
            self.case_ids: list[str] = source.case_ids(split)
            table = source.slice_index(split)
            self._slice_case_ids = [self.case_ids[c] for c in table[:, 0]]
        elif isinstance(source, (datasets.DatasetDict, datasets.Dataset)):
            if isinstance(source, datasets.DatasetDict):
                if split not in source:
                    raise KeyError(f"no split {split!r}; this dataset has {sorted(source)}")
                source = source[split]
            self._hf = source.select_columns(list(SAMPLE_KEYS)).with_format("arrow")
            self._slice_case_ids = source.select_columns(["case_id"]).with_format("arrow")[:] \
                .column("case_id").to_pylist()
            self.case_ids = list(dict.fromkeys(self._slice_case_ids))
        else:
            raise TypeError(f"unsupported source {type(source).__name__}: expected a folder path, a CareDataset "
                            "or a datasets.Dataset")

    def __len__(self) -> int:
        return len(self._slice_case_ids)

    def __getitem__(self, i: int) -> Any:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"slice {i} out of range for {n} slices")
        i = int(i) % n
        sample = self._care.sample(self.split, i) if self._care is not None else self._hf_sample(i)
        return self.transform(sample) if self.transform is not None else sample

    def _hf_sample(self, i: int) -> dict:
        if getattr(self._hf, "_indices", None) is None:  # no select/shuffle mapping: slice the table directly
            return table_row_to_sample(self._hf.data.fast_slice(i, 1))
        return table_row_to_sample(self._hf[i])

    def case_slices(self, case_id: str) -> list[int]:
        """Dataset indices of one case's slices, in stored (inferior to superior) order."""
        if self._case_index is None:
            self._case_index = {}
            for i, c in enumerate(self._slice_case_ids):
                self._case_index.setdefault(c, []).append(i)
        indices = self._case_index.get(case_id)
        if indices is None:
            raise KeyError(f"unknown case {case_id!r} in split {self.split!r}")
        return list(indices)

    def __repr__(self) -> str:
        kind = {CareDataset: "shards", PublishedDataset: "published"}.get(type(self._care), "datasets")
        return f"CareSliceDataset({kind}, split={self.split!r}, {len(self.case_ids)} cases, {len(self)} slices)"
