"""Fuzzing harness for the input readers: seeded, mutated raw case folders through care-convert, care-anonymize,
care-verify and usam predict's image reader, and a table of what went wrong.

    python benchmarks/fuzz_inputs.py --cases 200 --seed 0 [--workdir DIR] [--timeout 60] [--batch 50]

Sources: the real GE 3-slice DICOM series with its NRRD labels and the TotalSegmentator NIfTI pair from
``../shared/data`` (each skipped with a note when absent), and small synthetic exports (``care-synth``'s writer,
64 x 64 x 8, messy). Case i gets mutation kind ``mutation_order(seed)[i % kinds]`` applied to a copy of a source
it applies to; every random choice comes from ``random.Random(f"{seed}:{i}")``, so a seed gives the same
case folders byte for byte. Cases run in batches (one raw/ folder per batch, so each command starts once per
batch); a command that times out, prints a traceback or exits with an unexpected code is rerun case by case to
find the culprit.

Categories (a case counts at most once per category and tool):
  traceback    a Python traceback on a command's output, an exit code other than 0/1 (2 for usage errors when
               run on a single case), or usam.predict.read_image raising anything but InputError
  hang         a case that, run alone, exceeds --timeout seconds in a command
  missing      care-convert: a raw case neither converted in report.json (via --private-map) nor named on a
               FAILED line; care-anonymize: cases with no line and no anonymized count to account for them
  unexplained  a failure reason that is empty, contains "unexpected error", or is only an exception type
               name (``ValueError``, ``(KeyError)``, ``KeyError: 'x'``)
  unreadable   a converted case that care_dataset.open_dataset cannot read back (or reads with wrong dtype or
               shape), or an anonymized file pydicom cannot read
  partial      a leftover staging or temporary name under an output after the command finished (``.tmp``
               outside ``.tmp/records``, ``.partial-``, ``.replaced-``, ``.previous``, ``.lock``)
  corrupt      a case converted (or read by read_image) although the mutation corrupted a compressed stream
               it holds (gzip CRC/length/body/magic, truncated .gz, damaged gzip-encoded NRRD data)
  leak         a care-verify finding in an output
Exit status 1 when any count is non-zero.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import random
import re
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import nibabel as nib
import numpy as np
import pydicom
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag
import SimpleITK as sitk

from care_dataset.format.reader import open_dataset
from care_dataset.synth.raw_export import write_raw_dataset

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
KEY = "fuzz-harness-key-0123456789abcdef"
CATEGORIES = ("traceback", "hang", "missing", "unexplained", "unreadable", "partial", "corrupt", "leak",
              "warning")
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
LABEL_WORDS = ("seg", "label")
START_UP_S = 60  # per command and batch, on top of --timeout per case
PROFILE = """name = "fuzz"
[classes]
names = ["background", "one", "two"]
[layout]
kind = "case_folders"
[labels]
patterns = ["*seg*", "*label*"]
values = { 0 = 0, 1 = 1, 2 = 2 }
unmapped = "background"
[slices]
keep_classes = [1, 2]
"""


# --- sources ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    name: str
    folder: Path


def prepare_sources(workdir: Path, seed: int) -> tuple[list[Source], list[str]]:
    """Template case folders under workdir/sources, and a note for each real source that is absent."""
    base = workdir / "sources"
    shutil.rmtree(base, ignore_errors=True)
    sources, notes = [], []
    ge, totalseg = SHARED / "dcmqi_ct3slice", SHARED / "totalseg_example_ct_sm"
    if (ge / "ct-3slice").is_dir() and (ge / "liver_spine_seg.nrrd").is_file():
        folder = base / "ge_dicom"
        shutil.copytree(ge / "ct-3slice", folder / "series")
        shutil.copy(ge / "liver_spine_seg.nrrd", folder)
        sources.append(Source("ge_dicom", folder))
    else:
        notes.append(f"note: GE DICOM source skipped: {ge} not found")
    if (totalseg / "example_ct_sm.nii.gz").is_file() and (totalseg / "example_seg.nii.gz").is_file():
        folder = base / "totalseg_nifti"
        folder.mkdir(parents=True)
        for name in ("example_ct_sm.nii.gz", "example_seg.nii.gz"):
            shutil.copy(totalseg / name, folder)
        sources.append(Source("totalseg_nifti", folder))
    else:
        notes.append(f"note: TotalSegmentator NIfTI source skipped: {totalseg} not found")
    written = write_raw_dataset(base / "synth_export", 3, seed, size=64, slices=8, messy=True)
    for index, case in enumerate(sorted(written)):
        sources.append(Source(f"synth_{index}", Path(shutil.move(case, base / f"synth_{index}"))))
    shutil.rmtree(base / "synth_export", ignore_errors=True)
    return sources, notes


# --- the files of a case ------------------------------------------------------------------------------------


@dataclass
class CaseFiles:
    dicom: list[Path] = field(default_factory=list)
    images: list[Path] = field(default_factory=list)
    labels: list[Path] = field(default_factory=list)
    descriptions: list[Path] = field(default_factory=list)

    @property
    def data(self) -> list[Path]:
        return self.dicom + self.images + self.labels


def is_volume(path: Path) -> bool:
    return path.name.lower().endswith(VOLUME_SUFFIXES)


def is_dicom(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(132)[128:] == b"DICM"


def case_files(case_dir: Path) -> CaseFiles:
    """Regular files of a case by role (DICOMDIR counts as neither slice nor volume)."""
    found = CaseFiles()
    for path in sorted(p for p in case_dir.rglob("*") if p.is_file() and not p.is_symlink()):
        lower = path.name.lower()
        if is_volume(path):
            (found.labels if any(w in lower for w in LABEL_WORDS) else found.images).append(path)
        elif lower.endswith(".txt"):
            found.descriptions.append(path)
        elif path.name != "DICOMDIR" and is_dicom(path):
            found.dicom.append(path)
    return found


def role_of(files: CaseFiles, path: Path) -> str:
    return "label" if path in files.labels else "image"


def describe(files: CaseFiles, path: Path) -> str:
    """'DICOM slice', 'label .nrrd', 'image .nii.gz': what a mutation touched, for the details."""
    if path in files.dicom:
        return "DICOM slice"
    return f"{role_of(files, path)} {next((s for s in VOLUME_SUFFIXES if path.name.lower().endswith(s)), '')}"


# --- byte helpers -------------------------------------------------------------------------------------------


def flip_bytes(data: bytes, start: int, end: int, rng: random.Random) -> bytes:
    """XOR 1-8 bytes in [start, end) with a non-zero value: the data always changes."""
    out = bytearray(data)
    end = max(min(end, len(out)), start + 1)
    for _ in range(rng.randint(1, 8)):
        out[rng.randrange(start, end)] ^= rng.randint(1, 255)
    return bytes(out)


def header_end(data: bytes, path: Path) -> int:
    """Where a file's header stops: DICOM before Pixel Data, NIfTI at 348, NRRD at its blank line."""
    if path.name.lower().endswith((".nii", ".nii.gz")):
        return 348
    if data.startswith(b"NRRD"):
        return data.find(b"\n\n") + 2 if b"\n\n" in data else len(data)
    pixel_tag = data.rfind(b"\xe0\x7f\x10\x00")
    return pixel_tag if pixel_tag > 132 else min(len(data), 1024)


def read_payload(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if path.name.endswith(".gz") else data


def write_payload(path: Path, data: bytes) -> None:
    path.write_bytes(gzip.compress(data, mtime=0) if path.name.endswith(".gz") else data)


def nrrd_is_gzip(data: bytes) -> bool:
    return data.startswith(b"NRRD") and b"encoding: gzip" in data[:header_end(data, Path("x.nrrd"))]


# --- mutations ----------------------------------------------------------------------------------------------
# Each takes (case folder, its files, rng) and returns (detail, role of a corrupted compressed stream or None).

Outcome = tuple[str, "str | None"]


def truncate_file(case: Path, files: CaseFiles, rng: random.Random) -> Outcome:
    target = rng.choice(files.data)
    data = target.read_bytes()
    cut = rng.randint(1, len(data) - 1) if rng.random() < 0.8 else rng.randint(len(data) // 2, len(data) - 1)
    target.write_bytes(data[:cut])
    compressed = target.name.endswith(".gz") or (nrrd_is_gzip(data) and cut >= header_end(data, target))
    return f"{describe(files, target)} cut to {cut}/{len(data)}", role_of(files, target) if compressed else None


def flip_header_bytes(case: Path, files: CaseFiles, rng: random.Random) -> Outcome:
    target = rng.choice(files.data)
    data = read_payload(target)
    start = 132 if is_dicom(target) else 0
    write_payload(target, flip_bytes(data, start, header_end(data, target), rng))
    return f"header of {describe(files, target)}", None


def flip_pixel_bytes(case: Path, files: CaseFiles, rng: random.Random) -> Outcome:
    target = rng.choice(files.data)
    data = read_payload(target)
    start = min(header_end(data, target) + 16, len(data) - 1)
    flipped = flip_bytes(data, start, len(data), rng)
    write_payload(target, flipped)
    damaged = nrrd_is_gzip(data) and gzip_stream_changed(data[start - 16:], flipped[start - 16:])
    return f"pixels of {describe(files, target)}", role_of(files, target) if damaged else None


def gzip_stream_changed(before: bytes, after: bytes) -> bool:
    """Whether a gzip stream no longer gives the same data with a valid checksum: a flipped bit in the unused
    parts of a deflate block header changes nothing a reader sees."""
    try:
        return gzip.decompress(after) != gzip.decompress(before)
    except (OSError, EOFError, zlib.error):
        return True


def edit_dicom(files: CaseFiles, rng: random.Random, edit: Callable[[pydicom.Dataset], None]) -> int:
    """Apply edit to one slice or to every slice; returns how many were edited."""
    targets = files.dicom if rng.random() < 0.5 else [rng.choice(files.dicom)]
    for path in targets:
        ds = pydicom.dcmread(path, force=True)
        edit(ds)
        ds.save_as(path, enforce_file_format=False)
    return len(targets)


ABSURD_TAGS = [
    ("PixelSpacing", ["0", "0"]), ("PixelSpacing", ["nan", "nan"]), ("PixelSpacing", ["1e308", "-1"]),
    ("PixelSpacing", ["abc", "1.0"]), ("ImagePositionPatient", ["nan", "0", "0"]),
    ("ImagePositionPatient", ["1e30", "1e30", "-1e30"]), ("ImageOrientationPatient", ["0"] * 6),
    ("ImageOrientationPatient", ["1", "0", "0", "1", "0", "0"]), ("SliceThickness", "-5"),
    ("RescaleIntercept", "nan"), ("RescaleSlope", "0"), ("RescaleSlope", "1e30"), ("RescaleIntercept", "inf"),
    ("Rows", 0), ("Columns", 65535), ("NumberOfFrames", "40"),
]


def set_raw(ds: pydicom.Dataset, keyword: str, value: Any) -> None:
    """Set ``keyword`` to ``value`` as the bytes a damaged file would hold, even where pydicom cannot hold the
    value (a DS of letters)."""
    tag = Tag(tag_for_keyword(keyword))
    vr = dictionary_VR(tag)
    if vr == "US":
        raw = struct.pack("<H", int(value))
    else:
        text = "\\".join(value) if isinstance(value, list) else str(value)
        raw = (text + " " * (len(text) % 2)).encode("ascii")
    ds._dict[tag] = RawDataElement(tag, vr, len(raw), raw, 0, ds.is_implicit_VR if ds.is_implicit_VR is not None
                                   else True, True)


def absurd_geometry_tags(case: Path, files: CaseFiles, rng: random.Random) -> Outcome:
    keyword, value = rng.choice(ABSURD_TAGS)
    n = edit_dicom(files, rng, lambda ds: set_raw(ds, keyword, value))
    return f"{keyword} = {value} in {n} slice(s)", None


MISSING_TAGS = ["ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns",
                "BitsAllocated", "PixelRepresentation", "RescaleSlope", "SliceThickness", "SOPClassUID",
                "SOPInstanceUID", "SeriesInstanceUID", "Modality", "PhotometricInterpretation"]


def missing_geometry_tags(case: Path, files: CaseFiles, rng: random.Random) -> Outcome:
    keyword = rng.choice(MISSING_TAGS)

    def drop(ds: pydicom.Dataset) -> None:
        if keyword in ds:
            delattr(ds, keyword)
        else:
            ds.Rows = 1
    n = edit_dicom(files, rng, drop)
    return f"no {keyword} in {n} slice(s)", None


def pixel_length_mismatch(case: Path, files: CaseFiles, rng: random.Random) -> Outcome:
    change = rng.choice(["shorter", "longer", "rows+1", "odd"])

    def edit(ds: pydicom.Dataset) -> None:
        pixels = ds.get((0x7FE0, 0x0010))
        if change == "rows+1" or pixels is None:
            ds.Rows = int(ds.get("Rows", 64)) + 1
        elif change == "shorter":
            pixels.value = pixels.value[: len(pixels.value) // 2]
        elif change == "longer":
            pixels.value = pixels.value + bytes(len(pixels.value) // 3 * 2)
        else:
            pixels.value = pixels.value[:-1]
    n = edit_dicom(files, rng, edit)
    return f"pixel data {change} in {n} slice(s)", None


WRONG_PIXEL_TAGS = [
    ("PhotometricInterpretation", "RGB"), ("PhotometricInterpretation", "PALETTE COLOR"),
    ("PhotometricInterpretation", "MONOCHROME1"), ("PhotometricInterpretation", "XYZ"),
    ("BitsAllocated", 8), ("BitsAllocated", 32), ("BitsAllocated", 1), ("BitsStored", 20), ("BitsStored", 0),
    ("HighBit", 31), ("PixelRepresentation", 1), ("PixelRepresentation", 7), ("SamplesPerPixel", 3),
]


def wrong_photometric_bit_depth(case: Path, files: CaseFiles, rng: random.Random) -> Outcome:
    keyword, value = rng.choice(WRONG_PIXEL_TAGS)
    n = edit_dicom(files, rng, lambda ds: setattr(ds, keyword, value))
    return f"{keyword} = {value} in {n} slice(s)", None


def shuffle_slices(case: Path, files: CaseFiles, rng: random.Random) -> Outcome:
    """Slice contents moved to other slices' names, and InstanceNumbers shuffled."""
    paths = list(files.dicom)
    contents = [p.read_bytes() for p in paths]
    shift = rng.randint(1, len(paths) - 1)
    for path, data in zip(paths, contents[shift:] + contents[:shift]):
        path.write_bytes(data)
    numbers = list(range(1, len(paths) + 1))
    rng.shuffle(numbers)
    for path, number in zip(paths, numbers):
        ds = pydicom.dcmread(path, force=True)
        ds.InstanceNumber = number
        ds.save_as(path, enforce_file_format=False)
    return f"{len(paths)} slices shifted by {shift}", None


def duplicate_slice(case: Path, files: CaseFiles, rng: random.Random) -> Outcome:
    source = rng.choice(files.dicom)
    copy = source.with_name(f"dup_{rng.randint(0, 999)}_{source.name}")
    shutil.copy(source, copy)
    if rng.random() < 0.5:
        ds = pydicom.dcmread(copy, force=True)
        ds.SOPInstanceUID = f"2.25.{rng.getrandbits(96)}"
        ds.save_as(copy, enforce_file_format=False)
        return "slice copied with a new SOPInstanceUID", None
    return "slice copied byte for byte", None


def delete_slices(case: Path, files: CaseFiles, rng: random.Random) -> Outcome:
    slices = list(files.dicom)
    doomed = rng.sample(slices, rng.randint(1, len(slices) - 1)) if len(slices) > 1 else slices
    for path in doomed:
        path.unlink()
    return f"{len(doomed)} of {len(slices)} slices deleted", None


def gzip_target(files: CaseFiles, rng: random.Random) -> Path:
    """A .nii.gz of the case; an uncompressed NIfTI is gzipped (validly) first."""
    compressed = [p for p in files.images + files.labels if p.name.endswith(".nii.gz")]
    if compressed:
        return rng.choice(compressed)
    plain = rng.choice([p for p in files.images + files.labels if p.name.endswith(".nii")])
    target = plain.with_name(plain.name + ".gz")
    target.write_bytes(gzip.compress(plain.read_bytes(), mtime=0))
    plain.unlink()
    (files.labels if plain in files.labels else files.images).append(target)
    return target


def corrupt_gzip(case: Path, files: CaseFiles, rng: random.Random) -> Outcome:
    target = gzip_target(files, rng)
    data = bytearray(target.read_bytes())
    how = rng.choice(["crc", "length", "body", "magic", "truncated"])
    if how == "crc":
        data[-8 + rng.randrange(4)] ^= rng.randint(1, 255)
    elif how == "length":
        data[-4 + rng.randrange(4)] ^= rng.randint(1, 255)
    elif how == "body":
        data = bytearray(flip_bytes(bytes(data), 10, len(data) - 8, rng))
    elif how == "magic":
        data[rng.randrange(2)] ^= rng.randint(1, 255)
    else:
        data = data[: rng.randint(len(data) // 2, len(data) - 9)]
    target.write_bytes(bytes(data))
    return f"gzip {how}", role_of(files, target)


NIFTI_FIELDS = [  # (offset, struct format, absurd values)
    (0, "<i", [0, 540, -348]), (40, "<h", [9, 0, -1]), (42, "<h", [0, -5, 32767]), (44, "<h", [0, 32767]),
    (46, "<h", [0, -3]), (70, "<h", [999, 0, 2048]), (72, "<h", [3, 64]), (80, "<f", [0.0, -1.0, float("nan")]),
    (84, "<f", [float("inf"), 1e30]), (88, "<f", [0.0, float("nan")]), (108, "<f", [1e9, 0.0, -352.0]),
    (112, "<f", [float("nan"), float("inf"), 0.0]), (116, "<f", [float("nan"), 1e30]),
    (252, "<h", [7, -1]), (254, "<h", [9, -2]), (280, "<f", [float("nan"), 1e30, 0.0]),
    (344, "4s", [b"n+9\x00", b"\xff\xff\xff\xff"]),
]


def garbage_nifti_header(case: Path, files: CaseFiles, rng: random.Random) -> Outcome:
    target = rng.choice([p for p in files.images + files.labels if p.name.endswith((".nii", ".nii.gz"))])
    data = bytearray(read_payload(target))
    offset, fmt, values = rng.choice(NIFTI_FIELDS)
    value = rng.choice(values)
    if struct.pack(fmt, value) == bytes(data[offset:offset + struct.calcsize(fmt)]):
        value = values[(values.index(value) + 1) % len(values)]
    struct.pack_into(fmt, data, offset, value)
    write_payload(target, bytes(data))
    return f"NIfTI header byte {offset} = {value!r} ({role_of(files, target)})", None


NRRD_EDITS = [
    ("sizes:", "sizes: 512 512 4"), ("sizes:", "sizes: 0 512 3"), ("sizes:", None), ("type:", "type: quad"),
    ("type:", "type: float"), ("dimension:", "dimension: 7"), ("dimension:", "dimension: 2"),
    ("encoding:", "encoding: bogus"), ("encoding:", "encoding: raw"), ("endian:", "endian: big"),
    ("space directions:", "space directions: (nan,0,0) (0,0,0) (0,0,inf)"), ("space directions:", None),
    ("space origin:", "space origin: (1e308,abc,)"), ("kinds:", "kinds: RGB-color domain domain"),
    ("type:", "type: short\ndata file: missing_data.raw"), ("type:", "type: short\n\x00\xff\xfe garbage"),
]


def garbage_nrrd_header(case: Path, files: CaseFiles, rng: random.Random) -> Outcome:
    target = rng.choice([p for p in files.images + files.labels if p.suffix == ".nrrd"])
    data = target.read_bytes()
    end = header_end(data, target)
    lines = data[:end].decode("latin-1").split("\n")
    key, new = rng.choice(NRRD_EDITS)
    edited = [line for line in lines if not line.startswith(key)] if new is None else \
        [new if line.startswith(key) else line for line in lines]
    target.write_bytes("\n".join(edited).encode("latin-1") + data[end:])
    return f"NRRD {key} -> {new!r}", None


def save_nifti(image: nib.Nifti1Image, path: Path) -> None:
    write_payload(path, image.to_bytes())


def nan_inf_voxels(case: Path, files: CaseFiles, rng: random.Random) -> Outcome:
    target = rng.choice([p for p in files.images + files.labels if p.name.endswith((".nii", ".nii.gz"))])
    image = nib.load(target)
    data = np.asarray(image.dataobj, dtype=np.float32).copy()
    nprng = np.random.default_rng(rng.getrandbits(32))
    share = rng.choice([1e-4, 0.01, 1.0])
    mask = nprng.random(data.shape) < share
    mask.flat[0] = True
    data[mask] = nprng.choice(np.array([np.nan, np.inf, -np.inf], np.float32), int(mask.sum()))
    header = image.header.copy()
    header.set_data_dtype(np.float32)
    header["scl_slope"], header["scl_inter"] = 1, 0
    save_nifti(nib.Nifti1Image(data, image.affine, header), target)
    return f"{share:g} of the {role_of(files, target)} voxels NaN/inf", None


def write_label_like(target: Path, image: sitk.Image) -> None:
    sitk.WriteImage(image, str(target), False)
    if target.name.endswith(".gz"):  # ITK's gzip carries no time stamp, but recompress to be sure
        target.write_bytes(gzip.compress(gzip.decompress(target.read_bytes()), mtime=0))


def label_4d(case: Path, files: CaseFiles, rng: random.Random) -> Outcome:
    target = rng.choice(files.labels)
    label = sitk.ReadImage(str(target))
    frames = rng.choice([1, 2])
    write_label_like(target, sitk.JoinSeries([label] * frames))
    return f"label with a 4th axis of {frames}", None


def label_grid_off_by_one(case: Path, files: CaseFiles, rng: random.Random) -> Outcome:
    target = rng.choice(files.labels)
    label = sitk.ReadImage(str(target))
    axis, how = rng.randrange(3), rng.choice(["pad", "crop", "shift"])
    bound = [0, 0, 0]
    bound[axis] = 1
    if how == "pad":
        label = sitk.ConstantPad(label, [0, 0, 0], bound, 0)
    elif how == "crop":
        label = sitk.Crop(label, [0, 0, 0], bound)
    else:
        origin = list(label.GetOrigin())
        origin[axis] += label.GetSpacing()[axis]
        label.SetOrigin(origin)
    write_label_like(target, label)
    return f"label grid {how} 1 voxel along axis {axis}", None


def garbage_label_description(case: Path, files: CaseFiles, rng: random.Random) -> Outcome:
    target = files.descriptions[0] if files.descriptions else case / "labels.txt"
    how = rng.choice(["binary", "malformed", "latin1", "huge", "long_line", "nul"])
    nprng = np.random.default_rng(rng.getrandbits(32))
    text = {
        "binary": lambda: nprng.bytes(4096),
        "malformed": lambda: b'1 255 0\n2 a b c d e f "unterminated\n-7 999 999 999 2 1 1 "x"\n"\n',
        "latin1": lambda: '1 255 0 0 1 1 1 "R\xe9ctum \xe4\xf6"\n'.encode("latin-1"),
        "huge": lambda: b"".join(b'%d 1 2 3 1 1 1 "label %d"\n' % (i, i) for i in range(200_000)),
        "long_line": lambda: b'1 0 0 0 1 1 1 "' + b"x" * 2_000_000,
        "nul": lambda: b'0 0 0 0 0 0 0 "Clear Label"\n\x00\x00\x001 255 0 0 1 1 1 "rectum"\n',
    }[how]()
    target.write_bytes(text)
    return f"label description {how} ({len(text)} bytes)", None


ODD_NAMES = ["Ünïcødé_雪\u200b", "line\nbreak", "tab\tand\rcr", "-rf --help", "x" * 200, ":*?<>|", " spaced "]


def odd_name(rng: random.Random) -> str:
    if rng.random() < 0.15:
        return os.fsdecode(b"bad\xff\xfeutf8")
    return rng.choice(ODD_NAMES)


def unicode_newline_names(case: Path, files: CaseFiles, rng: random.Random) -> Outcome:
    target = rng.choice(files.data + [p.parent for p in files.dicom[:1]])
    if target == case:
        target = rng.choice(files.data)
    name = odd_name(rng)
    lower = target.name.lower()
    suffix = next((s for s in VOLUME_SUFFIXES if lower.endswith(s)), "")
    keep = "seg" if target in files.labels else ""
    new = target.with_name(f"{name}{keep}{suffix}")
    if new == target or new.exists():
        new = target.with_name(f"{name}_{target.name}")
    target.rename(new)
    return f"renamed to an odd name ({'folder' if new.is_dir() else 'file'})", None


def symlink_loop(case: Path, files: CaseFiles, rng: random.Random) -> Outcome:
    how = rng.choice(["self", "parent", "pair", "root"])
    where = rng.choice([case] + [p.parent for p in files.dicom[:1]])
    if how == "pair":
        os.symlink("loop_b", where / "loop_a")
        os.symlink("loop_a", where / "loop_b")
    else:
        os.symlink({"self": ".", "parent": "..", "root": os.path.relpath(case, where)}[how], where / f"loop_{how}")
    return f"symbolic link loop ({how})", None


def dangling_links(case: Path, files: CaseFiles, rng: random.Random) -> Outcome:
    name = rng.choice(["IM_9999.dcm", "missing_seg.nii.gz", "gone", "DICOMDIR"])
    where = rng.choice([case] + [p.parent for p in files.dicom[:1]])
    if not (where / name).exists() and not (where / name).is_symlink():
        os.symlink("does/not/exist", where / name)
    else:
        os.symlink("does/not/exist", where / f"dangling_{name}")
    return f"dangling link {name}", None


def empty_files(case: Path, files: CaseFiles, rng: random.Random) -> Outcome:
    how = rng.choice(["data", "extra_dcm", "extra_label"])
    if how == "data":
        target = rng.choice(files.data)
        target.write_bytes(b"")
        return f"empty {describe(files, target)}", None
    (case / ("empty.dcm" if how == "extra_dcm" else "empty_seg.nii.gz")).write_bytes(b"")
    return f"empty {how}", None


def stray_files(case: Path, files: CaseFiles, rng: random.Random) -> Outcome:
    nprng = np.random.default_rng(rng.getrandbits(32))
    how = rng.choice(["thumbs_dicm", "ds_store", "pdf", "dicomdir"])
    where = rng.choice([case] + [p.parent for p in files.dicom[:1]])
    name, data = {
        "thumbs_dicm": ("Thumbs.db", bytes(128) + b"DICM" + nprng.bytes(300)),
        "ds_store": (".DS_Store", b"\x00\x00\x00\x01Bud1" + nprng.bytes(200)),
        "pdf": ("report.pdf", b"%PDF-1.4\n" + nprng.bytes(500)),
        "dicomdir": ("DICOMDIR", bytes(128) + b"DICM" + b"\x02\x00\x00\x00UL\x04\x00\xff\xff\xff\x7f"),
    }[how]
    target = where / name
    if target.exists():
        target = where / f"stray_{name}"
    target.write_bytes(data)
    return f"stray file {how}", None


def has_dicom(f: CaseFiles) -> bool:
    return bool(f.dicom)


def has_nifti(f: CaseFiles) -> bool:
    return any(p.name.endswith((".nii", ".nii.gz")) for p in f.images + f.labels)


# kind -> (applies to a case's files, mutation)
MUTATIONS: dict[str, tuple[Callable[[CaseFiles], bool], Callable[[Path, CaseFiles, random.Random], Outcome]]] = {
    "truncated_file": (lambda f: bool(f.data), truncate_file),
    "flipped_header_bytes": (lambda f: bool(f.data), flip_header_bytes),
    "flipped_pixel_bytes": (lambda f: bool(f.data), flip_pixel_bytes),
    "absurd_geometry_tags": (has_dicom, absurd_geometry_tags),
    "missing_geometry_tags": (has_dicom, missing_geometry_tags),
    "pixel_length_mismatch": (has_dicom, pixel_length_mismatch),
    "wrong_photometric_bit_depth": (has_dicom, wrong_photometric_bit_depth),
    "shuffled_slices": (lambda f: len(f.dicom) > 1, shuffle_slices),
    "duplicated_slice": (has_dicom, duplicate_slice),
    "deleted_slices": (has_dicom, delete_slices),
    "corrupt_gzip": (has_nifti, corrupt_gzip),
    "garbage_nifti_header": (has_nifti, garbage_nifti_header),
    "garbage_nrrd_header": (lambda f: any(p.suffix == ".nrrd" for p in f.images + f.labels), garbage_nrrd_header),
    "nan_inf_voxels": (has_nifti, nan_inf_voxels),
    "label_4d": (lambda f: bool(f.labels), label_4d),
    "label_grid_off_by_one": (lambda f: bool(f.labels), label_grid_off_by_one),
    "garbage_label_description": (lambda f: True, garbage_label_description),
    "unicode_newline_names": (lambda f: bool(f.data), unicode_newline_names),
    "symlink_loop": (lambda f: True, symlink_loop),
    "dangling_link": (lambda f: True, dangling_links),
    "empty_files": (lambda f: bool(f.data), empty_files),
    "stray_files": (lambda f: True, stray_files),
}


# --- cases --------------------------------------------------------------------------------------------------


@dataclass
class FuzzCase:
    name: str
    source: str
    kind: str
    detail: str
    corrupt_role: str | None  # "image" / "label" when the mutation corrupted that file's compressed stream
    folder: Path


def case_name(index: int) -> str:
    return f"case{index:05d}"


def mutation_order(seed: int) -> list[str]:
    kinds = sorted(MUTATIONS)
    random.Random(f"order:{seed}").shuffle(kinds)
    return kinds


def make_case(index: int, seed: int, sources: list[Source], raw_dir: Path, kind: str | None = None) -> FuzzCase:
    """Copy a source the case's mutation applies to into raw_dir/<case name> and mutate it."""
    rng = random.Random(f"{seed}:{index}")
    kinds = mutation_order(seed)
    kind = kind or kinds[index % len(kinds)]
    applies, mutate = MUTATIONS[kind]
    usable = [s for s in sources if applies(case_files(s.folder))]
    if not usable:  # e.g. no NRRD without the real GE source: fall back to a kind that applies to all
        kind, (applies, mutate) = "truncated_file", MUTATIONS["truncated_file"]
        usable = sources
    source = rng.choice(usable)
    folder = raw_dir / case_name(index)
    shutil.copytree(source.folder, folder, symlinks=True)
    detail, corrupt_role = mutate(folder, case_files(folder), rng)
    return FuzzCase(case_name(index), source.name, kind, detail, corrupt_role, folder)


def tree_digest(folder: Path) -> list[tuple[str, str]]:
    """(relative path, content or link target) of everything under folder: equal lists, equal trees."""
    entries = []
    for root, dirs, names in os.walk(folder):
        for name in sorted(dirs + names):
            path = Path(root) / name
            rel = os.fsencode(path.relative_to(folder)).hex()
            if path.is_symlink():
                entries.append((rel, "link:" + os.readlink(path)))
            elif path.is_file():
                entries.append((rel, hashlib.sha256(path.read_bytes()).hexdigest()))
            else:
                entries.append((rel, "dir"))
    return sorted(entries)


# --- running the commands -----------------------------------------------------------------------------------


@dataclass
class Run:
    returncode: int | None  # None: killed at the time limit
    stdout: str
    stderr: str


def command(name: str) -> list[str]:
    script = Path(sys.executable).parent / name
    return [str(script)] if script.exists() else [shutil.which(name) or name]


def tool_env() -> dict[str, str]:
    paths = [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return dict(os.environ, CARE_DEID_KEY=KEY, PYTHONPATH=os.pathsep.join(paths))


def run_command(args: list[str], timeout: float, cwd: Path) -> Run:
    """Run in its own process group; on the time limit the whole group is killed."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd, env=tool_env(),
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        return Run(proc.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return Run(None, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"))


def has_traceback(run: Run) -> bool:
    return "Traceback (most recent call last)" in run.stdout + run.stderr


UNEXPLAINED = re.compile(r"unexpected error|^\(?[A-Za-z_.]*(Error|Exception|Warning|Interrupt)\)?(:.*)?$",
                         re.IGNORECASE)


def is_unexplained(reason: str) -> bool:
    """A failure reason a user cannot act on: empty, 'unexpected error ...', or a bare exception type."""
    reason = reason.strip()
    return not reason or bool(UNEXPLAINED.search(reason))


def failure_lines(text: str, names: set[str], words: tuple[str, ...]) -> dict[str, tuple[str, str]]:
    """case name -> (word, reason) from lines '<word> <raw folder>: <reason>' naming one of our cases."""
    found = {}
    for line in text.splitlines():
        word = next((w for w in words if line.startswith(w + " ")), None)
        match = re.search(r"(case\d{5})[^:]*: ?(.*)$", line) if word else None
        if match and match.group(1) in names:
            found[match.group(1)] = (word, match.group(2))
    return found


PARTIAL_NAME = re.compile(r"^\.partial-|^\.replaced-|\.previous$|\.tmp(\.|$)|^\.lock$")


def partial_files(out: Path) -> list[str]:
    """Staging and temporary names left under an output (care-convert's .tmp/records is its resume state)."""
    leftovers = []
    for root, dirs, names in os.walk(out):
        rel = Path(root).relative_to(out)
        for name in dirs + names:
            path = rel / name
            if path.parts in ((".tmp",), (".tmp", "records")):
                continue
            stray_in_tmp = path.parts[0] == ".tmp" and path.parts[1] != "records"
            if stray_in_tmp or PARTIAL_NAME.search(name):
                leftovers.append(str(path))
    return leftovers


WARNING_LINE = re.compile(r"^\S.*:\d+: \w*Warning: |^WARNING: ")


def warnings_on_terminal(run: Run, names: set[str]) -> dict[str, str]:
    """Library warnings printed by a command (Python's warnings, ITK's): case name (or '') -> first line."""
    lines = (run.stderr + "\n" + run.stdout).splitlines()
    found = {}
    for index, line in enumerate(lines):
        if WARNING_LINE.search(line):
            near = " ".join(lines[index:index + 2])
            match = re.search(r"case\d{5}", near)
            who = match.group(0) if match and match.group(0) in names else ""
            found.setdefault(who, line[:160])
    return found


@dataclass
class Findings:
    """category -> tool -> case names (or batch labels for what no case can be named for)."""
    items: dict[str, dict[str, set[str]]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(set)))
    notes: list[str] = field(default_factory=list)

    def add(self, category: str, tool: str, who: str, note: str = "") -> None:
        self.items[category][tool].add(who)
        if note:
            self.notes.append(f"{category} [{tool}] {who}: {note}")

    def count(self, category: str) -> int:
        return sum(len(v) for v in self.items[category].values())

    def cases_in(self, category: str) -> set[str]:
        return set().union(*self.items[category].values()) if self.items[category] else set()


def note_warnings(tool: str, run: Run, names: set[str], fallback: str, findings: Findings) -> None:
    for who, line in warnings_on_terminal(run, names).items():
        findings.add("warning", tool, who or fallback, line)


def single_case_raw(case: FuzzCase, where: Path) -> Path:
    return raw_of([case], where)


def run_alone(tool: str, args: Callable[[Path, Path], list[str]], cases: list[FuzzCase], work: Path,
              timeout: float, findings: Findings) -> dict[str, Run]:
    """Rerun a command on each case alone (after a batch run misbehaved) and record hangs and tracebacks."""
    runs = {}
    for case in cases:
        where = Path(tempfile.mkdtemp(prefix=f"{tool}-{case.name}-", dir=work))
        raw = single_case_raw(case, where)
        run = run_command(args(raw, where), timeout + START_UP_S / 4, where)
        if run.returncode is None:
            findings.add("hang", tool, case.name)
        elif has_traceback(run) or run.returncode not in (0, 1, 2):
            findings.add("traceback", tool, case.name, last_lines(run))
        runs[case.name] = run
    return runs


def last_lines(run: Run, n: int = 3) -> str:
    return " | ".join((run.stderr or run.stdout).strip().splitlines()[-n:])


def batch_misbehaved(run: Run) -> bool:
    return run.returncode is None or has_traceback(run) or run.returncode not in (0, 1)


def convert_args(profile: Path) -> Callable[[Path, Path], list[str]]:
    return lambda raw, where: command("care-convert") + [str(raw), str(where / "convert"), "--profile",
                                                         str(profile), "--quiet", "--private-map",
                                                         str(where / "private_map.json")]


def anonymize_args(raw: Path, where: Path) -> list[str]:
    return command("care-anonymize") + [str(raw), str(where / "anonymized")]


# --- checks per command -------------------------------------------------------------------------------------


def check_convert(cases: list[FuzzCase], raw: Path, batch: Path, timeout: float, profile: Path,
                  findings: Findings) -> dict[str, str]:
    """Run care-convert on the batch; returns case name -> case ID of the converted cases."""
    args = convert_args(profile)
    run = run_command(args(raw, batch), START_UP_S + timeout * len(cases), batch)
    if batch_misbehaved(run):
        runs = run_alone("care-convert", args, cases, batch, timeout, findings)
        return convert_alone_results(cases, batch, runs, findings)
    return convert_results(cases, batch, run, batch, findings)


def convert_alone_results(cases: list[FuzzCase], batch: Path, runs: dict[str, Run],
                          findings: Findings) -> dict[str, str]:
    converted = {}
    for case in cases:
        where = next(batch.glob(f"care-convert-{case.name}-*"))
        run = runs[case.name]
        if run.returncode == 2 and not has_traceback(run):  # a whole-run refusal caused by this one case
            reason = last_lines(run, 1).split("error: ", 1)[-1]
            if is_unexplained(reason):
                findings.add("unexplained", "care-convert", case.name, reason)
            continue
        if run.returncode is not None:
            converted.update(convert_results([case], where, run, where, findings))
    return converted


def convert_results(cases: list[FuzzCase], where: Path, run: Run, batch: Path, findings: Findings) -> dict[str, str]:
    out, names = where / "convert", {c.name for c in cases}
    private = json.loads((where / "private_map.json").read_text()) if (where / "private_map.json").exists() else {}
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else []
    ok_ids = {e["case_id"] for e in report if e.get("status") == "converted"}
    failed = failure_lines(run.stderr + "\n" + run.stdout, names, ("FAILED",))
    note_warnings("care-convert", run, names, batch.name, findings)
    converted = {}
    for case in cases:
        case_id = private.get(case.name)
        if case_id in ok_ids:
            converted[case.name] = case_id
        elif case.name in failed:
            if is_unexplained(failed[case.name][1]):
                findings.add("unexplained", "care-convert", case.name, failed[case.name][1])
        else:
            findings.add("missing", "care-convert", case.name)
    for leftover in partial_files(out):
        findings.add("partial", "care-convert", owner_of(leftover, private, batch.name), leftover)
    check_readable(out, converted, findings)
    for name in converted:
        if by_name(cases, name).corrupt_role:
            findings.add("corrupt", "care-convert", name, by_name(cases, name).detail)
    return converted


def by_name(cases: list[FuzzCase], name: str) -> FuzzCase:
    return next(c for c in cases if c.name == name)


def owner_of(path: str, case_ids: dict[str, str | None], fallback: str) -> str:
    """The case whose ID a leftover path names, else the batch."""
    return next((name for name, case_id in case_ids.items() if case_id and case_id in path), fallback)


def check_readable(out: Path, converted: dict[str, str], findings: Findings) -> None:
    if not converted:
        return
    try:
        dataset = open_dataset(out)
    except Exception as error:  # noqa: BLE001 - any failure to open is the finding
        for name in converted:
            findings.add("unreadable", "care_dataset.open_dataset", name, type(error).__name__)
        return
    for name, case_id in converted.items():
        try:
            image, label = dataset.read_case(case_id)
            if image.dtype != np.int16 or label.dtype != np.uint8 or image.shape != label.shape or not len(image):
                raise ValueError(f"image {image.dtype}{image.shape}, label {label.dtype}{label.shape}")
        except Exception as error:  # noqa: BLE001
            findings.add("unreadable", "care_dataset.open_dataset", name, f"{type(error).__name__}: {error}"[:200])


def check_anonymize(cases: list[FuzzCase], raw: Path, batch: Path, timeout: float, ids: dict[str, str],
                    findings: Findings) -> None:
    run = run_command(anonymize_args(raw, batch), START_UP_S + timeout * len(cases), batch)
    if batch_misbehaved(run):
        runs = run_alone("care-anonymize", anonymize_args, cases, batch, timeout, findings)
        for case in cases:
            if runs[case.name].returncode is not None:
                anonymize_results([case], next(batch.glob(f"care-anonymize-{case.name}-*")), runs[case.name],
                                  ids, findings)
        return
    anonymize_results(cases, batch, run, ids, findings)


def anonymize_results(cases: list[FuzzCase], where: Path, run: Run, ids: dict[str, str], findings: Findings) -> None:
    out, names = where / "anonymized", {c.name for c in cases}
    lines = failure_lines(run.stderr, names, ("FAILED", "skipped"))
    note_warnings("care-anonymize", run, names, where.name, findings)
    for name, (word, reason) in lines.items():
        if word == "FAILED" and is_unexplained(reason):
            findings.add("unexplained", "care-anonymize", name, reason)
    summary = re.search(r"(\d+) anonymized, (\d+) failed, (\d+) skipped", run.stdout)
    unlisted = sorted(names - set(lines))
    if run.returncode == 2 and not has_traceback(run):
        reason = last_lines(run, 1).split("error: ", 1)[-1]
        if is_unexplained(reason):
            findings.add("unexplained", "care-anonymize", ",".join(sorted(names)), reason)
        return
    if not summary or int(summary.group(1)) != len(unlisted):
        for name in unlisted:
            findings.add("missing", "care-anonymize", name)
    if out.is_dir():
        for leftover in partial_files(out):
            findings.add("partial", "care-anonymize", owner_of(leftover, ids, where.name), leftover)
        check_dicom_readable(out, ids, where.name, findings)


def check_dicom_readable(out: Path, ids: dict[str, str], fallback: str, findings: Findings) -> None:
    names = {case_id: name for name, case_id in ids.items()}
    for path in sorted(out.rglob("*.dcm")):
        try:
            pydicom.dcmread(path)
        except Exception as error:  # noqa: BLE001
            who = names.get(path.relative_to(out).parts[0], fallback)
            findings.add("unreadable", "care-anonymize", who, type(error).__name__)


def verify_args(out: Path) -> Callable[[Path, Path], list[str]]:
    return lambda raw, where: command("care-verify") + [str(out), "--raw", str(raw)]


def check_verify(cases: list[FuzzCase], raw: Path, batch: Path, timeout: float, ids: dict[str, str],
                 profile: Path, findings: Findings) -> None:
    """care-verify on both outputs against the batch's raw folder. A run that fails is rerun case by case to
    find the raw cases it fails on, then once more without them. A leak no case ID names (in a shared file such
    as report.json, or in an anonymized copy of a case that did not convert) is traced by rerunning the command
    and care-verify on each other case alone."""
    for out, make in ((batch / "convert", convert_args(profile)), (batch / "anonymized", anonymize_args)):
        if not out.is_dir():
            continue
        tool, kept = f"care-verify {out.name}", cases
        run = run_command(verify_args(out)(raw, batch), START_UP_S + timeout * len(cases), batch)
        if batch_misbehaved(run):
            alone = run_alone("care-verify", verify_args(out), cases, batch, timeout, findings)
            kept = [c for c in cases if not batch_misbehaved(alone[c.name])]
            rest = raw_of(kept, Path(tempfile.mkdtemp(prefix=f"verify-{out.name}-", dir=batch)))
            run = run_command(verify_args(out)(rest, batch), START_UP_S + timeout * len(kept), batch)
            if batch_misbehaved(run):
                findings.add("traceback", "care-verify", batch.name, last_lines(run))
                continue
        record_leaks(tool, run, kept, ids, make, out.name, batch, timeout, findings)


def raw_of(cases: list[FuzzCase], where: Path) -> Path:
    raw = where / "raw"
    raw.mkdir(parents=True)
    for case in cases:
        shutil.copytree(case.folder, raw / case.name, symlinks=True)
    return raw


def record_leaks(tool: str, run: Run, cases: list[FuzzCase], ids: dict[str, str],
                 make: Callable[[Path, Path], list[str]], out_name: str, batch: Path, timeout: float,
                 findings: Findings) -> None:
    leaks = {line: owner_of(line, ids, "") for line in run.stdout.splitlines() if "***" in line}
    for line, who in leaks.items():
        if who:
            findings.add("leak", tool, who, line[:200])
    unnamed = [line for line, who in leaks.items() if not who]
    if unnamed:
        others = [c for c in cases if c.name not in leaks.values()]
        for who in leak_culprits(make, out_name, others, batch, timeout) or {batch.name}:
            findings.add("leak", tool, who, unnamed[0][:200])


def leak_culprits(make: Callable[[Path, Path], list[str]], out_name: str, cases: list[FuzzCase], batch: Path,
                  timeout: float) -> set[str]:
    culprits = set()
    for case in cases:
        where = Path(tempfile.mkdtemp(prefix=f"leak-{case.name}-", dir=batch))
        raw = single_case_raw(case, where)
        if run_command(make(raw, where), timeout + START_UP_S / 4, where).returncode is None:
            continue
        if (where / out_name).is_dir():
            verify = run_command(verify_args(where / out_name)(raw, where), timeout + START_UP_S / 4, where)
            if verify.returncode == 1:
                culprits.add(case.name)
    return culprits


READER_WORKER = """
import json, sys, traceback
from usam.inference import InputError
from usam.predict import read_image
for line in sys.stdin:
    name, path = json.loads(line)
    print(json.dumps(["start", name]), flush=True)
    try:
        image = read_image(path)
        result = ["ok", name, str(image.GetSize())]
    except InputError as error:
        result = ["failed", name, str(error).replace(path, "<path>")]
    except BaseException as error:
        result = ["traceback", name, " | ".join(traceback.format_exc().strip().splitlines()[-3:])]
    print(json.dumps(result), flush=True)
"""


def reader_input(case: FuzzCase) -> str:
    """What usam predict --image would get: the case folder for DICOM, else its image volume file."""
    files = case_files(case.folder)
    return str(files.images[0] if files.images and not files.dicom else case.folder)


def check_reader(cases: list[FuzzCase], timeout: float, findings: Findings) -> None:
    """read_image on each case in one worker process; a case over the time limit is a hang, and the worker
    restarts after it."""
    pending = list(cases)
    while pending:
        pending = reader_pass(pending, timeout, findings)


def reader_pass(cases: list[FuzzCase], timeout: float, findings: Findings) -> list[FuzzCase]:
    proc = subprocess.Popen([sys.executable, "-c", READER_WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=tool_env(), start_new_session=True, text=True)
    proc.stdin.write("".join(json.dumps([c.name, reader_input(c)]) + "\n" for c in cases))
    proc.stdin.close()
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    done, current, deadline = set(), None, time.monotonic() + START_UP_S + timeout
    while len(done) < len(cases):
        if not selector.select(max(0.0, deadline - time.monotonic())):
            os.killpg(proc.pid, signal.SIGKILL)
            culprit = current or [c.name for c in cases if c.name not in done][0]
            findings.add("hang", "usam.predict.read_image", culprit)
            done.add(culprit)
            break
        line = proc.stdout.readline()
        if not line:  # the worker died (a crash in C code): its case is a traceback
            culprit = current or [c.name for c in cases if c.name not in done][0]
            findings.add("traceback", "usam.predict.read_image", culprit, "reader process died")
            done.add(culprit)
            break
        message = json.loads(line)
        reader_line(message, cases, findings, done)
        current = message[1] if message[0] == "start" else None
        deadline = time.monotonic() + timeout
    proc.kill()
    proc.wait()
    return [c for c in cases if c.name not in done]


def reader_line(message: list[str], cases: list[FuzzCase], findings: Findings, done: set[str]) -> None:
    status, name = message[0], message[1]
    if status == "start":
        return
    done.add(name)
    if status == "traceback":
        findings.add("traceback", "usam.predict.read_image", name, message[2])
    elif status == "failed" and is_unexplained(message[2].replace("<path>:", "")):
        findings.add("unexplained", "usam.predict.read_image", name, message[2])
    elif status == "ok" and by_name(cases, name).corrupt_role == "image":
        findings.add("corrupt", "usam.predict.read_image", name, by_name(cases, name).detail)


# --- the run ------------------------------------------------------------------------------------------------


def run_batch(cases: list[FuzzCase], raw: Path, batch: Path, timeout: float, profile: Path,
              findings: Findings) -> None:
    ids = check_convert(cases, raw, batch, timeout, profile, findings)
    check_anonymize(cases, raw, batch, timeout, ids, findings)
    check_verify(cases, raw, batch, timeout, ids, profile, findings)
    check_reader(cases, timeout, findings)


def fuzz(n_cases: int, seed: int, workdir: Path, timeout: float = 60, batch_size: int = 50,
         log: Callable[[str], None] = lambda line: None) -> tuple[list[FuzzCase], Findings]:
    """Make n_cases mutated cases under workdir and run every command on them in batches."""
    workdir.mkdir(parents=True, exist_ok=True)
    sources, notes = prepare_sources(workdir, seed)
    findings = Findings(notes=list(notes))
    profile = workdir / "fuzz.toml"
    profile.write_text(PROFILE)
    cases = []
    for start in range(0, n_cases, batch_size):
        batch = workdir / f"batch{start // batch_size:03d}"
        shutil.rmtree(batch, ignore_errors=True)
        raw = batch / "raw"
        raw.mkdir(parents=True)
        made = [make_case(i, seed, sources, raw) for i in range(start, min(n_cases, start + batch_size))]
        log(f"batch {batch.name}: {len(made)} cases")
        run_batch(made, raw, batch, timeout, profile, findings)
        cases += made
    return cases, findings


def table(cases: list[FuzzCase], findings: Findings) -> str:
    kinds = Counter(c.kind for c in cases)
    kind_of = {c.name: c.kind for c in cases}
    width = max(map(len, kinds)) + 2
    rows = ["category      count   (tool: cases)"]
    for category in CATEGORIES:
        tools = ", ".join(f"{t}: {len(v)}" for t, v in sorted(findings.items[category].items()) if v)
        rows.append(f"{category:<13} {len(findings.cases_in(category)):>5}   {tools}")
    rows += ["", "mutation".ljust(width) + "cases " + " ".join(f"{c[:11]:>11}" for c in CATEGORIES)]
    for kind in sorted(kinds):
        counts = [sum(kind_of.get(n) == kind for n in findings.cases_in(c)) for c in CATEGORIES]
        rows.append(kind.ljust(width) + f"{kinds[kind]:>5} " + " ".join(f"{n:>11}" for n in counts))
    return "\n".join(rows)


def total_findings(findings: Findings) -> int:
    return sum(findings.count(c) for c in CATEGORIES)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None, help="kept after the run (default: a temporary folder)")
    p.add_argument("--timeout", type=float, default=60, help="seconds per case and command (default 60)")
    p.add_argument("--batch", type=int, default=50, help="cases per raw/ folder (default 50)")
    p.add_argument("--details", action="store_true", help="print every finding with its reason")
    args = p.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="care-fuzz-"))
    started = time.monotonic()
    cases, findings = fuzz(args.cases, args.seed, workdir, args.timeout, args.batch,
                           log=lambda line: print(line, file=sys.stderr))
    for note in findings.notes if args.details else [n for n in findings.notes if n.startswith("note:")]:
        print(note)
    flagged = set().union(*(findings.cases_in(c) for c in CATEGORIES))
    for case in (c for c in cases if args.details and c.name in flagged):
        print(f"{case.name}: {case.kind} on {case.source}: {case.detail}")
    print(f"{len(cases)} cases, seed {args.seed}, {time.monotonic() - started:.0f} s, work folder {workdir}")
    print(table(cases, findings))
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if total_findings(findings) else 0


if __name__ == "__main__":
    sys.exit(main())
