"""DICOM de-identification (PS3.15 Annex E Basic Profile + Modified Dates Option).

Case IDs, remapped UIDs and the per-patient date offset all come from the secret key through
:mod:`care_dataset.deid.pseudonyms`.

`care-anonymize raw/ anon/` writes anon/<case_id>/<series>/<instance>.dcm (three- and five-digit
indices ordered by SeriesNumber and InstanceNumber, then new UID). The case ID is care-convert's:
the patient pseudonym, "-", and the keyed suffix of the raw case folder, so two studies of one
patient get two folders. Only DICOM files are copied: volume files, label description files and
other non-DICOM files are not. Pixel data is copied byte for byte in its original transfer syntax.

Beyond Table E.1-1: free text (LT, ST, UT) that the table would keep gets a dummy value at any
depth, and every overlay group (60xx) is removed whole: the table removes its Overlay Data and
Comments, and the rest of the group would describe an overlay that is not there.
Each case folder holds `.fingerprint`, a keyed hash of the raw case's files and of these rules; a
rerun rebuilds a case whose fingerprint differs and keeps the others.
"""
from __future__ import annotations

import contextlib
import copy
import datetime as dt
import hashlib
import hmac
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import UID

from care_dataset.deid.annex_e import AnnexETable, load_basic_profile
from care_dataset.deid.pseudonyms import (case_id_for, date_offset_days, key_problem, make_case_id, patient_identity,
                                          remap_uid)
from care_dataset.files import (atomic_file, creation_problem, hold_output_lock, make_staging_dir, previous_path,
                                replace_folder)
from care_dataset.raw.discover import RawCase, drop_linked_cases, raw_fingerprint
from care_dataset.version import __version__

PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)
FREE_TEXT_VRS = frozenset({"LT", "ST", "UT"})
FINGERPRINT_NAME = ".fingerprint"
PARTIAL_PREFIX = ".partial-"
REPLACED_PREFIX = ".replaced-"
RULES_VERSION = "2"  # raise when a change of the rules below must rebuild existing cases
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
NON_DICOM_SUFFIXES = (
    ".nii", ".nii.gz", ".mha", ".mhd", ".raw", ".nrrd", ".nhdr", ".txt", ".json", ".csv", ".md",
    ".png", ".jpg", ".jpeg", ".xml", ".zip", ".gz", ".toml", ".yaml", ".yml", ".pdf",
)
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
    """A case cannot be de-identified; the message is one sentence without identifying values."""


class BurnedInAnnotationError(DeidError):
    """Pixel data flagged BurnedInAnnotation = YES and the user did not allow it."""


# --- dates -----------------------------------------------------------------------------------

def shift_date(value: str, days: int) -> str:
    """Shift a DA value (YYYYMMDD, or a YYYYMMDD-YYYYMMDD range); unparsable dates become ''."""
    value = value.strip()
    if "-" in value:
        return "-".join(shift_date(part, days) if part else "" for part in value.split("-"))
    digits = value.replace(".", "")
    if len(digits) != 8 or not digits.isdigit():
        return ""
    try:
        day = dt.date(int(digits[:4]), int(digits[4:6]), int(digits[6:8]))
        return (day + dt.timedelta(days=days)).strftime("%Y%m%d")
    except (ValueError, OverflowError):
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
    """The table's action, except that free text the table would keep gets a dummy value."""
    action = table.action(tag, vr)
    return "D" if action == "K" and vr in FREE_TEXT_VRS else action


def _clean(ds: Dataset, ctx: DeidContext) -> None:
    for tag in list(ds.keys()):
        if tag.is_private or tag.element == 0 or tag.group == 0x0002 or is_overlay_group(tag.group):
            del ds[tag]
            continue
        elem = ds[tag]
        action = element_action(ctx.table, int(tag), elem.VR)
        if action == "X":
            del ds[tag]
        elif action == "Z":
            elem.value = Sequence() if elem.VR == "SQ" else None
        elif action == "D":
            elem.value = DUMMY_BY_VR.get(elem.VR, DUMMY_TEXT)
        elif action == "U":
            _set_values(elem, [ctx.uid(str(v)) for v in _values(elem.value)])
        elif action == "SHIFT":
            shift = shift_date if elem.VR == "DA" else shift_datetime
            _set_values(elem, [shift(str(v), ctx.date_offset_days) for v in _values(elem.value)])
        elif elem.VR == "SQ":
            for item in elem.value:
                _clean(item, ctx)


def _has_pixels(ds: Dataset) -> bool:
    return any(tag in ds for tag in PIXEL_TAGS)


def anonymize_dataset(ds: Dataset, ctx: DeidContext, in_place: bool = False) -> Dataset:
    """De-identify one dataset (Annex E Basic Profile + Retain Longitudinal Modified Dates).

    Private tags, group lengths and overlay groups are removed, free text that the table would
    keep gets a dummy value, every sequence item is cleaned with the same rules, PatientName and
    PatientID become the patient pseudonym and the method is recorded. Pixel data
    is left untouched. Raises BurnedInAnnotationError for BurnedInAnnotation = YES unless
    `ctx.allow_burned_in`.
    """
    burned_in = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
    if burned_in == "YES" and _has_pixels(ds) and not ctx.allow_burned_in:
        raise BurnedInAnnotationError(
            "the pixel data has burned-in annotation (BurnedInAnnotation = YES); "
            "pass --allow-burned-in to copy it anyway"
        )
    out = ds if in_place else copy.deepcopy(ds)
    old_meta = getattr(ds, "file_meta", None)
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
    if old_meta is not None and "TransferSyntaxUID" in old_meta:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = out.get("SOPClassUID", old_meta.get("MediaStorageSOPClassUID"))
        meta.MediaStorageSOPInstanceUID = out.get("SOPInstanceUID") or ctx.uid(
            str(old_meta.get("MediaStorageSOPInstanceUID", "")))
        meta.TransferSyntaxUID = UID(str(old_meta.TransferSyntaxUID))
        out.file_meta = meta
    return out


# --- reading raw DICOM -----------------------------------------------------------------------

def is_non_dicom_name(name: str) -> bool:
    lower = name.lower()
    return lower.endswith(NON_DICOM_SUFFIXES)


def read_dicom(path: Path, header_only: bool = True) -> Dataset | None:
    """The dataset in `path`, None when the file is not DICOM at all.

    A file with the DICM preamble that cannot be parsed raises (it is a broken DICOM file);
    a file without it is tried once as raw DICOM and accepted only if it has a SOP Class UID.
    """
    try:
        return pydicom.dcmread(path, stop_before_pixels=header_only)
    except InvalidDicomError:
        pass
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=header_only, force=True)
        return ds if "SOPClassUID" in ds else None
    except Exception:
        return None


def iter_case_files(case_dir: Path) -> list[Path]:
    """Every regular file under `case_dir`, in a fixed order."""
    files = []
    for root, dirs, names in os.walk(case_dir):
        dirs.sort()
        files.extend(Path(root) / name for name in sorted(names))
    return files


def _check_pixel_length(ds: Dataset) -> None:
    meta = getattr(ds, "file_meta", None)
    syntax = UID(str(meta.TransferSyntaxUID)) if meta is not None and "TransferSyntaxUID" in meta else None
    if "PixelData" not in ds or syntax is None or syntax.is_compressed:
        return
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    pixels = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * frames
    bits = int(ds.BitsAllocated)
    expected = (pixels + 7) // 8 if bits == 1 else pixels * ((bits + 7) // 8)
    if len(ds.PixelData) < expected:
        raise DeidError(f"a DICOM file has truncated pixel data ({len(ds.PixelData)} of {expected} bytes)")


@dataclass
class _Instance:
    path: Path
    series_uid: str
    series_number: int
    instance_number: int
    sop_uid: str


def _number(ds: Dataset, keyword: str) -> int:
    try:
        return int(ds.get(keyword))
    except (TypeError, ValueError):
        return 2**31


def _scan_case(case_dir: Path) -> tuple[list[_Instance], set[str]]:
    instances, identities = [], set()
    for path in iter_case_files(case_dir):
        if is_non_dicom_name(path.name):
            continue
        try:
            ds = read_dicom(path, header_only=True)
        except Exception as exc:
            raise DeidError(f"a DICOM file cannot be read ({type(exc).__name__})") from None
        if ds is None:
            continue
        meta = getattr(ds, "file_meta", None)
        if meta is not None and str(meta.get("MediaStorageSOPClassUID", "")) == MEDIA_STORAGE_DIRECTORY:
            continue
        if "SOPInstanceUID" not in ds:
            raise DeidError("a DICOM file has no SOP Instance UID")
        identities.add(patient_identity(ds, case_dir.name))
        instances.append(_Instance(
            path=path,
            series_uid=str(ds.get("SeriesInstanceUID", "")),
            series_number=_number(ds, "SeriesNumber"),
            instance_number=_number(ds, "InstanceNumber"),
            sop_uid=str(ds.SOPInstanceUID),
        ))
    return instances, identities


def raw_case_tag(case_dir: Path, key: bytes) -> str:
    """Keyed hash of a raw case folder's resolved path: finds the earlier output of that very folder
    without naming it (two batches whose case folders share a name, such as 001, stay apart; a raw
    tree that was moved counts as new, so its earlier copies are kept, not removed)."""
    message = f"care-anonymize raw case\0{Path(case_dir).resolve()}".encode("utf-8", "surrogateescape")
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def case_fingerprint(case_dir: Path, raw_dir: Path, key: bytes) -> dict[str, str]:
    """What `.fingerprint` holds: the raw case's tag, and a keyed hash of its files (care-convert's raw
    fingerprint: relative paths, sizes, modification times) and of the de-identification rules.

    Holds nothing identifying: every name, size and time goes through an HMAC with the secret key.
    """
    raw_case = RawCase(key=case_dir.name, root=case_dir, label_path=None, description_path=None)
    rules = f"{RULES_VERSION}\0{__version__}\0{load_basic_profile().edition}"
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


def _write_instances(folder: Path, instances: list[_Instance], ctx: DeidContext) -> None:
    """The de-identified copies of `instances` as folder/<series>/<instance>.dcm: series numbered by
    SeriesNumber, instances by InstanceNumber, ties broken by the new UIDs."""
    series_uids = sorted({i.series_uid for i in instances},
                         key=lambda s: (min(i.series_number for i in instances if i.series_uid == s), ctx.uid(s)))
    for series_index, series_uid in enumerate(series_uids, start=1):
        series_dir = folder / f"{series_index:03d}"
        series_dir.mkdir()
        members = sorted((i for i in instances if i.series_uid == series_uid),
                         key=lambda i: (i.instance_number, ctx.uid(i.sop_uid)))
        for instance_index, instance in enumerate(members, start=1):
            try:
                ds = pydicom.dcmread(instance.path)
            except Exception as exc:
                raise DeidError(f"a DICOM file cannot be read ({type(exc).__name__})") from None
            _check_pixel_length(ds)
            clean = anonymize_dataset(ds, ctx, in_place=True)
            with atomic_file(series_dir / f"{instance_index:05d}.dcm") as tmp:
                clean.save_as(tmp, enforce_file_format=True)


def anonymize_case(case_dir: Path, out_dir: Path, key: bytes, allow_burned_in: bool = False,
                   taken_ids: set[str] | None = None, raw_dir: Path | None = None) -> dict:
    """De-identify the DICOM files of one case into out_dir/<case_id>/ (all or nothing).

    The case ID is care-convert's: patient pseudonym + "-" + the keyed suffix of the raw folder name.
    A case folder whose stored fingerprint matches the raw case is kept as it is; otherwise it is
    rebuilt beside it and swapped in. `raw_dir` (default: the parent of `case_dir`) is the root the
    fingerprint's relative paths start from.
    """
    result = {"case_id": None, "status": "failed", "reason": "", "raw_folder": case_dir.name, "files": 0}
    tmp_dir: Path | None = None
    try:
        instances, identities = _scan_case(case_dir)
        if not instances:
            result.update(status="skipped", reason="the case has no DICOM files (non-DICOM files are not copied)")
            return result
        if len(identities) > 1:
            raise DeidError(f"the DICOM files of the case belong to {len(identities)} different patients")
        ctx = DeidContext(key=key, identity=identities.pop(), allow_burned_in=allow_burned_in)
        case_id = case_id_for(ctx.case_id, case_dir.name, key)
        result["case_id"] = case_id
        if taken_ids is not None:
            _claim(case_id, taken_ids)
        final_dir = out_dir / case_id
        fingerprint = case_fingerprint(case_dir, raw_dir or case_dir.parent, key)
        if final_dir.is_dir() and read_fingerprint(final_dir) == fingerprint:
            result.update(status="anonymized", reason="already present", files=len(instances))
            return result
        tmp_dir = make_staging_dir(out_dir, PARTIAL_PREFIX)
        _write_instances(tmp_dir, instances, ctx)
        (tmp_dir / FINGERPRINT_NAME).write_text(json.dumps(fingerprint, sort_keys=True) + "\n", encoding="ascii")
        # an interruption leaves the old case, the new one, or the old one aside as .<case_id>.previous
        # (the next run removes it and rebuilds the case), never a mixture
        replace_folder(tmp_dir, final_dir)
        tmp_dir = None
        result.update(status="anonymized", reason="", files=len(instances))
    except DeidError as exc:
        result["reason"] = str(exc)
    except Exception as exc:  # noqa: BLE001 - one case must never stop the others
        result["reason"] = f"unexpected error while de-identifying ({type(exc).__name__})"
    finally:
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return result


def _remove_case(final_dir: Path) -> None:
    aside = make_staging_dir(final_dir.parent, REPLACED_PREFIX)
    os.replace(final_dir, aside)
    shutil.rmtree(aside, ignore_errors=True)


def anonymize_tree(raw_dir: Path, out_dir: Path, key: bytes, allow_burned_in: bool = False,
                   progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """De-identify every case folder directly under raw_dir into out_dir.

    Returns one dict per case: case_id (None when unknown), status ("anonymized", "skipped" or
    "failed"), reason, files, and raw_folder. raw_folder is the raw name, for the operator's
    terminal only: never write it under out_dir. Case folders an earlier run wrote for these raw
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
            results.append(anonymize_case(case_dir, out_dir, key, allow_burned_in, taken, raw_dir))
            if progress is not None:
                progress(index, len(cases))
        results += [{"case_id": None, "status": "skipped", "reason": why, "raw_folder": name, "files": 0}
                    for name, why in linked]
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
