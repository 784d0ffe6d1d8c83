"""Point prompts: sampling them from label slices, and mapping CT clicks to model-input pixels.

Slot order (fixed): for `num_classes` classes and `k` points per class there are
K = (num_classes - 1) * k slots in groups of k, group c - 1 for foreground class c. How the groups are
filled is the prompt protocol (`PromptProtocol`):

- style ``classwise`` (ours): group c - 1 holds points of class c; the slots of a class absent from the
  slice are padding (label -1, coordinates (0, 0)). With the model's class embedding the prompts tell the
  model which classes the slice holds.
- style ``released`` (the authors' released code): every slot is a positive point (label 1); the group of an
  absent class holds points of a present class, so the prompts carry no class identity and no padding. Only
  k = 1, 3 or 5 (the released code's choices).

Deterministic (evaluation) points are placed ``interior`` (ours: deepest inside the region, spread apart) or
``raster`` (the released code: pixels 0, 4 step and 8 step of the region in raster order for k = 3, with
step = pixels // 10). Points are (x, y) = (column, row) pixel coordinates as SAM expects (axis order
``xy``), or (row, column) as the released code passes them (``rowcol``); integers are pixel centres.

Model-input coordinates: the canonical slice is axial slice `s` of the volume oriented with
``SimpleITK.DICOMOrient(image, "LPS")`` (row 0 = patient anterior, column 0 = patient right,
slice index increasing towards superior), H x W resized to `size` x `size` as
``F.interpolate(..., align_corners=False)`` does, so pixel centres map as
``x_model = (column + 0.5) * size / W - 0.5`` and ``y_model = (row + 0.5) * size / H - 0.5``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage

PADDING_LABEL = -1
POINT_LABEL = 1
AXIS_NAMES = "ijk"

PROMPT_STYLES = ("classwise", "released")
PLACEMENTS = ("interior", "raster")
AXIS_ORDERS = ("xy", "rowcol")
RELEASED_POINT_COUNTS = (0, 1, 3, 5)
# The released code picks a class's k points from a group of 5 candidates: k = 1 the middle one, 3 every
# other one, 5 all of them.
_GROUP_PICKS = {1: [2], 3: [0, 2, 4], 5: [0, 1, 2, 3, 4]}


@dataclass(frozen=True)
class PromptProtocol:
    """How point prompts are built from labels (module docstring): `style` (classwise | released),
    `placement` of deterministic points (interior | raster), `axis_order` of the coordinates (xy | rowcol).
    The default is ours."""

    style: str = "classwise"
    placement: str = "interior"
    axis_order: str = "xy"

    def check(self, k: int) -> None:
        """Raise ValueError, one line, for an unknown value or a point count the protocol cannot place."""
        for name, value, allowed in (("prompt style", self.style, PROMPT_STYLES),
                                     ("point placement", self.placement, PLACEMENTS),
                                     ("point axis order", self.axis_order, AXIS_ORDERS)):
            if value not in allowed:
                raise ValueError(f"{name} {value!r}: use one of {', '.join(allowed)}")
        needs_released_counts = self.style == "released" or self.placement == "raster"
        if needs_released_counts and k not in RELEASED_POINT_COUNTS:
            what = "prompt style released" if self.style == "released" else "point placement raster"
            raise ValueError(f"{what} reproduces the released code, which takes 1, 3 or 5 points per class "
                             f"(or 0: unprompted), not {k}")


DEFAULT_PROTOCOL = PromptProtocol()


def format_position(values: np.ndarray | tuple[float, ...] | list[float]) -> str:
    """(40, 40, 25) or (40.25, 3, -1.5): whole numbers without decimals, others to 2 decimals."""
    return "(" + ", ".join(f"{round(float(v), 2):g}" for v in values) + ")"


def index_ranges(size: tuple[int, ...], base: int = 0) -> str:
    """The valid voxel indices per axis, e.g. (0..95, 0..95, 0..19) for base 0."""
    return "(" + ", ".join(f"{base}..{n - 1 + base}" for n in size) + ")"


class OutsideImageError(ValueError):
    """A click outside the image. `point`: its position in the list; `index`: its continuous 0-based
    voxel index (i, j, k) of the image; `size`: the image's size (i, j, k)."""

    def __init__(self, point: int, index: np.ndarray, size: tuple[int, int, int], message: str | None = None):
        self.point = int(point)
        self.index = tuple(float(v) for v in index)
        self.size = tuple(int(n) for n in size)
        super().__init__(
            message
            or f"point {self.point}: voxel {format_position(self.index)} outside the image {index_ranges(self.size)}"
        )


def slot_classes(num_classes: int, k: int) -> np.ndarray:
    """The foreground class of each of the K = (num_classes - 1) * k slots."""
    return np.repeat(np.arange(1, num_classes, dtype=np.int64), k)


def _interior_points(region: np.ndarray, k: int) -> np.ndarray:
    """k (row, col) pixels of `region`, deterministic: deep inside it and spread apart.

    Each pick maximises min(distance to the region's boundary, distance to earlier picks);
    ties go to the first pixel in row-major order. A region with fewer than k pixels repeats
    its points.
    """
    rows, cols = np.nonzero(region)
    top, left = rows.min(), cols.min()
    crop = np.pad(region[top : rows.max() + 1, left : cols.max() + 1], 1)
    to_boundary = ndimage.distance_transform_edt(crop)
    chosen = np.zeros_like(crop)
    picks: list[tuple[int, int]] = []
    for _ in range(k):
        score = to_boundary if not picks else np.minimum(
            to_boundary, ndimage.distance_transform_edt(~chosen)
        )
        flat = int(np.argmax(np.where(crop, score, -1.0)))
        r, c = divmod(flat, crop.shape[1])
        if picks and score[r, c] <= 0:
            break
        chosen[r, c] = True
        picks.append((r, c))
    picks = [picks[i % len(picks)] for i in range(k)]
    return np.array([(r - 1 + top, c - 1 + left) for r, c in picks], dtype=np.int64)


def interior_points(region: np.ndarray, k: int) -> np.ndarray:
    """k (x, y) = (column, row) float32 points deep inside the H x W boolean `region` (non-empty), placed as the
    deterministic ``interior`` evaluation points are (`_interior_points`)."""
    return _interior_points(region, k)[:, ::-1].astype(np.float32)


def _raster_points(region: np.ndarray, m: int) -> np.ndarray:
    """m (row, col) pixels of `region` as the released code's evaluation takes them: pixel i * step in raster
    (row-major) order, i = 0 .. m - 1, step = pixels // m (step 0 repeats the first pixel)."""
    rows, cols = np.nonzero(region)
    chosen = np.arange(m) * (len(rows) // m)
    return np.stack([rows[chosen], cols[chosen]], axis=1).astype(np.int64)


def random_pixels(region: np.ndarray, m: int, rng: np.random.Generator) -> np.ndarray:
    """m uniform random (row, col) pixels of `region`, distinct unless it has fewer than m pixels."""
    flat = np.flatnonzero(region)
    chosen = rng.choice(flat, size=m, replace=len(flat) < m)
    return np.stack(np.unravel_index(chosen, region.shape), axis=1).astype(np.int64)


def _candidate_count(num_foreground: int) -> int:
    """Candidates per present class in the released code: 10 for CARE's two foreground classes, else 5 (WORD)."""
    return 10 if num_foreground == 2 else 5


def _candidates(region: np.ndarray, m: int, rng: np.random.Generator | None, placement: str) -> np.ndarray:
    """m candidate (row, col) pixels of a class: random with `rng`, else placed as `placement` says."""
    if rng is not None:
        return random_pixels(region, m, rng)
    return _raster_points(region, m) if placement == "raster" else _interior_points(region, m)


def _group(candidates: np.ndarray, num_foreground: int) -> np.ndarray:
    """A present class's group of 5 candidates: every other one of its 10 (two foreground classes), else all 5."""
    return candidates[0::2] if num_foreground == 2 else candidates


def _classwise_slots(label: np.ndarray, num_classes: int, k: int, rng: np.random.Generator | None,
                     placement: str) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) K x 2 and labels K: group c - 1 from class c, absent classes padded."""
    row_col = np.zeros(((num_classes - 1) * k, 2), dtype=np.int64)
    labels = np.full((num_classes - 1) * k, PADDING_LABEL, dtype=np.int64)
    if k == 0:
        return row_col, labels
    for cls in range(1, num_classes):
        region = label == cls
        if not region.any():
            continue
        if rng is not None:
            picks = random_pixels(region, k, rng)
        elif placement == "raster":
            m = _candidate_count(num_classes - 1)
            picks = _group(_raster_points(region, m), num_classes - 1)[_GROUP_PICKS[k]]
        else:
            picks = _interior_points(region, k)
        slots = slice((cls - 1) * k, cls * k)
        row_col[slots] = picks
        labels[slots] = POINT_LABEL
    return row_col, labels


def _released_slots(label: np.ndarray, num_classes: int, k: int, rng: np.random.Generator | None,
                    placement: str) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) K x 2 and labels K as the released code builds them: every slot a positive point.

    Two foreground classes (its CARE loader): 10 candidates per present class; both present, each group is
    every other candidate of its class; one present, its candidates 0-4 fill the first group, 5-9 the second.
    Otherwise (its WORD loader): 5 candidates per class holding at least 5 pixels, groups filled by cycling
    through the present classes. Each group's k points are its candidates `_GROUP_PICKS[k]`. A slice with no
    present class (the released code never sees one: it skips such slices) gets padding only.
    """
    num_foreground = num_classes - 1
    row_col = np.zeros((num_foreground * k, 2), dtype=np.int64)
    labels = np.full(num_foreground * k, PADDING_LABEL, dtype=np.int64)
    m = _candidate_count(num_foreground)
    present = [c for c in range(1, num_classes) if int((label == c).sum()) >= (1 if num_foreground == 2 else m)]
    if k == 0 or not present:
        return row_col, labels
    candidates = {c: _candidates(label == c, m, rng, placement) for c in present}
    if num_foreground == 2 and len(present) == 1:
        only = candidates[present[0]]
        groups = [only[:5], only[5:]]
    else:
        groups = [_group(candidates[present[j % len(present)]], num_foreground) for j in range(num_foreground)]
    for j, group in enumerate(groups):
        row_col[j * k:(j + 1) * k] = group[_GROUP_PICKS[k]]
    labels[:] = POINT_LABEL
    return row_col, labels


def sample_points(
    label: np.ndarray,
    num_classes: int,
    k: int,
    rng: np.random.Generator | None = None,
    protocol: PromptProtocol = DEFAULT_PROTOCOL,
) -> tuple[np.ndarray, np.ndarray]:
    """k points per foreground class slot from an H x W label slice, built as `protocol` says.

    rng given (training): uniform random pixels of each class region (classwise: with replacement only if
    the region has fewer than k pixels; released: the released code's distinct candidates). rng None
    (evaluation): deterministic, placed as `protocol.placement` says (interior: `_interior_points`; raster:
    `_raster_points`). Classwise: absent classes get padding slots; released: see `_released_slots`.
    Returns points float32 K x 2 ((x, y), or (row, col) for axis order rowcol) and labels int64 K
    (1 point, -1 padding).
    """
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"label must be a 2-D slice, got shape {label.shape}")
    if k < 0 or num_classes < 2:
        raise ValueError(f"need k >= 0 and num_classes >= 2, got k={k}, num_classes={num_classes}")
    protocol.check(k)
    fill = _released_slots if protocol.style == "released" else _classwise_slots
    row_col, labels = fill(label, num_classes, k, rng, protocol.placement)
    points = row_col[:, ::-1] if protocol.axis_order == "xy" else row_col
    return points.astype(np.float32), labels


def slots_from_clicks(clicks: dict[int, list[np.ndarray]], num_classes: int, k: int,
                      protocol: PromptProtocol = DEFAULT_PROTOCOL) -> tuple[np.ndarray, np.ndarray]:
    """One slice's prompts from user clicks: `clicks` maps a foreground class to its (x, y) model-input points
    (at most k each, in click order) -> (points K x 2 float32, labels K int64), in `protocol`'s axis order.

    Classwise: class c's clicks fill the first slots of its group, the rest are padding. Released: every slot is
    a point; group c - 1 takes class c's clicks if it has any, else those of a clicked class (cycling through
    them), each group's clicks repeated in turn to fill its k slots.
    """
    points = np.zeros(((num_classes - 1) * k, 2), dtype=np.float32)
    labels = np.full((num_classes - 1) * k, PADDING_LABEL, dtype=np.int64)
    clicked = [c for c in range(1, num_classes) if clicks.get(c)]
    for c in range(1, num_classes):
        if protocol.style == "released" and clicked:
            chosen = clicks[c] if c in clicked else clicks[clicked[(c - 1) % len(clicked)]]
            chosen = [chosen[i % len(chosen)] for i in range(k)]
        else:
            chosen = clicks.get(c, [])
        for i, xy in enumerate(chosen):
            points[(c - 1) * k + i] = xy
            labels[(c - 1) * k + i] = POINT_LABEL
    if protocol.axis_order == "rowcol":
        points = np.ascontiguousarray(points[:, ::-1])
    return points, labels


def sample_points_batch(
    labels: torch.Tensor | np.ndarray,
    num_classes: int,
    k: int,
    rng: np.random.Generator | None = None,
    protocol: PromptProtocol = DEFAULT_PROTOCOL,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`sample_points` over a B x H x W batch: (points B x K x 2 float32, labels B x K int64)."""
    array = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    pairs = [sample_points(slice_, num_classes, k, rng, protocol) for slice_ in array]
    if not pairs:
        size = (num_classes - 1) * k
        return torch.zeros(0, size, 2), torch.zeros(0, size, dtype=torch.int64)
    return (
        torch.from_numpy(np.stack([p for p, _ in pairs])),
        torch.from_numpy(np.stack([lab for _, lab in pairs])),
    )


@dataclass(frozen=True)
class CanonicalGrid:
    """How an image's voxel indices map to those of ``DICOMOrient(image, "LPS")``.

    Canonical axis a is the image's axis `permute[a]`, reversed where `flip[a]`.
    `size` is the canonical (W, H, number of slices).
    """

    permute: tuple[int, int, int]
    flip: tuple[bool, bool, bool]
    image_size: tuple[int, int, int]

    @classmethod
    def of(cls, image: sitk.Image) -> "CanonicalGrid":
        if image.GetDimension() != 3:
            raise ValueError(f"need a 3-D image, got {image.GetDimension()}-D")
        orient = sitk.DICOMOrientImageFilter()
        orient.SetDesiredCoordinateOrientation("LPS")
        probe = sitk.Image([2, 2, 2], sitk.sitkUInt8)  # the orientation depends on direction only
        probe.SetDirection(image.GetDirection())
        orient.Execute(probe)
        return cls(
            tuple(int(a) for a in orient.GetPermuteOrder()),
            tuple(bool(f) for f in orient.GetFlipAxes()),
            tuple(int(s) for s in image.GetSize()),
        )

    @property
    def size(self) -> tuple[int, int, int]:
        return tuple(self.image_size[p] for p in self.permute)

    @property
    def slice_axis(self) -> int:
        """The image axis (0 = i, 1 = j, 2 = k) along which the canonical axial slices are stacked."""
        return self.permute[2]

    def image_slice(self, canonical_slice: int) -> int:
        """Canonical axial slice index -> the image's own 0-based index along `slice_axis`."""
        return self.size[2] - 1 - int(canonical_slice) if self.flip[2] else int(canonical_slice)

    def slice_name(self, canonical_slice: int) -> str:
        """'k=12': the image's own axis name and 0-based index of a canonical axial slice."""
        return f"{AXIS_NAMES[self.slice_axis]}={self.image_slice(canonical_slice)}"

    def to_canonical(self, index: np.ndarray) -> np.ndarray:
        """N x 3 (continuous) image indices (i, j, k) -> canonical indices (column, row, slice)."""
        out = index[:, list(self.permute)].astype(np.float64)
        for axis, flipped in enumerate(self.flip):
            if flipped:
                out[:, axis] = self.size[axis] - 1 - out[:, axis]
        return out

    def from_canonical(self, canonical: np.ndarray) -> np.ndarray:
        """Inverse of `to_canonical`."""
        out = canonical.astype(np.float64).copy()
        for axis, flipped in enumerate(self.flip):
            if flipped:
                out[:, axis] = self.size[axis] - 1 - out[:, axis]
        index = np.empty_like(out)
        index[:, list(self.permute)] = out
        return index


def _to_model(coordinate: np.ndarray, length: int, size: int, corner_aligned: bool) -> np.ndarray:
    """A canonical pixel coordinate along an axis of `length` pixels -> its place on the `size` model grid: pixel
    edges aligned (``F.interpolate(align_corners=False)``), or corner pixels aligned (the released code's zoom)."""
    if corner_aligned:
        return coordinate * (size - 1) / max(length - 1, 1)
    return (coordinate + 0.5) * size / length - 0.5


def _from_model(coordinate: np.ndarray, length: int, size: int, corner_aligned: bool) -> np.ndarray:
    """Inverse of `_to_model`."""
    if corner_aligned:
        return coordinate * max(length - 1, 1) / (size - 1)
    return (coordinate + 0.5) * length / size - 0.5


def pixel_to_model(row_col: np.ndarray, height: int, width: int, size: int = 224, corner_aligned: bool = False
                   ) -> np.ndarray:
    """N x 2 (row, column) pixels of a canonical H x W slice -> N x 2 float32 (x, y) on the size x size input."""
    row_col = np.atleast_2d(np.asarray(row_col, dtype=np.float64))
    return np.stack([_to_model(row_col[:, 1], width, size, corner_aligned),
                     _to_model(row_col[:, 0], height, size, corner_aligned)], axis=1).astype(np.float32)


def voxel_to_model(
    indices: np.ndarray, image: sitk.Image, size: int = 224, corner_aligned: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """N x 3 voxel indices (i, j, k) of `image`, as ITK orders them (ITK-SNAP shows i, j, k,
    0-based here) -> (canonical slice index int64 N, (x, y) float32 N x 2 on the size x size input),
    for a resize with pixel edges aligned or (`corner_aligned`) corner pixels aligned.

    Raises OutsideImageError (a ValueError) for a point outside the volume, naming it by the
    image's own indices and valid ranges.
    """
    indices = np.atleast_2d(np.asarray(indices, dtype=np.float64))
    if indices.shape[1] != 3:
        raise ValueError(f"voxel indices must be N x 3, got shape {indices.shape}")
    grid = CanonicalGrid.of(image)
    canonical = grid.to_canonical(indices)
    width, height, depth = grid.size
    slices = np.floor(canonical[:, 2] + 0.5).astype(np.int64)
    for n, (c, s) in enumerate(zip(canonical, slices)):
        inside = -0.5 <= c[0] < width - 0.5 and -0.5 <= c[1] < height - 0.5 and 0 <= s < depth
        if not inside:
            raise OutsideImageError(n, indices[n], grid.image_size)
    xy = np.stack([_to_model(canonical[:, 0], width, size, corner_aligned),
                   _to_model(canonical[:, 1], height, size, corner_aligned)], axis=1)
    return slices, xy.astype(np.float32)


def world_to_model(
    points_mm: np.ndarray, image: sitk.Image, size: int = 224, corner_aligned: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """N x 3 physical points (x, y, z) in mm, LPS as ITK uses them -> `voxel_to_model`."""
    points_mm = np.atleast_2d(np.asarray(points_mm, dtype=np.float64))
    if points_mm.shape[1] != 3:
        raise ValueError(f"world points must be N x 3, got shape {points_mm.shape}")
    indices = np.array(
        [image.TransformPhysicalPointToContinuousIndex(tuple(map(float, p))) for p in points_mm]
    ).reshape(-1, 3)
    try:
        return voxel_to_model(indices, image, size, corner_aligned)
    except OutsideImageError as error:
        raise OutsideImageError(
            error.point,
            error.index,
            error.size,
            f"point {error.point}: world {format_position(points_mm[error.point])} mm is voxel "
            f"{format_position(error.index)}, outside the image {index_ranges(error.size)}",
        ) from None


def model_to_voxel(
    slice_index: np.ndarray, xy: np.ndarray, image: sitk.Image, size: int = 224, corner_aligned: bool = False
) -> np.ndarray:
    """Inverse of `voxel_to_model`: canonical slice and input-pixel (x, y) -> N x 3 indices of
    `image` (continuous; round them for voxel centres)."""
    xy = np.atleast_2d(np.asarray(xy, dtype=np.float64))
    slice_index = np.atleast_1d(np.asarray(slice_index, dtype=np.float64))
    grid = CanonicalGrid.of(image)
    width, height, _ = grid.size
    canonical = np.stack(
        [_from_model(xy[:, 0], width, size, corner_aligned), _from_model(xy[:, 1], height, size, corner_aligned),
         slice_index],
        axis=1,
    )
    return grid.from_canonical(canonical)


def model_to_world(
    slice_index: np.ndarray, xy: np.ndarray, image: sitk.Image, size: int = 224, corner_aligned: bool = False
) -> np.ndarray:
    """Inverse of `world_to_model`: N x 3 physical points in mm."""
    indices = model_to_voxel(slice_index, xy, image, size, corner_aligned)
    return np.array(
        [image.TransformContinuousIndexToPhysicalPoint(tuple(map(float, i))) for i in indices]
    ).reshape(-1, 3)
