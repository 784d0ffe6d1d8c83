"""What every read image becomes: int16 HU in the canonical orientation, its grid as plain JSON values.

Canonical orientation is ``DICOMOrient(image, "LPS")`` (docs/format.md): ``array[k]`` is an axial slice with row 0
at the patient's anterior side and column 0 at the patient's right side, slices ordered inferior to superior.
Grids are compared after both volumes are reoriented, never by resampling.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

CANONICAL = "LPS"


def to_canonical(img: sitk.Image) -> sitk.Image:
    """``img`` reoriented to LPS by axis permutation and flips only (no resampling)."""
    if sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(img.GetDirection()) == CANONICAL:
        return img
    return sitk.DICOMOrient(img, CANONICAL)


def as_int16(values: np.ndarray) -> np.ndarray:
    """``values`` rounded (if fractional) and clipped to the int16 range, as int16."""
    if values.dtype.kind == "f":
        values = np.rint(values)
    return np.clip(values, -32768, 32767).astype(np.int16)


def cast_int16(image: sitk.Image) -> sitk.Image:
    """Round (if fractional) and clip a scalar image to int16, keeping its geometry."""
    if image.GetPixelID() == sitk.sitkInt16:
        return image
    if image.GetPixelID() in (sitk.sitkUInt8, sitk.sitkInt8):
        return sitk.Cast(image, sitk.sitkInt16)
    out = sitk.GetImageFromArray(as_int16(sitk.GetArrayViewFromImage(image)))
    out.CopyInformation(image)
    return out


def geometry_of(img: sitk.Image) -> dict:
    """Size, spacing, origin, direction (row-major) and orientation code of ``img`` as plain JSON values."""
    return {
        "size": [int(v) for v in img.GetSize()],
        "spacing": [float(v) for v in img.GetSpacing()],
        "origin": [float(v) for v in img.GetOrigin()],
        "direction": [float(v) for v in img.GetDirection()],
        "orientation": sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(img.GetDirection()),
    }


def canonical_geometry(geometry: dict) -> dict:
    """The geometry ``to_canonical`` gives a volume of ``geometry``, without allocating that volume.

    A 2 x 2 x 2 probe whose voxels encode their own index is reoriented by SimpleITK itself, which reveals the
    axis permutation and flips; they are then applied to the real size, spacing and origin.
    """
    probe = sitk.GetImageFromArray(np.arange(8, dtype=np.uint8).reshape(2, 2, 2))  # value = x + 2y + 4z
    probe.SetDirection(geometry["direction"])
    oriented = to_canonical(probe)
    values = sitk.GetArrayViewFromImage(oriented)

    def source_index(x: int, y: int, z: int) -> np.ndarray:
        v = int(values[z, y, x])
        return np.array([v & 1, (v >> 1) & 1, (v >> 2) & 1])

    start = source_index(0, 0, 0)
    size = np.asarray(geometry["size"], dtype=int)
    spacing = np.asarray(geometry["spacing"], dtype=float)
    corner = np.zeros(3)
    perm = []
    for axis, step in enumerate(np.eye(3, dtype=int)):
        moved = source_index(*step) - start
        src = int(np.flatnonzero(moved)[0])
        perm.append(src)
        if moved[src] < 0:
            corner[src] = size[src] - 1
    matrix = np.asarray(geometry["direction"], dtype=float).reshape(3, 3)
    origin = np.asarray(geometry["origin"], dtype=float) + matrix @ (corner * spacing)
    return {
        "size": [int(size[p]) for p in perm],
        "spacing": [float(spacing[p]) for p in perm],
        "origin": [float(v) for v in origin],
        "direction": [float(v) for v in oriented.GetDirection()],
    }


def grid_difference(a: dict, b: dict, tolerance: float) -> str | None:
    """What differs between two grids (same orientation assumed), or None when they agree within ``tolerance``.

    Size must be equal; spacing agrees relatively; direction cosines agree absolutely; origins agree within
    ``tolerance`` voxels along each axis.
    """
    if list(a["size"]) != list(b["size"]):
        return "size differs"
    sa, sb = np.asarray(a["spacing"]), np.asarray(b["spacing"])
    if np.any(np.abs(sa - sb) > tolerance * np.maximum(sa, sb)):
        return "spacing differs"
    if np.max(np.abs(np.subtract(a["direction"], b["direction"]))) > tolerance:
        return "direction differs"
    shift = np.abs(np.subtract(a["origin"], b["origin"]))
    if np.any(shift > tolerance * np.maximum(sa, sb)):
        return f"origin differs by up to {float(np.max(shift)):.3g} mm"
    return None


def describe_grid(g: dict, with_origin: bool = True) -> str:
    """'512x512x80 at 0.78x0.78x2.50 mm' (plus the origin): geometry only, nothing identifying."""
    text = "x".join(str(int(v)) for v in g["size"]) + " at " + "x".join(f"{v:.2f}" for v in g["spacing"]) + " mm"
    if with_origin:
        text += " origin (" + ", ".join(f"{v:.2f}" for v in g["origin"]) + ")"
    return text
