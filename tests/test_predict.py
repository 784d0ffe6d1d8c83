"""`usam predict`: output on exactly the input grid, clicks landing on the right slice and pixel."""

from __future__ import annotations

import argparse
import gzip
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
from torch import nn

from care_dataset.convert.case import load_case
from care_dataset.raw.discover import discover_cases
from care_dataset.raw.image import to_canonical
from care_dataset.raw.profiles import load_profile
from care_dataset.synth import raw_export as synth
from usam.cli import add_predict_arguments
from usam.data import preprocess_slices
from usam.inference import inference_settings, model_input
from usam.models.checkpoints import save_checkpoint
from usam.models.registry import create_model
from usam.outputs import label_description_path
from usam.predict import (
    predict_volume,
    read_image,
    run_predict,
)

CLASSES = ["background", "normal rectum", "tumor"]
WINDOW = [-125.0, 275.0]
HU_OF_CLASS = np.array([-500, 100, 250], np.int16)  # windowed to 0, 0.5625, 0.9375
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
# Axis i points inferior, j to the patient's right, k posterior: canonical (LPS) column = flipped j,
# row = k, slice = flipped i.
DIRECTION = (0.0, -1.0, 0.0, 0.0, 0.0, 1.0, -1.0, 0.0, 0.0)


def _config(points_per_class=3):
    return {"model": {"name": "stub", "num_classes": 3, "img_size": 224, "points_per_class": points_per_class},
            "class_names": CLASSES, "window": WINDOW}


class ThresholdModel(nn.Module):
    """Labels each pixel with the class whose windowed intensity is nearest; records what it saw."""

    def __init__(self):
        super().__init__()
        self.centres = torch.tensor((HU_OF_CLASS.astype(np.float32) - WINDOW[0]) / (WINDOW[1] - WINDOW[0])).clamp(0, 1)
        self.seen = []

    def forward(self, images, points=None, point_labels=None):
        self.seen.append((images.clone(), points, point_labels))
        return -100 * (images - self.centres.view(1, -1, 1, 1)) ** 2


def _image(size, spacing=(2.5, 0.7, 0.8), origin=(-12.5, 80.0, -40.0), seed=0):
    """An asymmetric label volume and its CT (HU per class) in ITK index order (i, j, k)."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(size[::-1], np.uint8)  # numpy (k, j, i)
    nk, nj, ni = labels.shape
    labels[nk // 4:nk // 2, nj // 5:nj // 2, 1:] = 1
    labels[nk // 3:nk // 2, nj // 4:nj // 3, 2:ni - 1] = 2
    labels[(rng.random(labels.shape) < 0.01)] = 1
    image = sitk.GetImageFromArray(HU_OF_CLASS[labels])
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(DIRECTION)
    return image, labels


def test_output_is_on_the_input_grid_exactly_and_nibabel_agrees(tmp_path):
    image, labels = _image((5, 224, 224))  # canonical slices are 224 x 224: resizing is the identity
    model = ThresholdModel()
    result = predict_volume(model, _config(), image, batch_size=2)
    assert len(model.seen) == 3 and sum(len(s[0]) for s in model.seen) == 5  # every axial slice, batched
    assert result.GetPixelID() == sitk.sitkUInt8
    assert result.GetSize() == image.GetSize() and result.GetSpacing() == image.GetSpacing()
    assert result.GetOrigin() == image.GetOrigin() and result.GetDirection() == image.GetDirection()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(result), labels)

    path = tmp_path / "pred.nii.gz"
    sitk.WriteImage(result, str(path))
    back = sitk.ReadImage(str(path))
    assert back.GetSize() == image.GetSize()
    np.testing.assert_allclose(back.GetDirection(), DIRECTION, atol=1e-6)
    np.testing.assert_allclose(back.GetOrigin(), image.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(back.GetSpacing(), image.GetSpacing(), atol=1e-6)
    nifti = nib.load(str(path))
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    direction = np.array(DIRECTION).reshape(3, 3)
    np.testing.assert_allclose(nifti.affine[:3, :3], lps_to_ras @ direction @ np.diag(image.GetSpacing()), atol=1e-5)
    np.testing.assert_allclose(nifti.affine[:3, 3], lps_to_ras @ np.array(image.GetOrigin()), atol=1e-4)
    np.testing.assert_array_equal(np.asarray(nifti.dataobj), labels.transpose(2, 1, 0))


def _marked_volume(marker_index):
    size = (6, 40, 30)  # canonical W = 40 (j), H = 30 (k), 6 slices (i)
    image = sitk.Image(size, sitk.sitkInt16)
    image += -100
    image[marker_index] = 275
    image.SetSpacing((3.0, 0.9, 1.1))
    image.SetOrigin((5.0, -20.0, 31.0))
    image.SetDirection(DIRECTION)
    return image


@pytest.mark.parametrize("coordinates", ["voxel", "itksnap", "world"])
def test_click_lands_on_its_canonical_slice_and_model_pixel(coordinates):
    marker = (4, 7, 21)
    image = _marked_volume(marker)
    position = {
        "voxel": list(marker),
        "itksnap": [v + 1 for v in marker],  # ITK-SNAP shows voxel coordinates from 1
        "world": list(image.TransformIndexToPhysicalPoint(marker)),
    }[coordinates]
    model = ThresholdModel()
    points = {"coordinates": coordinates, "points": [{"class": "tumor", "position": position}]}
    result = predict_volume(model, _config(points_per_class=2), image, points=points)
    assert len(model.seen) == 1
    images, p, labels = model.seen[0]
    assert images.shape[0] == 1  # only the clicked slice runs

    canonical = sitk.GetArrayFromImage(sitk.DICOMOrient(image, "LPS"))  # (slice, row, column)
    (slice_, row, column), = np.argwhere(canonical == 275)
    height, width = canonical.shape[1:]
    assert labels[0].tolist() == [-1, -1, 1, -1]  # tumour's first slot; the rest padding
    x, y = p[0, 2].tolist()
    assert x == pytest.approx((column + 0.5) * 224 / width - 0.5, abs=1e-4)
    assert y == pytest.approx((row + 0.5) * 224 / height - 0.5, abs=1e-4)
    # the clicked pixel is where the marker shows in the model's input
    shown = images[0, 0]
    assert float(shown[round(y), round(x)]) == pytest.approx(float(shown.max()), rel=0.05)
    # unclicked slices stay background; the clicked one holds the marker's prediction
    out = sitk.GetArrayFromImage(result)  # (k, j, i)
    assert out[:, :, [i for i in range(6) if i != marker[0]]].max() == 0
    assert np.array_equal(np.flatnonzero(canonical.reshape(6, -1).max(1) == 275), [slice_])


def test_points_that_do_not_fit_are_rejected():
    image = _marked_volume((1, 1, 1))
    config = _config(points_per_class=1)
    too_many = {"coordinates": "voxel", "points": [{"class": 1, "position": [2, 3, 4]},
                                                   {"class": "Normal Rectum", "position": [2, 5, 5]}]}
    with pytest.raises(ValueError, match="more than 1 points"):
        predict_volume(ThresholdModel(), config, image, points=too_many)
    outside = {"coordinates": "voxel", "points": [{"class": 2, "position": [6, 0, 0]}]}
    with pytest.raises(ValueError, match=r"point 0: voxel \(6, 0, 0\) outside the image \(0\.\.5, 0\.\.39, 0\.\.29\)"):
        predict_volume(ThresholdModel(), config, image, points=outside)
    unknown = {"coordinates": "voxel", "points": [{"class": "liver", "position": [1, 1, 1]}]}
    with pytest.raises(ValueError, match="not one of"):
        predict_volume(ThresholdModel(), config, image, points=unknown)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model("usam_tiny", num_classes=3, img_size=64, vit_window_size=4, points_per_class=3)
    return save_checkpoint(model, tmp_path_factory.mktemp("run") / "best", {"class_names": CLASSES, "window": WINDOW})


def _predict_args(*argv):
    parser = argparse.ArgumentParser()
    add_predict_arguments(parser)
    return parser.parse_args(list(argv))


def test_cli_writes_labels_description_and_overlays(tmp_path, tiny_checkpoint):
    image, _ = _image((4, 50, 60))
    source = tmp_path / "ct.nrrd"
    sitk.WriteImage(image, str(source))
    points = tmp_path / "clicks.json"
    points.write_text('{"coordinates": "voxel", "points": [{"class": "normal rectum", "position": [1, 20, 20]},'
                      ' {"class": 2, "position": [2, 14, 16]}]}')
    out = tmp_path / "out" / "pred.nii.gz"
    code = run_predict(_predict_args("--checkpoint", str(tiny_checkpoint), "--image", str(source), "--points",
                                     str(points), "--out", str(out), "--overlays", str(tmp_path / "png"),
                                     "--device", "cpu"))
    assert code == 0
    result = sitk.ReadImage(str(out))
    assert result.GetSize() == image.GetSize() and result.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_allclose(result.GetDirection(), image.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(result.GetOrigin(), image.GetOrigin(), atol=1e-4)
    array = sitk.GetArrayFromImage(result)
    assert set(np.unique(array)) <= {0, 1, 2}
    assert array[:, :, [0, 3]].max() == 0  # slices i = 0 and 3 hold no click and are not run
    description = label_description_path(out)
    assert description.name == "pred_labels.txt"
    rows = [line.split(None, 7) for line in description.read_text().splitlines() if not line.startswith("#")]
    assert [(int(r[0]), r[7].strip('"')) for r in rows] == [(0, "Clear Label"), (1, "normal rectum"), (2, "tumor")]
    assert all(len(r) == 8 and 0.0 <= float(r[4]) <= 1.0 for r in rows)
    pngs = sorted((tmp_path / "png").glob("*.png"))
    assert len(pngs) == int((array.max(axis=(0, 1)) > 0).sum())  # one per axial slice holding labels
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary file or folder left


def test_cli_bad_input_one_line_and_no_output(tmp_path, tiny_checkpoint, capsys):
    image, _ = _image((3, 20, 20))
    source = tmp_path / "ct.nii.gz"
    sitk.WriteImage(image, str(source))
    bad_points = tmp_path / "bad.json"
    bad_points.write_text('{"coordinates": "pixels", "points": []}')
    out = tmp_path / "pred.nii.gz"
    for argv, reason in [
        (("--image", str(tmp_path / "nothing.nii.gz")), "no such file or folder"),
        (("--image", str(source), "--points", str(bad_points)), "'coordinates' must be one of"),
        (("--image", str(tmp_path)), "no DICOM files"),
    ]:
        assert run_predict(_predict_args("--checkpoint", str(tiny_checkpoint), "--out", str(out), *argv)) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("usam predict: ") and reason in err and "\n" not in err
    assert not out.exists()


def test_dicom_folder_keeps_its_grid_and_leaks_no_header_value(tmp_path, tiny_checkpoint):
    folder = SHARED / "dcmqi_ct3slice" / "ct-3slice"
    if not folder.is_dir():
        pytest.skip(f"real DICOM test data not found at {folder}")

    image = read_image(folder)
    assert image.GetSize() == (512, 512, 3)
    out = tmp_path / "pred.nii.gz"
    assert run_predict(_predict_args("--checkpoint", str(tiny_checkpoint), "--image", str(folder),
                                     "--out", str(out), "--device", "cpu", "--batch-size", "2")) == 0
    result = sitk.ReadImage(str(out))
    assert result.GetSize() == image.GetSize()
    np.testing.assert_allclose(result.GetSpacing(), image.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(result.GetOrigin(), image.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(result.GetDirection(), image.GetDirection(), atol=1e-6)
    header = pydicom.dcmread(sorted(folder.iterdir())[0], stop_before_pixels=True)
    raw = gzip.decompress(out.read_bytes())
    for value in (str(header.PatientName), str(header.PatientID), str(header.StudyInstanceUID)):
        if value:
            assert value.encode() not in raw


def test_device_side_preprocessing_equals_the_training_preprocessing():

    hu = np.random.default_rng(5).integers(-1200, 1500, (3, 97, 131)).astype(np.int16)
    settings = inference_settings(_config())
    torch.testing.assert_close(model_input(hu, settings, torch.device("cpu")),
                               preprocess_slices(hu, tuple(WINDOW), 224), rtol=0, atol=0)


def test_nested_hospital_export_folders_read_the_same_series_as_the_converter(tmp_path):
    """A case folder as exported (nested folders, localizer, second series, compressed syntaxes, label files
    beside the DICOM): predict reads the CT series care-convert would choose, voxel for voxel."""

    synth.write_raw_dataset(tmp_path / "raw", cases=6, seed=3, size=64, slices=10, messy=True)
    profile = load_profile("care")
    for raw_case in discover_cases(tmp_path / "raw", profile):
        expected = load_case(raw_case, profile).image
        got = to_canonical(read_image(raw_case.root))
        assert got.GetSize() == expected.GetSize()
        np.testing.assert_allclose(got.GetOrigin(), expected.GetOrigin(), atol=1e-3)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(got), sitk.GetArrayFromImage(expected))


# ---------------------------------------------------------------- the user's own coordinates (z flipped)

FLIPPED_Z = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0)  # slice k grows towards the feet: canonical = 5 - k


def _flipped_volume(tumour_slices=(), size=(40, 30, 6)):
    """A CT (i, j, k) with z flipped; a tumour-valued block on each input slice k in `tumour_slices`."""
    ni, nj, nk = size
    hu = np.full((nk, nj, ni), -100, np.int16)  # numpy (k, j, i)
    for k in tumour_slices:
        hu[k, 10:20, 5 + 3 * k:15 + 3 * k] = HU_OF_CLASS[2]
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing((0.8, 0.8, 3.0))
    image.SetOrigin((-20.0, 10.0, 60.0))
    image.SetDirection(FLIPPED_Z)
    return image


@pytest.mark.parametrize(
    "coordinates, position, message",
    [
        ("voxel", [20, 15, 6], r"point 0: voxel \(20, 15, 6\) outside the image \(0\.\.39, 0\.\.29, 0\.\.5\)$"),
        ("itksnap", [21, 16, 0],
         r"point 0: ITK-SNAP voxel \(21, 16, 0\) outside the image \(1\.\.40, 1\.\.30, 1\.\.6\)$"),
        ("world", [-4.0, 22.0, 69.0], r"point 0: world \(-4, 22, 69\) mm is voxel \(20, 15, -3\), outside the image"),
    ],
)
def test_points_outside_are_reported_in_the_users_coordinates(coordinates, position, message):
    image = _flipped_volume()
    points = {"coordinates": coordinates, "points": [{"class": "tumor", "position": position}]}
    with pytest.raises(ValueError, match=message):
        predict_volume(ThresholdModel(), _config(points_per_class=1), image, points=points)


def test_too_many_points_name_the_users_slice():
    image = _flipped_volume()
    points = {"coordinates": "voxel",
              "points": [{"class": 2, "position": [3, 3, 1]}, {"class": 2, "position": [9, 9, 1]}]}
    with pytest.raises(ValueError, match=r"on axial slice k=1 \(0-based"):
        predict_volume(ThresholdModel(), _config(points_per_class=1), image, points=points)


@pytest.fixture
def threshold_model(monkeypatch):
    """`usam predict` with the thresholding stand-in instead of a trained checkpoint."""
    monkeypatch.setattr("usam.predict.load_checkpoint", lambda *a, **k: (ThresholdModel(), _config()))


def _run(tmp_path, image, out, *argv):
    source = tmp_path / "ct.nii.gz"
    sitk.WriteImage(image, str(source))
    return run_predict(_predict_args("--checkpoint", str(tmp_path / "best"), "--image", str(source), "--out",
                                     str(out), "--device", "cpu", *argv))


def test_overlays_are_named_by_the_inputs_slice_and_replace_the_previous_run(tmp_path, threshold_model, capsys):
    folder = tmp_path / "png"
    out = tmp_path / "pred.nii.gz"
    assert _run(tmp_path, _flipped_volume(tumour_slices=[1]), out, "--overlays", str(folder)) == 0
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))  # (k, j, i) of the input
    assert np.flatnonzero(labels.reshape(6, -1).any(axis=1)).tolist() == [1]
    assert sorted(p.name for p in folder.glob("*.png")) == ["slice_k0001.png"]  # canonical index would be 4

    # a second run into the same folder: only its own overlays remain
    assert _run(tmp_path, _flipped_volume(tumour_slices=[0, 4]), out, "--overlays", str(folder)) == 0
    assert sorted(p.name for p in folder.glob("*.png")) == ["slice_k0000.png", "slice_k0004.png"]
    capsys.readouterr()

    # nothing predicted: one line says so, and no stale overlay is left
    assert _run(tmp_path, _flipped_volume(), out, "--overlays", str(folder)) == 0
    said = [line for line in capsys.readouterr().err.splitlines() if line.strip().startswith("overlays:")]
    assert len(said) == 1 and "nothing to draw (no foreground predicted)" in said[0] and str(folder) in said[0]
    assert folder.is_dir() and not list(folder.glob("*.png"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_overlay_folder_holding_other_files_is_refused_before_any_work(tmp_path, threshold_model, capsys):
    folder = tmp_path / "png"
    folder.mkdir()
    mine = folder / "notes.txt"
    mine.write_text("keep me")
    out = tmp_path / "pred.nii.gz"
    code = run_predict(_predict_args("--checkpoint", str(tmp_path / "best"), "--image", str(tmp_path / "absent.nii"),
                                     "--out", str(out), "--overlays", str(folder)))
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and str(folder) in err and "did not write" in err
    assert mine.read_text() == "keep me" and sorted(folder.iterdir()) == [mine] and not out.exists()


@pytest.mark.parametrize("case", ["holds the output", "is the current folder", "symbolic link"])
def test_overlay_folder_that_cannot_be_swapped_is_refused_before_any_work(tmp_path, threshold_model, capsys,
                                                                          monkeypatch, case):
    image = tmp_path / "absent.nii"  # never read: the refusal comes first
    if case == "holds the output":
        folder, out = tmp_path / "png", tmp_path / "png" / "pred.nii.gz"
    elif case == "is the current folder":
        monkeypatch.chdir(tmp_path)
        folder, out = Path("."), Path("pred.nii.gz")
    else:
        (tmp_path / "real").mkdir()
        (tmp_path / "png").symlink_to(tmp_path / "real")
        folder, out = tmp_path / "png", tmp_path / "pred.nii.gz"
    before = sorted(p.name for p in tmp_path.iterdir())
    code = run_predict(_predict_args("--checkpoint", str(tmp_path / "best"), "--image", str(image),
                                     "--out", str(out), "--overlays", str(folder)))
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "--overlays" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_overlay_folder_is_as_readable_as_any_folder(tmp_path, threshold_model):
    folder = tmp_path / "png"
    assert _run(tmp_path, _flipped_volume(tumour_slices=[1]), tmp_path / "pred.nii.gz", "--overlays", str(folder)) == 0
    umask = os.umask(0)
    os.umask(umask)
    assert folder.stat().st_mode & 0o777 == 0o777 & ~umask


@pytest.mark.parametrize(
    "out, reason",
    [
        ("pred.xyz", "end it with one of"),
        ("pred.png", "end it with one of"),
        ("afile/pred.nii.gz", "is a file, not a folder"),
        ("afile/sub/pred.nii.gz", "is a file, not a folder"),
        ("outdir", "is an existing folder"),
        ("outdir.nii.gz", "is an existing folder"),
    ],
)
def test_bad_out_is_refused_in_one_line_before_reading_anything(tmp_path, out, reason, capsys):
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "outdir").mkdir()
    (tmp_path / "outdir.nii.gz").mkdir()
    before = sorted(tmp_path.rglob("*"))
    # the image does not exist: the --out problem must be found first
    code = run_predict(_predict_args("--checkpoint", str(tmp_path / "none"), "--image", str(tmp_path / "absent.nii"),
                                     "--out", str(tmp_path / out)))
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("usam predict: --out ") and "\n" not in err
    assert str(tmp_path / out) in err and reason in err
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.parametrize("extension", [".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"])
def test_every_accepted_extension_writes_a_volume_on_the_input_grid(tmp_path, threshold_model, extension):
    image = _flipped_volume(tumour_slices=[2])
    out = tmp_path / "out" / f"pred{extension}"
    assert _run(tmp_path, image, out) == 0
    result = sitk.ReadImage(str(out))
    assert result.GetSize() == image.GetSize() and result.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_allclose(result.GetDirection(), FLIPPED_Z, atol=1e-6)
    np.testing.assert_allclose(result.GetOrigin(), image.GetOrigin(), atol=1e-4)
    expected = (sitk.GetArrayFromImage(image) == HU_OF_CLASS[2]).astype(np.uint8) * 2
    np.testing.assert_array_equal(sitk.GetArrayFromImage(result), expected)
    assert (out.parent / "pred_labels.txt").is_file()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


def test_a_failed_write_is_one_line_and_leaves_nothing(tmp_path, threshold_model, monkeypatch, capsys):
    old = tmp_path / "pred.nii.gz"
    old.write_bytes(b"earlier result")
    real_write = sitk.WriteImage

    def disk_full(image, path, *args, **kwargs):
        real_write(image, path, *args, **kwargs)
        Path(path).write_bytes(Path(path).read_bytes()[:40])  # a truncated file, as a full disk leaves
        raise RuntimeError("ITK ERROR: NiftiImageIO: Could not write file\nNo space left on device")

    source = tmp_path / "ct.nii.gz"
    sitk.WriteImage(_flipped_volume(tumour_slices=[2]), str(source))
    monkeypatch.setattr(sitk, "WriteImage", disk_full)
    for out in (old, tmp_path / "new" / "deeper" / "pred.nii.gz"):
        before = sorted(tmp_path.rglob("*"))
        code = run_predict(_predict_args("--checkpoint", str(tmp_path / "best"), "--image", str(source),
                                         "--out", str(out), "--device", "cpu"))
        err = capsys.readouterr().err.strip()
        assert code == 2 and "\n" not in err
        assert err == f"usam predict: --out {out}: could not write (No space left on device)"
        assert sorted(tmp_path.rglob("*")) == before  # no temporary file, no new folder
    assert old.read_bytes() == b"earlier result"


def _nifti_copy(tmp_path, name, edit):
    """The flipped test volume as NIfTI, its header or bytes changed by `edit(nibabel image) -> image | bytes`."""
    source = tmp_path / "source.nii"
    sitk.WriteImage(_flipped_volume(tumour_slices=[2]), str(source))
    changed = edit(nib.load(source))
    path = tmp_path / name
    if isinstance(changed, bytes):
        path.write_bytes(changed)
    else:
        nib.save(changed, path)
    return path


def _qform_moved(image, shift_mm):
    image = nib.Nifti1Image(np.asarray(image.dataobj), image.affine, image.header)
    qform = image.affine.copy()
    qform[0, 3] += shift_mm
    image.set_qform(qform, code=1)
    image.set_sform(image.affine, code=2)
    return image


@pytest.mark.parametrize("case, reason", [
    ("truncated.nii", "truncated NIfTI"),
    ("truncated.nii.gz", "truncated NIfTI"),
    ("disagreeing.nii.gz", "qform (code 1) and sform (code 2) place the volume up to 30.00 mm apart"),
])
def test_a_nifti_simpleitk_would_misread_is_refused(tmp_path, threshold_model, case, reason, capsys):
    if case == "truncated.nii":
        source = _nifti_copy(tmp_path, case, lambda image: image.get_filename() and
                             Path(image.get_filename()).read_bytes()[:-500])
    elif case == "truncated.nii.gz":  # the header and the first slices are intact
        source = _nifti_copy(tmp_path, case, lambda image: gzip.compress(
            Path(image.get_filename()).read_bytes(), compresslevel=0)[:2000])
    else:
        source = _nifti_copy(tmp_path, case, lambda image: _qform_moved(image, 30.0))
    out = tmp_path / "pred.nii.gz"
    code = run_predict(_predict_args("--checkpoint", str(tmp_path / "best"), "--image", str(source),
                                     "--out", str(out), "--device", "cpu"))
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and err.startswith(f"usam predict: {source}: ") and reason in err
    assert not out.exists()


def test_qform_and_sform_that_agree_within_rounding_are_read(tmp_path, threshold_model):
    source = _nifti_copy(tmp_path, "agreeing.nii.gz", lambda image: _qform_moved(image, 0.001))
    assert _run(tmp_path, sitk.ReadImage(str(source)), tmp_path / "pred.nii.gz") == 0


def test_points_file_errors_name_the_file_and_the_point(tmp_path, threshold_model, capsys):
    points = tmp_path / "clicks.json"
    out = tmp_path / "pred.nii.gz"
    for classes, reason in [
        (["normal rectum", "liver"], "point 1: class 'liver': not one of normal rectum, tumor"),
        ([1, 3], "point 1: class 3: label values are 1..2 (normal rectum, tumor)"),
    ]:
        points.write_text(json.dumps({"coordinates": "voxel", "points": [
            {"class": c, "position": [3, 3, 1 + n]} for n, c in enumerate(classes)]}))
        assert _run(tmp_path, _flipped_volume(), out, "--points", str(points)) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"usam predict: {points}: {reason}"
    # label values written as JSON floats or strings name the same class as the integer
    for value in (2, 2.0, "2", "Tumor"):
        points.write_text(json.dumps({"coordinates": "voxel", "points": [{"class": value, "position": [3, 3, 1]}]}))
        assert _run(tmp_path, _flipped_volume(tumour_slices=[1]), out, "--points", str(points)) == 0
    assert _run(tmp_path, _flipped_volume(), out, "--points", str(tmp_path)) == 2  # a folder
    assert "cannot read the points file" in capsys.readouterr().err


@pytest.mark.parametrize("argv, reason", [
    (("--device", "gpu"), "--device 'gpu': not a device"),
    (("--device", "meta"), "--device 'meta': give auto, cpu, cuda or cuda:N"),
    (("--out-name", ".nii.gz"), "give the file a name before its extension"),
])
def test_bad_device_and_nameless_out_are_one_line(tmp_path, threshold_model, argv, reason, capsys):
    out = tmp_path / "pred.nii.gz"
    if argv[0] == "--out-name":
        out, argv = tmp_path / argv[1], ()
    code = run_predict(_predict_args("--checkpoint", str(tmp_path / "best"), "--image", str(tmp_path / "absent.nii"),
                                     "--out", str(out), *argv))
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and reason in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_one_dicom_file_is_refused_and_a_dicom_folder_says_which_series_it_read(tmp_path, threshold_model, capsys):
    folder = SHARED / "dcmqi_ct3slice" / "ct-3slice"
    if not folder.is_dir():
        pytest.skip(f"real DICOM test data not found at {folder}")
    out = tmp_path / "pred.nii.gz"
    one_file = sorted(folder.iterdir())[0]
    code = run_predict(_predict_args("--checkpoint", str(tmp_path / "best"), "--image", str(one_file),
                                     "--out", str(out), "--device", "cpu"))
    assert code == 2 and "one DICOM file; give the folder that holds its series" in capsys.readouterr().err
    code = run_predict(_predict_args("--checkpoint", str(tmp_path / "best"), "--image", str(folder),
                                     "--out", str(out), "--device", "cpu"))
    err = capsys.readouterr().err
    assert code == 0 and "usam predict: read the CT series" in err and "(3 slices)" in err
    assert "set aside" not in err  # the folder holds one series


def test_8_bit_volumes_are_read_with_a_note(tmp_path, threshold_model):
    notes = []
    source = tmp_path / "u8.nii.gz"
    sitk.WriteImage(sitk.Cast(_flipped_volume() > 0, sitk.sitkUInt8), str(source))
    read_image(source, notes)
    assert len(notes) == 1 and "8-bit voxels read as HU" in notes[0]
    notes = []
    read_image(_nifti_copy(tmp_path, "int16.nii.gz", lambda image: image), notes)
    assert notes == []


def test_a_failed_overlay_write_leaves_no_label_volume_either(tmp_path, threshold_model, monkeypatch, capsys):
    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("usam.overlays.save_slice_overlays", no_space)
    out = tmp_path / "pred.nii.gz"
    assert _run(tmp_path, _flipped_volume(tumour_slices=[2]), out, "--overlays", str(tmp_path / "png")) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"usam predict: --overlays {tmp_path / 'png'}: could not write (No space left on device)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz"]
