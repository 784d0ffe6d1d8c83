"""Point prompts: sampling them from label slices, and mapping CT clicks to model-input pixels.

Slot order (fixed): for `num_classes` classes and `k` points per class there are
K = (num_classes - 1) * k slots; slot j belongs to foreground class 1 + j // k. A real point has
label 1, a padding slot (its class is absent from the slice) label -1 and coordinates (0, 0).
Points are (x, y) = (column, row) pixel coordinates; integers are pixel centres (SAM's
convention).

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


def sample_points(
    label: np.ndarray,
    num_classes: int,
    k: int,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """k points per foreground class from an H x W label slice.

    rng given: uniform random pixels of each class region (with replacement only if the region
    has fewer than k pixels). rng None: deterministic, the points farthest from the region's
    boundary, spread apart (`_interior_points`). Absent classes get padding slots.
    Returns points float32 K x 2 as (x, y) and labels int64 K (1 point, -1 padding).
    """
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"label must be a 2-D slice, got shape {label.shape}")
    if k < 0 or num_classes < 2:
        raise ValueError(f"need k >= 0 and num_classes >= 2, got k={k}, num_classes={num_classes}")
    points = np.zeros(((num_classes - 1) * k, 2), dtype=np.float32)
    labels = np.full((num_classes - 1) * k, PADDING_LABEL, dtype=np.int64)
    if k == 0:
        return points, labels
    for cls in range(1, num_classes):
        region = label == cls
        count = int(region.sum())
        if count == 0:
            continue
        if rng is None:
            row_col = _interior_points(region, k)
        else:
            flat = np.flatnonzero(region)
            chosen = rng.choice(flat, size=k, replace=count < k)
            row_col = np.stack(np.unravel_index(chosen, label.shape), axis=1)
        slots = slice((cls - 1) * k, cls * k)
        points[slots] = row_col[:, ::-1]
        labels[slots] = POINT_LABEL
    return points, labels


def sample_points_batch(
    labels: torch.Tensor | np.ndarray,
    num_classes: int,
    k: int,
    rng: np.random.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`sample_points` over a B x H x W batch: (points B x K x 2 float32, labels B x K int64)."""
    array = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    pairs = [sample_points(slice_, num_classes, k, rng) for slice_ in array]
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


def voxel_to_model(
    indices: np.ndarray, image: sitk.Image, size: int = 224
) -> tuple[np.ndarray, np.ndarray]:
    """N x 3 voxel indices (i, j, k) of `image`, as ITK orders them (ITK-SNAP shows i, j, k,
    0-based here) -> (canonical slice index int64 N, (x, y) float32 N x 2 on the size x size input).

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
    xy = np.stack(
        [(canonical[:, 0] + 0.5) * size / width - 0.5, (canonical[:, 1] + 0.5) * size / height - 0.5],
        axis=1,
    )
    return slices, xy.astype(np.float32)


def world_to_model(
    points_mm: np.ndarray, image: sitk.Image, size: int = 224
) -> tuple[np.ndarray, np.ndarray]:
    """N x 3 physical points (x, y, z) in mm, LPS as ITK uses them -> `voxel_to_model`."""
    points_mm = np.atleast_2d(np.asarray(points_mm, dtype=np.float64))
    if points_mm.shape[1] != 3:
        raise ValueError(f"world points must be N x 3, got shape {points_mm.shape}")
    indices = np.array(
        [image.TransformPhysicalPointToContinuousIndex(tuple(map(float, p))) for p in points_mm]
    ).reshape(-1, 3)
    try:
        return voxel_to_model(indices, image, size)
    except OutsideImageError as error:
        raise OutsideImageError(
            error.point,
            error.index,
            error.size,
            f"point {error.point}: world {format_position(points_mm[error.point])} mm is voxel "
            f"{format_position(error.index)}, outside the image {index_ranges(error.size)}",
        ) from None


def model_to_voxel(
    slice_index: np.ndarray, xy: np.ndarray, image: sitk.Image, size: int = 224
) -> np.ndarray:
    """Inverse of `voxel_to_model`: canonical slice and input-pixel (x, y) -> N x 3 indices of
    `image` (continuous; round them for voxel centres)."""
    xy = np.atleast_2d(np.asarray(xy, dtype=np.float64))
    slice_index = np.atleast_1d(np.asarray(slice_index, dtype=np.float64))
    grid = CanonicalGrid.of(image)
    width, height, _ = grid.size
    canonical = np.stack(
        [(xy[:, 0] + 0.5) * width / size - 0.5, (xy[:, 1] + 0.5) * height / size - 0.5, slice_index],
        axis=1,
    )
    return grid.from_canonical(canonical)


def model_to_world(
    slice_index: np.ndarray, xy: np.ndarray, image: sitk.Image, size: int = 224
) -> np.ndarray:
    """Inverse of `world_to_model`: N x 3 physical points in mm."""
    indices = model_to_voxel(slice_index, xy, image, size)
    return np.array(
        [image.TransformContinuousIndexToPhysicalPoint(tuple(map(float, i))) for i in indices]
    ).reshape(-1, 3)
