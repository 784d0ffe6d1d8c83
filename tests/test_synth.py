"""care-synth: determinism, DICOM/label round trips through real readers, realism, messy and broken cases."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from scipy import ndimage

from care_dataset.cli import build_synth_parser, run_synth
from care_dataset.synth import raw_export as synth
from care_dataset.synth.phantom import phantom_volume

SIZE, SLICES, CASES, SEED = 128, 16, 6, 11
LABEL_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")

sitk.ProcessObject_SetGlobalWarningDisplay(False)


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> tuple[list[synth.CasePlan], list[Path]]:
    out = tmp_path_factory.mktemp("raw")
    folders = synth.write_raw_dataset(out, CASES, SEED, size=SIZE, slices=SLICES)
    return synth.plan_dataset(CASES, SEED, size=SIZE, slices=SLICES), folders


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def main_series_files(plan: synth.CasePlan, case_dir: Path) -> list[str]:
    """The main series' files in slice order, found by GDCM among every folder of the case."""
    main_uid = synth._uid(plan, "series", "main")
    for folder, _, _ in os.walk(case_dir):
        if main_uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder):
            return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, main_uid))
    raise AssertionError(f"main series not found in {case_dir}")


def read_main_series(plan: synth.CasePlan, case_dir: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(main_series_files(plan, case_dir))
    return reader.Execute()


def label_volume(case_dir: Path) -> Path:
    found = [p for p in case_dir.rglob("*") if p.name.lower().endswith(LABEL_SUFFIXES)]
    assert len(found) == 1, found
    assert re.search("seg|label", found[0].name, re.IGNORECASE)
    return found[0]


def dicom_headers(case_dir: Path) -> list[tuple[Path, pydicom.Dataset]]:
    headers = []
    for path in sorted(p for p in case_dir.rglob("*") if p.is_file()):
        try:
            headers.append((path, pydicom.dcmread(path, stop_before_pixels=True)))
        except pydicom.errors.InvalidDicomError:
            pass
    return headers


def test_plans_are_deterministic_distinct_and_cover_every_messy_feature():
    plans = synth.plan_dataset(CASES, SEED, size=SIZE, slices=SLICES)
    assert plans == synth.plan_dataset(CASES, SEED, size=SIZE, slices=SLICES)
    assert plans != synth.plan_dataset(CASES, SEED + 1, size=SIZE, slices=SLICES)
    assert len({p.folder for p in plans}) == CASES
    assert len({p.patient.dicom_name for p in plans}) == CASES
    assert len({p.patient.patient_id for p in plans}) == CASES
    expected = set(synth.MESSY_FEATURES)
    if not pydicom.pixels.get_encoder(pydicom.uid.JPEG2000Lossless).is_available:
        expected.discard("j2k")
    assert set().union(*(p.features for p in plans)) == expected
    assert 0 < sum(bool(p.features) for p in plans) < CASES
    clean = synth.plan_dataset(CASES, SEED, size=SIZE, slices=SLICES, messy=False)
    assert all(not p.features and p.position == "HFS" and not p.localizer for p in clean)
    assert {p.transfer_syntax for p in clean} == {pydicom.uid.ExplicitVRLittleEndian}


def test_same_seed_writes_identical_files(raw, tmp_path):
    plans, folders = raw
    again = synth.write_raw_dataset(tmp_path, CASES, SEED, size=SIZE, slices=SLICES)
    assert [p.name for p in again] == [p.name for p in folders]
    for first, second in zip(folders, again):
        assert files_under(first) == files_under(second)


def test_rerun_into_same_folder_rewrites_and_foreign_entries_are_refused(tmp_path):
    args = dict(size=64, slices=8, messy=False)
    first = synth.write_raw_dataset(tmp_path, 1, 3, **args)
    before = files_under(tmp_path)
    assert synth.write_raw_dataset(tmp_path, 1, 3, **args) == first
    assert files_under(tmp_path) == before
    (tmp_path / "notes.txt").write_text("unrelated")
    with pytest.raises(ValueError, match="notes.txt"):
        synth.write_raw_dataset(tmp_path, 1, 3, **args)


def test_main_series_decodes_to_the_generated_hu_on_the_planned_grid(raw):
    plans, folders = raw
    for plan, case_dir in zip(plans, folders):
        image = read_main_series(plan, case_dir)
        geometry = synth.case_geometry(plan)
        assert image.GetSize() == geometry["size"]
        np.testing.assert_allclose(image.GetSpacing(), geometry["spacing"], atol=1e-4)
        np.testing.assert_allclose(image.GetOrigin(), geometry["origin"], atol=1e-4)
        np.testing.assert_allclose(image.GetDirection(), geometry["direction"], atol=1e-6)
        hu, _ = synth.case_volume(plan)
        canonical = sitk.GetArrayFromImage(sitk.DICOMOrient(image, "LPS"))
        np.testing.assert_array_equal(canonical, hu, err_msg=f"case {plan.index} ({plan.transfer_syntax})")


def test_hu_values_look_like_pelvic_ct(raw):
    plans, _ = raw
    hu, label = synth.case_volume(plans[0])
    assert np.median(hu[:, :4, :4]) < -950  # air in the corners
    assert (hu > 600).mean() > 0.002  # cortical bone
    body = hu > -300
    assert 0.2 < body.mean() < 0.8
    soft = hu[(hu > -200) & (hu < 200)]
    assert np.percentile(soft, 90) > 20 and np.percentile(soft, 10) < -60  # muscle and fat both there
    wall = hu[label == 1]
    assert (wall < -500).any()  # lumen gas inside the labelled rectum
    noise = np.std(np.diff(hu[:, :4, :].astype(float), axis=2)) / np.sqrt(2)
    assert 3 < noise < 25


def test_label_volume_lies_on_the_image_grid_and_matches_the_phantom(raw):
    plans, folders = raw
    for plan, case_dir in zip(plans, folders):
        image = read_main_series(plan, case_dir)
        label = sitk.ReadImage(str(label_volume(case_dir)))
        if not plan.label_reoriented:
            assert label.GetSize() == image.GetSize()
            np.testing.assert_allclose(label.GetOrigin(), image.GetOrigin(), atol=1e-4)
            np.testing.assert_allclose(label.GetSpacing(), image.GetSpacing(), atol=1e-4)
            np.testing.assert_allclose(label.GetDirection(), image.GetDirection(), atol=1e-6)
        else:
            assert label.GetDirection() != image.GetDirection()
        oriented_label, oriented_image = sitk.DICOMOrient(label, "LPS"), sitk.DICOMOrient(image, "LPS")
        np.testing.assert_allclose(oriented_label.GetOrigin(), oriented_image.GetOrigin(), atol=1e-4)
        assert oriented_label.GetSize() == oriented_image.GetSize()
        _, expected = synth.case_volume(plan)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(oriented_label), expected)


def test_label_classes_and_rectum_size_are_realistic(raw):
    plans, _ = raw
    for plan in plans:
        _, label = synth.case_volume(plan)
        assert set(np.unique(label)) <= {0, 1, 2}
        assert ((label == 2).any()) == plan.tumour
        per_slice = (label > 0).sum(axis=(1, 2)) / label[0].size
        kept = np.flatnonzero(per_slice)
        assert kept.size >= 3
        assert kept[0] > 0 or kept[-1] < label.shape[0] - 1, "the rectum must not span the whole scan"
        assert np.all((per_slice[kept] > 0.002) & (per_slice[kept] < 0.016))
        assert 0.003 <= np.median(per_slice[kept]) <= 0.011
        if plan.tumour:
            tumour, components = ndimage.label(label == 2)
            wall = ndimage.binary_dilation(label == 1, structure=np.ones((1, 3, 3), bool))
            touching = np.unique(tumour[wall & (tumour > 0)])
            assert set(touching) == set(range(1, components + 1)), "each tumour lump sits on the rectal wall"
    assert plans[0].tumour


def test_itksnap_label_description_files(raw):
    plans, folders = raw
    row = re.compile(r'^\s*(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+([\d.]+)\s+([01])\s+([01])\s+"(.*)"$')
    seen = 0
    for plan, case_dir in zip(plans, folders):
        if plan.desc_file is None:
            continue
        seen += 1
        lines = (case_dir / plan.desc_file).read_text(encoding="utf-8").splitlines()
        body = [line for line in lines if not line.startswith("#")]
        rows = [row.match(line) for line in body]
        assert all(rows), body
        names = {int(m.group(1)): m.group(8) for m in rows}
        assert names[0] == "Clear Label"
        assert re.search("rectum", names[1], re.IGNORECASE) and re.search("tumo", names[2], re.IGNORECASE)
        assert (len(names) == 7) == plan.extra_default_labels
    assert seen


def test_fake_identifying_values_are_in_headers_sequences_private_tags_and_names(raw):
    plans, folders = raw
    for plan, case_dir in zip(plans, folders):
        headers = dicom_headers(case_dir)
        image_headers = [ds for _, ds in headers if "SOPClassUID" in ds and ds.SOPClassUID == synth.CTImageStorage]
        assert image_headers
        ds = image_headers[0]
        p = plan.patient
        assert str(ds.PatientName) == p.dicom_name and p.family.upper() in str(ds.PatientName)
        assert ds.PatientID == p.patient_id and ds.IssuerOfPatientID == p.issuer
        assert ds.PatientBirthDate == p.birth_date and ds.StudyDate == p.study_date
        assert ds.InstitutionName == p.institution and ds.AccessionNumber == p.accession
        for keyword in ("ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName", "StationName",
                        "InstitutionAddress", "StudyDescription", "SeriesDescription", "StudyID", "PatientAge",
                        "SeriesDate", "AcquisitionDate", "ContentDate", "StudyTime", "FrameOfReferenceUID"):
            assert str(ds.get(keyword, "")), keyword
        assert p.dicom_name in ds.RequestAttributesSequence[0].RequestedProcedureDescription
        assert ds.RequestAttributesSequence[0].AccessionNumber == p.accession
        assert ds.OtherPatientIDsSequence[0].PatientID == p.other_id
        private = ds.private_block(0x0029, synth.PRIVATE_CREATOR)
        assert str(private[0x10].value) == p.dicom_name
        assert p.family in plan.folder or p.family.upper() in plan.folder
        sop_uids = [str(d.SOPInstanceUID) for _, d in headers if "SOPInstanceUID" in d and "PixelSpacing" in d]
        assert len(set(sop_uids)) == len(sop_uids)
        assert {str(d.StudyInstanceUID) for _, d in headers if "PixelSpacing" in d} == {str(ds.StudyInstanceUID)}
    studies = {str(ds.StudyInstanceUID) for d in folders for _, ds in dicom_headers(d) if "PixelSpacing" in ds}
    assert len(studies) == CASES


def test_messy_cases_are_realistic_and_still_readable(raw):
    plans, folders = raw
    by_feature = {name: (plan, case_dir) for plan, case_dir in zip(plans, folders) for name in plan.features}

    plan, case_dir = by_feature["localizer"]
    folder = Path(main_series_files(plan, case_dir)[0]).parent
    scouts = [ds for path, ds in dicom_headers(folder) if "LOCALIZER" in ds.ImageType and path.parent == folder]
    assert len(scouts) == 1 and scouts[0].ImageOrientationPatient != [1, 0, 0, 0, 1, 0]

    plan, case_dir = by_feature["second_series"]
    sizes = {}
    for folder, _, _ in os.walk(case_dir):
        for sid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder):
            names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, sid)
            if len(names) > 1:
                sizes[sid] = sitk.ReadImage(names).GetSpacing()[2]
    assert sorted(sizes.values()) == pytest.approx([plan.slice_thickness, 2 * plan.slice_thickness], abs=1e-3)

    for feature, syntax in (("rle", pydicom.uid.RLELossless), ("j2k", pydicom.uid.JPEG2000Lossless)):
        if feature not in by_feature:
            continue
        plan, case_dir = by_feature[feature]
        path = main_series_files(plan, case_dir)[0]
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == syntax
        hu, _ = synth.case_volume(plan)
        first = synth._to_stored_order(plan, hu)[0]
        np.testing.assert_array_equal(ds.pixel_array.astype(np.int32) + int(ds.RescaleIntercept), first)

    plan, case_dir = by_feature["dicomdir"]
    fileset = pydicom.fileset.FileSet(pydicom.dcmread(next(case_dir.rglob("DICOMDIR"))))
    assert len(fileset.find(SeriesInstanceUID=synth._uid(plan, "series", "main"))) == plan.slices

    plan, _ = by_feature["feet_first"]
    assert synth.case_geometry(plan)["direction"][8] == -1.0
    assert by_feature["deep_nesting"][1] in folders


def test_fast_writer_equals_pydicom_dcmwrite(raw, tmp_path):
    plans, _ = raw
    for plan in plans:
        hu, _ = synth.case_volume(plan)
        base = synth._patient_dataset(plan)
        for series in synth._case_series(plan, hu):
            synth._InstanceWriter(synth._series_header(plan, base, series)).write(
                tmp_path / "fast.dcm", synth._instance_elements(plan, series, 0)
            )
            synth._instance_dataset(plan, series, base, 0).save_as(tmp_path / "ref.dcm", enforce_file_format=True)
            assert (tmp_path / "fast.dcm").read_bytes() == (tmp_path / "ref.dcm").read_bytes()


@pytest.mark.parametrize("kind", synth.CORRUPTIONS)
def test_corrupt_case_produces_the_claimed_defect(raw, tmp_path, kind):
    plans, folders = raw
    plan, source = plans[0], folders[0]
    case_dir = tmp_path / source.name
    shutil.copytree(source, case_dir)
    image = read_main_series(plan, case_dir)
    synth.corrupt_case(case_dir, kind)
    if kind == "truncated_dicom":
        shorter = [p for p in case_dir.rglob("*") if p.is_file()
                   and p.stat().st_size < (source / p.relative_to(case_dir)).stat().st_size]
        assert len(shorter) == 1
        assert str(source / shorter[0].relative_to(case_dir)) in main_series_files(plan, source)
        with pytest.raises(Exception):
            pydicom.dcmread(shorter[0]).pixel_array
    elif kind == "no_label":
        assert not [p for p in case_dir.rglob("*") if p.name.lower().endswith(LABEL_SUFFIXES)]
    else:
        label = sitk.ReadImage(str(label_volume(case_dir)))
        values = set(np.unique(sitk.GetArrayViewFromImage(label)))
        if kind == "mismatched_grid":
            assert label.GetSize() != image.GetSize()
        elif kind == "empty_label":
            assert values == {0} and label.GetSize() == image.GetSize()
        elif kind == "unknown_label_value":
            assert 7 in values and values <= {0, 1, 2, 7}
        elif kind == "non_ct_modality":
            modalities = {str(ds.Modality) for _, ds in dicom_headers(case_dir) if "Modality" in ds}
            assert modalities == {"MR"}
            np.testing.assert_array_equal(sitk.GetArrayFromImage(read_main_series(plan, case_dir)),
                                          sitk.GetArrayFromImage(image))


def test_corrupt_case_rejects_unknown_kind(raw):
    with pytest.raises(ValueError, match="unknown corruption"):
        synth.corrupt_case(raw[1][0], "melted")


def test_phantom_volume_is_seeded_and_honours_tumour_flag():
    shape, spacing = (12, 96, 96), (3.0, 4.0, 4.0)
    hu, label = phantom_volume(shape, spacing, np.random.default_rng(5), tumour=True)
    again, label_again = phantom_volume(shape, spacing, np.random.default_rng(5), tumour=True)
    assert hu.dtype == np.int16 and label.dtype == np.uint8 and hu.shape == label.shape == shape
    np.testing.assert_array_equal(hu, again)
    np.testing.assert_array_equal(label, label_again)
    assert (label == 2).any()
    _, no_tumour = phantom_volume(shape, spacing, np.random.default_rng(5), tumour=False)
    assert (no_tumour == 1).any() and not (no_tumour == 2).any()


def test_cli_helpers_parse_and_write(tmp_path, capsys):
    parser = build_synth_parser()
    args = parser.parse_args([str(tmp_path / "raw"), "--cases", "2", "--seed", "4", "--size", "64",
                              "--slices", "8", "--no-messy"])
    assert (args.cases, args.seed, args.size, args.slices, args.messy) == (2, 4, 64, 8, False)
    assert run_synth(parser, args) == 0
    assert capsys.readouterr().out == f"wrote 2 raw cases to {tmp_path / 'raw'}\n"
    folders = sorted((tmp_path / "raw").iterdir())
    assert [f.name for f in folders] == sorted(p.folder for p in synth.plan_dataset(2, 4, size=64, slices=8, messy=False))
    assert all(f.is_dir() and label_volume(f) for f in folders)
    with pytest.raises(ValueError, match="--cases"):
        synth.write_raw_dataset(tmp_path / "none", 0, 1)
