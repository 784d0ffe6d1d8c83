"""Enhanced and legacy-converted multi-frame CT, read frame by frame as its single-frame source is read.

The multi-frame inputs are made from a real GE CT series: highdicom's legacy converter (Legacy Converted Enhanced
CT), and an Enhanced CT derived from that file with pydicom (frames shuffled; orientation and rescale in each
frame's own functional groups, each frame stored with its own offset that its intercept takes back), also RLE
compressed. Converted
with the same case folder name and key, a multi-frame case must give the same output files, byte for byte, as
its single-frame source; ``usam predict``'s reader must give the same image.
"""

from __future__ import annotations

import copy
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from highdicom.legacy import LegacyConvertedEnhancedCTImage
from pydicom.sequence import Sequence
from pydicom.uid import RLELossless, generate_uid

from care_dataset.convert.pipeline import convert_dataset
from care_dataset.deid.anonymize import anonymize_tree
from care_dataset.deid.verify import collect_identifying_values, scan_for_leaks
from care_dataset.raw.dicom import read_series_int16, scan_dicom
from care_dataset.raw.profiles import load_profile
from moved_series import TWO_STACKS, write_itk_snap_label, write_moved_series
from usam.predict import read_image

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
GE_DATA = SHARED / "dcmqi_ct3slice"
GE_SERIES = GE_DATA / "ct-3slice"
KEY = b"test-key-not-secret"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
CASE = "ct case"  # the same case folder name for both sources: it enters the case ID
KINDS = ("legacy converted", "enhanced", "enhanced, RLE lossless")

needs_ge_series = pytest.mark.skipif(not GE_SERIES.is_dir(), reason="../shared/data/dcmqi_ct3slice is missing")


def legacy_converted(sources: list[Path], out: Path) -> Path:
    """highdicom's Legacy Converted Enhanced CT of the single-frame files ``sources``, as one file ``out``."""
    headers = [pydicom.dcmread(p) for p in sources]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # highdicom: the test patient's name has one component
        image = LegacyConvertedEnhancedCTImage(
            headers, series_instance_uid=generate_uid(), series_number=int(headers[0].SeriesNumber),
            sop_instance_uid=generate_uid(), instance_number=1)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save_as(out)
    return out


def enhanced_ct(legacy: Path, out: Path) -> Path:
    """An Enhanced CT made from the legacy-converted file ``legacy``: its frames in another order, orientation and
    rescale moved from the shared functional groups into each frame's, frame k stored 10 * (k + 1) higher and its
    intercept as much lower (same HU)."""
    ds = pydicom.dcmread(legacy)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = ENHANCED_CT
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    stored = ds.pixel_array.astype(np.int32)
    order = np.roll(np.arange(len(stored)), 1)  # no frame stays in place
    shared = ds.SharedFunctionalGroupsSequence[0]
    orientation, transform = shared.PlaneOrientationSequence, shared.PixelValueTransformationSequence
    del shared.PlaneOrientationSequence, shared.PixelValueTransformationSequence
    frames, pixels = [], []
    for k, old in enumerate(order):
        groups = ds.PerFrameFunctionalGroupsSequence[int(old)]
        groups.PlaneOrientationSequence = copy.deepcopy(orientation)
        item = copy.deepcopy(transform[0])
        item.RescaleIntercept = float(item.RescaleIntercept) - 10 * (k + 1)
        groups.PixelValueTransformationSequence = Sequence([item])
        frames.append(groups)
        pixels.append(stored[old] + 10 * (k + 1))
    assert np.max(pixels) <= np.iinfo(np.int16).max
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.PixelData = np.stack(pixels).astype(np.int16).tobytes()
    ds.save_as(out)
    return out


def multi_frame_copy(sources: list[Path], folder: Path, kind: str) -> Path:
    """The single-frame files ``sources`` as one multi-frame file of ``kind`` in ``folder``."""
    path = legacy_converted(sources, folder / "frames.dcm")
    if kind.startswith("enhanced"):
        enhanced_ct(path, path)
    if kind.endswith("RLE lossless"):
        ds = pydicom.dcmread(path)
        ds.compress(RLELossless, generate_instance_uid=False)
        ds.save_as(path)
    return path


def ge_case(raw: Path, kind: str | None) -> Path:
    """A case folder holding the real GE series (``kind`` None) or its multi-frame copy, and the real label."""
    case = raw / CASE
    if kind is None:
        shutil.copytree(GE_SERIES, case / "CT")
    else:
        multi_frame_copy(sorted(GE_SERIES.glob("*.dcm")), case / "CT", kind)
    shutil.copy(GE_DATA / "liver_seg.nrrd", case)
    return case


def convert(raw: Path, out: Path) -> dict[str, bytes]:
    """Every output file of ``care-convert raw out`` (relative path -> content), without the resume records
    under ``.tmp/`` (they hold a fingerprint of the raw files)."""
    summary = convert_dataset(raw, out, load_profile("care"), KEY, True, progress=False)
    assert summary.converted == 1, summary.failures
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.relative_to(out).parts[0] != ".tmp"}


def image_of(series) -> tuple[np.ndarray, dict]:
    image = read_series_int16(series)
    return sitk.GetArrayFromImage(image), series.geometry()


# ---------------------------------------------------------------- reading


@needs_ge_series
@pytest.mark.parametrize("kind", KINDS)
def test_frames_make_the_series_their_source_makes(tmp_path, kind):
    sources = sorted(GE_SERIES.glob("*.dcm"))
    multi_frame_copy(sources, tmp_path / "MF", kind)
    (single,), (multi,) = scan_dicom(GE_SERIES).series, scan_dicom(tmp_path / "MF").series
    assert multi.modality == "CT" and multi.size == (512, 512, 3) and multi.layout is None
    assert multi.header.PatientID == single.header.PatientID  # the case ID is the same
    assert multi.spacing == single.spacing and multi.origin == single.origin and multi.direction == single.direction
    hu, _ = image_of(multi)
    np.testing.assert_array_equal(hu, image_of(single)[0])
    assert -1100 < np.median(hu) < 200 and hu.dtype == np.int16


@needs_ge_series
def test_frames_of_a_two_stack_tilted_series_keep_its_true_positions(tmp_path):
    sources = write_moved_series(tmp_path / "CT", TWO_STACKS, 15.0)
    multi_frame_copy(sources, tmp_path / "MF", "enhanced")
    (single,), (multi,) = scan_dicom(tmp_path / "CT").series, scan_dicom(tmp_path / "MF").series
    assert multi.geometry() == single.geometry()
    np.testing.assert_array_equal(multi.layout.offsets, single.layout.offsets)
    assert multi.layout.notes() == single.layout.notes() and multi.layout.tilt_degrees == pytest.approx(15.0)
    np.testing.assert_array_equal(image_of(multi)[0], image_of(single)[0])


@needs_ge_series
def test_the_files_of_a_concatenation_make_one_series(tmp_path):
    path = multi_frame_copy(sorted(GE_SERIES.glob("*.dcm")), tmp_path / "MF", "enhanced")
    whole = pydicom.dcmread(path)
    stored = whole.pixel_array
    whole.ConcatenationUID = generate_uid()
    for number, frames in enumerate(([2, 0], [1]), start=1):  # frames split over two files, out of order
        part = copy.deepcopy(whole)
        part.SOPInstanceUID = part.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        part.InConcatenationNumber = number
        part.NumberOfFrames = len(frames)
        part.PerFrameFunctionalGroupsSequence = Sequence([whole.PerFrameFunctionalGroupsSequence[k] for k in frames])
        part.PixelData = stored[frames].tobytes()
        part.save_as(tmp_path / "MF" / f"part{number}.dcm")
    path.unlink()
    (single,), (multi,) = scan_dicom(GE_SERIES).series, scan_dicom(tmp_path / "MF").series
    assert multi.geometry() == single.geometry() and sorted(set(multi.files)) == sorted((tmp_path / "MF").iterdir())
    np.testing.assert_array_equal(image_of(multi)[0], image_of(single)[0])


# ---------------------------------------------------------------- conversion and prediction


@needs_ge_series
@pytest.mark.parametrize("kind", KINDS)
def test_multi_frame_case_converts_to_the_same_output_as_its_source(tmp_path, kind):
    ge_case(tmp_path / "raw_single", None)
    ge_case(tmp_path / "raw_multi", kind)
    single = convert(tmp_path / "raw_single", tmp_path / "out_single")
    multi = convert(tmp_path / "raw_multi", tmp_path / "out_multi")
    assert any("/image/" in name for name in single)  # the shards are among the files compared
    assert multi == single
    (case,) = json.loads(single["cases.json"]).values()
    assert case["num_slices"] == 3


@needs_ge_series
def test_two_stack_tilted_multi_frame_case_converts_to_the_same_output(tmp_path):
    sources = write_moved_series(tmp_path / "source", TWO_STACKS, 15.0)
    write_itk_snap_label(tmp_path, tmp_path / "source", range(2, 7))
    single_case, multi_case = tmp_path / "raw_single" / CASE, tmp_path / "raw_multi" / CASE
    shutil.copytree(tmp_path / "source", single_case / "CT")
    multi_frame_copy(sources, multi_case / "CT", "legacy converted")
    for case in (single_case, multi_case):
        shutil.copy(tmp_path / "rectum_seg.nrrd", case)
    single = convert(tmp_path / "raw_single", tmp_path / "out_single")
    assert convert(tmp_path / "raw_multi", tmp_path / "out_multi") == single
    (case,) = json.loads(single["cases.json"]).values()
    assert len(case["slice_positions"]) == 5 and case["gantry_tilt_degrees"] == pytest.approx(15.0, abs=1e-3)


@needs_ge_series
@pytest.mark.parametrize("kind", KINDS)
def test_predict_reads_the_same_image(tmp_path, kind):
    multi_frame_copy(sorted(GE_SERIES.glob("*.dcm")), tmp_path / "MF", kind)
    single_notes, multi_notes = [], []
    single, multi = read_image(GE_SERIES, single_notes), read_image(tmp_path / "MF", multi_notes)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(multi), sitk.GetArrayFromImage(single))
    assert (multi.GetSpacing(), multi.GetOrigin(), multi.GetDirection()) == \
        (single.GetSpacing(), single.GetOrigin(), single.GetDirection())
    assert multi_notes == single_notes == ["read the CT series 2 (3 slices)"]


# ---------------------------------------------------------------- damaged multi-frame files


@needs_ge_series
def test_frames_without_matching_descriptions_are_set_aside_with_the_reason(tmp_path):
    path = multi_frame_copy(sorted(GE_SERIES.glob("*.dcm")), tmp_path / "MF", "legacy converted")
    ds = pydicom.dcmread(path)
    del ds.PerFrameFunctionalGroupsSequence[1]
    ds.save_as(path)
    scan = scan_dicom(tmp_path / "MF")
    assert scan.series == [] and scan.num_files == 1
    assert scan.skipped == {"multi-frame image whose frame descriptions do not match its number of frames": 1}


@needs_ge_series
def test_truncated_multi_frame_case_fails_with_a_reason(tmp_path):
    case = ge_case(tmp_path / "raw", "legacy converted")
    path = case / "CT" / "frames.dcm"
    path.write_bytes(path.read_bytes()[:-100_000])
    summary = convert_dataset(tmp_path / "raw", tmp_path / "out", load_profile("care"), KEY, True, progress=False)
    assert summary.converted == 0
    (entry,) = json.loads((tmp_path / "out" / "report.json").read_text())
    assert entry["status"] == "failed" and entry["reason"] == "multi-frame pixel data is corrupt or truncated"
    assert json.loads((tmp_path / "out" / "cases.json").read_text()) == {}
    assert not [p for p in (tmp_path / "out").glob("slices*/*") if p.is_dir()]  # no case stored


# ---------------------------------------------------------------- de-identifying


@needs_ge_series
@pytest.mark.parametrize("kind", KINDS[:2])
def test_a_multi_frame_case_is_anonymized_and_reads_back_as_its_source(tmp_path, kind):
    """care-anonymize cleans the functional groups (dates, UIDs) like the rest of the header; the frames keep
    their geometry and pixels."""
    raw, out = tmp_path / "raw", tmp_path / "anon"
    ge_case(raw, kind)
    (result,) = anonymize_tree(raw, out, KEY)
    assert result["status"] == "anonymized" and result["files"] == 1, result
    assert scan_for_leaks(out, collect_identifying_values(raw)) == []
    (single,), (anonymized,) = scan_dicom(GE_SERIES).series, scan_dicom(out).series
    assert anonymized.size == (512, 512, 3) and anonymized.spacing == single.spacing
    assert anonymized.origin == single.origin and anonymized.direction == single.direction
    np.testing.assert_array_equal(image_of(anonymized)[0], image_of(single)[0])
