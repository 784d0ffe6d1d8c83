"""The NIfTI cells of the ``volumes`` configuration: a case's span (``care_dataset.format.span``) as the bytes
of an uncompressed NIfTI-1 file, which ``datasets``' ``Nifti`` feature decodes to a nibabel image.

The bytes are not gzipped: the Parquet file compresses them (zstd), and the same array and grid always give the
same bytes (the header holds no time, name or description).
"""

from __future__ import annotations

import nibabel as nib
import numpy as np

from care_dataset.format.span import SpanGeometry, ras_affine

SCANNER_CODE = 1  # qform/sform code: scanner-based anatomical coordinates, as ITK writes them


def nifti_cell(array: np.ndarray, grid: SpanGeometry) -> dict:
    """A ``Nifti`` feature cell (bytes, no path) of `array` (z, y, x) on `grid`."""
    affine = ras_affine(grid)
    image = nib.Nifti1Image(array.transpose(2, 1, 0), affine)  # NIfTI voxel order (x, y, z)
    image.header.set_qform(affine, code=SCANNER_CODE)
    image.header.set_sform(affine, code=SCANNER_CODE)
    image.header.set_xyzt_units("mm")
    image.set_data_dtype(array.dtype)
    return {"bytes": image.to_bytes(), "path": None}
