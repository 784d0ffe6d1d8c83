"""care-publish's NIfTI cells: a case's span on an oblique canonical grid gives the affine ITK's own NIfTI writer
gives (what care-export writes), and the same bytes every time."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from care_dataset.export.volumes import on_grid
from care_dataset.format.span import case_span, ras_affine, span_geometry
from care_dataset.publish.nifti import nifti_cell


def oblique_canonical() -> dict:
    """A canonical grid turned 20 degrees about z and 10 about x, anisotropic, off the origin."""
    a, b = np.radians(20), np.radians(10)
    turn_z = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    turn_x = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return {"size": [7, 5, 12], "spacing": [0.8, 0.7, 2.5], "origin": [-120.5, 80.25, -300.0],
            "direction": (turn_z @ turn_x).ravel().tolist()}


def test_affine_and_voxels_match_itk_nifti(tmp_path):
    rng = np.random.default_rng(1)
    kept = [3, 4, 6, 9]
    image = rng.integers(-1000, 1500, (len(kept), 5, 7)).astype(np.int16)
    label = rng.integers(0, 3, (len(kept), 5, 7)).astype(np.uint8)
    span = case_span(image, label, kept)
    grid = span_geometry(oblique_canonical(), span.first_slice)
    for array, name in ((span.image, "image"), (span.label, "label")):
        ours = nib.Nifti1Image.from_bytes(nifti_cell(array, grid)["bytes"])
        path = tmp_path / f"{name}.nii"
        sitk.WriteImage(on_grid(array, grid), str(path))  # ITK's writer: its own LPS -> RAS conversion
        itk = nib.load(path)
        np.testing.assert_allclose(ours.affine, itk.affine, atol=1e-4)
        np.testing.assert_allclose(ours.affine, ras_affine(grid), atol=1e-4)
        assert ours.get_data_dtype() == itk.get_data_dtype() == array.dtype
        np.testing.assert_array_equal(np.asanyarray(ours.dataobj), np.asanyarray(itk.dataobj))
        assert ours.header.get_xyzt_units()[0] == "mm"
        assert ours.header["qform_code"] == ours.header["sform_code"] == 1


def test_same_span_same_bytes_and_no_text():
    image = np.arange(2 * 5 * 7, dtype=np.int16).reshape(2, 5, 7)
    grid = span_geometry(oblique_canonical(), 3)
    cell = nifti_cell(image, grid)
    assert cell["path"] is None and cell["bytes"] == nifti_cell(image.copy(), grid)["bytes"]
    header = nib.Nifti1Image.from_bytes(cell["bytes"]).header
    assert header["descrip"].item() == b"" and header["aux_file"].item() == b"" and header["intent_name"].item() == b""
