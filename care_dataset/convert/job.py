"""One conversion job: a raw case read, named by its keyed case ID, filtered, written, and recorded under
``out/.tmp/records/`` (what resuming and the final JSON files are built from). Runs in worker processes.
"""

from __future__ import annotations

import hashlib
import hmac
import shutil
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from care_dataset.convert.case import CaseError, LoadedCase, kept_slices_of, load_case, select_slices
from care_dataset.deid.pseudonyms import case_id_for, make_case_id, patient_identity
from care_dataset.files import write_json_atomic
from care_dataset.format import writer
from care_dataset.format.layout import TMP_DIR, content_checksum
from care_dataset.raw.discover import RawCase
from care_dataset.raw.image import geometry_of
from care_dataset.raw.profiles import Profile

RECORDS_DIR = "records"


@dataclass(frozen=True)
class CaseJob:
    """Everything one worker needs to convert one raw case (picklable)."""

    raw: RawCase
    raw_dir: Path
    out_dir: Path
    profile: Profile
    key: bytes = field(repr=False)
    storage: str
    fingerprint: str
    settings: str


@dataclass
class CaseOutcome:
    """Result of one raw case. ``raw_name`` and ``detail`` are for the operator's terminal only."""

    raw_name: str
    case_id: str | None
    status: str  # "converted" | "failed"
    reason: str
    detail: str = ""
    record: dict | None = None
    notes: list[str] = field(default_factory=list)  # without identifying values: for report.json


def header_check(header: Any, patient_id: str, key: bytes) -> dict[str, str]:
    """Keyed digests of the header's PatientName and PatientBirthDate, to compare the cases of one patient
    prefix without keeping the values; keyed with the prefix too, so they cannot link different patients.

    Names are compared without case and trailing empty components ("Doe^Jane" equals "DOE^JANE^^"). Empty
    values and volume files without a header give no digest.
    """
    if header is None:
        return {}
    values = {"name": str(header.get("PatientName", "") or "").strip().rstrip("^ ").casefold(),
              "birth_date": str(header.get("PatientBirthDate", "") or "").strip()}
    return {field_name: hmac.new(key, f"header-check\0{patient_id}\0{field_name}\0{value}".encode(
                "utf-8", "surrogateescape"), hashlib.sha256).hexdigest()[:16]
            for field_name, value in values.items() if value}


def image_geometry(image: sitk.Image) -> dict:
    """Size, spacing, origin and direction as JSON values (the canonical grid needs no orientation code)."""
    return {k: v for k, v in geometry_of(image).items() if k != "orientation"}


def _plain(value: Any) -> Any:
    """JSON-ready copy of a geometry value (numpy scalars/arrays and tuples to lists of Python numbers)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(v) for v in value]
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    return value


def slice_layout_fields(loaded: LoadedCase, kept: np.ndarray) -> dict:
    """``cases.json`` fields of a DICOM series whose slices are off its grid (none for any other case): the true
    position of each stored slice and, for a sheared (gantry-tilted) series, the tilt."""
    layout = loaded.layout
    if layout is None:
        return {}
    fields: dict[str, Any] = {"slice_positions": true_slice_positions(loaded, kept)}
    if layout.tilt_degrees is not None:
        fields["gantry_tilt_degrees"] = round(layout.tilt_degrees, 3)
    return fields


def true_slice_positions(loaded: LoadedCase, kept: np.ndarray) -> list[list[float]]:
    """Per stored slice, the true position (mm, LPS) of its voxel at row 0, column 0: that voxel's position on
    the canonical grid plus the offset of the original slice it comes from (found by its position)."""
    original = loaded.original
    to_physical = np.asarray(original["direction"], float).reshape(3, 3) * np.asarray(original["spacing"], float)
    corners = np.array([loaded.image.TransformIndexToPhysicalPoint((0, 0, int(k))) for k in kept])
    index = np.linalg.solve(to_physical, (corners - np.asarray(original["origin"], float)).T).T
    source = np.rint(index[:, 2]).astype(np.int64)
    if np.max(np.abs(index[:, 2] - source), initial=0) > 1e-3 or len(set(source.tolist())) != len(source):
        raise CaseError("the slice axis of this oblique series cannot be matched to the axial slices")
    return _plain(corners + loaded.layout.offsets[source])


def record_path(out_dir: Path, case_id: str) -> Path:
    return out_dir / TMP_DIR / RECORDS_DIR / f"{case_id}.json"


def discard_case(out_dir: Path, storage: str, case_id: str) -> None:
    """Remove every trace of a case: record, arrays and temporaries."""
    record_path(out_dir, case_id).unlink(missing_ok=True)
    writer.remove_case(out_dir, storage, case_id)
    for tmp in (out_dir / TMP_DIR).glob(f"{case_id}*"):
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink(missing_ok=True)


def read_case(job: CaseJob) -> LoadedCase | Exception:
    """First half of :func:`convert_case`: the ``LoadedCase``, or the exception that stopped reading it."""
    try:
        return load_case(job.raw, job.profile)
    except Exception as err:  # noqa: BLE001 - reported by convert_case, with the other failures
        return err


def convert_case(job: CaseJob, loaded: LoadedCase | Exception | None = None) -> CaseOutcome:
    """Convert one raw case; any failure leaves nothing behind and returns a failed outcome.

    ``loaded`` is what :func:`read_case` returned for ``job`` when it was read ahead; None reads it here.
    """
    raw, profile = job.raw, job.profile
    stage, case_id = "reading", None
    try:
        loaded = read_case(job) if loaded is None else loaded
        if isinstance(loaded, Exception):
            raise loaded
        patient_id = make_case_id(patient_identity(loaded.header, raw.key), job.key)
        case_id = case_id_for(patient_id, raw.key, job.key)
        stage = "filtering"
        image = sitk.GetArrayViewFromImage(loaded.image)  # (Z, Y, X), no copy: `loaded` outlives the views
        label = sitk.GetArrayViewFromImage(loaded.label)
        if image.shape != label.shape:
            raise CaseError(f"label array {label.shape[::-1]} does not match image array {image.shape[::-1]}")
        kept, before, after = select_slices(label, profile)
        image, label = kept_slices_of(image, kept, np.int16), kept_slices_of(label, kept, np.uint8)
        stage = "writing"
        with ThreadPoolExecutor(1) as hasher:  # hashing overlaps compression (both release the GIL)
            checksum = hasher.submit(content_checksum, image, label)
            writer.write_case(job.out_dir, job.storage, case_id, image, label)
        canonical = image_geometry(loaded.image)
        entry = {
            "num_slices": int(len(kept)),
            "kept_slices": kept.tolist(),
            "canonical": canonical,
            "spacing": canonical["spacing"],
            "original": _plain(dict(loaded.original)),
            "voxels_before": before,
            "voxels_after": after,
            "checksum": checksum.result(),
            **slice_layout_fields(loaded, kept),
        }
        record = {"case_id": case_id, "entry": entry, "fingerprint": job.fingerprint, "settings": job.settings,
                  "header_check": header_check(loaded.header, patient_id, job.key)}
        notes = [*(loaded.layout.notes() if loaded.layout is not None else []), *loaded.notes]
        if notes:
            record["notes"] = notes
        write_json_atomic(record_path(job.out_dir, case_id), record)
        reason = f"converted {len(kept)} of {canonical['size'][2]} axial slices"
        return CaseOutcome(raw.key, case_id, "converted", reason, record=record, notes=notes)
    except Exception as err:  # noqa: BLE001 - one case fails alone, whatever went wrong
        if case_id is not None:
            discard_case(job.out_dir, job.storage, case_id)
        if isinstance(err, CaseError):
            return CaseOutcome(raw.key, case_id, "failed", str(err))
        detail = " ".join("".join(traceback.format_exception_only(type(err), err)).split())
        reason = f"unexpected error ({type(err).__name__}) while {stage} the case"
        return CaseOutcome(raw.key, case_id, "failed", reason, detail=detail)
