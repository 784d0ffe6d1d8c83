"""care-verify: collecting identifying values from a raw tree and finding them in an output tree."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from care_dataset.cli import build_verify_parser, run_verify
from care_dataset.deid import verify
from care_dataset.deid.anonymize import anonymize_tree
from care_dataset.deid.verify import collect_identifying_values, is_meaningful, scan_for_leaks

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REAL_RAW = DATA / "dcmqi_ct3slice"
KEY = b"verify-test-key-0123456789"


def _dicom(path: Path) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = pydicom.uid.CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = pydicom.uid.CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.PatientName = "Quillfeather^Marguerite"
    ds.PatientID = "MRN0047711"
    ds.StudyDate = "20190722"
    ds.AcquisitionDateTime = "20190722101500"
    ds.StudyTime = "101500"
    ds.SeriesNumber = 4
    ds.InstitutionName = "CT"
    request = Dataset()
    request.RequestingPhysician = "Vantablack^Osric"
    ds.RequestAttributesSequence = Sequence([request])
    ds.private_block(0x0019, "VENDOR_X", create=True).add_new(0x01, "LO", "scanner room Nordwing")
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return ds


@pytest.fixture()
def raw_tree(tmp_path):
    raw = tmp_path / "raw"
    case = raw / "Quillfeather_M_1961"
    _dicom(case / "exam" / "IM000123")
    img = nib.Nifti1Image(np.zeros((4, 4, 2), np.int16), np.eye(4))
    img.header["descrip"] = b"Scanned at Brambleford Clinic"
    img.header["aux_file"] = b"tumourboard_hx.txt"
    nib.save(img, str(case / "rectum_seg.nii.gz"))
    (case / "labels.txt").write_text(
        "# ITK-SNAP Label Description File\n"
        '    0     0    0    0        0  0  0    "Clear Label"\n'
        '    1   255    0    0        1  1  1    "rectum"\n'
        '    2     0  255    0        1  1  1    "Tumor per Dr Hollowmere"\n'
    )
    return raw


def test_is_meaningful_rule():
    for kept in ("JANCT000", "20030417", "2003-04-17", "03086212", "Doe^John", "1.2.392.200103.1", "ct-3slice"):
        assert is_meaningful(kept), kept
    for skipped in ("CT", "YES", "AXIAL", "ORIGINAL\\PRIMARY", "99000", "-1024", "1.25", "Clear Label",
                    "rectum", "label", "1.2.840.10008.5.1.4.1.1.2", "Series 12", "  "):
        assert not is_meaningful(skipped), skipped


def test_collects_headers_names_nifti_text_and_label_names(raw_tree):
    values = collect_identifying_values(raw_tree)
    expected = {
        "Quillfeather^Marguerite": "DICOM PatientName", "Marguerite": "DICOM PatientName",
        "Quillfeather": "DICOM PatientName", "MRN0047711": "DICOM PatientID",
        "20190722": "DICOM StudyDate", "2019-07-22": "DICOM StudyDate",
        "Vantablack": "DICOM RequestingPhysician", "scanner room Nordwing": "DICOM private tag",
        "Quillfeather_M_1961": "folder name", "IM000123": "file name",
        "Scanned at Brambleford Clinic": "NIfTI header text", "tumourboard_hx.txt": "NIfTI header text",
        "Tumor per Dr Hollowmere": "label name",
    }
    for value, category in expected.items():
        assert values.get(value) == category, value
    for generic in ("CT", "rectum", "Clear Label", "ORIGINAL", "101500", "exam", "labels"):
        assert generic not in values, generic
    assert "VENDOR_X" not in values  # a private creator names the vendor's dictionary, as Manufacturer may
    assert not any(v.startswith("1.2.840.10008.") for v in values)


def test_planted_leaks_are_found_and_clean_output_passes(raw_tree, tmp_path):
    out = tmp_path / "out"
    results = anonymize_tree(raw_tree, out, KEY)
    assert results[0]["status"] == "anonymized"
    values = collect_identifying_values(raw_tree)
    assert scan_for_leaks(out, values) == []

    (out / "meta").mkdir()
    (out / "meta" / "manifest.json").write_text(json.dumps({"cases": ["QUILLFEATHER^marguerite"]}))
    (out / "meta" / "quillfeather_m_1961.txt").write_text("nothing inside\n")
    (out / "meta" / "run.log").write_text("converted study of 2019-07-22 in 3 s\n")
    with h5py.File(out / "meta" / "data.h5", "w") as f:
        f.create_dataset("x", data=np.zeros(1000, np.int16))
        f["x"].attrs["note"] = "source: Scanned at Brambleford Clinic"
    leaks = scan_for_leaks(out, values)
    found = {(leak.path, leak.where, leak.category) for leak in leaks}
    assert ("meta/manifest.json", "content", "DICOM PatientName") in found
    assert ("meta/quillfeather_m_1961.txt", "name", "folder name") in found
    assert ("meta/run.log", "content", "DICOM StudyDate") in found
    assert any(path == "meta/data.h5" and where == "content" for path, where, _ in found)
    assert all("***" in leak.masked and len(leak.masked) == 5 for leak in leaks)


def test_binary_chunks_are_scanned_as_bytes(raw_tree, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    noise = np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes()
    (out / "c.0.0").write_bytes(noise)
    values = collect_identifying_values(raw_tree)
    assert scan_for_leaks(out, values) == []
    # a value straddling the scanner's internal block boundary is still found
    big = noise * 200
    cut = verify.CHUNK_BYTES - 5
    (out / "c.0.0").write_bytes(big[:cut] + "Marguerite".encode("latin-1") + big[cut:])
    assert [leak.category for leak in scan_for_leaks(out, values)] == ["DICOM PatientName"]


def test_run_verify_exit_codes_and_masked_output(raw_tree, tmp_path, capsys):
    out = tmp_path / "out"
    anonymize_tree(raw_tree, out, KEY)
    parser = build_verify_parser()
    assert run_verify(parser.parse_args([str(out), "--raw", str(raw_tree)])) == 0
    (out / "Quillfeather_M_1961-notes.json").write_text(json.dumps({"id": "MRN0047711"}))
    capsys.readouterr()
    assert run_verify(parser.parse_args([str(out), "--raw", str(raw_tree)])) == 1
    printed = capsys.readouterr()
    text = printed.out + printed.err
    assert "Qu***" in text and "MR***" in text
    assert "Quillfeather" not in text and "MRN0047711" not in text
    assert run_verify(parser.parse_args([str(tmp_path / "missing"), "--raw", str(raw_tree)])) == 2


@pytest.mark.skipif(not (REAL_RAW / "ct-3slice").is_dir(), reason="../shared/data/dcmqi_ct3slice not present")
def test_real_ct_raw_values_found_in_a_copied_header(tmp_path):
    values = collect_identifying_values(REAL_RAW)
    for value in ("JANCT000", "03086212", "20030417", "2003-04-17", "ct-3slice"):
        assert value in values, value
    assert "GEMS_IDEN_01" not in values  # GE's private creator: a vendor dictionary's name
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(REAL_RAW / "ct-3slice" / "02.dcm", out / "slice.bin")  # an un-anonymized header
    categories = {leak.category for leak in scan_for_leaks(out, values)}
    assert {"DICOM PatientName", "DICOM AccessionNumber", "DICOM StudyInstanceUID"} <= categories


def test_free_text_and_overlay_text_are_collected_whatever_the_table_says(raw_tree, tmp_path):
    path = next((raw_tree / "Quillfeather_M_1961" / "exam").iterdir())
    ds = pydicom.dcmread(path)
    item = Dataset()
    item.ValueType = "TEXT"
    item.TextValue = "Discussed with sister Philippa Ormsby"  # UT, not listed in Table E.1-1
    ds.ContentSequence = Sequence([item])
    ds.add_new(0x00400400, "LT", "Patient prefers Wednesday mornings")  # LT, not listed
    ds.add_new(0x60000022, "LO", "Marker placed by Ormsby")  # Overlay Description, not listed
    ds.save_as(path, enforce_file_format=True)
    values = collect_identifying_values(raw_tree)
    assert values["Discussed with sister Philippa Ormsby"] == "DICOM TextValue"
    assert values["Patient prefers Wednesday mornings"] == "DICOM CommentsOnTheScheduledProcedureStep"
    assert values["Marker placed by Ormsby"] == "DICOM OverlayDescription"

    out = tmp_path / "out"
    assert anonymize_tree(raw_tree, out, KEY)[0]["status"] == "anonymized"
    assert scan_for_leaks(out, values) == []
    shutil.copy(path, out / "header.bin")  # an un-anonymized copy
    categories = {leak.category for leak in scan_for_leaks(out, values)}
    assert {"DICOM TextValue", "DICOM CommentsOnTheScheduledProcedureStep", "DICOM OverlayDescription"} <= categories


def test_nrrd_and_metaimage_header_text_is_collected(tmp_path):
    raw = tmp_path / "raw"
    (raw / "c").mkdir(parents=True)
    label = sitk.GetImageFromArray(np.zeros((2, 4, 4), np.uint8))
    label.SetMetaData("Segment0_Name", "Tumour outlined by Dr Fennimore")  # a 3D Slicer segment name
    label.SetMetaData("Segment0_Color", "0.5 0.2 0.1")
    label.SetMetaData("Segment0_Extent", "0 3 0 3 0 1")
    sitk.WriteImage(label, str(raw / "c" / "lesion.seg.nrrd"))
    image = sitk.GetImageFromArray(np.zeros((2, 4, 4), np.int16))
    image.SetMetaData("ReferringClinic", "Larkspur Vale Clinic")
    image.SetMetaData("ScanDate", "2018-11-05")
    sitk.WriteImage(image, str(raw / "c" / "ct.mha"))
    values = collect_identifying_values(raw)
    assert values["Tumour outlined by Dr Fennimore"] == "image header text"
    assert values["Larkspur Vale Clinic"] == "image header text"
    assert values["2018-11-05"] == "image header text"
    for not_text in ("0.5 0.2 0.1", "0 3 0 3 0 1", "NrrdImageIO", "MetaImageIO", "MET_MOD_UNKNOWN"):
        assert not_text not in values, not_text

    out = tmp_path / "out"
    out.mkdir()
    (out / "classes.json").write_text(json.dumps({"1": "Tumour outlined by Dr Fennimore"}))
    assert [(leak.path, leak.category) for leak in scan_for_leaks(out, values)] == [
        ("classes.json", "image header text")]


def test_a_damaged_element_is_not_searched_but_what_it_swallowed_is_where_intact(tmp_path):
    raw = tmp_path / "raw"
    ds = _dicom(raw / "Quill_1961" / "IM1")
    # a damaged length: ReferringPhysicianName swallowed the bytes of the ImagePositionPatient after it
    ds.ReferringPhysicianName = "\x00\x002\x00DS\x1c\x00246.09375\\-258.09375\\-339.5"
    ds.save_as(raw / "Quill_1961" / "IM1", enforce_file_format=True)
    values = collect_identifying_values(raw)
    assert not [v for v in values if "258.09375" in v]
    assert values.get("Quillfeather^Marguerite") == "DICOM PatientName"
    out = tmp_path / "out"
    out.mkdir()
    (out / "cases.json").write_text('{"origin": [-246.09375, -258.09375, -339.5]}')  # geometry, not identity
    assert scan_for_leaks(out, values) == []


@pytest.mark.filterwarnings("ignore:The value length")  # the long item is the point
def test_a_long_element_of_an_unknown_vr_is_read_without_failing(tmp_path):
    raw = tmp_path / "raw"
    ds = _dicom(raw / "Quill_1961" / "IM1")
    other = Dataset()
    other.PatientID = "OTHER-" + "7" * 5000  # a long item: the element's value is read only when asked for
    ds.OtherPatientIDsSequence = Sequence([other])
    ds.save_as(raw / "Quill_1961" / "IM1", enforce_file_format=True)
    data = bytearray((raw / "Quill_1961" / "IM1").read_bytes())
    at = data.index(b"\x10\x00\x02\x10SQ")
    data[at + 4:at + 6] = b"S\x0e"  # a VR DICOM does not define, as a flipped byte leaves it
    (raw / "Quill_1961" / "IM1").write_bytes(bytes(data))
    values = collect_identifying_values(raw)
    assert values.get("MRN0047711") == "DICOM PatientID"


def test_a_kept_value_under_a_damaged_tag_number_is_not_a_leak(tmp_path):
    raw = tmp_path / "raw"
    for i, name in enumerate(("IM1", "IM2")):
        ds = _dicom(raw / "Quill_1961" / name)
        ds.Manufacturer = "TOSHIBA"
        if i == 0:  # Manufacturer's tag number damaged into one DICOM does not define, and a name beside it
            del ds.Manufacturer
            ds.add_new(0x00081670, "LO", "TOSHIBA")
            ds.add_new(0x00081672, "LO", "Nurse Pellinore")
        ds.save_as(raw / "Quill_1961" / name, enforce_file_format=True)
    values = collect_identifying_values(raw)
    assert "TOSHIBA" not in values and values.get("Nurse Pellinore") == "DICOM attribute (0008,1672)"
