"""Volume files (NIfTI, NRRD, MetaImage) and ITK-SNAP label description files.

A NIfTI file is also checked for what SimpleITK's reader gets wrong. ITK reads a NIfTI file whose voxel data
stops short (an interrupted copy or download) without an error, filling the missing voxels with 0. And when a
header holds both a qform and an sform that disagree, ITK takes one of them and nibabel, FSL and others may
take the other: the same file then lies at two places in space depending on the tool. Both are refused here,
with a reason that names no file.
"""

from __future__ import annotations

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


class NiftiError(ValueError):
    """A NIfTI file SimpleITK would read wrongly; str(error) is one line without the file's name."""


def is_nifti(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def check_nifti(path: str | os.PathLike) -> None:
    """Raise NiftiError if the voxel data is shorter than the header says, or if the qform and sform
    place the volume differently. Reads the header and, for a gzipped file, its last 4 bytes (the stream
    is decompressed only when those do not give the expected size)."""
    import nibabel as nib  # deferred: nibabel imports pydicom (0.5 s); other volume files never need it

    path = Path(path)
    try:
        image = nib.load(path)
    except Exception as error:  # nibabel raises several types for a damaged header
        raise NiftiError(f"not a readable NIfTI header ({type(error).__name__})") from None
    header = image.header
    data = image.dataobj  # its offset is the file's vox_offset (the header copy nibabel keeps says 0)
    expected = int(data.offset) + int(np.prod(data.shape)) * np.dtype(data.dtype).itemsize
    found = _gzip_data_size(path, expected) if path.name.lower().endswith(".gz") else path.stat().st_size
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
    """A volume file as SimpleITK reads it, a NIfTI file also checked for what ITK reads wrongly
    (:func:`check_nifti`). Raises RuntimeError (SimpleITK) or NiftiError."""
    image = sitk.ReadImage(str(path))
    if is_nifti(path):
        check_nifti(path)
    return image


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
