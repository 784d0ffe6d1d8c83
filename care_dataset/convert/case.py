"""One raw case: read image and annotation, map the annotation to the profile's classes, check that both lie
on one grid, reorient them to canonical, and choose the axial slices to keep.
"""

from __future__ import annotations

import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk

from care_dataset.raw.discover import RawCase, files_under
from care_dataset.raw.image import cast_int16, describe_grid, geometry_of, grid_difference, to_canonical
from care_dataset.raw.profiles import Profile
from care_dataset.raw.volume import VolumeFileError, parse_label_description, read_volume_file, volume_suffix

if TYPE_CHECKING:
    import pydicom

    from care_dataset.raw.dicom import SliceLayout


# Every body CT holds air (about -1000 HU) around the body, in the lungs or in the bowel; an image whose lowest
# value lies above this is not in Hounsfield units (or not CT).
AIR_HU = -500
_warning_sink = threading.local()  # per reading thread: {(library, category): count}


class CaseError(Exception):
    """A case that cannot be converted; str(err) is one sentence without identifying values."""


@dataclass
class LoadedCase:
    image: sitk.Image  # canonical orientation, int16 HU
    label: sitk.Image  # canonical orientation, uint8 class indices, same grid as image
    original: dict  # geometry of the image before reorientation (JSON-ready)
    header: pydicom.Dataset | None  # header of one file of the chosen series, None for volume files
    description_names: dict[int, str]  # from the label description file: may hold PHI, never write out
    layout: SliceLayout | None = None  # true slice positions of a DICOM series whose slices are off its grid
    notes: list[str] = field(default_factory=list)  # for report.json: what was set aside or warned about


def load_case(raw: RawCase, profile: Profile, tolerance: float = 1e-3) -> LoadedCase:
    """Image (int16 HU) and label (uint8 classes) of one raw case, in canonical orientation, on one grid.

    Raises CaseError with a privacy-safe reason.
    """
    notes: list[str] = []
    with library_warnings_as_notes(notes):
        loaded = _load_case(raw, profile, tolerance, notes)
    loaded.notes = notes
    return loaded


def _load_case(raw: RawCase, profile: Profile, tolerance: float, notes: list[str]) -> LoadedCase:
    if raw.problem:
        raise CaseError(raw.problem)
    if raw.label_path is None:
        raise CaseError(f"no annotation file matching {', '.join(profile.label_patterns)}")
    names: dict[int, str] = {}
    if raw.description_path is not None:
        try:
            names = parse_label_description(raw.description_path)
        except (ValueError, OSError, UnicodeDecodeError):
            raise CaseError("the label description file is not in the ITK-SNAP format") from None

    label = to_canonical(_read_volume(raw.label_path, "annotation"))
    label = map_label(label, profile, names)
    label_grid = geometry_of(label)

    header = layout = None
    if raw.root.is_file():
        image = _read_volume(raw.root, "image")
    else:
        files = files_under(raw.root)
        skip = {raw.label_path, raw.description_path}
        volumes = [f for f in files if volume_suffix(f.name) and f not in skip and not profile.is_label_file(f.name)]
        if len(volumes) > 1:
            raise CaseError(f"several image volume files ({len(volumes)}) besides the annotation")
        if volumes:
            image = _read_volume(volumes[0], "image")
        else:
            image, header, layout = _load_dicom(raw.root, skip, label_grid, tolerance, profile.uneven_spacing, notes)

    original = geometry_of(image)
    image = to_canonical(cast_int16(image))
    image_grid = geometry_of(image)
    difference = grid_difference(image_grid, label_grid, tolerance)
    if difference is not None:
        raise CaseError(
            f"annotation grid does not match the image grid ({difference}): "
            f"image {describe_grid(image_grid)}, annotation {describe_grid(label_grid)}"
        )
    if profile.require_air:
        check_hounsfield(image)
    label.CopyInformation(image)
    return LoadedCase(image=image, label=label, original=original, header=header, description_names=names,
                      layout=layout)


def _read_volume(path: Path, what: str) -> sitk.Image:
    try:
        image = read_volume_file(path)
    except RuntimeError:
        raise CaseError(f"the {what} file cannot be read (corrupt, truncated or not a volume)") from None
    except VolumeFileError as error:
        raise CaseError(f"the {what} file: {error}") from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise CaseError(f"the {what} is not a 3-D scalar volume")
    return image


def _load_dicom(root: Path, skip: set, label_grid: dict, tolerance: float,
                uneven_spacing: str, notes: list[str]) -> tuple[sitk.Image, pydicom.Dataset, SliceLayout | None]:
    from care_dataset.raw import dicom  # deferred: pydicom takes 0.25 s to import; volume files never need it

    try:
        return dicom.read_case_series(root, {p for p in skip if p is not None}, label_grid, tolerance,
                                      uneven_spacing, notes)
    except dicom.DicomError as err:
        raise CaseError(str(err)) from None


def check_hounsfield(image: sitk.Image) -> None:
    """CaseError, with the value range, for an image without air: not plausibly CT in Hounsfield units."""
    values = sitk.GetArrayViewFromImage(image)
    low, high = int(values.min()), int(values.max())
    if low > AIR_HU:
        raise CaseError(
            f"the image's values range from {low} to {high}: no air (about -1000 HU, in every body CT), so not CT "
            "in Hounsfield units (a profile with [image] require_air = false accepts it)")


def _count_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.showwarning`` while reading: counted for the reading thread's case, never shown (a library's
    warning may quote header values); shown as before in a thread that is not reading."""
    sink = getattr(_warning_sink, "counts", None)
    if sink is None:
        _count_warning.shown_by(message, category, filename, lineno, file, line)
        return
    library = "pydicom" if "pydicom" in Path(filename).parts else "Python"
    sink[(library, category.__name__)] = sink.get((library, category.__name__), 0) + 1


_count_warning.shown_by = warnings.showwarning


@contextmanager
def library_warnings_as_notes(notes: list[str]):
    """Warnings raised in this thread while the block reads a case become counts in ``notes``, by library and
    category, without their text. ITK's warnings (printed by C++, some naming files) are switched off."""
    if warnings.showwarning is not _count_warning:
        _count_warning.shown_by = warnings.showwarning
        warnings.showwarning = _count_warning
    warnings.filterwarnings("always", module="pydicom")  # every one counted, not only the first of each line
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    _warning_sink.counts = counts = {}
    try:
        yield
    finally:
        _warning_sink.counts = None
        notes.extend(f"{n} {library} warning(s) ({category}) while reading; their text is left out (it may quote "
                     "header values)" for (library, category), n in sorted(counts.items()))


def per_slice_counts(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values of an integer (Z, Y, X) array and how often each occurs in every slice.

    Returns ``found`` (V,) ascending and ``counts`` (Z, V) int64. One pass per slice over its nonzero voxels
    (most label voxels are background), counted with ``bincount`` when the values are small non-negative
    integers.
    """
    rows: list[tuple[np.ndarray, np.ndarray]] = []
    for plane in values.reshape(values.shape[0], -1):
        nonzero = plane[plane != 0]
        zeros = plane.size - nonzero.size
        if nonzero.size and (values.dtype.kind == "u" or nonzero.min() > 0) and nonzero.max() < 65536:
            tally = np.bincount(nonzero)
            tally[0] = zeros
            found = np.flatnonzero(tally)
            rows.append((found, tally[found]))
        else:
            found, tally = np.unique(nonzero, return_counts=True)
            if zeros:
                found, tally = np.concatenate([[0], found]), np.concatenate([[zeros], tally])
            rows.append((found, tally))
    found = np.unique(np.concatenate([f for f, _ in rows])) if rows else np.zeros(0, values.dtype)
    counts = np.zeros((len(rows), len(found)), dtype=np.int64)
    for z, (values_z, tally) in enumerate(rows):
        counts[z, np.searchsorted(found, values_z)] = tally
    return found, counts


def value_counts(values: np.ndarray) -> dict[int, int]:
    """{value: voxel count} of an integer (z, y, x) array; fast when most voxels are zero."""
    found, counts = per_slice_counts(values)
    return {int(v): int(c) for v, c in zip(found, counts.sum(axis=0))}


def map_label(label: sitk.Image, profile: Profile, names: dict[int, str]) -> sitk.Image:
    """Raw label values -> uint8 class indices through ``profile`` (same geometry).

    Raises CaseError for non-integer values, values the profile does not map and an all-background result.
    """
    values = sitk.GetArrayViewFromImage(label)
    if values.dtype.kind == "f":
        if not np.array_equal(values, np.rint(values)):
            raise CaseError("annotation holds non-integer values")
        values = values.astype(np.int64)
    counts = value_counts(values)
    classes = {v: profile.class_of(v, names) for v in counts}
    unknown = [v for v, c in classes.items() if c is None]
    if unknown:
        raise CaseError(f"label values {unknown} are not in profile {profile.name}")
    if not any(classes[v] for v in counts):
        raise CaseError("annotation is empty")
    if all(v == c for v, c in classes.items()):
        return label if label.GetPixelID() == sitk.sitkUInt8 else sitk.Cast(label, sitk.sitkUInt8)
    raw = np.array(sorted(classes), dtype=values.dtype)
    mapped_classes = np.array([classes[v] for v in raw], dtype=np.uint8)
    out = np.full(values.shape, classes.get(0, 0), dtype=np.uint8)
    per_slice = values.reshape(values.shape[0], -1)
    busy = np.flatnonzero(per_slice.any(axis=1))
    if busy.size:
        out[busy] = mapped_classes[np.searchsorted(raw, values[busy])]
    mapped = sitk.GetImageFromArray(out)
    mapped.CopyInformation(label)
    return mapped


def select_slices(label: np.ndarray, profile: Profile) -> tuple[np.ndarray, dict[str, int], dict[str, int]]:
    """Axial slices to keep (those holding ``keep_classes`` plus the margin, or every slice when the profile
    keeps all) and voxels per class before and after.

    label: (Z, Y, X) uint8 class indices. Returns kept slice indices (ascending int64), then voxel counts per
    class name over the whole volume and over the kept slices.
    """
    found, counts = per_slice_counts(label)
    outside = found[(found < 0) | (found >= profile.num_classes)]
    if len(outside):
        bad = int(outside[0])
        raise CaseError(f"label value {bad} is not a class of profile {profile.name!r}")
    per_slice = np.zeros((label.shape[0], profile.num_classes), dtype=np.int64)  # (Z, C)
    per_slice[:, found] = counts
    selecting = per_slice[:, list(profile.keep_classes)].sum(1) > 0
    if not selecting.any():
        names = ", ".join(profile.class_names[c] for c in profile.keep_classes)
        raise CaseError(f"the annotation holds no voxel of the classes that select slices ({names})")
    if profile.all_slices:
        selecting = np.ones_like(selecting)
    elif profile.margin > 0:
        window = np.ones(2 * profile.margin + 1)
        selecting = np.convolve(selecting.astype(float), window, mode="same") > 0
    kept = np.flatnonzero(selecting).astype(np.int64)
    before, after = per_slice.sum(0), per_slice[kept].sum(0)
    for c in profile.keep_classes:
        if before[c] != after[c]:  # cannot happen by construction; guards future edits
            raise AssertionError(f"slice filtering dropped voxels of class {profile.class_names[c]!r}")
    names = profile.class_names
    return kept, {n: int(before[i]) for i, n in enumerate(names)}, {n: int(after[i]) for i, n in enumerate(names)}


def kept_slices_of(volume: np.ndarray, kept: np.ndarray, dtype: type) -> np.ndarray:
    """``volume[kept]`` as a C-contiguous ``dtype`` array; a view, not a copy, when ``kept`` is one run.

    volume: (Z, Y, X) C-contiguous; kept: ascending slice indices. Returns (len(kept), Y, X).
    """
    if len(kept) and kept[-1] - kept[0] + 1 == len(kept):
        volume = volume[kept[0]:kept[-1] + 1]
    else:
        volume = volume[kept]
    return np.ascontiguousarray(volume, dtype)
