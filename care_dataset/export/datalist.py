"""``care-export monai``: a MONAI (Medical Segmentation Decathlon style) datalist and its NIfTI volumes.

``<name>.json`` lists paths relative to its own folder, into ``<name>/`` beside it (nnU-Net's file layout:
imagesTr, labelsTr, imagesTs, labelsTs). The folder is written all or nothing, then the datalist."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from care_dataset.export.errors import ExportError
from care_dataset.export.folds import DEFAULT_FOLDS, fold_of
from care_dataset.export.staging import check_output
from care_dataset.export.volumes import (TRAIN_SPLIT, image_path, label_path, open_source, slices_statement,
                                         split_seed, write_cases)
from care_dataset.files import atomic_folder, write_json_atomic
from care_dataset.format.reader import CareDataset

TRAINING_KEY = "training"  # the datalist key of the train split; other splits keep their names


@dataclass(frozen=True)
class DatalistExport:
    datalist: Path
    folder: Path
    entries: dict[str, int]  # datalist key -> number of cases


def volumes_folder(datalist: Path) -> Path:
    return datalist.with_suffix("")


def export_datalist(source: Path, datalist: Path, overwrite: bool = False,
                    num_folds: int = DEFAULT_FOLDS) -> DatalistExport:
    """Write the datalist `datalist` and its volumes from the converted folder `source`."""
    source, datalist = Path(source), Path(datalist)
    if datalist.suffix != ".json":
        raise ExportError(f"{datalist}: the datalist must be a .json file")
    if num_folds < 2:
        raise ExportError(f"--folds must be at least 2, got {num_folds}")
    dataset = open_source(source)
    folder = volumes_folder(datalist)
    check_output(datalist, source, overwrite)
    check_output(folder, source, overwrite)
    with atomic_folder(folder, "export") as staging:
        records = write_cases(dataset, staging)
    content = datalist_content(dataset, folder.name, records, num_folds)
    write_json_atomic(datalist, content)
    entries = {key: len(content[key]) for key in datalist_keys(dataset)}
    return DatalistExport(datalist, folder, entries)


def datalist_keys(dataset: CareDataset) -> list[str]:
    return [TRAINING_KEY if split == TRAIN_SPLIT else split for split in dataset.splits]


def datalist_content(dataset: CareDataset, folder_name: str, records: dict[str, dict], num_folds: int) -> dict:
    """The datalist: per split the cases' image and label paths (relative), training cases with their fold."""
    training = dataset.case_ids(TRAIN_SPLIT) if TRAIN_SPLIT in dataset.splits else []
    folds = fold_of(training, num_folds, split_seed(dataset)) if training else {}
    content: dict = {"name": folder_name, "modality": {"0": "CT"},
                     "labels": {str(value): name for value, name in enumerate(dataset.class_names)},
                     "care_export": {"slices": slices_statement(records), "cases": records}}
    relative = Path(folder_name)
    for split, key in zip(dataset.splits, datalist_keys(dataset)):
        content[key] = [{"image": image_path(relative, split, c).as_posix(),
                         "label": label_path(relative, split, c).as_posix(), "case_id": c,
                         **({"fold": folds[c]} if c in folds else {})} for c in dataset.case_ids(split)]
    content["numTraining"] = len(training)
    return content
