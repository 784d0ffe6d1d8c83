"""Segmentation metrics: Dice and IoU from confusion counts, surface Hausdorff distance in mm.

Conventions (docs/evaluation.md): a class absent from both truth and prediction has an undefined
Dice/IoU (NaN, excluded from means and counted); absent from the truth but predicted gives 0; present
in the truth but not predicted gives 0. The Hausdorff distance is NaN when either surface is empty;
the penalised HD95 gives a miss or a false positive the diagonal of the volume's field of view instead.
Distances use the regular grid's spacing, or, for a volume whose slices are off that grid (uneven gaps, gantry
tilt), each slice's true position (``SlicePositions``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from scipy.spatial import cKDTree
from scipy.spatial.distance import pdist

ArrayLike = np.ndarray | torch.Tensor


@dataclass(frozen=True)
class SlicePositions:
    """Where the voxels of a (Z, Y, X) volume truly are: voxel (z, y, x) at ``origins[z] + y * row_step +
    x * column_step`` (mm). ``origins`` (Z, 3) may be NaN for slices holding no voxel to measure (gaps);
    ``slice_step`` (3,) is one slice's thickness along the slice normal (the grid's slice spacing)."""

    origins: np.ndarray
    row_step: np.ndarray
    column_step: np.ndarray
    slice_step: np.ndarray

    def points(self, index: np.ndarray) -> np.ndarray:
        """(N, 3) positions in mm of the voxels at ``index`` (N, 3) (z, y, x)."""
        return (self.origins[index[:, 0]] + index[:, 1:2] * self.row_step[None]
                + index[:, 2:3] * self.column_step[None])

    def cropped(self, box: tuple[slice, slice, slice]) -> SlicePositions:
        """The positions of ``volume[box]`` (slices with explicit starts)."""
        z, y, x = box
        origins = self.origins[z] + y.start * self.row_step + x.start * self.column_step
        return SlicePositions(origins, self.row_step, self.column_step, self.slice_step)

    def field_of_view_diagonal(self, rows: int, columns: int) -> float:
        """Largest distance in mm between two corners of the voxels of the measured slices (``rows`` x
        ``columns`` each): for slices on a regular grid, ``field_of_view_diagonal`` of the volume."""
        origins = self.origins[~np.isnan(self.origins).any(axis=1)]
        start = origins - 0.5 * (self.row_step + self.column_step + self.slice_step)
        corners = [start + a * rows * self.row_step + b * columns * self.column_step + c * self.slice_step
                   for a in (0, 1) for b in (0, 1) for c in (0, 1)]
        return float(pdist(np.concatenate(corners)).max())


def confusion_matrix(pred: ArrayLike, truth: ArrayLike, num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) int64 counts, rows = predicted class, columns = true class.

    pred, truth: integer label arrays of the same shape (numpy or torch, any device); values must lie
    in 0..num_classes-1.
    """
    if isinstance(pred, torch.Tensor) or isinstance(truth, torch.Tensor):
        return confusion_tensor(torch.as_tensor(pred), truth, num_classes).cpu().numpy().astype(np.int64)
    _check_shapes(pred, truth)
    p = np.asarray(pred).reshape(-1).astype(np.int64)
    t = np.asarray(truth).reshape(-1).astype(np.int64)
    counts = np.bincount(p * num_classes + t, minlength=num_classes * num_classes)
    _check_count_size(counts.size, num_classes)
    return counts.reshape(num_classes, num_classes).astype(np.int64)


def confusion_tensor(pred: torch.Tensor, truth: ArrayLike, num_classes: int) -> torch.Tensor:
    """`confusion_matrix` as an int64 tensor on pred's device, which training sums step by step without
    copying it to the host."""
    _check_shapes(pred, truth)
    p = pred.reshape(-1).long()
    t = torch.as_tensor(truth, device=p.device).reshape(-1).long()
    counts = torch.bincount(p * num_classes + t, minlength=num_classes * num_classes)
    _check_count_size(counts.numel(), num_classes)
    return counts.view(num_classes, num_classes)


def _check_shapes(pred: ArrayLike, truth: ArrayLike) -> None:
    if tuple(pred.shape) != tuple(truth.shape):
        raise ValueError(f"prediction {tuple(pred.shape)} and truth {tuple(truth.shape)} differ in shape")


def _check_count_size(size: int, num_classes: int) -> None:
    if size != num_classes * num_classes:
        raise ValueError(f"label values outside 0..{num_classes - 1}")


def overlap_counts(confusion: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per class (intersection, predicted voxels, true voxels) from a confusion matrix."""
    confusion = np.asarray(confusion, dtype=np.int64)
    return np.diag(confusion).copy(), confusion.sum(axis=1), confusion.sum(axis=0)


def dice_from_confusion(confusion: np.ndarray) -> np.ndarray:
    """Per-class Dice 2|P∩T| / (|P| + |T|); NaN where the class is absent from both."""
    intersection, predicted, true = overlap_counts(confusion)
    denominator = predicted + true
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, 2.0 * intersection / np.maximum(denominator, 1), np.nan)


def iou_from_confusion(confusion: np.ndarray) -> np.ndarray:
    """Per-class IoU |P∩T| / |P∪T|; NaN where the class is absent from both."""
    intersection, predicted, true = overlap_counts(confusion)
    union = predicted + true - intersection
    return np.where(union > 0, intersection / np.maximum(union, 1), np.nan)


def surface(mask: np.ndarray) -> np.ndarray:
    """Boundary voxels of a boolean mask: voxels of the mask with a face neighbour outside it.

    Voxels on the array border count as boundary (the outside of the array is background).
    """
    mask = np.asarray(mask, dtype=bool)
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    interior = ndimage.binary_erosion(mask, structure=structure, border_value=0)
    return mask & ~interior


def directed_surface_distances(
    source: np.ndarray, target: np.ndarray, spacing: Sequence[float], positions: SlicePositions | None = None
) -> np.ndarray:
    """Distance in mm from every boundary voxel of `source` to the nearest boundary voxel of `target`.

    source, target: boolean masks with the same shape; spacing: voxel size per array axis (mm),
    in array-axis order (for a (z, y, x) array pass (sz, sy, sx)); positions: the voxels' true positions,
    which replace the spacing when given.
    """
    source_surface, target_surface = surface(source), surface(target)
    if not target_surface.any():
        return np.full(int(source_surface.sum()), np.inf)
    if positions is not None:
        tree = cKDTree(positions.points(np.argwhere(target_surface)))
        return tree.query(positions.points(np.argwhere(source_surface)))[0]
    distance_to_target = ndimage.distance_transform_edt(~target_surface, sampling=tuple(spacing))
    return distance_to_target[source_surface]


def hausdorff_distance(
    pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float], percentile: float = 95.0,
    positions: SlicePositions | None = None,
) -> float:
    """Symmetric surface Hausdorff distance at `percentile` (100 = the classical Hausdorff distance).

    HD_p = max(P_p(d(∂P -> ∂T)), P_p(d(∂T -> ∂P))), each P_p the percentile (linear interpolation)
    of the directed surface distances in mm. NaN when either mask is empty.
    pred, truth: boolean masks of the same shape; spacing: mm per array axis, in array-axis order;
    positions: the voxels' true positions (a 3-D volume whose slices are off its grid), used instead of spacing.
    """
    pred, truth = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {pred.shape} and truth {truth.shape} differ in shape")
    if len(spacing) != pred.ndim:
        raise ValueError(f"spacing {tuple(spacing)} does not match a {pred.ndim}-D mask")
    if not pred.any() or not truth.any():
        return math.nan
    # Both distance sets come from the same bounding box: crop to it (distances are unchanged).
    where = np.nonzero(pred | truth)
    box = tuple(slice(max(int(i.min()) - 1, 0), int(i.max()) + 2) for i in where)
    pred, truth = pred[box], truth[box]
    positions = positions.cropped(box) if positions is not None else None
    forward = directed_surface_distances(pred, truth, spacing, positions)
    backward = directed_surface_distances(truth, pred, spacing, positions)
    return float(max(np.percentile(forward, percentile), np.percentile(backward, percentile)))


def field_of_view_diagonal(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Diagonal in mm of a volume's field of view, sqrt(sum((n_i * s_i)^2)).

    shape: voxels per array axis; spacing: mm per array axis, in the same order. No two points inside
    the volume are farther apart, so no surface distance between masks of the volume exceeds it.
    """
    if len(shape) != len(spacing):
        raise ValueError(f"spacing {tuple(spacing)} does not match shape {tuple(shape)}")
    return float(math.sqrt(sum((int(n) * float(s)) ** 2 for n, s in zip(shape, spacing))))


def volume_metrics(
    pred: np.ndarray, truth: np.ndarray, num_classes: int, spacing: Sequence[float],
    positions: SlicePositions | None = None,
) -> dict[str, np.ndarray]:
    """Per-class metrics of one volume (index 0 = background, reported but not used in means).

    pred, truth: (Z, Y, X) label volumes; spacing: (sz, sy, sx) mm; positions: the voxels' true positions
    when the slices are off the grid (distances and the diagonal then use them).
    Returns arrays of length num_classes: dice, iou, hd95 (mm), hd100 (mm), hd95_penalised (mm),
    true_voxels, pred_voxels. hd95_penalised equals hd95 where both truth and prediction hold the
    class, is `field_of_view_diagonal(pred.shape, spacing)` (or `positions.field_of_view_diagonal`) where
    exactly one of them does, and NaN
    where neither does.
    """
    confusion = confusion_matrix(pred, truth, num_classes)
    _, predicted, true = overlap_counts(confusion)
    hd95 = np.full(num_classes, np.nan)
    hd100 = np.full(num_classes, np.nan)
    for c in range(1, num_classes):
        if predicted[c] and true[c]:
            p, t = pred == c, truth == c
            hd95[c] = hausdorff_distance(p, t, spacing, 95.0, positions)
            hd100[c] = hausdorff_distance(p, t, spacing, 100.0, positions)
    one_side_empty = (predicted > 0) != (true > 0)
    diagonal = (field_of_view_diagonal(pred.shape, spacing) if positions is None
                else positions.field_of_view_diagonal(*pred.shape[1:]))
    hd95_penalised = np.where(one_side_empty, diagonal, hd95)
    hd95_penalised[0] = np.nan
    return {
        "dice": dice_from_confusion(confusion),
        "iou": iou_from_confusion(confusion),
        "hd95": hd95,
        "hd100": hd100,
        "hd95_penalised": hd95_penalised,
        "true_voxels": true,
        "pred_voxels": predicted,
    }


def foreground_mean(values: np.ndarray) -> float:
    """Mean over foreground classes (index >= 1) of the defined (non-NaN) values; NaN if none."""
    foreground = np.asarray(values, dtype=np.float64)[1:]
    defined = foreground[~np.isnan(foreground)]
    return float(defined.mean()) if defined.size else math.nan


def summarize(values: Sequence[float]) -> dict[str, float | int]:
    """Mean and standard deviation (population, ddof=0) over the defined values; counts of each."""
    array = np.asarray(values, dtype=np.float64)
    defined = array[~np.isnan(array)]
    return {
        "mean": float(defined.mean()) if defined.size else math.nan,
        "std": float(defined.std()) if defined.size else math.nan,
        "n": int(defined.size),
        "n_undefined": int(array.size - defined.size),
    }
