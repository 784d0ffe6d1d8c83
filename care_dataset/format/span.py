"""A case's stored slices as one volume on its canonical grid, spanning its kept slices.

The volume runs from the first kept canonical slice to the last: same spacing and direction as the canonical
volume, origin moved to the first kept slice. Canonical slices inside that span that the conversion did not
keep (a gap between kept runs) hold ``FILL_HU`` and label 0. ``care-export`` writes these volumes as NIfTI
files, ``care-publish`` as the NIfTI cells of its ``volumes`` configuration.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FILL_HU = -1024
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])  # ITK's physical space (LPS) -> NIfTI's (RAS)


@dataclass(frozen=True)
class CaseSpan:
    image: np.ndarray  # (depth, H, W) int16 HU
    label: np.ndarray  # (depth, H, W) uint8
    first_slice: int  # canonical index of the span's slice 0
    filled_slices: int  # slices of the span the conversion did not keep


@dataclass(frozen=True)
class SpanGeometry:
    spacing: list[float]  # (x, y, z) mm
    origin: list[float]  # LPS mm, of the span's first voxel
    direction: list[float]  # 3 x 3 row-major, columns the x, y, z axes in LPS


def case_span(image: np.ndarray, label: np.ndarray, kept_slices: list[int]) -> CaseSpan:
    """The stored slices (n, H, W) placed at their canonical indices `kept_slices`, gaps filled."""
    kept = np.asarray(kept_slices, dtype=np.int64)
    first = int(kept[0])
    depth = int(kept[-1]) - first + 1
    image_span = np.full((depth, *image.shape[1:]), FILL_HU, dtype=np.int16)
    label_span = np.zeros((depth, *label.shape[1:]), dtype=np.uint8)
    image_span[kept - first], label_span[kept - first] = image, label
    return CaseSpan(image_span, label_span, first, depth - len(kept))


def span_geometry(canonical: dict, first_slice: int) -> SpanGeometry:
    """The grid of a span whose slice 0 is canonical slice `first_slice` (``canonical`` as in cases.json)."""
    spacing = [float(v) for v in canonical["spacing"]]
    direction = np.asarray(canonical["direction"], dtype=np.float64).reshape(3, 3)
    origin = np.asarray(canonical["origin"], dtype=np.float64) + direction[:, 2] * spacing[2] * first_slice
    return SpanGeometry(spacing, origin.tolist(), direction.ravel().tolist())


def ras_affine(geometry: SpanGeometry) -> np.ndarray:
    """The 4 x 4 NIfTI (RAS) affine of a grid: voxel (x, y, z) index -> RAS mm."""
    direction = np.asarray(geometry.direction, dtype=np.float64).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = LPS_TO_RAS @ direction @ np.diag(geometry.spacing)
    affine[:3, 3] = LPS_TO_RAS @ np.asarray(geometry.origin, dtype=np.float64)
    return affine
