"""The published folder's README.md: the dataset card's front matter with the configs and dataset_info the Hub
reads, and its body with this build's figures (counts, sizes, checksums).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from datasets.info import DatasetInfo, DatasetInfosDict
from datasets.splits import SplitDict, SplitInfo
from datasets.utils.metadata import MetadataConfigs
from huggingface_hub import DatasetCardData

from care_dataset.format.hf import CONFIGS, SLICES
from care_dataset.format.reader import CareDataset
from care_dataset.publish.errors import PublishError
from care_dataset.publish.parquet import SplitStats
from care_dataset.version import __version__

CARD_MARKER = "<!-- build-figures -->"
UNSET_LICENCE = "unknown"
# What the card says of the leak scan before an upload, by `care-publish --push` mode
LEAK_SCAN_NOTES = {
    "scanned": "- Leak scan: uploaded by `care-publish --push` only after a scan of these files and their names "
               "for the raw data's identifying values (as `care-verify`) found none",
    "skipped": "- Leak scan: **skipped** (`care-publish --no-verify`): these files were not checked for identifying "
               "values of the raw data before upload",
}


def default_card_path() -> Path:
    """The project's DATASET_CARD.md: top level of the source tree, else a copy inside the package."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package.parent / "DATASET_CARD.md", package / "DATASET_CARD.md"):
        if candidate.is_file():
            return candidate
    raise PublishError("DATASET_CARD.md not found next to the package; pass --card PATH")


def split_front_matter(text: str) -> tuple[dict, str]:
    """(YAML front matter as a dict, Markdown body) of a card file; empty dict when it has none."""
    if text.startswith("---\n"):
        end = text.find("\n---\n", 4)
        if end < 0:
            raise PublishError("dataset card: YAML front matter is not closed by '---'")
        return yaml.safe_load(text[4:end]) or {}, text[end + 5:]
    return {}, text


def card_licences(card_path: Path) -> list[str]:
    """The `license` values of a card's front matter; empty when it sets none."""
    front, _ = split_front_matter(Path(card_path).read_text(encoding="utf-8"))
    licence = front.get("license") or []
    return [str(v) for v in licence] if isinstance(licence, list) else [str(licence)]


def public_licence_problem(card_path: Path) -> str | None:
    """Why the card at `card_path` may not go public (no licence, or `unknown`), or None."""
    licences = card_licences(card_path)
    if licences and UNSET_LICENCE not in licences:
        return None
    return (f"a public push is refused while the licence in {Path(card_path).name} is {UNSET_LICENCE}: set "
            "`license:` in its front matter to the licence the data owner releases CARE under, or push without "
            "--public (a private repository)")


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def build_figures(dataset: CareDataset, splits: list[str], stats: dict[str, dict[str, SplitStats]],
                  shape: tuple[int, int] | None, leak_scan: str | None = None) -> str:
    """Markdown section with this build's counts, sizes and checksums; with `leak_scan` (a LEAK_SCAN_NOTES key)
    also what was checked before upload."""
    manifest = dataset.manifest
    profile = manifest.get("profile", {})
    lines = ["## This build", "",
             f"Written by `care-publish` (care-usam {__version__}) from a converted folder in format "
             f"`{manifest.get('format')}` {manifest.get('format_version')} (storage `{manifest.get('storage')}`, "
             f"converter {manifest.get('tool', 'care-usam')} {manifest.get('tool_version', 'unknown')}).", "",
             f"- Conversion profile: `{profile.get('name', 'unknown')}` (SHA-256 `{profile.get('sha256', 'unknown')}`)",
             "- Classes: " + ", ".join(f"{i} = {name}" for i, name in enumerate(dataset.class_names)),
             "- In-plane size: " + (f"{shape[0]} x {shape[1]} for every slice (`Array2D` features)"
                                   if shape else "varies between cases (nested `List` features)"),
             f"- Case IDs reproducible from the data custodian's key: "
             f"{'yes' if manifest.get('key_reproducible', True) else 'no (random key)'}",
             *([LEAK_SCAN_NOTES[leak_scan]] if leak_scan else []), "",
             "| split | cases | slices | " + " | ".join(f"voxels: {c}" for c in dataset.class_names[1:]) + " |",
             "|---|---:|---:|" + "---:|" * (len(dataset.class_names) - 1)]
    for split in splits:
        voxels = {c: 0 for c in dataset.class_names[1:]}
        for case_id in dataset.case_ids(split):
            for name, count in dataset.cases[case_id].get("voxels_after", {}).items():
                if name in voxels:
                    voxels[name] += int(count)
        lines.append(f"| {split} | {len(dataset.case_ids(split))} | {stats[SLICES][split].num_examples} | "
                     + " | ".join(f"{v:,}" for v in voxels.values()) + " |")
    checksums = manifest.get("checksums", {})
    overall = {k: v for k, v in checksums.items() if isinstance(v, str) and k not in dataset.cases} \
        if isinstance(checksums, dict) else {}
    lines += ["", "Content checksums (SHA-256 of a case's stored image slices then its label slices, the int16 and "
              "uint8 arrays of `slices` in C order) are stored per case in the `checksum` column of `volumes` and in "
              "`metadata/cases.json`."]
    for key, value in sorted(overall.items()):
        lines += ["", f"Checksum over all cases (`dataset.json` `checksums.{key}`): `{value}`."]
    lines += ["", "### Files", "", "| file | bytes | SHA-256 |", "|---|---:|---|"]
    for config in CONFIGS:
        for split in splits:
            for shard in stats[config][split].files:
                lines.append(f"| `{shard.path}` | {shard.num_bytes:,} ({human_bytes(shard.num_bytes)}) "
                             f"| `{shard.sha256}` |")
    return "\n".join(lines) + "\n"


def size_category(num_rows: int) -> str:
    """The Hub's ``size_categories`` bucket for a row count."""
    bounds = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
              (10_000_000, "1M<n<10M")]
    return next((name for bound, name in bounds if num_rows < bound), "10M<n<100M")


def build_readme(dataset: CareDataset, splits: list[str], features: dict[str, Any],
                 stats: dict[str, dict[str, SplitStats]], shape: tuple[int, int] | None, card_path: Path,
                 leak_scan: str | None = None) -> str:
    """README.md: YAML header (card front matter + configs + dataset_info) and the card with this build's figures
    (`leak_scan` as in build_figures)."""
    front, body = split_front_matter(card_path.read_text(encoding="utf-8"))
    front["size_categories"] = [size_category(sum(s.num_examples for s in stats[SLICES].values()))]
    card_data = DatasetCardData(**front)
    infos = {}
    for config in CONFIGS:
        split_dict = SplitDict()
        for split in splits:
            s = stats[config][split]
            split_dict.add(SplitInfo(name=split, num_bytes=s.num_bytes, num_examples=s.num_examples))
        infos[config] = DatasetInfo(
            features=features[config], splits=split_dict, config_name=config,
            download_size=sum(f.num_bytes for s in stats[config].values() for f in s.files),
            dataset_size=sum(s.num_bytes for s in stats[config].values()))
    DatasetInfosDict(infos).to_dataset_card_data(card_data)
    MetadataConfigs({
        config: {"data_files": [{"split": split, "path": f"{config}/{split}-*.parquet"} for split in splits],
                 **({"default": True} if config == SLICES else {})}
        for config in CONFIGS
    }).to_dataset_card_data(card_data)
    figures = build_figures(dataset, splits, stats, shape, leak_scan)
    body = body.replace(CARD_MARKER, figures) if CARD_MARKER in body else body.rstrip("\n") + "\n\n" + figures
    return f"---\n{card_data.to_yaml()}\n---\n{body}"
