"""Series whose slices are off a regular grid (two stacks at different gaps, gantry tilt), as ITK-SNAP reads them:
converted on ITK's grid with their true slice positions, refused by a strict profile, measured at the true
positions by HD95. The series are copies of a real GE CT series with their slices moved."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
from torch import nn

from care_dataset import files
from care_dataset.convert.pipeline import convert_dataset
from care_dataset.deid.verify import collect_identifying_values, scan_for_leaks
from care_dataset.format import layout, reader, writer
from care_dataset.raw import dicom
from care_dataset.raw.dicom import scan_dicom
from care_dataset.raw.profiles import ProfileError, load_profile, parse_profile
from moved_series import GE_SERIES, TWO_STACKS, itk_series_image, write_itk_snap_label, write_moved_series
from usam.evaluate import evaluate_split, true_positions
from usam.inference import inference_settings
from usam.metrics import SlicePositions, volume_metrics

KEY = b"test-key-not-secret"
EVEN = (5.0,) * 7
ORIENTATIONS = {"head first": (1.0, 0.0, 0.0), "mirrored rows": (-1.0, 0.0, 0.0)}  # row cosine; the second
# puts the slice normal towards the feet, so the canonical volume is flipped along z and x

needs_ge_series = pytest.mark.skipif(not GE_SERIES.is_dir(), reason="../shared/data/dcmqi_ct3slice is missing")


def profile_file(tmp_path: Path, uneven_spacing: str) -> Path:
    text = (Path(__file__).resolve().parents[1] / "conversion" / "care.toml").read_text()
    path = tmp_path / "strict.toml"
    path.write_text(text + f'\n[dicom]\nuneven_spacing = "{uneven_spacing}"\n')
    return path


def convert_one(tmp_path: Path, gaps: tuple[float, ...], tilt: float, row_cosine=(1.0, 0.0, 0.0),
                profile="care") -> tuple[Path, dict]:
    case = tmp_path / "raw" / "GE_tilted_case"
    series = case / "CT"
    paths = write_moved_series(series, gaps, tilt, row_cosine)
    write_itk_snap_label(case, series, range(2, 7))
    summary = convert_dataset(tmp_path / "raw", tmp_path / "out", load_profile(profile), KEY, True, progress=False)
    return tmp_path / "out", {"summary": summary, "paths": paths}


def true_slice_pixels(position: np.ndarray, paths: list[Path], rows: int, columns: int) -> np.ndarray:
    """The HU of the source slice whose voxel at ``position`` is one of its corners, arranged so that this corner
    is at row 0, column 0 (as the canonical volume stores it)."""
    for path in paths:
        ds = pydicom.dcmread(path)
        orientation = np.asarray(ds.ImageOrientationPatient, float)
        row, col = orientation[:3], orientation[3:]
        dy, dx = (float(v) for v in ds.PixelSpacing)  # row spacing first
        offset = position - np.asarray(ds.ImagePositionPatient, float)
        if abs(offset @ np.cross(row, col)) > 1e-3:
            continue
        i, j = offset @ row / dx, offset @ col / dy
        assert np.allclose([i, j], np.rint([i, j]), atol=1e-3) and round(i) in (0, columns - 1) \
            and round(j) in (0, rows - 1), (i, j)
        hu = ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
        return hu[:: -1 if round(j) else 1, :: -1 if round(i) else 1]
    raise AssertionError(f"no source slice holds {position}")


# ---------------------------------------------------------------- the grid ITK builds


@needs_ge_series
@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_scan_builds_itks_grid_and_keeps_the_true_positions(tmp_path, orientation):
    paths = write_moved_series(tmp_path / "CT", TWO_STACKS, 15.0, ORIENTATIONS[orientation])
    (series,) = scan_dicom(tmp_path / "CT").series
    itk = itk_series_image(tmp_path / "CT")
    # ITK: origin at the first slice along the normal, slice spacing = first-to-last distance / gaps, slice axis
    # the normal of the image plane (not the stacking direction)
    np.testing.assert_allclose(series.origin, itk.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(series.spacing, itk.GetSpacing(), rtol=1e-9)
    np.testing.assert_allclose(series.direction, itk.GetDirection(), atol=1e-6)
    grid = [itk.TransformIndexToPhysicalPoint((0, 0, k)) for k in range(len(paths))]
    true = [np.asarray(pydicom.dcmread(f).ImagePositionPatient, float) for f in series.files]
    np.testing.assert_allclose(np.asarray(grid) + series.layout.offsets, true, atol=1e-6)
    assert np.abs(series.layout.offsets).max() > 5  # the stacks and the tilt move slices by centimetres
    assert series.layout.tilt_degrees == pytest.approx(15.0, abs=1e-6)
    assert series.layout.gaps_mm == pytest.approx((4.22, 7.38), abs=1e-3)


@needs_ge_series
def test_regular_series_has_no_layout(tmp_path):
    write_moved_series(tmp_path / "CT", EVEN, 0.0)
    (series,) = scan_dicom(tmp_path / "CT").series
    assert series.layout is None


# ---------------------------------------------------------------- conversion


@needs_ge_series
@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_two_stack_tilted_series_converts_with_true_positions(tmp_path, orientation):
    out, made = convert_one(tmp_path, TWO_STACKS, 15.0, ORIENTATIONS[orientation])
    assert made["summary"].converted == 1, made["summary"].failures
    (entry,) = json.loads((out / "report.json").read_text())
    assert entry["status"] == "converted"
    assert entry["notes"] == [
        "uneven slice spacing (4.22 to 7.38 mm): stored on the regular grid ITK-SNAP shows, true slice positions "
        "in cases.json",
        "gantry tilt 15.0 degrees: slices stored unsheared on the grid ITK-SNAP shows (no resampling), true slice "
        "positions in cases.json"]
    ds = reader.open_dataset(out)
    (case_id,) = ds.case_ids()
    case = ds.cases[case_id]
    assert case["gantry_tilt_degrees"] == pytest.approx(15.0, abs=1e-3)
    assert len(case["slice_positions"]) == case["num_slices"] == 5
    image, label = ds.read_case(case_id)
    _, rows, columns = image.shape
    for p, position in enumerate(case["slice_positions"]):  # each stored slice is the source slice found there
        np.testing.assert_array_equal(image[p], true_slice_pixels(np.asarray(position), made["paths"], rows, columns))
    gaps = np.linalg.norm(np.diff(case["slice_positions"], axis=0), axis=1)
    assert gaps.max() - gaps.min() > 3  # both stacks are among the stored slices
    assert case["voxels_after"]["normal rectum"] + case["voxels_after"]["tumor"] == 5 * 60 * 60
    assert not scan_for_leaks(out, collect_identifying_values(tmp_path / "raw"))
    first = {name: (out / name).read_bytes() for name in ("report.json", "cases.json")}
    convert_dataset(tmp_path / "raw", out, load_profile("care"), KEY, True, progress=False)  # resumed: reused
    assert {name: (out / name).read_bytes() for name in first} == first


@needs_ge_series
def test_tilted_series_with_even_gaps_records_only_the_tilt(tmp_path):
    out, made = convert_one(tmp_path, EVEN, 20.0)
    assert made["summary"].converted == 1, made["summary"].failures
    (entry,) = json.loads((out / "report.json").read_text())
    assert [note.split(":")[0] for note in entry["notes"]] == ["gantry tilt 20.0 degrees"]
    (case,) = json.loads((out / "cases.json").read_text()).values()
    assert case["gantry_tilt_degrees"] == pytest.approx(20.0, abs=1e-3)
    normal = np.asarray(case["canonical"]["direction"]).reshape(3, 3)[:, 2]
    grid = np.asarray(case["canonical"]["origin"]) + np.outer(np.asarray(case["kept_slices"]) * case["spacing"][2],
                                                               normal)
    true = np.asarray(case["slice_positions"])
    # the grid stacks the slices along the tilted normal, the table moved them along z only
    assert np.ptp(grid[:, 1]) > 5 and np.ptp(true[:, 1]) < 1e-3 and np.ptp(true[:, 0]) < 1e-3
    steps = np.diff(true, axis=0)[:, 2] / np.diff(case["kept_slices"])
    np.testing.assert_allclose(steps, 5.0 / math.cos(math.radians(20.0)), atol=1e-3)


@needs_ge_series
def test_regular_series_records_nothing_new(tmp_path):
    out, made = convert_one(tmp_path, EVEN, 0.0)
    assert made["summary"].converted == 1, made["summary"].failures
    (entry,) = json.loads((out / "report.json").read_text())
    assert set(entry) == {"case_id", "status", "reason"}
    (case,) = json.loads((out / "cases.json").read_text()).values()
    assert set(case) == {"num_slices", "kept_slices", "canonical", "spacing", "original", "voxels_before",
                         "voxels_after", "checksum", "split", "slice_selection"}


@needs_ge_series
def test_strict_profile_refuses_the_series_with_the_reason(tmp_path):
    out, made = convert_one(tmp_path, TWO_STACKS, 15.0, profile=profile_file(tmp_path, "refuse"))
    assert made["summary"].failed == 1
    (entry,) = json.loads((out / "report.json").read_text())
    assert entry["status"] == "failed"
    assert entry["reason"] == ("no usable axial image series among 8 DICOM files (1 series with uneven slice "
                               "spacing, refused by the profile's uneven_spacing setting)")


def test_profile_key_is_checked():
    base = {"classes": {"names": ["background", "rectum"]}}
    assert parse_profile(base).uneven_spacing == "accept"
    assert parse_profile({**base, "dicom": {"uneven_spacing": "refuse"}}).uneven_spacing == "refuse"
    with pytest.raises(ProfileError, match=r"\[dicom\] uneven_spacing must be 'accept' or 'refuse', not 'strict'"):
        parse_profile({**base, "dicom": {"uneven_spacing": "strict"}})


# ---------------------------------------------------------------- HD95 at the true positions


def stacked_positions(gaps: list[float], spacing=(1.0, 1.0)) -> SlicePositions:
    """Axial slices (identity direction) at z = cumulative ``gaps``; one voxel is ``spacing`` (x, y) mm."""
    z = np.concatenate([[0.0], np.cumsum(gaps)])
    origins = np.column_stack([np.zeros_like(z), np.zeros_like(z), z])
    return SlicePositions(origins, row_step=np.array([0, spacing[1], 0.0]), column_step=np.array([spacing[0], 0, 0.0]),
                          slice_step=np.array([0, 0, float(np.mean(gaps))]))


def prism(slices: int, depth: int, size: int = 40) -> np.ndarray:
    mask = np.zeros((depth, size, size), np.uint8)
    mask[:slices, 10:30, 10:30] = 1
    return mask


def test_hd95_at_true_positions_equals_the_grid_hd95_for_an_even_series():
    rng = np.random.default_rng(4)
    truth = prism(4, 6)
    pred = truth.copy()
    pred[1:5, 12:33, 8:27] = 1
    pred[rng.random(pred.shape) < 0.01] = 1
    grid = volume_metrics(pred, truth, 2, spacing=(2.5, 0.8, 0.7))
    at_positions = volume_metrics(pred, truth, 2, spacing=(2.5, 0.8, 0.7),
                                  positions=stacked_positions([2.5] * 5, spacing=(0.7, 0.8)))
    for metric in ("hd95", "hd100", "hd95_penalised"):
        assert at_positions[metric][1] == pytest.approx(grid[metric][1], rel=1e-12), metric
    empty = volume_metrics(np.zeros_like(truth), truth, 2, spacing=(2.5, 0.8, 0.7),
                           positions=stacked_positions([2.5] * 5, spacing=(0.7, 0.8)))
    assert empty["hd95_penalised"][1] == pytest.approx(
        volume_metrics(np.zeros_like(truth), truth, 2, spacing=(2.5, 0.8, 0.7))["hd95_penalised"][1], rel=1e-12)


def test_hd95_uses_the_true_gap_of_a_two_stack_series():
    truth, pred = prism(4, 5), prism(5, 5)  # the prediction reaches one slice further, into the wide stack
    gaps = [2.0, 2.0, 2.0, 6.0]  # the grid's spacing is their mean, 3 mm
    grid = volume_metrics(pred, truth, 2, spacing=(3.0, 1.0, 1.0))
    true = volume_metrics(pred, truth, 2, spacing=(3.0, 1.0, 1.0), positions=stacked_positions(gaps))
    assert grid["hd95"][1] == pytest.approx(3.0) and true["hd95"][1] == pytest.approx(6.0)
    assert true["hd100"][1] == pytest.approx(6.0)
    missed = volume_metrics(np.zeros_like(truth), truth, 2, spacing=(3.0, 1.0, 1.0), positions=stacked_positions(gaps))
    assert missed["hd95_penalised"][1] == pytest.approx(math.sqrt((12 + 3) ** 2 + 40**2 + 40**2))


class ExtendingModel(nn.Module):
    """Predicts class 1 on the first slice's square on every slice, labelled or not."""

    def __init__(self, square: np.ndarray):
        super().__init__()
        self.logits = torch.nn.functional.one_hot(torch.from_numpy(square).long(), 3).permute(2, 0, 1).float() * 10
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, images, points=None, point_labels=None):
        return self.logits.expand(len(images), -1, -1, -1)


def test_usam_eval_measures_at_the_true_positions(tmp_path):
    root = tmp_path / "converted"
    truth = np.zeros((5, 224, 224), np.uint8)
    truth[:4, 100:130, 90:120] = 1
    image = np.where(truth > 0, 40, -1000).astype(np.int16)
    writer.init_store(root, "zarr")
    direction = [1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0]
    cases = {}
    for case_id, positions in (("care_000000000001", None), ("care_000000000002", [0, 2, 4, 6, 12])):
        writer.write_case(root, "zarr", case_id, image, truth)
        canonical = {"size": [224, 224, 5], "spacing": [1.0, 1.0, 3.0], "origin": [0.0, 0.0, 0.0],
                     "direction": direction}
        cases[case_id] = {"split": "test", "num_slices": 5, "kept_slices": [0, 1, 2, 3, 4], "canonical": canonical,
                          "spacing": canonical["spacing"], "original": {**canonical, "orientation": "LPS"}}
        if positions is not None:
            cases[case_id]["slice_positions"] = [[0.0, 0.0, z] for z in positions]
    files.write_json_atomic(root / "dataset.json", {"format": layout.FORMAT_NAME,
                                                    "format_version": layout.FORMAT_VERSION, "storage": "zarr",
                                                    "classes": ["background", "normal rectum", "tumor"]})
    files.write_json_atomic(root / "cases.json", cases)
    files.write_json_atomic(root / "splits.json", {"seed": 0, "strategy": "patient", "test": sorted(cases)})
    settings = inference_settings({"model": {"num_classes": 3, "img_size": 224, "points_per_class": 3},
                                   "class_names": ["background", "normal rectum", "tumor"],
                                   "window": [-125.0, 275.0]})
    dataset = reader.open_dataset(root)
    # the prediction reaches slice 4, which holds no label: scored over the whole scan
    evaluation = evaluate_split(ExtendingModel(truth[0]), settings, dataset, "test", 0, batch_size=5, volume="full")
    by_id = {case.case_id: case for case in evaluation.cases}
    assert by_id["care_000000000001"].hd95[1] == pytest.approx(3.0)  # the grid's spacing
    assert by_id["care_000000000002"].hd95[1] == pytest.approx(6.0)  # the true gap from slice 3 to slice 4
    geometry = dataset.cases["care_000000000002"]
    np.testing.assert_array_equal(true_positions(geometry, np.arange(5)).origins[:, 2], [0, 2, 4, 6, 12])
    assert true_positions(dataset.cases["care_000000000001"], np.arange(5)) is None


@needs_ge_series
def test_simpleitk_reads_the_moved_series_alike_and_quietly(tmp_path, capfd):
    write_moved_series(tmp_path / "CT", TWO_STACKS, 15.0)
    (series,) = scan_dicom(tmp_path / "CT").series
    by_simpleitk = dicom._read_with_simpleitk(series)  # the reader of compressed series
    assert "nonuniformity" not in capfd.readouterr().err  # the layout's note says it, without ITK's pointers
    by_pydicom = dicom.read_series_int16(series)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(by_simpleitk), sitk.GetArrayViewFromImage(by_pydicom))
    for get in ("GetOrigin", "GetSpacing", "GetDirection"):
        np.testing.assert_allclose(getattr(by_simpleitk, get)(), getattr(by_pydicom, get)(), atol=1e-6)
