"""Splits the source gives instead of a seeded draw: the image folders of a paired layout (``split = "folders"``)
or a release's case lists (``split_file``). Raw case names are matched in memory only; an error points at a
list entry by split and position, never by the name it holds.

A split file is one JSON object, split name -> list of raw case names::

    {"train": ["case_001", "case_002"], "val": ["case_003"], "test": ["case_004"]}

A name is a case folder's name (``case_folders``) or an image file's name without its ending (``paired_folders``;
``word_0001`` or ``word_0001.nii.gz``; nnU-Net's ``<case>_0000`` also as ``<case>``; ``imagesTs/<name>`` when one
name is in several image folders). Each raw case in at most one list; every name must match a raw case; raw cases
in no list are not converted.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from care_dataset.raw.discover import RawCase
from care_dataset.raw.profiles import SPLIT_NAME, Profile
from care_dataset.raw.volume import volume_suffix

CHANNEL_SUFFIX = re.compile(r"_\d{4}$")  # nnU-Net's image channel: <case>_0000
EXAMPLE = '{"train": ["<case>", ...], "test": [...]}'


class SplitListError(ValueError):
    """A split file that cannot be honoured; one line, naming entries by position only."""


@dataclass(frozen=True)
class SplitAssignment:
    """The split of each raw case, from the source. ``of_raw`` is keyed by raw case names: in memory only."""

    strategy: str  # "folders" or "file"
    names: tuple[str, ...]  # the splits, in the order the source gives them
    of_raw: dict[str, str]

    def of_case(self, case_of_raw: dict[str, str]) -> dict[str, str]:
        """Split per case ID, given the case ID of each raw case converted."""
        return {case_id: self.of_raw[raw] for raw, case_id in case_of_raw.items()}


def assign_splits(raws: list[RawCase], profile: Profile) -> SplitAssignment | None:
    """The source's splits of ``raws`` under the profile's strategy; None for the seeded patient split."""
    if profile.split_strategy == "folders":
        return folder_assignment(raws, profile)
    if profile.split_strategy == "file":
        return file_assignment(raws, read_split_file(profile.split_file), profile.split_file)
    return None


def folder_assignment(raws: list[RawCase], profile: Profile) -> SplitAssignment:
    """Each raw case in the split of its image folder (``[layout] splits``)."""
    names = tuple(dict.fromkeys(profile.folder_splits.values()))
    return SplitAssignment("folders", names, {raw.key: profile.folder_splits[raw.folder] for raw in raws})


def read_split_file(path: Path) -> dict[str, list[str]]:
    """The split file's lists; SplitListError when it is missing, not JSON or not split name -> list of names."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SplitListError(f"split file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or "not UTF-8 text"
        raise SplitListError(f"split file {path}: cannot be read ({reason})") from None
    except json.JSONDecodeError as error:
        raise SplitListError(f"split file {path}: not JSON ({error.msg}, line {error.lineno})") from None
    if not isinstance(data, dict) or not data:
        raise SplitListError(f"split file {path}: expected a JSON object of split name -> case names, {EXAMPLE}")
    for number, (split, entries) in enumerate(data.items(), start=1):
        if not isinstance(entries, list) or not all(isinstance(e, str) and e for e in entries):
            raise SplitListError(f"split file {path}: split number {number} is not a list of case names "
                                 f"(non-empty strings), {EXAMPLE}")
        if not SPLIT_NAME.fullmatch(split):
            raise SplitListError(f"split file {path}: split number {number} has a name that is not a split name "
                                 "(letters, digits, _)")
    return data


def names_of(raw: RawCase) -> set[str]:
    """The names a release list may use for a raw case (see the module's docstring)."""
    names = {raw.key}
    if raw.folder is not None:
        suffix = volume_suffix(raw.root.name)
        stem = raw.root.name[: -len(suffix)] if suffix else raw.root.stem
        names |= {stem, CHANNEL_SUFFIX.sub("", stem)}
    return names


def file_assignment(raws: list[RawCase], lists: dict[str, list[str]], path: Path) -> SplitAssignment:
    """Each raw case in the list that names it; SplitListError for a name matching no raw case or several, and
    for a raw case named twice."""
    index: dict[str, list[str]] = {}
    for raw in raws:
        for name in names_of(raw):
            index.setdefault(name, []).append(raw.key)
    of_raw: dict[str, str] = {}
    where: dict[str, str] = {}  # raw key -> "'split' entry N", for the error naming a case listed twice
    unknown: list[str] = []
    for split, entries in lists.items():
        for position, entry in enumerate(entries, start=1):
            here = f"{split!r} entry {position}"
            suffix = volume_suffix(entry)
            matches = index.get(entry[: -len(suffix)] if suffix else entry, [])
            if not matches:
                unknown.append(here)
            elif len(matches) > 1:
                raise SplitListError(f"split file {path}: {here} matches {len(matches)} raw cases (one name in "
                                     "several image folders); write it as <images folder>/<name>")
            elif matches[0] in of_raw:
                raise SplitListError(f"split file {path}: {here} names the raw case {where[matches[0]]} names; "
                                     "a case belongs to one split")
            else:
                of_raw[matches[0]], where[matches[0]] = split, here
    if unknown:
        raise SplitListError(f"split file {path}: {len(unknown)} entr{'y' if len(unknown) == 1 else 'ies'} match "
                             f"no raw case, the first {unknown[0]} (names are case folder names, or image file "
                             "names without their ending)")
    return SplitAssignment("file", tuple(lists), of_raw)
