"""Point sampling from label slices and CT-volume <-> model-input coordinates."""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from usam.prompts import (
    CanonicalGrid,
    PromptProtocol,
    model_to_voxel,
    model_to_world,
    sample_points,
    sample_points_batch,
    slot_classes,
    slots_from_clicks,
    voxel_to_model,
    world_to_model,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def two_class_slice() -> np.ndarray:
    """224 x 224: a disc of class 1 centred at (row 80, col 60), an L-shaped class 2."""
    yy, xx = np.mgrid[:224, :224]
    label = np.zeros((224, 224), np.uint8)
    label[(yy - 80) ** 2 + (xx - 60) ** 2 <= 20**2] = 1
    label[150:160, 100:200] = 2
    label[100:160, 190:200] = 2
    return label


def assert_inside(points, labels, label_slice, num_classes, k):
    for (x, y), lab, cls in zip(points, labels, slot_classes(num_classes, k)):
        if lab == 1:
            assert float(x).is_integer() and float(y).is_integer()
            assert label_slice[int(y), int(x)] == cls


@pytest.mark.parametrize("k", [1, 3, 5])
def test_random_points_lie_in_their_class_and_follow_the_seed(k):
    label = two_class_slice()
    points, labels = sample_points(label, 3, k, np.random.default_rng(5))
    assert points.shape == (2 * k, 2) and points.dtype == np.float32 and labels.dtype == np.int64
    assert (labels == 1).all()
    assert_inside(points, labels, label, 3, k)
    again, _ = sample_points(label, 3, k, np.random.default_rng(5))
    other, _ = sample_points(label, 3, k, np.random.default_rng(6))
    assert np.array_equal(points, again) and not np.array_equal(points, other)


def test_absent_class_gives_padding_slots():
    label = two_class_slice()
    label[label == 1] = 0
    for rng in (None, np.random.default_rng(0)):
        points, labels = sample_points(label, 3, 3, rng)
        assert labels.tolist() == [-1, -1, -1, 1, 1, 1]
        assert np.all(points[:3] == 0)
        assert_inside(points, labels, label, 3, 3)
    points, labels = sample_points(np.zeros((32, 32), np.uint8), 3, 2, None)
    assert labels.tolist() == [-1] * 4 and not points.any()


def test_deterministic_points_are_interior_spread_and_repeatable():
    label = two_class_slice()
    points, labels = sample_points(label, 3, 3, None)
    assert_inside(points, labels, label, 3, 3)
    assert np.array_equal(points[0], [60, 80])  # the centre of the disc is its deepest pixel
    again, _ = sample_points(label.copy(), 3, 3, None)
    assert np.array_equal(points, again)
    for cls in (1, 2):
        chosen = points[(cls - 1) * 3 : cls * 3]
        gaps = [np.linalg.norm(a - b) for a, b in itertools.combinations(chosen, 2)]
        assert min(gaps) >= 5, (cls, chosen)


def test_tiny_regions_repeat_their_pixels():
    label = np.zeros((20, 20), np.uint8)
    label[3, 4] = 1
    label[10, 10:12] = 2
    for rng in (None, np.random.default_rng(1)):
        points, labels = sample_points(label, 3, 3, rng)
        assert (labels == 1).all()
        assert_inside(points, labels, label, 3, 3)
        assert {tuple(p) for p in points[:3]} == {(4.0, 3.0)}


def test_batch_helper_returns_tensors_in_slot_order():
    labels = torch.from_numpy(np.stack([two_class_slice(), np.zeros((224, 224), np.uint8)]))
    points, point_labels = sample_points_batch(labels, 3, 1)
    assert points.shape == (2, 2, 2) and point_labels.shape == (2, 2)
    assert points.dtype == torch.float32 and point_labels.dtype == torch.int64
    assert point_labels.tolist() == [[1, 1], [-1, -1]]


def marker_volume(direction) -> sitk.Image:
    """A 7 (i) x 6 (j) x 5 (k) volume, 0.7 x 0.8 x 2.5 mm, with the given direction."""
    image = sitk.Image([7, 6, 5], sitk.sitkUInt8)
    image.SetDirection(direction)
    image.SetSpacing((0.7, 0.8, 2.5))
    image.SetOrigin((12.0, -30.0, 40.0))
    return image


def all_axis_aligned_directions():
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product([1, -1], repeat=3):
            matrix = np.zeros((3, 3))
            for col, row in enumerate(perm):
                matrix[row, col] = signs[col]
            yield tuple(matrix.flatten())


@pytest.mark.parametrize("direction", list(all_axis_aligned_directions()))
def test_voxels_land_where_dicomorient_puts_them(direction):
    image = marker_volume(direction)
    voxel = (5, 1, 3)
    image[voxel] = 1
    canonical = sitk.GetArrayFromImage(sitk.DICOMOrient(image, "LPS"))  # slices x rows x cols
    (s, row, col), = np.argwhere(canonical == 1)
    height, width = canonical.shape[1:]
    slices, xy = voxel_to_model(np.array([voxel]), image)
    assert slices.tolist() == [s]
    np.testing.assert_allclose(xy[0], [(col + 0.5) * 224 / width - 0.5, (row + 0.5) * 224 / height - 0.5], rtol=1e-6)
    world = image.TransformIndexToPhysicalPoint(voxel)
    slices_w, xy_w = world_to_model(np.array([world]), image)
    assert slices_w.tolist() == [s] and np.allclose(xy_w, xy, atol=1e-4)
    np.testing.assert_allclose(model_to_voxel(slices, xy, image)[0], voxel, atol=1e-4)
    np.testing.assert_allclose(model_to_world(slices, xy, image)[0], world, atol=1e-3)
    # the canonical slice is named by the image's own axis and index, as the user counts
    grid = CanonicalGrid.of(image)
    assert grid.slice_name(s) == f"{'ijk'[grid.slice_axis]}={voxel[grid.slice_axis]}"


def test_canonical_slice_is_radiological():
    # RAS-stored volume (as NIfTI often is): index i grows towards the patient's right.
    image = marker_volume((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    (_, xy_first), (_, xy_last) = (voxel_to_model(np.array([[i, 0, 0]]), image) for i in (0, 6))
    assert xy_first[0, 0] > xy_last[0, 0]  # i = 0 is the most left: far right of the image
    _, xy_front = voxel_to_model(np.array([[0, 5, 0]]), image)
    assert xy_front[0, 1] < 224 / 6  # j = 5 is the most anterior: the top row


def test_model_coordinates_match_interpolate_align_corners_false():
    # A 2 x 2 block on a 448 x 448 slice becomes one 224 x 224 pixel; its mapped centre is there.
    image = sitk.Image([448, 448, 1], sitk.sitkFloat32)
    block = [(100, 300), (101, 300), (100, 301), (101, 301)]
    array = np.zeros((448, 448), np.float32)
    for col, row in block:
        array[row, col] = 1
    resized = F.interpolate(torch.from_numpy(array)[None, None], size=(224, 224), mode="bilinear", align_corners=False)
    row, col = divmod(int(resized.argmax()), 224)
    _, xy = voxel_to_model(np.array([[c, r, 0] for c, r in block]), image)
    np.testing.assert_allclose(xy.mean(axis=0), [col, row], atol=1e-5)


def test_points_outside_the_volume_are_refused_in_the_users_coordinates():
    # z flipped (as DICOM series often are): canonical slice = 4 - k, which the message must not show
    image = marker_volume((1, 0, 0, 0, 1, 0, 0, 0, -1))
    with pytest.raises(ValueError, match=r"^point 1: voxel \(0, 0, 9\) outside the image \(0\.\.6, 0\.\.5, 0\.\.4\)$"):
        voxel_to_model(np.array([[0, 0, 0], [0, 0, 9]]), image)
    with pytest.raises(ValueError, match=r"^point 0: voxel \(2\.5, 7, 1\) outside the image \(0\.\.6, 0\.\.5, 0\.\.4\)"):
        voxel_to_model(np.array([[2.5, 7, 1]]), image)
    world = image.TransformContinuousIndexToPhysicalPoint((1.0, 2.0, -3.0))
    shown = ", ".join(f"{round(v, 2):g}" for v in world)
    with pytest.raises(ValueError, match=rf"^point 0: world \({shown}\) mm is voxel \(1, 2, -3\), outside the image"):
        world_to_model(np.array([world]), image)
    with pytest.raises(ValueError, match="N x 3"):
        world_to_model(np.zeros((2, 2)), image)


def test_real_ct_labels_become_prompts_on_the_right_slice():
    folder = DATA / "totalseg_example_ct_sm"
    if not folder.is_dir():
        pytest.skip("real data folder ../shared/data/totalseg_example_ct_sm is missing")
    seg = sitk.ReadImage(str(folder / "example_seg.nii.gz"))
    canonical = sitk.GetArrayFromImage(sitk.DICOMOrient(seg, "LPS"))
    original = sitk.GetArrayFromImage(seg)  # k, j, i
    colon = 20
    k, j, i = np.argwhere(original == colon)[len(np.argwhere(original == colon)) // 2]
    world = seg.TransformIndexToPhysicalPoint((int(i), int(j), int(k)))
    (s,), xy = world_to_model(np.array([world]), seg)
    height, width = canonical.shape[1:]
    col = (xy[0, 0] + 0.5) * width / 224 - 0.5
    row = (xy[0, 1] + 0.5) * height / 224 - 0.5
    assert canonical[s, int(round(row)), int(round(col))] == colon

    # Prompts sampled on that slice, resized to the model input, fall inside the organ.
    slice_ = torch.from_numpy(canonical[s].astype(np.int64))[None, None].float()
    resized = F.interpolate(slice_, size=(224, 224), mode="nearest")[0, 0].numpy().astype(np.int64)
    label = np.select([resized == 5, resized == colon], [1, 2], 0).astype(np.uint8)
    points, labels = sample_points(label, 3, 3, None)
    assert labels[3:].tolist() == [1, 1, 1]
    assert_inside(points, labels, label, 3, 3)


# ---------------------------------------------------------------- prompt protocols (docs/reproduction.md)

RELEASED = PromptProtocol("released", "raster", "xy")


def raster_pixels(region: np.ndarray, indices: list[int]) -> list[tuple[float, float]]:
    """(x, y) of the region's pixels at these raster-order (row-major) positions."""
    rows, cols = np.nonzero(region)
    return [(float(cols[i]), float(rows[i])) for i in indices]


def test_released_style_on_a_slice_holding_only_class_1_has_no_padding_and_no_class_identity():
    label = two_class_slice()
    label[label == 2] = 0
    for rng in (None, np.random.default_rng(0)):
        points, labels = sample_points(label, 3, 3, rng, RELEASED)
        assert labels.tolist() == [1] * 6  # no padding: the absent class's group holds class-1 points
        assert all(label[int(y), int(x)] == 1 for x, y in points)
    step = int((label == 1).sum()) // 10
    # its evaluation points: candidates 0..9 at i * step; group 1 takes 0-4, group 2 5-9, each every other one
    assert [tuple(p) for p in points_of(label, RELEASED)] == raster_pixels(label == 1, [0, 2 * step, 4 * step,
                                                                                       5 * step, 7 * step,
                                                                                       9 * step])
    # the classwise style (ours): the absent class's slots are padding
    points, labels = sample_points(label, 3, 3, None)
    assert labels.tolist() == [1, 1, 1, -1, -1, -1] and not points[3:].any()


def points_of(label: np.ndarray, protocol: PromptProtocol, k: int = 3) -> np.ndarray:
    return sample_points(label, 3, k, None, protocol)[0]


def test_raster_placement_takes_the_released_codes_pixels_for_each_class():
    label = two_class_slice()
    for cls in (1, 2):
        step = int((label == cls).sum()) // 10
        group = slice((cls - 1) * 3, cls * 3)
        expected = raster_pixels(label == cls, [0, 4 * step, 8 * step])
        for style in ("released", "classwise"):
            got = points_of(label, PromptProtocol(style, "raster", "xy"))[group]
            assert [tuple(p) for p in got] == expected, (style, cls)
        one = points_of(label, PromptProtocol("released", "raster", "xy"), k=1)[cls - 1]
        assert tuple(one) == raster_pixels(label == cls, [4 * step])[0]


def test_rowcol_order_swaps_the_coordinates_and_nothing_else():
    label = two_class_slice()
    for protocol in (RELEASED, PromptProtocol()):
        xy = points_of(label, protocol)
        rowcol = points_of(label, PromptProtocol(protocol.style, protocol.placement, "rowcol"))
        assert np.array_equal(rowcol, xy[:, ::-1])


def test_released_style_with_more_classes_cycles_through_the_present_ones():
    label = np.zeros((40, 40), np.uint8)
    label[2:10, 2:10] = 1
    label[20:30, 20:30] = 3
    label[35, 35] = 2  # under 5 pixels: absent, as the released code's WORD loader counts it
    points, labels = sample_points(label, 4, 1, None, RELEASED)
    assert labels.tolist() == [1, 1, 1]
    assert [label[int(y), int(x)] for x, y in points] == [1, 3, 1]


def test_protocols_refuse_what_the_released_code_cannot_place():
    label = two_class_slice()
    for protocol in (RELEASED, PromptProtocol("classwise", "raster", "xy")):
        with pytest.raises(ValueError, match="1, 3 or 5 points per class"):
            sample_points(label, 3, 2, None, protocol)
    with pytest.raises(ValueError, match="prompt style 'other'"):
        sample_points(label, 3, 3, None, PromptProtocol("other"))


def test_clicks_fill_slots_by_class_or_every_slot_in_the_released_style():
    clicks = {1: [np.array([10.0, 20.0]), np.array([11.0, 21.0])]}
    points, labels = slots_from_clicks(clicks, 3, 3)
    assert labels.tolist() == [1, 1, -1, -1, -1, -1] and points[:2].tolist() == [[10, 20], [11, 21]]
    points, labels = slots_from_clicks(clicks, 3, 3, PromptProtocol("released", "raster", "rowcol"))
    assert labels.tolist() == [1] * 6
    assert points.tolist() == [[20, 10], [21, 11], [20, 10]] * 2


def test_corner_aligned_mapping_puts_the_corner_voxels_on_the_corner_pixels():
    image = sitk.Image([512, 400, 3], sitk.sitkInt16)
    corners = np.array([[0, 0, 1], [511, 399, 1]], dtype=np.float64)
    _, xy = voxel_to_model(corners, image, 224, corner_aligned=True)
    assert np.allclose(xy, [[0, 0], [223, 223]])
    back = model_to_voxel(np.array([1, 1]), xy, image, 224, corner_aligned=True)
    assert np.allclose(back, corners)
