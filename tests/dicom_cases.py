"""DICOM cases the conversion tests write by hand: a phantom CT series with identifying headers, an ITK-SNAP
label volume and a label description file whose text is identifying too."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
from pydicom.uid import generate_uid

from care_dataset.synth.phantom import phantom_volume
from ct_instances import new_ct_instance

SIZE = 64  # in-plane pixels
SLICES = 14
SPACING = (6.0, 6.0, 2.5)  # x, y, z mm: a 384 mm field of view on 64 pixels

SHARED_PHI = dict(InstitutionName="Saint Elsewhere Clinic", AccessionNumber="ACC99321",
                  ReferringPhysicianName="House^Gregory", StudyDescription="pelvis staging Kowalski",
                  StudyDate="20190412", StudyTime="101502")
LABEL_NAME_PHI = "rectum drawn by Dr Quackenbush"


def phantom(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(hu int16 [z, y, x], label uint8 [z, y, x]) with rectum and tumor on a few central slices."""
    rng = np.random.default_rng(seed)
    return phantom_volume((SLICES, SIZE, SIZE), SPACING[::-1], rng, tumour=True)


def write_dicom_case(case_dir: Path, hu: np.ndarray, label: np.ndarray, phi: dict, modality: str = "CT") -> list[str]:
    """DICOM series (head-first supine, LPS identity) plus an ITK-SNAP-style label and description file.

    Returns the UIDs written (identifying values too)."""
    series_dir = case_dir / f"{phi['PatientName'].replace('^', '_')}_CT" / "series1"
    series_dir.mkdir(parents=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    origin = (-SIZE * SPACING[0] / 2, -SIZE * SPACING[1] / 2, -100.0)
    uids = [study, series, frame]
    for k in range(hu.shape[0]):
        ds = new_ct_instance()
        uids.append(ds.SOPInstanceUID)
        ds.Modality = modality
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.SeriesNumber, ds.InstanceNumber = 3, k + 1
        for keyword, value in {**phi, **SHARED_PHI}.items():
            setattr(ds, keyword, value)
        ds.ImagePositionPatient = [origin[0], origin[1], origin[2] + k * SPACING[2]]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [SPACING[1], SPACING[0]]
        ds.SliceThickness = SPACING[2]
        ds.Rows, ds.Columns = hu.shape[1:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = np.clip(hu[k].astype(np.int32) + 1024, 0, 65535).astype(np.uint16).tobytes()
        ds.save_as(series_dir / f"IMG_{phi['PatientID']}_{k:04d}.dcm", enforce_file_format=True)
    seg = sitk.GetImageFromArray(label)
    seg.SetSpacing(SPACING)
    seg.SetOrigin(origin)
    sitk.WriteImage(seg, str(case_dir / f"{phi['PatientName'].replace('^', '_')}_seg.nii.gz"))
    write_label_description(case_dir / "labels.txt")
    return uids


def write_label_description(path: Path) -> None:
    path.write_text(
        "################################################\n"
        "# ITK-SnAP Label Description File\n"
        "################################################\n"
        '    0     0    0    0        0  0  0    "Clear Label"\n'
        f'    1   255    0    0        1  1  1    "{LABEL_NAME_PHI}"\n'
        '    2     0  255    0        1  1  1    "Tumor"\n'
    )
