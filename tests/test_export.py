"""care-export: nnU-Net v2 raw data checked by nnU-Net itself, a MONAI datalist loaded by MONAI, the volumes'
voxels and geometry against the stored slices, patient-grouped folds, and the refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from care_dataset.cli import export_main
from care_dataset.deid.pseudonyms import patient_of
from care_dataset.export.errors import ExportError
from care_dataset.export.nnunet import export_nnunet
from care_dataset.export.volumes import FILL_HU
from care_dataset.files import write_json_atomic
from care_dataset.format.reader import open_dataset
from converted_folders import make_converted, make_converted_folder

# two test scans of one patient, then train patients with one or two scans each
CASE_IDS = ["care_aaaaaaaaaaaa-000001", "care_aaaaaaaaaaaa-000002", "care_bbbbbbbbbbbb-000001",
            "care_bbbbbbbbbbbb-000002", "care_cccccccccccc-000001", "care_dddddddddddd-000001",
            "care_dddddddddddd-000002", "care_eeeeeeeeeeee-000001"]
NNUNET_PLAN = ("from nnunetv2.experiment_planning.plan_and_preprocess_entrypoints import plan_and_preprocess_entry; "
               "plan_and_preprocess_entry()")


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    return make_converted_folder(tmp_path_factory.mktemp("export") / "out", size=32, depth=12, case_ids=CASE_IDS)


def nnunet_env(root: Path) -> dict[str, str]:
    folders = {name: root / name for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    return {**os.environ, **{name: str(path) for name, path in folders.items()}, "nnUNet_n_proc_DA": "1"}


def test_nnunet_export_passes_nnunets_integrity_check_and_preprocessing(converted, tmp_path):
    pytest.importorskip("nnunetv2")
    env = nnunet_env(tmp_path)
    assert export_main(["nnunet", str(converted), env["nnUNet_raw"], "--dataset-id", "501"]) == 0
    run = subprocess.run([sys.executable, "-c", NNUNET_PLAN, "-d", "501", "--verify_dataset_integrity", "-c", "2d",
                          "-np", "1", "-npfp", "1"], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Dataset501_CARE" in run.stdout
    preprocessed = Path(env["nnUNet_preprocessed"]) / "Dataset501_CARE"
    identifiers = {p.name.split(".")[0] for p in (preprocessed / "nnUNetPlans_2d").glob("*.b2nd")
                   if not p.name.endswith("_seg.b2nd")}
    folds = json.loads((Path(env["nnUNet_raw"]) / "Dataset501_CARE" / "splits_final.json").read_text())
    assert identifiers == set(open_dataset(converted).splits["train"])
    assert all(set(fold["train"]) | set(fold["val"]) == identifiers for fold in folds)


def test_nnunet_layout_splits_and_folds_keep_patients_together(converted, tmp_path):
    export_nnunet(converted, tmp_path, 7, "Rectum")
    folder = tmp_path / "Dataset007_Rectum"
    splits = open_dataset(converted).splits
    assert sorted(p.name for p in (folder / "imagesTr").iterdir()) == [f"{c}_0000.nii.gz" for c in splits["train"]]
    assert sorted(p.name for p in (folder / "labelsTs").iterdir()) == [f"{c}.nii.gz" for c in splits["test"]]
    manifest = json.loads((folder / "dataset.json").read_text())
    assert manifest["channel_names"] == {"0": "CT"} and manifest["file_ending"] == ".nii.gz"
    assert manifest["labels"] == {"background": 0, "rectum": 1, "tumor": 2}
    assert manifest["numTraining"] == len(splits["train"]) == 6
    assert manifest["care_export"]["slices"].startswith("kept:")
    folds = json.loads((folder / "splits_final.json").read_text())
    vals = [fold["val"] for fold in folds]
    assert len(folds) == 4  # 4 training patients: one fold each at most
    assert sorted(c for val in vals for c in val) == splits["train"]
    for fold in folds:
        assert {patient_of(c) for c in fold["val"]}.isdisjoint(patient_of(c) for c in fold["train"])
    assert str(converted) not in (folder / "dataset.json").read_text()


def test_volumes_hold_the_stored_slices_on_the_canonical_grid(tmp_path):
    source = make_converted(tmp_path / "out")  # case 1 keeps every other slice: filled gaps
    export_nnunet(source, tmp_path / "raw", 9)
    folder = tmp_path / "raw" / "Dataset009_CARE"
    dataset = open_dataset(source)
    records = json.loads((folder / "dataset.json").read_text())["care_export"]["cases"]
    for split in dataset.splits:
        for case_id in dataset.case_ids(split):
            check_case_volume(dataset, case_id, folder, records[case_id])
    assert records["p0001b_1"]["filled_slices"] == 15


def check_case_volume(dataset, case_id: str, folder: Path, record: dict) -> None:
    tag = "Tr" if record["split"] == "train" else "Ts"
    image_file = folder / f"images{tag}" / f"{case_id}_0000.nii.gz"
    label_file = folder / f"labels{tag}" / f"{case_id}.nii.gz"
    image, label = dataset.read_case(case_id)
    geometry = dataset.cases[case_id]
    kept = np.asarray(geometry["kept_slices"])
    volume = sitk.GetArrayFromImage(sitk.ReadImage(image_file))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(label_file))
    assert volume.dtype == np.int16 and labels.dtype == np.uint8
    assert volume.shape[0] == kept[-1] - kept[0] + 1 and record["canonical_slices"] == [kept[0], kept[-1]]
    np.testing.assert_array_equal(volume[kept - kept[0]], image)
    np.testing.assert_array_equal(labels[kept - kept[0]], label)
    gaps = np.setdiff1d(np.arange(volume.shape[0]), kept - kept[0])
    assert len(gaps) == record["filled_slices"] and (volume[gaps] == FILL_HU).all() and (labels[gaps] == 0).all()
    canonical = geometry["canonical"]
    direction = np.asarray(canonical["direction"]).reshape(3, 3)
    lps_affine = np.eye(4)
    lps_affine[:3, :3] = direction * np.asarray(canonical["spacing"])
    lps_affine[:3, 3] = np.asarray(canonical["origin"]) + lps_affine[:3, 2] * kept[0]
    ras_affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps_affine  # NIfTI's world is RAS
    for path in (image_file, label_file):
        np.testing.assert_allclose(nib.load(path).affine, ras_affine, atol=1e-4)


@pytest.mark.filterwarnings("ignore:NvImgCodecPydicomReader:UserWarning")  # MONAI's optional GPU decoder
def test_monai_loads_the_datalist_with_the_same_splits_and_folds(converted, tmp_path):
    monai_data = pytest.importorskip("monai.data")
    monai_transforms = pytest.importorskip("monai.transforms")
    datalist = tmp_path / "lists" / "care.json"
    assert export_main(["monai", str(converted), str(datalist)]) == 0
    export_nnunet(converted, tmp_path / "raw", 501)
    training = monai_data.load_decathlon_datalist(datalist, is_segmentation=True, data_list_key="training")
    test = monai_data.load_decathlon_datalist(datalist, is_segmentation=True, data_list_key="test")
    dataset = open_dataset(converted)
    assert [e["case_id"] for e in training] == dataset.splits["train"]
    assert [e["case_id"] for e in test] == dataset.splits["test"]
    folds = json.loads((tmp_path / "raw" / "Dataset501_CARE" / "splits_final.json").read_text())
    assert [sorted(e["case_id"] for e in training if e["fold"] == k) for k in range(len(folds))] == \
        [fold["val"] for fold in folds]
    loaded = monai_transforms.LoadImaged(keys=["image", "label"], image_only=True)(test[0])
    image, label = dataset.read_case(test[0]["case_id"])
    kept = np.asarray(dataset.cases[test[0]["case_id"]]["kept_slices"])
    np.testing.assert_array_equal(np.asarray(loaded["image"]).transpose(2, 1, 0)[kept - kept[0]], image)
    np.testing.assert_array_equal(np.asarray(loaded["label"]).transpose(2, 1, 0)[kept - kept[0]], label)


def test_a_conversion_that_kept_every_slice_is_stated_as_whole_scans(tmp_path):
    source = make_converted_folder(tmp_path / "out", num_patients=4, size=32, depth=12)
    cases = json.loads((source / "cases.json").read_text())
    for geometry in cases.values():
        geometry["kept_slices"] = list(range(geometry["num_slices"]))
        geometry["canonical"]["size"][2] = geometry["num_slices"]
    write_json_atomic(source / "cases.json", cases)
    export_nnunet(source, tmp_path / "raw", 12)
    manifest = json.loads((tmp_path / "raw" / "Dataset012_CARE" / "dataset.json").read_text())
    assert manifest["care_export"]["slices"].startswith("all:")


@pytest.mark.parametrize("args, message", [
    (["nnunet", "{missing}", "{raw}", "--dataset-id", "501"], "not found"),
    (["nnunet", "{src}", "{raw}", "--dataset-id", "0"], "--dataset-id must be 1 to 999"),
    (["nnunet", "{src}", "{raw}", "--dataset-id", "501", "--name", "a b"], "--name must be"),
    (["nnunet", "{src}", "{raw}", "--dataset-id", "501"], "exists; pass --overwrite"),
    (["nnunet", "{src}", "{raw}", "--dataset-id", "501", "--name", "Other"], "with dataset ID 501"),
    (["nnunet", "{src}", "{src}/raw", "--dataset-id", "502"], "outside the converted folder"),
    (["monai", "{src}", "{raw}/list.txt"], "must be a .json file"),
])
def test_user_mistakes_get_one_line_and_exit_2(converted, tmp_path, capsys, args, message):
    raw = tmp_path / "raw"
    export_nnunet(converted, raw, 501)
    before = sorted(p.relative_to(raw) for p in raw.rglob("*"))
    paths = {"missing": tmp_path / "nope", "raw": raw, "src": converted}
    assert export_main([a.format(**paths) for a in args]) == 2
    error = [line for line in capsys.readouterr().err.splitlines() if line and not line.startswith("usage:")]
    assert len(error) == 1 and message in error[0], error
    assert sorted(p.relative_to(raw) for p in raw.rglob("*")) == before
    assert not (converted / "raw").exists()


def test_a_failed_export_leaves_the_previous_one_and_no_staging(tmp_path):
    source = make_converted_folder(tmp_path / "out", num_patients=4, size=32, depth=12)
    raw = tmp_path / "raw"
    export_nnunet(source, raw, 501)
    previous = (raw / "Dataset501_CARE" / "dataset.json").read_bytes()
    cases = json.loads((source / "cases.json").read_text())
    cases["P003_a"]["checksum"] = "0" * 64
    write_json_atomic(source / "cases.json", cases)
    with pytest.raises(ExportError, match="P003_a: stored slices do not match their checksum"):
        export_nnunet(source, raw, 501, overwrite=True)
    assert [p.name for p in raw.iterdir()] == ["Dataset501_CARE"]
    assert (raw / "Dataset501_CARE" / "dataset.json").read_bytes() == previous


def test_overwrite_replaces_an_export(converted, tmp_path):
    raw = tmp_path / "raw"
    export_nnunet(converted, raw, 501, num_folds=2)
    assert len(json.loads((raw / "Dataset501_CARE" / "splits_final.json").read_text())) == 2
    assert export_main(["nnunet", str(converted), str(raw), "--dataset-id", "501", "--overwrite"]) == 0
    assert len(json.loads((raw / "Dataset501_CARE" / "splits_final.json").read_text())) == 4
    assert [p.name for p in raw.iterdir()] == ["Dataset501_CARE"]
