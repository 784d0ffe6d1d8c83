"""care-anonymize on the header quirks of real exports, each built from the real GE series in ../shared/data or
from the quirky real files pydicom ships (pydicom/data/test_files): no case fails opaquely, and pydicom's warnings
become per-case notes that quote no value."""
from __future__ import annotations

import copy
import os
import struct
import warnings
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian, UID

from care_dataset.cli import anonymize_main
from care_dataset.deid.anonymize import anonymize_tree, shift_date
from care_dataset.deid.verify import collect_identifying_values, scan_for_leaks

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REAL_SERIES = DATA / "dcmqi_ct3slice" / "ct-3slice"
TEST_FILES = Path(get_testdata_file("CT_small.dcm")).parent  # shipped inside the pydicom package
CHARSET_FILES = TEST_FILES.parent / "charset_files"
KEY = b"quirks-test-key-0123456789abcdef"
ACTIONS = ("rerun", "repair", "remove it", "copy it again", "convert", "put each", "give the user", "check the disk")

# building the quirky inputs (and care-verify reading them) warns; care-anonymize's own warnings are checked by _run
pytestmark = pytest.mark.filterwarnings(
    "ignore:(Invalid value for VR|Unknown encoding|The value length|VR lookup failed)")

needs_real_ct = pytest.mark.skipif(not REAL_SERIES.is_dir(), reason="../shared/data/dcmqi_ct3slice not present")


# --- building quirky files from the real ones ------------------------------------------------------------------

def _real_paths() -> list[Path]:
    return sorted(REAL_SERIES.glob("*.dcm"))


def _real(i: int) -> Dataset:
    """Slice i (1-3) of the real GE series (implicit VR little endian, with file meta)."""
    return pydicom.dcmread(_real_paths()[i - 1])


def _save(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _meta_end(data: bytes) -> int:
    """Where the data set starts in a PS3.10 file: after preamble, DICM and the meta group (its group length)."""
    assert data[128:132] == b"DICM" and data[132:136] == b"\x02\x00\x00\x00"
    return 144 + struct.unpack("<I", data[140:144])[0]


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\x00"
    if vr in (b"OB", b"UN"):
        return struct.pack("<HH2sHI", 2, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 2, element, vr, len(value)) + value


def _file_with_meta(elements: list[bytes], dataset: bytes) -> bytes:
    body = b"".join(elements)
    return b"\x00" * 128 + b"DICM" + _meta_element(0x0000, b"UL", struct.pack("<I", len(body))) + body + dataset


def _real_dataset_bytes(i: int) -> bytes:
    data = _real_paths()[i - 1].read_bytes()
    return data[_meta_end(data):]


def _explicit_copy_bytes(ds: Dataset) -> bytes:
    """`ds` as an Explicit VR Little Endian file."""
    ds = copy.deepcopy(ds)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _element_offset(data: bytes, tag: int, explicit: bool) -> int:
    """Offset of the element header of top-level `tag` in `data` (a whole file)."""
    raw = pydicom.dcmread(BytesIO(data)).get_item(tag)
    return raw.value_tell - (12 if explicit and raw.VR in ("OB", "OW", "UN", "SQ", "UT", "OF") else 8)


def _splice(data: bytes, before_tag: int, element: bytes, explicit: bool) -> bytes:
    at = _element_offset(data, before_tag, explicit)
    return data[:at] + element + data[at:]


def _run(raw: Path, out: Path, **kwargs) -> dict[str, dict]:
    with warnings.catch_warnings(record=True) as escaped:
        warnings.simplefilter("always")
        results = anonymize_tree(raw, out, KEY, **kwargs)
    assert [str(w.message) for w in escaped] == []  # every library warning was caught as a note
    for r in results:
        assert "unexpected" not in r["reason"]
        if r["status"] == "failed":
            assert any(action in r["reason"] for action in ACTIONS), r["reason"]
    return {r["raw_folder"]: r for r in results}


def _copies(out: Path, result: dict) -> list[Dataset]:
    return [pydicom.dcmread(p) for p in sorted((out / result["case_id"]).rglob("*.dcm"))]


def _assert_same_pixels_as_the_real_series(copies: list[Dataset]) -> None:
    real = {int(ds.InstanceNumber): ds.PixelData for ds in map(_real, (1, 2, 3))}
    assert {int(ds.InstanceNumber): ds.PixelData for ds in copies} == real


def _assert_valid_copy(ds: Dataset) -> None:
    assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID and ds.SOPInstanceUID.startswith("2.25.")
    assert UID(ds.file_meta.TransferSyntaxUID).is_transfer_syntax


# --- the file meta ---------------------------------------------------------------------------------------------

@needs_real_ct
def test_sop_uids_in_the_file_meta_only_are_used(tmp_path):
    """The Siemens case of the issue: (0008,0016) and (0008,0018) absent, (0002,0002) and (0002,0003) present."""
    raw, out = tmp_path / "raw", tmp_path / "anon"
    meta_uids = []
    for i in (1, 2, 3):
        ds = _real(i)
        meta_uids.append(ds.file_meta.MediaStorageSOPInstanceUID)
        del ds.SOPClassUID, ds.SOPInstanceUID
        _save(ds, raw / "siemens" / f"IM{i}")
    class_only = _real(1)
    del class_only.SOPClassUID
    _save(class_only, raw / "class in meta" / "IM1")
    results = _run(raw, out)
    result = results["siemens"]
    assert result["status"] == "anonymized" and result["files"] == 3
    assert result["notes"] == ["the SOP Class UID was in the file meta only: copied into the data set (3 times)",
                               "the SOP Instance UID was in the file meta only: copied into the data set (3 times)"]
    copies = _copies(out, result)
    for ds in copies:
        _assert_valid_copy(ds)
        assert ds.SOPClassUID == CTImageStorage
    assert len({ds.SOPInstanceUID for ds in copies}) == 3
    _assert_same_pixels_as_the_real_series(copies)
    assert results["class in meta"]["status"] == "anonymized"
    assert scan_for_leaks(out, collect_identifying_values(raw)) == []
    assert not any(uid in str(results) for uid in meta_uids)


@needs_real_ct
def test_an_image_without_any_sop_class_uid_fails_with_a_reason(tmp_path):
    raw = tmp_path / "raw"
    for i in (1, 2):
        _save(_real(i), raw / "case" / f"IM{i}")
    meta = [_meta_element(0x0001, b"OB", b"\x00\x01"), _meta_element(0x0010, b"UI", ImplicitVRLittleEndian.encode())]
    ds = _real(3)
    del ds.SOPClassUID
    stripped = _save(ds, tmp_path / "tmp.dcm").read_bytes()
    _write(raw / "case" / "sub" / "IM3", _file_with_meta(meta, stripped[_meta_end(stripped):]))  # no class anywhere
    (result,) = _run(raw, tmp_path / "anon").values()
    assert result["status"] == "failed" and result["raw_file"] == "sub/IM3"
    assert result["reason"].startswith("an image has no SOP Class UID (0008,0016), in its data set or its file meta")
    assert list((tmp_path / "anon").iterdir()) == []


@needs_real_ct
def test_files_without_file_meta_or_preamble_get_a_file_meta_built_from_the_data_set(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "anon"
    for i in (1, 2, 3):  # the real slices as bare implicit VR data sets, as old exports write them
        _write(raw / "bare implicit" / f"{i:08d}", _real_dataset_bytes(i))
    for name in ("ExplVR_LitEndNoMeta.dcm", "ExplVR_BigEndNoMeta.dcm"):  # pydicom's: explicit VR LE and BE
        _write(raw / name / "file", (TEST_FILES / name).read_bytes())
    results = _run(raw, out)
    assert {name: r["status"] for name, r in results.items()} == dict.fromkeys(results, "anonymized")
    syntaxes = {"bare implicit": ImplicitVRLittleEndian, "ExplVR_LitEndNoMeta.dcm": ExplicitVRLittleEndian,
                "ExplVR_BigEndNoMeta.dcm": ExplicitVRBigEndian}
    for name, syntax in syntaxes.items():
        assert results[name]["notes"][0].startswith("a DICOM file had no file meta information: it was built from "
                                                     f"the data set ({syntax.name})")
        for ds in _copies(out, results[name]):  # read back without force: a complete PS3.10 file
            _assert_valid_copy(ds)
            assert ds.file_meta.TransferSyntaxUID == syntax
    _assert_same_pixels_as_the_real_series(_copies(out, results["bare implicit"]))
    assert scan_for_leaks(out, collect_identifying_values(raw)) == []


@needs_real_ct
def test_a_file_meta_without_transfer_syntax_and_with_empty_uids(tmp_path):
    """As pydicom's meta_missing_tsyntax.dcm: (0002,0002) and (0002,0003) empty, no (0002,0010)."""
    raw, out = tmp_path / "raw", tmp_path / "anon"
    meta = [_meta_element(0x0001, b"OB", b"\x00\x01"), _meta_element(0x0002, b"UI", b""),
            _meta_element(0x0003, b"UI", b""), _meta_element(0x0012, b"UI", b"1234567890.1998.310")]
    for i in (1, 2, 3):
        _write(raw / "no syntax" / f"IM{i}", _file_with_meta(meta, _real_dataset_bytes(i)))
    (result,) = _run(raw, out).values()
    assert result["status"] == "anonymized" and result["files"] == 3
    assert result["notes"] == ["a DICOM file meta had no transfer syntax: the data set's own encoding was used "
                               "(Implicit VR Little Endian) (3 times)"]
    copies = _copies(out, result)
    for ds in copies:
        _assert_valid_copy(ds)
        assert ds.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    _assert_same_pixels_as_the_real_series(copies)


@needs_real_ct
def test_unknown_transfer_syntax_over_uncompressed_pixels_is_written_in_the_encoding_read(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "anon"
    for i in (1, 2, 3):
        ds = _real(i)
        ds.file_meta.TransferSyntaxUID = "1.2.3.4.5.6.7"  # what a damaged or private export declares
        _save(ds, raw / "private syntax" / f"IM{i}")
    rle = (TEST_FILES / "MR_small_RLE.dcm").read_bytes()
    rle_syntax = b"1.2.840.10008.1.2.5"
    assert rle.count(rle_syntax) == 1
    _write(raw / "compressed" / "IM1", rle.replace(rle_syntax, b"1.2.840.10008.1.2.9"))  # unknown, same length
    results = _run(raw, out)
    result = results["private syntax"]
    assert result["status"] == "anonymized"
    assert "declared a transfer syntax DICOM does not define over uncompressed pixels: written as Implicit VR " \
           "Little Endian" in result["notes"][-1]
    copies = _copies(out, result)
    assert {ds.file_meta.TransferSyntaxUID for ds in copies} == {ImplicitVRLittleEndian}
    _assert_same_pixels_as_the_real_series(copies)
    failed = results["compressed"]
    assert failed["status"] == "failed" and failed["raw_file"] == "IM1"
    assert "its pixel data is compressed" in failed["reason"] and "dcmconv" in failed["reason"]
    assert "1.2.3.4.5.6.7" not in str(results) and "1.2.840.10008.1.2.9" not in str(results)


# --- instances ---------------------------------------------------------------------------------------------------

@needs_real_ct
def test_duplicated_sop_instance_uids(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "anon"
    case = raw / "re-exported"
    for i in (1, 2, 3):
        _save(_real(i), case / "first export" / f"IM{i}")
    _save(_real(1), case / "second export" / "IM1")  # the same image again
    other = _real(2)
    other.SOPInstanceUID = other.file_meta.MediaStorageSOPInstanceUID = _real(3).SOPInstanceUID
    _save(other, case / "second export" / "IM2")  # another image under slice 3's UID (a scanner bug)
    (result,) = _run(raw, out).values()
    assert result["status"] == "anonymized" and result["files"] == 4
    assert sorted(result["notes"]) == [
        "a DICOM file repeated another image of the case (same SOP Instance UID, same pixels): copied once",
        "two different images of the case had the same SOP Instance UID: each copy got its own new UID"]
    copies = _copies(out, result)
    assert len({ds.SOPInstanceUID for ds in copies}) == 4
    for ds in copies:
        _assert_valid_copy(ds)
    assert sorted(int(ds.InstanceNumber) for ds in copies) == [1, 2, 2, 3]
    again = anonymize_tree(raw, tmp_path / "again", KEY)[0]  # the new UIDs come from the key: same every run
    assert sorted(ds.SOPInstanceUID for ds in _copies(tmp_path / "again", again)) == sorted(
        ds.SOPInstanceUID for ds in copies)


@needs_real_ct
def test_private_sequences_of_undefined_length(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "anon"
    nested = (TEST_FILES / "nested_priv_SQ.dcm").read_bytes()  # (0001,0001) SQ in SQ, undefined lengths
    nested_sq = nested[_meta_end(nested):nested.index(b"\xe0\x7f\x10\x00")]
    priv = (TEST_FILES / "priv_SQ.dcm").read_bytes()  # (3F03,1001) private SQ item of undefined length
    priv_sq = priv[_meta_end(priv):]
    for i in (1, 2, 3):
        data = _real_paths()[i - 1].read_bytes()
        data = _splice(data, 0x7FE00010, priv_sq, explicit=False)
        start = _meta_end(data)
        _write(raw / "pydicom private SQs" / f"IM{i}", data[:start] + nested_sq + data[start:])
    un = (TEST_FILES / "UN_sequence.dcm").read_bytes()  # a private sequence with VR UN, undefined length
    un_element = un[un.index(b"SD\x0c\x10UN"):]
    for i in (1, 2, 3):
        data = _explicit_copy_bytes(_real(i))
        _write(raw / "UN sequence" / f"IM{i}", _splice(data, 0x7FE00010, un_element, explicit=True))
    for i in (1, 2, 3):  # built with pydicom: a private SQ of undefined length holding a private SQ and a name
        ds = _real(i)
        block = ds.private_block(0x0029, "CARE QUIRK SQ", create=True)
        item = Dataset()
        inner = Dataset()
        inner.PatientName = "Doe^Janctnested"
        item_block = item.private_block(0x0029, "CARE QUIRK SQ", create=True)
        item_block.add_new(0x02, "LO", "private note Janct")
        item_block.add_new(0x03, "SQ", Sequence([inner]))
        block.add_new(0x01, "SQ", Sequence([item]))
        for elem in (ds[block.get_tag(0x01)], item[item_block.get_tag(0x03)]):
            elem.is_undefined_length = True
        _save(ds, raw / "built private SQ" / f"IM{i}")
    assert b"\xfe\xff\xdd\xe0" in (raw / "built private SQ" / "IM1").read_bytes()  # a sequence delimiter
    results = _run(raw, out)
    for name, result in results.items():
        assert result["status"] == "anonymized" and result["files"] == 3, (name, result)
        copies = _copies(out, result)
        assert not [e.tag for ds in copies for e in ds.iterall() if e.tag.is_private or e.tag.group < 8]
        _assert_same_pixels_as_the_real_series(copies)
    assert scan_for_leaks(out, collect_identifying_values(raw)) == []


@needs_real_ct
def test_character_sets(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "anon"
    names = {"latin": ("ISO_IR 100", "Müller^Jürgen", "Klinikum Görlitz Süd"),
             "utf-8": ("ISO_IR 192", "Wang^XiaoDong=王^小东=", "北京协和医院 放射科"),
             "chinese": ("GB18030", "Wang^XiaoDong=王^小东=", "北京协和医院 放射科")}
    for folder, (charset, name, institution) in names.items():
        for i in (1, 2, 3):
            ds = _real(i)
            ds.SpecificCharacterSet = charset
            ds.PatientName, ds.InstitutionName = name, institution
            _save(ds, raw / folder / f"IM{i}")
    for i in (1, 2, 3):  # a value DICOM does not define, written over latin-1 text
        data = (raw / "latin" / f"IM{i}").read_bytes()
        _write(raw / "unknown" / f"IM{i}", data.replace(b"ISO_IR 100", b"ISO_IR 999"))
    names["unknown"] = ("ISO_IR 999", "", "")
    results = _run(raw, out)
    for folder, result in results.items():
        assert result["status"] == "anonymized", (folder, result)
        for ds in _copies(out, result):
            assert str(ds.PatientName) == result["case_id"].split("-")[0]
            assert ds.SpecificCharacterSet == names[folder][0]
    assert any("Specific Character Set" in note for note in results["unknown"]["notes"])
    assert "999" not in str(results["unknown"]["notes"])
    assert scan_for_leaks(out, collect_identifying_values(raw)) == []
    chars = tmp_path / "chars"  # pydicom's real character set files (secondary captures: copied only on opt-in)
    for name in ("chrGerm.dcm", "chrX1.dcm", "chrX2.dcm", "chrH31.dcm", "chrRuss.dcm"):
        _write(chars / name / "file", (CHARSET_FILES / name).read_bytes())
    by_default = _run(chars, tmp_path / "chars default")
    assert {r["status"] for r in by_default.values()} == {"skipped"}
    allowed = _run(chars, tmp_path / "chars out", allow_burned_in=True)
    assert {r["status"] for r in allowed.values()} == {"anonymized"}
    assert scan_for_leaks(tmp_path / "chars out", collect_identifying_values(chars)) == []


@needs_real_ct
def test_empty_and_malformed_dates(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "anon"
    values = {"StudyDate": "", "SeriesDate": "2003-04-17", "AcquisitionDate": "20030230", "ContentDate": "garbage",
              "InstanceCreationDate": "2003.04.17", "AcquisitionDateTime": "2003", "StudyTime": "",
              "PatientBirthDate": "1943"}
    for i in (1, 2, 3):
        ds = _real(i)
        for keyword, value in values.items():
            setattr(ds, keyword, value)
        if i == 3:
            ds.SeriesDate = "20030417-20030420"  # a range, where only queries may hold one
        _save(ds, raw / "odd dates" / f"IM{i}")
    (result,) = _run(raw, out).values()
    assert result["status"] == "anonymized"
    copies = _copies(out, result)  # shifted dates parse; empty, partial and impossible ones are empty
    for ds in copies:
        assert ds.StudyDate == "" and ds.AcquisitionDate == "" and ds.ContentDate == "" and ds.StudyTime == ""
        assert ds.PatientBirthDate == ""
        assert len(ds.AcquisitionDateTime) == 4 and ds.AcquisitionDateTime != "2003"  # a year is a valid DT
        assert ds.InstanceCreationDate == ds.SeriesDate.split("-")[0] != ""
        assert len(ds.InstanceCreationDate) == 8 and ds.InstanceCreationDate != "20030417"
    ranged = next(ds for ds in copies if "-" in ds.SeriesDate)
    assert len(ranged.SeriesDate) == 17
    assert scan_for_leaks(out, collect_identifying_values(raw)) == []


def test_shift_date_reads_the_spellings_of_real_files():
    assert shift_date("20030417", 1) == shift_date("2003.04.17", 1) == shift_date("2003-04-17", 1) == "20030418"
    assert shift_date("20030417-20030420", 1) == "20030418-20030421"
    assert shift_date("-20030420", 1) == "-20030421" and shift_date("20030417-", 1) == "20030418-"
    for bad in ("", "  ", "2003", "2003-04", "20030230", "garbage", "2003-04-17-18", "--"):
        assert shift_date(bad, 1) == "", bad


# --- damaged files ----------------------------------------------------------------------------------------------

@needs_real_ct
@pytest.mark.parametrize("damage, expected", [
    ("Rows", "an image has no Rows (0028,0010)"),
    ("BitsAllocated", "an image has no BitsAllocated (0028,0100)"),
    ("NumberOfFrames", "an image has an invalid NumberOfFrames (0028,0008)"),
])
def test_a_missing_or_invalid_pixel_description_fails_with_a_reason(tmp_path, damage, expected):
    raw, out = tmp_path / "raw", tmp_path / "anon"
    for i in (1, 2, 3):
        ds = _real(i)
        if i == 2:
            if damage == "NumberOfFrames":
                ds.NumberOfFrames = 1
            else:
                delattr(ds, damage)
        path = _save(ds, raw / "case" / "series" / f"IM{i}")
        if i == 2 and damage == "NumberOfFrames":  # "1A", as in pydicom's badVR.dcm
            element = b"\x28\x00\x08\x00\x02\x00\x00\x00"
            assert path.read_bytes().count(element + b"1 ") == 1
            path.write_bytes(path.read_bytes().replace(element + b"1 ", element + b"1A"))
    (result,) = _run(raw, out).values()
    assert result["status"] == "failed" and result["reason"].startswith(expected)
    assert result["raw_file"] == "series/IM2" and "remove it from the case folder" in result["reason"]
    assert list(out.iterdir()) == []


@needs_real_ct
def test_unknown_value_representations_in_damaged_elements(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "anon"
    files = {}
    for i in (1, 2, 3):
        ds = _real(i)
        ds.StudyDescription = "Pelvis for Janct"
        files[i] = _explicit_copy_bytes(ds)

    def damaged(i: int, tag: int, vr: bytes) -> bytes:
        data = bytearray(files[i])
        at = _element_offset(bytes(data), tag, explicit=True)
        assert data[at + 4:at + 6].isalpha()
        data[at + 4:at + 6] = vr
        return bytes(data)

    for i in (1, 2, 3):  # a private element of the GE header and a public one the profile removes
        data = damaged(i, 0x00451006, b"XX") if i == 1 else files[i]
        _write(raw / "private and removed" / f"IM{i}", damaged(i, 0x00081030, b"QQ") if i == 2 else data)
    for i in (1, 2, 3):  # a public element the copy keeps
        _write(raw / "kept element" / f"IM{i}", damaged(i, 0x00180050, b"XX") if i == 3 else files[i])
    for i in (1, 2, 3):  # VR bytes that are no letters: pydicom reads on as implicit VR and loses the pixels
        _write(raw / "lost pixels" / f"IM{i}", damaged(i, 0x00451006, b"?Z") if i == 1 else files[i])
    results = _run(raw, out)
    kept = results["private and removed"]
    assert kept["status"] == "anonymized" and kept["files"] == 3
    assert "element (0008,1030) could not be decoded (damaged, or of an unknown value representation) and was " \
           "removed" in kept["notes"]
    _assert_same_pixels_as_the_real_series(_copies(out, kept))
    failed = results["kept element"]
    assert failed["status"] == "failed" and failed["raw_file"] == "IM3"
    assert failed["reason"].startswith("element (0018,0050) of a DICOM file cannot be decoded")
    lost = results["lost pixels"]
    assert lost["status"] == "failed" and lost["raw_file"] == "IM1"
    assert lost["reason"].startswith("an image (CT Image Storage) holds no pixel data")
    copies = _copies(out, kept)
    assert all("StudyDescription" not in ds and ds.SliceThickness == "1.250000" for ds in copies)
    assert not [e for ds in copies for e in ds.iterall() if e.tag.is_private]
    found = collect_identifying_values(raw)  # care-verify reads the damaged elements' raw text
    assert found.get("Pelvis for Janct") is not None
    assert scan_for_leaks(out, found) == []


def _swallow(data: bytes, tag: int, through: int) -> bytes:
    """`data` (an implicit VR file) with the length of element `tag` grown over the elements up to and including
    `through`, as a damaged length field does: its value then holds their tags, lengths and values."""
    start = _element_offset(data, tag, explicit=False)
    end_raw = pydicom.dcmread(BytesIO(data)).get_item(through)
    new_length = end_raw.value_tell + end_raw.length - (start + 8)
    return data[:start + 4] + struct.pack("<I", new_length) + data[start + 8:]


def _retag(data: bytes, tag: int, new_tag: int, explicit: bool) -> bytes:
    at = _element_offset(data, tag, explicit)
    return data[:at] + struct.pack("<HH", new_tag >> 16, new_tag & 0xFFFF) + data[at + 4:]


@needs_real_ct
def test_damaged_and_undefined_elements_carry_no_value_into_the_copy(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "anon"
    site_uid = "1.2.392.200103.20080913.113635.9.1"  # a site's own UID in an element the table keeps
    for i in (1, 2, 3):
        ds = _real(i)
        ds.add_new(0x0008001A, "UI", [CTImageStorage, site_uid])  # Related General SOP Class UID
        if i == 1:  # a damaged tag number: the Study Instance UID under a tag DICOM does not define
            ds.add_new(0x00200051, "UI", ds.StudyInstanceUID)
        _save(ds, raw / "damaged" / f"IM{i}")
    first, third = raw / "damaged" / "IM1", raw / "damaged" / "IM3"
    # StudyTime's length swallows the times and the Accession Number after it; in an explicit VR copy of slice 3
    # ImagePositionPatient's tag number is damaged
    first.write_bytes(_swallow(first.read_bytes(), 0x00080030, through=0x00080050))
    third.write_bytes(_retag(_explicit_copy_bytes(pydicom.dcmread(third)), 0x00200032, 0x0020F032, explicit=True))
    assert "03086212" in str(pydicom.dcmread(first).StudyTime)
    (result,) = _run(raw, out).values()
    assert result["status"] == "anonymized" and result["files"] == 3
    assert "element (0008,0030) held characters its value representation does not allow (damaged) and was " \
           "removed" in result["notes"]
    copies = {int(ds.InstanceNumber): ds for ds in _copies(out, result)}
    assert "StudyTime" not in copies[1] and copies[2].StudyTime == "104607"
    assert all(0x00200051 not in ds and 0x0020F032 not in ds for ds in copies.values())
    for ds in copies.values():
        standard, replaced = ds.RelatedGeneralSOPClassUID
        assert standard == CTImageStorage and replaced.startswith("2.25.")
    _assert_same_pixels_as_the_real_series(list(copies.values()))
    found = collect_identifying_values(raw)
    assert found.get(site_uid) and found.get("03086212")  # searched, and absent from every copy:
    assert scan_for_leaks(out, found) == []
    assert not any(value.startswith("-235.1") for value in found)  # the damaged tag's geometry is not searched


@needs_real_ct
def test_a_uid_counts_as_found_only_as_a_whole(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "anon"
    for i in (1, 2, 3):
        ds = _real(i)
        item = Dataset()
        item.ReferencedSOPClassUID = CTImageStorage
        item.ReferencedSOPInstanceUID = "1.2.826.0.1.3" if i == 1 else "1.2.826.0.1.36"  # cut short by damage
        ds.ReferencedImageSequence = Sequence([item])
        _save(ds, raw / "referenced" / f"IM{i}")
    (result,) = _run(raw, out).values()
    copy_ = _copies(out, result)[0]
    assert copy_.file_meta.ImplementationClassUID.startswith("1.2.826.0.1.36")  # pydicom's, in every copy
    assert scan_for_leaks(out, collect_identifying_values(raw)) == []
    (out / "leak.txt").write_text("ref 1.2.826.0.1.3, end")  # a whole copy of the UID is still found
    assert [leak.path for leak in scan_for_leaks(out, collect_identifying_values(raw))] == ["leak.txt"]


@needs_real_ct
def test_stray_files_and_dangling_links_are_set_aside(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "anon"
    case = raw / "case"
    for i in (1, 2, 3):
        _save(_real(i), case / "DICOM" / f"IM{i}")
    _write(case / "DICOM" / "Thumbs.db", b"\x00" * 128 + b"DICM" + os.urandom(300))
    _write(case / "._IM1", b"\x00" * 128 + b"DICM" + b"\x00\x05\x16\x07")
    (case / "DICOM" / "IM4").symlink_to(tmp_path / "gone" / "IM4")
    (result,) = _run(raw, out).values()
    assert result["status"] == "anonymized" and result["files"] == 3
    assert result["notes"] == ["a dangling symbolic link in the case folder was ignored"]


# --- warnings, --debug -------------------------------------------------------------------------------------------

@needs_real_ct
def test_pydicom_warnings_become_notes_that_quote_no_value(tmp_path, capsys):
    raw, out = tmp_path / "raw", tmp_path / "anon"
    odd_uid = "1.2.840.0113619.2.55.3.2831164356.0999"  # components with a leading zero: invalid UI
    for i in (1, 2, 3):
        ds = _real(i)
        ds.FrameOfReferenceUID = odd_uid
        ds.StationName = "CTSTATION-JANCT-ROOM-4-WEST"  # longer than SH allows
        _save(ds, raw / "case" / f"IM{i}")
    key_file = tmp_path / "key"
    key_file.write_bytes(KEY)
    assert anonymize_main([str(raw), str(out), "--key-file", str(key_file)]) == 0
    captured = capsys.readouterr()
    assert "note case: a value not valid for its VR UI was read as it is" in captured.err
    assert "note case: a value longer than its VR SH allows was read as it is" in captured.err
    assert "Warning" not in captured.err and odd_uid not in captured.err and "JANCT" not in captured.err
    assert anonymize_main([str(raw), str(tmp_path / "debug"), "--key-file", str(key_file), "--debug"]) == 0
    debug_err = capsys.readouterr().err
    assert f"pydicom warning (IM1): Invalid value for VR UI: '{odd_uid}'" in debug_err
    for path in (*out.rglob("*"), *(tmp_path / "debug").rglob("*")):  # debug text goes to the terminal only
        assert path.is_dir() or b"Invalid value" not in path.read_bytes()


@needs_real_ct
def test_debug_prints_the_traceback_on_stderr_only(tmp_path, capsys):
    raw, out = tmp_path / "raw", tmp_path / "anon"
    for i in (1, 2, 3):
        ds = _real(i)
        if i == 3:
            del ds.Rows
        _save(ds, raw / "broken" / f"IM{i}")
    key_file = tmp_path / "key"
    key_file.write_bytes(KEY)
    assert anonymize_main([str(raw), str(out), "--key-file", str(key_file)]) == 1
    plain = capsys.readouterr()
    assert "FAILED broken: an image has no Rows (0028,0010)" in plain.err and "(file IM3)" in plain.err
    assert "Traceback" not in plain.err + plain.out
    assert anonymize_main([str(raw), str(out), "--key-file", str(key_file), "--debug"]) == 1
    debug = capsys.readouterr()
    assert "care-anonymize: traceback for case folder broken:" in debug.err
    assert "Traceback (most recent call last)" in debug.err and "DeidError" in debug.err
    assert "Traceback" not in debug.out and list(out.iterdir()) == []


# --- pydicom's quirky files --------------------------------------------------------------------------------------

@pytest.mark.parametrize("allow_burned_in", [False, True])
def test_no_quirky_file_pydicom_ships_fails_a_case_unexplained(tmp_path, allow_burned_in):
    """Every DICOM file of pydicom's test and character set files as a case of its own: anonymized, skipped, or
    failed with a reason that says what to do; no warning escapes; every copy is a valid PS3.10 file."""
    raw, out = tmp_path / "raw", tmp_path / "anon"
    for path in (*sorted(TEST_FILES.glob("*.dcm")), *sorted(CHARSET_FILES.glob("*.dcm"))):
        _write(raw / path.name / "file", path.read_bytes())
    results = _run(raw, out, allow_burned_in=allow_burned_in)
    statuses = {r["status"] for r in results.values()}
    assert statuses == {"anonymized", "skipped", "failed"}
    anonymized = [r for r in results.values() if r["status"] == "anonymized"]
    assert len(anonymized) >= (50 if allow_burned_in else 25)
    for result in anonymized:
        for ds in _copies(out, result):
            _assert_valid_copy(ds)
            assert not [e.tag for e in ds.iterall() if e.tag.is_private]
    for name in ("MR_truncated.dcm", "rtplan_truncated.dcm"):
        assert results[name]["status"] == "failed" and "truncated" in results[name]["reason"]
    assert results["ExplVR_BigEndNoMeta.dcm"]["status"] == "anonymized"
