"""Cross-validation folds of the training cases that keep every scan of a patient in one fold."""

from __future__ import annotations

import numpy as np

from care_dataset.deid.pseudonyms import patient_of
from care_dataset.export.errors import ExportError

DEFAULT_FOLDS = 5


def validation_folds(case_ids: list[str], num_folds: int, seed: int) -> list[list[str]]:
    """The validation cases of each fold: patients shuffled with `seed`, each put whole into the fold holding the
    fewest cases so far. At most one fold per patient; ExportError for fewer than two patients."""
    cases_of: dict[str, list[str]] = {}
    for case_id in sorted(case_ids):
        cases_of.setdefault(patient_of(case_id), []).append(case_id)
    if len(cases_of) < 2:
        raise ExportError(f"cross-validation folds need at least 2 training patients, the train split has "
                          f"{len(cases_of)}")
    patients = sorted(cases_of)
    np.random.default_rng(seed).shuffle(patients)
    folds: list[list[str]] = [[] for _ in range(min(num_folds, len(patients)))]
    for patient in patients:
        min(folds, key=len).extend(cases_of[patient])
    return [sorted(fold) for fold in folds]


def train_val_folds(case_ids: list[str], num_folds: int, seed: int) -> list[dict[str, list[str]]]:
    """nnU-Net's splits_final.json: per fold {"train": [...], "val": [...]}."""
    return [{"train": sorted(set(case_ids) - set(val)), "val": val}
            for val in validation_folds(case_ids, num_folds, seed)]


def fold_of(case_ids: list[str], num_folds: int, seed: int) -> dict[str, int]:
    """Each training case's validation fold (the same folds as `train_val_folds`)."""
    return {case_id: k for k, val in enumerate(validation_folds(case_ids, num_folds, seed)) for case_id in val}
