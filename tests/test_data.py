"""usam.data: windowing, resizing, augmentation geometry, prompt points, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from care_dataset.format import reader
from converted_folders import PHANTOM_CLASSES, make_converted_folder
from usam.data import (
    DEFAULT_WINDOW,
    Augmentation,
    EpochSampler,
    SliceDataset,
    preprocess_slices,
    resample_slice,
    resize_images,
    resize_labels,
    sampling_matrix,
    slices_with_class,
    window_normalize,
)
from usam.models.registry import create_model

@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    return make_converted_folder(tmp_path_factory.mktemp("care") / "out", num_patients=4)


def blob_label(size: int = 224) -> np.ndarray:
    """Asymmetric blobs of classes 1 and 2 (a rotation or flip of it is never itself)."""
    yy, xx = np.mgrid[:size, :size]
    label = np.zeros((size, size), np.uint8)
    label[((yy - 0.3 * size) / 0.15) ** 2 + ((xx - 0.6 * size) / 0.25) ** 2 < size**2] = 1
    label[((yy - 0.7 * size) ** 2 + (xx - 0.25 * size) ** 2) < (0.1 * size) ** 2] = 2
    return label


def test_window_normalize_clips_and_scales_numpy_and_torch():
    hu = np.array([-1000, -125, 75, 275, 3000], np.int16)
    expected = np.array([0.0, 0.0, 0.5, 1.0, 1.0], np.float32)
    out_np = window_normalize(hu)
    out_t = window_normalize(torch.from_numpy(hu))
    assert out_np.dtype == np.float32 and isinstance(out_t, torch.Tensor) and out_t.dtype == torch.float32
    np.testing.assert_allclose(out_np, expected, atol=1e-7)
    np.testing.assert_allclose(out_t.numpy(), expected, atol=1e-7)
    np.testing.assert_allclose(window_normalize(hu, (0, 100)), [0, 0, 0.75, 1, 1])
    with pytest.raises(ValueError, match="low < high"):
        window_normalize(hu, (10, 10))


def test_resize_uses_pixel_centre_convention():
    # a 2 x 2 checkerboard upsampled x2: nearest copies blocks, bilinear matches torch's align_corners=False
    labels = torch.tensor([[[0, 1], [2, 0]]], dtype=torch.uint8)
    np.testing.assert_array_equal(resize_labels(labels, 4)[0].numpy(),
                                  np.kron([[0, 1], [2, 0]], np.ones((2, 2), int)))
    assert resize_labels(labels, 4).dtype == torch.int64
    images = torch.rand(3, 1, 50, 70)
    expected = F.interpolate(images, size=(224, 224), mode="bilinear", align_corners=False)
    torch.testing.assert_close(resize_images(images), expected)
    hu = np.random.default_rng(0).integers(-500, 500, (2, 64, 80)).astype(np.int16)
    x = preprocess_slices(hu)
    assert x.shape == (2, 1, 224, 224) and x.dtype == torch.float32
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0


def test_quarter_turns_and_flips_equal_numpy_on_the_model_grid():
    label = blob_label()
    hu = (label.astype(np.int16) * 100 - 100)
    for turns in range(4):
        for flip in (False, True):
            image, out = resample_slice(hu, label, sampling_matrix(flip, turns))
            reference = np.rot90(label[:, ::-1] if flip else label, turns)
            np.testing.assert_array_equal(out.numpy(), reference)
            np.testing.assert_allclose(image[0].numpy(), window_normalize(np.ascontiguousarray(
                np.rot90(hu[:, ::-1] if flip else hu, turns))), atol=1e-4)


def test_identity_resample_equals_the_shared_preprocessing():
    rng = np.random.default_rng(1)
    for shape in ((512, 512), (64, 64), (96, 80)):
        hu = rng.integers(-400, 600, shape).astype(np.int16)
        label = rng.integers(0, 3, shape).astype(np.uint8)
        image, out = resample_slice(hu, label, np.eye(2))
        torch.testing.assert_close(image, preprocess_slices(hu[None])[0], atol=2e-4, rtol=0)
        np.testing.assert_array_equal(out.numpy(), resize_labels(torch.from_numpy(np.array(label))[None])[0].numpy())


def test_rotation_moves_image_and_label_together():
    # the label is the thresholded image: after any augmentation, class-2 pixels must stay bright
    rng = np.random.default_rng(2)
    label = blob_label(96)
    hu = np.where(label == 2, 250, np.where(label == 1, 50, -100)).astype(np.int16)
    aug = Augmentation(flip_prob=0.5, max_rotation_deg=15.0, small_rotation_prob=1.0)
    for _ in range(10):
        flip, turns, angle = aug.draw(rng)
        assert abs(angle) <= 15.0 and angle != 0.0
        image, out = resample_slice(hu, label, sampling_matrix(flip, turns, angle))
        image, out = image[0].numpy(), out.numpy()
        expected = window_normalize(np.array([-100, 50, 250]))
        inside = out > 0
        # nearest label vs bilinear image: pixels well inside each class carry that class's intensity
        for cls in (1, 2):
            core = torch.nn.functional.max_pool2d(torch.from_numpy((out != cls).astype(np.float32))[None],
                                                  7, 1, 3)[0].numpy() == 0
            assert core.sum() > 50
            np.testing.assert_allclose(image[core], expected[cls], atol=1e-4)
        assert inside.any()


def test_points_sampled_after_augmentation_lie_in_their_class(converted):
    dataset = reader.open_dataset(converted)
    ids = dataset.case_ids("train")
    data = SliceDataset(dataset, ids, num_classes=3, points_per_class=3, augment=Augmentation(), seed=7)
    seen = {1: 0, 2: 0}
    for index in range(len(data)):
        item = data[(0, index)]
        assert item["image"].shape == (1, 224, 224) and item["label"].shape == (224, 224)
        assert item["points"].shape == (6, 2) and item["point_labels"].shape == (6,)
        label = item["label"].numpy()
        for slot, ((x, y), flag) in enumerate(zip(item["points"].numpy(), item["point_labels"].numpy())):
            cls = 1 + slot // 3
            if flag == 1:
                assert label[int(round(y)), int(round(x))] == cls
                seen[cls] += 1
            else:
                assert flag == -1 and not (label == cls).any()
    assert seen[1] > 0 and seen[2] > 0


def test_samples_depend_on_seed_epoch_index_only(converted):
    dataset = reader.open_dataset(converted)
    ids = dataset.case_ids("train")
    make = lambda seed: SliceDataset(dataset, ids, num_classes=3, points_per_class=1, augment=Augmentation(),
                                     seed=seed)
    a, b = make(0), make(0)
    order = [(1, 3), (0, 5), (1, 3), (2, 0)]
    first = [a[k] for k in order]
    second = [b[k] for k in reversed(order)][::-1]
    for x, y in zip(first, second):
        for key in x:
            torch.testing.assert_close(x[key], y[key], rtol=0, atol=0)
    torch.testing.assert_close(first[0]["image"], first[2]["image"], rtol=0, atol=0)
    differs = lambda x, y: not torch.equal(x["image"], y["image"]) or not torch.equal(x["points"], y["points"])
    assert any(differs(a[(e, 3)], a[(1, 3)]) for e in (0, 2, 3))  # another epoch, another draw
    assert any(differs(make(1)[(1, i)], a[(1, i)]) for i in range(4))  # another seed, another draw


def test_validation_items_are_deterministic_unaugmented(converted):
    dataset = reader.open_dataset(converted)
    ids = dataset.case_ids("train")
    data = SliceDataset(dataset, ids, num_classes=3, points_per_class=3, augment=None)
    image_hu, label = dataset.read_slice(ids[0], 0)
    item = data[(5, 0)]
    torch.testing.assert_close(item["image"], preprocess_slices(image_hu[None], DEFAULT_WINDOW)[0])
    np.testing.assert_array_equal(item["label"].numpy(), resize_labels(torch.from_numpy(np.array(label))[None])[0].numpy())
    torch.testing.assert_close(data[(0, 0)]["points"], item["points"], rtol=0, atol=0)


def test_training_points_are_drawn_anew_each_epoch_also_without_augmentation(converted):
    dataset = reader.open_dataset(converted)
    ids = dataset.case_ids("train")
    train = SliceDataset(dataset, ids, num_classes=3, points_per_class=3, augment=None, random_points=True, seed=3)
    validation = SliceDataset(dataset, ids, num_classes=3, points_per_class=3, augment=None)
    index = next(i for i in range(len(train)) if (train[(0, i)]["point_labels"] >= 0).sum() >= 3)
    epochs = [train[(epoch, index)] for epoch in range(4)]
    for item in epochs:  # unaugmented: the image is the validation one, only the points differ
        torch.testing.assert_close(item["image"], validation[(0, index)]["image"], rtol=0, atol=0)
        labels = item["label"].numpy()
        for slot, ((x, y), used) in enumerate(zip(item["points"].numpy(), item["point_labels"].numpy())):
            assert used < 0 or labels[int(y), int(x)] == slot // 3 + 1  # on a pixel of its slot's class
    points = [item["points"].numpy().tobytes() for item in epochs]
    assert len(set(points)) == 4
    assert train[(2, index)]["points"].numpy().tobytes() == points[2]  # and reproducibly so


def test_epoch_sampler_resumes_mid_epoch_and_shards_ranks():
    data = list(range(10))
    full = EpochSampler(data, seed=3)
    full.set_epoch(2)
    order = list(full)
    assert sorted(i for _, i in order) == data and all(e == 2 for e, _ in order)
    resumed = EpochSampler(data, seed=3)
    resumed.set_epoch(2)
    resumed.start = 4
    assert list(resumed) == order[4:] and len(resumed) == 6
    full.set_epoch(3)
    assert list(full) != order
    ranks = [EpochSampler(data, num_replicas=2, rank=r, seed=3) for r in range(2)]
    for r in ranks:
        r.set_epoch(2)
    shards = [[i for _, i in r] for r in ranks]
    assert sorted(shards[0] + shards[1]) == data


def test_slices_with_class_matches_the_labels(converted):
    dataset = reader.open_dataset(converted)
    data = SliceDataset(dataset, dataset.case_ids("train"), num_classes=3, augment=None)
    per_class = slices_with_class(data)
    for c, indices in enumerate(per_class, start=1):
        expected = [i for i, (case, pos) in enumerate(data.slices) if (dataset.read_slice(case, pos)[1] == c).any()]
        assert indices.tolist() == expected
    assert 0 < len(per_class[1]) < len(per_class[0]) <= len(data)  # the tumour is on fewer slices than the rectum


def test_class_balanced_sampler_oversamples_the_rare_class_reproducibly():
    n = 1000
    rare = np.arange(0, n, 50)  # class 2 on 2 % of the slices
    common = np.arange(n)
    plain = EpochSampler(list(range(n)), seed=1)
    balanced = EpochSampler(list(range(n)), seed=1, class_slices=[common, rare], balance=0.5)
    for sampler in (plain, balanced):
        sampler.set_epoch(4)
    share = lambda sampler: np.isin([i for _, i in sampler], rare).mean()
    assert share(plain) == pytest.approx(0.02)
    # half the draws pick a class uniformly: 0.5 * (0.5 + 0.5 * 0.02) + 0.5 * 0.02 = 0.265 expected
    assert 0.22 < share(balanced) < 0.31
    again = EpochSampler(list(range(n)), seed=1, class_slices=[common, rare], balance=0.5)
    again.set_epoch(4)
    assert list(again) == list(balanced) and len(list(balanced)) == n
    again.start = 10
    assert list(again) == list(balanced)[10:]
    balanced.set_epoch(5)
    assert list(balanced) != list(again)
    with pytest.raises(ValueError, match="balance"):
        EpochSampler(list(range(n)), class_slices=[rare], balance=1.5)


def test_make_converted_folder_is_readable(converted):
    dataset = reader.open_dataset(converted)
    assert dataset.class_names == PHANTOM_CLASSES
    assert len(dataset.case_ids("train")) == 2 and len(dataset.case_ids("test")) == 2
    sample = dataset.sample("train", 0)
    assert sample["image"].dtype == np.int16 and (sample["label"] > 0).any()
    assert json.loads((converted / "dataset.json").read_text())["checksums"]["all"]


def test_negative_training_points_lie_just_outside_the_foreground_and_a_prompted_model_takes_them(converted):
    dataset = reader.open_dataset(converted)
    ids = dataset.case_ids("train")
    data = SliceDataset(dataset, ids, num_classes=3, points_per_class=3, augment=Augmentation(), seed=7,
                        negative_points=2)
    negatives = 0
    for index in range(len(data)):
        item = data[(0, index)]
        assert item["points"].shape == (8, 2) and item["point_labels"].shape == (8,)
        label = item["label"].numpy()
        near = ndimage.binary_dilation(label > 0, iterations=5) & (label == 0)
        for (x, y), flag in zip(item["points"].numpy()[6:], item["point_labels"].numpy()[6:]):
            if flag == 0:
                assert near[int(round(y)), int(round(x))]
                negatives += 1
            else:
                assert flag == -1 and not label.any()
    assert negatives > 0
    validation = SliceDataset(dataset, ids, num_classes=3, points_per_class=3, augment=None, negative_points=2)
    assert validation[0]["points"].shape == (6, 2)  # deterministic items carry no negatives
    model = create_model("usam_tiny", num_classes=3)
    batch = [data[(0, i)] for i in range(2)]
    logits = model(torch.stack([b["image"] for b in batch]), torch.stack([b["points"] for b in batch]),
                   torch.stack([b["point_labels"] for b in batch]))
    assert logits.shape == (2, 3, 224, 224)


def test_propagation_training_prompts_come_from_a_neighbour_and_dropped_classes_become_background(converted):
    """Neighbour prompts lie in the class of an adjacent stored slice (through the same augmentation), the
    target staying this slice's; a dropped class has padding slots and no pixels in the target."""
    dataset = reader.open_dataset(converted)
    ids = dataset.case_ids("train")
    plain = SliceDataset(dataset, ids, num_classes=3, points_per_class=3, augment=Augmentation(), seed=7)
    neighbour = SliceDataset(dataset, ids, num_classes=3, points_per_class=3, augment=Augmentation(), seed=7,
                             neighbour_prompts=1.0)
    dropped = SliceDataset(dataset, ids, num_classes=3, points_per_class=3, augment=Augmentation(), seed=7,
                           prompt_dropout=1.0)
    outside_own_class = 0
    for index in range(len(plain)):
        base, near, gone = plain[(0, index)], neighbour[(0, index)], dropped[(0, index)]
        assert torch.equal(near["label"], base["label"]) and torch.equal(near["image"], base["image"])
        case_id, position = neighbour.slices[index]
        labels = dataset.read_labels(case_id)
        adjacent = [labels[p] for p in (position - 1, position + 1) if 0 <= p < len(labels)]
        for slot, ((x, y), flag) in enumerate(zip(near["points"].numpy(), near["point_labels"].numpy())):
            c = 1 + slot // 3
            if flag != 1:
                continue
            in_own = base["label"][int(round(y)), int(round(x))] == c
            in_adjacent = any((a == c).any() for a in adjacent)
            assert in_own or in_adjacent
            outside_own_class += int(not in_own)
        assert (gone["point_labels"] == -1).all() and not gone["label"].any()
    assert outside_own_class > 0  # some prompts did come from a neighbour, outside this slice's class
