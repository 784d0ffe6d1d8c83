"""`usam predict`: segment a new CT volume, optionally from point clicks, on its original grid.

Pipeline: read (DICOM folder or volume file) -> ``DICOMOrient(image, "LPS")`` (the stored slices'
orientation) -> every axial slice windowed, resized to the model size and run in batches -> logits
resized back to each slice's H x W (bilinear) -> argmax -> uint8 label volume reoriented to the
input's grid (same size, spacing, origin, direction) -> written atomically, with an ITK-SNAP label
description file beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from torch import nn

from usam.data import DEFAULT_WINDOW, MODEL_SIZE, resize_images, window_normalize
from usam.prompts import (
    AXIS_NAMES,
    PADDING_LABEL,
    POINT_LABEL,
    CanonicalGrid,
    OutsideImageError,
    format_position,
    index_ranges,
    voxel_to_model,
    world_to_model,
)
from care_dataset.error_text import error_line
from care_dataset.files import creation_problem, make_staging_dir, replace_folder

CANONICAL_ORIENTATION = "LPS"
COORDINATE_KINDS = ("voxel", "itksnap", "world")
# Label volume formats SimpleITK writes and ITK-SNAP and 3D Slicer read as volumes (lower case, as
# ITK's NIfTI writer requires). .nhdr and .mhd write a detached data file beside the header.
LABEL_VOLUME_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
# Marks a --overlays folder as written by usam predict; lists the files it wrote there.
OVERLAY_MARKER = ".usam-overlays.json"
# ITK-SNAP label colours (RGB) for classes 1, 2, ...; background is transparent.
LABEL_COLORS = ((230, 159, 0), (213, 94, 0), (0, 114, 178), (0, 158, 115), (204, 121, 167), (86, 180, 233))


class InputError(ValueError):
    """A problem with the user's input, reported as one line."""


@dataclass(frozen=True)
class InferenceSettings:
    """What inference needs from a checkpoint besides the weights."""

    class_names: tuple[str, ...]
    window: tuple[float, float]
    img_size: int
    points_per_class: int  # the model's prompt slots per class (0: the model takes no prompts)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def config_value(config: Mapping[str, Any], *keys: str) -> Any:
    """The first of `keys` found at the top level of `config`, else in one of its sub-tables."""
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    for value in config.values():
        if isinstance(value, Mapping):
            for key in keys:
                if value.get(key) is not None:
                    return value[key]
    return None


def inference_settings(config: Mapping[str, Any]) -> InferenceSettings:
    """Read class names, HU window, input size and prompt slots from a checkpoint config.

    The model table (``config["model"]``) gives num_classes, img_size and points_per_class; class
    names ('class_names' or 'classes') and the window ('window') are looked up at the top level,
    then in the config's sub-tables. A config without a window gets DEFAULT_WINDOW.
    """
    model = config.get("model", {}) if isinstance(config.get("model"), Mapping) else {}
    num_classes = int(model.get("num_classes") or config_value(config, "num_classes") or 0)
    names = config_value(config, "class_names", "classes")
    if names is None:
        names = ["background"] + [f"class {c}" for c in range(1, num_classes)]
    names = tuple(str(n) for n in names)
    if num_classes and len(names) != num_classes:
        raise InputError(f"checkpoint: {len(names)} class names for a {num_classes}-class model")
    window = config_value(config, "window")
    try:
        window = tuple(float(v) for v in (window if window is not None else DEFAULT_WINDOW))
    except (TypeError, ValueError):
        raise InputError(f"checkpoint: invalid intensity window {window!r}") from None
    if len(window) != 2 or not window[1] > window[0]:
        raise InputError(f"checkpoint: invalid intensity window {window}")
    img_size = int(model.get("img_size") or config_value(config, "img_size") or MODEL_SIZE)
    points_per_class = int(model.get("points_per_class", 0))
    return InferenceSettings(names, window, img_size, points_per_class)


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> CUDA when present, else CPU; anything else as torch spells it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"--device {name!r}: not a device; give auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"--device {name!r}: give auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {name!r} requested but CUDA is not available")
    return device


def model_input(images_hu: np.ndarray, settings: InferenceSettings, device: torch.device) -> torch.Tensor:
    """(B, H, W) int16 HU -> (B, 1, S, S) float32 in [0, 1] on `device`.

    The same operations as `usam.data.preprocess_slices` (window, then bilinear resize), run on the
    device so that only int16 voxels cross to it.
    """
    hu = torch.from_numpy(np.ascontiguousarray(images_hu)).to(device, non_blocking=True)
    return resize_images(window_normalize(hu, settings.window)[:, None], settings.img_size).contiguous()


def forward_logits(
    model: nn.Module,
    images: torch.Tensor,
    points: torch.Tensor | None,
    point_labels: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor:
    """One batch through the model: images B x 1 x S x S -> float32 logits B x C x S x S on `device`.

    bf16 autocast and channels_last on CUDA; plain fp32 on CPU.
    """
    images = images.to(device, non_blocking=True)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    if points is not None:
        points = points.to(device, non_blocking=True)
        point_labels = point_labels.to(device, non_blocking=True)
    with torch.inference_mode(), torch.autocast(
        device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"
    ):
        logits = model(images, points, point_labels)
    return logits.float()


def logits_to_labels(logits: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """B x C x S x S logits -> B x height x width uint8 labels (bilinear logits, then argmax)."""
    if tuple(logits.shape[-2:]) != (height, width):
        logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
    return logits.argmax(dim=1).to(torch.uint8)


def iter_batches(n: int, batch_size: int) -> Iterator[slice]:
    """Consecutive slices of at most batch_size over range(n)."""
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def segment_slices(
    model: nn.Module,
    settings: InferenceSettings,
    images_hu: np.ndarray,
    points: np.ndarray | None = None,
    point_labels: np.ndarray | None = None,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Label every slice: images_hu (n, H, W) int16 HU, points (n, K, 2) model-input (x, y) and
    point_labels (n, K) or None -> (n, H, W) uint8 at the slices' own resolution."""
    device = torch.device(device)
    n, height, width = images_hu.shape
    out = np.zeros((n, height, width), dtype=np.uint8)
    for batch in iter_batches(n, batch_size):
        x = model_input(images_hu[batch], settings, device)
        p = l = None
        if points is not None:
            p = torch.from_numpy(np.ascontiguousarray(points[batch], dtype=np.float32))
            l = torch.from_numpy(np.ascontiguousarray(point_labels[batch], dtype=np.int64))
        logits = forward_logits(model, x, p, l, device)
        out[batch] = logits_to_labels(logits, height, width).cpu().numpy()
    return out


# ---------------------------------------------------------------- reading and geometry


def read_image(path: str | os.PathLike, notes: list[str] | None = None) -> sitk.Image:
    """A 3-D CT from a volume file (NIfTI, NRRD, MHA, ...) or a DICOM folder.

    For a folder, every DICOM file below it (any nesting) is scanned as care-convert does
    (``care_dataset.io_dicom.scan_dicom``: localizers and single images set aside) and the CT series
    with the most slices is read in HU (ties: the original before a derived series, then the lowest
    series number). A NIfTI file is also checked for truncated data and for a qform and sform that
    disagree (``care_dataset.nifti``). Raises InputError with the reason; appends to ``notes`` what the
    user should know about the choice made (which series, 8-bit voxels).
    """
    notes = notes if notes is not None else []
    path = Path(path)
    if path.is_dir():
        from care_dataset.raw.dicom import no_series_reason
        from care_dataset.raw.dicom import DicomError, read_series_int16, scan_dicom

        try:
            scan = scan_dicom(path)
            if not scan.num_files:
                raise InputError(f"{path}: no DICOM files in this folder or below it")
            if not scan.series:
                raise InputError(f"{path}: {no_series_reason(scan.skipped, scan.num_files)}")
            chosen = max(scan.series, key=lambda s: (s.modality == "CT", s.size[2]))
            image = read_series_int16(chosen)
        except DicomError as error:
            raise InputError(f"{path}: {error}") from None
        notes.append(_series_note(scan.series, chosen))
    elif path.is_file():
        from care_dataset.raw.volume import read_volume_file
        from care_dataset.raw.volume import NiftiError

        try:
            if sitk.ImageFileReader.GetImageIOFromFileName(str(path)) == "GDCMImageIO":
                raise InputError(f"{path}: one DICOM file; give the folder that holds its series")
            image = read_volume_file(path)
        except RuntimeError as error:
            raise InputError(f"{path}: not a readable image ({error_line(error, last=True)})") from None
        except NiftiError as error:
            raise InputError(f"{path}: {error}") from None
    else:
        raise InputError(f"{path}: no such file or folder")
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{path}: need a 3-D single-channel CT, got {image.GetDimension()}-D with "
            f"{image.GetNumberOfComponentsPerPixel()} components"
        )
    if image.GetPixelID() in (sitk.sitkUInt8, sitk.sitkInt8):
        notes.append("8-bit voxels read as HU: an 8-bit CT is usually a windowed export, not Hounsfield units, "
                     "and the model expects HU")
    return image


def _series_note(series: list, chosen: Any) -> str:
    """Which DICOM series was read, by slice count and series number only (no descriptions or UIDs)."""
    from care_dataset.raw.dicom import DICOM_MODALITIES

    number = chosen.sort_key[1] if len(chosen.sort_key) > 1 else 0
    modality = chosen.modality if chosen.modality in DICOM_MODALITIES else "image"  # no free text from headers
    note = f"read the {modality} series {number} ({chosen.size[2]} slices)"
    others = len(series) - 1
    if others:
        tied = sum(1 for s in series if s is not chosen and s.modality == chosen.modality
                   and s.size[2] == chosen.size[2])
        note += f"; set aside {others} other series"
        if tied:
            note += f", {tied} of them with as many slices (to read another, give a folder holding only it)"
    return note


def orientation_code(image: sitk.Image) -> str:
    """The SimpleITK orientation code (e.g. 'LPS', 'RAI') closest to the image's direction."""
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())


def canonical_hu(image: sitk.Image) -> tuple[sitk.Image, np.ndarray]:
    """(canonical image, its voxels as (slices, H, W) int16 HU, rounded and clipped)."""
    from care_dataset.raw.image import to_canonical

    canonical = to_canonical(image)
    array = sitk.GetArrayFromImage(canonical)
    if array.dtype != np.int16:
        info = np.iinfo(np.int16)
        array = np.clip(np.rint(array), info.min, info.max).astype(np.int16)
    return canonical, array


def same_grid(a: sitk.Image, b: sitk.Image, tolerance: float = 1e-5) -> bool:
    """Equal size, and spacing, origin and direction equal within `tolerance` (relative)."""
    if a.GetSize() != b.GetSize():
        return False
    return all(
        np.allclose(x, y, rtol=tolerance, atol=tolerance)
        for x, y in (
            (a.GetSpacing(), b.GetSpacing()),
            (a.GetOrigin(), b.GetOrigin()),
            (a.GetDirection(), b.GetDirection()),
        )
    )


def labels_on_original_grid(labels: np.ndarray, canonical: sitk.Image, original: sitk.Image) -> sitk.Image:
    """Canonical (slices, H, W) uint8 labels -> a label image on exactly `original`'s grid."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(labels, dtype=np.uint8))
    image.CopyInformation(canonical)
    back = sitk.DICOMOrient(image, orientation_code(original))
    if not same_grid(back, original):
        raise RuntimeError(
            "reorienting back did not reproduce the input grid "
            f"(size {back.GetSize()} vs {original.GetSize()})"
        )
    back.CopyInformation(original)  # removes rounding noise: the exact input geometry
    return back


# ---------------------------------------------------------------- clicks


def load_points(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a points file (see docs/evaluation.md, "Prediction")."""
    path = Path(path)
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: no such points file") from None
    except OSError as error:
        raise InputError(f"{path}: cannot read the points file ({error.strerror or error})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{path}: not valid JSON ({error})") from None
    return validate_points(spec, source=str(path))


def validate_points(spec: Any, source: str = "points") -> dict[str, Any]:
    """Check the points structure: coordinates kind and a non-empty list of {class, position}."""
    if not isinstance(spec, Mapping):
        raise InputError(f"{source}: expected an object with 'coordinates' and 'points'")
    kind = spec.get("coordinates")
    if kind not in COORDINATE_KINDS:
        raise InputError(f"{source}: 'coordinates' must be one of {', '.join(COORDINATE_KINDS)}, got {kind!r}")
    points = spec.get("points")
    if not isinstance(points, list) or not points:
        raise InputError(f"{source}: 'points' must be a non-empty list")
    for n, point in enumerate(points):
        if not isinstance(point, Mapping) or "class" not in point or "position" not in point:
            raise InputError(f"{source}: point {n} needs 'class' and 'position'")
        position = point["position"]
        if (
            not isinstance(position, list)
            or len(position) != 3
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in position)
        ):
            raise InputError(f"{source}: point {n} position must be three finite numbers, got {position!r}")
    return {"coordinates": kind, "points": [dict(p) for p in points]}


def class_index(value: Any, class_names: tuple[str, ...]) -> int:
    """A foreground class given by name (case-insensitive) or by label value (1, 1.0 or "1")."""
    if isinstance(value, bool):
        raise InputError(f"class {value!r}: give a class name or a label value")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str):
        lowered = [n.lower() for n in class_names]
        if value.strip().lower() in lowered[1:]:
            return lowered.index(value.strip().lower(), 1)
        if not (value.strip().isascii() and value.strip().isdigit()):
            raise InputError(f"class {value!r}: not one of {', '.join(class_names[1:])}")
        value = int(value)
    if isinstance(value, int):
        if 1 <= value < len(class_names):
            return value
        raise InputError(f"class {value}: label values are 1..{len(class_names) - 1} "
                         f"({', '.join(class_names[1:])})")
    raise InputError(f"class {value!r}: give a class name or a label value")


def prompts_from_points(
    spec: Mapping[str, Any], image: sitk.Image, settings: InferenceSettings, source: str = "points"
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Clicks -> {canonical slice: (points K x 2 float32 model-input (x, y), labels K int64)}.

    'voxel': 0-based (i, j, k) indices of `image`, as SimpleITK and nibabel count; 'itksnap': the
    1-based voxel coordinates ITK-SNAP's cursor inspector shows; 'world': physical (x, y, z) mm in
    ITK's LPS convention. Per slice, class c fills its slots (c - 1) * k .. c * k - 1 in click order;
    unused slots are padding. Errors name ``source`` (the points file) and the point.
    """
    spec = validate_points(spec, source)
    k = settings.points_per_class
    if k == 0:
        raise InputError(f"{source}: this model takes no point prompts; run without --points")
    classes = []
    for n, point in enumerate(spec["points"]):
        try:
            classes.append(class_index(point["class"], settings.class_names))
        except InputError as error:
            raise InputError(f"{source}: point {n}: {error}") from None
    classes = np.array(classes)
    positions = np.array([p["position"] for p in spec["points"]], dtype=np.float64)
    try:
        if spec["coordinates"] == "world":
            slices, xy = world_to_model(positions, image, settings.img_size)
        elif spec["coordinates"] == "itksnap":
            slices, xy = voxel_to_model(positions - 1.0, image, settings.img_size)
        else:
            slices, xy = voxel_to_model(positions, image, settings.img_size)
    except OutsideImageError as error:
        if spec["coordinates"] == "itksnap":
            raise InputError(
                f"{source}: point {error.point}: ITK-SNAP voxel {format_position(positions[error.point])} "
                f"outside the image {index_ranges(error.size, base=1)}"
            ) from None
        raise InputError(f"{source}: {error}") from None
    except ValueError as error:
        raise InputError(f"{source}: {error}") from None
    grid = CanonicalGrid.of(image)
    num_slots = (settings.num_classes - 1) * k
    prompts: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    filled: dict[tuple[int, int], int] = {}
    for n, (cls, s, point) in enumerate(zip(classes, slices.tolist(), xy)):
        if s not in prompts:
            prompts[s] = (np.zeros((num_slots, 2), np.float32), np.full(num_slots, PADDING_LABEL, np.int64))
        used = filled.get((s, cls), 0)
        if used == k:
            raise InputError(
                f"{source}: point {n}: more than {k} points for class {settings.class_names[cls]!r} on axial slice "
                f"{grid.slice_name(s)} (0-based; the model has {k} slots per class)"
            )
        slot = (cls - 1) * k + used
        prompts[s][0][slot] = point
        prompts[s][1][slot] = POINT_LABEL
        filled[(s, cls)] = used + 1
    return dict(sorted(prompts.items()))


# ---------------------------------------------------------------- the whole volume


def predict_canonical(
    model: nn.Module,
    settings: InferenceSettings,
    hu: np.ndarray,
    prompts: dict[int, tuple[np.ndarray, np.ndarray]] | None,
    batch_size: int,
    device: torch.device,
) -> np.ndarray:
    """Canonical (slices, H, W) HU -> labels of the same shape; with prompts only those slices."""
    labels = np.zeros(hu.shape, dtype=np.uint8)
    if prompts is None:
        return segment_slices(model, settings, hu, None, None, batch_size, device)
    if not prompts:
        return labels
    chosen = np.array(sorted(prompts), dtype=np.int64)
    points = np.stack([prompts[s][0] for s in chosen])
    point_labels = np.stack([prompts[s][1] for s in chosen])
    labels[chosen] = segment_slices(model, settings, hu[chosen], points, point_labels, batch_size, device)
    return labels


def predict_volume(
    model: nn.Module,
    config: Mapping[str, Any],
    image: sitk.Image,
    points: Mapping[str, Any] | None = None,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
) -> sitk.Image:
    """Segment `image` (3-D CT in HU); returns a uint8 label image on exactly its grid.

    points: None for unprompted inference on every axial slice, or a points structure
    ({"coordinates": "voxel" | "itksnap" | "world", "points": [{"class", "position"}, ...]}),
    in which case only the slices holding clicks are segmented and the others stay 0.
    """
    settings = inference_settings(config)
    device = torch.device(device)
    model = model.to(device).eval()
    canonical, hu = canonical_hu(image)
    prompts = prompts_from_points(points, image, settings) if points is not None else None
    labels = predict_canonical(model, settings, hu, prompts, batch_size, device)
    return labels_on_original_grid(labels, canonical, image)


# ---------------------------------------------------------------- writing


def label_description(class_names: tuple[str, ...] | list[str]) -> str:
    """ITK-SNAP label description text: IDX R G B A VIS MSH "LABEL" per class."""
    lines = [
        "# ITK-SnAP Label Description File",
        "# written by usam predict; columns: IDX -R- -G- -B- -A-- VIS MSH LABEL",
        f'{0:5d} {0:5d} {0:4d} {0:4d} {0:8.2f} {0:2d} {0:2d}    "Clear Label"',
    ]
    for value, name in enumerate(class_names[1:], start=1):
        r, g, b = LABEL_COLORS[(value - 1) % len(LABEL_COLORS)]
        label = str(name).replace('"', "'")
        lines.append(f'{value:5d} {r:5d} {g:4d} {b:4d} {1:8.2f} {1:2d} {1:2d}    "{label}"')
    return "\n".join(lines) + "\n"


def label_description_path(out: Path) -> Path:
    """pred.nii.gz -> pred_labels.txt beside it."""
    name = out.name
    for suffix in (*LABEL_VOLUME_EXTENSIONS, ".gz"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return out.with_name(f"{name}_labels.txt")


def check_parent_creatable(path: Path, what: str) -> None:
    """The folder `path` exists or can be made: its nearest existing ancestor is a writable folder."""
    if problem := creation_problem(path):
        raise InputError(f"{what}: {problem}")


def check_output_path(out: Path, image: Path | None = None) -> None:
    """Refuse an --out that cannot become a label volume, before any work (InputError, one line)."""
    if os.path.isdir(out):
        raise InputError(f"--out {out}: is an existing folder; give a file name such as {out / 'pred.nii.gz'}")
    if not out.name.endswith(LABEL_VOLUME_EXTENSIONS):
        raise InputError(
            f"--out {out}: cannot write a label volume named like this; end it with one of "
            f"{', '.join(LABEL_VOLUME_EXTENSIONS)}"
        )
    if label_description_path(out).name == "_labels.txt":
        raise InputError(f"--out {out}: give the file a name before its extension, such as pred.nii.gz")
    if image is not None and os.path.exists(out) and out.resolve() == Path(image).resolve():
        raise InputError(f"--out {out}: is the input image; give another file name")
    if os.path.isdir(label_description_path(out)):
        raise InputError(f"--out {out}: {label_description_path(out)} is an existing folder")
    check_parent_creatable(out.parent, f"--out {out}")


def _overlay_folder_is_ours(folder: Path) -> bool:
    """True for an empty folder, or one whose every entry usam predict listed in its marker."""
    entries = set(os.listdir(folder))
    if not entries:
        return True
    try:
        listed = set(json.loads((folder / OVERLAY_MARKER).read_text(encoding="utf-8"))["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return entries <= listed | {OVERLAY_MARKER}


def check_overlay_folder(folder: Path, out: Path) -> None:
    """Refuse an --overlays folder we could not replace without losing the user's files."""
    what = f"--overlays {folder}"
    if os.path.abspath(folder) == os.path.abspath(out):
        raise InputError(f"{what}: is the --out path")
    if Path(os.path.abspath(out)).is_relative_to(os.path.abspath(folder)):
        raise InputError(f"{what}: would hold the --out file; give a separate folder")
    if os.path.islink(folder):
        raise InputError(f"{what}: is a symbolic link; give the folder it points to")
    if os.path.lexists(folder) and not os.path.isdir(folder):
        raise InputError(f"{what}: is a file, not a folder")
    if os.path.isdir(folder) and not _overlay_folder_is_ours(folder):
        raise InputError(
            f"{what}: holds files usam predict did not write there; give a new or empty folder"
        )
    check_parent_creatable(folder.parent, what)


def _make_folders(folder: Path) -> list[Path]:
    """mkdir -p; returns the folders it created, outermost first."""
    missing = []
    folder = Path(os.path.abspath(folder))
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        path.mkdir()
    return missing[::-1]


def _reason(error: Exception) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return error_line(error, last=True)


class OutputWriter:
    """Stages every output in hidden temporary folders beside its destination, then moves them in.

    On failure (OSError, RuntimeError) it raises InputError with one line and removes what it staged
    and the folders it created, leaving no partial output.
    """

    def __init__(self) -> None:
        self.staged: list[Path] = []
        self.created: list[Path] = []

    def stage_folder(self, parent: Path, prefix: str) -> Path:
        self.created += _make_folders(parent)
        folder = make_staging_dir(parent, prefix)
        self.staged.append(folder)
        return folder

    def cleanup(self, failed: bool) -> None:
        for folder in self.staged:
            shutil.rmtree(folder, ignore_errors=True)
        if failed:
            for folder in reversed(self.created):
                try:
                    folder.rmdir()
                except OSError:
                    pass


def _move_files_in(staged: Path, destination: Path, last: str) -> None:
    """Move every file of `staged` into `destination` (os.replace each), the file named `last` last."""
    for path in sorted(staged.iterdir(), key=lambda p: (p.name == last, p.name)):
        os.replace(path, destination / path.name)


def _swap_folder(staged: Path, folder: Path) -> None:
    """Put `staged` in place of `folder`, whose files, ours, are then removed."""
    if folder.exists() and not _overlay_folder_is_ours(folder):  # checked before the run, and again here
        raise InputError(f"--overlays {folder}: holds files usam predict did not write there")
    replace_folder(staged, folder)


def write_image_atomic(image: sitk.Image, out: Path, extra_text: Mapping[str, str] | None = None) -> None:
    """Write `image` (and text files `extra_text` {name: text} beside it) through a hidden temporary
    folder in out's parent, then move them in; the volume's header (out itself) moves last.

    Raises InputError naming `out` and the reason; nothing partial is left.
    """
    out = Path(out)
    writer = OutputWriter()
    failed = True
    try:
        staged = writer.stage_folder(out.parent, ".usam-predict-")
        sitk.WriteImage(image, str(staged / out.name), useCompression=True)
        for name, text in (extra_text or {}).items():
            (staged / name).write_text(text, encoding="utf-8")
        _move_files_in(staged, out.parent, last=out.name)
        failed = False
    except (OSError, RuntimeError) as error:
        raise InputError(f"--out {out}: could not write ({_reason(error)})") from None
    finally:
        writer.cleanup(failed)


def stage_overlays(
    writer: OutputWriter,
    folder: Path,
    hu: np.ndarray,
    labels: np.ndarray,
    settings: InferenceSettings,
    grid: CanonicalGrid,
) -> tuple[Path, list[str]]:
    """Render the overlays into a hidden temporary folder beside `folder` (with the marker file).

    Returns the staged folder and the PNG names written (none when no slice holds a label).
    """
    from usam.overlays import save_slice_overlays

    staged = writer.stage_folder(folder.parent, f".{folder.name}.tmp-")
    names = [(AXIS_NAMES[grid.slice_axis], grid.image_slice(s)) for s in range(labels.shape[0])]
    written = save_slice_overlays(hu, labels, settings.class_names, settings.window, staged, names)
    files = sorted(path.name for path in written)
    marker = {"written_by": "usam predict", "files": files}
    (staged / OVERLAY_MARKER).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")
    return staged, files


def write_outputs(
    result: sitk.Image,
    out: Path,
    settings: InferenceSettings,
    overlays: tuple[Path, np.ndarray, np.ndarray, CanonicalGrid] | None = None,
) -> list[str] | None:
    """Write the label volume and its label description file, and the overlays when asked
    (``overlays``: folder, canonical HU, canonical labels, grid).

    Everything is rendered and staged before anything is moved in, so a failure while writing leaves
    no partial output (only a failed final rename of the overlay folder, after the volume is in place,
    says so in its message). Returns the overlay PNG names (None without overlays). Raises InputError, one line.
    """
    writer = OutputWriter()
    failed = True
    staged_overlays = files = None
    what = f"--out {out}"
    try:
        if overlays is not None:
            folder, hu, labels, grid = overlays
            what = f"--overlays {folder}"
            staged_overlays, files = stage_overlays(writer, Path(folder), hu, labels, settings, grid)
        description = label_description_path(out)
        write_image_atomic(result, out, {description.name: label_description(settings.class_names)})
        if staged_overlays is not None:
            what = f"--overlays {folder} (the label volume {out} was written)"
            _swap_folder(staged_overlays, Path(folder))
        failed = False
    except (OSError, RuntimeError) as error:
        raise InputError(f"{what}: could not write ({_reason(error)})") from None
    finally:
        writer.cleanup(failed)
    return files


# ---------------------------------------------------------------- command line


def add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder (config.json + model.safetensors)")
    parser.add_argument("--image", required=True, help="CT: a DICOM folder or a volume file (NIfTI, NRRD, MHA, ...)")
    parser.add_argument("--points", default=None, help="clicks JSON (docs/evaluation.md); without it: unprompted")
    parser.add_argument(
        "--out",
        required=True,
        help=f"output label volume, e.g. pred.nii.gz (one of {', '.join(LABEL_VOLUME_EXTENSIONS)}); "
        "<name>_labels.txt (ITK-SNAP label descriptions) is written beside it",
    )
    parser.add_argument(
        "--overlays",
        default=None,
        help="folder for PNG overlays, one per axial slice holding labels, named slice_k0012.png by the "
        "input's own 0-based voxel index along its axial axis (k for axial scans; slice_i/slice_j for a "
        "volume stored in another plane; ITK-SNAP's cursor shows it + 1). The folder is replaced as a whole "
        "on each run (built as a hidden .<name>.tmp-* folder beside it, then swapped in); it must be new, "
        f"empty, or written by usam predict (it keeps a {OVERLAY_MARKER} list of its files), so no other file "
        "is ever deleted",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="slices per forward pass (default 16)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")


def run_predict(args: argparse.Namespace) -> int:
    """`usam predict`; returns the exit status (0 ok, 2 bad input or an output that could not be written)."""
    from rich.console import Console

    from usam.models.checkpoints import load_checkpoint

    console = Console(stderr=True, soft_wrap=True, markup=False, highlight=False)  # one line per message
    out = Path(args.out)
    overlays = Path(args.overlays) if args.overlays else None
    try:
        check_output_path(out, Path(args.image))
        if overlays is not None:
            check_overlay_folder(overlays, out)
        if args.batch_size < 1:
            raise InputError(f"--batch-size must be >= 1, got {args.batch_size}")
        device = resolve_device(args.device)
        spec = load_points(args.points) if args.points else None
        notes: list[str] = []
        image = read_image(args.image, notes)
        try:
            model, config = load_checkpoint(args.checkpoint, map_location="cpu")
        except (ValueError, FileNotFoundError) as error:
            raise InputError(str(error)) from None
        settings = inference_settings(config)
        model = model.to(device).eval()
        canonical, hu = canonical_hu(image)
        prompts = prompts_from_points(spec, image, settings, args.points) if spec is not None else None
    except InputError as error:
        print(f"usam predict: {error}", file=sys.stderr)
        return 2
    labels = predict_canonical(model, settings, hu, prompts, args.batch_size, device)
    result = labels_on_original_grid(labels, canonical, image)
    try:
        drawn = write_outputs(result, out, settings,
                              None if overlays is None else (overlays, hu, labels, CanonicalGrid.of(image)))
    except InputError as error:
        print(f"usam predict: {error}", file=sys.stderr)
        return 2
    counts = np.bincount(labels.reshape(-1), minlength=settings.num_classes)
    run = "unprompted on every slice" if prompts is None else f"prompted on {len(prompts)} slice(s)"
    for note in notes:
        console.print(f"usam predict: {note}")
    console.print(f"usam predict: {hu.shape[0]} slices, {run}, on {device.type}; wrote {out}")
    for c in range(1, settings.num_classes):
        console.print(f"  {settings.class_names[c]}: {int(counts[c])} voxels")
    if drawn is not None:
        if drawn:
            console.print(f"  overlays: {len(drawn)} PNG(s) in {overlays}")
        else:
            console.print(f"  overlays: nothing to draw (no foreground predicted); {overlays} holds no PNG")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="usam predict", description=__doc__.splitlines()[0])
    add_predict_arguments(parser)
    return run_predict(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
