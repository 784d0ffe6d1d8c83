"""`usam predict`: segment a new CT volume, optionally from point clicks, on its original grid.

Pipeline: read (DICOM folder or volume file) -> ``DICOMOrient(image, "LPS")`` (the stored slices'
orientation) -> every axial slice windowed, resized to the model size and run in batches -> logits
resized back to each slice's H x W (bilinear) -> argmax -> uint8 label volume reoriented to the
input's grid (same size, spacing, origin, direction) -> written atomically: a label volume with an ITK-SNAP label
description file beside it, or (``--out-format seg | rtstruct``, DICOM input only) a DICOM Segmentation or RT
Structure Set referencing the series read (``usam.dicom_outputs``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import SimpleITK as sitk
import torch
from rich.console import Console
from torch import nn

from care_dataset.error_text import error_line
from care_dataset.raw.dicom import (
    DICOM_MODALITIES,
    DicomError,
    DicomSeries,
    no_series_reason,
    read_series_int16,
    scan_dicom,
)
from care_dataset.raw.image import to_canonical
from care_dataset.raw.volume import PathNameError, VolumeFileError, itk_path, read_volume_file
from usam.inference import InferenceSettings, InputError, choose_device, inference_settings, segment_slices
from usam.interactive import FeatureCache, Propagation, SliceClicks, propagate, reach_lines
from usam.models.checkpoints import checkpoint_digest, load_checkpoint
from usam.outputs import DICOM_FORMATS, check_output_path, check_overlay_folder, write_prediction
from usam.prompts import (
    CanonicalGrid,
    OutsideImageError,
    format_position,
    index_ranges,
    slots_from_clicks,
    voxel_to_model,
    world_to_model,
)

if TYPE_CHECKING:
    import pydicom

    from usam.dicom_outputs import SourceSeries

COORDINATE_KINDS = ("voxel", "itksnap", "world")
CLICK_LABELS = ("positive", "negative")


# ---------------------------------------------------------------- reading and geometry


def read_image(path: str | os.PathLike, notes: list[str] | None = None) -> sitk.Image:
    """A 3-D CT from a volume file (NIfTI, NRRD, MHA, ...) or a DICOM folder.

    For a folder, every DICOM file below it (any nesting) is scanned as care-convert does
    (``care_dataset.raw.dicom.scan_dicom``: localizers and single images set aside) and the CT series
    with the most slices is read in HU (ties: the original before a derived series, then the lowest
    series number). A NIfTI file is also checked for truncated data and for a qform and sform that
    disagree (``care_dataset.raw.volume``). Raises InputError with the reason; appends to ``notes`` what the
    user should know about the choice made (which series, 8-bit voxels).
    """
    return read_input(path, notes)[0]


def read_input(path: str | os.PathLike, notes: list[str] | None = None) -> tuple[sitk.Image, DicomSeries | None]:
    """``read_image``'s image, and the DICOM series it was read from (None for a volume file)."""
    notes = notes if notes is not None else []
    path = Path(path)
    series = None
    try:
        itk_path(path)
    except PathNameError as error:
        raise InputError(f"{ascii(str(path))[1:-1]}: {error}") from None
    if path.is_dir():
        image, series = _read_dicom_folder(path, notes)
    elif path.is_file():
        image = _read_volume_file(path)
    else:
        raise InputError(f"{path}: no such file or folder")
    _check_ct(image, path, notes)
    return image, series


def _read_dicom_folder(path: Path, notes: list[str]) -> tuple[sitk.Image, DicomSeries]:
    """The CT series with most slices below the folder `path`, read in HU; notes which one."""
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
    return image, chosen


def _read_volume_file(path: Path) -> sitk.Image:
    """The volume file `path` (not a DICOM file: its folder is what to give)."""
    try:
        if sitk.ImageFileReader.GetImageIOFromFileName(str(path)) == "GDCMImageIO":
            raise InputError(f"{path}: one DICOM file; give the folder that holds its series")
        return read_volume_file(path)
    except RuntimeError as error:
        raise InputError(f"{path}: not a readable image ({error_line(error, last=True)})") from None
    except VolumeFileError as error:
        raise InputError(f"{path}: {error}") from None


def _check_ct(image: sitk.Image, path: Path, notes: list[str]) -> None:
    """Refuse what is not one 3-D channel; note 8-bit voxels."""
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{path}: need a 3-D single-channel CT, got {image.GetDimension()}-D with "
            f"{image.GetNumberOfComponentsPerPixel()} components"
        )
    if image.GetPixelID() in (sitk.sitkUInt8, sitk.sitkInt8):
        notes.append("8-bit voxels read as HU: an 8-bit CT is usually a windowed export, not Hounsfield units, "
                     "and the model expects HU")


def volume_kind(path: Path) -> str:
    """'a NIfTI file', 'an NRRD file', ... as the refusal of --out-format seg and rtstruct names it."""
    name = path.name.lower()
    for suffixes, kind in (((".nii", ".nii.gz"), "a NIfTI file"), ((".nrrd", ".nhdr"), "an NRRD file"),
                           ((".mha", ".mhd"), "a MetaImage file")):
        if name.endswith(suffixes):
            return kind
    return "a volume file"


def check_not_a_source_file(out: Path, series: DicomSeries | None) -> None:
    """Refuse an --out that would replace one of the DICOM files the series was read from."""
    if series is not None and os.path.exists(out) and out.resolve() in {f.resolve() for f in series.files}:
        raise InputError(f"--out {out}: is a file of the input DICOM series; give another file name")


def dicom_source(out_format: str, image_path: Path, series: DicomSeries | None) -> SourceSeries | None:
    """For --out-format seg or rtstruct, the images `series` was read from; None for nifti.

    InputError, one line, when the input is no DICOM series (a derived DICOM object references its instances).
    """
    if out_format not in DICOM_FORMATS:
        return None
    if series is None:
        raise InputError(f"--out-format {out_format} needs a DICOM series as --image (the {DICOM_FORMATS[out_format]} "
                         f"references its images); got {volume_kind(image_path)}, {image_path}: give the DICOM "
                         "folder, or use --out-format nifti")
    from usam import dicom_outputs  # deferred: highdicom and scikit-image load only for a DICOM output

    try:
        return dicom_outputs.source_series(series)
    except InputError as error:
        raise InputError(f"--out-format {out_format}: {image_path}: {error}") from None


def _series_note(series: list, chosen: Any) -> str:
    """Which DICOM series was read, by slice count and series number only (no descriptions or UIDs)."""
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
    """Read and validate a points file (docs/evaluation.md, "Points file")."""
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
        if point.get("label", "positive") not in CLICK_LABELS:
            raise InputError(f"{source}: point {n} label must be one of {', '.join(CLICK_LABELS)}, "
                             f"got {point.get('label')!r}")
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
    """The points file's positive clicks as model prompts: `click_prompts` of `clicks_from_points`."""
    return click_prompts(clicks_from_points(spec, image, settings, source), settings)


def click_prompts(clicks: Mapping[int, SliceClicks], settings: InferenceSettings
                  ) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Positive clicks -> {canonical slice: (points K x 2 float32 model-input (x, y), labels K int64)}, the slots
    filled as the checkpoint's prompt style says (`usam.prompts.slots_from_clicks`); a slice holding only negative
    clicks is left out."""
    protocol = settings.protocol()
    return {s: slots_from_clicks(clicks[s].positive, settings.num_classes, settings.points_per_class, protocol)
            for s in sorted(clicks) if clicks[s].positive}


def clicks_from_points(
    spec: Mapping[str, Any], image: sitk.Image, settings: InferenceSettings, source: str = "points"
) -> dict[int, SliceClicks]:
    """Clicks -> {canonical slice: SliceClicks}, (x, y) model-input points per class, positive and negative.

    'voxel': 0-based (i, j, k) indices of `image`, as SimpleITK and nibabel count; 'itksnap': the
    1-based voxel coordinates ITK-SNAP's cursor inspector shows; 'world': physical (x, y, z) mm in
    ITK's LPS convention. Per slice, class c fills its slots (c - 1) * k .. c * k - 1 in click order; unused
    slots are padding (a checkpoint trained with the released prompt style gets every slot filled, in its axis
    order: `usam.prompts.slots_from_clicks`); at most k positive clicks per class and slice, negative clicks
    ('"label": "negative"') without limit. Errors name ``source`` (the points file) and the point.
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
        aligned = settings.corner_aligned
        if spec["coordinates"] == "world":
            slices, xy = world_to_model(positions, image, settings.img_size, aligned)
        elif spec["coordinates"] == "itksnap":
            slices, xy = voxel_to_model(positions - 1.0, image, settings.img_size, aligned)
        else:
            slices, xy = voxel_to_model(positions, image, settings.img_size, aligned)
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
    clicks: dict[int, SliceClicks] = {}
    for n, (cls, s, point) in enumerate(zip(classes, slices.tolist(), xy)):
        on_slice = clicks.setdefault(s, SliceClicks())
        if spec["points"][n].get("label", "positive") == "negative":
            on_slice.negative.setdefault(int(cls), []).append(point)
            continue
        chosen = on_slice.positive.setdefault(int(cls), [])
        if len(chosen) == k:
            raise InputError(
                f"{source}: point {n}: more than {k} points for class {settings.class_names[cls]!r} on axial slice "
                f"{grid.slice_name(s)} (0-based; the model has {k} slots per class)"
            )
        chosen.append(point)
    return {s: clicks[s] for s in sorted(clicks)}


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


def predict_clicked(
    model: nn.Module,
    settings: InferenceSettings,
    hu: np.ndarray,
    clicks: dict[int, SliceClicks],
    propagation: bool,
    min_area: int,
    batch_size: int,
    device: torch.device,
) -> tuple[np.ndarray, Propagation | None]:
    """Canonical (slices, H, W) HU and clicks -> (labels of the same shape, the propagation or None).

    With `propagation` the clicks travel to the whole volume (`usam.interactive.propagate`); without it only the
    clicked slices are segmented, the others stay 0 (through `predict_canonical`, unless negative clicks need the
    extra slots and their removal).
    """
    has_negatives = any(c.negative for c in clicks.values())
    if not propagation and not has_negatives:
        return predict_canonical(model, settings, hu, click_prompts(clicks, settings), batch_size, device), None
    result = propagate(FeatureCache(model, settings, hu, device, batch_size), clicks, min_area, travel=propagation)
    return result.labels, (result if propagation else None)


def predict_volume(
    model: nn.Module,
    config: Mapping[str, Any],
    image: sitk.Image,
    points: Mapping[str, Any] | None = None,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    propagation: bool = False,
    min_area: int = 20,
) -> sitk.Image:
    """Segment `image` (3-D CT in HU); returns a uint8 label image on exactly its grid.

    points: None for unprompted inference on every axial slice, or a points structure
    ({"coordinates": "voxel" | "itksnap" | "world", "points": [{"class", "position", "label"?}, ...]}),
    in which case only the slices holding clicks are segmented and the others stay 0, or, with `propagation`,
    the clicks travel to the whole volume (`predict_clicked`; `min_area` in model-input pixels).
    """
    settings = inference_settings(config)
    device = torch.device(device)
    model = model.to(device).eval()
    canonical, hu = canonical_hu(image)
    if points is None:
        labels = predict_canonical(model, settings, hu, None, batch_size, device)
    else:
        clicks = clicks_from_points(points, image, settings)
        labels = predict_clicked(model, settings, hu, clicks, propagation, min_area, batch_size, device)[0]
    return labels_on_original_grid(labels, canonical, image)


# ---------------------------------------------------------------- command line


def run_predict(args: argparse.Namespace) -> int:
    """`usam predict`; returns the exit status (0 ok, 2 bad input or an output that could not be written)."""
    console = Console(stderr=True, soft_wrap=True, markup=False, highlight=False)  # one line per message
    out = Path(args.out)
    overlays = Path(args.overlays) if args.overlays else None
    out_format = args.out_format
    try:
        check_output_path(out, Path(args.image), out_format)
        if overlays is not None:
            check_overlay_folder(overlays, out)
        if args.batch_size < 1:
            raise InputError(f"--batch-size must be >= 1, got {args.batch_size}")
        if args.min_area < 1:
            raise InputError(f"--min-area must be >= 1 pixel, got {args.min_area}")
        if args.propagate and not args.points:
            raise InputError("--propagate carries clicks to the whole volume: give the clicks with --points")
        propagation = args.points is not None and args.propagate is not False
        device = choose_device(args.device)
        spec = load_points(args.points) if args.points else None
        notes: list[str] = []
        image, series = read_input(args.image, notes)
        check_not_a_source_file(out, series)
        source = dicom_source(out_format, Path(args.image), series)
        try:
            model, config = load_checkpoint(args.checkpoint, map_location="cpu")
        except (ValueError, FileNotFoundError) as error:
            raise InputError(str(error)) from None
        settings = inference_settings(config)
        model = model.to(device).eval()
        canonical, hu = canonical_hu(image)
        clicks = clicks_from_points(spec, image, settings, args.points) if spec is not None else None
    except InputError as error:
        print(f"usam predict: {error}", file=sys.stderr)
        return 2
    prompts, reached = clicks, None
    if clicks is None:
        labels = predict_canonical(model, settings, hu, None, args.batch_size, device)
    else:
        labels, reached = predict_clicked(model, settings, hu, clicks, propagation, args.min_area,
                                          args.batch_size, device)
    result = labels_on_original_grid(labels, canonical, image)
    try:
        if source is not None:
            result = dicom_prediction(out_format, source, result, settings, args.checkpoint, config, prompts)
        drawn = write_prediction(result, out, settings,
                                 None if overlays is None else (overlays, hu, labels, CanonicalGrid.of(image)))
    except InputError as error:
        print(f"usam predict: {error}", file=sys.stderr)
        return 2
    counts = np.bincount(labels.reshape(-1), minlength=settings.num_classes)
    run = "unprompted on every slice" if prompts is None else f"prompted on {len(prompts)} slice(s)"
    if reached is not None:
        run = f"clicked on {len(prompts)} slice(s), propagated from them, unprompted where no class reached"
    for note in notes:
        console.print(f"usam predict: {note}")
    what = f" ({DICOM_FORMATS[out_format]} referencing {len(series.headers)} slices)" if source is not None else ""
    console.print(f"usam predict: {hu.shape[0]} slices, {run}, on {device.type}; wrote {out}{what}")
    for c in range(1, settings.num_classes):
        console.print(f"  {settings.class_names[c]}: {int(counts[c])} voxels")
    if reached is not None:
        for line in reach_lines(reached, CanonicalGrid.of(image), settings.class_names):
            console.print(f"  {line}")
    if drawn is not None:
        if drawn:
            console.print(f"  overlays: {len(drawn)} PNG(s) in {overlays}")
        else:
            console.print(f"  overlays: nothing to draw (no foreground predicted); {overlays} holds no PNG")
    return 0


def dicom_prediction(out_format: str, source: SourceSeries, result: sitk.Image, settings: InferenceSettings,
                     checkpoint: str | os.PathLike, config: Mapping[str, Any], prompts: Mapping | None
                     ) -> pydicom.Dataset:
    """The label image `result` (on the source series' grid) as the --out-format's DICOM object, whose algorithm is
    the checkpoint's model, versioned by a short hash of the checkpoint's files."""
    from usam import dicom_outputs  # deferred: highdicom and scikit-image load only for a DICOM output

    try:
        version = checkpoint_digest(checkpoint)
    except OSError as error:
        raise InputError(f"checkpoint {checkpoint}: cannot read it again ({error.strerror or error})") from None
    provenance = dicom_outputs.Provenance(str(config["model"]["name"]), version, prompts is not None)
    labels = sitk.GetArrayFromImage(result)  # (slices, rows, columns): the series' slices in their order
    return dicom_outputs.derived_object(out_format, source, labels, settings.class_names, provenance)
