"""care_dataset.raw.volume (NIfTI checks): what SimpleITK reads wrongly is refused; what it reads rightly is not."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from care_dataset.raw.volume import NiftiError, check_nifti

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def ct(tmp_path) -> Path:
    """An int16 NIfTI of noise (it does not compress away), written by SimpleITK."""
    array = np.random.default_rng(0).integers(-1000, 1000, size=(12, 40, 50), dtype=np.int16)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.8, 0.8, 2.5))
    image.SetOrigin((-20.0, 30.5, -100.25))
    path = tmp_path / "ct.nii"
    sitk.WriteImage(image, str(path))
    return path


def test_complete_files_pass_in_every_gzip_layout(ct, tmp_path):
    data = ct.read_bytes()
    check_nifti(ct)
    layouts = {
        "one_member.nii.gz": gzip.compress(data),
        # bgzip and `cat a.gz b.gz` write several members; the trailer then holds only the last one's size
        "members.nii.gz": b"".join(gzip.compress(data[i:i + 5000]) for i in range(0, len(data), 5000)),
        "trailing_empty_member.nii.gz": gzip.compress(data) + gzip.compress(b""),
    }
    for name, content in layouts.items():
        (tmp_path / name).write_bytes(content)
        check_nifti(tmp_path / name)
        assert sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / name))).tobytes() == \
            sitk.GetArrayFromImage(sitk.ReadImage(str(ct))).tobytes()


@pytest.mark.parametrize("cut", [1, 4000, 40_000])
def test_data_cut_short_is_refused_with_the_byte_counts(ct, tmp_path, cut):
    data = ct.read_bytes()
    expected = len(data)
    (tmp_path / "short.nii").write_bytes(data[:-cut])
    with pytest.raises(NiftiError, match=f"truncated NIfTI: {expected - cut:,} readable bytes of the {expected:,}"):
        check_nifti(tmp_path / "short.nii")
    packed = gzip.compress(data)
    (tmp_path / "short.nii.gz").write_bytes(packed[: len(packed) - 100 - cut // 4])  # 8 trailer bytes and data
    with pytest.raises(NiftiError, match="truncated NIfTI"):
        check_nifti(tmp_path / "short.nii.gz")


@pytest.mark.parametrize("shift_mm, refused", [(0.0, False), (0.01, False), (0.5, True), (30.0, True)])
def test_qform_and_sform_must_place_the_volume_alike(ct, tmp_path, shift_mm, refused):
    image = nib.load(ct)
    qform = image.affine.copy()
    qform[:3, 3] += shift_mm / np.sqrt(3)
    edited = nib.Nifti1Image(np.asarray(image.dataobj), image.affine, image.header)
    edited.set_sform(image.affine, code=2)
    edited.set_qform(qform, code=1)
    nib.save(edited, tmp_path / "edited.nii.gz")
    if refused:
        with pytest.raises(NiftiError, match=r"qform \(code 1\) and sform \(code 2\) place the volume up to "
                                              f"{shift_mm:.2f} mm apart"):
            check_nifti(tmp_path / "edited.nii.gz")
    else:
        check_nifti(tmp_path / "edited.nii.gz")
    # with one of the two codes 0 there is nothing to disagree about
    edited.set_qform(qform, code=0)
    nib.save(edited, tmp_path / "sform_only.nii.gz")
    check_nifti(tmp_path / "sform_only.nii.gz")


def test_real_nifti_files_pass():
    folder = SHARED / "totalseg_example_ct_sm"
    if not folder.is_dir():
        pytest.skip(f"real NIfTI test data not found at {folder}")
    for path in sorted(folder.glob("*.nii.gz")):
        check_nifti(path)
