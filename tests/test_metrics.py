"""Metrics against hand-computed values, brute-force references and SimpleITK."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy.spatial.distance import cdist

from usam.metrics import (
    confusion_matrix,
    dice_from_confusion,
    field_of_view_diagonal,
    foreground_mean,
    hausdorff_distance,
    iou_from_confusion,
    summarize,
    volume_metrics,
)


def _box(shape, lo, hi):
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return mask


def _sitk_hausdorff(a: np.ndarray, b: np.ndarray, spacing_zyx) -> float:
    images = []
    for mask in (a, b):
        image = sitk.GetImageFromArray(mask.astype(np.uint8))
        image.SetSpacing(tuple(float(s) for s in reversed(spacing_zyx)))
        images.append(image)
    hd = sitk.HausdorffDistanceImageFilter()
    hd.Execute(images[0], images[1])
    return hd.GetHausdorffDistance()


def _brute_force_hd(a: np.ndarray, b: np.ndarray, spacing, percentile: float) -> float:
    """Surface points by explicit neighbour checks, all-pairs distances in mm."""

    def surface_points(mask):
        padded = np.pad(mask, 1)
        inside = padded[1:-1, 1:-1, 1:-1]
        all_neighbours_in = np.ones_like(inside)
        for axis in range(3):
            for step in (-1, 1):
                all_neighbours_in &= np.roll(padded, step, axis=axis)[1:-1, 1:-1, 1:-1]
        return np.argwhere(inside & ~all_neighbours_in) * np.asarray(spacing, dtype=float)

    pa, pb = surface_points(a), surface_points(b)
    d = cdist(pa, pb)
    return max(np.percentile(d.min(axis=1), percentile), np.percentile(d.min(axis=0), percentile))


def test_dice_iou_of_shifted_squares_by_hand():
    truth = np.zeros((10, 10), np.uint8)
    pred = np.zeros((10, 10), np.uint8)
    truth[2:6, 2:6] = 1  # 16 pixels
    pred[3:7, 2:6] = 1  # 16 pixels, 12 shared
    truth[8, 8] = 2
    pred[8, 8:10] = 2  # 1 shared of 1 + 2
    confusion = confusion_matrix(pred, truth, 3)
    assert confusion.sum() == 100
    dice, iou = dice_from_confusion(confusion), iou_from_confusion(confusion)
    assert dice[1] == pytest.approx(2 * 12 / 32)
    assert iou[1] == pytest.approx(12 / 20)
    assert dice[2] == pytest.approx(2 * 1 / 3)
    assert iou[2] == pytest.approx(1 / 2)
    assert foreground_mean(dice) == pytest.approx((0.75 + 2 / 3) / 2)


def test_torch_and_numpy_confusion_agree_and_pooling_sums_slices():
    rng = np.random.default_rng(0)
    pred = rng.integers(0, 3, size=(5, 32, 32))
    truth = rng.integers(0, 3, size=(5, 32, 32))
    pooled = confusion_matrix(pred, truth, 3)
    assert np.array_equal(pooled, confusion_matrix(torch.from_numpy(pred), torch.from_numpy(truth), 3))
    per_slice = sum(confusion_matrix(p, t, 3) for p, t in zip(pred, truth))
    assert np.array_equal(pooled, per_slice)
    # pooled Dice is the ratio of sums, not the mean of per-slice ratios
    inter = sum(((p == 1) & (t == 1)).sum() for p, t in zip(pred, truth))
    sizes = sum((p == 1).sum() + (t == 1).sum() for p, t in zip(pred, truth))
    assert dice_from_confusion(pooled)[1] == pytest.approx(2 * inter / sizes)


def test_empty_set_conventions():
    truth = np.zeros((4, 8, 8), np.uint8)
    pred = np.zeros((4, 8, 8), np.uint8)
    truth[1, 2:5, 2:5] = 1
    pred[2, 2:4, 2:4] = 2  # tumour predicted where the truth has none; rectum missed entirely
    m = volume_metrics(pred, truth, 3, spacing=(2.0, 1.0, 1.0))
    assert m["dice"][1] == 0.0 and m["iou"][1] == 0.0  # present in truth, not predicted
    assert m["dice"][2] == 0.0 and m["iou"][2] == 0.0  # absent in truth, predicted
    assert math.isnan(m["hd95"][1]) and math.isnan(m["hd95"][2])  # undefined: one side empty
    both_empty = volume_metrics(np.zeros_like(pred), np.zeros_like(truth), 3, spacing=(2.0, 1.0, 1.0))
    assert np.isnan(both_empty["dice"][1:]).all() and np.isnan(both_empty["iou"][1:]).all()
    assert math.isnan(foreground_mean(both_empty["dice"]))
    assert math.isnan(hausdorff_distance(pred == 1, truth == 1, (2.0, 1.0, 1.0)))


def test_penalised_hd95_gives_misses_and_false_positives_the_field_of_view_diagonal():
    spacing = (2.5, 0.8, 0.7)  # (z, y, x) mm
    truth = np.zeros((6, 20, 30), np.uint8)
    truth[1:4, 5:12, 6:15] = 1  # rectum, predicted a little shifted
    truth[2:4, 7:10, 8:11] = 2  # tumour, missed entirely
    pred = np.zeros_like(truth)
    pred[1:4, 6:13, 6:15] = 1
    pred[5, 15:18, 20:24] = 3  # a class the truth lacks, predicted
    m = volume_metrics(pred, truth, 4, spacing=spacing)
    diagonal = math.sqrt((6 * 2.5) ** 2 + (20 * 0.8) ** 2 + (30 * 0.7) ** 2)  # by hand: 30.2 mm
    assert field_of_view_diagonal(truth.shape, spacing) == pytest.approx(diagonal)
    found = _brute_force_hd(pred == 1, truth == 1, spacing, 95.0)
    assert m["hd95_penalised"][1] == m["hd95"][1] == pytest.approx(found)
    assert math.isnan(m["hd95"][2]) and m["hd95_penalised"][2] == pytest.approx(diagonal)  # missed
    assert math.isnan(m["hd95"][3]) and m["hd95_penalised"][3] == pytest.approx(diagonal)  # false positive
    both_empty = volume_metrics(np.zeros_like(pred), np.zeros_like(truth), 4, spacing=spacing)
    assert np.isnan(both_empty["hd95_penalised"][1:]).all()
    # the penalty is a worst case: masks in opposite corners of the volume are still closer than it
    corner_a, corner_b = np.zeros(truth.shape, bool), np.zeros(truth.shape, bool)
    corner_a[0, 0, 0], corner_b[-1, -1, -1] = True, True
    assert hausdorff_distance(corner_a, corner_b, spacing, 100.0) < diagonal


def test_summary_excludes_and_counts_undefined():
    s = summarize([1.0, np.nan, 0.5, np.nan])
    assert s == {"mean": 0.75, "std": 0.25, "n": 2, "n_undefined": 2}
    empty = summarize([np.nan])
    assert math.isnan(empty["mean"]) and empty["n"] == 0 and empty["n_undefined"] == 1


@pytest.mark.parametrize("shift_axis, shift, expected_mm", [(0, 2, 5.0), (1, 3, 2.1), (2, 1, 0.9)])
def test_hausdorff_of_offset_boxes_with_anisotropic_spacing(shift_axis, shift, expected_mm):
    spacing = (2.5, 0.7, 0.9)  # (z, y, x) mm
    lo, hi = [3, 4, 5], [8, 12, 14]
    truth = _box((14, 20, 22), lo, hi)
    lo[shift_axis] += shift
    hi[shift_axis] += shift
    pred = _box((14, 20, 22), lo, hi)
    assert hausdorff_distance(pred, truth, spacing, 100.0) == pytest.approx(expected_mm)
    assert _sitk_hausdorff(pred, truth, spacing) == pytest.approx(expected_mm)
    assert hausdorff_distance(pred, truth, spacing, 95.0) == pytest.approx(
        _brute_force_hd(pred, truth, spacing, 95.0)
    )


def test_hausdorff_matches_simpleitk_and_brute_force_on_ellipsoids():
    spacing = (3.0, 0.8, 0.8)
    z, y, x = np.meshgrid(np.arange(12), np.arange(40), np.arange(44), indexing="ij")
    zz, yy, xx = z * spacing[0], y * spacing[1], x * spacing[2]
    truth = ((zz - 16) / 12) ** 2 + ((yy - 15) / 9) ** 2 + ((xx - 17) / 11) ** 2 <= 1
    pred = ((zz - 18) / 10) ** 2 + ((yy - 17) / 8) ** 2 + ((xx - 16) / 13) ** 2 <= 1
    hd100 = hausdorff_distance(pred, truth, spacing, 100.0)
    assert hd100 == pytest.approx(_sitk_hausdorff(pred, truth, spacing), rel=1e-6)
    assert hd100 == pytest.approx(_brute_force_hd(pred, truth, spacing, 100.0), rel=1e-6)
    hd95 = hausdorff_distance(pred, truth, spacing, 95.0)
    assert hd95 == pytest.approx(_brute_force_hd(pred, truth, spacing, 95.0), rel=1e-6)
    assert 0 < hd95 <= hd100
    assert hausdorff_distance(truth, truth, spacing, 95.0) == 0.0


def test_volume_metrics_agree_with_definitions():
    rng = np.random.default_rng(3)
    truth = np.zeros((6, 24, 24), np.uint8)
    truth[1:5, 5:15, 6:16] = 1
    truth[2:4, 8:12, 9:13] = 2
    pred = truth.copy()
    flip = rng.random(truth.shape) < 0.05
    pred[flip] = rng.integers(0, 3, size=int(flip.sum()))
    m = volume_metrics(pred, truth, 3, spacing=(2.0, 0.5, 0.5))
    for c in (1, 2):
        p, t = pred == c, truth == c
        assert m["dice"][c] == pytest.approx(2 * (p & t).sum() / (p.sum() + t.sum()))
        assert m["iou"][c] == pytest.approx((p & t).sum() / (p | t).sum())
        assert m["true_voxels"][c] == t.sum() and m["pred_voxels"][c] == p.sum()
        assert m["hd95"][c] == pytest.approx(_brute_force_hd(p, t, (2.0, 0.5, 0.5), 95.0))
        assert m["hd100"][c] == pytest.approx(_brute_force_hd(p, t, (2.0, 0.5, 0.5), 100.0))


def test_label_values_out_of_range_raise():
    with pytest.raises(ValueError):
        confusion_matrix(np.array([0, 3]), np.array([0, 1]), 3)
    with pytest.raises(ValueError):
        confusion_matrix(np.zeros(3, int), np.zeros(4, int), 3)
