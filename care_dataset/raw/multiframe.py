"""Multi-frame CT (Enhanced CT, Legacy Converted Enhanced CT): one header per frame, and the frames decoded.

A multi-frame CT keeps each frame's geometry and rescale in functional groups, per frame
(PerFrameFunctionalGroupsSequence) or for all frames (SharedFunctionalGroupsSequence). Each frame becomes a
``FrameHeader``: the image's own attributes plus, from the frame's group or else the shared one,
ImagePositionPatient (PlanePositionSequence), ImageOrientationPatient (PlaneOrientationSequence), PixelSpacing and
SliceThickness (PixelMeasuresSequence), RescaleSlope, RescaleIntercept and RescaleType
(PixelValueTransformationSequence) and, as ImageType, the frame type (CTImageFrameTypeSequence). The frames then
make a series exactly as single-frame slices do (``care_dataset.raw.dicom``: sorted along the slice normal,
checked, put on ITK's grid), and ``decode_frames`` gives their HU in that order, each frame rescaled with its own
slope and intercept, as a single-frame slice is.

Reasons and ``FrameError`` messages name no value from the headers.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pydicom
from pydicom.pixels import pixel_array
from pydicom.tag import Tag
from pydicom.uid import UID

from care_dataset.raw.image import as_int16

MULTI_FRAME_CT = frozenset({
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.2",  # Legacy Converted Enhanced CT Image Storage
})
FRAME_ATTRIBUTES = (  # (functional group, attribute in its item, keyword in the frame header)
    ("PlanePositionSequence", "ImagePositionPatient", "ImagePositionPatient"),
    ("PlaneOrientationSequence", "ImageOrientationPatient", "ImageOrientationPatient"),
    ("PixelMeasuresSequence", "PixelSpacing", "PixelSpacing"),
    ("PixelMeasuresSequence", "SliceThickness", "SliceThickness"),
    ("PixelValueTransformationSequence", "RescaleSlope", "RescaleSlope"),
    ("PixelValueTransformationSequence", "RescaleIntercept", "RescaleIntercept"),
    ("PixelValueTransformationSequence", "RescaleType", "RescaleType"),
    ("CTImageFrameTypeSequence", "FrameType", "ImageType"),
)
NOT_COPIED = frozenset(Tag(k) for k in (
    "PixelData", "NumberOfFrames", "PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"))
GEOMETRY = ("Rows", "Columns", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")
DECODE_ERRORS = (ValueError, TypeError, AttributeError, KeyError, IndexError, OSError, NotImplementedError,
                 RuntimeError)


class FrameError(Exception):
    """The pixel data of a multi-frame image cannot be read, in one privacy-safe sentence."""


class FrameHeader(pydicom.Dataset):
    """One frame of a multi-frame image as a single-frame header would hold it.

    ``source_path`` is the multi-frame file, ``frame_index`` the frame's place in its pixel data (0-based).
    """

    def __init__(self, elements: dict, file_meta: pydicom.Dataset | None, source_path: Path, frame_index: int):
        super().__init__(elements)
        if file_meta is not None:
            self.file_meta = file_meta
        self.source_path = source_path
        self.frame_index = frame_index


def is_multi_frame_ct(ds: pydicom.Dataset) -> bool:
    """Whether ``ds`` is an Enhanced or Legacy Converted Enhanced CT image (SOP class in the data set or, failing
    that, in the file meta information)."""
    meta = getattr(ds, "file_meta", None)
    sop_class = ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta is not None else None)
    return str(sop_class or "").strip() in MULTI_FRAME_CT


def frame_groups(ds: pydicom.Dataset, path: Path) -> tuple[dict[tuple, list[FrameHeader]], set[str]]:
    """The frames of the multi-frame CT ``ds`` (read from ``path``), grouped as single-frame images are (by
    series, shape, orientation and pixel spacing, so the files of one concatenation join), and the reasons why
    frames were set aside."""
    frames = frame_headers(ds, path)
    if isinstance(frames, str):
        return {}, {frames}
    groups: dict[tuple, list[FrameHeader]] = {}
    reasons = set()
    for frame in frames:
        key = _group_key(frame)
        if isinstance(key, str):
            reasons.add(key)
        else:
            groups.setdefault(key, []).append(frame)
    return groups, reasons


def frame_headers(ds: pydicom.Dataset, path: Path) -> list[FrameHeader] | str:
    """One header per frame of ``ds``, in the order of its pixel data, or why its frames cannot be read."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    try:
        count = int(ds.get("NumberOfFrames", 0) or 0)
    except (TypeError, ValueError):
        count = 0
    if count < 1 or len(per_frame) != count:
        return "multi-frame image whose frame descriptions do not match its number of frames"
    if str(ds.get("PhotometricInterpretation", "")).strip() != "MONOCHROME2":
        return "multi-frame image that is not MONOCHROME2"
    shared = _first_item(ds.get("SharedFunctionalGroupsSequence"))
    common = {tag: ds.get_item(tag, keep_deferred=True) for tag in ds.keys() if tag not in NOT_COPIED}
    meta = getattr(ds, "file_meta", None)
    headers = []
    for index, groups in enumerate(per_frame):
        header = FrameHeader(dict(common), meta, path, index)
        for sequence, keyword, as_keyword in FRAME_ATTRIBUTES:
            value = _group_value(groups, shared, sequence, keyword)
            if value is not None:
                setattr(header, as_keyword, value)
        headers.append(header)
    return headers


def _first_item(sequence) -> pydicom.Dataset | None:
    return sequence[0] if isinstance(sequence, pydicom.Sequence) and len(sequence) else None


def _group_value(frame: pydicom.Dataset, shared: pydicom.Dataset | None, sequence: str, keyword: str):
    """``keyword`` from the frame's functional group ``sequence``, else from the shared one, else None."""
    for groups in (frame, shared):
        item = _first_item(groups.get(sequence)) if isinstance(groups, pydicom.Dataset) else None
        if item is not None and keyword in item:
            return item[keyword].value
    return None


def _group_key(frame: FrameHeader) -> tuple | str:
    """What single-frame images of one series share, or why the frame cannot join a series."""
    if not all(k in frame for k in GEOMETRY):
        return "multi-frame image without frame position, orientation or pixel spacing"
    frame_type = frame.get("ImageType") or []
    if "LOCALIZER" in [str(v).upper() for v in ([frame_type] if isinstance(frame_type, str) else frame_type)]:
        return "localizer image"
    try:
        orientation = tuple(round(float(v), 3) for v in frame.ImageOrientationPatient)
        spacing = tuple(round(float(v), 4) for v in frame.PixelSpacing)
    except (TypeError, ValueError):
        return "series without valid orientation or pixel spacing"
    return ("multi-frame", str(frame.SeriesInstanceUID), int(frame.Rows), int(frame.Columns), orientation, spacing)


def decode_frames(headers: list[FrameHeader]) -> np.ndarray:
    """(frames, rows, columns) int16 HU of the frames ``headers``, in that order: each frame's stored values times
    its slope plus its intercept, rounded, clipped to int16 (as a single-frame slice is rescaled)."""
    rows, columns = int(headers[0].Rows), int(headers[0].Columns)
    volume = np.empty((len(headers), rows, columns), np.int16)
    stored: dict[Path, np.ndarray] = {}
    for k, header in enumerate(headers):
        if header.source_path not in stored:
            stored[header.source_path] = _stored_frames(header, rows, columns)
        slope, intercept = _rescale(header)
        volume[k] = as_int16(stored[header.source_path][header.frame_index] * slope + intercept)
    return volume


def _rescale(header: FrameHeader) -> tuple[float, float]:
    try:
        slope = float(header.get("RescaleSlope", 1) or 1)
        intercept = float(header.get("RescaleIntercept", 0) or 0)
    except (TypeError, ValueError):
        slope = intercept = math.nan
    if not (math.isfinite(slope) and math.isfinite(intercept)):
        raise FrameError("a multi-frame image has an invalid rescale slope or intercept")
    return slope, intercept


def _stored_frames(header: FrameHeader, rows: int, columns: int) -> np.ndarray:
    """All stored frames of the file ``header`` comes from, (frames, rows, columns), as pydicom decodes them."""
    meta = getattr(header, "file_meta", None)
    syntax = UID(str(meta.get("TransferSyntaxUID", "") if meta is not None else ""))
    try:
        frames = pixel_array(header.source_path)
    except DECODE_ERRORS:
        if syntax.is_transfer_syntax and syntax.is_compressed:
            raise FrameError(f"unreadable compression: {syntax.name} (no decoder for this multi-frame image)") \
                from None
        raise FrameError("multi-frame pixel data is corrupt or truncated") from None
    frames = frames.reshape(-1, *frames.shape[-2:])
    if frames.shape[1:] != (rows, columns) or header.frame_index >= len(frames):
        raise FrameError("multi-frame pixel data does not match its number of frames or frame size")
    return frames
