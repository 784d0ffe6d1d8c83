"""Uncompressed DICOM pixel data decoded by pydicom equals SimpleITK's (GDCM) reading of the same series.

care_dataset.io_dicom decodes uncompressed series with pydicom from the headers its scan parsed and builds the
grid from those headers; SimpleITK reads every other series. These tests hold the two paths equal, voxel for
voxel and grid for grid, on real files, on the synthetic export and on crafted pixel formats.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (CTImageStorage, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                         generate_uid)

from care_dataset import io_dicom
from care_dataset.io_dicom import DicomError, read_series_int16, scan_dicom

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def assert_same_as_simpleitk(series: io_dicom.DicomSeries) -> np.ndarray:
    """Both paths agree; returns the voxels."""
    reference = io_dicom._read_with_simpleitk(series)
    decoded = io_dicom._decode_with_pydicom(series)  # raises if pydicom cannot decode: no silent fallback here
    np.testing.assert_array_equal(decoded, sitk.GetArrayViewFromImage(reference))
    image = read_series_int16(series)
    assert image.GetPixelID() == sitk.sitkInt16
    assert image.GetSize() == reference.GetSize()
    np.testing.assert_allclose(image.GetSpacing(), reference.GetSpacing(), rtol=0, atol=1e-9)
    np.testing.assert_allclose(image.GetOrigin(), reference.GetOrigin(), rtol=0, atol=1e-9)
    np.testing.assert_allclose(image.GetDirection(), reference.GetDirection(), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(image), decoded)
    return decoded


def write_slices(folder: Path, stored: np.ndarray, *, bits_stored=16, signed=True, intercepts=None, slope=1.0,
                 syntax=ExplicitVRLittleEndian, drift=(0.0, 0.0)) -> None:
    """Raw stored values (uint16 bit patterns or int16) as a series, one file per slice, names against the order."""
    folder.mkdir(parents=True)
    series_uid = generate_uid()
    for k, pixels in enumerate(stored):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = syntax
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "CT", series_uid, 3
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [-20.0 + k * drift[0], 31.5 + k * drift[1], 100.0 - 3.0 * k]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [0.7, 0.9]
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
        ds.PixelRepresentation = int(signed)
        ds.RescaleSlope = slope
        ds.RescaleIntercept = -1024.0 if intercepts is None else intercepts[k]
        little = syntax != ExplicitVRBigEndian
        ds.PixelData = np.ascontiguousarray(pixels).astype("<u2" if little else ">u2").tobytes()
        ds.save_as(folder / f"S{len(stored) - k:02d}", implicit_vr=syntax == ImplicitVRLittleEndian,
                   little_endian=little, enforce_file_format=True)


def only_series(folder: Path) -> io_dicom.DicomSeries:
    scan = scan_dicom(folder)
    assert len(scan.series) == 1, scan.skipped
    return scan.series[0]


def test_real_series_decodes_like_simpleitk(tmp_path):
    source = DATA / "dcmqi_ct3slice" / "ct-3slice"
    if not source.is_dir():
        pytest.skip("real data ../shared/data/dcmqi_ct3slice is missing")
    shutil.copytree(source, tmp_path / "ct")
    series = only_series(tmp_path / "ct")
    assert series.transfer_syntax in io_dicom.PYDICOM_DECODED
    voxels = assert_same_as_simpleitk(series)
    assert voxels.shape == (3, 512, 512) and voxels.min() >= -3024 and voxels.max() > 1000  # air to bone


def test_synthetic_export_decodes_like_simpleitk(tmp_path):
    synth = pytest.importorskip("care_dataset.synth")
    synth.write_raw_dataset(tmp_path, 10, seed=3, size=64, slices=10)  # every messy feature, every pixel format
    native = compressed = 0
    for case in sorted(p for p in tmp_path.iterdir() if p.is_dir()):
        for series in scan_dicom(case).series:
            if series.transfer_syntax in io_dicom.PYDICOM_DECODED:
                assert_same_as_simpleitk(series)
                native += 1
            else:  # compressed: SimpleITK reads it, and the scan kept no encapsulated pixel data in memory
                assert all("PixelData" not in ds for ds in series.headers)
                assert read_series_int16(series).GetPixelID() == sitk.sitkInt16
                compressed += 1
    assert native >= 8 and compressed >= 1, (native, compressed)


@pytest.mark.parametrize("kind", ["u12 with high bits set", "s12 sign in bit 11 only", "s16 full range clipped",
                                  "per-slice intercept", "fractional slope", "implicit VR", "big endian",
                                  "in-plane drift"])
def test_pixel_formats_decode_like_simpleitk(tmp_path, kind):
    rng = np.random.default_rng(7)
    shape = (5, 200, 192)  # 75 KiB per slice: above DEFER_SIZE, so the pixels are read where the scan left them
    options: dict = {}
    if kind == "u12 with high bits set":  # bits above BitsStored are not part of the value
        stored = rng.integers(0, 4096, shape).astype(np.uint16) | np.uint16(0xA000)
        options = dict(bits_stored=12, signed=False)
    elif kind == "s12 sign in bit 11 only":
        stored = (rng.integers(-2048, 2048, shape).astype(np.int16).view(np.uint16) & np.uint16(0x0FFF))
        options = dict(bits_stored=12, signed=True)
    elif kind == "s16 full range clipped":  # -32768 - 1024 does not fit int16
        stored = rng.integers(-32768, 32768, shape).astype(np.int16)
        stored[0, 0, :2] = (-32768, 32767)
    elif kind == "per-slice intercept":
        stored = rng.integers(0, 3000, shape).astype(np.int16)
        options = dict(intercepts=[-1024.0, -1000.0, 0.0, -1024.0, -2048.0])
    elif kind == "fractional slope":
        stored = rng.integers(-2000, 3000, shape).astype(np.int16)
        options = dict(slope=0.5, intercepts=[-1024.25] * shape[0])
    elif kind == "implicit VR":
        stored = rng.integers(-1000, 3000, shape).astype(np.int16)
        options = dict(syntax=ImplicitVRLittleEndian)
    elif kind == "big endian":
        stored = rng.integers(-1000, 3000, shape).astype(np.int16)
        options = dict(syntax=ExplicitVRBigEndian)
    else:  # slice positions drift sideways by less than the tilt tolerance
        stored = rng.integers(-1000, 3000, shape).astype(np.int16)
        options = dict(drift=(0.004, -0.003))
    write_slices(tmp_path / "ct", stored, **options)
    series = only_series(tmp_path / "ct")
    assert all(ds.get_item("PixelData", keep_deferred=True).value is None for ds in series.headers)
    voxels = assert_same_as_simpleitk(series)
    if kind == "s16 full range clipped":
        assert voxels.min() == -32768 and voxels.max() == 32767 - 1024


def test_monochrome1_is_left_to_simpleitk(tmp_path):
    write_slices(tmp_path / "ct", np.random.default_rng(2).integers(0, 3000, (3, 200, 192)).astype(np.int16))
    for path in (tmp_path / "ct").iterdir():
        ds = pydicom.dcmread(path)
        ds.PhotometricInterpretation = "MONOCHROME1"
        ds.save_as(path)
    series = only_series(tmp_path / "ct")
    with pytest.raises(ValueError, match="MONOCHROME1"):
        io_dicom._decode_with_pydicom(series)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_series_int16(series)),
                                  sitk.GetArrayFromImage(io_dicom._read_with_simpleitk(series)))


def test_truncated_pixel_data_is_refused_by_both_readers(tmp_path):
    write_slices(tmp_path / "ct", np.zeros((4, 12, 16), np.int16))
    victim = sorted((tmp_path / "ct").iterdir())[2]
    victim.write_bytes(victim.read_bytes()[:-40])
    series = only_series(tmp_path / "ct")
    with pytest.raises(Exception):
        io_dicom._decode_with_pydicom(series)
    with pytest.raises(DicomError, match="corrupt or truncated"):
        read_series_int16(series)


def test_pixel_data_stays_on_disk_after_scan_and_decoding(tmp_path):
    hu = np.random.default_rng(3).integers(-1000, 2000, (3, 256, 256)).astype(np.int16)  # 128 KiB per slice
    write_slices(tmp_path / "ct", hu + 1024)
    series = only_series(tmp_path / "ct")
    hu = hu[::-1]  # written head to feet, read feet to head (along the slice normal)

    def values_in_memory() -> list[bool]:
        return [ds.get_item("PixelData", keep_deferred=True).value is not None for ds in series.headers]

    assert not any(values_in_memory())
    first = io_dicom._decode_with_pydicom(series)
    assert not any(values_in_memory())
    np.testing.assert_array_equal(first, hu)
    np.testing.assert_array_equal(io_dicom._decode_with_pydicom(series), hu)  # the headers can be decoded again
