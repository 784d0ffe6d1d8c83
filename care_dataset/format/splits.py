"""Dataset splits: patient-level, deterministic from a seed, or given by the source (``given_splits``).

Case IDs have the form ``<patient>-<suffix>`` (``care_dataset.deid.pseudonyms.case_id_for``): every case of one
patient shares the prefix, so the seeded split puts all of them in the same split.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from care_dataset.deid.pseudonyms import patient_of


def scaled_split_counts(num_patients: int, split_sizes: dict[str, int]) -> dict[str, int]:
    """Patients per split: ``split_sizes`` scaled to ``num_patients`` by largest remainder.

    Every split with a positive size gets at least one patient when there are at least as many patients as
    such splits (taken from the split holding the most). Ties break by the splits' order in ``split_sizes``.
    """
    names = list(split_sizes)
    total = sum(split_sizes.values())
    if total <= 0:
        raise ValueError("split sizes must not all be zero")
    exact = [num_patients * split_sizes[n] / total for n in names]
    counts = [int(np.floor(e)) for e in exact]
    by_remainder = sorted(range(len(names)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: num_patients - sum(counts)]:
        counts[i] += 1
    wanted = [i for i, n in enumerate(names) if split_sizes[n] > 0]
    if num_patients >= len(wanted):
        for i in wanted:
            if counts[i] == 0:
                donor = max(range(len(names)), key=lambda j: (counts[j], -j))
                counts[donor] -= 1
                counts[i] += 1
    return dict(zip(names, counts))


def split_patients(patient_ids: list[str], split_sizes: dict[str, int], seed: int) -> dict[str, list[str]]:
    """Assign each patient to one split: sorted IDs, one seeded permutation, consecutive blocks per split."""
    patients = sorted(set(patient_ids))
    counts = scaled_split_counts(len(patients), split_sizes)
    order = np.random.default_rng(seed).permutation(len(patients))
    assignment: dict[str, list[str]] = {}
    start = 0
    for name, count in counts.items():
        assignment[name] = sorted(patients[i] for i in order[start:start + count])
        start += count
    return assignment


def make_splits(case_ids: list[str], split_sizes: dict[str, int], seed: int) -> dict:
    """The ``splits.json`` object: ``{"seed", "strategy": "patient", <split>: [case_id, ...]}``."""
    by_patient = split_patients([patient_of(c) for c in case_ids], split_sizes, seed)
    split_of_patient = {p: name for name, patients in by_patient.items() for p in patients}
    splits: dict = {"seed": int(seed), "strategy": "patient"}
    for name in split_sizes:
        splits[name] = sorted(c for c in case_ids if split_of_patient[patient_of(c)] == name)
    return splits


def given_splits(split_of_case: dict[str, str], names: Sequence[str], strategy: str, seed: int) -> dict:
    """The ``splits.json`` object for splits the source gave (``strategy`` "folders" or "file"): ``{"seed",
    "strategy", <split>: [case_id, ...]}``, every split in ``names`` (in that order) even when empty. The seed is
    kept for what derives from it later (the exports' folds); it decided no membership."""
    splits: dict = {"seed": int(seed), "strategy": strategy}
    for name in names:
        splits[name] = sorted(c for c, s in split_of_case.items() if s == name)
    return splits


def split_names(splits: dict) -> list[str]:
    """The split names of a ``splits.json`` object, in its order."""
    return [name for name, cases in splits.items() if isinstance(cases, list)]


def patients_in_several_splits(splits: dict) -> dict[str, list[str]]:
    """Patient prefix -> the splits holding its cases, for patients whose cases lie in more than one."""
    found: dict[str, list[str]] = {}
    for name in split_names(splits):
        for case_id in splits[name]:
            held = found.setdefault(patient_of(case_id), [])
            if name not in held:
                held.append(name)
    return {patient: held for patient, held in sorted(found.items()) if len(held) > 1}


def carve_validation(case_ids: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Split training case IDs into (train, validation) by patient; about ``fraction`` of the patients validate.

    At least one validation patient when ``fraction > 0`` and there are two or more patients, and never all:
    a single patient always trains.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    patients = sorted({patient_of(c) for c in case_ids})
    num_val = int(round(fraction * len(patients)))
    if fraction > 0:
        num_val = max(num_val, 1)
    num_val = min(num_val, len(patients) - 1) if patients else 0
    order = np.random.default_rng(seed).permutation(len(patients))
    val_patients = {patients[i] for i in order[:num_val]}
    train = sorted(c for c in case_ids if patient_of(c) not in val_patients)
    val = sorted(c for c in case_ids if patient_of(c) in val_patients)
    return train, val
