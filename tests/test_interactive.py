"""Few clicks, whole volume: propagation of clicks (usam.interactive), negative clicks, image-feature reuse, and
`usam predict --points` with propagation.

Most tests use `RegionGrower`, a deterministic stand-in with the prompted models' interface (`encode_image`,
`decode_prompts`): a prompted class gets every bright pixel (windowed intensity > 0.5) whose intensity is within
0.05 of that under one of its positive points (so a distractor of the same intensity is a false positive);
unprompted, every bright pixel is class 1; negative points (label 0) are ignored by it. So
these tests check the propagation logic, the prompts it builds, the negative-click removal (post-processing) and
the feature reuse, not a network. The real models are checked for wiring (usam_tiny with random weights).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torch import nn

from usam.cli import main
from usam.evaluate import EvalCase
from usam.inference import InferenceSettings, segment_slices
from usam.interactive import CLICKED, PROPAGATED, FeatureCache, SliceClicks, propagate, reach_lines, slice_ranges
from usam.models.checkpoints import save_checkpoint
from usam.models.registry import create_model
from usam.prompts import CanonicalGrid, slots_from_clicks
from usam.simulate import InteractionProtocol, chosen_slices, correction, noc, simulate_case

SIZE = 64
WINDOW = (-125.0, 275.0)
CLASSES = ("background", "rectum", "tumour")
SETTINGS = InferenceSettings(CLASSES, WINDOW, SIZE, 3)
REAL_CT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "totalseg_example_ct_sm" / \
    "example_ct_sm.nii.gz"


class RegionGrower(nn.Module):
    """Stand-in (module docstring); `encodes` counts slices through `encode_image`."""

    def __init__(self, num_classes: int = 3, k: int = 3):
        super().__init__()
        self.num_classes, self.k, self.encodes = num_classes, k, 0
        self.seen: list[list[int]] = []  # the point labels of every prompted slice decoded

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        self.encodes += images.shape[0]
        return images.clone()

    def decode_prompts(self, features, points=None, point_labels=None) -> torch.Tensor:
        images = features[:, 0].cpu().numpy()
        logits = torch.zeros(features.shape[0], self.num_classes, SIZE, SIZE)
        for b in range(features.shape[0]):
            label = self._grow(images[b], points, point_labels, b)
            logits[b] = torch.nn.functional.one_hot(torch.from_numpy(label).long(), self.num_classes).permute(2, 0, 1)
        return logits * 10

    def _grow(self, image, points, point_labels, b) -> np.ndarray:
        bright = image > 0.5
        if points is None:
            return bright.astype(np.int64)
        label = np.zeros(bright.shape, np.int64)
        self.seen.append(point_labels[b].tolist())
        for j in reversed(range(self.k * (self.num_classes - 1))):  # a point in several groups: the first wins
            if int(point_labels[b, j]) == 1:
                col, row = (int(round(float(v))) for v in points[b, j])
                if bright[row, col]:
                    label[bright & (np.abs(image - image[row, col]) < 0.05)] = 1 + j // self.k
        return label

    def forward(self, images, points=None, point_labels=None):
        return self.decode_prompts(self.encode_image(images), points, point_labels)


def patient(n: int = 24, seed: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """A new synthetic patient: (slices, 64, 64) int16 HU and labels. A rectum-like tube (class 1, 100 HU) on
    slices 4..19 whose centre and radius drift; a bright distractor (bone-like, class 0) on slices 10..15; fat
    (-500 HU, windowed to 0) elsewhere."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:SIZE, :SIZE]
    hu = np.full((n, SIZE, SIZE), -500, np.int16)
    labels = np.zeros((n, SIZE, SIZE), np.uint8)
    for s in range(4, min(20, n)):
        cy, cx = 30 + (s - 12) * 0.6, 26 + rng.uniform(-1, 1)
        radius = 6 + 3 * np.sin((s - 4) / 15 * np.pi)
        tube = (rows - cy) ** 2 + (cols - cx) ** 2 <= radius ** 2
        hu[s][tube], labels[s][tube] = 100, 1
    hu[10:16, 50:58, 48:58] = 250  # (slices past n: numpy clips)
    return hu, labels


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / max(int(a.sum() + b.sum()), 1)


def one_click(s: int, xy=(26.0, 30.0)) -> dict[int, SliceClicks]:
    return {s: SliceClicks(positive={1: [np.array(xy, np.float32)]})}


def test_one_clicked_slice_reaches_the_whole_structure():
    hu, truth = patient()
    result = propagate(FeatureCache(RegionGrower(), SETTINGS, hu), one_click(12))
    holding = [s for s in range(len(hu)) if truth[s].any()]
    labelled = [s for s in holding if (result.labels[s] == 1).any()]
    assert len(labelled) >= 0.8 * len(holding)
    assert dice(result.labels == 1, truth == 1) >= 0.9
    assert result.reached[1][12] == CLICKED
    assert {s for s, how in result.reached[1].items() if how == PROPAGATED} == set(holding) - {12}
    assert not (result.labels[10:16, 50:58, 48:58] == 1).any()  # the distractor is never prompted


def test_propagation_is_deterministic_and_prompts_follow_the_protocol():
    hu, _ = patient()
    first = propagate(FeatureCache(RegionGrower(), SETTINGS, hu), one_click(12))
    again = propagate(FeatureCache(RegionGrower(), SETTINGS, hu), one_click(12))
    assert np.array_equal(first.labels, again.labels) and first.reached == again.reached
    model = RegionGrower()
    propagate(FeatureCache(model, SETTINGS, hu), one_click(12))
    # classwise: the clicked slice holds its one click, propagated slices k = 3 points; class 2 padded
    assert model.seen[0] == [1, -1, -1, -1, -1, -1]
    assert all(labels == [1, 1, 1, -1, -1, -1] for labels in model.seen[1:])
    released = InferenceSettings(CLASSES, WINDOW, SIZE, 3, prompt_style="released")
    model = RegionGrower()
    result = propagate(FeatureCache(model, released, hu), one_click(12))
    assert model.seen and all(labels == [1] * 6 for labels in model.seen)  # released: every slot a point
    assert np.array_equal(result.labels, first.labels) and result.reached == first.reached


def test_unreached_slices_get_the_unprompted_prediction():
    hu, _ = patient()
    result = propagate(FeatureCache(RegionGrower(), SETTINGS, hu), one_click(12))
    assert (result.labels[10:16, 50:58, 48:58] == 0).all()  # reached slices: only the prompted region
    hu[22, 5:15, 5:15] = 100  # a bright square on a slice no class reaches: the unprompted stand-in labels it 1
    result = propagate(FeatureCache(RegionGrower(), SETTINGS, hu), one_click(12))
    assert 22 not in result.reached[1] and (result.labels[22, 5:15, 5:15] == 1).all()
    only = propagate(FeatureCache(RegionGrower(), SETTINGS, hu), one_click(12), travel=False)
    assert set(np.nonzero(only.labels.any(axis=(1, 2)))[0]) == {12}


def test_negative_click_removes_a_false_positive_and_neighbours_repropagate():
    """The stand-in labels a same-intensity distractor as class 1 wherever class 1 is prompted. A negative click
    on it removes its connected class-1 region on that slice (post-processing, not the stand-in, which ignores
    label 0); the slices beyond are propagated from the corrected slice, so none of their prompts lands on it."""
    hu, truth = patient()
    hu[10:16, 50:58, 40:48] = 100
    cache = FeatureCache(RegionGrower(), SETTINGS, hu)
    before = propagate(cache, one_click(12))
    assert (before.labels[10:16, 50:58, 40:48] == 1).all()
    clicks = one_click(12)
    clicks[12].negative[1] = [np.array((44.0, 54.0), np.float32)]
    after = propagate(cache, clicks)
    assert not (after.labels[12, 50:58, 40:48] == 1).any()
    assert dice(after.labels[12] == 1, truth[12] == 1) == 1.0  # the true region stays
    assert np.array_equal(after.labels[:12], before.labels[:12])  # other slices: the model's own answer
    assert after.reached == before.reached


class TumourSecondGuess(RegionGrower):
    """RegionGrower whose tumour logit is second best wherever it labels the rectum."""

    def decode_prompts(self, features, points=None, point_labels=None) -> torch.Tensor:
        logits = super().decode_prompts(features, points, point_labels)
        logits[:, 2] += (logits[:, 1] > 0) * 5.0
        return logits


def test_negative_click_past_a_structures_end_stops_propagation_but_not_on_the_users_own_click():
    """The tube goes on, bright but unlabelled, on slices 20..23 (as the sigmoid above the rectum): propagation runs
    into it. A negative click on slice 20 makes that region background (not the second-best class) although
    propagated points lie in it, so the rectum is not carried further; on the clicked slice 12 the user's own
    positive click shields its region."""
    hu, truth = patient()
    hu[20:24][(hu[19] == 100)[None].repeat(4, axis=0)] = 100
    cache = FeatureCache(TumourSecondGuess(), SETTINGS, hu)
    before = propagate(cache, one_click(12))
    assert {20, 21, 22, 23} <= set(before.reached[1]) and (before.labels[20] == 1).any()
    clicks = one_click(12)
    row, col = np.argwhere(before.labels[20] == 1)[0]
    clicks[20] = SliceClicks(negative={1: [np.array((col, row), np.float32)]})
    clicks[12].negative[1] = [np.array((26.0, 30.0), np.float32)]
    after = propagate(cache, clicks)
    assert (after.labels[20] == 0).all()
    assert not {21, 22, 23} & set(after.reached[1])
    assert np.array_equal(after.labels[4:20], before.labels[4:20])
    assert dice(after.labels == 1, truth == 1) > dice(before.labels == 1, truth == 1)


def test_simulated_user_clicks_region_errors_not_boundaries():
    """A false-positive rim around the true region and a missed rim inside it are boundary errors: no click. A
    separate false-positive blob gets a negative click, a missed region on a slice a positive one."""
    truth = np.zeros((3, SIZE, SIZE), np.uint8)
    truth[:, 20:40, 20:40] = 1
    rim = np.zeros_like(truth)
    rim[:, 18:42, 18:42] = 1
    shrunk = np.zeros_like(truth)
    shrunk[:, 23:37, 23:37] = 1
    scored = np.arange(3)
    for pred in (rim, shrunk):
        assert correction(pred, truth, scored, {}, SETTINGS) is None
    blob = rim.copy()
    blob[1, 50:60, 50:60] = 1
    clicks: dict[int, SliceClicks] = {}
    assert correction(blob, truth, scored, clicks, SETTINGS) == (1, 1, False)
    assert len(clicks[1].negative[1]) == 1
    missed = rim.copy()
    missed[2] = 0
    assert correction(missed, truth, scored, {}, SETTINGS) == (2, 1, True)


def test_a_corrective_click_runs_no_image_side_again():
    hu, _ = patient()
    model = RegionGrower()
    cache = FeatureCache(model, SETTINGS, hu, batch_size=4)
    first = propagate(cache, one_click(12))
    assert model.encodes == len(hu) == cache.encoded  # every slice encoded once (reached or unprompted)
    assert first.decodes >= len(hu)
    clicks = one_click(12)
    clicks[6] = SliceClicks(negative={1: [np.array((26.0, 28.0), np.float32)]})
    second = propagate(cache, clicks)
    assert model.encodes == len(hu)  # the correction decoded prompts only
    assert not (second.labels[6] == 1).any()
    # only slices whose prompt changed are decoded again: 6 twice (first with its negative click alone, then with
    # the points propagated into it), 5 and 4 (no longer reached: unprompted)
    assert second.decodes == 4
    kept = len(cache.labels)  # labels of every (slice, prompt) seen: 6, 5 and 4 are new, the rest not resized again
    third = propagate(cache, clicks)
    assert third.decodes == 0 and len(cache.labels) == kept and np.array_equal(third.labels, second.labels)
    assert np.array_equal(propagate(FeatureCache(RegionGrower(), SETTINGS, hu), clicks).labels, second.labels)


def test_usam_tiny_decodes_cached_features_as_its_forward_does():
    """Wiring with a real model (random weights): the clicked slice's labels equal a plain forward pass."""
    torch.manual_seed(0)
    model = create_model("usam_tiny", num_classes=3, img_size=SIZE, vit_window_size=4, points_per_class=3).eval()
    hu, _ = patient(n=6)
    clicks = one_click(3)
    result = propagate(FeatureCache(model, SETTINGS, hu, batch_size=1), clicks, min_area=1)
    points, labels = slots_from_clicks(clicks[3].positive, 3, 3)
    plain = segment_slices(model, SETTINGS, hu[3:4], points[None], labels[None], 1)
    assert np.array_equal(result.labels[3], plain[0])
    again = propagate(FeatureCache(model, SETTINGS, hu, batch_size=1), clicks, min_area=1)
    assert np.array_equal(result.labels, again.labels)


def test_reach_lines_name_the_images_own_slices():
    image = sitk.Image([8, 8, 30], sitk.sitkInt16)
    image.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, -1))  # canonical slice s is the image's k = 29 - s
    grid = CanonicalGrid.of(image)
    assert slice_ranges(grid, [17, 18, 19, 24]) == "k=5, 10..12"
    from usam.interactive import Propagation

    result = Propagation(np.zeros((1, 1, 1), np.uint8), {1: {17: CLICKED, 16: PROPAGATED, 18: PROPAGATED}})
    assert reach_lines(result, grid, CLASSES) == ["class rectum: clicked k=12; propagated k=11, 13",
                                                 "class tumour: not clicked (unprompted)"]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = create_model("usam_tiny", num_classes=3, img_size=SIZE, vit_window_size=4, points_per_class=3)
    return save_checkpoint(model, tmp_path_factory.mktemp("run") / "best",
                           {"class_names": list(CLASSES), "window": list(WINDOW)})


def _grow_instead(monkeypatch):
    from usam import predict

    real = predict.load_checkpoint

    def load(*args, **kwargs):
        _, config = real(*args, **kwargs)
        return RegionGrower(), config

    monkeypatch.setattr(predict, "load_checkpoint", load)


def test_predict_points_on_one_slice_segments_the_volume(tmp_path, tiny_checkpoint, monkeypatch, capsys):
    hu, truth = patient()
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing((0.8, 0.8, 2.5))
    image.SetOrigin((-20.0, 5.0, 100.0))
    source = tmp_path / "ct.nii.gz"
    sitk.WriteImage(image, str(source))
    points = tmp_path / "clicks.json"
    points.write_text(json.dumps({"coordinates": "voxel", "points": [
        {"class": "rectum", "position": [26, 30, 12]},
        {"class": "rectum", "position": [53, 12, 20], "label": "negative"}]}))
    _grow_instead(monkeypatch)
    out = tmp_path / "pred.nii.gz"
    args = ["predict", "--checkpoint", str(tiny_checkpoint), "--image", str(source), "--points", str(points),
            "--out", str(out), "--device", "cpu"]
    assert main(args) == 0
    printed = capsys.readouterr().err
    assert "class rectum: clicked k=12; propagated k=4..11, 13..19" in printed
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    assert dice(labels == 1, truth == 1) >= 0.9
    assert main([*args, "--out", str(tmp_path / "only.nii.gz"), "--no-propagate"]) == 0
    only = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "only.nii.gz")))
    assert set(np.nonzero(only.any(axis=(1, 2)))[0]) == {12}
    assert main(["predict", "--checkpoint", str(tiny_checkpoint), "--image", str(source), "--propagate",
                 "--out", str(tmp_path / "x.nii.gz"), "--device", "cpu"]) == 2
    assert "--propagate carries clicks" in capsys.readouterr().err
    points.write_text(json.dumps({"coordinates": "voxel", "points": [
        {"class": "rectum", "position": [26, 30, 12], "label": "maybe"}]}))
    assert main(args) == 2
    assert "label must be one of positive, negative" in capsys.readouterr().err


@pytest.mark.skipif(not REAL_CT.is_file(), reason=f"real CT not found at {REAL_CT}")
def test_predict_propagates_on_a_real_ct_and_writes_the_input_grid(tmp_path, tiny_checkpoint, capsys):
    image = sitk.ReadImage(str(REAL_CT))
    size = image.GetSize()
    centre = [size[0] // 2, size[1] // 2, size[2] // 2]
    points = tmp_path / "clicks.json"
    points.write_text(json.dumps({"coordinates": "voxel", "points": [{"class": 1, "position": centre}]}))
    out = tmp_path / "pred.nii.gz"
    args = ["predict", "--checkpoint", str(tiny_checkpoint), "--image", str(REAL_CT), "--points", str(points),
            "--out", str(out), "--device", "cpu", "--min-area", "1"]
    assert main(args) == 0
    assert "class rectum: clicked" in capsys.readouterr().err
    result = sitk.ReadImage(str(out))
    assert result.GetSize() == image.GetSize()
    assert np.allclose(result.GetSpacing(), image.GetSpacing())
    assert np.allclose(result.GetOrigin(), image.GetOrigin())
    assert np.allclose(result.GetDirection(), image.GetDirection())
    assert main([*args, "--out", str(tmp_path / "again.nii.gz")]) == 0
    again = sitk.ReadImage(str(tmp_path / "again.nii.gz"))
    assert np.array_equal(sitk.GetArrayFromImage(result), sitk.GetArrayFromImage(again))


def _eval_case(hu: np.ndarray, truth: np.ndarray) -> EvalCase:
    n = len(hu)
    scored = np.flatnonzero(truth.reshape(n, -1).any(axis=1))
    return EvalCase("case", hu, truth, np.arange(n), (2.5, 0.8, 0.8), scored, np.ones(len(scored), bool), None)


def test_chosen_slices_take_the_largest_then_spread_over_the_extent():
    areas = np.array([0, 0, 5, 9, 20, 9, 5, 3, 0])
    assert chosen_slices(areas, 1) == [4]
    assert chosen_slices(areas, 3) == [4, 2, 7]
    assert chosen_slices(np.zeros(4), 2) == []


def test_simulated_user_corrections_remove_the_false_positive_slice_by_slice():
    """Stand-in: a same-intensity distractor on slices 10..15 is class 1 wherever class 1 is prompted; each
    corrective click is a negative click on its largest remaining 3-D component's largest cross-section."""
    hu, truth = patient()
    hu[10:16, 50:58, 40:48] = 100
    protocol = InteractionProtocol(clicked_slices=1, clicks=1, corrections=7)
    model = RegionGrower()
    steps = simulate_case(model, SETTINGS, _eval_case(hu, truth), protocol, 16, torch.device("cpu"))
    dice = [result.dice[1] for result, _ in steps]
    clicks = [int(counts.sum()) for _, counts in steps]
    assert len(steps) == 8 and clicks[:7] == [1, 2, 3, 4, 5, 6, 7]
    assert all(b > a for a, b in zip(dice[:6], dice[1:7])) and dice[6] == 1.0 and dice[7] == 1.0
    assert model.encodes == len(hu)  # corrections reuse every slice's image features
    assert noc(steps, 1, 0.99) == 7 and noc(steps, 1, 0.5) == 1
    again = simulate_case(RegionGrower(), SETTINGS, _eval_case(hu, truth), protocol, 16, torch.device("cpu"))
    assert [r.dice[1] for r, _ in again] == dice
