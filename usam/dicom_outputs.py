"""`usam predict --out-format seg | rtstruct`: the prediction as a DICOM object derived from the series it segments.

Both objects reference the source series' instances (a viewer overlays them on it) and copy its patient and study
attributes, as every DICOM derived object does: they identify the patient as the input series does. Each class
of the checkpoint's label map, background aside, is one segment (SEG) or one ROI (RT Structure Set), numbered by
its label value and coded in SNOMED CT (``structure_coding``); a class the model predicted nowhere is kept, empty,
so the numbers stay the label values and a prediction without foreground is still a valid object.

- SEG: highdicom's ``Segmentation``, BINARY, one frame per segment and slice holding it.
- RT Structure Set: built here with pydicom on highdicom's ``SOPClass`` (which copies the patient and study),
  contours from scikit-image's ``measure.find_contours``. rt-utils is not used: it reads the series again from a
  folder path, cannot reference frames of a multi-frame image, writes no coded structure or algorithm
  identification, and pulls in OpenCV.

Contours: every boundary of a class on a slice is one CLOSED_PLANAR contour midway between inside and outside
pixel centres (the 0.5 iso-line of the mask), in patient coordinates (mm) from that slice's ImagePositionPatient,
ImageOrientationPatient and PixelSpacing. A hole is its own contour lying inside the contour around it, read by the
even-odd rule; the keyhole technique is not used.
"""

from __future__ import annotations

import datetime
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.tag import Tag
from pydicom.uid import ImplicitVRLittleEndian, RTStructureSetStorage
from skimage import measure

from care_dataset.error_text import error_line
from care_dataset.raw.dicom import DicomSeries
from care_dataset.raw.multiframe import FrameHeader
from care_dataset.version import __version__
from usam.inference import InputError
from usam.outputs import DICOM_FORMATS, LABEL_COLORS

MANUFACTURER = "CARE/U-SAM"
MODEL_NAME = "usam predict"
SERIES_NUMBERS = {"seg": 9001, "rtstruct": 9002}  # fixed, high: clear of a scanner's own series numbers
RT_STUDY_COMPONENT = "1.2.840.10008.3.1.2.3.1"  # the SOP class an RT Structure Set's study reference names
NOT_COPIED = frozenset(Tag(k) for k in ("PixelData", "SpecificCharacterSet"))
TUMOUR_WORDS = ("tumor", "tumour", "cancer", "carcinoma", "neoplasm", "lesion")
RECTUM_WORDS = ("rectum", "rectal")


# ---------------------------------------------------------------- what each class is


@dataclass(frozen=True)
class StructureCoding:
    """How a class is coded: segmented property category and type (SNOMED CT), the anatomic region it lies in,
    and its RT ROI Interpreted Type."""

    category: Code
    property_type: Code
    region: Code | None
    rt_type: str


RECTUM = StructureCoding(codes.SCT.AnatomicalStructure, codes.SCT.Rectum, None, "ORGAN")
RECTAL_TUMOUR = StructureCoding(codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Neoplasm, codes.SCT.Rectum,
                                "GTV")
OTHER_TISSUE = StructureCoding(codes.SCT.Tissue, codes.SCT.Tissue, None, "")


def structure_coding(class_name: str) -> StructureCoding:
    """A tumour word in the name (tumor, cancer, lesion, ...) -> rectal neoplasm; else rectum or rectal ->
    rectum; anything else -> tissue."""
    name = class_name.lower()
    if any(word in name for word in TUMOUR_WORDS):
        return RECTAL_TUMOUR
    if any(word in name for word in RECTUM_WORDS):
        return RECTUM
    return OTHER_TISSUE


@dataclass(frozen=True)
class Provenance:
    """Which model made the prediction: its registry name, a short hash of its checkpoint, and whether clicks
    guided it."""

    model_name: str
    version: str
    prompted: bool

    @property
    def algorithm_type(self) -> str:
        return "SEMIAUTOMATIC" if self.prompted else "AUTOMATIC"

    def algorithm(self) -> hd.AlgorithmIdentificationSequence:
        return hd.AlgorithmIdentificationSequence(name=self.model_name, version=self.version, source=MODEL_NAME,
                                                  family=codes.cid7162.ArtificialIntelligence)


# ---------------------------------------------------------------- the source series


@dataclass(frozen=True)
class SourceSeries:
    """The DICOM images a prediction derives from.

    ``images``: highdicom's source images (the single-frame images in slice order, or the one multi-frame image),
    headers only. ``slices``: per slice of the label volume (the series' order along the slice normal), the header
    holding that slice's geometry and SOP instance. ``frame_numbers``: per slice, its 1-based frame in the
    multi-frame image; None for single-frame images.
    """

    images: list[pydicom.Dataset]
    slices: list[pydicom.Dataset]
    frame_numbers: list[int] | None


def source_series(series: DicomSeries) -> SourceSeries:
    """The images `series` was read from; InputError when a multi-frame series is not one whole file."""
    if not isinstance(series.header, FrameHeader):
        return SourceSeries([header_copy(h) for h in series.headers], list(series.headers), None)
    files = {header.source_path for header in series.headers}
    try:
        image = pydicom.dcmread(next(iter(files)), stop_before_pixels=True) if len(files) == 1 else None
    except (OSError, InvalidDicomError) as error:
        raise InputError(f"cannot read the multi-frame image again ({error_line(error, last=True)})") from None
    if image is None or int(image.get("NumberOfFrames", 0) or 0) != len(series.headers):
        raise InputError("a multi-frame series split over several files or with frames set aside is not supported "
                         "(only a multi-frame series that is one whole file); use --out-format nifti")
    return SourceSeries([header_copy(image)], list(series.headers), [h.frame_index + 1 for h in series.headers])


def header_copy(ds: pydicom.Dataset) -> pydicom.Dataset:
    """A copy of `ds` (file meta included) without its pixel data and without an empty SpecificCharacterSet
    (empty means the default repertoire, which highdicom wants left out)."""
    copy = pydicom.Dataset({tag: ds.get_item(tag, keep_deferred=True) for tag in ds.keys() if tag not in NOT_COPIED})
    if ds.get("SpecificCharacterSet"):
        copy.SpecificCharacterSet = ds.SpecificCharacterSet
    if getattr(ds, "file_meta", None) is not None:
        copy.file_meta = ds.file_meta
    return copy


# ---------------------------------------------------------------- DICOM SEG


def build_segmentation(source: SourceSeries, labels: np.ndarray, class_names: Sequence[str],
                       provenance: Provenance) -> hd.seg.Segmentation:
    """A BINARY Segmentation of `labels` (slices, rows, columns) uint8 in the order of ``source.slices``: segment
    c is class c (1 .. len(class_names) - 1)."""
    descriptions = [segment_description(c, name, provenance) for c, name in enumerate(class_names) if c]
    frames = labels
    if source.frame_numbers is not None:  # highdicom pairs frame i with the multi-frame image's frame i
        frames = np.empty_like(labels)
        frames[np.asarray(source.frame_numbers) - 1] = labels
    return hd.seg.Segmentation(
        source_images=source.images, pixel_array=frames, segmentation_type="BINARY",
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=SERIES_NUMBERS["seg"],
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer=MANUFACTURER,
        manufacturer_model_name=MODEL_NAME, software_versions=__version__, device_serial_number=provenance.version,
        content_label="USAM_PREDICTION", content_description=f"{provenance.model_name} prediction",
        series_description=f"{provenance.model_name} prediction (SEG)",
    )


def segment_description(value: int, name: str, provenance: Provenance) -> hd.seg.SegmentDescription:
    """Segment `value`, labelled with the class name, coded by ``structure_coding``, coloured as ITK-SNAP shows it."""
    coding = structure_coding(name)
    return hd.seg.SegmentDescription(
        segment_number=value, segment_label=name[:64], segmented_property_category=coding.category,
        segmented_property_type=coding.property_type, algorithm_type=provenance.algorithm_type,
        algorithm_identification=provenance.algorithm(),
        anatomic_regions=[coding.region] if coding.region is not None else None,
        display_color=hd.color.CIELabColor.from_rgb(*class_color(value)),
    )


def class_color(value: int) -> tuple[int, int, int]:
    """The RGB colour of class `value` in the label description file usam predict writes."""
    return LABEL_COLORS[(value - 1) % len(LABEL_COLORS)]


# ---------------------------------------------------------------- contours


def slice_contours(mask: np.ndarray) -> list[np.ndarray]:
    """(rows, columns) bool -> every boundary as a closed polygon (N, 2) of (row, column) pixel positions, first
    point not repeated, points on a straight run dropped: outer boundaries and hole boundaries alike."""
    padded = np.pad(mask.astype(np.float32), 1)  # every boundary closes, also along the image's edge
    polygons = (corners(contour[:-1] - 1.0) for contour in measure.find_contours(padded, 0.5))
    return [polygon for polygon in polygons if len(polygon) >= 3]


def corners(ring: np.ndarray) -> np.ndarray:
    """The points of the closed polygon `ring` (N, 2) where it turns (those between collinear neighbours dropped)."""
    before, after = np.roll(ring, 1, axis=0), np.roll(ring, -1, axis=0)
    incoming, outgoing = ring - before, after - ring
    turn = incoming[:, 0] * outgoing[:, 1] - incoming[:, 1] * outgoing[:, 0]
    return ring[np.abs(turn) > 1e-9]


def patient_points(points: np.ndarray, header: pydicom.Dataset) -> np.ndarray:
    """(N, 2) (row, column) pixel positions of the image `header` describes -> (N, 3) patient coordinates (mm,
    LPS) from its ImagePositionPatient, ImageOrientationPatient and PixelSpacing."""
    position = np.array([float(v) for v in header.ImagePositionPatient])
    cosines = np.array([float(v) for v in header.ImageOrientationPatient]).reshape(2, 3)
    cosines /= np.linalg.norm(cosines, axis=1, keepdims=True)
    row_spacing, column_spacing = (float(v) for v in header.PixelSpacing)
    return (position + np.outer(points[:, 1] * column_spacing, cosines[0])
            + np.outer(points[:, 0] * row_spacing, cosines[1]))


def contour_data(points: np.ndarray) -> list[float]:
    """(N, 3) mm -> the flat Contour Data values, to the micrometre (each well within the 16 characters of DS)."""
    return np.round(points, 3).reshape(-1).tolist()


# ---------------------------------------------------------------- RT Structure Set


def build_rtstruct(source: SourceSeries, labels: np.ndarray, class_names: Sequence[str],
                   provenance: Provenance) -> hd.SOPClass:
    """An RT Structure Set of `labels` (slices, rows, columns) uint8 in the order of ``source.slices``: ROI c is
    class c (1 .. len(class_names) - 1), one CLOSED_PLANAR contour per boundary per slice."""
    ds = rtstruct_header(source, provenance)
    frame_of_reference = source.images[0].FrameOfReferenceUID
    classes = range(1, len(class_names))
    ds.StructureSetROISequence = [roi_item(c, class_names[c], frame_of_reference, provenance) for c in classes]
    ds.ROIContourSequence = [roi_contour_item(c, labels == c, source) for c in classes]
    ds.RTROIObservationsSequence = [observation_item(c, class_names[c]) for c in classes]
    ds.ApprovalStatus = "UNAPPROVED"
    return ds


def rtstruct_header(source: SourceSeries, provenance: Provenance) -> hd.SOPClass:
    """An RT Structure Set without ROIs: new series and instance, the source's patient, study and frame of
    reference, the structure set's label, name and time, and what it references."""
    first = source.images[0]
    ds = hd.SOPClass(
        study_instance_uid=first.StudyInstanceUID, series_instance_uid=hd.UID(),
        series_number=SERIES_NUMBERS["rtstruct"], sop_instance_uid=hd.UID(), sop_class_uid=RTStructureSetStorage,
        instance_number=1, modality="RTSTRUCT", manufacturer=MANUFACTURER, transfer_syntax_uid=ImplicitVRLittleEndian,
        manufacturer_model_name=MODEL_NAME, software_versions=__version__, device_serial_number=provenance.version,
        series_description=f"{provenance.model_name} prediction (RTSTRUCT)",
        specific_character_set=first.get("SpecificCharacterSet") or None,
    )
    ds.copy_patient_and_study_information(first)
    ds.OperatorsName = ""
    ds.FrameOfReferenceUID = first.FrameOfReferenceUID
    ds.PositionReferenceIndicator = first.get("PositionReferenceIndicator", "")
    now = datetime.datetime.now()
    ds.StructureSetLabel = "USAM"
    ds.StructureSetName = f"{provenance.model_name} prediction"[:64]
    ds.StructureSetDate, ds.StructureSetTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.ReferencedFrameOfReferenceSequence = [referenced_frame_of_reference(source)]
    return ds


def image_reference(source: SourceSeries, k: int) -> pydicom.Dataset:
    """The Image SOP Instance Reference of slice `k`: its SOP class and instance (and frame, of a multi-frame)."""
    item = pydicom.Dataset()
    item.ReferencedSOPClassUID = source.slices[k].SOPClassUID
    item.ReferencedSOPInstanceUID = source.slices[k].SOPInstanceUID
    if source.frame_numbers is not None:
        item.ReferencedFrameNumber = source.frame_numbers[k]
    return item


def referenced_frame_of_reference(source: SourceSeries) -> pydicom.Dataset:
    """The source's frame of reference, study, series and every image of the series."""
    first = source.images[0]
    series = pydicom.Dataset()
    series.SeriesInstanceUID = first.SeriesInstanceUID
    series.ContourImageSequence = [image_reference(source, k) for k in range(len(source.slices))]
    study = pydicom.Dataset()
    study.ReferencedSOPClassUID = RT_STUDY_COMPONENT
    study.ReferencedSOPInstanceUID = first.StudyInstanceUID
    study.RTReferencedSeriesSequence = [series]
    item = pydicom.Dataset()
    item.FrameOfReferenceUID = first.FrameOfReferenceUID
    item.RTReferencedStudySequence = [study]
    return item


def roi_item(value: int, name: str, frame_of_reference: str, provenance: Provenance) -> pydicom.Dataset:
    """Structure Set ROI `value`: its name, frame of reference and the algorithm that drew it."""
    item = pydicom.Dataset()
    item.ROINumber = value
    item.ReferencedFrameOfReferenceUID = frame_of_reference
    item.ROIName = name[:64]
    item.ROIGenerationAlgorithm = provenance.algorithm_type
    item.ROIDerivationAlgorithmIdentificationSequence = provenance.algorithm()
    return item


def roi_contour_item(value: int, mask: np.ndarray, source: SourceSeries) -> pydicom.Dataset:
    """ROI `value`'s colour and contours: `mask` (slices, rows, columns) bool; no Contour Sequence when empty."""
    item = pydicom.Dataset()
    item.ReferencedROINumber = value
    item.ROIDisplayColor = list(class_color(value))
    contours = [contour_item(polygon, source, k) for k in np.flatnonzero(mask.any(axis=(1, 2)))
                for polygon in slice_contours(mask[k])]
    for number, contour in enumerate(contours, start=1):
        contour.ContourNumber = number
    if contours:
        item.ContourSequence = contours
    return item


def contour_item(polygon: np.ndarray, source: SourceSeries, k: int) -> pydicom.Dataset:
    """One CLOSED_PLANAR contour of slice `k`, referencing its image."""
    item = pydicom.Dataset()
    item.ContourImageSequence = [image_reference(source, k)]
    item.ContourGeometricType = "CLOSED_PLANAR"
    item.NumberOfContourPoints = len(polygon)
    item.ContourData = contour_data(patient_points(polygon, source.slices[k]))
    return item


def observation_item(value: int, name: str) -> pydicom.Dataset:
    """RT ROI Observation of ROI `value`: its interpreted type and its coded category and type."""
    coding = structure_coding(name)
    item = pydicom.Dataset()
    item.ObservationNumber = value
    item.ReferencedROINumber = value
    item.RTROIInterpretedType = coding.rt_type
    item.ROIInterpreter = ""
    item.RTROIIdentificationCodeSequence = [hd.sr.CodedConcept.from_code(coding.property_type)]
    item.SegmentedPropertyCategoryCodeSequence = [hd.sr.CodedConcept.from_code(coding.category)]
    return item


# ---------------------------------------------------------------- either


def derived_object(out_format: str, source: SourceSeries, labels: np.ndarray, class_names: Sequence[str],
                   provenance: Provenance) -> pydicom.Dataset:
    """The --out-format's DICOM object of `labels` (slices, rows, columns) uint8 in ``source.slices`` order.

    InputError, one line, when the source's headers do not allow it (highdicom names what is wrong).
    """
    build = build_segmentation if out_format == "seg" else build_rtstruct
    highdicom_log = logging.getLogger("highdicom")
    level = highdicom_log.level
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # highdicom's remarks on the source's own values
            highdicom_log.setLevel(logging.ERROR)  # and its notes, e.g. that it encodes an all-empty SEG's frames
            return build(source, labels, class_names, provenance)
    except (ValueError, TypeError, AttributeError, KeyError) as error:
        raise InputError(f"cannot build a {DICOM_FORMATS[out_format]} from this series "
                         f"({error_line(error, last=True)})") from None
    finally:
        highdicom_log.setLevel(level)

