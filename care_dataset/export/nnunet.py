"""``care-export nnunet``: nnU-Net v2 raw data (DatasetNNN_NAME) with patient-grouped folds."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from care_dataset.export.errors import ExportError
from care_dataset.export.folds import DEFAULT_FOLDS, train_val_folds
from care_dataset.export.staging import check_output
from care_dataset.export.volumes import (NIFTI_ENDING, TRAIN_SPLIT, open_source, slices_statement, split_seed,
                                         write_cases)
from care_dataset.files import atomic_folder, write_json_atomic
from care_dataset.format.reader import CareDataset
from care_dataset.version import __version__

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
SPLITS_FILE = "splits_final.json"


@dataclass(frozen=True)
class NnunetExport:
    folder: Path
    num_training: int
    num_test: int
    num_folds: int


def option_problem(dataset_id: int, name: str, num_folds: int) -> str | None:
    """Why these options cannot name an nnU-Net dataset, or None."""
    if not 1 <= dataset_id <= 999:
        return f"--dataset-id must be 1 to 999 (nnU-Net's three digits), got {dataset_id}"
    if not NAME_PATTERN.fullmatch(name):
        return f"--name must be letters, digits, '_' or '-' (starting with a letter or digit), got {name!r}"
    if num_folds < 2:
        return f"--folds must be at least 2, got {num_folds}"
    return None


def dataset_folder(raw_root: Path, dataset_id: int, name: str) -> Path:
    return raw_root / f"Dataset{dataset_id:03d}_{name}"


def check_dataset_id(raw_root: Path, dataset_id: int, name: str) -> None:
    """ExportError when `raw_root` holds a dataset of another name with `dataset_id` (nnU-Net refuses two)."""
    own = dataset_folder(raw_root, dataset_id, name)
    others = sorted(p.name for p in raw_root.glob(f"Dataset{dataset_id:03d}_*") if p.is_dir() and p != own)
    if others:
        raise ExportError(f"{raw_root} already holds {others[0]} with dataset ID {dataset_id}; choose another "
                          f"--dataset-id")


def export_nnunet(source: Path, raw_root: Path, dataset_id: int, name: str = "CARE", overwrite: bool = False,
                  num_folds: int = DEFAULT_FOLDS) -> NnunetExport:
    """Write `raw_root`/DatasetNNN_NAME from the converted folder `source`, all or nothing."""
    if problem := option_problem(dataset_id, name, num_folds):
        raise ExportError(problem)
    source, raw_root = Path(source), Path(raw_root)
    dataset = open_source(source)
    folder = dataset_folder(raw_root, dataset_id, name)
    check_output(folder, source, overwrite)
    check_dataset_id(raw_root, dataset_id, name)
    training = dataset.case_ids(TRAIN_SPLIT) if TRAIN_SPLIT in dataset.splits else []
    folds = train_val_folds(training, num_folds, split_seed(dataset))
    with atomic_folder(folder, "export") as staging:
        records = write_cases(dataset, staging)
        write_json_atomic(staging / "dataset.json", dataset_json(dataset, folder.name, records))
        write_json_atomic(staging / SPLITS_FILE, folds)
    return NnunetExport(folder, len(training), len(records) - len(training), len(folds))


def dataset_json(dataset: CareDataset, folder_name: str, records: dict[str, dict]) -> dict:
    """nnU-Net's dataset.json, plus ``care_export``: what the volumes hold and each case's split and span."""
    return {
        "name": folder_name,
        "description": f"CARE converted folder exported by care-export (care-usam {__version__})",
        "channel_names": {"0": "CT"},
        "labels": {name: value for value, name in enumerate(dataset.class_names)},
        "numTraining": sum(r["split"] == TRAIN_SPLIT for r in records.values()),
        "file_ending": NIFTI_ENDING,
        "care_export": {"slices": slices_statement(records), "splits_file": SPLITS_FILE,
                        "source_checksum": dataset.manifest.get("checksums", {}).get("all"), "cases": records},
    }
