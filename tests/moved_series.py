"""Series of real GE CT slices moved off a regular grid (uneven gaps, gantry tilt), and annotations on the grid
ITK-SNAP shows for them: shared by the uneven-spacing and multi-frame tests."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.uid import generate_uid

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
GE_SERIES = SHARED / "dcmqi_ct3slice" / "ct-3slice"
TWO_STACKS = (4.22,) * 4 + (7.38,) * 3  # gaps along the slice normal, mm: 8 slices


def write_moved_series(folder: Path, gaps: tuple[float, ...], tilt_degrees: float,
                       row_cosine: tuple[float, float, float] = (1.0, 0.0, 0.0)) -> list[Path]:
    """Copies of the real GE slices (cycled), one series, moved so that their gaps along the slice normal are
    ``gaps`` and the gantry is tilted by ``tilt_degrees`` (the table moves along z; the image plane is tilted about
    the patient's left-right axis, as GE writes it). Everything else stays as the scanner wrote it."""
    folder.mkdir(parents=True)
    sources = sorted(GE_SERIES.glob("*.dcm"))
    tilt = math.radians(tilt_degrees)
    column_cosine = (0.0, math.cos(tilt), math.sin(tilt))
    normal = np.cross(row_cosine, column_cosine)
    table_steps = np.concatenate([[0.0], np.cumsum(gaps)]) / abs(normal[2])  # gap along the normal -> along z
    x, y, z = (float(v) for v in pydicom.dcmread(sources[0]).ImagePositionPatient)
    written = []
    for k, step in enumerate(table_steps):
        ds = pydicom.dcmread(sources[k % len(sources)])
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = k + 1
        ds.ImageOrientationPatient = [*row_cosine, *column_cosine]
        ds.ImagePositionPatient = [x, y, round(z - step, 4)]
        ds.SliceLocation = round(z - step, 4)
        ds.GantryDetectorTilt = tilt_degrees
        path = folder / f"IM{k:04d}.dcm"
        ds.save_as(path)
        written.append(path)
    return written


def itk_series_image(folder: Path) -> sitk.Image:
    """The series as ITK-SNAP opens it: GDCM's file order, ITK's series reader with its defaults."""
    reader_ = sitk.ImageSeriesReader()
    reader_.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    reader_.SetImageIO("GDCMImageIO")
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # ITK warns of the non-uniform sampling
    try:
        return reader_.Execute()
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(True)


def write_itk_snap_label(case: Path, series: Path, labelled: range) -> np.ndarray:
    """An annotation saved on the grid ITK-SNAP shows (rectum and a tumour on slices ``labelled``); its array."""
    image = itk_series_image(series)
    label = np.zeros(sitk.GetArrayViewFromImage(image).shape, np.uint8)
    for k in labelled:
        label[k, 240:300, 230:290] = 1
        label[k, 255:280, 250:270] = 2
    seg = sitk.GetImageFromArray(label)
    seg.CopyInformation(image)
    sitk.WriteImage(seg, str(case / "rectum_seg.nrrd"), useCompression=True)
    return label
