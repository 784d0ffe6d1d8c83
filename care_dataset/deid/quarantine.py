"""Which DICOM instances may carry burned-in text: care-anonymize leaves them out unless --allow-burned-in.

Neither the Annex E profile nor this tool reads text in the pixels, so an instance is left out (quarantined,
as RSNA CTP's filter stage does with objects) when any of these holds, checked on its header alone:

1. **BurnedInAnnotation (0028,0301) is YES.**
2. **Its SOP class captures screens, photographs or slides**: the Secondary Capture classes (Secondary Capture
   Image Storage and its multi-frame single bit, grayscale byte, grayscale word and true colour variants) and
   the visible light classes (1.2.840.10008.5.1.4.1.1.77.1.*: photographs, video, endoscopy, microscopy, whole
   slide images, whose labels show the patient's name). The flag of rule 1 is set by the device and is often
   NO or absent on dose screens and patient information pages, so these classes go whatever it says.
3. **Its ImageType (0008,0008) names a screen or report**: a value holding SCREEN (SCREEN SAVE, SCREENSHOT,
   SCREEN CAPTURE, ...), or one of DOSE INFO, DOSE REPORT, DOSE SCREEN, PATIENT INFO, PATIENT PROTOCOL
   (spaces, underscores and hyphens alike, any case), in any position.
4. **Its ImageType's second value is SECONDARY** (made after the examination: screens, reports, annotated
   key images), **except** a grayscale image of a cross-sectional class (CT, MR, PET and their enhanced and
   legacy-converted forms) placed in the patient (Image Position and Orientation, or per-frame functional
   groups): workstation reformats (DERIVED\\SECONDARY\\AXIAL, REFORMATTED, MPR) are kept.
5. **Its pixels are in colour** (PhotometricInterpretation RGB, YBR_*, PALETTE COLOR, ... or more than one
   sample per pixel): no CT scanner stores its slices in colour; colour images in a CT export are screens,
   rendered views and photographs.

Only instances with pixel data (or of the classes of rule 2) are checked: a structured report or a presentation
state has no pixels to hold text, and its headers are cleaned by the profile like any other.

`quarantine_reasons` returns the rules an instance meets as fixed words (never a value from the file), and
`instance_class` the words the report uses for its kind: the SOP class name from the DICOM dictionary ("private
SOP class" otherwise) and the ImageType class (the screen term of rule 3, else PRIMARY or SECONDARY).
"""
from __future__ import annotations

import re

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID

BURNED_IN = "BurnedInAnnotation YES"
SCREEN_CAPTURE_CLASS = "screen-capture SOP class"
SCREEN_IMAGE_TYPE = "ImageType names a screen or report"
SECONDARY_IMAGE_TYPE = "ImageType SECONDARY"
COLOUR = "colour pixels"

SECONDARY_CAPTURE_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
    "1.2.840.10008.5.1.4.1.1.7.1",  # Multi-frame Single Bit Secondary Capture Image Storage
    "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte Secondary Capture Image Storage
    "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word Secondary Capture Image Storage
    "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame True Color Secondary Capture Image Storage
})
VISIBLE_LIGHT_PREFIX = "1.2.840.10008.5.1.4.1.1.77.1"
CROSS_SECTIONAL_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.2",  # Legacy Converted Enhanced CT Image Storage
    "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
    "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR Image Storage
    "1.2.840.10008.5.1.4.1.1.4.4",  # Legacy Converted Enhanced MR Image Storage
    "1.2.840.10008.5.1.4.1.1.128",  # Positron Emission Tomography Image Storage
    "1.2.840.10008.5.1.4.1.1.128.1",  # Legacy Converted Enhanced PET Image Storage
    "1.2.840.10008.5.1.4.1.1.130",  # Enhanced PET Image Storage
})
# ImageType terms of screens and reports, after `_term` (upper case; spaces, underscores, hyphens as "_")
SCREEN_TERMS = frozenset({"DOSE_INFO", "DOSE_REPORT", "DOSE_SCREEN", "PATIENT_INFO", "PATIENT_PROTOCOL"})
GRAYSCALE = frozenset({"MONOCHROME1", "MONOCHROME2"})
PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)


def _term(value: object) -> str:
    return re.sub(r"[\s_\-]+", "_", str(value).strip().upper())


def _image_type(ds: Dataset) -> list[str]:
    try:
        value = ds.get("ImageType")
    except Exception:  # noqa: BLE001 - an undecodable value says nothing
        return []
    if value is None or value == "":
        return []
    values = list(value) if isinstance(value, (list, tuple, MultiValue)) else str(value).split("\\")
    return [_term(v) for v in values]


def _screen_term(image_type: list[str]) -> str | None:
    for value in image_type:
        if "SCREEN" in value:
            return value if value in ("SCREEN", "SCREEN_SAVE", "SCREENSAVE", "SCREENSHOT", "SCREEN_CAPTURE",
                                      "SCREEN_SHOT") else "SCREEN"
        if value in SCREEN_TERMS:
            return value
    return None


def _text(ds: Dataset, keyword: str) -> str:
    try:
        return str(ds.get(keyword, "") or "").strip().upper()
    except Exception:  # noqa: BLE001 - an undecodable value says nothing
        return ""


def sop_class_uid(ds: Dataset) -> str:
    """The SOP Class UID of the data set, else that of its file meta, else ''."""
    value = _text(ds, "SOPClassUID")
    meta = getattr(ds, "file_meta", None)
    if not value and meta is not None:
        value = _text(meta, "MediaStorageSOPClassUID")
    return value


def sop_class_name(uid: str) -> str:
    """The SOP class's name in the DICOM dictionary; "private SOP class" or "unknown SOP class" otherwise."""
    if not uid:
        return "no SOP class"
    name = UID(uid).name
    if name and name != uid:
        return name
    return "private SOP class" if not uid.startswith("1.2.840.10008.") else "unknown SOP class"


def has_pixels(ds: Dataset) -> bool:
    return any(tag in ds for tag in PIXEL_TAGS)


def is_colour(ds: Dataset) -> bool:
    photometric = _text(ds, "PhotometricInterpretation")
    try:
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
    except (TypeError, ValueError):
        samples = 1
    return samples > 1 or (photometric != "" and photometric not in GRAYSCALE)


def _placed_in_patient(ds: Dataset) -> bool:
    if "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds:
        return True
    return "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds


def quarantine_reasons(ds: Dataset, pixels: bool | None = None) -> list[str]:
    """The rules (module docstring) the instance meets, as fixed words; [] when it may be copied.

    `pixels` says whether it holds pixel data (default: whether a pixel data element is in `ds`; pass it
    for a header read that stopped before the pixels)."""
    uid = sop_class_uid(ds)
    capture_class = uid in SECONDARY_CAPTURE_CLASSES or uid.startswith(VISIBLE_LIGHT_PREFIX)
    if pixels is None:
        pixels = has_pixels(ds)
    if not pixels and not capture_class:
        return []
    reasons = []
    if _text(ds, "BurnedInAnnotation") == "YES":
        reasons.append(BURNED_IN)
    if capture_class:
        reasons.append(SCREEN_CAPTURE_CLASS)
    image_type = _image_type(ds)
    if _screen_term(image_type):
        reasons.append(SCREEN_IMAGE_TYPE)
    colour = is_colour(ds)
    if len(image_type) > 1 and image_type[1] == "SECONDARY" and not (
            uid in CROSS_SECTIONAL_CLASSES and not colour and _placed_in_patient(ds)):
        reasons.append(SECONDARY_IMAGE_TYPE)
    if colour:
        reasons.append(COLOUR)
    return reasons


def instance_class(ds: Dataset) -> tuple[str, str]:
    """(SOP class name, ImageType class) for the report: words from the DICOM dictionary and the rules above,
    never a value copied from the file. The ImageType class is the screen term of rule 3, else the second
    value when it is PRIMARY or SECONDARY, else "other" ("none" without ImageType)."""
    image_type = _image_type(ds)
    term = _screen_term(image_type)
    if term is None:
        if len(image_type) > 1 and image_type[1] in ("PRIMARY", "SECONDARY"):
            term = image_type[1]
        else:
            term = "other" if image_type else "none"
    return sop_class_name(sop_class_uid(ds)), term
