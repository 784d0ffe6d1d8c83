"""care-synth: a synthetic CARE-like raw hospital export.

Each case is a folder named like a patient, holding a pelvic CT as a DICOM series full of fake
identifying values (names, IDs, dates, UIDs, institutions, sequences, a private block), an
ITK-SNAP-style label volume on the image grid and, usually, an ITK-SNAP label description file.
With ``messy=True`` some cases also carry a localizer, a second series, a compressed transfer
syntax, a flipped patient position, a label stored in another orientation, deep nesting or a
DICOMDIR. Same arguments -> identical files.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.charset import convert_encodings
from pydicom.filebase import DicomBytesIO
from pydicom.fileset import FileSet
from pydicom.filewriter import write_data_element, write_file_meta_info
from pydicom.pixels import get_encoder
from pydicom.sequence import Sequence
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    MRImageStorage,
    RLELossless,
    generate_uid,
)

from care_dataset.files import atomic_file, creation_problem, make_staging_dir, previous_path, replace_folder
from care_dataset.synth.phantom import phantom_volume

__all__ = [
    "CasePlan",
    "CORRUPTIONS",
    "case_geometry",
    "case_volume",
    "corrupt_case",
    "plan_dataset",
    "write_case",
    "write_raw_dataset",
]

FAMILY_NAMES = (
    "Doe", "Smith", "Novak", "Garcia", "Okafor", "Lindqvist", "Moreau", "Tanaka", "Kowalski", "Brennan",
    "Haddad", "Petrov", "Fischer", "Rossi", "Nguyen", "Olsen", "Dubois", "Castillo", "Weber", "Jansen",
    "Murphy", "Silva", "Horvat", "Keller", "Abbott", "Yilmaz", "Costa", "Larsen", "Schmidt", "Ivanova",
)
GIVEN_NAMES = {
    "F": ("Jane", "Maria", "Anna", "Sofia", "Ingrid", "Claire", "Yuki", "Fatima", "Helen", "Olga", "Grace", "Lucia"),
    "M": ("John", "Peter", "Ahmed", "Lars", "Pierre", "Kenji", "Tomas", "Marco", "David", "Ivan", "Samuel", "Jonas"),
}
INSTITUTIONS = (
    ("St. Mary's General Hospital", "12 Elm Street, Springfield, 40213"),
    ("Riverside University Medical Center", "400 River Road, Lakeview, 90312"),
    ("North Valley Cancer Institute", "7 Cedar Avenue, Northbridge, 22041"),
    ("Municipal Hospital Eastgate", "Hauptstrasse 51, 80331 Eastgate"),
)
SCANNERS = (
    ("SIEMENS", "SOMATOM Definition AS+", "Br40d"),
    ("GE MEDICAL SYSTEMS", "Revolution CT", "STANDARD"),
    ("Philips", "Ingenuity CT", "B"),
    ("TOSHIBA", "Aquilion ONE", "FC13"),
)
FOV_MM = (360.0, 380.0, 400.0, 420.0, 450.0, 480.0, 500.0)
SLICE_MM = (2.5, 3.0, 3.75, 5.0)
# Patient position -> signs of the image axes in LPS (x, y, z) as SimpleITK reads the series.
POSITIONS = {"HFS": (1, 1, 1), "FFS": (-1, 1, -1), "HFP": (-1, -1, 1)}
# (rescale intercept, signed pixels, bits stored)
PIXEL_FORMATS = ((-1024, False, 12), (-1024, True, 16), (0, True, 16), (-1000, False, 16))
LABEL_COLOURS = ((0, 0, 0), (255, 0, 0), (0, 255, 0))
MESSY_FEATURES = (
    "localizer", "second_series", "rle", "j2k", "feet_first", "prone",
    "label_reoriented", "deep_nesting", "dicomdir", "itksnap_default_labels",
)
CORRUPTIONS = (
    "truncated_dicom", "no_label", "mismatched_grid", "empty_label", "unknown_label_value", "non_ct_modality",
)
LABEL_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
PRIVATE_CREATOR = "SYNTH HOSPITAL RIS 1.0"
DOCTOR_INITIALS = "ABCDEFGHJKLMNPRSTW"


@dataclass(frozen=True)
class Patient:
    """Fake identity of one patient and their study."""

    family: str
    given: str
    sex: str
    birth_date: str
    patient_id: str
    issuer: str
    other_id: str
    study_date: str
    study_time: str
    accession: str
    study_id: str
    institution: str
    address: str
    referring: str
    performing: str
    operator: str
    station: str
    serial: str

    @property
    def dicom_name(self) -> str:
        return f"{self.family.upper()}^{self.given.upper()}"

    @property
    def age(self) -> str:
        years = int(self.study_date[:4]) - int(self.birth_date[:4])
        years -= int(self.study_date[4:] < self.birth_date[4:])
        return f"{years:03d}Y"


@dataclass(frozen=True)
class CasePlan:
    """Everything that decides one synthetic case; rendering and writing follow from it."""

    seed: int
    index: int
    patient: Patient
    folder: str
    size: int
    slices: int
    pixel_spacing: float
    slice_thickness: float
    origin: tuple[float, float, float]  # LPS mm of voxel [0, 0, 0] of the canonical [z, y, x] array
    position: str
    intercept: int
    signed: bool
    bits_stored: int
    transfer_syntax: str
    layout: str  # "nested" | "flat_uid" | "deep_nesting" | "dicomdir"
    scanner: tuple[str, str, str]
    tumour: bool
    label_file: str
    label_dtype: str
    label_notes: str | None
    label_reoriented: bool
    desc_file: str | None
    label_names: tuple[str, str, str]
    extra_default_labels: bool
    localizer: bool
    second_series: bool
    features: tuple[str, ...] = field(default=())

    @property
    def direction_signs(self) -> tuple[int, int, int]:
        return POSITIONS[self.position]


def _uid(plan: CasePlan, *parts: object) -> str:
    return generate_uid(entropy_srcs=["care-synth", str(plan.seed), str(plan.index), *map(str, parts)])


def _ds_number(value: float) -> str:
    """A DICOM DS string; the geometry uses float() of the same string so both stay identical."""
    text = f"{value:.8f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _doctor_name(rng: np.random.Generator, family_index: int) -> str:
    """A DICOM person name: one of FAMILY_NAMES and a drawn initial."""
    return f"{FAMILY_NAMES[family_index].upper()}^{DOCTOR_INITIALS[int(rng.integers(len(DOCTOR_INITIALS)))]}"


def _draw_patient(rng: np.random.Generator, family: str, given: str, sex: str) -> Patient:
    """A fake identity and study for the patient named family, given."""
    birth_year, study_year = int(rng.integers(1935, 1976)), int(rng.integers(2015, 2022))
    birth = f"{birth_year}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}"
    study = f"{study_year}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}"
    institution, address = INSTITUTIONS[int(rng.integers(len(INSTITUTIONS)))]
    doctors = rng.choice(len(FAMILY_NAMES), size=3, replace=False)
    return Patient(
        family=family,
        given=given,
        sex=sex,
        birth_date=birth,
        patient_id=f"{int(rng.integers(1_000_000, 9_999_999))}",
        issuer=institution.split()[0].upper().strip(".'") + "_MRN",
        other_id=f"H{int(rng.integers(10_000_000, 99_999_999))}",
        study_date=study,
        study_time=f"{int(rng.integers(7, 19)):02d}{int(rng.integers(0, 60)):02d}{int(rng.integers(0, 60)):02d}",
        accession=f"ACC{study_year}{int(rng.integers(100_000, 999_999))}",
        study_id=f"{int(rng.integers(1000, 99999))}",
        institution=institution,
        address=address,
        referring=_doctor_name(rng, int(doctors[0])),
        performing=_doctor_name(rng, int(doctors[1])),
        operator=_doctor_name(rng, int(doctors[2])),
        station=f"CT{int(rng.integers(1, 9)):02d}-{family[:3].upper()}{int(rng.integers(10, 99))}",
        serial=f"{int(rng.integers(10_000, 99_999))}",
    )


def _assign_features(cases: int, rng: np.random.Generator) -> list[set[str]]:
    """Spread the messy features over about half of the cases (all of them at least once)."""
    chosen = [set() for _ in range(cases)]
    messy_cases = rng.permutation(cases)[: max(1, math.ceil(cases / 2))]
    features = list(MESSY_FEATURES)
    if not get_encoder(JPEG2000Lossless).is_available:
        features.remove("j2k")
    for i, name in enumerate(features):
        chosen[int(messy_cases[i % len(messy_cases)])].add(name)
    for names in chosen:  # one transfer syntax, one position, one layout per case
        if {"rle", "j2k"} <= names:
            names.discard("rle")
        if {"feet_first", "prone"} <= names:
            names.discard("prone")
        if {"deep_nesting", "dicomdir"} <= names:
            names.discard("deep_nesting")
        if "label_reoriented" in names and not names & {"feet_first", "prone"}:
            names.add("feet_first")
    return chosen


def plan_dataset(
    cases: int, seed: int, size: int = 512, slices: int | None = None, messy: bool = True
) -> list[CasePlan]:
    """Deterministic plans for ``cases`` synthetic cases."""
    if cases < 1:
        raise ValueError(f"--cases must be at least 1, got {cases}")
    if size < 64:
        raise ValueError(f"--size must be at least 64 pixels, got {size}")
    if slices is not None and slices < 8:
        raise ValueError(f"--slices must be at least 8, got {slices}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xCA5E]))
    names = sorted(
        {(f, g, s) for f in FAMILY_NAMES for s, given in GIVEN_NAMES.items() for g in given}
    )
    picks = rng.permutation(len(names))
    features = _assign_features(cases, rng) if messy else [set() for _ in range(cases)]
    plans = []
    for index in range(cases):
        family, given, sex = names[int(picks[index % len(names)])]
        if index >= len(names):
            given = f"{given} {chr(65 + (index // len(names)) % 26)}"
        case_rng = np.random.default_rng(np.random.SeedSequence([seed, index, 0x9A7]))
        plans.append(_plan_case(seed, index, family, given, sex, size, slices, features[index], case_rng))
    return plans


def _plan_case(
    seed: int, index: int, family: str, given: str, sex: str, size: int, slices: int | None,
    feats: set[str], rng: np.random.Generator,
) -> CasePlan:
    """The plan of case ``index``; feats: the messy features it carries (see MESSY_FEATURES)."""
    patient = _draw_patient(rng, family, given, sex)
    slices, thickness = _draw_slices(rng, slices)
    pixel, origin = _draw_placement(rng, size)
    intercept, signed, bits = PIXEL_FORMATS[int(rng.integers(len(PIXEL_FORMATS)))]
    layout = _draw_layout(rng, feats)
    folder, label_file, label_names, desc_file, notes = _draw_file_names(rng, patient)
    return CasePlan(
        seed=seed,
        index=index,
        patient=patient,
        folder=folder,
        size=size,
        slices=slices,
        pixel_spacing=pixel,
        slice_thickness=thickness,
        origin=origin,
        position="FFS" if "feet_first" in feats else "HFP" if "prone" in feats else "HFS",
        intercept=intercept,
        signed=signed,
        bits_stored=bits,
        transfer_syntax=str(_transfer_syntax(feats)),
        layout=layout,
        scanner=SCANNERS[int(rng.integers(len(SCANNERS)))],
        tumour=bool(index == 0 or rng.random() < 0.85),
        label_file=label_file,
        label_dtype=("uint16", "uint16", "uint8")[int(rng.integers(3))],
        label_notes=notes,
        label_reoriented="label_reoriented" in feats,
        desc_file=desc_file,
        label_names=label_names,
        extra_default_labels="itksnap_default_labels" in feats,
        localizer="localizer" in feats,
        second_series="second_series" in feats,
        features=tuple(sorted(feats)),
    )


def _draw_slices(rng: np.random.Generator, slices: int | None) -> tuple[int, float]:
    """Slice count and thickness (mm); a drawn count (60-120) gets a thickness making the scan 200-450 mm."""
    if slices is not None:
        return slices, float(rng.choice(SLICE_MM))
    slices = int(rng.integers(60, 121))
    fitting = [t for t in SLICE_MM if 200 <= slices * t <= 450]
    thickness = float(rng.choice(fitting)) if fitting else min(SLICE_MM, key=lambda t: abs(slices * t - 320))
    return slices, thickness


def _draw_placement(rng: np.random.Generator, size: int) -> tuple[float, tuple[float, float, float]]:
    """Pixel spacing (mm) from a drawn field of view, and the LPS origin (mm) of voxel [0, 0, 0]."""
    pixel = float(_ds_number(float(rng.choice(FOV_MM)) / size))
    x0 = float(_ds_number(-(size - 1) / 2 * pixel))
    y0 = float(_ds_number(-(size - 1) / 2 * pixel + float(rng.integers(-20, 41))))
    z0 = float(_ds_number(-float(rng.integers(200, 1200)) / 2))
    return pixel, (x0, y0, z0)


def _transfer_syntax(feats: set[str]) -> str:
    return JPEG2000Lossless if "j2k" in feats else RLELossless if "rle" in feats else ExplicitVRLittleEndian


def _draw_layout(rng: np.random.Generator, feats: set[str]) -> str:
    """The messy layout the case carries, else nested or flat_uid (drawn only then)."""
    layout = next((f for f in ("dicomdir", "deep_nesting") if f in feats), None)
    return layout or ("nested", "flat_uid")[int(rng.integers(2))]


def _draw_file_names(
    rng: np.random.Generator, patient: Patient
) -> tuple[str, str, tuple[str, str, str], str | None, str | None]:
    """(case folder, label file, label names, label description file or None, label file notes or None)."""
    family, given = patient.family, patient.given
    folder = (
        f"{family}_{given}_{patient.birth_date}".replace(" ", "_"),
        f"{family.upper()} {given.upper()} ({patient.patient_id})",
        f"{patient.patient_id}_{family}",
    )[int(rng.integers(3))]
    label_file = (
        f"{family}_{given}_seg.nii.gz".replace(" ", "_"),
        "segmentation.nrrd",
        f"{patient.patient_id}_label.mha",
        f"{family}_rectum_seg.nii",
    )[int(rng.integers(4))]
    year = patient.study_date[:4]
    label_names = (
        ("Clear Label", "Rectum", "Tumor"),
        ("Clear Label", "rectum", "tumour"),
        ("Clear Label", "Normal rectum", f"Tumor {family} {given[0]} {year}"),
        ("Clear Label", f"Rectum ({given[0]}. {family} {patient.study_date})", "Tumor"),
    )[int(rng.integers(4))]
    desc_file = (
        None,
        "label_descriptions.txt",
        f"{family}_{given}_labels.txt".replace(" ", "_"),
        "itksnap_labels.txt",
    )[int(rng.integers(4))]
    notes = f"{patient.dicom_name} {patient.study_date} contoured by {patient.performing}"
    notes = notes if rng.random() < 0.35 else None
    return folder, label_file, label_names, desc_file, notes


def _stored_range(plan: CasePlan) -> tuple[int, int]:
    if plan.signed:
        return -(2 ** (plan.bits_stored - 1)), 2 ** (plan.bits_stored - 1) - 1
    return 0, 2**plan.bits_stored - 1


def case_volume(plan: CasePlan) -> tuple[np.ndarray, np.ndarray]:
    """The case's HU volume and label in canonical orientation, exactly as its DICOM encodes them.

    Returns (hu int16 [z, y, x], label uint8 [z, y, x]); y anterior -> posterior, x right -> left,
    z inferior -> superior.
    """
    rng = np.random.default_rng(np.random.SeedSequence([plan.seed, plan.index, 0xC7]))
    shape = (plan.slices, plan.size, plan.size)
    spacing = (plan.slice_thickness, plan.pixel_spacing, plan.pixel_spacing)
    hu, label = phantom_volume(shape, spacing, rng, tumour=plan.tumour)
    low, high = _stored_range(plan)
    info = np.iinfo(np.int16)
    np.clip(hu, max(low + plan.intercept, info.min), min(high + plan.intercept, info.max), out=hu)
    return hu, label


def case_geometry(plan: CasePlan) -> dict[str, tuple[float, ...]]:
    """Size, spacing, origin and direction of the main series as SimpleITK reads it (x, y, z order)."""
    sx, sy, sz = plan.direction_signs
    n = plan.size
    ox, oy, oz = plan.origin
    origin = (
        ox if sx > 0 else float(_ds_number(ox + (n - 1) * plan.pixel_spacing)),
        oy if sy > 0 else float(_ds_number(oy + (n - 1) * plan.pixel_spacing)),
        oz if sz > 0 else float(_ds_number(oz + (plan.slices - 1) * plan.slice_thickness)),
    )
    return {
        "size": (n, n, plan.slices),
        "spacing": (plan.pixel_spacing, plan.pixel_spacing, plan.slice_thickness),
        "origin": origin,
        "direction": (float(sx), 0.0, 0.0, 0.0, float(sy), 0.0, 0.0, 0.0, float(sz)),
    }


def _to_stored_order(plan: CasePlan, volume: np.ndarray) -> np.ndarray:
    """Canonical [z, y, x] -> the order of the series' slices, rows and columns."""
    sx, sy, sz = plan.direction_signs
    return volume[::sz, ::sy, ::sx]


@dataclass
class _Series:
    number: int
    uid: str
    description: str
    image_type: list[str]
    pixels: np.ndarray  # stored values [slice, row, column]
    positions: list[list[str]]  # ImagePositionPatient per slice (DS strings)
    orientation: list[float]
    pixel_spacing: tuple[float, float]  # (row spacing, column spacing)
    thickness: float
    folder: str
    names: list[str] = field(default_factory=list)


def _patient_dataset(plan: CasePlan) -> Dataset:
    """Header elements shared by every instance of the case (identifying ones included)."""
    ds = Dataset()
    _add_study_and_equipment(ds, plan)
    _add_patient(ds, plan)
    _add_requests(ds, plan)
    _add_frame_of_reference(ds, plan)
    block = ds.private_block(0x0029, PRIVATE_CREATOR, create=True)
    block.add_new(0x10, "PN", plan.patient.dicom_name)
    block.add_new(0x11, "LO", f"MRN {plan.patient.patient_id} / {plan.patient.institution}")
    block.add_new(0x12, "DA", plan.patient.birth_date)
    return ds


def _add_study_and_equipment(ds: Dataset, plan: CasePlan) -> None:
    """Dates, times, institution, staff and scanner."""
    p = plan.patient
    manufacturer, model, _ = plan.scanner
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CTImageStorage
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = ds.InstanceCreationDate = p.study_date
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = ds.InstanceCreationTime = p.study_time
    ds.AcquisitionDateTime = p.study_date + p.study_time
    ds.AccessionNumber = p.accession
    ds.Modality = "CT"
    ds.Manufacturer = manufacturer
    ds.InstitutionName = p.institution
    ds.InstitutionAddress = p.address
    ds.InstitutionalDepartmentName = "Radiology"
    ds.ReferringPhysicianName = p.referring
    ds.StationName = p.station
    ds.StudyDescription = f"CT PELVIS staging {p.family.upper()}"
    ds.PerformingPhysicianName = p.performing
    ds.OperatorsName = p.operator
    ds.ManufacturerModelName = model
    ds.DeviceSerialNumber = p.serial


def _add_patient(ds: Dataset, plan: CasePlan) -> None:
    """The patient module, contact details and an other-ID sequence."""
    p = plan.patient
    ds.PatientName = p.dicom_name
    ds.PatientID = p.patient_id
    ds.IssuerOfPatientID = p.issuer
    ds.PatientBirthDate = p.birth_date
    ds.PatientSex = p.sex
    ds.PatientAge = p.age
    ds.PatientAddress = f"{int(plan.index) + 3} Harbour Lane, Springfield"
    ds.PatientTelephoneNumbers = f"+1-555-{1000 + plan.index:04d}"
    ds.AdditionalPatientHistory = f"Rectal bleeding; referred by Dr {p.referring.split('^')[0].title()}"
    other = Dataset()
    other.PatientID = p.other_id
    other.IssuerOfPatientID = "REGIONAL_HIE"
    other.TypeOfPatientID = "TEXT"
    ds.OtherPatientIDsSequence = Sequence([other])


def _add_requests(ds: Dataset, plan: CasePlan) -> None:
    """A referenced prior study and the request attributes naming the patient."""
    p = plan.patient
    referenced = Dataset()
    referenced.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    referenced.ReferencedSOPInstanceUID = _uid(plan, "prior-study")
    ds.ReferencedStudySequence = Sequence([referenced])
    request = Dataset()
    request.AccessionNumber = p.accession
    request.RequestedProcedureID = f"RP{p.study_id}"
    request.RequestedProcedureDescription = f"CT pelvis with contrast for {p.dicom_name}"
    request.ScheduledProcedureStepID = f"SPS{p.study_id}"
    request.ScheduledProcedureStepDescription = "Rectal cancer staging"
    ds.RequestAttributesSequence = Sequence([request])


def _add_frame_of_reference(ds: Dataset, plan: CasePlan) -> None:
    """Body part, tube voltage, patient position, study and frame-of-reference identity."""
    ds.BodyPartExamined = "PELVIS"
    ds.KVP = "120"
    ds.PatientPosition = plan.position
    ds.StudyInstanceUID = _uid(plan, "study")
    ds.StudyID = plan.patient.study_id
    ds.FrameOfReferenceUID = _uid(plan, "frame")
    ds.PositionReferenceIndicator = ""


def _series_header(plan: CasePlan, base: Dataset, series: _Series) -> Dataset:
    """Elements shared by every instance of a series (everything but the per-instance ones)."""
    ds = Dataset()
    ds.update(base)
    ds.ImageType = series.image_type
    ds.SeriesInstanceUID = series.uid
    ds.SeriesNumber = series.number
    ds.AcquisitionNumber = 1
    ds.SeriesDescription = series.description
    ds.ConvolutionKernel = plan.scanner[2]
    ds.SliceThickness = _ds_number(series.thickness)
    ds.ImageOrientationPatient = [_ds_number(v) for v in series.orientation]
    ds.PixelSpacing = [_ds_number(v) for v in series.pixel_spacing]
    ds.WindowCenter, ds.WindowWidth = "40", "400"
    ds.RescaleIntercept = str(plan.intercept)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    return ds


def _instance_elements(plan: CasePlan, series: _Series, k: int) -> Dataset:
    """The per-instance elements of slice k: identity, position and the (encoded) pixel module."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPInstanceUID = _uid(plan, series.uid, k)
    ds.InstanceNumber = k + 1
    ds.ImagePositionPatient = series.positions[k]
    if series.image_type[-1] != "LOCALIZER":
        ds.SliceLocation = series.positions[k][2]
    pixels = series.pixels[k]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = (int(v) for v in pixels.shape)
    ds.BitsAllocated = 16
    ds.BitsStored = plan.bits_stored
    ds.HighBit = plan.bits_stored - 1
    ds.PixelRepresentation = int(plan.signed)
    if plan.transfer_syntax == ExplicitVRLittleEndian:
        ds.add_new(0x7FE00010, "OW", pixels.tobytes())
    else:
        ds.compress(pydicom.uid.UID(plan.transfer_syntax), pixels, generate_instance_uid=False)
    return ds


def _file_meta(sop_instance_uid: str, transfer_syntax: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = transfer_syntax
    return meta


def _instance_dataset(plan: CasePlan, series: _Series, base: Dataset, k: int) -> Dataset:
    """The complete dataset of slice k, as _InstanceWriter encodes it (used to check the writer)."""
    ds = _series_header(plan, base, series)
    extra = _instance_elements(plan, series, k)
    ds.update(extra)
    ds.file_meta = _file_meta(str(extra.SOPInstanceUID), str(extra.file_meta.TransferSyntaxUID))
    return ds


def _encode_element(elem, encodings: list[str]) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_data_element(fp, elem, encodings)
    return fp.getvalue()


class _InstanceWriter:
    """Writes a series' instances in explicit VR little endian, encoding the shared elements once.

    The bytes equal pydicom's ``dcmwrite(dataset, enforce_file_format=True)`` of the merged dataset.
    """

    def __init__(self, header: Dataset):
        self.encodings = convert_encodings(header.get("SpecificCharacterSet", "ISO_IR 6"))
        self.header = {elem.tag: _encode_element(elem, self.encodings) for elem in header}

    def write(self, path: Path, instance: Dataset) -> None:
        encoded = dict(self.header)
        encoded.update((elem.tag, _encode_element(elem, self.encodings)) for elem in instance)
        meta = DicomBytesIO()
        meta.is_little_endian, meta.is_implicit_VR = True, False
        meta.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(meta, _file_meta(str(instance.SOPInstanceUID), instance.file_meta.TransferSyntaxUID))
        with open(path, "wb") as fp:
            fp.write(meta.getvalue())
            fp.write(b"".join(encoded[tag] for tag in sorted(encoded)))


def _write_series(plan: CasePlan, base: Dataset, series: _Series, root: Path) -> list[Path]:
    writer = _InstanceWriter(_series_header(plan, base, series))
    paths = []
    for k in range(len(series.pixels)):
        instance = _instance_elements(plan, series, k)
        name = series.names[k] if series.names else f"{instance.SOPInstanceUID}.dcm"
        path = root / series.folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        writer.write(path, instance)
        paths.append(path)
    return paths


def _case_series(plan: CasePlan, hu: np.ndarray) -> list[_Series]:
    """The main series plus, for messy cases, a localizer and a thick-slice series.

    hu: int16 [z, y, x] in canonical orientation, as case_volume returns it.
    """
    series = [_main_series(plan, hu)]
    if plan.localizer:
        series.append(_localizer_series(plan, hu))
    if plan.second_series:
        series.append(_thick_series(plan, hu))
    _place_series(plan, series)
    return series


def _pixel_dtype(plan: CasePlan) -> type[np.integer]:
    return np.int16 if plan.signed else np.uint16


def _stored_pixels(plan: CasePlan, volume: np.ndarray) -> np.ndarray:
    """Canonical HU [z, y, x] -> stored values in the series' slice, row and column order."""
    return (_to_stored_order(plan, volume).astype(np.int32) - plan.intercept).astype(_pixel_dtype(plan))


def _axial_orientation(plan: CasePlan) -> list[float]:
    sx, sy, _ = plan.direction_signs
    return [float(sx), 0.0, 0.0, 0.0, float(sy), 0.0]


def _main_series(plan: CasePlan, hu: np.ndarray) -> _Series:
    """The axial series on the plan's grid, one instance per slice of hu [z, y, x]."""
    ox, oy, oz = case_geometry(plan)["origin"]
    dz = plan.direction_signs[2] * plan.slice_thickness
    return _Series(
        number=2,
        uid=_uid(plan, "series", "main"),
        description=f"Pelvis {_ds_number(plan.slice_thickness)} {plan.scanner[2]}",
        image_type=["ORIGINAL", "PRIMARY", "AXIAL"],
        pixels=_stored_pixels(plan, hu),
        positions=[[_ds_number(ox), _ds_number(oy), _ds_number(oz + k * dz)] for k in range(plan.slices)],
        orientation=_axial_orientation(plan),
        pixel_spacing=(plan.pixel_spacing, plan.pixel_spacing),
        thickness=plan.slice_thickness,
        folder="",
    )


def _localizer_series(plan: CasePlan, hu: np.ndarray) -> _Series:
    """A coronal projection of hu [z, y, x] as one topogram, superior at the top, rows upsampled to near-square."""
    upsample = max(1, round(plan.slice_thickness / plan.pixel_spacing), math.ceil(64 / plan.slices))
    projection = (hu.astype(np.float32) + 1000.0).clip(0, None).mean(axis=1) * 2.0  # [z, x]
    projection = np.repeat(projection[::-1], upsample, axis=0)
    low, high = _stored_range(plan)
    top = plan.origin[2] + (plan.slices - 0.5) * plan.slice_thickness
    return _Series(
        number=1,
        uid=_uid(plan, "series", "localizer"),
        description="Topogram 0.6 T20f",
        image_type=["ORIGINAL", "PRIMARY", "LOCALIZER"],
        pixels=np.rint(projection - plan.intercept).clip(low, high).astype(_pixel_dtype(plan))[None],
        positions=[[_ds_number(plan.origin[0]), "0", _ds_number(top)]],
        orientation=[1.0, 0.0, 0.0, 0.0, 0.0, -1.0],
        pixel_spacing=(plan.slice_thickness / upsample, plan.pixel_spacing),
        thickness=0.6,
        folder="",
    )


def _thick_series(plan: CasePlan, hu: np.ndarray) -> _Series:
    """A second axial series averaging pairs of slices of hu [z, y, x] (a trailing odd slice is dropped)."""
    ox, oy, _ = case_geometry(plan)["origin"]
    sz = plan.direction_signs[2]
    dz = sz * plan.slice_thickness
    pairs = plan.slices // 2
    thick = (hu[: 2 * pairs : 2].astype(np.float32) + hu[1 : 2 * pairs : 2]) / 2
    first_pair = 0 if sz > 0 else pairs - 1
    tz = float(_ds_number(plan.origin[2] + (2 * first_pair + 0.5) * plan.slice_thickness))
    return _Series(
        number=3,
        uid=_uid(plan, "series", "thick"),
        description=f"Pelvis {_ds_number(2 * plan.slice_thickness)} {plan.scanner[2]}",
        image_type=["ORIGINAL", "PRIMARY", "AXIAL"],
        pixels=_stored_pixels(plan, np.rint(thick)),
        positions=[[_ds_number(ox), _ds_number(oy), _ds_number(tz + k * 2 * dz)] for k in range(pairs)],
        orientation=_axial_orientation(plan),
        pixel_spacing=(plan.pixel_spacing, plan.pixel_spacing),
        thickness=2 * plan.slice_thickness,
        folder="",
    )


def _place_series(plan: CasePlan, series: list[_Series]) -> None:
    """Folder and file names per layout; the localizer always shares the main series' folder."""
    p = plan.patient
    main = series[0]
    for s in series:
        count = len(s.pixels)
        if plan.layout in ("nested", "dicomdir"):
            number = main.number if s.image_type[-1] == "LOCALIZER" else s.number
            s.folder = f"DICOM/ST000001/SE{number:06d}"
            start = len(main.pixels) if s.image_type[-1] == "LOCALIZER" else 0
            s.names = [f"IM{start + k + 1:06d}" for k in range(count)]
        elif plan.layout == "flat_uid":
            s.folder = f"CT_{p.study_date}_{p.accession}"
            s.names = []
        else:  # deep_nesting
            owner = main if s.image_type[-1] == "LOCALIZER" else s
            s.folder = (
                f"export/{p.dicom_name}/{p.study_date}/{p.accession}/{owner.number:03d}_{owner.description}"
            )
            prefix = "LOC" if s.image_type[-1] == "LOCALIZER" else "IM"
            s.names = [f"{prefix}_{k + 1:04d}.dcm" for k in range(count)]


def _label_description(plan: CasePlan) -> str:
    """An ITK-SNAP label description file naming the label values."""
    lines = [
        "################################################",
        "# ITK-SnAP Label Description File",
        "# File format: ",
        "# IDX   -R-  -G-  -B-  -A--  VIS MSH  LABEL",
        "# Fields: ",
        "#    IDX:   Zero-based index ",
        "#    -R-:   Red color component (0..255)",
        "#    -G-:   Green color component (0..255)",
        "#    -B-:   Blue color component (0..255)",
        "#    -A-:   Label transparency (0.00 .. 1.00)",
        "#    VIS:   Label visibility (0 or 1)",
        "#    IDX:   Label mesh visibility (0 or 1)",
        "#  LABEL:   Label description ",
        "################################################",
    ]
    rows = [(i, *LABEL_COLOURS[i], name) for i, name in enumerate(plan.label_names)]
    if plan.extra_default_labels:
        extra = ((0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255))
        rows += [(i, *extra[i - 3], f"Label {i}") for i in range(3, 7)]
    for i, r, g, b, name in rows:
        alpha, shown = (0, 0) if i == 0 else (1, 1)
        lines.append(f"{i:5d} {r:5d} {g:4d} {b:4d} {alpha:8g} {shown:2d} {shown:2d}    \"{name}\"")
    return "\n".join(lines) + "\n"


def _write_label(plan: CasePlan, label: np.ndarray, root: Path) -> None:
    dtype = np.uint8 if plan.label_dtype == "uint8" else np.uint16
    if plan.label_reoriented:  # same physical grid, stored in LPS-identity order (as other tools write it)
        image = sitk.GetImageFromArray(label.astype(dtype))
        image.SetSpacing((plan.pixel_spacing, plan.pixel_spacing, plan.slice_thickness))
        image.SetOrigin(plan.origin)
    else:
        geometry = case_geometry(plan)
        image = sitk.GetImageFromArray(_to_stored_order(plan, label).astype(dtype))
        image.SetSpacing(geometry["spacing"])
        image.SetOrigin(geometry["origin"])
        image.SetDirection(geometry["direction"])
    if plan.label_notes:
        image.SetMetaData("ITK_FileNotes", plan.label_notes)
    sitk.WriteImage(image, str(root / plan.label_file), useCompression=True)
    if plan.desc_file:
        (root / plan.desc_file).write_text(_label_description(plan), encoding="utf-8")


def _write_dicomdir(plan: CasePlan, files: list[Path], root: Path) -> None:
    """Move the written instances into a DICOMDIR file-set (PT*/ST*/SE*/IM* names)."""
    fileset = FileSet()
    fileset.UID = _uid(plan, "fileset")
    fileset.ID = "SYNTH"
    for path in files:
        fileset.add(path)
    target = root / "CDROM"
    fileset.write(target)
    shutil.rmtree(root / "DICOM")


def write_case(plan: CasePlan, out_dir: Path) -> Path:
    """Render and write one case into ``out_dir / plan.folder`` atomically; returns that folder."""
    out_dir = Path(out_dir)
    final = out_dir / plan.folder
    staging = make_staging_dir(out_dir, ".synth-")
    try:
        hu, label = case_volume(plan)
        base = _patient_dataset(plan)
        files = []
        for series in _case_series(plan, hu):
            files += _write_series(plan, base, series, staging)
        if plan.layout == "dicomdir":
            _write_dicomdir(plan, files, staging)
        _write_label(plan, label, staging)
        os.chmod(staging, 0o755)
        replace_folder(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def write_raw_dataset(
    out_dir: Path,
    cases: int,
    seed: int,
    size: int = 512,
    slices: int | None = None,
    messy: bool = True,
    progress=None,
) -> list[Path]:
    """Write ``cases`` synthetic raw cases under ``out_dir``; returns the case folders in order.

    Folders already there from the same plan are rewritten; any other entry is refused.
    progress: an optional rich Progress, advanced once per case.
    """
    out_dir = Path(out_dir)
    plans = plan_dataset(cases, seed, size=size, slices=slices, messy=messy)
    if problem := creation_problem(out_dir):
        raise OSError(f"output folder {out_dir}: {problem}")
    out_dir.mkdir(parents=True, exist_ok=True)
    expected = {plan.folder for plan in plans}
    set_aside = {previous_path(out_dir / folder).name for folder in expected}
    for entry in out_dir.iterdir():
        if entry.name.startswith(".synth-") or entry.name in set_aside:
            shutil.rmtree(entry, ignore_errors=True)  # left by an interrupted run
        elif entry.name not in expected:
            raise ValueError(f"{out_dir} already holds {entry.name!r}, which this dataset would not write; use an empty folder")
    task = progress.add_task("care-synth", total=len(plans)) if progress is not None else None
    written = []
    for plan in plans:
        written.append(write_case(plan, out_dir))
        if progress is not None:
            progress.advance(task)
    return written


# ---------------------------------------------------------------------------------------------
# Broken cases for converter tests


def _label_path(case_dir: Path) -> Path:
    found = sorted(
        p for p in case_dir.rglob("*")
        if p.is_file() and p.name.lower().endswith(LABEL_SUFFIXES) and ("seg" in p.name.lower() or "label" in p.name.lower())
    )
    if len(found) != 1:
        raise FileNotFoundError(f"{case_dir}: expected one label volume, found {len(found)}")
    return found[0]


def _dicom_series(case_dir: Path) -> dict[str, list[Path]]:
    series: dict[str, list[Path]] = {}
    for path in sorted(p for p in case_dir.rglob("*") if p.is_file() and p.name != "DICOMDIR"):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
        except (pydicom.errors.InvalidDicomError, OSError):
            continue
        if "SeriesInstanceUID" in ds:
            series.setdefault(str(ds.SeriesInstanceUID), []).append(path)
    return series


def _rewrite_label(path: Path, edit) -> None:
    image = sitk.ReadImage(str(path))
    array = edit(sitk.GetArrayFromImage(image))
    out = sitk.GetImageFromArray(array)
    out.SetSpacing(image.GetSpacing())
    out.SetOrigin(image.GetOrigin())
    out.SetDirection(image.GetDirection())
    with atomic_file(path) as tmp:
        sitk.WriteImage(out, str(tmp), useCompression=True)


def _without_top_slice(label: np.ndarray) -> np.ndarray:
    """label [z, y, x] less its last slice, so it no longer matches the image grid."""
    return np.ascontiguousarray(label[:-1])


def _with_unknown_label_value(label: np.ndarray) -> np.ndarray:
    """A copy of label [z, y, x] whose lowest labelled slice has its labels set to 7, a value no plan uses."""
    label = label.copy()
    k = int(np.flatnonzero(label.any(axis=(1, 2)))[0])
    label[k][label[k] > 0] = 7
    return label


def corrupt_case(case_dir: Path, kind: str) -> None:
    """Damage a written case in place so that converting it must fail for the reason ``kind``.

    kind: one of CORRUPTIONS.
    """
    case_dir = Path(case_dir)
    if kind == "truncated_dicom":
        main = max(_dicom_series(case_dir).values(), key=len)
        victim = main[len(main) // 2]
        data = victim.read_bytes()
        with atomic_file(victim) as tmp:
            tmp.write_bytes(data[: int(len(data) * 0.6)])
    elif kind == "no_label":
        _label_path(case_dir).unlink()
    elif kind == "mismatched_grid":
        _rewrite_label(_label_path(case_dir), _without_top_slice)
    elif kind == "empty_label":
        _rewrite_label(_label_path(case_dir), np.zeros_like)
    elif kind == "unknown_label_value":
        _rewrite_label(_label_path(case_dir), _with_unknown_label_value)
    elif kind == "non_ct_modality":
        for paths in _dicom_series(case_dir).values():
            for path in paths:
                ds = pydicom.dcmread(path)
                ds.Modality = "MR"
                ds.SOPClassUID = MRImageStorage
                ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
                with atomic_file(path) as tmp:
                    ds.save_as(tmp, enforce_file_format=True)
    else:
        raise ValueError(f"unknown corruption {kind!r}; choose one of {', '.join(CORRUPTIONS)}")
