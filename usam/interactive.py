"""Few clicks, whole volume: prompted segmentation propagated from clicked slices to the rest of a volume.

The volume is a stack of canonical axial slices (``usam.predict.canonical_hu``). Clicks sit on a few slices
(`SliceClicks`: positive points per class, and negative points). Those slices are segmented with their clicks;
then each class travels slice by slice up and down on its own: the next slice is prompted, for that class, with k
points deep inside the class's predicted region on the slice before (`usam.prompts.interior_points`, at the same
model-input (x, y): the same world position in an axial stack), until the class vanishes or covers fewer than
`min_area` pixels at model resolution (that slice then drops the class from its prompt; a slice left with no
prompt counts as not reached). A slice's prompt holds,
per class, the user's clicks where that class was clicked there (clicked slices always win), else the propagated
points, else padding (or, prompt style released, slots filled as `usam.prompts.slots_from_clicks` does).
Slices no class reached get the unprompted prediction (null prompts).

Negative clicks enter the model as extra slots after the K class slots, label 0 (SAM's background point;
`PromptedSegmenter.check_prompts`). Whatever the model makes of them, the connected region of the clicked class
holding a negative click then becomes background on that slice (post-processing: the background logit is raised
above every class's there), unless it holds one of the user's own positive clicks of that class on that slice (a
contradiction: the model's output stands); propagated points do not shield a region, so a negative click where
propagation ran past a structure's end stops it there. Propagation continues from the corrected slice.

The image side of each slice (`encode_image`: the CNN path and the ViT) does not depend on prompts: a
`FeatureCache` runs it once per slice and keeps the features, so a corrective click re-runs only the prompt
decoder (`decode_prompts`), and only on the slices whose prompt changed (it keeps the logits of every slice and
prompt decoded). A model without that split (prompt-free, or a stand-in) is run whole each time.
Deterministic: no randomness anywhere, and slices are decoded in batches grouped so that a slice's prompts
never depend on another slice's.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from usam.inference import (
    InferenceSettings,
    class_argmax,
    inference_context,
    iter_batches,
    logits_to_labels,
    model_input,
)
from usam.prompts import AXIS_NAMES, CanonicalGrid, interior_points, slots_from_clicks

CLICKED = "clicked"
PROPAGATED = "propagated"
NEGATIVE_LABEL = 0  # SAM's background point


@dataclass
class SliceClicks:
    """One slice's clicks, (x, y) model-input points: `positive` and `negative` map a foreground class to its
    points in click order."""

    positive: dict[int, list[np.ndarray]] = field(default_factory=dict)
    negative: dict[int, list[np.ndarray]] = field(default_factory=dict)

    def negatives(self) -> list[tuple[int, np.ndarray]]:
        """(class, (x, y)) of every negative click, class by class in click order."""
        return [(c, xy) for c in sorted(self.negative) for xy in self.negative[c]]


def _stack_features(parts: list[Any]) -> Any:
    """Per-slice features (tensors, or dataclasses of tensors and tuples of tensors) -> one batch."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    values = {}
    for f in fields(first):
        items = [getattr(p, f.name) for p in parts]
        if isinstance(items[0], torch.Tensor):
            values[f.name] = torch.cat(items)
        elif isinstance(items[0], tuple) and items[0] and isinstance(items[0][0], torch.Tensor):
            values[f.name] = tuple(torch.cat(group) for group in zip(*items))
        else:
            values[f.name] = items[0]
    return type(first)(**values)


def _slice_of(features: Any, i: int) -> Any:
    return features[i : i + 1] if isinstance(features, torch.Tensor) else features.select(slice(i, i + 1))


class FeatureCache:
    """The image side of every slice of one volume, computed once on demand and kept on the device, and the
    logits of every (slice, prompt) decoded.

    `encoded` counts the slices whose image side has run, `decoded` those the prompt decoder ran on. With a model lacking `encode_image` the cache holds the
    model inputs (B x 1 x S x S) and `decode` runs the whole model.
    """

    def __init__(self, model: nn.Module, settings: InferenceSettings, hu: np.ndarray,
                 device: torch.device | str = "cpu", batch_size: int = 16) -> None:
        self.model, self.settings, self.hu = model, settings, hu
        self.device, self.batch_size = torch.device(device), batch_size
        self.split = hasattr(model, "encode_image") and hasattr(model, "decode_prompts")
        self.cache: dict[int, Any] = {}
        self.logits: dict[tuple, torch.Tensor] = {}  # (slice, prompt bytes) -> C x S x S
        self.labels: dict[tuple, np.ndarray] = {}  # `_State.keys` -> the slice's H x W uint8 labels
        self.encoded = self.decoded = 0

    def features(self, slices: list[int]) -> Any:
        """Features of canonical `slices` (in that order) as one batch, encoding those not yet cached."""
        missing = [s for s in slices if s not in self.cache]
        for batch in iter_batches(len(missing), self.batch_size):
            chosen = missing[batch]
            x = model_input(self.hu[chosen], self.settings, self.device)
            encoded = self._encode(x)
            for i, s in enumerate(chosen):
                self.cache[s] = _slice_of(encoded, i)
            self.encoded += len(chosen)
        return _stack_features([self.cache[s] for s in slices])

    def _encode(self, x: torch.Tensor) -> Any:
        if not self.split:
            return x
        with self._context():
            return self.model.encode_image(x)

    def decode(self, slices: list[int], points: torch.Tensor | None, point_labels: torch.Tensor | None
               ) -> torch.Tensor:
        """Float32 logits B x C x S x S of canonical `slices` with points B x K' x 2 and labels B x K' (or None).

        A slice decoded before with the same prompt is not decoded again: its logits are kept (`decoded` counts
        the slices the decoder actually ran on)."""
        keys = [(s,) if points is None else (s, points[i].numpy().tobytes(), point_labels[i].numpy().tobytes())
                for i, s in enumerate(slices)]
        missing = [i for i, key in enumerate(keys) if key not in self.logits]
        if missing:
            chosen = [slices[i] for i in missing]
            features = self.features(chosen)
            p = None if points is None else points[missing].to(self.device)
            lab = None if points is None else point_labels[missing].to(self.device)
            with self._context():
                if self.split:
                    logits = self.model.decode_prompts(features, p, lab)
                else:
                    logits = self.model(features, p, lab)
            for j, i in enumerate(missing):
                self.logits[keys[i]] = logits[j].float()
            self.decoded += len(missing)
        return torch.stack([self.logits[key] for key in keys])

    def _context(self) -> Any:
        """`usam.inference.inference_context`, as `usam.inference.forward_logits` runs the model."""
        return inference_context(self.device)


@dataclass
class Propagation:
    """`propagate`'s result: `labels` (slices, H, W) uint8 on the slices' own grid; `reached[c][s]` how class c
    reached canonical slice s (CLICKED or PROPAGATED); `decodes` the slices the prompt decoder ran on (a slice decoded
    with the same prompt in an earlier call on the same cache is not decoded again)."""

    labels: np.ndarray
    reached: dict[int, dict[int, str]]
    decodes: int = 0


@dataclass
class _State:
    """Propagation in progress: per slice the positive points per class, how each class got there, logits."""

    clicks: Mapping[int, SliceClicks]
    positive: dict[int, dict[int, list[np.ndarray]]] = field(default_factory=dict)
    reached: dict[int, dict[int, str]] = field(default_factory=dict)
    logits: dict[int, torch.Tensor] = field(default_factory=dict)
    # what each slice's logits depend on: (slice, prompt bytes, the classes the user clicked there); (slice,) unprompted
    keys: dict[int, tuple] = field(default_factory=dict)


def _slice_prompt(state: _State, s: int, num_classes: int, k: int, settings: InferenceSettings
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Slice s's prompt: the K class slots (`slots_from_clicks`), then one label-0 slot per negative click."""
    points, labels = slots_from_clicks(state.positive.get(s, {}), num_classes, k, settings.protocol())
    negatives = state.clicks[s].negatives() if s in state.clicks else []
    if negatives:
        extra = np.array([xy for _, xy in negatives], dtype=np.float32)
        if settings.point_order == "rowcol":
            extra = np.ascontiguousarray(extra[:, ::-1])
        points = np.concatenate([points, extra])
        labels = np.concatenate([labels, np.full(len(extra), NEGATIVE_LABEL, dtype=np.int64)])
    return points, labels


def _remove_negatives(logits: torch.Tensor, negatives: list[tuple[int, np.ndarray]],
                      clicked: Mapping[int, list[np.ndarray]]) -> torch.Tensor:
    """C x S x S logits with, for each negative click (class c, (x, y)), the connected class-c region holding the
    click made background (its background logit raised above every class's), unless the region holds one of the user's own positive clicks of c
    on this slice (`clicked`; the two clicks then contradict each other and the model's output stands)."""
    size = logits.shape[-1]

    def pixel(xy: np.ndarray) -> tuple[int, int]:
        col, row = (int(np.clip(np.rint(v), 0, size - 1)) for v in xy)
        return row, col

    for c, xy in negatives:
        components, _ = ndimage.label((class_argmax(logits, 0) == c).cpu().numpy())
        region = components[pixel(xy)]
        if not region or any(components[pixel(p)] == region for p in clicked.get(c, [])):
            continue
        logits = logits.clone()
        logits[0] = torch.where(torch.from_numpy(components == region).to(logits.device), logits.max() + 1.0,
                                logits[0])
    return logits


def _decode(cache: FeatureCache, state: _State, slices: Iterable[int]) -> None:
    """Decode `slices` with their current prompts, grouped by prompt length, in batches; negatives removed."""
    settings = cache.settings
    prompts = {s: _slice_prompt(state, s, settings.num_classes, settings.points_per_class, settings)
               for s in sorted(slices)}
    for length in sorted({len(p[1]) for p in prompts.values()}):
        group = [s for s in prompts if len(prompts[s][1]) == length]
        for batch in iter_batches(len(group), cache.batch_size):
            chosen = group[batch]
            points = torch.from_numpy(np.stack([prompts[s][0] for s in chosen]))
            labels = torch.from_numpy(np.stack([prompts[s][1] for s in chosen]))
            logits = cache.decode(chosen, points, labels)
            for i, s in enumerate(chosen):
                on_slice = state.clicks.get(s, SliceClicks())
                state.logits[s] = _remove_negatives(logits[i], on_slice.negatives(), on_slice.positive)
                state.keys[s] = (s, points[i].numpy().tobytes(), labels[i].numpy().tobytes(),
                                 tuple(sorted(on_slice.positive)))


def _area(state: _State, s: int, c: int) -> np.ndarray:
    """Slice s's predicted class-c region at model resolution (S x S bool)."""
    return (class_argmax(state.logits[s], 0) == c).cpu().numpy()


def _start(state: _State) -> list[tuple[int, int, int]]:
    """Seed the state from the clicks; the fronts (class, slice, direction) leaving each clicked slice."""
    fronts = []
    for s in sorted(state.clicks):
        for c in sorted(state.clicks[s].positive):
            if state.clicks[s].positive[c]:
                state.positive.setdefault(s, {})[c] = list(state.clicks[s].positive[c])
                state.reached.setdefault(c, {})[s] = CLICKED
                fronts += [(c, s, -1), (c, s, 1)]
    return fronts


def _advance(state: _State, fronts: list[tuple[int, int, int]], n: int, k: int, min_area: int
             ) -> tuple[list[tuple[int, int, int]], set[int]]:
    """Each front whose class still covers `min_area` pixels on its slice prompts the next slice with k interior
    points of that region; returns the new fronts and the slices to decode."""
    entering, dirty = [], set()
    for c, s, d in sorted(fronts):
        t = s + d
        region = _area(state, s, c)
        if int(region.sum()) < max(min_area, 1) or not 0 <= t < n or t in state.reached[c]:
            continue
        state.positive.setdefault(t, {})[c] = list(interior_points(region, k))
        state.reached[c][t] = PROPAGATED
        entering.append((c, t, d))
        dirty.add(t)
    return entering, dirty


def _drop_small(state: _State, entering: list[tuple[int, int, int]], min_area: int) -> set[int]:
    """Classes that entered a slice but cover fewer than `min_area` pixels there leave its prompt; returns the
    slices to decode again."""
    dirty = set()
    for c, t, _ in entering:
        if int(_area(state, t, c).sum()) < max(min_area, 1):
            del state.positive[t][c]
            del state.reached[c][t]
            dirty.add(t)
    for t in sorted(dirty):
        if not state.positive[t] and t not in state.clicks:  # no prompt left: the slice counts as not reached
            del state.positive[t], state.logits[t]
            dirty.discard(t)
    return dirty


def propagate(cache: FeatureCache, clicks: Mapping[int, SliceClicks], min_area: int = 20, travel: bool = True
              ) -> Propagation:
    """Segment the cached volume from `clicks` ({canonical slice: SliceClicks}) by propagation (module docstring).

    `min_area`: pixels at model resolution below which a class stops travelling. `travel` False: only the clicked
    slices are segmented, the others stay background. Returns `Propagation`.
    """
    settings, n, decoded = cache.settings, len(cache.hu), cache.decoded
    state = _State(clicks)
    fronts = _start(state)
    if not travel:
        fronts = []
    _decode(cache, state, state.clicks)
    while fronts:
        entering, dirty = _advance(state, fronts, n, settings.points_per_class, min_area)
        if not dirty:
            break
        _decode(cache, state, dirty)
        dropped = _drop_small(state, entering, min_area)
        if dropped:
            _decode(cache, state, dropped)
        fronts = [f for f in entering if f[1] in state.reached[f[0]]]
    labels = _labels(cache, state, unprompted_rest=travel)
    reached = {c: dict(sorted(v.items())) for c, v in sorted(state.reached.items())}
    return Propagation(labels, reached, cache.decoded - decoded)


def _labels(cache: FeatureCache, state: _State, unprompted_rest: bool) -> np.ndarray:
    """(slices, H, W) uint8: prompted slices from their logits, the others unprompted (or background). Labels are
    kept in the cache by `_State.keys`, so a slice whose logits did not change is not resized again."""
    n, height, width = cache.hu.shape
    out = np.zeros((n, height, width), dtype=np.uint8)
    rest = [s for s in range(n) if s not in state.logits] if unprompted_rest else []
    for batch in iter_batches(len(rest), cache.batch_size):
        chosen = rest[batch]
        logits = cache.decode(chosen, None, None)
        for i, s in enumerate(chosen):
            state.logits[s], state.keys[s] = logits[i], (s,)
    todo = [s for s in sorted(state.logits) if state.keys[s] not in cache.labels]
    for batch in iter_batches(len(todo), cache.batch_size):
        chosen = todo[batch]
        logits = torch.stack([state.logits[s] for s in chosen])
        labels = logits_to_labels(logits, height, width, cache.settings.corner_aligned).cpu().numpy()
        for i, s in enumerate(chosen):
            cache.labels[state.keys[s]] = labels[i]
    for s in state.logits:
        out[s] = cache.labels[state.keys[s]]
    return out


def slice_ranges(grid: CanonicalGrid, slices: Iterable[int]) -> str:
    """Canonical slices -> the image's own indices as runs, e.g. 'k=5..11, 13..20'."""
    indices = sorted(grid.image_slice(s) for s in slices)
    runs: list[list[int]] = []
    for i in indices:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    text = ", ".join(f"{a}" if a == b else f"{a}..{b}" for a, b in runs)
    return f"{AXIS_NAMES[grid.slice_axis]}={text}"


def reach_lines(result: Propagation, grid: CanonicalGrid, class_names: tuple[str, ...]) -> list[str]:
    """One line per class: which slices were clicked and which were reached by propagation."""
    lines = []
    for c in range(1, len(class_names)):
        how = result.reached.get(c, {})
        clicked = [s for s, h in how.items() if h == CLICKED]
        propagated = [s for s, h in how.items() if h == PROPAGATED]
        if not clicked:
            lines.append(f"class {class_names[c]}: not clicked (unprompted)")
            continue
        text = f"class {class_names[c]}: clicked {slice_ranges(grid, clicked)}"
        text += f"; propagated {slice_ranges(grid, propagated)}" if propagated else "; propagated to no slice"
        lines.append(text)
    return lines

