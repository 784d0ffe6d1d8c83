"""One NIfTI image and label volume per case, on the case's canonical grid, from its stored slices.

A volume is the case's span (``care_dataset.format.span``): the canonical slices from the first kept slice to
the last, gaps between kept runs holding ``FILL_HU`` and label 0; each case's record counts them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from care_dataset.export.errors import ExportError
from care_dataset.format.layout import content_checksum, read_json, whole_scan
from care_dataset.format.reader import CareDataset, open_dataset
from care_dataset.format.span import FILL_HU, SpanGeometry, case_span, span_geometry

NIFTI_ENDING = ".nii.gz"
TRAIN_SPLIT = "train"
CHANNEL_SUFFIX = "_0000"  # nnU-Net's image file names: <case_id>_0000.nii.gz (channel 0, CT)


@dataclass(frozen=True)
class CaseVolume:
    image: sitk.Image
    label: sitk.Image
    first_slice: int  # canonical index of the volume's slice 0
    filled_slices: int  # slices of the span the conversion did not keep


def open_source(source: Path) -> CareDataset:
    """The converted folder at `source`; ExportError when it is missing, unreadable or lacks a case's slices."""
    if not source.is_dir():
        raise ExportError(f"converted folder {source} not found")
    try:
        dataset = open_dataset(source)
    except (FileNotFoundError, ValueError, KeyError) as err:
        raise ExportError(str(err)) from None
    listed = [c for s in dataset.splits for c in dataset.case_ids(s)]
    if not listed:
        raise ExportError(f"{source}: no case in any split")
    if unknown := [c for c in listed if c not in dataset.cases]:
        raise ExportError(f"case {unknown[0]}: listed in splits.json but missing from cases.json")
    if missing := dataset.missing_cases(listed):
        raise ExportError(f"{source}: the slices of {len(missing)} case(s) are missing, first {missing[0]}")
    return dataset


def split_seed(dataset: CareDataset) -> int:
    """The seed of the converted folder's patient split (0 when splits.json names none)."""
    return int(read_json(dataset.root / "splits.json").get("seed", 0))


def case_volume(dataset: CareDataset, case_id: str) -> CaseVolume:
    """The case's stored slices placed on its canonical grid, spanning its kept slices; its checksum checked."""
    geometry = dataset.cases[case_id]
    image, label = dataset.read_case(case_id)
    if content_checksum(image, label) != geometry.get("checksum"):
        raise ExportError(f"case {case_id}: stored slices do not match their checksum in cases.json")
    span = case_span(image, label, geometry["kept_slices"])
    grid = span_geometry(geometry["canonical"], span.first_slice)
    return CaseVolume(on_grid(span.image, grid), on_grid(span.label, grid), span.first_slice, span.filled_slices)


def on_grid(array: np.ndarray, grid: SpanGeometry) -> sitk.Image:
    """`array` (z, y, x) as an image on `grid`."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(grid.spacing)
    image.SetOrigin(grid.origin)
    image.SetDirection(grid.direction)
    return image


def folder_suffix(split: str) -> str:
    """nnU-Net's file layout, used by both exports: the train split in imagesTr/labelsTr, the others in *Ts."""
    return "Tr" if split == TRAIN_SPLIT else "Ts"


def image_path(root: Path, split: str, case_id: str) -> Path:
    return root / f"images{folder_suffix(split)}" / f"{case_id}{CHANNEL_SUFFIX}{NIFTI_ENDING}"


def label_path(root: Path, split: str, case_id: str) -> Path:
    return root / f"labels{folder_suffix(split)}" / f"{case_id}{NIFTI_ENDING}"


def write_cases(dataset: CareDataset, root: Path) -> dict[str, dict]:
    """Every case of every split as NIfTI under `root` (imagesTr/labelsTr for train, imagesTs/labelsTs for the
    other splits); returns each case's record: split, canonical slice span, filled slices, whole scan."""
    records = {}
    for split in dataset.splits:
        for case_id in dataset.case_ids(split):
            volume = case_volume(dataset, case_id)
            for path, image in ((image_path(root, split, case_id), volume.image),
                                (label_path(root, split, case_id), volume.label)):
                path.parent.mkdir(exist_ok=True)
                sitk.WriteImage(image, str(path), useCompression=True)
            depth = volume.image.GetSize()[2]
            geometry = dataset.cases[case_id]
            records[case_id] = {"split": split, "filled_slices": volume.filled_slices,
                                "canonical_slices": [volume.first_slice, volume.first_slice + depth - 1],
                                "whole_scan": whole_scan(geometry), "off_grid_slices": "slice_positions" in geometry}
    return records


def slices_statement(records: dict[str, dict]) -> str:
    """What the volumes hold, for the export's notes."""
    if all(r["whole_scan"] for r in records.values()):
        return "all: the conversion kept every slice, each volume is the whole canonical scan"
    return (f"kept: each volume spans the case's kept canonical slices (canonical_slices); slices inside the span "
            f"the conversion did not keep hold {FILL_HU} HU and label 0 (filled_slices)")
