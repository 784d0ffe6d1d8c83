"""DICOM de-identification (PS3.15 Annex E Basic Profile + Modified Dates Option).

Case IDs, remapped UIDs and the per-patient date offset all come from the secret key through
:mod:`care_dataset.deid.pseudonyms`.

`care-anonymize raw/ anon/` writes anon/<case_id>/<series>/<instance>.dcm (three- and five-digit
indices ordered by SeriesNumber and InstanceNumber, then new UID). The case ID is care-convert's:
the patient pseudonym, "-", and the keyed suffix of the raw case folder, so two studies of one
patient get two folders. Only DICOM files are copied: volume files, label description files and
other non-DICOM files are not. Pixel data is copied byte for byte in its original transfer syntax.

Instances that may carry burned-in text (:mod:`care_dataset.deid.quarantine`: BurnedInAnnotation YES, screen
captures, screen and report ImageTypes, colour images) are left out unless `allow_burned_in`, and counted per
case by SOP class name and ImageType class; a case left with no image is skipped.

Beyond Table E.1-1: free text (LT, ST, UT) that the table would keep gets a dummy value at any
depth, and every overlay group (60xx) is removed whole: the table removes its Overlay Data and
Comments, and the rest of the group would describe an overlay that is not there.
Each case folder holds `.fingerprint`, a keyed hash of the raw case's files and of these rules; a
rerun rebuilds a case whose fingerprint differs and keeps the others.

Header quirks of real exports are worked around and noted (:mod:`care_dataset.deid.notes`), never fatal:
SOP Class and Instance UID only in the file meta (copied into the data set), no file meta or no preamble (built
from the data set, transfer syntax from its encoding), a file meta without transfer syntax, an unknown transfer
syntax over uncompressed pixels (written in the encoding read), two files of one SOP Instance UID (the same
image once; different images each get their own new UID), empty or malformed dates (emptied), private
sequences of undefined length and damaged private elements (removed unread). A file that cannot be copied
faithfully (truncated, no pixel description, pixels lost behind a damaged element, compressed pixels in an
unknown syntax) fails its case with a reason that says what to do; library warnings become notes.
"""
from __future__ import annotations

import contextlib
import copy
import datetime as dt
import hashlib
import hmac
import json
import os
import re
import shutil
import sys
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.datadict import dictionary_has_tag, repeater_has_tag
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import UID, UID_dictionary, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from care_dataset.deid.annex_e import AnnexETable, load_basic_profile
from care_dataset.deid.notes import CaseNotes, quiet_library_loggers
from care_dataset.deid.pseudonyms import (case_id_for, date_offset_days, key_problem, make_case_id, patient_identity,
                                          remap_uid)
from care_dataset.deid.quarantine import (has_pixels, instance_class, quarantine_reasons, sop_class_name,
                                          sop_class_uid)
from care_dataset.files import (atomic_file, creation_problem, hold_output_lock, make_staging_dir, previous_path,
                                replace_folder)
from care_dataset.raw.discover import RawCase, drop_linked_cases, raw_fingerprint
from care_dataset.version import __version__

PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)
FREE_TEXT_VRS = frozenset({"LT", "ST", "UT"})
TEXT_VALUE_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"})
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # C0, DEL and C1: in no DICOM character repertoire
ESCAPE_ONLY = {0x1B: None}  # ISO 2022 character set switches
FREE_TEXT_CONTROLS = {0x1B: None, 0x09: None, 0x0A: None, 0x0C: None, 0x0D: None}
_TIME = r"\d{2}(?::?\d{2}(?::?\d{2}(?:\.\d{1,6})?)?)?"
_DATE_TIME = r"\d{4}(?:\d{2}(?:\d{2}(?:\d{2}(?:\d{2}(?:\d{2}(?:\.\d{1,6})?)?)?)?)?)?(?:[+-]\d{4})?"
_DAY = r"(?:\d{8}|\d{4}[-./]\d{2}[-./]\d{2}|\d{4}|\d{6})"  # what shift_date reads, and partial dates
VALUE_FORMS = {
    "AS": re.compile(r"\d{3}[DWMY]"),
    "DA": re.compile(f"{_DAY}?(?:-{_DAY}?)?"),
    "DT": re.compile(f"(?:{_DATE_TIME})?(?:-(?:{_DATE_TIME})?)?"),
    "TM": re.compile(f"(?:{_TIME})?(?:-(?:{_TIME})?)?"),
    "UI": re.compile(r"[0-9]+(?:\.[0-9]+)*"),
}
FINGERPRINT_NAME = ".fingerprint"
PARTIAL_PREFIX = ".partial-"
REPLACED_PREFIX = ".replaced-"
RULES_VERSION = "4"  # raise when a change of the rules below must rebuild existing cases
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
NON_DICOM_SUFFIXES = (
    ".nii", ".nii.gz", ".mha", ".mhd", ".raw", ".nrrd", ".nhdr", ".txt", ".json", ".csv", ".md",
    ".png", ".jpg", ".jpeg", ".xml", ".zip", ".gz", ".toml", ".yaml", ".yml", ".pdf",
    # what file managers and viewers leave beside an export
    ".db", ".ini", ".ds_store", ".lnk", ".htm", ".html", ".exe", ".dll", ".inf", ".log", ".bmp", ".gif",
    ".tif", ".tiff", ".doc", ".docx", ".xls", ".xlsx",
)
DEFER_BYTES = 4096  # the scan of a case reads values longer than this only when asked (pixel data, blobs)
METHOD_TEXT = (
    "DICOM PS3.15 Annex E Basic Profile (Table E.1-1, {edition})",
    "Retain Longitudinal Temporal Info with Modified Dates",
    f"care-usam {__version__}",
)
METHOD_CODES = (
    ("113100", "Basic Application Confidentiality Profile"),
    ("113106", "Retain Longitudinal Temporal Information Modified Dates Option"),
)
DUMMY_TEXT = "ANONYMIZED"
DUMMY_BY_VR: dict[str, object] = {
    "AE": DUMMY_TEXT, "AS": "000Y", "CS": DUMMY_TEXT, "DA": "19000101", "DT": "19000101000000",
    "TM": "000000", "DS": "0", "IS": "0", "LO": DUMMY_TEXT, "LT": DUMMY_TEXT, "PN": DUMMY_TEXT,
    "SH": DUMMY_TEXT, "ST": DUMMY_TEXT, "UC": DUMMY_TEXT, "UT": DUMMY_TEXT, "UR": "urn:anonymized",
    "US": 0, "SS": 0, "UL": 0, "SL": 0, "UV": 0, "SV": 0, "FL": 0.0, "FD": 0.0, "AT": 0,
    "OB": b"\x00\x00", "OW": b"\x00\x00", "UN": b"\x00\x00", "OF": b"\x00" * 4, "OL": b"\x00" * 4,
    "OD": b"\x00" * 8, "OV": b"\x00" * 8,
}


class DeidError(Exception):
    """A case cannot be de-identified; the message is one sentence without identifying values that says what
    to do. `path` is the raw file it concerns, if one: for the operator's terminal only."""

    def __init__(self, message: str, path: Path | None = None):
        super().__init__(message)
        self.path = path


class BurnedInAnnotationError(DeidError):
    """Pixel data flagged BurnedInAnnotation = YES and the user did not allow it."""


# --- dates -----------------------------------------------------------------------------------

_DATE = re.compile(r"(\d{4})[-./]?(\d{2})[-./]?(\d{2})")


def shift_date(value: str, days: int) -> str:
    """Shift a DA value (YYYYMMDD, or a YYYYMMDD-YYYYMMDD range; YYYY.MM.DD and YYYY-MM-DD are read too and
    written as YYYYMMDD); an empty, partial or impossible date becomes ''."""
    value = value.strip()
    found = _DATE.fullmatch(value)
    if found:
        try:
            day = dt.date(*(int(part) for part in found.groups()))
            return (day + dt.timedelta(days=days)).strftime("%Y%m%d")
        except (ValueError, OverflowError):
            return ""
    if value.count("-") == 1:
        start, end = (shift_date(part, days) if part.strip() else "" for part in value.split("-"))
        return f"{start}-{end}" if start or end else ""
    return ""


def shift_datetime(value: str, days: int) -> str:
    """Shift the date part of a DT value; the time of day and UTC offset are kept."""
    value = value.strip()
    n_digits = len(value) - len(value.lstrip("0123456789"))
    if n_digits >= 8:
        shifted = shift_date(value[:8], days)
        return shifted + value[8:] if shifted else ""
    if n_digits in (4, 6):
        padded = value[:n_digits] + "0101"[n_digits - 4:]
        shifted = shift_date(padded, days)
        return shifted[:n_digits] + value[n_digits:] if shifted else ""
    return ""


# --- one dataset -----------------------------------------------------------------------------

@dataclass
class DeidContext:
    """Everything needed to de-identify the datasets of one patient."""

    key: bytes
    identity: str
    prefix: str = "care"
    allow_burned_in: bool = False
    table: AnnexETable = field(default_factory=load_basic_profile)
    notes: CaseNotes | None = None  # where what was worked around is noted, if anywhere

    def __post_init__(self) -> None:
        self.case_id = make_case_id(self.identity, self.key, self.prefix)
        self.date_offset_days = date_offset_days(self.key, self.identity)
        self._uids: dict[str, str] = {}

    def uid(self, uid: str) -> str:
        if uid not in self._uids:
            self._uids[uid] = remap_uid(uid, self.key)
        return self._uids[uid]


def _values(value: object) -> list:
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple, MultiValue)):
        return list(value)
    return [value]


def _set_values(elem, values: list[str]) -> None:
    elem.value = values[0] if len(values) == 1 else ("" if not values else values)


def is_overlay_group(group: int) -> bool:
    """Whether a group number is one of the repeating overlay groups 6000-60FF (even)."""
    return 0x6000 <= group <= 0x60FF and group % 2 == 0


def element_action(table: AnnexETable, tag: int, vr: str) -> str:
    """The table's action, except that free text the table would keep gets a dummy value, a public tag that
    DICOM does not define (a damaged tag number, or a vendor's misuse) is removed, and a UID the table would
    keep is replaced unless it is one DICOM defines (see `_keep_or_replace_uids`)."""
    if not (dictionary_has_tag(tag) or repeater_has_tag(tag)):
        return "X"
    action = table.action(tag, vr)
    if action == "K" and vr in FREE_TEXT_VRS:
        return "D"
    return "KEEP_STANDARD_UIDS" if action == "K" and vr == "UI" else action


def is_damaged_value(text: str, vr: str) -> bool:
    """Whether one decoded text value breaks its value representation: control characters, or not the form
    of AS, DA, DT, TM, UI. It comes from a damaged element whose length swallowed the elements after it."""
    text = text.rstrip("\x00 ")
    allowed = FREE_TEXT_CONTROLS if vr in FREE_TEXT_VRS else ESCAPE_ONLY
    if CONTROL_CHARACTERS.search(text.translate(allowed)):
        return True
    form = VALUE_FORMS.get(vr)
    return bool(text) and form is not None and not form.fullmatch(text)


def has_damaged_value(elem) -> bool:
    """Whether any value of a decoded element breaks its VR (`is_damaged_value`): the element is damaged."""
    return elem.VR in TEXT_VALUE_VRS and any(is_damaged_value(str(v), elem.VR) for v in _values(elem.value))


def _keep_or_replace_uids(elem, ctx: DeidContext) -> None:
    """UIDs DICOM defines (SOP classes, transfer syntaxes, coding schemes) are kept; any other UID in an
    element the table keeps is a site's or vendor's and is replaced like the UIDs the table lists."""
    _set_values(elem, [v if str(v) in UID_dictionary else ctx.uid(str(v)) for v in _values(elem.value)])


def _clean(ds: Dataset, ctx: DeidContext) -> None:
    """Apply the table to every element of `ds` and, recursively, of the items of the sequences it keeps."""
    for tag in list(ds.keys()):
        if tag.is_private or tag.element == 0 or tag.group == 0x0002 or is_overlay_group(tag.group):
            del ds[tag]
            continue
        try:
            elem = ds[tag]
        except Exception as exc:  # noqa: BLE001 - a damaged element: decoded by pydicom only on access
            _drop_undecodable(ds, tag, ctx, exc)
            continue
        action = element_action(ctx.table, int(tag), elem.VR)
        if action == "K" and has_damaged_value(elem):
            _drop_damaged(ds, tag, ctx)
        elif action == "X":
            del ds[tag]
        elif action == "Z":
            elem.value = Sequence() if elem.VR == "SQ" else None
        elif action == "D":
            elem.value = DUMMY_BY_VR.get(elem.VR, DUMMY_TEXT)
        elif action == "U":
            _set_values(elem, [ctx.uid(str(v)) for v in _values(elem.value)])
        elif action == "KEEP_STANDARD_UIDS":
            _keep_or_replace_uids(elem, ctx)
        elif action == "SHIFT":
            shift = shift_date if elem.VR == "DA" else shift_datetime
            _set_values(elem, [shift(str(v), ctx.date_offset_days) for v in _values(elem.value)])
        elif elem.VR == "SQ":
            for item in elem.value:
                _clean(item, ctx)


def _tag_text(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _drop_undecodable(ds: Dataset, tag, ctx: DeidContext, exc: Exception) -> None:
    """An element pydicom cannot decode (unknown VR, wrong length, broken sequence) is removed when the profile
    would not keep its value anyway (X, Z, D, date shift; noted), and fails the case when it would (K, U)."""
    raw = ds.get_item(tag)
    vr = str(getattr(raw, "VR", None) or "UN")
    action = element_action(ctx.table, int(tag), vr if vr in DUMMY_BY_VR or vr == "SQ" else "UN")
    if action in ("K", "U"):
        raise DeidError(f"element {_tag_text(int(tag))} of a DICOM file cannot be decoded ({type(exc).__name__}: "
                        "damaged, or of a value representation DICOM does not define) and is one the copy keeps: "
                        "repair the file or remove it from the case folder") from exc
    del ds[tag]
    if ctx.notes is not None:
        ctx.notes.add(f"element {_tag_text(int(tag))} could not be decoded (damaged, or of an unknown value "
                      "representation) and was removed")


def _drop_damaged(ds: Dataset, tag, ctx: DeidContext) -> None:
    del ds[tag]
    if ctx.notes is not None:
        ctx.notes.add(f"element {_tag_text(int(tag))} held characters its value representation does not allow "
                      "(damaged) and was removed")


def anonymize_dataset(ds: Dataset, ctx: DeidContext, in_place: bool = False,
                      transfer_syntax: str | None = None) -> Dataset:
    """De-identify one dataset (Annex E Basic Profile + Retain Longitudinal Modified Dates).

    Private tags, group lengths and overlay groups are removed, free text that the table would
    keep gets a dummy value, every sequence item is cleaned with the same rules, PatientName and
    PatientID become the patient pseudonym and the method is recorded. Pixel data
    is left untouched. Raises BurnedInAnnotationError for BurnedInAnnotation = YES unless
    `ctx.allow_burned_in`.

    The file meta is built anew from the cleaned data set (SOP Class and Instance UID) with `transfer_syntax`,
    or the input's own when not given; a data set with neither keeps none.
    """
    burned_in = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
    if burned_in == "YES" and has_pixels(ds) and not ctx.allow_burned_in:
        raise BurnedInAnnotationError(
            "the pixel data has burned-in annotation (BurnedInAnnotation = YES); "
            "pass --allow-burned-in to copy it anyway"
        )
    out = ds if in_place else copy.deepcopy(ds)
    old_meta = getattr(ds, "file_meta", None)
    if transfer_syntax is None and old_meta is not None and str(old_meta.get("TransferSyntaxUID", "") or "").strip():
        transfer_syntax = str(old_meta.TransferSyntaxUID).strip()
    old_class = str(old_meta.get("MediaStorageSOPClassUID", "") or "").strip() if old_meta is not None else ""
    old_instance = str(old_meta.get("MediaStorageSOPInstanceUID", "") or "").strip() if old_meta is not None else ""
    _clean(out, ctx)
    out.PatientName = ctx.case_id
    out.PatientID = ctx.case_id
    out.PatientIdentityRemoved = "YES"
    out.LongitudinalTemporalInformationModified = "MODIFIED"
    out.DeidentificationMethod = [text.format(edition=ctx.table.edition) for text in METHOD_TEXT]
    codes = Sequence()
    for value, meaning in METHOD_CODES:
        item = Dataset()
        item.CodeValue = value
        item.CodingSchemeDesignator = "DCM"
        item.CodeMeaning = meaning
        codes.append(item)
    out.DeidentificationMethodCodeSequence = codes
    if transfer_syntax:
        sop_class = str(out.get("SOPClassUID", "") or "").strip() or old_class
        sop_instance = str(out.get("SOPInstanceUID", "") or "").strip() or (ctx.uid(old_instance) if old_instance
                                                                            else "")
        if not sop_class or not sop_instance:
            missing = "SOP Class UID (0008,0016)" if not sop_class else "SOP Instance UID (0008,0018)"
            raise DeidError(f"a DICOM file has no {missing} in its data set or its file meta, so no valid copy can "
                            "be written: repair the file or remove it from the case folder")
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = UID(sop_class)
        meta.MediaStorageSOPInstanceUID = UID(sop_instance)
        meta.TransferSyntaxUID = UID(transfer_syntax)
        out.file_meta = meta
    return out


# --- reading raw DICOM -----------------------------------------------------------------------

def is_non_dicom_name(name: str) -> bool:
    lower = name.lower()
    return lower.endswith(NON_DICOM_SUFFIXES) or lower.startswith("._") or lower == "thumbs.db"


def _dcmread(path: Path, header_only: bool, defer: bool = False, force: bool = False) -> Dataset:
    if defer:
        return pydicom.dcmread(path, defer_size=DEFER_BYTES, force=force)
    return pydicom.dcmread(path, stop_before_pixels=header_only, force=force)


def _has_dicom_marker(path: Path) -> bool:
    with open(path, "rb") as fp:
        fp.seek(128)
        return fp.read(4) == b"DICM"


def read_dicom(path: Path, header_only: bool = True, defer: bool = False) -> Dataset | None:
    """The dataset in `path`, None when the file is not DICOM at all.

    A file with the DICM preamble that cannot be parsed raises (it is a broken DICOM file);
    a file without it (a bare data set: implicit or explicit VR little endian, or explicit VR big
    endian, with or without file meta) is tried once and accepted only if it has a SOP Class UID in
    its data set or its file meta. `defer` reads the whole file but keeps long values (pixel data)
    on disk until asked for.
    """
    try:
        return _dcmread(path, header_only, defer)
    except InvalidDicomError:
        if _has_dicom_marker(path):
            raise
    try:
        ds = _dcmread(path, header_only, defer, force=True)
    except Exception:  # noqa: BLE001 - not DICOM at all
        return None
    return ds if sop_class_uid(ds) else None


def iter_case_files(case_dir: Path) -> list[Path]:
    """Every regular file under `case_dir`, in a fixed order."""
    files = []
    for root, dirs, names in os.walk(case_dir):
        dirs.sort()
        files.extend(Path(root) / name for name in sorted(names))
    return files


def read_encoding(ds: Dataset) -> tuple[bool, bool]:
    """(implicit VR, little endian) as the data set was actually read: pydicom's `original_encoding` says what the
    transfer syntax declared even where it found, and read, the other VR encoding."""
    for tag in ds.keys():
        raw = ds.get_item(tag)
        if isinstance(raw, RawDataElement):
            return bool(raw.is_implicit_VR), bool(raw.is_little_endian)
    implicit, little = ds.original_encoding[:2]
    return (True if implicit is None else bool(implicit)), (True if little is None else bool(little))


def _encoding_syntax(implicit: bool, little: bool) -> UID:
    if implicit:
        return ImplicitVRLittleEndian
    return ExplicitVRLittleEndian if little else ExplicitVRBigEndian


def _encapsulated(ds: Dataset) -> bool:
    """Whether the pixel data is stored in fragments (compressed), read without decoding it."""
    raw = ds.get_item(0x7FE00010) if 0x7FE00010 in ds else None
    if raw is None:
        return False
    return bool(getattr(raw, "is_undefined_length", False) or getattr(raw, "length", 0) == 0xFFFFFFFF)


def output_syntax(ds: Dataset, notes: CaseNotes | None = None, path: Path | None = None) -> UID:
    """The transfer syntax of the copy of `ds`: the one its file meta declares when DICOM knows it; else (no file
    meta, none declared, or an unknown UID over uncompressed pixels) the encoding the data set was read in.
    Raises DeidError for compressed pixels without a known syntax. Call before the data set is cleaned."""
    meta = getattr(ds, "file_meta", None)
    declared = str(meta.get("TransferSyntaxUID", "") or "").strip() if meta is not None else ""
    if declared and UID(declared).is_transfer_syntax:
        return UID(declared)
    if _encapsulated(ds):
        what = "no transfer syntax" if not declared else "a transfer syntax DICOM does not define"
        raise DeidError(f"a DICOM file declares {what} and its pixel data is compressed, so they cannot be copied "
                        "faithfully: convert the file to a standard transfer syntax (for example with dcmconv or "
                        "gdcmconv) and rerun", path)
    syntax = _encoding_syntax(*read_encoding(ds))
    if notes is not None:
        if not declared and (meta is None or len(meta) == 0):
            notes.add(f"a DICOM file had no file meta information: it was built from the data set ({syntax.name})")
        elif not declared:
            notes.add(f"a DICOM file meta had no transfer syntax: the data set's own encoding was used ({syntax.name})")
        else:
            notes.add(f"a DICOM file declared a transfer syntax DICOM does not define over uncompressed pixels: "
                      f"written as {syntax.name}, the encoding it was read in")
    return syntax


def complete_uids(ds: Dataset, notes: CaseNotes | None = None) -> None:
    """Copy the SOP Class and Instance UID from the file meta into a data set that lacks them (some exports
    keep them in (0002,0002) and (0002,0003) only)."""
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        return
    for keyword, meta_keyword, words in (("SOPClassUID", "MediaStorageSOPClassUID", "SOP Class UID"),
                                         ("SOPInstanceUID", "MediaStorageSOPInstanceUID", "SOP Instance UID")):
        if str(ds.get(keyword, "") or "").strip():
            continue
        value = str(meta.get(meta_keyword, "") or "").strip()
        if value:
            setattr(ds, keyword, UID(value))
            if notes is not None:
                notes.add(f"the {words} was in the file meta only: copied into the data set")


def _whole_number(ds: Dataset, keyword: str, default: int | None = None) -> int | None:
    """The value of an US/IS attribute as an int; None when it is absent (and no default), empty or no number."""
    if keyword not in ds:
        return default
    try:
        value = ds.get(keyword)
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError, OverflowError):
        return None
    except Exception:  # noqa: BLE001 - a value pydicom cannot decode at all
        return None


PIXEL_DESCRIPTION = (("Rows", "(0028,0010)"), ("Columns", "(0028,0011)"), ("BitsAllocated", "(0028,0100)"))


def pixel_description_problem(ds: Dataset) -> str | None:
    """Why the pixel data of `ds` cannot be checked and copied faithfully (missing or invalid Rows, Columns,
    Bits Allocated, Samples per Pixel, Number of Frames); None when it can or there is none."""
    if not has_pixels(ds):
        return None
    for keyword, tag in PIXEL_DESCRIPTION:
        number = _whole_number(ds, keyword)
        if number is None or number <= 0 or (keyword == "BitsAllocated" and number not in (1, 8, 16, 32, 64)):
            state = "no" if keyword not in ds or ds.get(keyword) in (None, "") else "an invalid"
            return (f"an image has {state} {keyword} {tag}, so its pixel data cannot be checked: the file is "
                    "damaged; repair it or remove it from the case folder")
    for keyword, tag in (("SamplesPerPixel", "(0028,0002)"), ("NumberOfFrames", "(0028,0008)")):
        number = _whole_number(ds, keyword, default=1)
        if number is None or number <= 0:
            return (f"an image has an invalid {keyword} {tag} (not a positive whole number), so its pixel data "
                    "cannot be checked: the file is damaged; repair it or remove it from the case folder")
    return None


def _check_pixel_length(ds: Dataset, syntax: UID | None = None) -> None:
    if syntax is None:
        meta = getattr(ds, "file_meta", None)
        declared = str(meta.get("TransferSyntaxUID", "") or "") if meta is not None else ""
        syntax = UID(declared) if declared else None
    if "PixelData" not in ds or syntax is None or syntax.is_compressed:
        return
    if problem := pixel_description_problem(ds):
        raise DeidError(problem)
    frames = _whole_number(ds, "NumberOfFrames", default=1)
    pixels = int(ds.Rows) * int(ds.Columns) * _whole_number(ds, "SamplesPerPixel", default=1) * frames
    bits = int(ds.BitsAllocated)
    expected = (pixels + 7) // 8 if bits == 1 else pixels * ((bits + 7) // 8)
    if len(ds.PixelData) < expected:
        raise DeidError(f"a DICOM file has truncated pixel data ({len(ds.PixelData)} of {expected} bytes): copy it "
                        "again from the source, or remove it from the case folder")


@dataclass
class _Instance:
    path: Path
    series_uid: str
    series_number: int
    instance_number: int
    sop_uid: str
    has_pixels: bool = True
    copy_index: int = 0  # > 0: another image with the SOP Instance UID of an earlier one; gets its own new UID

    def new_uid(self, ctx: DeidContext) -> str:
        return ctx.uid(self.sop_uid if not self.copy_index else f"{self.sop_uid}\0copy {self.copy_index}")


def _number(ds: Dataset, keyword: str) -> int:
    try:
        return int(ds.get(keyword))
    except Exception:  # noqa: BLE001 - absent, empty, or not a number: sorts last
        return 2**31


@dataclass
class _Scan:
    """What the scan of one raw case found."""

    instances: list[_Instance] = field(default_factory=list)
    identities: set[str] = field(default_factory=set)
    left_out: Counter = field(default_factory=Counter)  # (SOP class name, ImageType class, reasons) -> count
    allowed: int = 0  # instances that met a quarantine rule but were copied (--allow-burned-in)


class _CaseRun:
    """One case's reading: its notes, the library warnings caught so far, --debug."""

    def __init__(self, case_dir: Path, notes: CaseNotes, caught: list, debug: bool):
        self.case_dir, self.notes, self.caught, self.debug = case_dir, notes, caught, debug
        self.seen_warnings = 0

    def relative(self, path: Path) -> str:
        try:
            return path.relative_to(self.case_dir).as_posix()
        except ValueError:
            return path.name

    def take_warnings(self, path: Path | None = None) -> None:
        """Turn the warnings caught since the last call into notes; a warning that pydicom stopped reading at the
        end of the file (a truncated file, which it would otherwise return in part) fails the case."""
        new, self.seen_warnings = self.caught[self.seen_warnings:], len(self.caught)
        for caught in new:
            message = str(caught.message)
            if self.debug:
                where = f" ({self.relative(path)})" if path is not None else ""
                print(f"care-anonymize: pydicom warning{where}: {message}", file=sys.stderr)
            if "end of file" in message.lower():
                raise DeidError("a DICOM file ends before its last element (truncated): copy it again from the "
                                "source, or remove it from the case folder", path)
            self.notes.add_warning(message, caught.category)

    def read(self, path: Path, defer: bool) -> Dataset | None:
        """The data set of `path` (None: not DICOM), its UIDs completed from the file meta."""
        try:
            ds = read_dicom(path, header_only=False, defer=defer) if defer else _read_whole(path)
        except DeidError:
            raise
        except PermissionError as exc:
            raise DeidError("a file of the case cannot be read (permission denied): give the user running "
                            "care-anonymize read access to it", path) from exc
        except OSError as exc:
            raise DeidError(f"a file of the case cannot be read ({exc.strerror or type(exc).__name__}): check that it "
                            "is there and readable, then rerun", path) from exc
        except Exception as exc:  # noqa: BLE001 - pydicom's errors on damaged files
            raise DeidError(f"a DICOM file cannot be parsed ({_parse_error(exc)}): copy it again from the source, "
                            "or remove it from the case folder", path) from exc
        finally:
            self.take_warnings(path)
        if ds is not None:
            complete_uids(ds, self.notes if defer else None)
        return ds


def _read_whole(path: Path) -> Dataset:
    ds = read_dicom(path, header_only=False)
    if ds is None:  # the scan found it; only a file that changed since reads as not DICOM now
        raise DeidError("a DICOM file changed while the case was read: rerun", path)
    if _last_element_cut(ds):
        raise DeidError("a DICOM file ends inside its last element (truncated): copy it again from the source, or "
                        "remove it from the case folder", path)
    return ds


def _last_element_cut(ds: Dataset) -> bool:
    """Whether the file ended before the last element's value did (pydicom returns what there was)."""
    tags = list(ds.keys())
    if not tags:
        return False
    raw = ds.get_item(tags[-1])
    if not isinstance(raw, RawDataElement) or raw.value is None or raw.length == 0xFFFFFFFF:
        return False
    return len(raw.value) < raw.length


def _parse_error(exc: Exception) -> str:
    """Fixed words for a pydicom error while parsing (its message may quote values from the file)."""
    text = str(exc)
    if isinstance(exc, EOFError) or "end of file" in text.lower():
        return "it is truncated"
    if isinstance(exc, NotImplementedError) or "Value Representation" in text:
        tag = re.search(r"in tag (\([0-9A-Fa-f]{4},[0-9A-Fa-f]{4}\))", text)
        where = f"element {tag.group(1).upper()}" if tag else "an element"
        return f"{where} has a value representation DICOM does not define"
    if isinstance(exc, InvalidDicomError):
        return "its file meta information is damaged"
    return f"pydicom raised {type(exc).__name__}; rerun with --debug to see where"


def _scan_case(case_dir: Path, run: _CaseRun | None = None, allow_burned_in: bool = False) -> _Scan:
    """Read every file of the case once (long values deferred), keep its DICOM instances, and leave out those
    that may carry burned-in text unless `allow_burned_in`."""
    run = run or _CaseRun(case_dir, CaseNotes(), [], debug=False)
    scan = _Scan()
    by_uid: dict[str, list[_Instance]] = {}
    for path in iter_case_files(case_dir):
        if any(part.startswith(".") for part in path.relative_to(case_dir).parts) or is_non_dicom_name(path.name):
            continue
        if not path.exists():
            run.notes.add("a dangling symbolic link in the case folder was ignored")
            continue
        if not path.is_file():
            run.notes.add("a special file (not a regular file) in the case folder was ignored")
            continue
        ds = run.read(path, defer=True)
        if ds is None:
            continue
        try:
            instance = _scanned_instance(ds, path, case_dir, scan, run.notes, allow_burned_in)
        except DeidError:
            raise
        except Exception as exc:  # noqa: BLE001 - an element pydicom cannot decode
            raise DeidError(f"a header element of a DICOM file cannot be decoded ({_parse_error(exc)}): repair the "
                            "file or remove it from the case folder", path) from exc
        if instance is not None:
            by_uid.setdefault(instance.sop_uid, []).append(instance)
            scan.instances.append(instance)
    for same_uid in by_uid.values():
        if len(same_uid) > 1:
            _sort_out_duplicates(same_uid, scan, run)
    return scan


def _scanned_instance(ds: Dataset, path: Path, case_dir: Path, scan: _Scan, notes: CaseNotes,
                      allow_burned_in: bool) -> _Instance | None:
    """The instance `ds` is, None when it is left out (DICOMDIR, no UIDs and no pixels, quarantined)."""
    meta = getattr(ds, "file_meta", None)
    if sop_class_uid(ds) == MEDIA_STORAGE_DIRECTORY or (
            meta is not None and str(meta.get("MediaStorageSOPClassUID", "")) == MEDIA_STORAGE_DIRECTORY):
        return None
    pixels = has_pixels(ds)
    class_name = sop_class_name(sop_class_uid(ds))
    if not str(ds.get("SOPInstanceUID", "") or "").strip() or not sop_class_uid(ds):
        missing = "SOP Instance UID (0008,0018)" if sop_class_uid(ds) else "SOP Class UID (0008,0016)"
        if pixels:
            raise DeidError(f"an image has no {missing}, in its data set or its file meta: repair the file or "
                            "remove it from the case folder", path)
        notes.add(f"a DICOM file without pixel data and without {missing} was left out")
        return None
    reasons = quarantine_reasons(ds, pixels)
    if reasons and not allow_burned_in:
        scan.left_out[(*instance_class(ds), tuple(reasons))] += 1
        return None
    scan.allowed += bool(reasons)
    if not pixels and class_name.endswith(" Image Storage") and "Rows" in ds:
        raise DeidError(f"an image ({class_name}) holds no pixel data: the file is truncated, or an element "
                        "before its pixels is damaged; copy it again from the source, or remove it from the "
                        "case folder", path)
    if problem := pixel_description_problem(ds):
        raise DeidError(problem, path)
    scan.identities.add(patient_identity(ds, case_dir.name))
    return _Instance(path=path, series_uid=str(ds.get("SeriesInstanceUID", "") or ""),
                     series_number=_number(ds, "SeriesNumber"), instance_number=_number(ds, "InstanceNumber"),
                     sop_uid=str(ds.SOPInstanceUID).strip(), has_pixels=pixels)


def _image_key(run: _CaseRun, instance: _Instance) -> str:
    """A digest of what makes an image the same image: series, number, position and pixel data."""
    ds = run.read(instance.path, defer=False)
    digest = hashlib.sha256()
    for keyword in ("SeriesInstanceUID", "InstanceNumber", "ImagePositionPatient"):
        digest.update(f"{keyword}={ds.get(keyword)!s}\0".encode("utf-8", "surrogateescape"))
    for tag in (0x7FE00010, 0x7FE00008, 0x7FE00009):
        if tag in ds:
            digest.update(bytes(ds[tag].value or b""))
    return digest.hexdigest()


def _sort_out_duplicates(same_uid: list[_Instance], scan: _Scan, run: _CaseRun) -> None:
    """Files of one SOP Instance UID: copies of one image are copied once; different images each get their own
    new UID (derived from the key, the UID and their order)."""
    kept: dict[str, _Instance] = {}
    for instance in same_uid:
        key = _image_key(run, instance)
        if key in kept:
            scan.instances.remove(instance)
            run.notes.add("a DICOM file repeated another image of the case (same SOP Instance UID, same pixels): "
                          "copied once")
            continue
        instance.copy_index = len(kept)
        kept[key] = instance
        if instance.copy_index:
            run.notes.add("two different images of the case had the same SOP Instance UID: each copy got its own "
                          "new UID")


def raw_case_tag(case_dir: Path, key: bytes) -> str:
    """Keyed hash of a raw case folder's resolved path: finds the earlier output of that very folder
    without naming it (two batches whose case folders share a name, such as 001, stay apart; a raw
    tree that was moved counts as new, so its earlier copies are kept, not removed)."""
    message = f"care-anonymize raw case\0{Path(case_dir).resolve()}".encode("utf-8", "surrogateescape")
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def case_fingerprint(case_dir: Path, raw_dir: Path, key: bytes, allow_burned_in: bool = False) -> dict[str, str]:
    """What `.fingerprint` holds: the raw case's tag, and a keyed hash of its files (care-convert's raw
    fingerprint: relative paths, sizes, modification times), of these rules and of whether instances that may
    carry burned-in text were allowed (a rerun without --allow-burned-in rebuilds a case copied with it).

    Holds nothing identifying: every name, size and time goes through an HMAC with the secret key.
    """
    raw_case = RawCase(key=case_dir.name, root=case_dir, label_path=None, description_path=None)
    rules = f"{RULES_VERSION}\0{__version__}\0{load_basic_profile().edition}\0burned-in {bool(allow_burned_in)}"
    mac = hmac.new(key, f"care-anonymize\0{rules}\0".encode(), hashlib.sha256)
    mac.update(raw_fingerprint(raw_case, raw_dir, key).encode("ascii"))
    return {"raw_case": raw_case_tag(case_dir, key), "inputs": mac.hexdigest()}


def read_fingerprint(case_dir: Path) -> dict | None:
    """The `.fingerprint` of an output case folder, None when it has none or it cannot be read."""
    try:
        stored = json.loads((case_dir / FINGERPRINT_NAME).read_text(encoding="ascii"))
    except (OSError, ValueError):
        return None
    return stored if isinstance(stored, dict) else None


def _claim(case_id: str, taken_ids: set[str]) -> None:
    """Add `case_id` to the IDs this run has given; DeidError when another raw case has it already."""
    if case_id in taken_ids:
        raise DeidError("another raw case received the same case ID; anonymize it with another key")
    taken_ids.add(case_id)


def _write_instances(folder: Path, instances: list[_Instance], ctx: DeidContext, run: _CaseRun) -> None:
    """The de-identified copies of `instances` as folder/<series>/<instance>.dcm: series numbered by
    SeriesNumber, instances by InstanceNumber, ties broken by the new UIDs."""
    series_uids = sorted({i.series_uid for i in instances},
                         key=lambda s: (min(i.series_number for i in instances if i.series_uid == s), ctx.uid(s)))
    for series_index, series_uid in enumerate(series_uids, start=1):
        series_dir = folder / f"{series_index:03d}"
        series_dir.mkdir()
        members = sorted((i for i in instances if i.series_uid == series_uid),
                         key=lambda i: (i.instance_number, i.new_uid(ctx)))
        for instance_index, instance in enumerate(members, start=1):
            ds = run.read(instance.path, defer=False)
            complete_uids(ds)
            syntax = output_syntax(ds, run.notes, instance.path)
            try:
                _check_pixel_length(ds, syntax)
                clean = anonymize_dataset(ds, ctx, in_place=True, transfer_syntax=syntax)
            except DeidError as exc:
                exc.path = exc.path or instance.path
                raise
            except Exception as exc:  # noqa: BLE001 - a value pydicom cannot decode or the rules cannot handle
                raise DeidError(f"a DICOM file cannot be de-identified ({_parse_error(exc)}): repair the file or "
                                "remove it from the case folder", instance.path) from exc
            finally:
                run.take_warnings(instance.path)
            if instance.copy_index:
                clean.SOPInstanceUID = clean.file_meta.MediaStorageSOPInstanceUID = instance.new_uid(ctx)
            try:
                with atomic_file(series_dir / f"{instance_index:05d}.dcm") as tmp:
                    clean.save_as(tmp, enforce_file_format=True)
            except OSError:
                raise
            except Exception as exc:  # noqa: BLE001 - pydicom refusing what it read
                raise DeidError(f"the de-identified copy of a DICOM file cannot be written (pydicom raised "
                                f"{type(exc).__name__}): rerun with --debug to see where, and repair the file or "
                                "remove it from the case folder", instance.path) from exc
            finally:
                run.take_warnings(instance.path)


def _new_result(raw_folder: str) -> dict:
    return {"case_id": None, "status": "failed", "reason": "", "raw_folder": raw_folder, "files": 0,
            "left_out": [], "notes": [], "raw_file": None}


def _left_out_entries(left_out: Counter) -> list[dict]:
    """The report's account of the instances left out: one entry per SOP class name, ImageType class and
    reasons, with its count (fixed words only)."""
    return [{"sop_class": sop_class, "image_type": image_type, "reasons": list(reasons), "count": count}
            for (sop_class, image_type, reasons), count in sorted(left_out.items())]


def describe_left_out(entries: list[dict]) -> str:
    """One line for the terminal: "2 Secondary Capture Image Storage (ImageType DOSE_INFO: ...); ..."."""
    return "; ".join(f"{e['count']} {e['sop_class']} (ImageType {e['image_type']}: {', '.join(e['reasons'])})"
                     for e in entries)


def anonymize_case(case_dir: Path, out_dir: Path, key: bytes, allow_burned_in: bool = False,
                   taken_ids: set[str] | None = None, raw_dir: Path | None = None, debug: bool = False) -> dict:
    """De-identify the DICOM files of one case into out_dir/<case_id>/ (all or nothing).

    The case ID is care-convert's: patient pseudonym + "-" + the keyed suffix of the raw folder name.
    A case folder whose stored fingerprint matches the raw case is kept as it is; otherwise it is
    rebuilt beside it and swapped in. `raw_dir` (default: the parent of `case_dir`) is the root the
    fingerprint's relative paths start from. Instances that may carry burned-in text are left out unless
    `allow_burned_in` ("left_out" counts them); library warnings become "notes"; "raw_file" names the raw file a
    failure concerns, relative to the case folder (terminal only, like "raw_folder"). `debug` prints the
    traceback of a failure and pydicom's own warnings on stderr.
    """
    result = _new_result(case_dir.name)
    notes = CaseNotes()
    tmp_dir: Path | None = None
    with warnings.catch_warnings(record=True) as caught, quiet_library_loggers(debug):
        warnings.simplefilter("always")
        run = _CaseRun(case_dir, notes, caught, debug)
        try:
            scan = _scan_case(case_dir, run, allow_burned_in)
            result["left_out"] = _left_out_entries(scan.left_out)
            if scan.allowed:
                notes.add(f"{scan.allowed} instance(s) that may carry burned-in text were copied (--allow-burned-in)")
            instances, identities = scan.instances, scan.identities
            if scan.left_out and not any(i.has_pixels for i in instances):
                n = sum(scan.left_out.values())
                result.update(status="skipped", reason=(
                    f"every image of the case may carry burned-in text ({n} left out: "
                    f"{describe_left_out(result['left_out'])}); nothing copied: pass --allow-burned-in to copy "
                    "them anyway, after looking at them"))
                return result
            if not instances:
                result.update(status="skipped", reason="the case has no DICOM files (non-DICOM files are not copied)")
                return result
            if len(identities) > 1:
                raise DeidError(f"the DICOM files of the case belong to {len(identities)} different patients: "
                                "put each patient's files in a case folder of its own")
            ctx = DeidContext(key=key, identity=identities.pop(), allow_burned_in=allow_burned_in, notes=notes)
            case_id = case_id_for(ctx.case_id, case_dir.name, key)
            result["case_id"] = case_id
            if taken_ids is not None:
                _claim(case_id, taken_ids)
            final_dir = out_dir / case_id
            fingerprint = case_fingerprint(case_dir, raw_dir or case_dir.parent, key, allow_burned_in)
            if final_dir.is_dir() and read_fingerprint(final_dir) == fingerprint:
                result.update(status="anonymized", reason="already present", files=len(instances))
                return result
            tmp_dir = make_staging_dir(out_dir, PARTIAL_PREFIX)
            _write_instances(tmp_dir, instances, ctx, run)
            (tmp_dir / FINGERPRINT_NAME).write_text(json.dumps(fingerprint, sort_keys=True) + "\n", encoding="ascii")
            # an interruption leaves the old case, the new one, or the old one aside as .<case_id>.previous
            # (the next run removes it and rebuilds the case), never a mixture
            replace_folder(tmp_dir, final_dir)
            tmp_dir = None
            result.update(status="anonymized", reason="", files=len(instances))
        except DeidError as exc:
            result["reason"] = str(exc)
            if exc.path is not None:
                result["raw_file"] = run.relative(exc.path)
            _debug_traceback(debug, case_dir.name, exc)
        except OSError as exc:
            where = "the output folder" if _under(exc, out_dir) else "a file"
            result["reason"] = (f"{where} could not be read or written ({exc.strerror or type(exc).__name__}): "
                                "check the disk and the permissions, then rerun")
            _debug_traceback(debug, case_dir.name, exc)
        except Exception as exc:  # noqa: BLE001 - one case must never stop the others
            result["reason"] = (f"de-identification stopped on an error this tool does not explain "
                                f"({type(exc).__name__}): rerun with --debug for the traceback and report it")
            _debug_traceback(debug, case_dir.name, exc)
        finally:
            if tmp_dir is not None:
                shutil.rmtree(tmp_dir, ignore_errors=True)
            with contextlib.suppress(DeidError):
                run.take_warnings()
            result["notes"] = notes.lines()
    return result


def _under(exc: OSError, folder: Path) -> bool:
    names = [n for n in (exc.filename, getattr(exc, "filename2", None)) if n]
    return any(Path(os.fsdecode(n)).resolve().is_relative_to(folder.resolve()) for n in names)


def _debug_traceback(debug: bool, raw_folder: str, exc: BaseException) -> None:
    """With --debug: the traceback on stderr (never into the output or a report)."""
    if debug:
        print(f"care-anonymize: traceback for case folder {raw_folder}:", file=sys.stderr)
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)


def _remove_case(final_dir: Path) -> None:
    aside = make_staging_dir(final_dir.parent, REPLACED_PREFIX)
    os.replace(final_dir, aside)
    shutil.rmtree(aside, ignore_errors=True)


def anonymize_tree(raw_dir: Path, out_dir: Path, key: bytes, allow_burned_in: bool = False,
                   progress: Callable[[int, int], None] | None = None, debug: bool = False) -> list[dict]:
    """De-identify every case folder directly under raw_dir into out_dir.

    Returns one dict per case: case_id (None when unknown), status ("anonymized", "skipped" or
    "failed"), reason, files, left_out (instances that may carry burned-in text, left out: SOP class name,
    ImageType class, reasons, count), notes (quirks worked around, library warnings), raw_folder and raw_file
    (the raw file a failure concerns, or None). raw_folder and raw_file are raw names, for the operator's
    terminal only: never write them under out_dir. `debug` prints tracebacks and pydicom's warnings on
    stderr. Case folders an earlier run wrote for these raw
    cases are removed when the case now fails, is skipped or gets another case ID; folders of raw
    cases absent from this run are left alone. Raises OutputLockedError (a ValueError) at once
    when another run writes to out_dir, and ValueError for a key shorter than MIN_KEY_BYTES.
    """
    if problem := key_problem(key, "the de-identification key"):
        raise ValueError(problem)
    raw_dir, out_dir = Path(raw_dir).resolve(), Path(out_dir).resolve()
    if not raw_dir.is_dir():
        raise NotADirectoryError(f"raw folder not found: {raw_dir}")
    if out_dir == raw_dir or raw_dir in out_dir.parents:
        raise ValueError("the output folder must not be inside the raw folder")
    if problem := creation_problem(out_dir):
        raise ValueError(f"output folder {out_dir}: {problem}")
    out_dir.mkdir(parents=True, exist_ok=True)
    with hold_output_lock(out_dir, "care-anonymize"):
        for leftover in (*out_dir.glob(PARTIAL_PREFIX + "*"), *out_dir.glob(REPLACED_PREFIX + "*"),
                         *out_dir.glob(previous_path(out_dir / "*").name)):
            shutil.rmtree(leftover, ignore_errors=True)
        earlier = _earlier_outputs(out_dir)
        folders = [RawCase(key=p.name, root=p, label_path=None, description_path=None)
                   for p in sorted(raw_dir.iterdir()) if p.is_dir() and not p.name.startswith(".")]
        kept, linked = drop_linked_cases(folders, raw_dir, out_dir)  # care-convert's rule for symbolic links
        cases = [raw.root for raw in kept]
        taken: set[str] = set()
        results = []
        for index, case_dir in enumerate(cases, start=1):
            results.append(anonymize_case(case_dir, out_dir, key, allow_burned_in, taken, raw_dir, debug))
            if progress is not None:
                progress(index, len(cases))
        results += [{**_new_result(name), "status": "skipped", "reason": why} for name, why in linked]
        written = {r["case_id"] for r in results if r["status"] == "anonymized"}
        for case_dir in cases:
            for name in earlier.get(raw_case_tag(case_dir, key), ()):
                if name not in written:  # the case now fails, is skipped, or moved to another patient
                    with contextlib.suppress(OSError):
                        _remove_case(out_dir / name)
    return results


def _earlier_outputs(out_dir: Path) -> dict[str, list[str]]:
    """Raw case tag -> names of the case folders an earlier run wrote for that raw case."""
    earlier: dict[str, list[str]] = {}
    for folder in sorted(out_dir.iterdir()):
        stored = read_fingerprint(folder) if folder.is_dir() else None
        if stored is not None and isinstance(stored.get("raw_case"), str):
            earlier.setdefault(stored["raw_case"], []).append(folder.name)
    return earlier
