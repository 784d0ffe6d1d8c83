"""Leak scanner: search an output tree for identifying values taken from the raw tree.

Values collected from raw/:
- DICOM headers (DICOMDIR included): every value of an attribute whose Annex E action under the
  Modified Dates Option is not "keep" (as care_dataset.deid.annex_e resolves it), every free-text
  value (LT, ST, UT) and every text value of an overlay group (60xx), whatever the table says,
  at any sequence depth, and every string value of a private tag (UN values too when they decode
  to printable latin-1 text) but private creators (the vendor dictionary a block is read by). Only text VRs count (CS code strings and binary numbers are not
  searched).
  An element one of whose values breaks its value representation (control characters, or not the form
  of AS, DA, DT, TM, UI) is damaged (its length swallowed the elements after it): it is not searched
  (care-anonymize removes such an element; what it swallowed is searched where it is intact). A value
  under a public tag DICOM does not define (a damaged tag number; care-anonymize removes such elements)
  is searched unless it is numbers only or an attribute care-anonymize keeps holds it elsewhere in raw/
  (the tag number of a Manufacturer or a position, damaged). Runs of printable ASCII under 6
  characters in an undecodable element are not searched (they occur by chance in binary data).
  Person names are also split on "^" and "=" into components; dates (DA, and the date part of
  DT) are also searched as YYYY-MM-DD, YYYY/MM/DD and YYYY.MM.DD.
- every folder and file name under raw/ (each path component and its stem without extensions);
- NIfTI header text fields (descrip, aux_file, intent_name, db_name);
- NRRD and MetaImage header values (.nrrd, .nhdr, .mha, .mhd, as SimpleITK reads them, e.g. 3D
  Slicer segment names), except numbers-only values and ITK_/NRRD_ geometry keys;
- label names (quoted last column) in ITK-SNAP label description .txt files.

A value is skipped as too short or generic when it has fewer than 4 characters, has no letter
and fewer than 6 digits (short numbers; dates and UIDs stay), is made only of generic words
(GENERIC_WORDS: DICOM vocabulary, file-layout words, anatomy) and short numbers, or is a
well-known DICOM UID (1.2.840.10008.*).

Every file under out/ is read as bytes and searched, case-insensitively (ASCII), for the UTF-8
and latin-1 encodings of each value; so are the relative path names. A UID or decimal number counts
only as a whole: not where it is the start of a longer one (1.2.3 inside 1.2.34). In binary files (a NUL
byte in the first 8 KiB, or not UTF-8) only values of 6 or more bytes are searched: shorter
strings occur by chance in compressed data.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from pydicom.datadict import dictionary_has_tag, dictionary_VR, keyword_for_tag, repeater_has_tag
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag

from care_dataset.deid.annex_e import AnnexETable, load_basic_profile
from care_dataset.deid.anonymize import (element_action, has_damaged_value, is_non_dicom_name, is_overlay_group,
                                         iter_case_files, read_dicom)
from care_dataset.deid.pseudonyms import STANDARD_UID_ROOT
from care_dataset.raw.volume import NIFTI_SUFFIXES, itk_path

MIN_TEXT_LENGTH = 4
MIN_BINARY_LENGTH = 6
MIN_NUMBER_DIGITS = 6
CHUNK_BYTES = 8 << 20
MAX_RAW_TEXT_BYTES = 1024  # an undecodable element longer than this is binary, not text
NIFTI_TEXT_FIELDS = ("descrip", "aux_file", "intent_name", "db_name")
ITK_HEADER_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
ITK_GEOMETRY_KEY_PREFIXES = ("ITK_", "NRRD_")
METAIMAGE_UNKNOWN_MODALITY = "MET_MOD_UNKNOWN"
DOTTED_NUMBER = re.compile(r"-?[0-9]+(?:\.[0-9]+)+")  # UIDs and decimals: a match inside a longer one is not theirs
NUMBER_BYTES = b"0123456789."
NUMBER_SEPARATORS = re.compile(r"[\s,;()\[\]]+")
GENERIC_WORDS = frozenset("""
ct mr pt us cr dx mg nm ot sc rt seg sr pr ko doc text
yes no none null true false unknown other anonymous anonymized removed empty na n a
original derived primary secondary axial coronal sagittal oblique localizer scout topogram
helical spiral mode body filter standard soft bone lung head feet first ffs hfs ffp hfp
male female m f o left right anterior posterior superior inferior
image images img im series study studies dicom dicomdir dcm file files data dataset folder dir
label labels labelmap segmentation segmentations mask masks volume volumes slice slices
annotation annotations roi clear description descriptions export exports scan scans exam exams
examination patient patients
nifti nii gz nrrd mha mhd raw txt json pdf report reports readme metadata cases splits summary
background normal rectum rectal wall tumor tumour cancer lesion lumen colon sigmoid bladder
liver spleen kidney kidneys stomach gallbladder esophagus oesophagus pancreas duodenum
intestine small large adrenal gland femur of and the bone bones spine vertebra pelvis prostate
uterus fat muscle air gas organ organs
""".split())
TEXT_VRS = frozenset({"AE", "AS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"})
LABEL_LINE = re.compile(r'^\s*-?\d+(?:\s+-?[\d.]+){6,}\s+"(.*)"\s*$')
DATE_FORMATS = ("{y}-{m}-{d}", "{y}/{m}/{d}", "{y}.{m}.{d}")


@dataclass(frozen=True)
class Leak:
    """One identifying value found in a file's content or in a path name under out/."""

    path: str  # relative to out/, posix
    where: str  # "content" or "name"
    masked: str
    category: str
    display_path: str  # path with every identifying value in it masked

    def line(self) -> str:
        return f"{self.display_path}: {self.masked} ({self.category}, in {self.where})"


def mask(value: str) -> str:
    """First two characters and '***': enough to find the value, not enough to leak it."""
    return value[:2] + "***"


def is_meaningful(value: str) -> bool:
    """Whether a raw value is specific enough to search for (rule in the module docstring)."""
    value = value.strip()
    if len(value) < MIN_TEXT_LENGTH or value.startswith(STANDARD_UID_ROOT):
        return False
    lower = value.lower()
    if not any(c.isalpha() for c in lower):
        return sum(c.isdigit() for c in lower) >= MIN_NUMBER_DIGITS
    tokens = re.findall(r"[^\W_]+", lower)
    return not all(t in GENERIC_WORDS or (t.isdigit() and len(t) < MIN_NUMBER_DIGITS) for t in tokens)


# --- collecting values from raw/ -------------------------------------------------------------

def _date_forms(date8: str) -> list[str]:
    if len(date8) != 8 or not date8.isdigit():
        return []
    y, m, d = date8[:4], date8[4:6], date8[6:]
    return [date8] + [f.format(y=y, m=m, d=d) for f in DATE_FORMATS]


def _element_strings(elem) -> list[str]:
    value = elem.value
    if isinstance(value, (bytes, bytearray)):
        text = bytes(value).strip(b"\x00 ").decode("latin-1")
        return [text] if text.isprintable() else []
    if value is None:
        return []
    items = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
    out = []
    for item in items:
        if isinstance(item, (bytes, bytearray)):
            continue
        text = str(item).strip()
        if not text:
            continue
        if elem.VR == "PN":
            out.append(text)
            out.extend(re.split(r"[\^=]", text))
        elif elem.VR == "DA":
            for part in text.split("-"):
                out.extend(_date_forms(part.replace(".", "")) or [part])
        elif elem.VR == "DT":
            out.append(text)
            out.extend(_date_forms(text[:8]))
        else:
            out.append(text)
    return out


@dataclass
class _RawValues:
    """What the DICOM headers under raw/ hold: identifying values (value -> category), the values of attributes
    care-anonymize keeps, and values under public tags DICOM does not define. These count only when no kept
    attribute holds them: a damaged tag number moves a kept value (a Manufacturer) there."""

    found: dict[str, str]
    kept: set[str] = field(default_factory=set)
    undefined: dict[str, str] = field(default_factory=dict)

    def add_undefined(self) -> None:
        for value, category in self.undefined.items():
            if value not in self.kept:
                _add(self.found, value, category)


def _collect_dataset(ds: Dataset, table: AnnexETable, values: _RawValues) -> None:
    for tag in list(ds.keys()):
        if tag.element == 0 or tag.group == 0x0002 or tag.is_private_creator:
            continue
        try:
            elem = ds[tag]
        except Exception:  # noqa: BLE001 - damaged, or of an unknown VR: pydicom cannot decode the element
            if tag.is_private or _changed_by_deid(table, tag, dictionary_VR(tag) if dictionary_has_tag(tag) else "UN"):
                _collect_raw_text(ds.get_item(tag, keep_deferred=True), values.found)  # deferred: over 1 KiB
            continue
        if elem.VR == "SQ":
            for item in elem.value or []:
                _collect_dataset(item, table, values)
        elif (elem.VR in TEXT_VRS or (tag.is_private and elem.VR == "UN")) and not has_damaged_value(elem):
            _collect_element(tag, elem, table, values)


def _collect_element(tag: BaseTag, elem, table: AnnexETable, values: _RawValues) -> None:
    texts = _element_strings(elem)
    if tag.is_private:
        for text in texts:
            _add(values.found, text, "DICOM private tag")
    elif not (dictionary_has_tag(tag) or repeater_has_tag(tag)):
        category = f"DICOM attribute {tag}"
        values.undefined.update((t.strip(), category) for t in texts if not _numbers_only(t))
    elif _changed_by_deid(table, tag, elem.VR):
        for text in texts:
            _add(values.found, text, f"DICOM {elem.keyword or keyword_for_tag(tag) or 'attribute ' + str(tag)}")
    else:
        values.kept.update(t.strip() for t in texts)


def _changed_by_deid(table: AnnexETable, tag: BaseTag, vr: str) -> bool:
    """Whether care-anonymize changes this public element (so its values count as identifying)."""
    return is_overlay_group(tag.group) or element_action(table, int(tag), vr) != "K"


def _collect_raw_text(raw: Any, found: dict[str, str]) -> None:
    """The printable ASCII runs of an element pydicom cannot decode: it may still hold identifying text. Other
    bytes are binary data its damaged length swallowed (pixels, numbers), whose runs recur in any copy of them."""
    value = raw.value if isinstance(raw.value, bytes) else b""
    if len(value) <= MAX_RAW_TEXT_BYTES:
        for part in re.split(rb"[^\x20-\x7e]+|\\", value):
            if len(part.strip()) >= MIN_BINARY_LENGTH:  # shorter runs occur by chance in binary data
                _add(found, part.decode("ascii"), f"DICOM attribute {raw.tag} (undecodable)")


def _add(found: dict[str, str], value: str, category: str) -> None:
    value = value.strip()
    if value and value not in found and is_meaningful(value):
        found[value] = category


def _stem(name: str) -> str:
    return name.split(".", 1)[0] if not name.startswith(".") else name


def _nifti_strings(path: Path) -> list[str]:
    header = nib.load(str(path)).header
    keys = set(header.keys())
    out = []
    for name in NIFTI_TEXT_FIELDS:
        if name in keys:
            raw = np.asarray(header[name]).tobytes().split(b"\x00", 1)[0]
            out.append(raw.decode("latin-1"))
    return out


def _image_header_strings(path: Path) -> list[str]:
    """Text values of an NRRD or MetaImage header (numbers-only values and geometry keys left out)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(itk_path(path))
    reader.ReadImageInformation()
    out = []
    for key in reader.GetMetaDataKeys():
        value = reader.GetMetaData(key)
        if key.startswith(ITK_GEOMETRY_KEY_PREFIXES) or value == METAIMAGE_UNKNOWN_MODALITY:
            continue
        if not _numbers_only(value):
            out.append(value)
    return out


def _numbers_only(value: str) -> bool:
    """Whether `value` is a list of numbers, e.g. a color "0.5 0.2 0.1" or an extent "0 63 0 63 0 15"."""
    for token in NUMBER_SEPARATORS.split(value):
        if token:
            try:
                float(token)
            except ValueError:
                return False
    return True


def _label_names(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    names = []
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        m = LABEL_LINE.match(line)
        if m:
            names.append(m.group(1))
    return names


# volume files whose header text is collected: (name suffixes, reader of its strings, category)
VOLUME_HEADER_TEXT = (
    (NIFTI_SUFFIXES, _nifti_strings, "NIfTI header text"),
    (ITK_HEADER_SUFFIXES, _image_header_strings, "image header text"),
)


def collect_identifying_values(raw_dir: Path, table: AnnexETable | None = None) -> dict[str, str]:
    """value -> category for every identifying value found under raw_dir (rule in module docstring)."""
    table = table or load_basic_profile()
    raw_dir = Path(raw_dir)
    found: dict[str, str] = {}
    dicom_values = _RawValues(found)
    for path in iter_case_files(raw_dir):
        rel = path.relative_to(raw_dir)
        for i, part in enumerate(rel.parts):
            category = "file name" if i == len(rel.parts) - 1 else "folder name"
            _add(found, part, category)
            _add(found, _stem(part), category)
        name = path.name.lower()
        header = next(((read, category) for suffixes, read, category in VOLUME_HEADER_TEXT
                       if name.endswith(suffixes)), None)
        if header is not None:
            read, category = header
            try:
                for text in read(path):
                    _add(found, text, category)
            except Exception:  # noqa: BLE001 - an unreadable volume has no header text to collect
                pass
        elif name.endswith(".txt"):
            for text in _label_names(path):
                _add(found, text, "label name")
        elif not is_non_dicom_name(name):
            try:
                ds = read_dicom(path, header_only=True)
            except Exception:  # noqa: BLE001 - a broken file is still covered by its name
                ds = None
            if ds is not None:
                _collect_dataset(ds, table, dicom_values)
    dicom_values.add_undefined()
    return found


# --- scanning out/ ---------------------------------------------------------------------------

class _Matcher:
    """Multi-string search: numpy filters on 2- then 4-byte prefixes, exact checks at the survivors.

    Every pattern has at least 4 bytes (see is_meaningful).
    """

    def __init__(self, values: dict[str, str]):
        self.by_prefix: dict[bytes, dict[int, dict[bytes, str]]] = {}
        self.table2 = np.zeros(1 << 16, dtype=bool)
        self.max_len = 1
        for value in values:
            for encoding in ("utf-8", "latin-1"):
                try:
                    pattern = value.encode(encoding).lower()
                except UnicodeEncodeError:
                    continue
                if len(pattern) < 4:
                    continue
                self.by_prefix.setdefault(pattern[:4], {}).setdefault(len(pattern), {})[pattern] = value
                self.table2[pattern[0] | pattern[1] << 8] = True
                self.max_len = max(self.max_len, len(pattern))
        self.dotted = {value for value in values if DOTTED_NUMBER.fullmatch(value.strip())}
        self.prefix4 = np.array(sorted(int.from_bytes(p, "little") for p in self.by_prefix), dtype=np.uint32)

    def find(self, data: bytes, min_len: int) -> set[str]:
        found: set[str] = set()
        n = len(data)
        if n < 4 or not self.by_prefix:
            return found
        low = data.lower()
        even = np.frombuffer(low, dtype="<u2", count=n // 2)
        odd = np.frombuffer(low, dtype="<u2", offset=1, count=(n - 1) // 2)
        cand = np.concatenate([np.flatnonzero(self.table2[even]) * 2, np.flatnonzero(self.table2[odd]) * 2 + 1])
        cand = cand[cand + 4 <= n]
        arr = np.frombuffer(low, dtype=np.uint8)
        key4 = (arr[cand].astype(np.uint32) | arr[cand + 1].astype(np.uint32) << 8
                | arr[cand + 2].astype(np.uint32) << 16 | arr[cand + 3].astype(np.uint32) << 24)
        for pos in np.sort(cand[np.isin(key4, self.prefix4)]).tolist():
            for length, patterns in self.by_prefix[low[pos:pos + 4]].items():
                if length >= min_len:
                    value = patterns.get(low[pos:pos + length])
                    if value is not None and (value not in self.dotted or _stands_alone(low, pos, length)):
                        found.add(value)
        return found

    def scan_file(self, path: Path) -> set[str]:
        found: set[str] = set()
        overlap = self.max_len - 1
        with open(path, "rb") as f:
            head = f.read(CHUNK_BYTES)
            min_len = MIN_TEXT_LENGTH if _looks_like_text(head) else MIN_BINARY_LENGTH
            block = head
            while block:
                found |= self.find(block, min_len)
                more = f.read(CHUNK_BYTES)
                if not more:
                    break
                block = block[-overlap:] + more if overlap else more
        return found


def _stands_alone(data: bytes, pos: int, length: int) -> bool:
    """Whether the match at data[pos:pos + length] is a whole dotted number, not part of a longer one."""
    before = data[pos - 1:pos] if pos else b""
    after = data[pos + length:pos + length + 1]
    return not (before and before in NUMBER_BYTES) and not (after and after in NUMBER_BYTES)


def _looks_like_text(head: bytes) -> bool:
    sample = head[:8192]
    if b"\x00" in sample:
        return False
    try:
        sample.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start >= len(sample) - 3  # a character cut at the sample's end
    return True


def _walk(out_dir: Path) -> Iterable[tuple[Path, bool]]:
    for root, dirs, names in os.walk(out_dir):
        dirs.sort()
        for d in dirs:
            yield Path(root) / d, False
        for name in sorted(names):
            yield Path(root) / name, True


def scan_for_leaks(out_dir: Path, values: dict[str, str]) -> list[Leak]:
    """Every (file or path name, value) pair under out_dir where a raw value appears."""
    out_dir = Path(out_dir)
    matcher = _Matcher(values)
    leaks: list[Leak] = []
    for path, is_file in _walk(out_dir):
        rel = path.relative_to(out_dir).as_posix()
        display = masked_path(rel, matcher.find(rel.encode("utf-8"), MIN_TEXT_LENGTH))
        for value in sorted(matcher.find(path.name.encode("utf-8"), MIN_TEXT_LENGTH)):
            leaks.append(Leak(rel, "name", mask(value), values[value], display))
        if is_file and not path.is_symlink():
            for value in sorted(matcher.scan_file(path)):
                leaks.append(Leak(rel, "content", mask(value), values[value], display))
    return leaks


def masked_path(rel: str, values: Iterable[str]) -> str:
    """`rel` with every given value replaced by its mask."""
    for value in sorted(values, key=len, reverse=True):
        rel = re.sub(re.escape(value), lambda m: mask(m.group(0)), rel, flags=re.IGNORECASE)
    return rel
