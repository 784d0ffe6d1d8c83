"""A simulated user for `usam eval --interaction sparse`: few clicks from the truth, propagation, corrections.

Per case and foreground class: S clicked slices (the class's largest cross-section first, then slices spread
evenly over its extent), K points on each from the truth at model resolution (`usam.prompts.interior_points`);
the clicks propagate through the stored slices (`usam.interactive.propagate`). Then up to C corrections: one
click at the centre of the largest 3-D error component of the scored slices (misses and false positives of every
class; the centre: the deepest pixel of the component's largest cross-section), positive for a miss (where the
class still has a free slot on that slice, else the next component), negative for a false positive that does not
touch the class's truth on that slice (a region where the class is not; a false-positive rim of a true region is
a boundary error, which a negative click, removing the region it lands on, cannot fix: the next component is
taken). Per-volume
Dice and HD95 after the initial clicks and after each correction; NoC@tau: the clicks (initial plus corrections)
after which a case's class Dice first reaches tau, C corrections' worth where it never does. Deterministic.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from usam.data import resize_labels
from usam.evaluate import CaseResult, EvalCase, read_eval_case, score_case
from usam.inference import InferenceSettings
from usam.interactive import FeatureCache, SliceClicks, propagate
from usam.prompts import interior_points, pixel_to_model

NOC_THRESHOLDS = (0.8, 0.9)
INTERACTIONS = ("sparse",)


@dataclass(frozen=True)
class InteractionProtocol:
    """`usam eval --interaction sparse`: `clicked_slices` S per class, `clicks` K per slice, `corrections` C,
    propagation's `min_area`."""

    clicked_slices: int = 1
    clicks: int = 1
    corrections: int = 0
    min_area: int = 20

    def check(self, points_per_class: int) -> None:
        """Raise ValueError, one line, for counts the model cannot take."""
        if self.clicked_slices < 1 or self.corrections < 0 or self.min_area < 1:
            raise ValueError("--clicked-slices must be >= 1, --corrections >= 0 and --min-area >= 1")
        if not 1 <= self.clicks <= points_per_class:
            raise ValueError(f"--clicks {self.clicks}: this model has {points_per_class} prompt slot(s) per class "
                             f"(use 1..{points_per_class})")

    def run(self, model: nn.Module, settings: InferenceSettings, dataset: Any, split: str, batch_size: int,
            device: torch.device, volume: str) -> dict[str, Any]:
        """`simulate_split` with this protocol: the interaction section of metrics.json."""
        return simulate_split(model, settings, dataset, split, self, batch_size, device, volume)


def chosen_slices(areas: np.ndarray, count: int) -> list[int]:
    """Slices of a class with per-slice `areas`: the largest first, then those nearest to `count` targets spread
    evenly over the class's extent (lowest to highest slice holding it), less the target nearest the largest;
    each slice once."""
    holding = np.flatnonzero(areas)
    if not len(holding):
        return []
    chosen = [int(holding[np.argmax(areas[holding])])]
    targets = list(np.linspace(holding[0], holding[-1], count))
    targets.pop(int(np.argmin(np.abs(np.array(targets) - chosen[0]))))
    for target in targets:
        free = [int(s) for s in holding if s not in chosen]
        if not free:
            break
        chosen.append(free[int(np.argmin(np.abs(np.array(free) - target)))])
    return chosen


def initial_clicks(truth_small: np.ndarray, num_classes: int, protocol: InteractionProtocol
                   ) -> dict[int, SliceClicks]:
    """(n, S, S) truth at model resolution -> {stored slice: SliceClicks} as the module docstring says."""
    clicks: dict[int, SliceClicks] = {}
    for c in range(1, num_classes):
        areas = (truth_small == c).reshape(len(truth_small), -1).sum(axis=1)
        for s in chosen_slices(areas, protocol.clicked_slices):
            points = interior_points(truth_small[s] == c, protocol.clicks)
            clicks.setdefault(s, SliceClicks()).positive[c] = list(points)
    return clicks


def error_components(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> list[tuple[int, int, bool, np.ndarray]]:
    """3-D error components of (n, H, W) labels, largest first: (size, class, is_miss, mask)."""
    found = []
    for c in range(1, num_classes):
        for miss, wrong in ((True, (truth == c) & (pred != c)), (False, (pred == c) & (truth != c))):
            components, count = ndimage.label(wrong)
            sizes = np.bincount(components.ravel(), minlength=count + 1)
            found += [(int(sizes[i]), c, miss, i, components) for i in range(1, count + 1)]
    found.sort(key=lambda f: (-f[0], f[1], not f[2], f[3]))
    return [(size, c, miss, components == i) for size, c, miss, i, components in found]


def correction(pred: np.ndarray, truth: np.ndarray, scored: np.ndarray, clicks: dict[int, SliceClicks],
               settings: InferenceSettings) -> tuple[int, int, bool] | None:
    """Add one corrective click to `clicks` (module docstring); returns (stored slice, class, positive) or None
    when nothing is wrong or no component can take a click."""
    k, size = settings.points_per_class, settings.img_size
    height, width = truth.shape[1:]
    for _, c, miss, mask in error_components(pred, truth, settings.num_classes):
        z = int(np.argmax(mask.reshape(len(mask), -1).sum(axis=1)))
        s = int(scored[z])
        on_slice = clicks.setdefault(s, SliceClicks())
        if (miss and len(on_slice.positive.get(c, [])) >= k) or _touches(mask[z], (pred[z] if miss else truth[z]) == c):
            continue
        row_col = interior_points(mask[z], 1)[0][::-1]
        xy = pixel_to_model(row_col[None], height, width, size, settings.corner_aligned)[0]
        (on_slice.positive if miss else on_slice.negative).setdefault(c, []).append(xy)
        return s, c, miss
    return None


def _touches(region: np.ndarray, other: np.ndarray) -> bool:
    """Whether two H x W masks share a pixel or an edge."""
    return bool((ndimage.binary_dilation(region) & other).any())


def _class_clicks(clicks: Mapping[int, SliceClicks], num_classes: int) -> np.ndarray:
    """Clicks per class (positive and negative), indexed by class."""
    counts = np.zeros(num_classes, np.int64)
    for on_slice in clicks.values():
        for side in (on_slice.positive, on_slice.negative):
            for c, points in side.items():
                counts[c] += len(points)
    return counts


def simulate_case(model: nn.Module, settings: InferenceSettings, case: EvalCase, protocol: InteractionProtocol,
                  batch_size: int, device: torch.device) -> list[tuple[CaseResult, np.ndarray]]:
    """(per-volume result, clicks per class) after the initial clicks and after each correction."""
    truth_small = resize_labels(torch.from_numpy(case.truth), settings.img_size, settings.resize).numpy()
    clicks = initial_clicks(truth_small, settings.num_classes, protocol)
    cache = FeatureCache(model, settings, case.image, device, batch_size)
    steps = []
    for step in range(protocol.corrections + 1):
        pred = propagate(cache, clicks, protocol.min_area).labels[case.scored].astype(case.truth.dtype)
        steps.append((score_case(case, pred, settings.num_classes), _class_clicks(clicks, settings.num_classes)))
        if step == protocol.corrections:
            break
        if correction(pred, case.truth[case.scored], case.scored, clicks, settings) is None:
            steps += [steps[-1]] * (protocol.corrections - step)
            break
    return steps


def noc(steps: list[tuple[CaseResult, np.ndarray]], c: int, tau: float) -> int:
    """The case's total clicks when class c's Dice first reaches tau; the total after every correction where it
    never does (the cap)."""
    for result, counts in steps:
        if result.dice[c] >= tau:
            return int(counts.sum())
    return int(steps[-1][1].sum())


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def simulate_split(model: nn.Module, settings: InferenceSettings, dataset: Any, split: str,
                   protocol: InteractionProtocol, batch_size: int, device: torch.device, volume: str
                   ) -> dict[str, Any]:
    """The interaction section of metrics.json: protocol, per-case steps, the mean curve, NoC."""
    names = settings.class_names
    model = model.to(device).eval()
    cases = {}
    for case_id in dataset.case_ids(split):
        case = read_eval_case(dataset, case_id, settings.num_classes, volume)
        cases[case_id] = simulate_case(model, settings, case, protocol, batch_size, device)
    foreground = range(1, len(names))
    curve = []
    for step in range(protocol.corrections + 1):
        at = [steps[step] for steps in cases.values()]
        curve.append({"corrections": step, "mean_total_clicks": float(np.mean([int(n.sum()) for _, n in at])),
                      "dice": {names[c]: _mean([r.dice[c] for r, _ in at]) for c in foreground},
                      "hd95_mm": {names[c]: _mean([r.hd95[c] for r, _ in at]) for c in foreground}})
    holding = {c: [i for i, steps in cases.items() if steps[0][0].true_voxels[c] > 0] for c in foreground}
    return {
        "protocol": {"interaction": "sparse", **asdict(protocol), "description": __doc__.split("\n\n")[1]},
        "curve": curve,
        "noc": {f"{tau:.2f}": {names[c]: _mean([noc(cases[i], c, tau) for i in holding[c]]) for c in foreground}
                for tau in NOC_THRESHOLDS},
        "cases": {case_id: [{"total_clicks": int(n.sum()),
                             "dice": {names[c]: _mean([r.dice[c]]) for c in foreground},
                             "hd95_mm": {names[c]: _mean([r.hd95[c]]) for c in foreground}} for r, n in steps]
                  for case_id, steps in cases.items()},
    }
