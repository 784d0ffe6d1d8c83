"""care-anonymize leaves out, per instance, what may carry burned-in text: a Philips-like export built from the real
GE series in ../shared/data/dcmqi_ct3slice plus realistic Secondary Capture screens in the same study."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, SecondaryCaptureImageStorage,
                         generate_uid)

from care_dataset.cli import anonymize_main
from care_dataset.deid.anonymize import anonymize_tree
from care_dataset.deid.quarantine import (BURNED_IN, COLOUR, SCREEN_CAPTURE_CLASS, SCREEN_IMAGE_TYPE,
                                          SECONDARY_IMAGE_TYPE, instance_class, quarantine_reasons)
from care_dataset.deid.verify import collect_identifying_values, scan_for_leaks

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REAL_SERIES = DATA / "dcmqi_ct3slice" / "ct-3slice"
KEY = b"quarantine-test-key-0123456789"

needs_real_ct = pytest.mark.skipif(not REAL_SERIES.is_dir(), reason="../shared/data/dcmqi_ct3slice not present")


def _save(ds: Dataset, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _real_slices() -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in sorted(REAL_SERIES.glob("*.dcm"))]


def _screen(ct: Dataset, image_type: str, burned_in: str | None, colour: bool, number: int,
            sop_class: str = SecondaryCaptureImageStorage, series_uid: str | None = None) -> Dataset:
    """A screen as a Philips console exports it beside the CT: same patient and study, its own series, the
    patient's name and ID drawn into the pixels (here as their bytes, which the leak scan finds if copied)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = image_type.split("\\")
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    for keyword in ("StudyDate", "StudyTime", "AccessionNumber", "PatientName", "PatientID", "PatientSex",
                    "PatientAge", "StudyInstanceUID", "StudyID", "ReferringPhysicianName"):
        if keyword in ct:
            setattr(ds, keyword, ct.data_element(keyword).value)
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.Modality = "CT"
    ds.ConversionType = "WSD"
    ds.Manufacturer = "Philips"
    ds.ManufacturerModelName = "Brilliance 64"
    ds.SeriesNumber, ds.InstanceNumber = 1000 + number, 1
    ds.SeriesDescription = image_type.split("\\")[-1].replace("_", " ").title() + " screen"
    if burned_in is not None:
        ds.BurnedInAnnotation = burned_in
    rows, columns = 64, 96
    text = f"{ct.PatientName} {ct.PatientID} ".encode()
    if colour:
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        size = rows * columns * 3
    else:
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        size = rows * columns
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = (text * (size // len(text) + 1))[:size]
    return ds


def _philips_like_export(case: Path) -> dict[str, int]:
    """The real CT series, a workstation reformat of it (DERIVED\\SECONDARY\\REFORMATTED, kept) and the screens
    of the issue: patient information flagged YES, dose information and results flagged NO, a reference survey
    view not flagged, and a dose screen stored under the CT class. Returns what the report must count."""
    slices = _real_slices()
    study = case / "DICOM" / "ST000001"
    for i, ds in enumerate(slices, start=1):
        _save(ds, study / "SE000001" / f"IM{i:06d}")
    reformat_series = generate_uid()
    for i, src in enumerate(slices, start=1):
        ds = copy.deepcopy(src)
        ds.ImageType = ["DERIVED", "SECONDARY", "REFORMATTED"]
        ds.SeriesInstanceUID, ds.SeriesNumber = reformat_series, 3
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        _save(ds, study / "SE000003" / f"IM{i:06d}")
    ct = slices[0]
    screens = [
        (_screen(ct, "DERIVED\\SECONDARY\\PATIENT_INFO", "YES", colour=True, number=1), "SE001001"),
        (_screen(ct, "DERIVED\\SECONDARY\\DOSE_INFO", "NO", colour=False, number=2), "SE001002"),
        (_screen(ct, "DERIVED\\SECONDARY\\RESULTS", "NO", colour=True, number=3), "SE001003"),
        (_screen(ct, "DERIVED\\SECONDARY\\REF_SURVIEW", None, colour=False, number=4), "SE001004"),
        (_screen(ct, "DERIVED\\SECONDARY\\DOSE_INFO", None, colour=False, number=5, sop_class=CTImageStorage),
         "SE001005"),
    ]
    for ds, folder in screens:
        _save(ds, study / folder / "IM000001")
    return {
        ("Secondary Capture Image Storage", "PATIENT_INFO",
         (BURNED_IN, SCREEN_CAPTURE_CLASS, SCREEN_IMAGE_TYPE, SECONDARY_IMAGE_TYPE, COLOUR)): 1,
        ("Secondary Capture Image Storage", "DOSE_INFO",
         (SCREEN_CAPTURE_CLASS, SCREEN_IMAGE_TYPE, SECONDARY_IMAGE_TYPE)): 1,
        ("Secondary Capture Image Storage", "SECONDARY", (SCREEN_CAPTURE_CLASS, SECONDARY_IMAGE_TYPE, COLOUR)): 1,
        ("Secondary Capture Image Storage", "SECONDARY", (SCREEN_CAPTURE_CLASS, SECONDARY_IMAGE_TYPE)): 1,
        ("CT Image Storage", "DOSE_INFO", (SCREEN_IMAGE_TYPE, SECONDARY_IMAGE_TYPE)): 1,
    }


def _counted(left_out: list[dict]) -> dict:
    return {(e["sop_class"], e["image_type"], tuple(e["reasons"])): e["count"] for e in left_out}


@needs_real_ct
def test_philips_like_export_keeps_the_ct_series_complete_and_leaves_out_every_screen(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "anon"
    expected = _philips_like_export(raw / "Doe^Jan export")
    (result,) = anonymize_tree(raw, out, KEY)
    assert result["status"] == "anonymized" and result["files"] == 6, result
    assert _counted(result["left_out"]) == expected
    case = out / result["case_id"]
    copies = {p.relative_to(case).as_posix(): pydicom.dcmread(p) for p in sorted(case.rglob("*.dcm"))}
    assert sorted(copies) == [f"00{s}/0000{i}.dcm" for s in (1, 2) for i in (1, 2, 3)]
    originals = {int(ds.InstanceNumber): ds for ds in _real_slices()}
    for i in (1, 2, 3):  # the CT series, complete and byte for byte in its pixels
        ds = copies[f"001/0000{i}.dcm"]
        assert ds.SOPClassUID == CTImageStorage and list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
        assert ds.PixelData == originals[int(ds.InstanceNumber)].PixelData
        assert list(copies[f"002/0000{i}.dcm"].ImageType) == ["DERIVED", "SECONDARY", "REFORMATTED"]
    assert all(ds.SOPClassUID != SecondaryCaptureImageStorage and ds.SamplesPerPixel == 1 for ds in copies.values())
    assert scan_for_leaks(out, collect_identifying_values(raw)) == []
    text = json.dumps(result)
    for value in ("JANCT000", "Doe^Jan", originals[1].StudyInstanceUID):  # the report holds fixed words only
        assert value not in text.replace(result["raw_folder"], "")


@needs_real_ct
def test_the_opt_in_copies_the_screens_and_a_rerun_without_it_takes_them_out(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "anon"
    _philips_like_export(raw / "export")
    (allowed,) = anonymize_tree(raw, out, KEY, allow_burned_in=True)
    assert allowed["status"] == "anonymized" and allowed["files"] == 11 and allowed["left_out"] == []
    assert any("burned-in" in note and "5" in note for note in allowed["notes"])
    leaks = scan_for_leaks(out, collect_identifying_values(raw))
    # the patient's name drawn into the screens' pixels (the ID, 5 digits, is too short for the scan)
    assert {(leak.masked, leak.category, leak.where) for leak in leaks} == {("JA***", "DICOM PatientName", "content")}
    assert len({leak.path for leak in leaks}) == 5  # the flagged screen, the unflagged ones, the CT-class one
    (again,) = anonymize_tree(raw, out, KEY)  # the fingerprint knows the opt-in: the case is rebuilt
    assert again["status"] == "anonymized" and again["reason"] == "" and again["files"] == 6
    assert len(list((out / again["case_id"]).rglob("*.dcm"))) == 6
    assert scan_for_leaks(out, collect_identifying_values(raw)) == []


@needs_real_ct
def test_a_case_of_screens_only_is_skipped_with_the_reason(tmp_path, capsys):
    raw, out = tmp_path / "raw", tmp_path / "anon"
    ct = _real_slices()[0]
    _save(_screen(ct, "DERIVED\\SECONDARY\\DOSE_INFO", "NO", colour=False, number=1), raw / "dose only" / "IM1")
    _save(_screen(ct, "DERIVED\\SECONDARY\\PATIENT_INFO", None, colour=True, number=2), raw / "dose only" / "IM2")
    key_file = tmp_path / "key"
    key_file.write_bytes(KEY)
    assert anonymize_main([str(raw), str(out), "--key-file", str(key_file)]) == 0
    captured = capsys.readouterr()
    assert "skipped dose only: every image of the case may carry burned-in text (2 left out:" in captured.err
    assert "--allow-burned-in" in captured.err and "Secondary Capture Image Storage" in captured.err
    assert captured.out.strip() == "0 anonymized, 0 failed, 1 skipped; 2 instance(s) that may carry burned-in " \
                                   "text left out"
    assert "JANCT000" not in captured.err + captured.out
    assert list(out.iterdir()) == []


@needs_real_ct
def test_the_terminal_counts_what_was_left_out(tmp_path, capsys):
    raw, out = tmp_path / "raw", tmp_path / "anon"
    _philips_like_export(raw / "export")
    key_file = tmp_path / "key"
    key_file.write_bytes(KEY)
    assert anonymize_main([str(raw), str(out), "--key-file", str(key_file)]) == 0
    captured = capsys.readouterr()
    line = next(line for line in captured.err.splitlines() if line.startswith("left out of export: "))
    assert line.startswith("left out of export: 5 instance(s) that may carry burned-in text: ")
    assert "1 CT Image Storage (ImageType DOSE_INFO:" in line
    assert captured.out.strip().endswith("5 instance(s) that may carry burned-in text left out")


def _header(**values) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = values.pop("sop_class", CTImageStorage)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = 4
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    ds.PixelData = b"\x00" * 32
    return ds


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")  # lower-case and hyphenated CS, as some devices write
@pytest.mark.parametrize("values, reasons", [
    (dict(ImageType=["ORIGINAL", "PRIMARY", "AXIAL"], ImagePositionPatient=[0, 0, 0]), []),
    (dict(ImageType=["ORIGINAL", "PRIMARY", "AXIAL"], BurnedInAnnotation="yes "), [BURNED_IN]),
    (dict(ImageType=["ORIGINAL", "PRIMARY", "AXIAL"], BurnedInAnnotation="NO"), []),
    (dict(ImageType=["DERIVED", "SECONDARY", "MPR"], ImagePositionPatient=[0, 0, 0],
          ImageOrientationPatient=[1, 0, 0, 0, 1, 0]), []),  # a reformat placed in the patient: kept
    (dict(ImageType=["DERIVED", "SECONDARY", "MPR"], ImagePositionPatient=[0, 0, 0],
          ImageOrientationPatient=[1, 0, 0, 0, 1, 0], sop_class=SecondaryCaptureImageStorage),
     [SCREEN_CAPTURE_CLASS, SECONDARY_IMAGE_TYPE]),
    (dict(ImageType=["DERIVED", "SECONDARY", "OTHER"]), [SECONDARY_IMAGE_TYPE]),  # no geometry
    (dict(ImageType=["DERIVED", "SECONDARY", "AXIAL"], ImagePositionPatient=[0, 0, 0],
          ImageOrientationPatient=[1, 0, 0, 0, 1, 0], sop_class=MRImageStorage), []),
    (dict(ImageType=["ORIGINAL", "PRIMARY", "Screen Save"]), [SCREEN_IMAGE_TYPE]),
    (dict(ImageType=["DERIVED", "PRIMARY", "dose-report"]), [SCREEN_IMAGE_TYPE]),
    (dict(ImageType="ORIGINAL\\PRIMARY\\AXIAL\\PATIENT INFO"), [SCREEN_IMAGE_TYPE]),
    (dict(ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"]), []),  # a scout: no burned-in text of its own
    (dict(ImageType=["ORIGINAL", "PRIMARY", "AXIAL"], PhotometricInterpretation="PALETTE COLOR"), [COLOUR]),
    (dict(SamplesPerPixel=3, PhotometricInterpretation="YBR_FULL_422"), [COLOUR]),
    (dict(sop_class="1.2.840.10008.5.1.4.1.1.77.1.4"), [SCREEN_CAPTURE_CLASS]),  # VL photographic
    (dict(sop_class="1.2.840.10008.5.1.4.1.1.7.2", ImageType=["DERIVED", "SECONDARY"]),
     [SCREEN_CAPTURE_CLASS, SECONDARY_IMAGE_TYPE]),
])
def test_quarantine_rules(values, reasons):
    assert quarantine_reasons(_header(**values)) == reasons


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")
def test_only_instances_with_pixels_are_checked_and_classes_are_named_in_fixed_words():
    report = _header(ImageType=["DERIVED", "SECONDARY", "DOSE_INFO"], BurnedInAnnotation="YES")
    del report.PixelData
    assert quarantine_reasons(report) == []
    assert quarantine_reasons(report, pixels=True) == [BURNED_IN, SCREEN_IMAGE_TYPE, SECONDARY_IMAGE_TYPE]
    sc = _header(sop_class=SecondaryCaptureImageStorage)
    del sc.PixelData
    assert quarantine_reasons(sc) == [SCREEN_CAPTURE_CLASS]  # a capture class goes even without pixels
    private = _header(sop_class="1.3.46.670589.2.5.1.1", ImageType=["DERIVED", "SECONDARY", "Doe^Jan"])
    assert instance_class(private) == ("private SOP class", "SECONDARY")  # never the file's own words
    assert instance_class(_header(ImageType=["X-Doe"])) == ("CT Image Storage", "other")
    assert instance_class(_header()) == ("CT Image Storage", "none")
    sc_meta_only = _header(sop_class="")
    del sc_meta_only.SOPClassUID
    sc_meta_only.file_meta = FileMetaDataset()
    sc_meta_only.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    assert quarantine_reasons(sc_meta_only) == [SCREEN_CAPTURE_CLASS]
