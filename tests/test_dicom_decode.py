"""Uncompressed DICOM pixel data decoded by pydicom equals SimpleITK's (GDCM) reading of the same series.

care_dataset.raw.dicom decodes uncompressed series with pydicom from the headers its scan parsed and builds the
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
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from care_dataset.raw import dicom
from care_dataset.raw.dicom import DicomError, read_series_int16, scan_dicom
from care_dataset.synth import raw_export
from ct_instances import new_ct_instance

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def assert_same_as_simpleitk(series: dicom.DicomSeries, monkeypatch: pytest.MonkeyPatch) -> np.ndarray:
    """Both paths agree, and read_series_int16 takes the pydicom path; returns the voxels."""
    reference = dicom._read_with_simpleitk(series)
    decoded = dicom._decode_with_pydicom(series)  # raises if pydicom cannot decode: no silent fallback here
    np.testing.assert_array_equal(decoded, sitk.GetArrayViewFromImage(reference))
    with monkeypatch.context() as patch:
        patch.setattr(dicom, "_read_with_simpleitk", lambda s: pytest.fail("fell back to SimpleITK"))
        image = read_series_int16(series)
    assert image.GetPixelID() == sitk.sitkInt16
    assert image.GetSize() == reference.GetSize()
    np.testing.assert_allclose(image.GetSpacing(), reference.GetSpacing(), rtol=0, atol=1e-9)
    np.testing.assert_allclose(image.GetOrigin(), reference.GetOrigin(), rtol=0, atol=1e-9)
    np.testing.assert_allclose(image.GetDirection(), reference.GetDirection(), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(image), decoded)
    return decoded


def write_slices(folder: Path, stored: np.ndarray, *, bits_stored=16, signed=True, intercepts=None, slope=1.0,
                 syntax=ExplicitVRLittleEndian, drift=(0.0, 0.0), orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
                 pixel_spacing=(0.7, 0.9)) -> None:
    """Raw stored values (uint16 bit patterns or int16) as a series, one file per slice, names against the order.

    Slices run head to feet, 3 mm apart along the normal of ``orientation`` (as written, unnormalised).
    """
    folder.mkdir(parents=True)
    series_uid = generate_uid()
    normal = np.cross(orientation[:3], orientation[3:])
    normal /= np.linalg.norm(normal)
    for k, pixels in enumerate(stored):
        ds = new_ct_instance(syntax)
        ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "CT", series_uid, 3
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        position = np.array([-20.0 + k * drift[0], 31.5 + k * drift[1], 0.0]) + (100.0 - 3.0 * k) * normal
        ds.ImagePositionPatient = [round(float(v), 4) for v in position]
        ds.ImageOrientationPatient = list(orientation)
        ds.PixelSpacing = list(pixel_spacing)
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


def only_series(folder: Path) -> dicom.DicomSeries:
    scan = scan_dicom(folder)
    assert len(scan.series) == 1, scan.skipped
    return scan.series[0]


def test_real_series_decodes_like_simpleitk(tmp_path, monkeypatch):
    source = DATA / "dcmqi_ct3slice" / "ct-3slice"
    if not source.is_dir():
        pytest.skip("real data ../shared/data/dcmqi_ct3slice is missing")
    shutil.copytree(source, tmp_path / "ct")
    series = only_series(tmp_path / "ct")
    assert series.transfer_syntax in dicom.PYDICOM_DECODED
    voxels = assert_same_as_simpleitk(series, monkeypatch)
    assert voxels.shape == (3, 512, 512) and voxels.min() >= -3024 and voxels.max() > 1000  # air to bone


def test_synthetic_export_decodes_like_simpleitk(tmp_path, monkeypatch):
    synth = raw_export
    synth.write_raw_dataset(tmp_path, 10, seed=3, size=64, slices=10)  # every messy feature, every pixel format
    native = compressed = 0
    for case in sorted(p for p in tmp_path.iterdir() if p.is_dir()):
        for series in scan_dicom(case).series:
            if series.transfer_syntax in dicom.PYDICOM_DECODED:
                assert_same_as_simpleitk(series, monkeypatch)
                native += 1
            else:  # compressed: SimpleITK reads it, and the scan kept no encapsulated pixel data in memory
                assert all("PixelData" not in ds for ds in series.headers)
                assert read_series_int16(series).GetPixelID() == sitk.sitkInt16
                compressed += 1
    assert native >= 8 and compressed >= 1, (native, compressed)


@pytest.mark.parametrize("kind", ["u12 with high bits set", "s12 sign in bit 11 only", "s16 full range clipped",
                                  "per-slice intercept", "fractional slope", "implicit VR", "big endian",
                                  "in-plane drift", "rounded direction cosines"])
def test_pixel_formats_decode_like_simpleitk(tmp_path, monkeypatch, kind):
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
    elif kind == "in-plane drift":  # slice positions drift sideways by less than the tilt tolerance
        stored = rng.integers(-1000, 3000, shape).astype(np.int16)
        options = dict(drift=(0.004, -0.003))
    else:  # a scanner's cosines written to 6 digits: not exactly unit length
        stored = rng.integers(-1000, 3000, shape).astype(np.int16)
        options = dict(orientation=(0.999998, 0.00174, 0.0, -0.00174, 0.999998, 0.0))
    write_slices(tmp_path / "ct", stored, **options)
    series = only_series(tmp_path / "ct")
    assert all(ds.get_item("PixelData", keep_deferred=True).value is None for ds in series.headers)
    voxels = assert_same_as_simpleitk(series, monkeypatch)
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
        dicom._decode_with_pydicom(series)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_series_int16(series)),
                                  sitk.GetArrayFromImage(dicom._read_with_simpleitk(series)))


def test_truncated_pixel_data_is_refused_by_both_readers(tmp_path):
    write_slices(tmp_path / "ct", np.zeros((4, 200, 192), np.int16))
    victim = sorted((tmp_path / "ct").iterdir())[2]
    victim.write_bytes(victim.read_bytes()[:-1000])
    series = only_series(tmp_path / "ct")
    with pytest.raises(ValueError, match="truncated"):
        dicom._decode_with_pydicom(series)
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
    first = dicom._decode_with_pydicom(series)
    assert not any(values_in_memory())
    np.testing.assert_array_equal(first, hu)
    np.testing.assert_array_equal(dicom._decode_with_pydicom(series), hu)  # the headers can be decoded again


def test_file_changed_after_the_scan_is_not_decoded_from_the_old_offsets(tmp_path, monkeypatch):
    hu = np.random.default_rng(5).integers(-1000, 2000, (3, 200, 192)).astype(np.int16)
    write_slices(tmp_path / "ct", hu + 1024)
    series = only_series(tmp_path / "ct")
    victim = series.files[1]
    ds = pydicom.dcmread(victim)
    ds.InstitutionName = "A LONGER NAME THAT MOVES THE PIXEL DATA"
    ds.save_as(victim)
    with pytest.raises(ValueError, match="changed|not where"):
        dicom._decode_with_pydicom(series)
    monkeypatch.setattr(series.headers[1], "timestamp", victim.stat().st_mtime)  # same mtime: the tag check
    with pytest.raises(ValueError, match="not where"):
        dicom._decode_with_pydicom(series)


@pytest.mark.parametrize("spacing", [(0.0, 0.0), (-0.7, 0.9)])
def test_series_without_positive_pixel_spacing_is_set_aside(tmp_path, spacing):
    write_slices(tmp_path / "ct", np.zeros((3, 12, 16), np.int16), pixel_spacing=spacing)
    scan = scan_dicom(tmp_path / "ct")
    assert scan.series == [] and scan.skipped == {"series without valid orientation or pixel spacing": 1}
