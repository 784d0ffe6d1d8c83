"""Conversion profiles: one declarative TOML file per source dataset (see conversion/ and docs/conversion.md)."""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

PROFILE_DIR = Path(__file__).resolve().parents[2] / "conversion"
UNEVEN_SPACING_CHOICES = ("accept", "refuse")
SPLIT_NAME = re.compile(r"[A-Za-z0-9_]+")  # a split name the readers, exports and Hugging Face all accept
ALL_SLICES = "all"  # [slices] margin = "all": every axial slice of a case is kept


class ProfileError(ValueError):
    """A profile file that cannot be used, with the reason."""


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    class_names: tuple[str, ...]
    label_patterns: tuple[str, ...]
    value_map: dict[int, int]
    name_map: dict[str, int]
    unmapped: str
    keep_classes: tuple[int, ...]
    margin: int
    split_sizes: dict[str, int]  # relative sizes of the seeded patient-level split (split_strategy "patient")
    layout: str = "case_folders"
    image_dirs: tuple[str, ...] = ()
    label_dirs: tuple[str, ...] = ()
    uneven_spacing: str = "accept"  # or "refuse": DICOM series whose slices are off a regular grid
    require_air: bool = True  # refuse an image without air (<= AIR_HU): not CT in Hounsfield units
    all_slices: bool = False  # [slices] margin = "all": keep every axial slice, not only the labelled ones
    split_strategy: str = "patient"  # "patient" (seeded), "folders" (folder_splits) or "file" (split_file)
    folder_splits: dict[str, str] = field(default_factory=dict)  # image folder -> split, for "folders"
    split_file: Path | None = None  # the release's case lists, for "file"
    source_text: str = field(default="", repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.source_text.encode()).hexdigest()

    def is_label_file(self, file_name: str) -> bool:
        lowered = file_name.lower()
        return any(fnmatch.fnmatch(lowered, p.lower()) for p in self.label_patterns)

    def class_of(self, raw_value: int, description_names: dict[int, str] | None = None) -> int | None:
        """Class index for a raw label value, by value first, then by the label description's name."""
        if raw_value in self.value_map:
            return self.value_map[raw_value]
        name = (description_names or {}).get(raw_value)
        if name is not None:
            lowered = name.lower()
            for key, cls in self.name_map.items():
                if key in lowered:
                    return cls
        if self.unmapped == "background":
            return 0
        return None

    def to_json(self) -> dict:
        return {"name": self.name, "sha256": self.sha256, "toml": self.source_text}


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


def names_shipped_profile(name_or_path: str | Path) -> bool:
    """Whether ``name_or_path`` names a shipped profile: no path separator and no ``.toml`` suffix, whatever the
    working directory holds (a folder ``care/`` left by care-publish does not shadow the profile ``care``)."""
    text = str(name_or_path)
    separators = [s for s in ("/", os.sep, os.altsep) if s]
    return not any(s in text for s in separators) and not text.lower().endswith(".toml")


def load_profile(name_or_path: str | Path) -> Profile:
    """Load a profile by name (a file in conversion/) or by path to a TOML file (one with a path separator or
    the ``.toml`` suffix)."""
    path = Path(name_or_path)
    if names_shipped_profile(name_or_path):
        path = PROFILE_DIR / f"{name_or_path}.toml"
        if not path.is_file():
            raise ProfileError(f"unknown profile {str(name_or_path)!r}; available: {', '.join(available_profiles())}"
                               f" (a profile file is named by a path with a / or ending in .toml)")
    if not path.is_file():
        raise ProfileError(f"profile file {path} does not exist")
    text = path.read_text()
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ProfileError(f"profile {path.name}: invalid TOML ({err})") from None
    return parse_profile(raw, text, path.name, path.resolve().parent)


def parse_profile(raw: dict, text: str = "", origin: str = "<profile>", base_dir: Path | None = None) -> Profile:
    """A profile from its parsed TOML; ``base_dir`` anchors a relative ``split_file`` (the profile file's folder;
    None: the working directory)."""
    def need(section: str, key: str):
        try:
            return raw[section][key]
        except KeyError:
            raise ProfileError(f"profile {origin}: missing [{section}] {key}") from None

    class_names = tuple(str(n) for n in need("classes", "names"))
    if len(class_names) < 2 or class_names[0].lower() != "background":
        raise ProfileError(f"profile {origin}: [classes] names must start with 'background' and name at least one class")
    labels = raw.get("labels", {})
    value_map = {int(k): int(v) for k, v in labels.get("values", {}).items()}
    name_map = {str(k).lower(): int(v) for k, v in labels.get("names", {}).items()}
    for cls in [*value_map.values(), *name_map.values()]:
        if not 0 <= cls < len(class_names):
            raise ProfileError(f"profile {origin}: class index {cls} outside 0..{len(class_names) - 1}")
    unmapped = labels.get("unmapped", "error")
    if unmapped not in ("error", "background"):
        raise ProfileError(f"profile {origin}: [labels] unmapped must be 'error' or 'background', not {unmapped!r}")
    keep = tuple(int(c) for c in raw.get("slices", {}).get("keep_classes", range(1, len(class_names))))
    if not keep or any(not 1 <= c < len(class_names) for c in keep):
        raise ProfileError(f"profile {origin}: [slices] keep_classes must name foreground classes")
    layout = raw.get("layout", {})
    kind = layout.get("kind", "case_folders")
    if kind not in ("case_folders", "paired_folders"):
        raise ProfileError(f"profile {origin}: [layout] kind must be 'case_folders' or 'paired_folders'")
    as_tuple = lambda v: (v,) if isinstance(v, str) else tuple(v)  # noqa: E731
    strategy, split, folders, split_file = parse_splits(raw, as_tuple(layout.get("images", ())), origin, base_dir)
    patterns = labels.get("patterns", ["*seg*", "*label*"])
    if not isinstance(patterns, (str, list)) or not as_tuple(patterns) or not all(
            isinstance(p, str) and p.strip() for p in as_tuple(patterns)):
        raise ProfileError(f"profile {origin}: [labels] patterns must be one or more non-empty file name patterns")
    margin = raw.get("slices", {}).get("margin", 0)
    if margin != ALL_SLICES and (isinstance(margin, bool) or not isinstance(margin, int) or margin < 0):
        raise ProfileError(f"profile {origin}: [slices] margin must be a whole number of slices >= 0 or "
                           f"\"{ALL_SLICES}\", not {margin!r}")
    uneven_spacing = raw.get("dicom", {}).get("uneven_spacing", "accept")
    if uneven_spacing not in UNEVEN_SPACING_CHOICES:
        raise ProfileError(f"profile {origin}: [dicom] uneven_spacing must be 'accept' or 'refuse', not "
                           f"{uneven_spacing!r}")
    require_air = raw.get("image", {}).get("require_air", True)
    if not isinstance(require_air, bool):
        raise ProfileError(f"profile {origin}: [image] require_air must be true or false, not {require_air!r}")
    return Profile(
        name=str(raw.get("name", Path(origin).stem)),
        description=str(raw.get("description", "")),
        class_names=class_names,
        label_patterns=as_tuple(patterns),
        value_map=value_map,
        name_map=name_map,
        unmapped=unmapped,
        keep_classes=keep,
        margin=0 if margin == ALL_SLICES else margin,
        split_sizes=split,
        layout=kind,
        image_dirs=as_tuple(layout.get("images", ())),
        label_dirs=as_tuple(layout.get("labels", ())),
        uneven_spacing=uneven_spacing,
        require_air=require_air,
        all_slices=margin == ALL_SLICES,
        split_strategy=strategy,
        folder_splits=folders,
        split_file=split_file,
        source_text=text,
    )


def parse_splits(raw: dict, image_dirs: tuple[str, ...], origin: str, base_dir: Path | None,
                 ) -> tuple[str, dict[str, int], dict[str, str], Path | None]:
    """Split strategy, then what it needs: sizes ("patient"), the image folders' splits ("folders"), the path of
    the case lists ("file"); the others empty."""
    strategy = parse_split_strategy(raw, origin)
    if strategy == "folders":
        if raw.get("layout", {}).get("kind") != "paired_folders":
            raise ProfileError(f"profile {origin}: split = \"folders\" needs [layout] kind = \"paired_folders\" "
                               "(the image folders name the splits)")
        return strategy, {}, parse_folder_splits(raw["layout"], image_dirs, origin), None
    if strategy == "file":
        return strategy, {}, {}, _split_file_path(raw["split_file"], base_dir, origin)
    return strategy, parse_split_sizes(raw, origin), {}, None


def parse_split_strategy(raw: dict, origin: str) -> str:
    """How a profile splits its cases: a ``[split]`` table of sizes ("patient", the default), ``split =
    "folders"`` or ``split_file = PATH`` ("file"); one of them."""
    split, has_file = raw.get("split"), "split_file" in raw
    if isinstance(split, str) and split != "folders":
        raise ProfileError(f"profile {origin}: split must be \"folders\" or a [split] table of sizes, not {split!r}")
    if has_file and split is not None:
        raise ProfileError(f"profile {origin}: give split_file or split, not both")
    if has_file:
        return "file"
    return "folders" if split == "folders" else "patient"


def parse_split_sizes(raw: dict, origin: str) -> dict[str, int]:
    """The ``[split]`` table's relative sizes (default train 4, test 1)."""
    try:
        split = {str(k): int(v) for k, v in raw.get("split", {"train": 4, "test": 1}).items()}
    except (AttributeError, TypeError, ValueError):
        raise ProfileError(f"profile {origin}: [split] must give each split a whole-number size") from None
    if not split or any(v < 0 for v in split.values()) or sum(split.values()) == 0:
        raise ProfileError(f"profile {origin}: [split] sizes must be non-negative and not all zero")
    return split


def parse_folder_splits(layout: dict, image_dirs: tuple[str, ...], origin: str) -> dict[str, str]:
    """``[layout] splits``: the split of each image folder, for ``split = "folders"``; every folder named."""
    table = layout.get("splits")
    if not isinstance(table, dict) or not table:
        raise ProfileError(f"profile {origin}: split = \"folders\" needs [layout] splits, e.g. "
                           "{ imagesTr = \"train\", imagesTs = \"test\" }")
    unknown = [d for d in table if d not in image_dirs]
    if unknown:
        raise ProfileError(f"profile {origin}: [layout] splits names {unknown[0]!r}, not one of the images folders "
                           f"{list(image_dirs)}")
    missing = [d for d in image_dirs if d not in table]
    if missing:
        raise ProfileError(f"profile {origin}: [layout] splits gives no split for images folder {missing[0]!r}")
    for folder, name in table.items():
        if not isinstance(name, str) or not SPLIT_NAME.fullmatch(name):
            raise ProfileError(f"profile {origin}: [layout] splits: {folder} -> {name!r} is not a split name "
                               "(letters, digits, _)")
    return {str(k): v for k, v in table.items()}


def _split_file_path(value: object, base_dir: Path | None, origin: str) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise ProfileError(f"profile {origin}: split_file must be a path to a JSON file of case lists")
    path = Path(value).expanduser()
    return path if path.is_absolute() or base_dir is None else base_dir / path
