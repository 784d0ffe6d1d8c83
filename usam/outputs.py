"""Writing the output files of usam predict and usam eval all or nothing (on care_dataset.files): each output
is staged in a hidden folder beside its destination and moved in whole, so a failed write leaves nothing partial.
Also which --out names each --out-format takes, and which --overlays folders usam predict may replace (its marker
file lists what it wrote there)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

from care_dataset.error_text import error_line
from care_dataset.files import creation_problem, make_staging_dir, replace_folder
from usam.inference import InferenceSettings, InputError
from usam.prompts import AXIS_NAMES, CanonicalGrid

# Label volume formats SimpleITK writes and ITK-SNAP and 3D Slicer read as volumes (lower case, as
# ITK's NIfTI writer requires). .nhdr and .mhd write a detached data file beside the header.
LABEL_VOLUME_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
# usam predict --out-format: a label volume, a DICOM Segmentation or a DICOM RT Structure Set.
OUT_FORMATS = ("nifti", "seg", "rtstruct")
DICOM_FORMATS = {"seg": "DICOM Segmentation", "rtstruct": "DICOM RT Structure Set"}
DICOM_EXTENSION = ".dcm"
# ITK-SNAP label colours (RGB) for classes 1, 2, ...; background is transparent.
LABEL_COLORS = ((230, 159, 0), (213, 94, 0), (0, 114, 178), (0, 158, 115), (204, 121, 167), (86, 180, 233))
# Marks a --overlays folder as written by usam predict; lists the files it wrote there.
OVERLAY_MARKER = ".usam-overlays.json"


# ---------------------------------------------------------------- checks before any work


def check_parent_creatable(path: Path, what: str) -> None:
    """The folder `path` exists or can be made: its nearest existing ancestor is a writable folder."""
    if problem := creation_problem(path):
        raise InputError(f"{what}: {problem}")


def check_output_path(out: Path, image: Path | None = None, out_format: str = "nifti") -> None:
    """Refuse an --out that cannot become the --out-format's file, before any work (InputError, one line)."""
    if os.path.isdir(out):
        example = "pred.dcm" if out_format in DICOM_FORMATS else "pred.nii.gz"
        raise InputError(f"--out {out}: is an existing folder; give a file name such as {out / example}")
    if out_format in DICOM_FORMATS:
        _check_dicom_name(out, out_format)
    else:
        _check_volume_name(out)
    if image is not None and os.path.exists(out) and out.resolve() == Path(image).resolve():
        raise InputError(f"--out {out}: is the input image; give another file name")
    check_parent_creatable(out.parent, f"--out {out}")


def _check_volume_name(out: Path) -> None:
    """A label volume name SimpleITK writes, whose label description file beside it is no folder."""
    if not out.name.endswith(LABEL_VOLUME_EXTENSIONS):
        hint = (" (for a DICOM SEG or RT Structure Set add --out-format seg or rtstruct)"
                if out.name.lower().endswith(DICOM_EXTENSION) else "")
        raise InputError(
            f"--out {out}: cannot write a label volume named like this; end it with one of "
            f"{', '.join(LABEL_VOLUME_EXTENSIONS)}{hint}"
        )
    if label_description_path(out).name == "_labels.txt":
        raise InputError(f"--out {out}: give the file a name before its extension, such as pred.nii.gz")
    if os.path.isdir(label_description_path(out)):
        raise InputError(f"--out {out}: {label_description_path(out)} is an existing folder")


def _check_dicom_name(out: Path, out_format: str) -> None:
    """One DICOM file: a name ending in .dcm (any case), with something before it."""
    if not out.name.lower().endswith(DICOM_EXTENSION):
        raise InputError(f"--out {out}: --out-format {out_format} writes one {DICOM_FORMATS[out_format]} file; "
                         f"end its name with {DICOM_EXTENSION}, such as pred_{out_format}.dcm")
    if len(out.name) == len(DICOM_EXTENSION):
        raise InputError(f"--out {out}: give the file a name before its extension, such as pred_{out_format}.dcm")


def overlay_folder_is_ours(folder: Path) -> bool:
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
    if os.path.isdir(folder) and not overlay_folder_is_ours(folder):
        raise InputError(
            f"{what}: holds files usam predict did not write there; give a new or empty folder"
        )
    check_parent_creatable(folder.parent, what)


# ---------------------------------------------------------------- the label description file


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


# ---------------------------------------------------------------- staging


class OutputWriter:
    """Stages every output in hidden temporary folders beside its destination, then moves them in;
    `cleanup(failed=True)` also removes the folders it created, so a failed write leaves no partial output."""

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


def _move_files_in(staged: Path, destination: Path, names: Iterable[str]) -> None:
    """Move the files `names` of `staged` into `destination` (os.replace each), in that order."""
    for name in names:
        os.replace(staged / name, destination / name)


def error_reason(error: Exception) -> str:
    """An OSError's own words ("No space left on device"), else the error's last line."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return error_line(error, last=True)


# ---------------------------------------------------------------- writing


def write_files_atomic(out: Path, render: Callable[[Path], None]) -> None:
    """``render(folder)`` writes the file named like `out` (and any files beside it) into a hidden temporary
    folder in out's parent; they are then moved in, out itself last.

    Raises InputError naming `out` and the reason; nothing partial is left.
    """
    out = Path(out)
    writer = OutputWriter()
    failed = True
    try:
        staged = writer.stage_folder(out.parent, ".usam-predict-")
        render(staged)
        header_last = sorted(os.listdir(staged), key=lambda name: (name == out.name, name))
        _move_files_in(staged, out.parent, header_last)
        failed = False
    except (OSError, RuntimeError) as error:
        raise InputError(f"--out {out}: could not write ({error_reason(error)})") from None
    finally:
        writer.cleanup(failed)


def write_image_atomic(image: sitk.Image, out: Path, extra_text: Mapping[str, str] | None = None) -> None:
    """Write `image` (and text files `extra_text` {name: text} beside it) through `write_files_atomic`: the
    volume's header (out itself) moves in last. Raises InputError; nothing partial is left."""

    def render(folder: Path) -> None:
        sitk.WriteImage(image, str(folder / out.name), useCompression=True)
        for name, text in (extra_text or {}).items():
            (folder / name).write_text(text, encoding="utf-8")

    write_files_atomic(Path(out), render)


def write_dicom_atomic(dataset: pydicom.Dataset, out: Path) -> None:
    """Write `dataset` (with its file meta information) as the DICOM file `out` through `write_files_atomic`."""
    write_files_atomic(Path(out), lambda folder: dataset.save_as(folder / Path(out).name, enforce_file_format=True))


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
    from usam.overlays import save_slice_overlays  # deferred: matplotlib loads only when overlays are asked for

    staged = writer.stage_folder(folder.parent, f".{folder.name}.tmp-")
    names = [(AXIS_NAMES[grid.slice_axis], grid.image_slice(s)) for s in range(labels.shape[0])]
    written = save_slice_overlays(hu, labels, settings.class_names, settings.window, staged, names)
    files = sorted(path.name for path in written)
    marker = {"written_by": "usam predict", "files": files}
    (staged / OVERLAY_MARKER).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")
    return staged, files


def swap_overlay_folder(staged: Path, folder: Path) -> None:
    """Put `staged` in place of `folder`, whose files, ours, are then removed."""
    if folder.exists() and not overlay_folder_is_ours(folder):  # checked before the run, and again here
        raise InputError(f"--overlays {folder}: holds files usam predict did not write there")
    replace_folder(staged, folder)


def write_prediction(
    result: sitk.Image | pydicom.Dataset,
    out: Path,
    settings: InferenceSettings,
    overlays: tuple[Path, np.ndarray, np.ndarray, CanonicalGrid] | None = None,
) -> list[str] | None:
    """Write the label volume and its label description file (or, for a DICOM `result`, that one file), and the
    overlays when asked (``overlays``: folder, canonical HU, canonical labels, grid).

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
        if isinstance(result, pydicom.Dataset):
            write_dicom_atomic(result, out)
        else:
            description = label_description_path(out)
            write_image_atomic(result, out, {description.name: label_description(settings.class_names)})
        if staged_overlays is not None:
            what = f"--overlays {folder} (the prediction {out} was written)"
            swap_overlay_folder(staged_overlays, Path(folder))
        failed = False
    except (OSError, RuntimeError) as error:
        raise InputError(f"{what}: could not write ({error_reason(error)})") from None
    finally:
        writer.cleanup(failed)
    return files


def write_folder_files(out: Path, names: Sequence[str], render: Callable[[Path], None]) -> None:
    """Put the files `names`, which ``render(folder)`` writes into the folder it is given, into the folder `out`.

    They are rendered into a hidden folder beside `out`, then moved in: a new folder, or one that holds only
    these files, is replaced whole; in a folder that also holds other files, each of them is replaced on its
    own and the others are kept. Raises what rendering or moving raised, leaving nothing partial.
    """
    staging = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = make_staging_dir(out.parent, f".{out.name}.")
        render(staging)
        if out.is_dir() and not set(os.listdir(out)) <= set(names):
            _move_files_in(staging, out, names)
        else:
            replace_folder(staging, out)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
