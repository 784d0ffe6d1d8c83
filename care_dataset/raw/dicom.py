"""DICOM series in a case folder: every file parsed once with pydicom, series classified, one series read.

Uncompressed pixel data is decoded by pydicom from the headers the scan already parsed (the values stay on disk
until then), so each file is parsed once; SimpleITK (GDCM) parses every file again and took 1.4-1.9x the CPU
per slice (docs/benchmarks.md). Compressed transfer syntaxes are decoded by SimpleITK (GDCM), as is any series
pydicom cannot decode. For 8- to 16-bit pixels both give the same voxels and the same grid, and
tests/test_dicom_decode.py holds them equal; for 32-bit stored values GDCM's rescale is wrong and pydicom's is
the one used.

Every message raised here (``DicomError``) is one sentence without identifying values: no names, IDs, dates,
UIDs, file or folder names.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError
from pydicom.filereader import data_element_offset_to_value
from pydicom.pixels import get_decoder
from pydicom.uid import UID

from care_dataset.raw import multiframe
from care_dataset.raw.image import as_int16, canonical_geometry, cast_int16, describe_grid, grid_difference
from care_dataset.raw.volume import PathNameError, itk_path

# Modality (0008,0060) defined terms of PS3.3 C.7.3.1.1.1, current and retired: only these may be echoed in a
# reason (report.json); any other value is free text typed in somewhere and is never copied out.
DICOM_MODALITIES = frozenset("""
    ANN AR ASMT AU BDUS BI BMD CFM CR CT CTPROTOCOL DG DMS DOC DX ECG EEG EMG EOG EPS ES FID GM HC HD IO IOL
    IVOCT IVUS KER KO LEN LS M3D MG MR NM OAM OCT OP OPM OPT OPTBSV OPTENF OPV OSS OT PA PLAN POS PR PT PX REG
    RESP RF RG RTDOSE RTIMAGE RTINTENT RTPLAN RTRAD RTRECORD RTSEGANN RTSTRUCT RWV SEG SM SMR SR SRF STAIN
    TEXTUREMAP TG US VA XA XAPROTOCOL XC
    AS CD CF CP CS DD DF DM DS EC FA FS LP MA MS OPR ST VF
""".split())
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
NATIVE_SYNTAXES = (
    pydicom.uid.ImplicitVRLittleEndian,
    pydicom.uid.ExplicitVRLittleEndian,
    pydicom.uid.ExplicitVRBigEndian,
    pydicom.uid.DeflatedExplicitVRLittleEndian,
)
PYDICOM_DECODED = (  # uncompressed, and stored in the file as it is (deflated files are inflated in memory)
    pydicom.uid.ImplicitVRLittleEndian,
    pydicom.uid.ExplicitVRLittleEndian,
    pydicom.uid.ExplicitVRBigEndian,
)
DEFER_SIZE = 64 * 1024  # values larger than this (the pixel data) are read from the file only when used
PIXEL_DATA_TAG_LE, PIXEL_DATA_TAG_BE = b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10"  # (7FE0,0010) as stored
SLICE_GAP_TOLERANCE = 0.05  # relative deviation of one slice gap from the mean gap
TILT_TOLERANCE = 0.05  # in-plane drift across the series, in pixels
UNEVEN_SPACING = "series with uneven slice spacing"
SHEARED = "tilted (sheared) series"


class DicomError(Exception):
    """A DICOM problem of a case, in one privacy-safe sentence."""


@dataclass
class DicomSeries:
    """One candidate image series: files sorted along the slice normal, geometry computed from the headers.

    ``size`` is (columns, rows, slices), ``spacing`` (column, row, slice) mm, ``direction`` the 3 x 3 matrix
    whose columns are the row cosine, the column cosine and the slice normal (row-major, 9 numbers): the grid
    SimpleITK's ImageSeriesReader builds from the same files in the same order (origin at the first slice, slice
    spacing the distance from the first to the last slice over the number of gaps, slice axis the normal even
    when the slices are stacked obliquely). ``layout`` holds the true positions when they are off that grid.
    """

    files: list[Path]
    headers: list[pydicom.Dataset]  # one per file, same order; pixel data not yet read
    modality: str
    transfer_syntax: UID
    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    hu_range: tuple[float, float] | None  # stored range rescaled, None when not integral
    sort_key: tuple = field(default=(), repr=False)
    layout: SliceLayout | None = None  # where the slices truly are, when the grid does not put them there

    @property
    def header(self) -> pydicom.Dataset:
        """The first slice's header."""
        return self.headers[0]

    def geometry(self) -> dict:
        return {"size": list(self.size), "spacing": list(self.spacing), "origin": list(self.origin),
                "direction": list(self.direction)}


@dataclass(frozen=True)
class SliceLayout:
    """The true slice positions of a series whose slices are not where its grid puts them.

    ITK's series reader (hence ITK-SNAP, hence the annotation) puts slice k at ``origin + k * spacing * normal``
    whatever the gaps between the slices, and stacks a gantry-tilted series along the slice normal (it does not
    shear it). ``offsets`` (slices, 3) is, per slice in grid order, its true ImagePositionPatient minus that
    grid position (mm, LPS).
    """

    offsets: np.ndarray = field(repr=False)
    problems: tuple[str, ...]  # UNEVEN_SPACING and/or SHEARED
    gaps_mm: tuple[float, float]  # smallest and largest slice gap, along the slice normal
    tilt_degrees: float | None  # angle between the stacking direction and the slice normal, when sheared

    def notes(self) -> list[str]:
        """What the report says about the case (geometry only, nothing identifying)."""
        out = []
        if UNEVEN_SPACING in self.problems:
            out.append(f"uneven slice spacing ({self.gaps_mm[0]:.2f} to {self.gaps_mm[1]:.2f} mm): stored on "
                       "the regular grid ITK-SNAP shows, true slice positions in cases.json")
        if self.tilt_degrees is not None:
            out.append(f"gantry tilt {self.tilt_degrees:.1f} degrees: slices stored unsheared on the grid "
                       "ITK-SNAP shows (no resampling), true slice positions in cases.json")
        return out


@dataclass
class DicomScan:
    """What a case folder holds: usable series and a count of what was set aside, by reason."""

    series: list[DicomSeries]
    skipped: dict[str, int]
    num_files: int
    set_aside: dict[str, int] = field(default_factory=dict)  # files that are no DICOM image, by reason
    rejected: list[tuple[tuple[int, int, int], str]] = field(default_factory=list)  # (columns, rows, files), why

    def notes(self) -> list[str]:
        """One note per kind of file set aside, with its count."""
        return [f"set aside {n} {why}" for why, n in sorted(self.set_aside.items())]


def _walk_files(root: Path, exclude: set[Path]) -> list[Path]:
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(folder) / name
            if name.startswith(".") or name.upper() == "DICOMDIR" or path in exclude:
                continue
            found.append(path)
    return found


UNREADABLE = "unreadable file(s) (no parseable DICOM header: stray or damaged)"
DANGLING = "dangling symbolic link(s)"
NOT_UTF8 = "file(s) whose path is not valid UTF-8 (SimpleITK cannot open them: rename them)"
UNUSABLE_IMAGE = "image(s) whose "  # start of every reason of _header_problem
# The pixel format attributes an image must hold as one whole number, with the values they may take.
PIXEL_FORMAT = {"Rows": (1, 65535), "Columns": (1, 65535), "BitsAllocated": (8, 32), "PixelRepresentation": (0, 1)}


def _read_header(path: Path) -> pydicom.Dataset | str | None:
    """Header with the pixel data left on disk (encapsulated pixel data is dropped); None for non-DICOM files,
    why it is set aside for a dangling link or a file whose header cannot be parsed (a stray file such as a
    Thumbs.db, or a damaged one: a damaged slice of the annotated series then shows as a grid mismatch)."""
    if not path.exists():
        return DANGLING
    try:
        itk_path(path)
    except PathNameError:
        return NOT_UTF8
    try:
        ds = pydicom.dcmread(path, defer_size=DEFER_SIZE)
    except InvalidDicomError:
        return None
    except Exception:  # noqa: BLE001 - any parser or I/O failure means a file that cannot be used
        return UNREADABLE
    sop_class = ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID")
    if sop_class == DICOMDIR_SOP_CLASS:
        return None
    if "SeriesInstanceUID" not in ds:
        return UNREADABLE
    if _transfer_syntax(ds) not in PYDICOM_DECODED and "PixelData" in ds:
        del ds.PixelData  # read in full by the parser (undefined length); SimpleITK reads it again
    return ds


def _transfer_syntax(ds: pydicom.Dataset) -> UID:
    meta = getattr(ds, "file_meta", None)
    return UID((meta.get("TransferSyntaxUID") if meta is not None else None) or pydicom.uid.ImplicitVRLittleEndian)


def _is_image(ds: pydicom.Dataset) -> bool:
    return all(k in ds for k in ("Rows", "Columns", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"))


def _image_type(ds: pydicom.Dataset) -> list[str]:
    value = ds.get("ImageType") or []
    return [value.upper()] if isinstance(value, str) else [str(v).upper() for v in value]


def _is_localizer(ds: pydicom.Dataset) -> bool:
    return "LOCALIZER" in _image_type(ds)


def _floats(value, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n else None


def _finite(value, n: int) -> bool:
    """Whether ``value`` is ``n`` finite numbers."""
    numbers = _floats(value, n)
    return numbers is not None and bool(np.all(np.isfinite(numbers)))


def _is_whole_number(value, low: int, high: int) -> bool:
    return isinstance(value, int) and low <= value <= high


def _header_problem(ds: pydicom.Dataset) -> str | None:
    """Why an image's pixel format, geometry or rescale cannot be used, naming the attribute; None when they can."""
    try:
        for keyword, (low, high) in PIXEL_FORMAT.items():
            if not _is_whole_number(ds.get(keyword), low, high):
                return f"{UNUSABLE_IMAGE}{keyword} is not one whole number from {low} to {high}"
        if not _finite(ds.PixelSpacing, 2):
            return UNUSABLE_IMAGE + "PixelSpacing is not two numbers"
        if not _finite(ds.ImageOrientationPatient, 6):
            return UNUSABLE_IMAGE + "ImageOrientationPatient is not six numbers"
        if not _finite(ds.ImagePositionPatient, 3):
            return UNUSABLE_IMAGE + "ImagePositionPatient is not three numbers"
        for keyword in ("RescaleSlope", "RescaleIntercept"):
            if ds.get(keyword) not in (None, "") and not _finite([ds.get(keyword)], 1):
                return f"{UNUSABLE_IMAGE}{keyword} is not a finite number"
    except (TypeError, ValueError, AttributeError):  # a value pydicom cannot even convert
        return UNUSABLE_IMAGE + "pixel format, PixelSpacing, ImageOrientationPatient or rescale values cannot be read"
    return None


def _hu_range(headers: list[pydicom.Dataset]) -> tuple[float, float] | None:
    """Range of rescaled values the stored pixels can take, or None when slope/intercept are not integers."""
    lows, highs = [], []
    for ds in headers:
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        if slope != round(slope) or intercept != round(intercept):
            return None
        bits = int(ds.get("BitsAllocated", 16))
        signed = int(ds.get("PixelRepresentation", 0)) == 1
        lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        ends = (slope * lo + intercept, slope * hi + intercept)
        lows.append(min(ends))
        highs.append(max(ends))
    return min(lows), max(highs)


def _build_series(headers: list[pydicom.Dataset], files: list[Path]) -> DicomSeries | str:
    """A candidate series from same-shaped, same-orientation images, or the reason it cannot be one."""
    first = headers[0]
    if len(files) < 2:
        return "single-image series"
    if int(first.get("NumberOfFrames", 1) or 1) > 1:
        return "multi-frame series"
    if int(first.get("SamplesPerPixel", 1)) != 1:
        return "colour series"
    orientation = _floats(first.ImageOrientationPatient, 6)
    pixel_spacing = _floats(first.PixelSpacing, 2)
    if orientation is None or pixel_spacing is None or min(pixel_spacing) <= 0:
        return "series without valid orientation or pixel spacing"
    row, col = np.array(orientation[:3]), np.array(orientation[3:])
    if min(np.linalg.norm(row), np.linalg.norm(col)) < 1e-3:
        return "series without valid orientation or pixel spacing"
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)  # exports round the cosines; ITK normalises
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)
    if np.argmax(np.abs(normal)) != 2:
        return "non-axial series"
    positions = []
    for ds in headers:
        pos = _floats(ds.ImagePositionPatient, 3)
        if pos is None:
            return "series with an invalid slice position"
        positions.append(pos)
    positions = np.array(positions)
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    along, positions = along[order], positions[order]
    if np.any(np.diff(along) <= 1e-4):
        return "series with repeated slice positions"
    matrix = np.column_stack([row, col, normal])
    slice_spacing = float(np.linalg.norm(positions[-1] - positions[0]) / (len(files) - 1))
    return DicomSeries(
        files=[files[i] for i in order],
        headers=[headers[i] for i in order],
        modality=str(first.get("Modality", "")).upper() or "unknown",
        transfer_syntax=_transfer_syntax(first),
        size=(int(first.Columns), int(first.Rows), len(files)),
        spacing=(pixel_spacing[1], pixel_spacing[0], slice_spacing),
        origin=tuple(float(v) for v in positions[0]),
        direction=tuple(float(v) for v in matrix.ravel()),
        hu_range=_hu_range(headers),
        sort_key=(
            "DERIVED" in _image_type(first),
            int(first.get("SeriesNumber", 0) or 0),
        ),
        layout=_slice_layout(positions, normal, slice_spacing, min(pixel_spacing)),
    )


def _slice_layout(positions: np.ndarray, normal: np.ndarray, slice_spacing: float,
                  pixel_size: float) -> SliceLayout | None:
    """How far the sorted slice positions (slices, 3) lie from the grid ITK's series reader builds (slice k at
    the first position plus k * slice_spacing along ``normal``); None when within the tolerances."""
    along = positions @ normal
    gaps = np.diff(along)
    mean_gap = float((along[-1] - along[0]) / (len(along) - 1))
    problems = []
    if np.max(np.abs(gaps - mean_gap)) > SLICE_GAP_TOLERANCE * mean_gap:
        problems.append(UNEVEN_SPACING)
    stack = positions[-1] - positions[0]
    drift = stack - (along[-1] - along[0]) * normal
    tilt = None
    if np.linalg.norm(drift) > TILT_TOLERANCE * pixel_size:
        problems.append(SHEARED)
        cosine = min(1.0, abs(float(stack @ normal)) / float(np.linalg.norm(stack)))
        tilt = float(np.degrees(np.arccos(cosine)))
    if not problems:
        return None
    grid = positions[0] + np.outer(np.arange(len(positions)) * slice_spacing, normal)
    return SliceLayout(offsets=positions - grid, problems=tuple(problems),
                       gaps_mm=(float(gaps.min()), float(gaps.max())), tilt_degrees=tilt)


def scan_dicom(root: Path, exclude: set[Path] = frozenset()) -> DicomScan:
    """Read every DICOM header under ``root`` once and group the images into candidate series.

    Localizer images, single images, multi-frame images other than CT and non-axial stacks are set aside; a
    series whose images differ in shape or orientation is split into one candidate per shape and orientation.
    The frames of an Enhanced or Legacy Converted Enhanced CT make a series as single-frame images do.
    """
    groups: dict[tuple, tuple[list[pydicom.Dataset], list[Path]]] = {}
    skipped: dict[str, int] = {}
    num_files = 0
    set_aside: dict[str, int] = {}
    for path in _walk_files(root, set(exclude)):
        ds = _read_header(path)
        if isinstance(ds, str):
            set_aside[ds] = set_aside.get(ds, 0) + 1
            continue
        if ds is None:
            continue
        try:
            why = _add_file(ds, path, groups, skipped)
        except Exception:  # noqa: BLE001 - an element pydicom decodes only on access: unknown VR, wrong length
            set_aside[UNREADABLE] = set_aside.get(UNREADABLE, 0) + 1
            continue
        num_files += 1
        if why is not None:
            skipped[why] = skipped.get(why, 0) + 1
    series, rejected = [], []
    for headers, files in groups.values():
        built = _build_series(headers, files)
        if isinstance(built, str):
            skipped[built] = skipped.get(built, 0) + 1
            rejected.append(((int(headers[0].Columns), int(headers[0].Rows), len(files)), built))
        else:
            series.append(built)
    series.sort(key=lambda s: (s.modality != "CT", s.sort_key, -s.size[2], str(s.files[0])))
    return DicomScan(series=series, skipped=skipped, num_files=num_files, set_aside=set_aside, rejected=rejected)


def _add_file(ds: pydicom.Dataset, path: Path, groups: dict, skipped: dict[str, int]) -> str | None:
    """One header into ``scan_dicom``'s ``groups`` (the frames of a multi-frame CT through ``_add_frames``), or
    why it is skipped."""
    if multiframe.is_multi_frame_ct(ds):
        _add_frames(ds, path, groups, skipped)
        return None
    if not _is_image(ds):
        return "non-image object"
    if _is_localizer(ds):
        return "localizer image"
    if problem := _header_problem(ds):
        return problem
    shape_key = (
        str(ds.SeriesInstanceUID), int(ds.Rows), int(ds.Columns),
        tuple(round(float(v), 3) for v in ds.ImageOrientationPatient),
        tuple(round(float(v), 4) for v in ds.PixelSpacing),
    )
    headers, files = groups.setdefault(shape_key, ([], []))
    headers.append(ds)
    files.append(path)
    return None


def _add_frames(ds: pydicom.Dataset, path: Path, groups: dict, skipped: dict[str, int]) -> None:
    """The frames of the multi-frame CT ``ds`` into ``scan_dicom``'s ``groups``, one header and ``path`` per
    frame; what is set aside counted once per file in ``skipped``."""
    frame_groups, reasons = multiframe.frame_groups(ds, path)
    for key, frames in frame_groups.items():
        headers, files = groups.setdefault(key, ([], []))
        headers.extend(frames)
        files.extend([path] * len(frames))
    for why in reasons:
        skipped[why] = skipped.get(why, 0) + 1


def _execute(files: list[Path], pixel_type: int | None, syntax: UID) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileNames([str(f) for f in files])
    if pixel_type is not None:
        reader.SetOutputPixelType(pixel_type)
    try:
        return reader.Execute()
    except RuntimeError:
        if syntax not in NATIVE_SYNTAXES:
            raise DicomError(f"unreadable compression: {syntax.name} (SimpleITK cannot decode this series)") from None
        raise DicomError("DICOM pixel data is corrupt or truncated") from None


def read_series_int16(series: DicomSeries) -> sitk.Image:
    """Pixel data of ``series`` in HU (rescale applied), int16, clipped to the int16 range, rounded if fractional.

    Uncompressed MONOCHROME2 series are decoded by pydicom; the rest, and any series pydicom fails on, by
    SimpleITK, which then gives the error message.
    """
    if isinstance(series.header, multiframe.FrameHeader):  # frames of multi-frame images: pydicom alone
        try:
            return _on_series_grid(multiframe.decode_frames(series.headers), series)
        except multiframe.FrameError as error:
            raise DicomError(str(error)) from None
    if all(_transfer_syntax(ds) in PYDICOM_DECODED for ds in series.headers):
        try:
            volume = _decode_with_pydicom(series)
        except (ValueError, TypeError, AttributeError, KeyError, OSError, NotImplementedError, RuntimeError):
            pass  # SimpleITK reads the series again and names what is wrong
        else:
            return _on_series_grid(volume, series)
    return _read_with_simpleitk(series)


def _on_series_grid(volume: np.ndarray, series: DicomSeries) -> sitk.Image:
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing(series.spacing)
    image.SetOrigin(series.origin)
    image.SetDirection(series.direction)
    return image


def _decode_with_pydicom(series: DicomSeries) -> np.ndarray:
    """(slices, rows, columns) int16 HU: stored values times slope plus intercept, rounded, clipped."""
    columns, rows, slices = series.size
    volume = np.empty((slices, rows, columns), np.int16)
    for k, ds in enumerate(series.headers):
        photometric = str(ds.get("PhotometricInterpretation", ""))
        if photometric != "MONOCHROME2":  # anything else is left to SimpleITK, as before
            raise ValueError(f"photometric interpretation {photometric}")
        pixels = _pixel_bytes(ds)
        # The pixel description is handed over explicitly: decoding from the dataset looks up the same
        # elements several times and took twice as long.
        stored, _ = get_decoder(_transfer_syntax(ds)).as_array(
            pixels, rows=int(ds.Rows), columns=int(ds.Columns), number_of_frames=1,
            samples_per_pixel=int(ds.get("SamplesPerPixel", 1)), bits_allocated=int(ds.BitsAllocated),
            bits_stored=int(ds.get("BitsStored", ds.BitsAllocated)), pixel_representation=int(ds.PixelRepresentation),
            photometric_interpretation=photometric, pixel_keyword="PixelData")
        if stored.shape != (rows, columns):
            raise ValueError("slice shape differs from the series")
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        if slope == 1 and intercept.is_integer() and -32768 <= stored.min() + intercept and \
                stored.max() + intercept <= 32767:
            np.add(stored, np.int32(intercept), out=volume[k], casting="unsafe")  # exact: every value fits
        else:
            volume[k] = as_int16(stored * slope + intercept)  # float64, exact for integral slope and intercept
    return volume


def _pixel_bytes(ds: pydicom.Dataset) -> bytes | memoryview:
    """The PixelData value, read from the file where the scan left it (at the offset pydicom recorded).

    One read of the element's header and value; pydicom's own deferred read parses the element again in Python.
    As pydicom does, a file modified since the scan, or whose pixel data moved, is refused.
    """
    element = ds.get_item("PixelData", keep_deferred=True)
    if element is None:
        raise ValueError("no pixel data")
    if element.value is not None:
        return element.value
    header = data_element_offset_to_value(element.is_implicit_VR, element.VR)
    with open(ds.filename, "rb") as file:
        if os.fstat(file.fileno()).st_mtime != ds.timestamp:
            raise ValueError("file changed since the scan")
        file.seek(element.value_tell - header)
        raw = file.read(header + element.length)
    if len(raw) != header + element.length:
        raise ValueError("pixel data is truncated")
    if raw[:4] != (PIXEL_DATA_TAG_LE if element.is_little_endian else PIXEL_DATA_TAG_BE):
        raise ValueError("pixel data is not where the scan found it")
    return memoryview(raw)[header:]


def _read_with_simpleitk(series: DicomSeries) -> sitk.Image:
    """``read_series_int16`` through SimpleITK's GDCM reader.

    When the rescaled values cannot wrap undetected, SimpleITK casts to int16 while reading (half the memory
    traffic); a value outside the possible HU range then reveals a wrap and the series is read again natively.
    """
    lo_hi = series.hu_range
    with _itk_warnings_off(series.layout is not None):
        if lo_hi is not None and lo_hi[1] - lo_hi[0] < 65536:
            image = _execute(series.files, sitk.sitkInt16, series.transfer_syntax)
            if lo_hi[0] >= -32768 and lo_hi[1] <= 32767:
                return image
            values = sitk.GetArrayViewFromImage(image)
            if values.min() >= max(lo_hi[0], -32768) and values.max() <= min(lo_hi[1], 32767):
                return image
        return cast_int16(_execute(series.files, None, series.transfer_syntax))


@contextmanager
def _itk_warnings_off(off: bool):
    """ITK's series reader warns on stderr of the uneven sampling that the series' layout already notes."""
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(shown and not off)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


# --- the image series of a case ------------------------------------------------------------------------------


def no_series_reason(skipped: dict[str, int], num_files: int) -> str:
    if num_files == 0:
        return "no image found (neither a DICOM series nor a volume file)"
    found = ", ".join(f"{n} {why}" for why, n in sorted(skipped.items()))
    return f"no usable axial image series among {num_files} DICOM files ({found})"


def not_ct_reason(modality: str) -> str:
    """Why a series of ``modality`` is refused; names the modality only when it is a DICOM defined term."""
    if modality in DICOM_MODALITIES:
        return f"modality {modality} is not CT"
    if modality == "unknown":  # scan_dicom's value for an empty Modality
        return "the image series has no modality (not CT)"
    return "the image series is not CT (non-standard modality code)"


def choose_series(series: list[DicomSeries], label_grid: dict, tolerance: float) -> DicomSeries:
    """The first series (in order of preference) whose canonical grid matches `label_grid`; DicomError if none."""
    if len(series) == 1:
        return series[0]
    for candidate in series:  # already in order of preference
        if grid_difference(canonical_geometry(candidate.geometry()), label_grid, tolerance) is None:
            return candidate
    listed = ", ".join(describe_grid(canonical_geometry(s.geometry()), with_origin=False) for s in series)
    raise DicomError(
        f"no series matches the annotation grid {describe_grid(label_grid, with_origin=False)}; candidates: {listed}"
    )


def refuse_irregular(scan: DicomScan) -> DicomScan:
    """``scan`` without the series whose slices are not on a regular grid, counted as set aside (the profile's
    ``uneven_spacing = "refuse"``)."""
    skipped = dict(scan.skipped)
    for series in scan.series:
        if series.layout is not None:
            why = f"{series.layout.problems[0]}, refused by the profile's uneven_spacing setting"
            skipped[why] = skipped.get(why, 0) + 1
    return replace(scan, series=[s for s in scan.series if s.layout is None], skipped=skipped)


def _set_aside_labelled_series(scan: DicomScan, label_grid: dict) -> str | None:
    """When no series is on the annotation grid: why a series of the annotation's size (columns, rows and
    slices, in either in-plane order) was set aside (the annotated series, damaged), else the unreadable files
    and unusable images set aside, if any (a damaged slice of it); None when none was."""
    x, y, z = (int(v) for v in label_grid["size"])
    for (columns, rows, slices), why in scan.rejected:
        if slices == z and sorted((columns, rows)) == sorted((x, y)):
            return f"the series of the annotation's size ({columns}x{rows}x{slices}) is not usable: {why}"
    damaged = {why: n for why, n in {**scan.skipped, **scan.set_aside}.items()
               if why in (UNREADABLE, DANGLING) or why.startswith(UNUSABLE_IMAGE)}
    if not damaged:
        return None
    candidates = ", ".join(describe_grid(canonical_geometry(s.geometry()), with_origin=False) for s in scan.series)
    listed = ", ".join(f"{n} {why}" for why, n in sorted(damaged.items()))
    return (f"no series is on the annotation grid {describe_grid(label_grid, with_origin=False)} (candidates: "
            f"{candidates}); set aside: {listed}")


def read_case_series(root: Path, exclude: set[Path], label_grid: dict, tolerance: float,
                     uneven_spacing: str = "accept", notes: list[str] | None = None,
                     ) -> tuple[sitk.Image, pydicom.Dataset, SliceLayout | None]:
    """The CT series under `root` on the annotation's grid, as int16 HU, the header of one of its files, and its
    true slice positions when they are off its grid (``uneven_spacing = "refuse"``: such series are set aside).
    Files set aside (stray, unreadable, dangling links) are described in ``notes``.

    Raises DicomError with a privacy-safe reason: no usable series, none on the grid, or not CT.
    """
    scan = scan_dicom(root, exclude=exclude)
    if uneven_spacing == "refuse":
        scan = refuse_irregular(scan)
    if notes is not None:
        notes.extend(scan.notes())
    if not scan.series:
        raise DicomError(no_series_reason({**scan.skipped, **scan.set_aside},
                                          scan.num_files + sum(scan.set_aside.values())))
    if all(grid_difference(canonical_geometry(s.geometry()), label_grid, tolerance) for s in scan.series):
        if labelled := _set_aside_labelled_series(scan, label_grid):
            raise DicomError(labelled)
    chosen = choose_series(scan.series, label_grid, tolerance)
    if chosen.modality != "CT":
        raise DicomError(not_ct_reason(chosen.modality))
    return read_series_int16(chosen), chosen.header, chosen.layout
