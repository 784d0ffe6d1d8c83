"""Raw case folders: find them in a profile's layout, leave out those reached through misleading links, and
fingerprint their files for resuming.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from dataclasses import dataclass
from pathlib import Path

from care_dataset.raw.profiles import Profile
from care_dataset.raw.volume import parse_label_description, volume_suffix


@dataclass(frozen=True)
class RawCase:
    key: str  # raw folder name or image file stem: for the terminal and as identity fallback ONLY
    root: Path  # case folder, or the image file for paired layouts
    label_path: Path | None
    description_path: Path | None
    problem: str | None = None  # why the case cannot be loaded, found during discovery
    folder: str | None = None  # paired layouts: the profile's image folder the image is in (it may name a split)


def _stem(name: str) -> str:
    suffix = volume_suffix(name)
    return name[: -len(suffix)] if suffix else Path(name).stem


def files_under(folder: Path) -> list[Path]:
    """Every visible file under `folder` (hidden files and folders left out), sorted, without dangling links."""
    found = []
    for parent, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(parent) / f for f in sorted(files) if not f.startswith(".")]
    return [f for f in found if f.exists()]  # drops dangling symbolic links


DICOM_MARKER_OFFSET = 128  # a DICOM file (PS3.10) starts with a 128-byte preamble, then "DICM"


def _looks_like_image_file(path: Path) -> bool:
    """A volume file or a DICOM file (by its name or its marker bytes); unreadable files are not."""
    if volume_suffix(path.name) or path.suffix.lower() in (".dcm", ".dicom", ".ima"):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(DICOM_MARKER_OFFSET + 4)
    except OSError:
        return False
    return head[DICOM_MARKER_OFFSET:] == b"DICM"


def loose_files_problem(raw_dir: Path) -> str | None:
    """Why ``raw_dir`` cannot be read as a raw folder when it holds image files directly (not in case folders),
    with the layout to use; None otherwise. Names no file (file names may identify patients)."""
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        return None
    loose = sum(1 for f in raw_dir.iterdir()  # a DICOMDIR (a CD's index) only points into the folders
                if not f.name.startswith(".") and f.name.upper() != "DICOMDIR" and f.is_file()
                and _looks_like_image_file(f))
    if not loose:
        return None
    return (f"{raw_dir} holds {loose} DICOM or volume file(s) directly; put each case in a folder of its own: "
            f"{raw_dir}/<case>/ holding that case's DICOM series (or image volume) and its annotation")


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
        files = files_under(folder)
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
            (raw_dir / d / n for d in _label_dirs_for(image_dir, profile) for n in names
             if (raw_dir / d / n).is_file()), None
        )
        cases.append(RawCase(
            key=stem if stem_count[stem] == 1 else f"{image_dir}/{stem}",
            root=image,
            label_path=label,
            description_path=None,
            problem=None if label else f"no annotation of the same name in {', '.join(profile.label_dirs)}",
            folder=image_dir,
        ))
    return sorted(cases, key=lambda c: c.key)


def _label_dirs_for(image_dir: str, profile: Profile) -> list[str]:
    """The label folders searched for an image in ``image_dir``: the one at the same place in the profile's
    lists first (imagesTs pairs with labelsTs when one name is in several folders), then the others."""
    if len(profile.image_dirs) == len(profile.label_dirs):
        own = profile.label_dirs[profile.image_dirs.index(image_dir)]
        return [own, *(d for d in profile.label_dirs if d != own)]
    return list(profile.label_dirs)


def drop_linked_cases(raws: list, raw_dir: Path, out_dir: Path) -> tuple[list, list[tuple[str, str]]]:
    """Raw cases reached through symbolic links that would convert the wrong thing, left out.

    Skipped: a case that leads into the output folder (or above it), one that leads to the raw folder itself or
    above it (a link loop), and one that leads to a folder another case already is (the same scan twice; the
    case that is not a link is kept). Returns the kept cases and (raw name, why) of each skipped one.
    """
    kept, skipped, seen = [], [], {}
    for raw in sorted(raws, key=lambda r: (Path(r.root).is_symlink(), r.key)):
        target = Path(raw.root).resolve()
        if target == out_dir or out_dir in target.parents or target in out_dir.parents:
            skipped.append((raw.key, "it leads to the output folder (a symbolic link)"))
        elif target == raw_dir or target in raw_dir.parents:
            skipped.append((raw.key, "it leads to the raw folder itself (a symbolic link loop)"))
        elif target in seen:
            skipped.append((raw.key, f"it is the same folder as case folder {seen[target]} (a symbolic link)"))
        else:
            seen[target] = raw.key
            kept.append(raw)
    return sorted(kept, key=lambda r: r.key), sorted(skipped)


def raw_fingerprint(raw: RawCase, raw_dir: Path, key: bytes) -> str:
    """Keyed hash of a raw case's inputs (relative paths, sizes, modification times): detects changed inputs
    on resume without storing anything identifying."""
    files: set[Path] = set()
    for path in (raw.root, raw.label_path, getattr(raw, "description_path", None)):
        if path is None:
            continue
        path = Path(path)
        if path.is_dir():
            files.update(p for p in path.rglob("*") if p.is_file())
        elif path.exists():
            files.add(path)
    mac = hmac.new(key, f"raw-case\0{raw.key}\n".encode("utf-8", "surrogateescape"), hashlib.sha256)
    for path in sorted(files):
        stat = path.stat()
        try:
            relative = path.relative_to(raw_dir)
        except ValueError:
            relative = path
        mac.update(f"{relative}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return mac.hexdigest()
