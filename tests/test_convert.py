"""care-convert end to end on small DICOM and volume-file cases written here with pydicom and SimpleITK."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

import care_dataset.convert.job
from care_dataset.cli import convert_main
from care_dataset.convert.pipeline import ConvertError, convert_dataset
from care_dataset.convert.regrid import to_original_grid
from care_dataset.deid.pseudonyms import patient_of
from care_dataset.deid.verify import collect_identifying_values, scan_for_leaks
from care_dataset.format import layout, reader
from care_dataset.raw.profiles import load_profile
from care_dataset.synth import raw_export
from dicom_cases import LABEL_NAME_PHI, SHARED_PHI, SLICES, SPACING, phantom, write_dicom_case
from real_profiles import LIVER_COLON, LIVER_SPINE

KEY = b"test-key-not-secret"
# Identifying values planted in headers, names and label text; none may appear under the output folder.
PATIENTS = {
    "DOE_JANE_19610203": dict(PatientName="Doe^Jane", PatientID="PID778812", PatientBirthDate="19610203"),
    "Roe Richard (2nd scan)": dict(PatientName="Roe^Richard", PatientID="PID551903", PatientBirthDate="19550417"),
    "ROE_RICHARD_followup": dict(PatientName="Roe^Richard", PatientID="PID551903", PatientBirthDate="19550417"),
    "Mustermann_Erika": dict(PatientName="Mustermann^Erika", PatientID="PID330127", PatientBirthDate="19700911"),
}
VOLUME_CASE = "Smith_John_MRN0042"  # a volume-file case with a flipped, non-identity direction


def write_volume_case(case_dir: Path, hu: np.ndarray, label: np.ndarray) -> tuple[sitk.Image, sitk.Image]:
    """.mha image and label in a feet-first orientation with a flipped x axis (direction diag(-1, 1, -1))."""
    case_dir.mkdir(parents=True)
    images = []
    for array, name in ((hu[::-1, :, ::-1], "Smith_CT.mha"), (label[::-1, :, ::-1], "Smith_seg.mha")):
        img = sitk.GetImageFromArray(np.ascontiguousarray(array))
        img.SetSpacing(SPACING)
        img.SetDirection((-1, 0, 0, 0, 1, 0, 0, 0, -1))
        img.SetOrigin((30.0, -20.0, 50.0))
        sitk.WriteImage(img, str(case_dir / name))
        images.append(img)
    return images[0], images[1]


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> dict:
    """A raw folder of 5 cases (one patient with two scans) and what was planted in it."""
    root = tmp_path_factory.mktemp("raw")
    planted = [*PATIENTS, VOLUME_CASE, LABEL_NAME_PHI, *SHARED_PHI.values()]
    originals = {}
    for seed, (folder, phi) in enumerate(PATIENTS.items()):
        hu, label = phantom(seed)
        planted += write_dicom_case(root / folder, hu, label, phi)
        planted += [v for v in phi.values()] + [phi["PatientName"].replace("^", "_")]
        originals[folder] = (hu, label)
    hu, label = phantom(10)
    originals[VOLUME_CASE] = write_volume_case(root / VOLUME_CASE, hu, label)
    return {"dir": root, "planted": planted, "originals": originals}


def convert(raw_dir: Path, out: Path, **kwargs):
    kwargs.setdefault("progress", False)
    return convert_dataset(raw_dir, out, load_profile("care"), KEY, True, **kwargs)


@pytest.fixture(scope="module")
def converted(raw, tmp_path_factory) -> dict:
    outs = {}
    for storage in ("zarr", "h5"):
        out = tmp_path_factory.mktemp(f"out_{storage}")
        outs[storage] = (out, convert(raw["dir"], out, storage=storage))
    return outs


def json_files(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in ("dataset.json", "cases.json", "splits.json", "report.json")}


def all_arrays(out: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    ds = reader.open_dataset(out)
    return {c: ds.read_case(c) for c in ds.case_ids()}


def assert_same_dataset(a: Path, b: Path) -> None:
    assert json_files(a) == json_files(b)
    arrays_a, arrays_b = all_arrays(a), all_arrays(b)
    assert arrays_a.keys() == arrays_b.keys()
    for case_id in arrays_a:
        for x, y in zip(arrays_a[case_id], arrays_b[case_id]):
            np.testing.assert_array_equal(x, y)


def test_zarr_and_h5_hold_equal_arrays_and_checksums(converted):
    (zarr_out, zarr_summary), (h5_out, h5_summary) = converted["zarr"], converted["h5"]
    assert zarr_summary.converted == h5_summary.converted == 5 and zarr_summary.failed == 0
    zarr_ds, h5_ds = reader.open_dataset(zarr_out), reader.open_dataset(h5_out)
    assert zarr_ds.storage == "zarr" and h5_ds.storage == "h5"
    assert zarr_ds.manifest["checksums"] == h5_ds.manifest["checksums"]
    assert (zarr_out / "cases.json").read_bytes() == (h5_out / "cases.json").read_bytes()
    for case_id in zarr_ds.case_ids():
        image, label = zarr_ds.read_case(case_id)
        assert image.dtype == np.int16 and label.dtype == np.uint8
        np.testing.assert_array_equal(image, h5_ds.read_case(case_id)[0])
        np.testing.assert_array_equal(label, h5_ds.read_case(case_id)[1])
        assert layout.content_checksum(image, label) == zarr_ds.cases[case_id]["checksum"]


def test_manifest_splits_and_report(converted):
    out, summary = converted["zarr"]
    ds = reader.open_dataset(out)
    manifest = ds.manifest
    assert manifest["classes"] == ["background", "normal rectum", "tumor"]
    assert manifest["profile"]["name"] == "care" and manifest["key_reproducible"] is True
    splits = json.loads((out / "splits.json").read_text())
    assert splits["seed"] == 0 and splits["strategy"] == "patient"
    assert sorted(splits["train"] + splits["test"]) == ds.case_ids()
    # four patients -> 3 train, 1 test at 318:81; the two scans of one patient share prefix and split
    patients = {patient_of(c) for c in ds.case_ids()}
    assert len(patients) == 4 and len(ds.case_ids()) == 5
    for split in ("train", "test"):
        assert manifest["splits"][split]["cases"] == len(splits[split])
        assert manifest["splits"][split]["slices"] == sum(ds.cases[c]["num_slices"] for c in splits[split])
    assert len({patient_of(c) for c in splits["train"]}) == 3
    assert not {patient_of(c) for c in splits["train"]} & {patient_of(c) for c in splits["test"]}
    report = json.loads((out / "report.json").read_text())
    assert len(report) == 5 and {r["status"] for r in report} == {"converted"}
    assert sorted(r["case_id"] for r in report) == ds.case_ids()
    assert "timestamp" not in json.dumps(manifest) and "date" not in json.dumps(manifest).lower()


def test_filtering_keeps_exactly_the_labelled_slices(raw, converted):
    out, _ = converted["zarr"]
    ds = reader.open_dataset(out)
    for case_id in ds.case_ids():
        geometry = ds.cases[case_id]
        image, label = ds.read_case(case_id)
        full_label = sitk.GetArrayFromImage(to_original_grid(ds, case_id, label))
        assert geometry["voxels_before"] == {n: int((full_label == i).sum()) for i, n in enumerate(ds.class_names)}
        for name in ("normal rectum", "tumor"):
            assert geometry["voxels_after"][name] == geometry["voxels_before"][name] > 0
        for i, name in enumerate(ds.class_names):
            assert geometry["voxels_after"][name] == int((label == i).sum())
        # canonical slices holding rectum or tumor: exactly the kept ones (margin 0)
        canonical = sitk.GetArrayFromImage(sitk.DICOMOrient(to_original_grid(ds, case_id, label), "LPS"))
        assert geometry["kept_slices"] == np.flatnonzero((canonical > 0).any(axis=(1, 2))).tolist()
        assert geometry["num_slices"] == len(image) < geometry["canonical"]["size"][2]


def test_margin_widens_the_kept_range(raw, tmp_path):
    profile_text = load_profile("care").source_text.replace("margin = 0", "margin = 2")
    profile_path = tmp_path / "care_margin.toml"
    profile_path.write_text(profile_text)
    one = tmp_path / "raw"
    shutil.copytree(raw["dir"] / "DOE_JANE_19610203", one / "DOE_JANE_19610203")
    convert_dataset(one, tmp_path / "out", load_profile(profile_path), KEY, True, progress=False)
    ds = reader.open_dataset(tmp_path / "out")
    (case_id,) = ds.case_ids()
    labelled = np.flatnonzero((phantom(0)[1] > 0).any(axis=(1, 2)))
    expected = np.arange(max(labelled.min() - 2, 0), min(labelled.max() + 3, SLICES)).tolist()
    assert ds.cases[case_id]["kept_slices"] == expected


def test_round_trip_to_original_grid_is_exact(raw, converted):
    out, _ = converted["zarr"]
    ds = reader.open_dataset(out)
    private = {}
    for case_id in ds.case_ids():
        image, label = ds.read_case(case_id)
        back = to_original_grid(ds, case_id, image, fill_value=-2000)
        private[case_id] = back
        assert ds.cases[case_id]["original"]["size"] == list(back.GetSize())
    # the flipped volume case: compare with the original file voxel for voxel
    hu_img, label_img = raw["originals"][VOLUME_CASE]
    flipped = [c for c in ds.case_ids() if ds.cases[c]["original"]["orientation"] != "LPS"]
    assert len(flipped) == 1
    case_id = flipped[0]
    back = private[case_id]
    assert back.GetDirection() == hu_img.GetDirection() and back.GetOrigin() == hu_img.GetOrigin()
    assert back.GetSpacing() == hu_img.GetSpacing()
    original = sitk.GetArrayFromImage(hu_img)
    restored = sitk.GetArrayFromImage(back)
    kept = restored != -2000
    original_label = sitk.GetArrayFromImage(label_img)
    assert kept.any() and (original_label[~kept] == 0).all()
    np.testing.assert_array_equal(restored[kept], original[kept])
    label_back = sitk.GetArrayFromImage(to_original_grid(ds, case_id, ds.read_case(case_id)[1]))
    np.testing.assert_array_equal(label_back, original_label)
    # a DICOM case: stored HU equal the planted HU on the kept slices
    dicom_case = next(c for c in ds.case_ids() if c != case_id)
    restored = sitk.GetArrayFromImage(to_original_grid(ds, dicom_case, ds.read_case(dicom_case)[0]))
    candidates = [hu for hu, _ in (raw["originals"][f] for f in PATIENTS)]
    kept_slices = ds.cases[dicom_case]["kept_slices"]
    assert any(np.array_equal(restored[kept_slices], hu[kept_slices]) for hu in candidates)


def test_stored_slices_are_radiological(raw, tmp_path):
    """Row 0 anterior, column 0 patient right: a marker at the patient's right-anterior corner ends up at [0, 0]."""
    hu, label = phantom(3)
    hu[:, :4, :4] = 3000  # array x index 0 = patient right (LPS +x = left), y index 0 = anterior
    raw_dir = tmp_path / "raw"
    write_volume_case(raw_dir / "case", hu, label)
    convert(raw_dir, tmp_path / "out")
    ds = reader.open_dataset(tmp_path / "out")
    image, _ = ds.read_case(ds.case_ids()[0])
    assert (image[:, :4, :4] == 3000).all() and (image[:, -4:, -4:] != 3000).all()


def test_no_identifying_value_in_output(raw, converted, tmp_path):
    for out, _ in converted.values():
        needles = [v.encode() for v in raw["planted"] if len(v) >= 6]
        needles += [v.lower().encode() for v in raw["planted"] if len(v) >= 6]
        for path in out.rglob("*"):
            assert not any(n.decode() in path.name for n in needles), path.name
            if path.is_file():
                data = path.read_bytes()
                leaks = [n for n in needles if n in data]
                assert not leaks, (path.relative_to(out), leaks)
            assert KEY.decode() not in path.name
    assert not any(KEY in p.read_bytes() for p in converted["zarr"][0].rglob("*") if p.is_file())


def test_two_runs_and_worker_counts_give_identical_outputs(raw, converted, tmp_path):
    reference, _ = converted["zarr"]
    convert(raw["dir"], tmp_path / "again")
    convert(raw["dir"], tmp_path / "two_workers", workers=2)
    assert_same_dataset(reference, tmp_path / "again")
    assert_same_dataset(reference, tmp_path / "two_workers")
    other_seed = convert(raw["dir"], tmp_path / "seed1", seed=1)
    assert other_seed.converted == 5
    assert json.loads((tmp_path / "seed1" / "splits.json").read_text())["seed"] == 1


def test_other_key_gives_other_ids(raw, converted, tmp_path):
    convert_dataset(raw["dir"], tmp_path / "out", load_profile("care"), b"another key-0123456789", True, progress=False)
    ids_a = set(reader.open_dataset(converted["zarr"][0]).case_ids())
    ids_b = set(reader.open_dataset(tmp_path / "out").case_ids())
    assert len(ids_b) == 5 and not ids_a & ids_b


def test_private_map_names_raw_folders_outside_the_output(raw, converted, tmp_path):
    mapping = tmp_path / "custodian" / "map.json"
    convert(raw["dir"], tmp_path / "out", private_map=mapping)
    table = json.loads(mapping.read_text())
    assert set(table) == {*PATIENTS, VOLUME_CASE}
    assert set(table.values()) == set(reader.open_dataset(tmp_path / "out").case_ids())
    assert patient_of(table["Roe Richard (2nd scan)"]) == patient_of(table["ROE_RICHARD_followup"])
    assert table["Roe Richard (2nd scan)"] != table["ROE_RICHARD_followup"]

    with pytest.raises(ConvertError, match="private-map"):
        convert(raw["dir"], tmp_path / "out", private_map=tmp_path / "out" / "map.json")


# --- failures -----------------------------------------------------------------------------------------------

def _break_truncated(case: Path) -> None:
    for f in sorted(case.rglob("*.dcm"))[:3]:
        f.write_bytes(f.read_bytes()[: 300])


def _break_no_label(case: Path) -> None:
    for f in case.glob("*_seg.nii.gz"):
        f.unlink()


def _break_grid(case: Path) -> None:
    (seg_path,) = case.glob("*_seg.nii.gz")
    seg = sitk.ReadImage(str(seg_path))
    seg.SetSpacing((7.0, 7.0, 2.5))
    sitk.WriteImage(seg, str(seg_path))


def _break_empty(case: Path) -> None:
    (seg_path,) = case.glob("*_seg.nii.gz")
    seg = sitk.ReadImage(str(seg_path))
    empty = sitk.Image(seg.GetSize(), seg.GetPixelID())
    empty.CopyInformation(seg)
    sitk.WriteImage(empty, str(seg_path))


def _break_unknown_value(case: Path) -> None:
    (seg_path,) = case.glob("*_seg.nii.gz")
    seg = sitk.ReadImage(str(seg_path))
    array = sitk.GetArrayFromImage(seg)
    array[array == 2] = 7
    bad = sitk.GetImageFromArray(array)
    bad.CopyInformation(seg)
    sitk.WriteImage(bad, str(seg_path))


def _break_modality(case: Path) -> None:
    for f in case.rglob("*.dcm"):
        ds = pydicom.dcmread(f)
        ds.Modality = "MR"
        ds.save_as(f)


def _break_truncated_label(case: Path) -> None:
    """The annotation cut short after its header, as an interrupted copy leaves it (ITK reads it as zeros)."""
    (seg_path,) = case.glob("*_seg.nii.gz")
    whole = gzip.compress(gzip.decompress(seg_path.read_bytes()), compresslevel=0)
    seg_path.write_bytes(whole[: len(whole) // 2])


def _break_label_xforms(case: Path) -> None:
    """An annotation whose qform is 20 mm off its sform (a header edited by hand or by a registration tool)."""
    (seg_path,) = case.glob("*_seg.nii.gz")
    seg = nib.load(seg_path)
    qform = seg.affine.copy()
    qform[2, 3] += 20.0
    edited = nib.Nifti1Image(np.asarray(seg.dataobj), seg.affine, seg.header)
    edited.set_sform(seg.affine, code=2)
    edited.set_qform(qform, code=1)
    nib.save(edited, seg_path)


BREAKERS = {"truncated_dicom": _break_truncated, "no_label": _break_no_label, "mismatched_grid": _break_grid,
            "empty_label": _break_empty, "unknown_label_value": _break_unknown_value,
            "non_ct_modality": _break_modality, "truncated_label": _break_truncated_label,
            "label_qform_sform": _break_label_xforms}
# what the one-line reason must say, where the failure is not obvious from the kind
REASONS = {"truncated_label": "the annotation file: truncated NIfTI",
           "label_qform_sform": "the annotation file: the header's qform (code 1) and sform (code 2) place the "
                                "volume up to 20.00 mm apart"}


@pytest.fixture(scope="module")
def broken(raw, tmp_path_factory) -> dict:
    """The raw set with one extra broken copy of a case per failure kind (fresh patient IDs)."""
    root = tmp_path_factory.mktemp("broken")
    planted = list(raw["planted"])
    for i, (kind, breaker) in enumerate(BREAKERS.items()):
        hu, label = phantom(20 + i)
        folder = f"Patient_{kind}_Lastname{i}"
        phi = dict(PatientName=f"Broken^Case{i}", PatientID=f"BRK{i:05d}9", PatientBirthDate="19800101")
        planted += write_dicom_case(root / folder, hu, label, phi) + [folder, *phi.values()]
        breaker(root / folder)
    for folder in [*PATIENTS, VOLUME_CASE]:
        shutil.copytree(raw["dir"] / folder, root / folder)
    return {"dir": root, "planted": planted}


def test_each_bad_case_fails_alone_without_leftovers(broken, converted, tmp_path, capsys):
    key_file = tmp_path / "key"
    key_file.write_bytes(KEY + b"\n")
    out = tmp_path / "out"
    code = convert_main([str(broken["dir"]), str(out), "--key-file", str(key_file), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1
    report = json.loads((out / "report.json").read_text())
    failed = [r for r in report if r["status"] == "failed"]
    assert len(report) == 5 + len(BREAKERS) and len(failed) == len(BREAKERS)
    for r in failed:
        assert r["reason"] and "\n" not in r["reason"]
    # one terminal line per failed case, naming its raw folder
    lines = [line for line in err.splitlines() if line.startswith("FAILED")]
    assert len(lines) == len(BREAKERS)
    for i, kind in enumerate(BREAKERS):
        (line,) = [line for line in lines if f"Patient_{kind}_Lastname{i}" in line]
        assert REASONS.get(kind, "") in line
    # the good cases are exactly the ones converted without the broken ones
    assert_arrays_equal_by_checksum(out, converted["zarr"][0])
    ds = reader.open_dataset(out)
    assert sorted(p.name for p in (out / layout.ZARR_DIR).iterdir() if p.is_dir()) == ds.case_ids()
    assert sorted(p.stem for p in (out / layout.TMP_DIR / "records").glob("*.json")) == ds.case_ids()
    assert [p.name for p in (out / layout.TMP_DIR).iterdir()] == ["records"]
    data = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())
    assert not [v for v in broken["planted"] if len(v) >= 6 and v.encode() in data]


def assert_arrays_equal_by_checksum(out: Path, reference: Path) -> None:
    assert reader.open_dataset(out).manifest["checksums"]["cases"] == \
        reader.open_dataset(reference).manifest["checksums"]["cases"]


# --- resume ---------------------------------------------------------------------------------------------------

KILLER = r"""
import os, signal, sys
from pathlib import Path
from care_dataset import files
from care_dataset.cli import convert_main
from care_dataset.convert import pipeline
from care_dataset.format import layout, writer

kill_at, point = int(sys.argv[1]), sys.argv[2]
calls = []
write_case, write_json_atomic = writer.write_case, pipeline.write_json_atomic

def dying_write_case(root, storage, case_id, image, label):
    calls.append(case_id)
    if len(calls) == kill_at and point == "arrays":
        partial = Path(root) / layout.TMP_DIR / case_id
        partial.mkdir(parents=True)
        (partial / "zarr.json").write_text("{")
        os.kill(os.getpid(), signal.SIGKILL)
    write_case(root, storage, case_id, image, label)
    if len(calls) == kill_at and point == "record":
        os.kill(os.getpid(), signal.SIGKILL)

def dying_write_json(path, obj):
    if point == "final" and Path(path).name == "cases.json":
        files.temporary_path(Path(path)).write_text("{")
        os.kill(os.getpid(), signal.SIGKILL)
    write_json_atomic(path, obj)

writer.write_case, pipeline.write_json_atomic = dying_write_case, dying_write_json
sys.exit(convert_main(sys.argv[3:]))
"""


@pytest.mark.parametrize("point", ["arrays", "record", "final"])
def test_killed_conversion_resumes_to_the_same_result(raw, converted, tmp_path, point):
    key_file = tmp_path / "key"
    key_file.write_bytes(KEY)
    out = tmp_path / "out"
    args = [str(raw["dir"]), str(out), "--key-file", str(key_file), "--quiet"]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    killed = subprocess.run([sys.executable, "-c", KILLER, "3", point, *args], env=env, capture_output=True)
    assert killed.returncode == -9, killed.stderr.decode()
    assert not (out / "dataset.json").exists()

    assert convert_main(args) == 0
    assert_same_dataset(converted["zarr"][0], out)
    assert [p.name for p in (out / layout.TMP_DIR).iterdir()] == ["records"]
    assert not list(out.glob(".*.tmp*"))


def test_changed_input_is_converted_again(raw, tmp_path):
    raw_dir = tmp_path / "raw"
    shutil.copytree(raw["dir"] / VOLUME_CASE, raw_dir / VOLUME_CASE)
    convert(raw_dir, tmp_path / "out")
    before = reader.open_dataset(tmp_path / "out")
    (case_id,) = before.case_ids()
    hu, label = phantom(11)
    shutil.rmtree(raw_dir / VOLUME_CASE)
    write_volume_case(raw_dir / VOLUME_CASE, hu, label)
    convert(raw_dir, tmp_path / "out")
    after = reader.open_dataset(tmp_path / "out")
    assert after.case_ids() == [case_id]
    assert after.cases[case_id]["checksum"] != before.cases[case_id]["checksum"]
    image, stored_label = after.read_case(case_id)
    assert layout.content_checksum(image, stored_label) == after.cases[case_id]["checksum"]


def test_a_crashing_worker_fails_only_its_case(raw, converted, tmp_path, monkeypatch, capsys):
    """A worker process that dies (segfault, out of memory) takes down only the case it was converting."""
    load_case = care_dataset.convert.job.load_case

    def crashing_load_case(raw_case, profile, *args, **kwargs):
        if raw_case.key == "Mustermann_Erika":
            os._exit(70)
        return load_case(raw_case, profile, *args, **kwargs)

    monkeypatch.setattr(care_dataset.convert.job, "load_case", crashing_load_case)
    summary = convert(raw["dir"], tmp_path / "out", workers=2)
    assert summary.converted == 4 and summary.failed == 1
    assert summary.failures[0][0] == "Mustermann_Erika" and "worker process" in summary.failures[0][1]
    (failed,) = [r for r in summary.report if r["status"] == "failed"]
    assert failed["case_id"] is None
    reference = reader.open_dataset(converted["zarr"][0]).manifest["checksums"]["cases"]
    assert reader.open_dataset(tmp_path / "out").manifest["checksums"]["cases"].items() < reference.items()


# --- the embedded synthetic raw dataset ------------------------------------------------------------------------

def _largest_series(case_dir: Path) -> sitk.Image:
    """The case's main CT series read with SimpleITK alone (the series with the most files)."""
    best: list[str] = []
    for folder in [case_dir, *(p for p in case_dir.rglob("*") if p.is_dir())]:
        for series_id in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)):
            files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_id)
            best = max(best, list(files), key=len)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(best)
    return reader.Execute()


def test_synthetic_messy_dataset_end_to_end(tmp_path):
    synth = raw_export

    plans = synth.plan_dataset(8, 1, size=128, slices=24)
    folders = synth.write_raw_dataset(tmp_path / "raw", 8, seed=1, size=128, slices=24)
    features = {f.name: set(p.features) for p, f in zip(plans, folders)}
    plain = [f for f in folders if not features[f.name]]
    broken = {plain[0].name: "truncated_dicom", plain[1].name: "mismatched_grid"}
    for folder, kind in broken.items():
        synth.corrupt_case(tmp_path / "raw" / folder, kind)
    summary = convert(tmp_path / "raw", tmp_path / "out", workers=2, private_map=tmp_path / "map.json")
    assert summary.converted == 6 and summary.failed == 2
    assert {name for name, _ in summary.failures} == set(broken)
    mapping = json.loads((tmp_path / "map.json").read_text())
    assert all(mapping[name] is None or patient_of(mapping[name]) for name in broken)

    ds = reader.open_dataset(tmp_path / "out")
    assert sorted(ds.splits["train"] + ds.splits["test"]) == ds.case_ids() and ds.splits["test"]
    # every messy case converted; a feet-first one maps back onto its own DICOM grid exactly
    messy = [f.name for f in folders if features[f.name]]
    assert all(mapping[name] in ds.cases for name in messy)
    feet_first = next(n for n in messy if "feet_first" in features[n])
    case_id = mapping[feet_first]
    assert ds.cases[case_id]["original"]["orientation"] != "LPS"
    original = _largest_series(tmp_path / "raw" / feet_first)
    back = to_original_grid(ds, case_id, ds.read_case(case_id)[0], fill_value=-32768)
    assert back.GetSize() == original.GetSize() and back.GetDirection() == pytest.approx(original.GetDirection())
    assert back.GetOrigin() == pytest.approx(original.GetOrigin(), abs=1e-3)
    restored, expected = sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(original)
    kept = restored != -32768
    assert kept.sum() == ds.cases[case_id]["num_slices"] * 128 * 128
    np.testing.assert_array_equal(restored[kept], expected[kept].astype(np.int16))

    leaks = scan_for_leaks(tmp_path / "out", collect_identifying_values(tmp_path / "raw"))
    assert not leaks, leaks[:5]


# --- real third-party files --------------------------------------------------------------------------------------

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _profile_file(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "profile.toml"
    path.write_text(body)
    return path


def test_real_dicom_series_with_nrrd_label(tmp_path):
    source = SHARED / "dcmqi_ct3slice"
    if not source.is_dir():
        pytest.skip("../shared/data/dcmqi_ct3slice not available")

    case = tmp_path / "raw" / "GE_LightSpeed_patient"
    shutil.copytree(source / "ct-3slice", case / "ct-3slice")
    shutil.copy(source / "liver_spine_seg.nrrd", case / "liver_spine_seg.nrrd")
    profile = load_profile(_profile_file(tmp_path, LIVER_SPINE))

    summary = convert_dataset(tmp_path / "raw", tmp_path / "out", profile, KEY, True, progress=False)
    assert summary.converted == 1, summary.failures
    ds = reader.open_dataset(tmp_path / "out")
    (case_id,) = ds.case_ids()
    image, label = ds.read_case(case_id)
    assert image.shape == (3, 512, 512)
    raw_label = sitk.GetArrayFromImage(sitk.ReadImage(str(source / "liver_spine_seg.nrrd")))
    assert ds.cases[case_id]["voxels_after"]["liver"] == int((raw_label == 1).sum())
    assert ds.cases[case_id]["voxels_after"]["spine"] == int((raw_label == 2).sum())
    # HU: pydicom's rescaled pixels of each file, at the slice position it names
    hu_by_z = {}
    for f in sorted((source / "ct-3slice").glob("*.dcm")):
        dicom = pydicom.dcmread(f)
        hu = dicom.pixel_array.astype(np.float64) * float(dicom.RescaleSlope) + float(dicom.RescaleIntercept)
        hu_by_z[round(float(dicom.ImagePositionPatient[2]), 3)] = hu.astype(np.int16)
    z0, dz = ds.cases[case_id]["canonical"]["origin"][2], ds.cases[case_id]["canonical"]["spacing"][2]
    for p, k in enumerate(ds.cases[case_id]["kept_slices"]):
        np.testing.assert_array_equal(image[p], hu_by_z[round(z0 + k * dz, 3)])
    assert not scan_for_leaks(tmp_path / "out", collect_identifying_values(tmp_path / "raw"))


def test_real_nifti_pair_mapped_by_a_profile_round_trips(tmp_path):
    source = SHARED / "totalseg_example_ct_sm"
    if not source.is_dir():
        pytest.skip("../shared/data/totalseg_example_ct_sm not available")
    case = tmp_path / "raw" / "totalseg_example"
    case.mkdir(parents=True)
    shutil.copy(source / "example_ct_sm.nii.gz", case / "example_ct_sm.nii.gz")
    shutil.copy(source / "example_seg.nii.gz", case / "example_seg.nii.gz")
    profile = load_profile(_profile_file(tmp_path, LIVER_COLON))

    summary = convert_dataset(tmp_path / "raw", tmp_path / "out", profile, KEY, True, progress=False)
    assert summary.converted == 1, summary.failures
    ds = reader.open_dataset(tmp_path / "out")
    (case_id,) = ds.case_ids()
    original_image = sitk.ReadImage(str(source / "example_ct_sm.nii.gz"))
    raw_label = sitk.GetArrayFromImage(sitk.ReadImage(str(source / "example_seg.nii.gz")))
    geometry = ds.cases[case_id]
    assert geometry["original"]["direction"] == list(original_image.GetDirection()) != [1, 0, 0, 0, 1, 0, 0, 0, 1]
    assert geometry["voxels_before"]["liver"] == int((raw_label == 5).sum())
    assert geometry["voxels_after"]["colon"] == geometry["voxels_before"]["colon"] == int((raw_label == 20).sum())
    assert geometry["num_slices"] == int((raw_label == 20).any(axis=(1, 2)).sum())
    image, label = ds.read_case(case_id)
    back = to_original_grid(ds, case_id, image, fill_value=-32768)
    assert back.GetOrigin() == original_image.GetOrigin() and back.GetDirection() == original_image.GetDirection()
    restored, original = sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(original_image)
    kept = restored != -32768
    assert kept.any(axis=(1, 2)).tolist() == (raw_label == 20).any(axis=(1, 2)).tolist()
    np.testing.assert_array_equal(restored[kept], original[kept])
    label_back = sitk.GetArrayFromImage(to_original_grid(ds, case_id, label))
    expected = np.select([raw_label == 5, raw_label == 20], [1, 2], 0)
    np.testing.assert_array_equal(label_back[kept], expected[kept])


def test_word_profile_paired_folders(tmp_path):
    """nnU-Net/WORD layout: imagesTr/<name>.nii.gz with labelsTr/<name>.nii.gz; every slice with any organ kept."""
    raw_dir = tmp_path / "raw"
    for i, name in enumerate(["word_0001", "word_0002"]):
        hu, label = phantom(30 + i)
        label[label == 2] = 14  # bladder, say: any WORD organ value
        for folder, array in (("imagesTr", hu), ("labelsTr", label)):
            img = sitk.GetImageFromArray(array)
            img.SetSpacing(SPACING)
            (raw_dir / folder).mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(img, str(raw_dir / folder / f"{name}.nii.gz"))
    summary = convert_dataset(raw_dir, tmp_path / "out", load_profile("word"), KEY, True, progress=False)
    assert summary.converted == 2, summary.failures
    ds = reader.open_dataset(tmp_path / "out")
    assert len(ds.class_names) == 17 and ds.manifest["profile"]["name"] == "word"
    for case_id in ds.case_ids():
        geometry = ds.cases[case_id]
        assert geometry["voxels_after"]["bladder"] == geometry["voxels_before"]["bladder"] > 0
        assert set(np.unique(ds.read_case(case_id)[1])) <= {0, 1, 14}
    assert sorted(ds.splits["train"] + ds.splits["test"]) == ds.case_ids()
