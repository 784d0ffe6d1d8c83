"""Raw cases: find them, read image and annotation, check that both lie on one grid, reorient to canonical.

Canonical orientation is ``DICOMOrient(image, "LPS")`` (docs/format.md): ``array[k]`` is an axial slice with row 0
at the patient's anterior side and column 0 at the patient's right side, slices ordered inferior to superior.
Grids are compared after both volumes are reoriented, never by resampling.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk

from care_dataset.profiles import Profile

if TYPE_CHECKING:  # pydicom and io_dicom are imported when a case holds DICOM files
    import pydicom

    from care_dataset.io_dicom import DicomSeries

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")
CANONICAL = "LPS"
# Modality (0008,0060) defined terms of PS3.3 C.7.3.1.1.1, current and retired: only these may be echoed in a
# reason (report.json); any other value is free text typed in somewhere and is never copied out.
DICOM_MODALITIES = frozenset("""
    ANN AR ASMT AU BDUS BI BMD CFM CR CT CTPROTOCOL DG DMS DOC DX ECG EEG EMG EOG EPS ES FID GM HC HD IO IOL
    IVOCT IVUS KER KO LEN LS M3D MG MR NM OAM OCT OP OPM OPT OPTBSV OPTENF OPV OSS OT PA PLAN POS PR PT PX REG
    RESP RF RG RTDOSE RTIMAGE RTINTENT RTPLAN RTRAD RTRECORD RTSEGANN RTSTRUCT RWV SEG SM SMR SR SRF STAIN
    TEXTUREMAP TG US VA XA XAPROTOCOL XC
    AS CD CF CP CS DD DF DM DS EC FA FS LP MA MS OPR ST VF
""".split())


class CaseError(Exception):
    """A case that cannot be converted; str(err) is one sentence without identifying values."""


@dataclass(frozen=True)
class RawCase:
    key: str  # raw folder name or image file stem: for the terminal and as identity fallback ONLY
    root: Path  # case folder, or the image file for paired layouts
    label_path: Path | None
    description_path: Path | None
    problem: str | None = None  # why the case cannot be loaded, found during discovery


@dataclass
class LoadedCase:
    image: sitk.Image  # canonical orientation, int16 HU
    label: sitk.Image  # canonical orientation, uint8 class indices, same grid as image
    original: dict  # geometry of the image before reorientation (JSON-ready)
    header: pydicom.Dataset | None  # header of one file of the chosen series, None for volume files
    description_names: dict[int, str]  # from the label description file: may hold PHI, never write out


# ---------------------------------------------------------------- geometry


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


# ---------------------------------------------------------------- discovery


def volume_suffix(name: str) -> str | None:
    lowered = name.lower()
    return next((s for s in VOLUME_SUFFIXES if lowered.endswith(s)), None)


def _stem(name: str) -> str:
    suffix = volume_suffix(name)
    return name[: -len(suffix)] if suffix else Path(name).stem


def _files_under(folder: Path) -> list[Path]:
    found = []
    for parent, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(parent) / f for f in sorted(files) if not f.startswith(".")]
    return [f for f in found if f.exists()]  # drops dangling symbolic links


def _label_files(files: list[Path], profile: Profile) -> list[Path]:
    return [f for f in files if volume_suffix(f.name) and profile.is_label_file(f.name)]


def _description_file(files: list[Path]) -> Path | None:
    for f in files:
        if f.suffix.lower() == ".txt":
            try:
                if parse_label_description(f):
                    return f
            except (ValueError, OSError, UnicodeDecodeError):
                continue
    return None


def discover_cases(raw_dir: Path, profile: Profile) -> list[RawCase]:
    """Raw cases under ``raw_dir`` in the profile's layout, sorted by key."""
    raw_dir = Path(raw_dir)
    if profile.layout == "paired_folders":
        return _discover_paired(raw_dir, profile)
    cases = []
    for folder in sorted(p for p in raw_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = _files_under(folder)
        labels = _label_files(files, profile)
        problem = None
        if not labels:
            problem = f"no annotation file matching {', '.join(profile.label_patterns)}"
        elif len(labels) > 1:
            problem = f"several annotation files ({len(labels)}) match {', '.join(profile.label_patterns)}"
            if len({label.parent for label in labels}) > 1:
                problem += " in different sub-folders (case folders must be directly under the raw folder)"
        cases.append(RawCase(
            key=folder.name,
            root=folder,
            label_path=labels[0] if len(labels) == 1 else None,
            description_path=_description_file(files),
            problem=problem,
        ))
    return sorted(cases, key=lambda c: c.key)


def _discover_paired(raw_dir: Path, profile: Profile) -> list[RawCase]:
    images = [
        (image_dir, f)
        for image_dir in profile.image_dirs
        if (raw_dir / image_dir).is_dir()
        for f in sorted((raw_dir / image_dir).iterdir())
        if f.is_file() and not f.name.startswith(".") and volume_suffix(f.name)
    ]
    stem_count: dict[str, int] = {}
    for _, f in images:
        stem_count[_stem(f.name)] = stem_count.get(_stem(f.name), 0) + 1
    cases = []
    for image_dir, image in images:
        stem = _stem(image.name)
        # nnU-Net names images <case>_0000.nii.gz and labels <case>.nii.gz
        names = [image.name] + ([stem[:-5] + volume_suffix(image.name)] if re.search(r"_\d{4}$", stem) else [])
        label = next(
            (raw_dir / d / n for d in profile.label_dirs for n in names if (raw_dir / d / n).is_file()), None
        )
        cases.append(RawCase(
            key=stem if stem_count[stem] == 1 else f"{image_dir}/{stem}",
            root=image,
            label_path=label,
            description_path=None,
            problem=None if label else f"no annotation of the same name in {', '.join(profile.label_dirs)}",
        ))
    return sorted(cases, key=lambda c: c.key)


# ---------------------------------------------------------------- labels

_DESCRIPTION_ROW = re.compile(
    r'^\s*(-?\d+)\s+(-?\d+)\s+(-?\d+)\s+(-?\d+)\s+([-+\d.eE]+)\s+(\d+)\s+(\d+)\s+"(.*)"\s*$'
)


def parse_label_description(path: Path) -> dict[int, str]:
    """ITK-SNAP label description file (``IDX R G B A VIS MSH "LABEL"`` rows, ``#`` comments) -> {value: name}.

    Raises ValueError on a row in another format.
    """
    names: dict[int, str] = {}
    for number, line in enumerate(Path(path).read_text(encoding="utf-8", errors="strict").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _DESCRIPTION_ROW.match(line)
        if match is None:
            raise ValueError(f"line {number} is not an ITK-SNAP label description row")
        names[int(match.group(1))] = match.group(8)
    return names


def read_volume_file(path: Path) -> sitk.Image:
    """A volume file as SimpleITK reads it, a NIfTI file also checked for what ITK reads wrongly
    (``care_dataset.nifti.check_nifti``). Raises RuntimeError (SimpleITK) or NiftiError."""
    from care_dataset.nifti import check_nifti, is_nifti

    image = sitk.ReadImage(str(path))
    if is_nifti(path):
        check_nifti(path)
    return image


def _read_volume(path: Path, what: str) -> sitk.Image:
    from care_dataset.nifti import NiftiError

    try:
        image = read_volume_file(path)
    except RuntimeError:
        raise CaseError(f"the {what} file cannot be read (corrupt, truncated or not a volume)") from None
    except NiftiError as error:
        raise CaseError(f"the {what} file: {error}") from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise CaseError(f"the {what} is not a 3-D scalar volume")
    return image


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


# ---------------------------------------------------------------- loading


def _choose_series(series: list[DicomSeries], label_grid: dict, tolerance: float) -> DicomSeries:
    if len(series) == 1:
        return series[0]
    for candidate in series:  # already in order of preference
        if grid_difference(canonical_geometry(candidate.geometry()), label_grid, tolerance) is None:
            return candidate
    listed = ", ".join(describe_grid(canonical_geometry(s.geometry()), with_origin=False) for s in series)
    raise CaseError(
        f"no series matches the annotation grid {describe_grid(label_grid, with_origin=False)}; candidates: {listed}"
    )


def no_series_reason(skipped: dict[str, int], num_files: int) -> str:
    if num_files == 0:
        return "no image found (neither a DICOM series nor a volume file)"
    found = ", ".join(f"{n} {why}" for why, n in sorted(skipped.items()))
    return f"no usable axial image series among {num_files} DICOM files ({found})"


def load_case(raw: RawCase, profile: Profile, tolerance: float = 1e-3) -> LoadedCase:
    """Image (int16 HU) and label (uint8 classes) of one raw case, in canonical orientation, on one grid.

    Raises CaseError with a privacy-safe reason.
    """
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

    header = None
    if raw.root.is_file():
        image = _read_volume(raw.root, "image")
    else:
        files = _files_under(raw.root)
        skip = {raw.label_path, raw.description_path}
        volumes = [f for f in files if volume_suffix(f.name) and f not in skip and not profile.is_label_file(f.name)]
        if len(volumes) > 1:
            raise CaseError(f"several image volume files ({len(volumes)}) besides the annotation")
        if volumes:
            image = _read_volume(volumes[0], "image")
        else:
            image, header = _load_dicom(raw.root, skip, label_grid, tolerance)

    original = geometry_of(image)
    image = to_canonical(cast_int16(image))
    image_grid = geometry_of(image)
    difference = grid_difference(image_grid, label_grid, tolerance)
    if difference is not None:
        raise CaseError(
            f"annotation grid does not match the image grid ({difference}): "
            f"image {describe_grid(image_grid)}, annotation {describe_grid(label_grid)}"
        )
    label.CopyInformation(image)
    return LoadedCase(image=image, label=label, original=original, header=header, description_names=names)


def not_ct_reason(modality: str) -> str:
    """Why a series of ``modality`` is refused; names the modality only when it is a DICOM defined term."""
    if modality in DICOM_MODALITIES:
        return f"modality {modality} is not CT"
    if modality == "unknown":  # io_dicom's value for an empty Modality
        return "the image series has no modality (not CT)"
    return "the image series is not CT (non-standard modality code)"


def _load_dicom(root: Path, skip: set, label_grid: dict, tolerance: float) -> tuple[sitk.Image, pydicom.Dataset]:
    from care_dataset.io_dicom import DicomError, read_series_int16, scan_dicom

    try:
        scan = scan_dicom(root, exclude={p for p in skip if p is not None})
        if not scan.series:
            raise CaseError(no_series_reason(scan.skipped, scan.num_files))
        chosen = _choose_series(scan.series, label_grid, tolerance)
        if chosen.modality != "CT":
            raise CaseError(not_ct_reason(chosen.modality))
        return read_series_int16(chosen), chosen.header
    except DicomError as err:
        raise CaseError(str(err)) from None
