"""care-convert on damaged or misplaced real inputs: loose files in the raw folder, profile names, corrupt
compressed streams, images that are not CT in HU, fill-value shards, stray files and dangling links in a DICOM
case, unusable rescale or spacing values, a damaged annotated series, and library warnings."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from pathlib import Path

import pydicom
import pytest
import SimpleITK as sitk

from care_dataset.cli import anonymize_main, convert_main
from care_dataset.convert.case import CaseError, load_case
from care_dataset.convert.pipeline import convert_dataset
from care_dataset.format import reader
from care_dataset.raw.dicom import scan_dicom
from care_dataset.raw.discover import discover_cases, loose_files_problem
from care_dataset.raw.profiles import load_profile
from real_profiles import LIVER_COLON, LIVER_SPINE
from usam.inference import InputError
from usam.predict import read_image

KEY = b"integrity-test-key-0123456789"
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
GE = SHARED / "dcmqi_ct3slice"
TOTALSEG = SHARED / "totalseg_example_ct_sm"
needs_ge = pytest.mark.skipif(not GE.is_dir(), reason="../shared/data/dcmqi_ct3slice not available")
needs_totalseg = pytest.mark.skipif(not TOTALSEG.is_dir(), reason="../shared/data/totalseg_example_ct_sm not available")

def _profile(tmp_path: Path, text: str):
    path = tmp_path / "profile.toml"
    path.write_text(text)
    return load_profile(path)


@pytest.fixture()
def key_file(tmp_path) -> Path:
    path = tmp_path / "key.txt"
    path.write_bytes(KEY + b"\n")
    path.chmod(0o600)
    return path


def _ge_case(case: Path) -> Path:
    """The real GE series and its manual liver/spine annotation in one case folder."""
    shutil.copytree(GE / "ct-3slice", case / "ct-3slice")
    shutil.copy(GE / "liver_spine_seg.nrrd", case / "liver_spine_seg.nrrd")
    return case


def _totalseg_case(case: Path, image: Path | None = None, label: Path | None = None) -> Path:
    case.mkdir(parents=True)
    shutil.copy(image or TOTALSEG / "example_ct_sm.nii.gz", case / "example_ct_sm.nii.gz")
    shutil.copy(label or TOTALSEG / "example_seg.nii.gz", case / "example_seg.nii.gz")
    return case


def _flip_byte(source: Path, target: Path, offset: int) -> Path:
    data = bytearray(source.read_bytes())
    data[offset] ^= 0x01
    target.write_bytes(bytes(data))
    return target


def _set_raw_value(path: Path, group: int, element: int, value: bytes) -> None:
    """Replace one element's value in an implicit VR little endian file, as a damaged export would hold it."""
    raw = path.read_bytes()
    at = raw.find(struct.pack("<HH", group, element))
    length = struct.unpack("<I", raw[at + 4:at + 8])[0]
    value += b" " * (len(value) % 2)
    path.write_bytes(raw[:at + 4] + struct.pack("<I", len(value)) + value + raw[at + 8 + length:])


def _report(out: Path) -> list[dict]:
    return json.loads((out / "report.json").read_text())


# --- loose files and profile names -------------------------------------------------------------------------------


@needs_ge
@pytest.mark.parametrize("command", [convert_main, anonymize_main])
def test_loose_dicom_files_in_the_raw_folder_are_refused_with_a_layout_hint(tmp_path, key_file, command, capsys):
    raw = tmp_path / "raw"
    shutil.copytree(GE / "ct-3slice", raw)
    code = command([str(raw), str(tmp_path / "out"), "--key-file", str(key_file)])
    err = capsys.readouterr().err
    assert code == 2
    assert "holds 3 DICOM or volume file(s) directly; put each case in a folder of its own" in err
    assert f"{raw}/<case>/" in err and "01.dcm" not in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.dcm"))


@needs_totalseg
def test_a_loose_volume_file_beside_case_folders_is_refused(tmp_path, key_file, capsys):
    raw = tmp_path / "raw"
    _totalseg_case(raw / "case1")
    shutil.copy(TOTALSEG / "example_ct_sm.nii.gz", raw / "scan.nii.gz")
    assert convert_main([str(raw), str(tmp_path / "out"), "--key-file", str(key_file), "--quiet"]) == 2
    assert "holds 1 DICOM or volume file(s) directly" in capsys.readouterr().err


@needs_totalseg
def test_a_profile_name_is_not_shadowed_by_a_folder_of_that_name(tmp_path, key_file, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "care").mkdir()  # what `care-publish out/ care/` leaves
    (tmp_path / "care" / "README.md").write_text("published")
    assert load_profile("care").name == "care"
    (tmp_path / "mine.toml").write_text(LIVER_COLON)
    assert load_profile("mine.toml").name == "liver-colon"
    _totalseg_case(tmp_path / "raw" / "case1")
    code = convert_main(["raw", "out", "--key-file", str(key_file), "--quiet"])
    assert "profile file" not in capsys.readouterr().err
    assert code == 1  # the care profile runs (and refuses totalseg's organ values)
    assert "are not in profile care" in _report(tmp_path / "out")[0]["reason"]


# --- compressed streams --------------------------------------------------------------------------------------------


@needs_totalseg
@pytest.mark.parametrize("role, offset", [("image", 5000), ("annotation", 3000)])
def test_a_gzip_stream_failing_its_crc_is_refused_naming_its_role(tmp_path, role, offset):
    name = "example_ct_sm.nii.gz" if role == "image" else "example_seg.nii.gz"
    damaged = _flip_byte(TOTALSEG / name, tmp_path / name, offset)
    sitk.ReadImage(str(damaged))  # ITK reads it without complaint
    case = _totalseg_case(tmp_path / "raw" / "case1", **{("image" if role == "image" else "label"): damaged})
    with pytest.raises(CaseError) as err:
        load_case(discover_cases(case.parent, _profile(tmp_path, LIVER_COLON))[0], _profile(tmp_path, LIVER_COLON))
    assert str(err.value) == (f"the {role} file: corrupt NIfTI: its gzip compressed data fails its integrity "
                              "check (CRC, checksum or length)")


@needs_totalseg
def test_metaimage_zlib_data_failing_its_checksum_is_refused(tmp_path):
    sitk.WriteImage(sitk.ReadImage(str(TOTALSEG / "example_ct_sm.nii.gz")), str(tmp_path / "ct.mha"), True)
    damaged = _flip_byte(tmp_path / "ct.mha", tmp_path / "damaged.mha", (tmp_path / "ct.mha").stat().st_size * 2 // 3)
    case = tmp_path / "raw" / "case1"
    case.mkdir(parents=True)
    shutil.copy(damaged, case / "ct.mha")
    shutil.copy(TOTALSEG / "example_seg.nii.gz", case / "example_seg.nii.gz")
    profile = _profile(tmp_path, LIVER_COLON)
    with pytest.raises(CaseError, match="^the image file: corrupt MetaImage: its zlib compressed data fails"):
        load_case(discover_cases(case.parent, profile)[0], profile)


# --- plausibility: HU, fill-value shards ---------------------------------------------------------------------------


@needs_totalseg
def test_an_image_near_zero_is_not_ct_unless_the_profile_relaxes_the_rule(tmp_path):
    ct = sitk.ReadImage(str(TOTALSEG / "example_ct_sm.nii.gz"))
    sitk.WriteImage(sitk.Cast(ct, sitk.sitkFloat32) / 10000.0, str(tmp_path / "example_ct_sm.nii.gz"))
    _totalseg_case(tmp_path / "raw" / "case1", image=tmp_path / "example_ct_sm.nii.gz")
    summary = convert_dataset(tmp_path / "raw", tmp_path / "out", _profile(tmp_path, LIVER_COLON), KEY, True,
                              progress=False)
    assert summary.failed == 1
    assert summary.report[0]["reason"].startswith("the image's values range from 0 to 0: no air")

    relaxed = _profile(tmp_path, LIVER_COLON + "[image]\nrequire_air = false\n")
    summary = convert_dataset(tmp_path / "raw", tmp_path / "out2", relaxed, KEY, True, progress=False)
    assert summary.converted == 1
    dataset = reader.open_dataset(tmp_path / "out2")
    (case_id,) = dataset.case_ids()
    image, label = dataset.read_case(case_id)
    assert image.shape[0] == dataset.cases[case_id]["num_slices"] > 0 and not image.any() and label.any()
    assert not dataset.read_slice(case_id, 0)[0].any()
    assert dataset.missing_cases([case_id]) == []


# --- DICOM cases: stray files, dangling links, unusable values, the damaged annotated series, warnings -------------


@needs_ge
def test_a_stray_file_and_a_dangling_link_in_a_dicom_case_are_set_aside_with_notes(tmp_path):
    case = _ge_case(tmp_path / "raw" / "GE_case")
    (case / "ct-3slice" / "Thumbs.db").write_bytes(b"\0" * 128 + b"DICM" + bytes(range(256)) * 8)
    (case / "ct-3slice" / "04.dcm").symlink_to(tmp_path / "gone.dcm")
    summary = convert_dataset(tmp_path / "raw", tmp_path / "out", _profile(tmp_path, LIVER_SPINE), KEY, True,
                              progress=False)
    assert summary.converted == 1, summary.failures
    (entry,) = _report(tmp_path / "out")
    assert entry["notes"] == ["set aside 1 dangling symbolic link(s)",
                              "set aside 1 unreadable file(s) (no parseable DICOM header: stray or damaged)"]
    resumed = convert_dataset(tmp_path / "raw", tmp_path / "out", _profile(tmp_path, LIVER_SPINE), KEY, True,
                              progress=False)
    assert resumed.report == summary.report


@needs_ge
@pytest.mark.parametrize("element, value, reason", [
    ((0x0028, 0x1052), b"nan", "image(s) whose RescaleIntercept is not a finite number"),
    ((0x0028, 0x0030), b"abc\\def", "image(s) whose PixelSpacing is not two numbers"),
    ((0x0020, 0x0032), b"nan\\nan\\nan", "image(s) whose ImagePositionPatient is not three numbers"),
])
def test_unusable_rescale_or_spacing_values_give_a_reason(tmp_path, element, value, reason):
    case = _ge_case(tmp_path / "raw" / "GE_case")
    for path in sorted((case / "ct-3slice").iterdir()):
        _set_raw_value(path, *element, value)
    profile = _profile(tmp_path, LIVER_SPINE)
    no_series = rf"^no usable axial image series among 3 DICOM files \(3 {re.escape(reason)}\)$"
    with pytest.raises(CaseError, match=no_series):
        load_case(discover_cases(case.parent, profile)[0], profile)
    for name in ("01.dcm", "02.dcm"):  # two slices repaired: the third is still refused
        shutil.copy(GE / "ct-3slice" / name, case / "ct-3slice" / name)
    off_grid = rf"^no series is on the annotation grid 512x512x3 .*; set aside: 1 {re.escape(reason)}$"
    with pytest.raises(CaseError, match=off_grid):
        load_case(discover_cases(case.parent, profile)[0], profile)


@needs_ge
def test_a_damaged_annotated_series_is_named_as_the_annotated_one(tmp_path):
    case = _ge_case(tmp_path / "raw" / "GE_case")
    files = sorted((case / "ct-3slice").iterdir())
    first, second = pydicom.dcmread(files[0]), pydicom.dcmread(files[1])
    second.ImagePositionPatient = first.ImagePositionPatient  # two slices at one place: the series is unusable
    second.save_as(files[1])
    (case / "other").mkdir()
    for path in files[:2]:  # another series of two slices, intact
        ds = pydicom.dcmread(GE / "ct-3slice" / path.name)
        ds.SeriesInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["other series"])
        ds.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["other", path.name])
        ds.save_as(case / "other" / path.name)
    profile = _profile(tmp_path, LIVER_SPINE)
    with pytest.raises(CaseError) as err:
        load_case(discover_cases(case.parent, profile)[0], profile)
    assert str(err.value) == ("the series of the annotation's size (512x512x3) is not usable: "
                              "series with repeated slice positions")


@needs_ge
def test_pydicom_warnings_become_notes_without_their_text(tmp_path, key_file, capsys, recwarn):
    case = _ge_case(tmp_path / "raw" / "GE_case")
    uid = pydicom.dcmread(GE / "ct-3slice" / "01.dcm").SeriesInstanceUID
    damaged_uid = uid[:-1] + "x"  # not a valid UID: pydicom warns, quoting it
    for path in sorted((case / "ct-3slice").iterdir()):
        _set_raw_value(path, 0x0020, 0x000E, damaged_uid.encode() + b"\0")
    (tmp_path / "profile.toml").write_text(LIVER_SPINE)
    code = convert_main([str(tmp_path / "raw"), str(tmp_path / "out"), "--key-file", str(key_file),
                         "--profile", str(tmp_path / "profile.toml"), "--quiet"])
    assert code == 0
    (entry,) = _report(tmp_path / "out")
    (note,) = entry["notes"]
    assert note.endswith("pydicom warning(s) (UserWarning) while reading; their text is left out (it may quote "
                         "header values)")
    captured = capsys.readouterr()
    assert damaged_uid not in captured.err + captured.out + (tmp_path / "out" / "report.json").read_text()
    assert not [w for w in recwarn if "pydicom" in w.filename]


def test_loose_files_check_ignores_hidden_and_non_image_files(tmp_path):
    (tmp_path / "case1").mkdir()
    (tmp_path / "README.txt").write_text("exported by the PACS")
    (tmp_path / ".DS_Store").write_bytes(b"\0" * 200)
    (tmp_path / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM" + b"\2\0")  # a CD's index of the case folders
    assert loose_files_problem(tmp_path) is None
    (tmp_path / "IM0001").write_bytes(b"\0" * 128 + b"DICM" + b"\2\0")  # DICOM without a suffix
    assert "holds 1 DICOM or volume file(s) directly" in loose_files_problem(tmp_path)


BAD_UTF8 = os.fsdecode(b"scan\xff\xfe")  # a name another system wrote in a legacy code page


@needs_ge
@needs_totalseg
def test_names_that_are_not_utf8_are_set_aside_or_refused_and_never_crash(tmp_path, key_file, capsys):
    raw = tmp_path / "raw"
    case = _ge_case(raw / "GE_case")
    shutil.copy(case / "ct-3slice" / "01.dcm", case / "ct-3slice" / f"{BAD_UTF8}.dcm")  # a 4th copy of slice 1
    _totalseg_case(raw / "ts_case", label=TOTALSEG / "example_seg.nii.gz")
    (raw / "ts_case" / "example_seg.nii.gz").rename(raw / "ts_case" / f"{BAD_UTF8}_seg.nii.gz")
    profile = tmp_path / "profile.toml"
    profile.write_text(LIVER_SPINE)
    code = convert_main([str(raw), str(tmp_path / "out"), "--profile", str(profile), "--key-file", str(key_file),
                         "--quiet"])
    assert code == 1  # the NIfTI case fails, the DICOM case converts
    by_status = {e["status"]: e for e in _report(tmp_path / "out")}
    assert "set aside 1 file(s) whose path is not valid UTF-8 (SimpleITK cannot open them: rename them)" in \
        by_status["converted"]["notes"]
    assert "not valid UTF-8: rename it" in by_status["failed"]["reason"]
    assert not list((tmp_path / "out").rglob(".lock")) and "Traceback" not in capsys.readouterr().err


def test_predict_refuses_a_path_that_is_not_utf8_with_a_reason(tmp_path):
    path = tmp_path / f"{BAD_UTF8}.nii.gz"
    path.write_bytes(b"not read")
    with pytest.raises(InputError, match=r"not valid UTF-8: rename it$"):
        read_image(path)


@needs_ge
def test_a_slice_whose_header_holds_an_unknown_vr_is_set_aside(tmp_path):
    series = tmp_path / "ct"
    shutil.copytree(GE / "ct-3slice", series)
    third = pydicom.dcmread(series / "03.dcm")
    third.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    third.save_as(series / "03.dcm", enforce_file_format=True)
    data = bytearray((series / "03.dcm").read_bytes())
    at = data.index(b"\x08\x00\x08\x00CS")  # ImageType, explicit VR: its VR bytes damaged
    data[at + 4:at + 6] = b"C\xc3"
    (series / "03.dcm").write_bytes(bytes(data))
    scan = scan_dicom(series)
    assert scan.set_aside == {"unreadable file(s) (no parseable DICOM header: stray or damaged)": 1}
    assert [len(s.files) for s in scan.series] == [2] and scan.num_files == 2
    assert read_image(series).GetSize() == (512, 512, 2)
