"""Pseudonyms from a secret key: case IDs, remapped UIDs and per-patient date offsets.

A case ID is `prefix + "_" + the first 12 hex digits of HMAC-SHA256(key, identity)`, where the identity is
the DICOM PatientID ("issuer|id" when IssuerOfPatientID is present) or, without DICOM or with a placeholder
PatientID such as ANONYMOUS (`is_placeholder_id`), the case folder name. The case ID of one raw case folder
(`case_id_for`, care-convert and care-anonymize alike) is that patient pseudonym, "-", and a keyed suffix of the
folder's name, so every case of one patient shares the prefix (`patient_of`).
The same key gives the same IDs; the key is never written. A key has at least MIN_KEY_BYTES bytes, counted as
they are used: after trailing line ends are removed.

From the same key: UIDs map to "2.25.<decimal of the first 128 bits of HMAC-SHA256(key, uid)>" (the same
UID maps to the same new UID in every file, series and case), and each patient gets one date offset in
[-3650, -365] days from HMAC-SHA256(key, identity), so intervals survive.

This module needs no DICOM library, so `care-convert` on volume files never imports pydicom.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

KEY_ENV_VAR = "CARE_DEID_KEY"
MIN_KEY_BYTES = 16
NEW_KEY_BYTES = 32
KEYGEN_HINT = "make one with `care-keygen site.key`"
LINE_ENDS = b"\r\n"
# PatientIDs that name nobody (left by anonymising exports and scanner defaults), compared lower-case with
# everything but letters and digits removed; IDs made of zeros only, or of no letter or digit, count too.
PLACEHOLDER_PATIENT_IDS = frozenset({
    "anonymous", "anonymized", "anonymised", "anon", "deidentified", "removed", "redacted", "unknown", "unk",
    "none", "null", "nil", "na", "notavailable", "noid", "patient", "patientid", "id",
})
UID_ROOT = "2.25."
STANDARD_UID_ROOT = "1.2.840.10008."
DATE_OFFSET_RANGE = (-3650, -365)
CASE_SUFFIX_SEPARATOR = "-"
CASE_SUFFIX_HEX = 6


class KeyMissingError(ValueError):
    """No usable de-identification key: none given, unreadable, or shorter than MIN_KEY_BYTES."""


def key_problem(key: bytes, source: str) -> str | None:
    """Why `key` (from `source`, e.g. "the key file site.key") cannot be used, or None; never shows the key."""
    if len(key) >= MIN_KEY_BYTES:
        return None
    held = "is empty" if not key else f"holds only {len(key)} byte{'s' if len(key) > 1 else ''}"
    return (f"{source} {held}; a key needs at least {MIN_KEY_BYTES} bytes (trailing line ends not counted), "
            f"or anyone holding the output can try keys until the case IDs match: {KEYGEN_HINT}")


def new_key() -> bytes:
    """NEW_KEY_BYTES random bytes, the last no line end: a file holding them gives load_key all of them."""
    while (key := os.urandom(NEW_KEY_BYTES))[-1:] in (b"\r", b"\n"):
        pass
    return key


def key_file_exposure(key_file: Path) -> str | None:
    """A warning when group or others have any access to the key file (as ssh warns of private keys), else
    None."""
    try:
        mode = os.stat(key_file).st_mode & 0o777
    except OSError:
        return None
    if os.name != "posix" or not mode & 0o077:
        return None
    return (f"the key file {key_file} is open to group or others (mode {mode:04o}): whoever reads it can tell "
            f"who is who from the case IDs; run `chmod 600 {key_file}`")


def load_key(key_file: Path | None = None, env_var: str = KEY_ENV_VAR, random_key: bool = False) -> tuple[bytes, bool]:
    """The secret key and whether IDs made with it are reproducible.

    Order: `key_file` (its bytes), then the environment variable (its bytes: UTF-8 text as UTF-8), then
    `random_key` (new_key, not reproducible); trailing line ends (CR, LF) are removed from the file and the
    variable alike, so one secret gives one key either way. Raises KeyMissingError when none is given or it is
    shorter than MIN_KEY_BYTES.
    """
    if key_file is not None:
        if random_key:
            raise KeyMissingError("pass either --key-file or --random-key, not both")
        try:
            key = Path(key_file).read_bytes().rstrip(LINE_ENDS)
        except OSError as exc:
            raise KeyMissingError(f"cannot read the key file {key_file}: {exc.strerror}") from None
        return _checked(key, f"the key file {key_file}"), True
    env_value = os.environ.get(env_var, "")
    if env_value and not random_key:
        key = env_value.encode("utf-8", "surrogateescape").rstrip(LINE_ENDS)  # bytes not UTF-8 as they were set
        return _checked(key, f"the {env_var} environment variable"), True
    if random_key:
        return new_key(), False
    raise KeyMissingError(
        f"no de-identification key: pass --key-file FILE ({KEYGEN_HINT}), set the {env_var} environment "
        "variable, or pass --random-key (case IDs will then not be reproducible)"
    )


def _checked(key: bytes, source: str) -> bytes:
    if problem := key_problem(key, source):
        raise KeyMissingError(problem)
    return key


def _hmac(key: bytes, message: str) -> bytes:
    return hmac.new(key, message.encode("utf-8"), hashlib.sha256).digest()


def make_case_id(identity: str, key: bytes, prefix: str = "care") -> str:
    """`prefix_` + first 12 hex digits of HMAC-SHA256(key, identity)."""
    return f"{prefix}_{_hmac(key, identity).hex()[:12]}"


def is_placeholder_id(patient_id: str) -> bool:
    """True for a PatientID that names nobody: empty, zeros only, no letter or digit, or a placeholder word
    of PLACEHOLDER_PATIENT_IDS (any case, any punctuation: "ANONYMOUS", "N/A", "Unknown", "0000")."""
    letters_digits = "".join(ch for ch in str(patient_id).casefold() if ch.isalnum())
    return not letters_digits.strip("0") or letters_digits in PLACEHOLDER_PATIENT_IDS


def patient_identity(header: Mapping[str, Any] | Any | None, case_folder_name: str) -> str:
    """PatientID ("issuer|id" when IssuerOfPatientID is set) of a DICOM header (a pydicom Dataset or anything
    with ``get(keyword, default)``), else the case folder name (also for a placeholder PatientID)."""
    if header is not None:
        patient_id = str(header.get("PatientID", "") or "").strip()
        if not is_placeholder_id(patient_id):
            issuer = str(header.get("IssuerOfPatientID", "") or "").strip()
            return f"{issuer}|{patient_id}" if issuer else patient_id
    return case_folder_name


def date_offset_days(key: bytes, identity: str) -> int:
    """One offset per patient in DATE_OFFSET_RANGE (inclusive)."""
    low, high = DATE_OFFSET_RANGE
    digest = _hmac(key, "date-offset|" + identity)
    return low + int.from_bytes(digest[:8], "big") % (high - low + 1)


def remap_uid(uid: str, key: bytes) -> str:
    """Keyed, deterministic UID under 2.25.; well-known DICOM UIDs (1.2.840.10008.*) are kept."""
    uid = str(uid).strip().rstrip("\x00")
    if not uid or uid.startswith(STANDARD_UID_ROOT):
        return uid
    return UID_ROOT + str(int.from_bytes(_hmac(key, "uid|" + uid)[:16], "big"))


def case_suffix(patient_id: str, raw_name: str, key: bytes) -> str:
    """Stable per-raw-case suffix: keyed hash of the patient pseudonym and the raw case name."""
    message = f"case-suffix\0{patient_id}\0{raw_name}".encode("utf-8", "surrogateescape")
    return hmac.new(key, message, hashlib.sha256).hexdigest()[:CASE_SUFFIX_HEX]


def case_id_for(patient_id: str, raw_name: str, key: bytes) -> str:
    """The case ID of one raw case folder: patient pseudonym, separator, per-raw-case suffix (care-convert and
    care-anonymize name cases alike)."""
    return f"{patient_id}{CASE_SUFFIX_SEPARATOR}{case_suffix(patient_id, raw_name, key)}"


def patient_of(case_id: str) -> str:
    """The patient pseudonym of a case ID (the part before the last ``-``)."""
    patient, sep, _ = case_id.rpartition(CASE_SUFFIX_SEPARATOR)
    return patient if sep else case_id
