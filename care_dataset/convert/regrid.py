"""Back from a converted case to the original image grid."""

from __future__ import annotations

from typing import Any

import numpy as np
import SimpleITK as sitk

from care_dataset.format.reader import CareDataset, open_dataset

GEOMETRY_ATOL = 1e-4


def to_original_grid(dataset: Any, case_id: str, slices: np.ndarray, fill_value: int | float = 0) -> sitk.Image:
    """Place a case's stored slices back on the original image grid, exactly (no resampling).

    dataset: a ``CareDataset`` or the path of a converted folder. slices: (n, H, W), one per stored slice
    (e.g. the stored image, label, or a predicted mask). Slices that were not kept hold ``fill_value``.
    Returns an image with the original size, spacing, origin and direction.
    """
    if not isinstance(dataset, CareDataset):
        dataset = open_dataset(dataset)
    geometry = dataset.cases[case_id]
    canonical, original = geometry["canonical"], geometry["original"]
    size_x, size_y, size_z = canonical["size"]
    slices = np.asarray(slices)
    if slices.shape != (geometry["num_slices"], size_y, size_x):
        raise ValueError(f"case {case_id}: expected slices of shape {(geometry['num_slices'], size_y, size_x)}, "
                         f"got {slices.shape}")
    volume = np.full((size_z, size_y, size_x), fill_value, dtype=slices.dtype)
    volume[np.asarray(geometry["kept_slices"], dtype=np.int64)] = slices
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing(canonical["spacing"])
    image.SetOrigin(canonical["origin"])
    image.SetDirection(canonical["direction"])
    image = sitk.DICOMOrient(image, original["orientation"])
    if list(image.GetSize()) != [int(v) for v in original["size"]]:
        raise ValueError(f"case {case_id}: reoriented size {image.GetSize()} differs from the original "
                         f"{tuple(original['size'])}")
    for name, actual in (("spacing", image.GetSpacing()), ("origin", image.GetOrigin()),
                         ("direction", image.GetDirection())):
        if not np.allclose(actual, original[name], rtol=0, atol=GEOMETRY_ATOL):
            raise ValueError(f"case {case_id}: reoriented {name} {tuple(actual)} differs from the original "
                             f"{tuple(original[name])}")
    image.SetSpacing([float(v) for v in original["spacing"]])
    image.SetOrigin([float(v) for v in original["origin"]])
    image.SetDirection([float(v) for v in original["direction"]])
    return image
