"""Our DICOM reading agrees with dcm2niix, the field's reference converter: same HU voxels, same physical grid
after both are put in the canonical orientation (dcm2niix flips rows into NIfTI's convention, we do not)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from care_dataset.synth import raw_export as synth
from care_dataset.convert.case import load_case
from care_dataset.raw.discover import discover_cases
from care_dataset.raw.image import to_canonical
from care_dataset.raw.profiles import load_profile, parse_profile

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
# the wheel installs its binary beside the interpreter, which need not be on PATH (make test runs .venv/bin/python)
_BESIDE_PYTHON = Path(sys.executable).with_name("dcm2niix")
DCM2NIIX = str(_BESIDE_PYTHON) if _BESIDE_PYTHON.is_file() else shutil.which("dcm2niix")
pytestmark = pytest.mark.skipif(DCM2NIIX is None, reason="dcm2niix is not installed (pip install dcm2niix)")


def dcm2niix_volume(dicom_dir: Path, out_dir: Path) -> sitk.Image:
    out_dir.mkdir(parents=True)
    subprocess.run([DCM2NIIX, "-z", "n", "-b", "n", "-f", "%s", "-o", str(out_dir), str(dicom_dir)],
                   check=True, capture_output=True)
    volumes = sorted(out_dir.glob("*.nii"), key=lambda p: p.stat().st_size)
    return sitk.ReadImage(str(volumes[-1]))  # the largest series: the CT, not a localizer


def assert_same_volume(ours: sitk.Image, reference: sitk.Image) -> None:
    reference = to_canonical(reference)
    assert ours.GetSize() == reference.GetSize()
    np.testing.assert_allclose(ours.GetSpacing(), reference.GetSpacing(), rtol=1e-4)
    np.testing.assert_allclose(ours.GetOrigin(), reference.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(ours.GetDirection(), reference.GetDirection(), atol=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(ours).astype(np.float64),
                                  np.round(sitk.GetArrayFromImage(reference).astype(np.float64)))


def test_real_ct_series_matches_dcm2niix(tmp_path):
    source = SHARED / "dcmqi_ct3slice"
    if not source.is_dir():
        pytest.skip(f"real test data not found at {source}")
    case = tmp_path / "raw" / "case"
    shutil.copytree(source / "ct-3slice", case / "dicom")
    shutil.copy(source / "liver_spine_seg.nrrd", case / "liver_spine_seg.nrrd")
    profile = parse_profile({"classes": {"names": ["background", "liver", "spine"]},
                             "labels": {"values": {"0": 0, "1": 1, "2": 2}}})
    loaded = load_case(discover_cases(tmp_path / "raw", profile)[0], profile)
    assert_same_volume(loaded.image, dcm2niix_volume(case / "dicom", tmp_path / "nii"))


def test_synthetic_series_match_dcm2niix(tmp_path):
    raw = tmp_path / "raw"
    synth.write_raw_dataset(raw, cases=2, seed=5, size=64, slices=12, messy=False)
    profile = load_profile("care")
    for n, raw_case in enumerate(discover_cases(raw, profile)):
        loaded = load_case(raw_case, profile)
        dicom_dirs = {p.parent for p in raw_case.root.rglob("*") if p.is_file() and not profile.is_label_file(p.name)
                      and p.suffix.lower() != ".txt"}
        reference = dcm2niix_volume(max(dicom_dirs, key=lambda d: len(list(d.iterdir()))), tmp_path / f"nii{n}")
        assert_same_volume(loaded.image, reference)
