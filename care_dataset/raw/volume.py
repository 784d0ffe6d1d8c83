"""Volume files (NIfTI, NRRD, MetaImage) and ITK-SNAP label description files.

A NIfTI file is also checked for what SimpleITK's reader gets wrong. ITK reads a NIfTI file whose voxel data
stops short (an interrupted copy or download) without an error, filling the missing voxels with 0. And when a
header holds both a qform and an sform that disagree, ITK takes one of them and nibabel, FSL and others may
take the other: the same file then lies at two places in space depending on the tool. Both are refused here,
with a reason that names no file.

Compressed voxel data is read in full and checked before SimpleITK reads the file: ITK decodes a gzip stream
that fails its CRC check, and MetaImage zlib data that fails its Adler-32 check, into wrong voxels without an
error.
"""

from __future__ import annotations

import bz2
import gzip
import os
import re
import zlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
# qform and sform may differ by float32 rounding; beyond this fraction of the smallest voxel size they
# describe two different placements.
XFORM_TOLERANCE_VOXELS = 0.1


class VolumeFileError(ValueError):
    """A volume file SimpleITK would read wrongly; str(error) is one line without the file's name."""


class NiftiError(VolumeFileError):
    """A NIfTI file SimpleITK would read wrongly."""


class CorruptStreamError(VolumeFileError):
    """Compressed voxel data that is truncated or fails its checksum."""


class PathNameError(VolumeFileError):
    """A path SimpleITK cannot be given: it holds bytes that are not UTF-8."""


def itk_path(path: Path) -> str:
    """``path`` as SimpleITK takes it. A name that is not valid UTF-8 raises PathNameError: SimpleITK refuses it,
    or aborts the whole process."""
    text = str(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise PathNameError("a file or folder name on its path is not valid UTF-8: rename it") from None
    return text


READ_CHUNK = 1 << 20
HEADER_LIMIT = 1 << 20  # NRRD and MetaImage headers are text; a larger one is not a header


def is_nifti(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def check_nifti(path: str | os.PathLike, data_size: int | None = None) -> None:
    """Raise NiftiError if the voxel data is shorter than the header says, or if the qform and sform
    place the volume differently. ``data_size``: the decompressed size of a gzipped file when known (from
    :func:`check_compressed`); else read from its last 4 bytes, the stream decompressed only when those do not
    give the expected size."""
    import nibabel as nib  # deferred: nibabel imports pydicom (0.5 s); other volume files never need it

    path = Path(path)
    try:
        image = nib.load(path)
    except Exception as error:  # nibabel raises several types for a damaged header
        raise NiftiError(f"not a readable NIfTI header ({type(error).__name__})") from None
    header = image.header
    data = image.dataobj  # its offset is the file's vox_offset (the header copy nibabel keeps says 0)
    expected = int(data.offset) + int(np.prod(data.shape)) * np.dtype(data.dtype).itemsize
    if data_size is not None:
        found = data_size
    elif path.name.lower().endswith(".gz"):
        found = _gzip_data_size(path, expected)
    else:
        found = path.stat().st_size
    if found < expected:
        raise NiftiError(f"truncated NIfTI: {found:,} readable bytes of the {expected:,} its header announces")
    _check_xforms(header)


def _gzip_data_size(path: Path, expected: int) -> int:
    """Uncompressed size of a gzip file: the trailer's ISIZE when it matches (size mod 2**32), else the
    length of the readable stream (short for a truncated or damaged file)."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() >= 4:
            f.seek(-4, os.SEEK_END)
            if int.from_bytes(f.read(4), "little") == expected % 2**32:
                return expected
    size = 0
    stream = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                while chunk:
                    size += len(stream.decompress(chunk))
                    chunk = b""
                    if stream.eof:  # another gzip member may follow (bgzip, concatenated files)
                        chunk, stream = stream.unused_data, zlib.decompressobj(16 + zlib.MAX_WBITS)
    except zlib.error:
        pass
    return size


def _check_xforms(header) -> None:
    qform, qcode = header.get_qform(coded=True)
    sform, scode = header.get_sform(coded=True)
    if qform is None or sform is None:
        return
    shape = np.ones(3)
    shape[: min(3, len(header.get_data_shape()))] = header.get_data_shape()[:3]
    corners = np.array([[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1)
                        for k in (0, shape[2] - 1)])
    apart = float(np.linalg.norm(corners @ (qform - sform)[:3].T, axis=1).max())
    voxel = float(min(header.get_zooms()[: len(header.get_data_shape())][:3]))
    if apart > XFORM_TOLERANCE_VOXELS * voxel:
        raise NiftiError(
            f"the header's qform (code {int(qcode)}) and sform (code {int(scode)}) place the volume up to "
            f"{apart:.2f} mm apart, and tools differ in which one they use; set the wrong one's code to 0"
        )


def volume_suffix(name: str) -> str | None:
    lowered = name.lower()
    return next((s for s in VOLUME_SUFFIXES if lowered.endswith(s)), None)


def read_volume_file(path: Path) -> sitk.Image:
    """A volume file as SimpleITK reads it, its compressed data checked in full first (:func:`check_compressed`)
    and a NIfTI file also checked for what ITK reads wrongly (:func:`check_nifti`). Raises RuntimeError
    (SimpleITK) or VolumeFileError (PathNameError for a name SimpleITK cannot be given)."""
    itk_path(path)
    data_size = check_compressed(Path(path))
    image = sitk.ReadImage(itk_path(path))
    if is_nifti(path):
        check_nifti(path, data_size)
    return image


def check_compressed(path: Path) -> int | None:
    """Decompress every compressed stream of a volume file and check it (gzip CRC and length, zlib Adler-32,
    bzip2 CRC): a gzip file (``.nii.gz``), gzip or bzip2 NRRD data (attached or in one detached file) and
    MetaImage ``CompressedData``. Returns the decompressed size of a gzip file, else None. Raises
    CorruptStreamError."""
    lowered = path.name.lower()
    if lowered.endswith(".gz"):
        return _read_stream(path, 0, "gzip")
    if lowered.endswith((".nrrd", ".nhdr")):
        _check_nrrd(path)
    elif lowered.endswith((".mha", ".mhd")):
        _check_metaimage(path)
    return None


def _read_stream(path: Path, offset: int, kind: str) -> int:
    """Decompressed size of the ``kind`` stream ("gzip", "zlib", "bzip2") that starts at ``offset`` and runs to
    the end of the file, read in full; CorruptStreamError if it is truncated or fails its check."""
    size = 0
    try:
        with open(path, "rb") as raw:
            raw.seek(offset)
            if kind == "gzip":
                with gzip.GzipFile(fileobj=raw) as stream:
                    while chunk := stream.read(READ_CHUNK):
                        size += len(chunk)
                return size
            stream = zlib.decompressobj() if kind == "zlib" else bz2.BZ2Decompressor()
            while chunk := raw.read(READ_CHUNK):
                size += len(stream.decompress(chunk))
            if not stream.eof:
                raise EOFError
    except EOFError:
        raise CorruptStreamError(f"truncated {_format_name(path)}: its {kind} compressed data ends early") from None
    except (gzip.BadGzipFile, zlib.error, OSError):
        raise CorruptStreamError(f"corrupt {_format_name(path)}: its {kind} compressed data fails its integrity "
                                 "check (CRC, checksum or length)") from None
    return size


def _format_name(path: Path) -> str:
    lowered = path.name.lower()
    if is_nifti(lowered):
        return "NIfTI"
    if lowered.endswith((".nrrd", ".nhdr")):
        return "NRRD"
    return "MetaImage" if lowered.endswith((".mha", ".mhd")) else "volume data"


def _text_header(path: Path, end: bytes) -> tuple[str, int] | None:
    """The text header of a NRRD or MetaImage file up to ``end`` and the offset after it; None if not found."""
    with open(path, "rb") as f:
        head = f.read(HEADER_LIMIT)
    cut = head.find(end)
    if cut < 0:
        return None
    return head[:cut].decode("latin-1"), cut + len(end)


def _check_nrrd(path: Path) -> None:
    if path.name.lower().endswith(".nhdr"):  # header only: the data is in the file it names
        found = (path.read_bytes()[:HEADER_LIMIT].decode("latin-1"), 0)
    else:
        found = _text_header(path, b"\n\n")
    if found is None:
        return
    header, data_offset = found
    lines = [line for line in header.splitlines()[1:] if ":" in line and not line.startswith("#")]
    fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    kind = {"gzip": "gzip", "gz": "gzip", "bzip2": "bzip2", "bz2": "bzip2"}.get(fields.get("encoding", "").lower())
    if kind is None or fields.get("byte skip", fields.get("byteskip", "0")) != "0":
        return
    detached = fields.get("data file") or fields.get("datafile")
    if not detached:
        _read_stream(path, data_offset, kind)
    elif " " not in detached and (path.parent / detached).is_file():  # several data files: left to ITK
        _read_stream(path.parent / detached, 0, kind)


def _check_metaimage(path: Path) -> None:
    found = _text_header(path, b"ElementDataFile")
    if found is None:
        return
    header, after = found
    pairs = (line.partition("=") for line in header.splitlines() if "=" in line)
    fields = {key.strip(): value.strip() for key, _, value in pairs}
    if fields.get("CompressedData", "False").lower() != "true":
        return
    with open(path, "rb") as f:
        f.seek(after)
        line = f.readline(HEADER_LIMIT)
    name = line.decode("latin-1").partition("=")[2].strip()
    if name.upper() == "LOCAL":
        _read_stream(path, after + len(line), "zlib")
    elif name and " " not in name and "%" not in name and name.upper() != "LIST":
        data_path = path.parent / name
        if data_path.is_file():
            _read_stream(data_path, 0, "zlib")


_DESCRIPTION_ROW = re.compile(
    r'^\s*(-?\d+)\s+(-?\d+)\s+(-?\d+)\s+(-?\d+)\s+([-+\d.eE]+)\s+(\d+)\s+(\d+)\s+"(.*)"\s*$'
)


def parse_label_description(path: Path) -> dict[int, str]:
    """ITK-SNAP label description file (``IDX R G B A VIS MSH "LABEL"`` rows, ``#`` comments) -> {value: name}.

    Raises ValueError on a row in another format.
    """
    names: dict[int, str] = {}
    for number, line in enumerate(Path(path).read_text(encoding="utf-8", errors="strict").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _DESCRIPTION_ROW.match(line)
        if match is None:
            raise ValueError(f"line {number} is not an ITK-SNAP label description row")
        names[int(match.group(1))] = match.group(8)
    return names
