"""Patient-level splits: proportions, determinism, patients never split across sets."""

from __future__ import annotations

import pytest

from care_dataset.deid.pseudonyms import patient_of
from care_dataset.format.splits import carve_validation, make_splits, scaled_split_counts, split_patients

CARE_SIZES = {"train": 318, "test": 81}


def _case_ids(num_patients: int, cases_per_patient=lambda i: 1 + (i % 3 == 0)) -> list[str]:
    return [f"care_{i:012x}-{j:06x}" for i in range(num_patients) for j in range(cases_per_patient(i))]


def test_patient_of_strips_only_the_case_suffix():
    assert patient_of("care_1a2b3c4d5e6f-9f0e12") == "care_1a2b3c4d5e6f"
    assert patient_of("my-site_1a2b-9f0e12") == "my-site_1a2b"
    assert patient_of("care_nosuffix") == "care_nosuffix"


def test_care_sizes_scale_to_the_published_ratio():
    assert scaled_split_counts(399, CARE_SIZES) == {"train": 318, "test": 81}
    for n in (2, 5, 10, 37, 100, 1000):
        counts = scaled_split_counts(n, CARE_SIZES)
        assert sum(counts.values()) == n
        assert abs(counts["train"] - n * 318 / 399) < 1.0
        assert counts["test"] >= 1


def test_every_split_non_empty_when_enough_patients():
    sizes = {"train": 100, "val": 1, "test": 1}
    assert all(v >= 1 for v in scaled_split_counts(3, sizes).values())
    assert sum(scaled_split_counts(2, sizes).values()) == 2
    assert scaled_split_counts(1, CARE_SIZES) == {"train": 1, "test": 0}
    assert scaled_split_counts(0, CARE_SIZES) == {"train": 0, "test": 0}
    assert scaled_split_counts(4, {"train": 3, "unused": 0, "test": 1})["unused"] == 0


def test_split_is_deterministic_and_depends_on_seed():
    patients = [f"p{i:03d}" for i in range(50)]
    a = split_patients(patients, CARE_SIZES, seed=7)
    b = split_patients(list(reversed(patients)), CARE_SIZES, seed=7)
    assert a == b
    c = split_patients(patients, CARE_SIZES, seed=8)
    assert a != c
    assert sorted(a["train"] + a["test"]) == patients
    assert not set(a["train"]) & set(a["test"])


def test_make_splits_keeps_a_patients_cases_together():
    case_ids = _case_ids(30)
    splits = make_splits(case_ids, CARE_SIZES, seed=3)
    assert splits["seed"] == 3 and splits["strategy"] == "patient"
    assert sorted(splits["train"] + splits["test"]) == sorted(case_ids)
    train_patients = {patient_of(c) for c in splits["train"]}
    test_patients = {patient_of(c) for c in splits["test"]}
    assert not train_patients & test_patients
    assert len(train_patients) == scaled_split_counts(30, CARE_SIZES)["train"]
    assert splits["train"] == sorted(splits["train"])


def test_carve_validation_by_patient():
    case_ids = _case_ids(20)
    train, val = carve_validation(case_ids, 0.2, seed=1)
    assert sorted(train + val) == sorted(case_ids)
    assert not {patient_of(c) for c in train} & {patient_of(c) for c in val}
    assert len({patient_of(c) for c in val}) == 4
    assert carve_validation(case_ids, 0.2, seed=1) == (train, val)
    assert carve_validation(case_ids, 0.2, seed=2) != (train, val)
    assert carve_validation(case_ids[:3], 0.01, seed=0)[1]  # two patients: at least one validates
    assert carve_validation(case_ids, 0.0, seed=0) == (sorted(case_ids), [])
    with pytest.raises(ValueError):
        carve_validation(case_ids, 1.0, seed=0)


@pytest.mark.parametrize("num_patients, fraction, num_val", [
    (1, 0.01, 0), (1, 0.5, 0), (1, 0.99, 0),  # one patient: it trains, nothing validates
    (2, 0.01, 1), (2, 0.5, 1), (2, 0.99, 1),
    (3, 0.01, 1), (3, 0.99, 2),
])
def test_carve_validation_never_takes_every_patient(num_patients, fraction, num_val):
    case_ids = _case_ids(num_patients, cases_per_patient=lambda i: 2)
    train, val = carve_validation(case_ids, fraction, seed=0)
    assert sorted(train + val) == sorted(case_ids)
    train_patients, val_patients = {patient_of(c) for c in train}, {patient_of(c) for c in val}
    assert train_patients and not train_patients & val_patients
    assert len(val_patients) == num_val


def test_carve_validation_of_no_cases_is_empty():
    assert carve_validation([], 0.5, seed=0) == ([], [])
