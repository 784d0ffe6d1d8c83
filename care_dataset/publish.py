"""``care-publish out/ care/``: write a converted CARE folder as a Hugging Face dataset folder.

Output layout (every file deterministic: same input -> same bytes):

    care/README.md                          YAML header (configs, dataset_info, license, tags) + dataset card
    care/slices/<split>-00000-of-000NN.parquet   one row per stored slice (see care_dataset.hf)
    care/volumes/<split>-00000-of-000NN.parquet  one row per case
    care/metadata/{dataset,splits,cases}.json    copies of the converted folder's manifest files

Everything is built in a hidden sibling folder and renamed into place at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from care_dataset import __version__
from care_dataset.hf import CONFIGS, SLICES, VOLUMES, slice_features, split_order, volume_features
from care_dataset.files import creation_problem
from care_dataset.store import CareDataset, content_checksum, open_dataset

DEFAULT_MAX_SHARD_MB = 400.0
ROW_GROUP_MAX_BYTES = 64 * 2**20
METADATA_FILES = ("dataset.json", "splits.json", "cases.json")
CARD_MARKER = "<!-- build-figures -->"
BYTE_STREAM_SPLIT_COLUMNS = ("image",)  # int16 HU: byte-stream split + zstd is ~25 % smaller than dictionary


class PublishError(ValueError):
    """A converted folder or an option that cannot be published, with the reason."""


@dataclass
class ShardFile:
    path: str  # relative to the published folder, POSIX separators
    num_bytes: int
    sha256: str


@dataclass
class SplitStats:
    num_examples: int = 0
    num_bytes: int = 0  # Arrow (in-memory) bytes, as dataset_info reports them
    files: list[ShardFile] = field(default_factory=list)


def default_card_path() -> Path:
    """The project's DATASET_CARD.md: top level of the source tree, else a copy inside the package."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "DATASET_CARD.md", here / "DATASET_CARD.md"):
        if candidate.is_file():
            return candidate
    raise PublishError("DATASET_CARD.md not found next to the package; pass --card PATH")


# ---------------------------------------------------------------- Arrow arrays


def nested_list_storage(arrays: list[np.ndarray]) -> Any:
    """Arrow list<...<list<values>>> storage of equal-ndim arrays (shapes may differ), as ``datasets`` stores
    Array2D/Array3D and nested List features."""
    import pyarrow as pa

    ndim = arrays[0].ndim
    values: Any = pa.array(np.concatenate([np.ascontiguousarray(a).ravel() for a in arrays]))
    for level in reversed(range(ndim)):
        lengths = np.concatenate([np.full(int(np.prod(a.shape[:level])), a.shape[level], np.int64) for a in arrays])
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        if offsets[-1] > np.iinfo(np.int32).max:
            raise PublishError("a row group exceeds 2**31 values; lower --max-shard-mb")
        values = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), values)
    return values


def rows_to_table(rows: list[dict], schema: Any) -> Any:
    """One Arrow table from row dicts; array columns are built from numpy without Python lists."""
    import pyarrow as pa

    columns = []
    for schema_field in schema:
        values = [row[schema_field.name] for row in rows]
        if isinstance(values[0], np.ndarray) and values[0].ndim >= 2:
            storage = nested_list_storage(values)
            if isinstance(schema_field.type, pa.ExtensionType):
                storage = pa.ExtensionArray.from_storage(schema_field.type, storage)
            columns.append(storage)
        else:
            columns.append(pa.array(values, type=schema_field.type))
    return pa.Table.from_arrays(columns, schema=schema)


def _leaf_paths(name: str, pa_type: Any) -> list[str]:
    """Parquet leaf column paths of one Arrow field (``image.list.element.list.element`` for an Array2D)."""
    import pyarrow as pa

    if isinstance(pa_type, pa.ExtensionType):
        pa_type = pa_type.storage_type
    if pa.types.is_list(pa_type) or pa.types.is_large_list(pa_type) or pa.types.is_fixed_size_list(pa_type):
        return _leaf_paths(f"{name}.list.element", pa_type.value_type)
    return [name]


def parquet_options(schema: Any) -> dict:
    """Fixed Parquet writer settings: zstd level 3, byte-stream split for images, dictionary for the rest."""
    dictionary, encoding = [], {}
    for schema_field in schema:
        for leaf in _leaf_paths(schema_field.name, schema_field.type):
            if schema_field.name in BYTE_STREAM_SPLIT_COLUMNS:
                encoding[leaf] = "BYTE_STREAM_SPLIT"
            else:
                dictionary.append(leaf)
    return dict(compression="zstd", compression_level=3, use_dictionary=dictionary, column_encoding=encoding,
                write_page_index=True, write_statistics=True)


class ShardWriter:
    """Parquet shards of one split: a new file starts before a row group would push it past ``max_bytes``."""

    def __init__(self, folder: Path, split: str, schema: Any, max_bytes: int):
        self.folder, self.split, self.schema, self.max_bytes = folder, split, schema, max_bytes
        self.paths: list[Path] = []
        self._writer: Any = None
        self._sink: Any = None
        self._last_group_bytes = 0

    def _open(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = self.folder / f"{self.split}-{len(self.paths):05d}.parquet.part"
        self.paths.append(path)
        self._sink = pa.OSFile(str(path), "wb")
        self._writer = pq.ParquetWriter(self._sink, self.schema, **parquet_options(self.schema))

    def write(self, table: Any) -> None:
        if self._writer is not None and self._sink.tell() + self._last_group_bytes > self.max_bytes:
            self.close()
        if self._writer is None:
            self._open()
        before = self._sink.tell()
        self._writer.write_table(table, row_group_size=table.num_rows)
        self._last_group_bytes = self._sink.tell() - before

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._sink.close()
            self._writer = self._sink = None


# ---------------------------------------------------------------- rows


def _case_arrays(dataset: CareDataset, case_id: str) -> tuple[np.ndarray, np.ndarray, dict]:
    image, label = dataset.read_case(case_id)
    geometry = dataset.cases[case_id]
    if image.dtype != np.int16 or label.dtype != np.uint8:
        raise PublishError(f"case {case_id}: stored dtypes {image.dtype}/{label.dtype}, expected int16/uint8")
    if image.shape != label.shape or image.shape[0] != len(geometry["kept_slices"]):
        raise PublishError(f"case {case_id}: image {image.shape}, label {label.shape} and "
                           f"{len(geometry['kept_slices'])} kept slices in cases.json disagree")
    expected = geometry.get("checksum")
    if expected is not None and content_checksum(image, label) != expected:
        raise PublishError(f"case {case_id}: stored arrays do not match the checksum in cases.json")
    return image, label, geometry


def slice_rows(dataset: CareDataset, case_id: str) -> Iterator[dict]:
    """Rows of the ``slices`` configuration for one case, in stored order."""
    image, label, geometry = _case_arrays(dataset, case_id)
    spacing = [float(s) for s in geometry["spacing"]]
    for position, index in enumerate(geometry["kept_slices"]):
        yield {"image": image[position], "label": label[position], "case_id": case_id,
               "slice_index": int(index), "spacing": spacing,
               "label_classes": [int(v) for v in np.unique(label[position])]}


def volume_rows(dataset: CareDataset, case_id: str) -> Iterator[dict]:
    """The single ``volumes`` row of one case."""
    image, label, geometry = _case_arrays(dataset, case_id)
    canonical = geometry["canonical"]
    yield {"image": image, "label": label, "case_id": case_id,
           "kept_slices": [int(k) for k in geometry["kept_slices"]],
           "size": [int(s) for s in canonical["size"]],
           "spacing": [float(s) for s in canonical["spacing"]],
           "origin": [float(s) for s in canonical["origin"]],
           "direction": [float(s) for s in canonical["direction"]],
           "label_classes": [int(v) for v in np.unique(label)],
           "checksum": content_checksum(image, label)}


def _row_bytes(row: dict) -> int:
    return int(row["image"].nbytes + row["label"].nbytes)


def write_split(dataset: CareDataset, config: str, split: str, folder: Path, schema: Any,
                max_bytes: int, progress: Any = None) -> SplitStats:
    """Write one split of one configuration as Parquet shards; returns its counts (files not yet renamed)."""
    make_rows = slice_rows if config == SLICES else volume_rows
    group_limit = max(1, min(ROW_GROUP_MAX_BYTES, max_bytes))
    stats = SplitStats()
    writer = ShardWriter(folder, split, schema, max_bytes)
    pending: list[dict] = []
    pending_bytes = 0

    def flush() -> None:
        nonlocal pending, pending_bytes
        table = rows_to_table(pending, schema)
        stats.num_examples += table.num_rows
        stats.num_bytes += table.nbytes
        writer.write(table)
        pending, pending_bytes = [], 0

    try:
        for case_id in dataset.case_ids(split):
            for row in make_rows(dataset, case_id):
                if pending and pending_bytes + _row_bytes(row) > group_limit:
                    flush()
                pending.append(row)
                pending_bytes += _row_bytes(row)
            if progress is not None:
                progress()
        if pending:
            flush()
    finally:
        writer.close()
    total = len(writer.paths)
    for number, part in enumerate(writer.paths):
        final = part.with_name(f"{split}-{number:05d}-of-{total:05d}.parquet")
        os.replace(part, final)
        stats.files.append(ShardFile(f"{config}/{final.name}", final.stat().st_size, _sha256(final)))
    return stats


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------- README


def split_front_matter(text: str) -> tuple[dict, str]:
    """(YAML front matter as a dict, Markdown body) of a card file; empty dict when it has none."""
    import yaml

    if text.startswith("---\n"):
        end = text.find("\n---\n", 4)
        if end < 0:
            raise PublishError("dataset card: YAML front matter is not closed by '---'")
        return yaml.safe_load(text[4:end]) or {}, text[end + 5:]
    return {}, text


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def build_figures(dataset: CareDataset, splits: list[str], stats: dict[str, dict[str, SplitStats]],
                  shape: tuple[int, int] | None) -> str:
    """Markdown section with this build's counts, sizes and checksums."""
    manifest = dataset.manifest
    profile = manifest.get("profile", {})
    lines = ["## This build", "",
             f"Written by `care-publish` (care-usam {__version__}) from a converted folder in format "
             f"`{manifest.get('format')}` {manifest.get('format_version')} (storage `{manifest.get('storage')}`, "
             f"converter {manifest.get('tool', 'care-usam')} {manifest.get('tool_version', 'unknown')}).", "",
             f"- Conversion profile: `{profile.get('name', 'unknown')}` (SHA-256 `{profile.get('sha256', 'unknown')}`)",
             "- Classes: " + ", ".join(f"{i} = {name}" for i, name in enumerate(dataset.class_names)),
             "- In-plane size: " + (f"{shape[0]} x {shape[1]} for every slice (`Array2D` / `Array3D` features)"
                                   if shape else "varies between cases (nested `List` features)"),
             f"- Case IDs reproducible from the data custodian's key: "
             f"{'yes' if manifest.get('key_reproducible', True) else 'no (random key)'}", "",
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
    lines += ["", "Content checksums (SHA-256 of the `image` bytes then the `label` bytes, C order) are stored per "
              "case in the `checksum` column of `volumes` and in `metadata/cases.json`."]
    for key, value in sorted(overall.items()):
        lines += ["", f"Checksum over all cases (`dataset.json` `checksums.{key}`): `{value}`."]
    lines += ["", "### Files", "", "| file | bytes | SHA-256 |", "|---|---:|---|"]
    for config in CONFIGS:
        for split in splits:
            for shard in stats[config][split].files:
                lines.append(f"| `{shard.path}` | {shard.num_bytes:,} ({_human_bytes(shard.num_bytes)}) "
                             f"| `{shard.sha256}` |")
    return "\n".join(lines) + "\n"


def size_category(num_rows: int) -> str:
    """The Hub's ``size_categories`` bucket for a row count."""
    bounds = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
              (10_000_000, "1M<n<10M")]
    return next((name for bound, name in bounds if num_rows < bound), "10M<n<100M")


def build_readme(dataset: CareDataset, splits: list[str], features: dict[str, Any],
                 stats: dict[str, dict[str, SplitStats]], shape: tuple[int, int] | None, card_path: Path) -> str:
    """README.md: YAML header (card front matter + configs + dataset_info) and the card with this build's figures."""
    from datasets.info import DatasetInfo, DatasetInfosDict
    from datasets.splits import SplitDict, SplitInfo
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCardData

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
    figures = build_figures(dataset, splits, stats, shape)
    body = body.replace(CARD_MARKER, figures) if CARD_MARKER in body else body.rstrip("\n") + "\n\n" + figures
    return f"---\n{card_data.to_yaml()}\n---\n{body}"


# ---------------------------------------------------------------- publish


def common_inplane_shape(dataset: CareDataset, case_ids: list[str]) -> tuple[int, int] | None:
    """(H, W) shared by every case, or None when in-plane sizes differ."""
    shapes = {tuple(dataset.read_slice(c, 0)[0].shape) for c in case_ids}
    return shapes.pop() if len(shapes) == 1 else None


def publish(source: str | Path, output: str | Path, max_shard_mb: float = DEFAULT_MAX_SHARD_MB,
            card_path: str | Path | None = None, overwrite: bool = False, progress: Any = None) -> dict:
    """Write the Hugging Face dataset folder ``output`` from the converted folder ``source``.

    Returns {config: {split: SplitStats}}. Raises PublishError (one line, names the case) on bad input.
    """
    source, output = Path(source).resolve(), Path(output).resolve()
    if max_shard_mb <= 0:
        raise PublishError(f"--max-shard-mb must be positive, got {max_shard_mb}")
    if output == source or source in output.parents:
        raise PublishError("the output folder must be outside the converted folder")
    if output.exists() and not overwrite:
        raise PublishError(f"{output.name}: output folder exists; pass --overwrite to replace it")
    if problem := creation_problem(output.parent):  # the folder is staged beside its final place
        raise PublishError(f"output folder {output}: {problem}")
    card = Path(card_path) if card_path else default_card_path()
    if not card.is_file():
        raise PublishError(f"dataset card {card.name} not found")
    dataset = open_dataset(source)
    splits = [s for s in split_order(list(dataset.splits)) if dataset.case_ids(s)]
    if not splits:
        raise PublishError("the converted folder has no case in any split")
    all_cases = [c for s in splits for c in dataset.case_ids(s)]
    for case_id in all_cases:
        if case_id not in dataset.cases:
            raise PublishError(f"case {case_id}: listed in splits.json but missing from cases.json")
    shape = common_inplane_shape(dataset, all_cases)
    features = {SLICES: slice_features(dataset.class_names, shape),
                VOLUMES: volume_features(dataset.class_names, shape)}

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.publish-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        stats: dict[str, dict[str, SplitStats]] = {}
        for config in CONFIGS:
            (tmp / config).mkdir(parents=True)
            schema = features[config].arrow_schema
            stats[config] = {split: write_split(dataset, config, split, tmp / config, schema,
                                                int(max_shard_mb * 2**20), progress) for split in splits}
        (tmp / "metadata").mkdir()
        for name in METADATA_FILES:
            shutil.copyfile(source / name, tmp / "metadata" / name)
        readme = build_readme(dataset, splits, features, stats, shape, card)
        (tmp / "README.md").write_text(readme, encoding="utf-8")
        _swap_into_place(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return stats


def _swap_into_place(tmp: Path, output: Path) -> None:
    if not output.exists():
        os.replace(tmp, output)
        return
    old = output.parent / f".{output.name}.publish-old"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(output, old)
    os.replace(tmp, output)
    shutil.rmtree(old, ignore_errors=True)


def push(folder: str | Path, repo_id: str, private: bool = False) -> str:
    """Upload a published folder to the Hub as a dataset repository; returns the commit URL."""
    import huggingface_hub
    from huggingface_hub import HfApi

    if huggingface_hub.get_token() is None:
        raise PublishError("no Hugging Face token: run `hf auth login` or set HF_TOKEN to use --push")
    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="dataset",
                                   commit_message=f"Publish CARE with care-usam {__version__}")
    except Exception as err:  # network, permission or offline-mode errors from the Hub client
        raise PublishError(f"push to {repo_id} failed: {err}") from None
    return str(getattr(commit, "commit_url", commit))


# ---------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", type=Path, help="converted CARE folder (written by care-convert)")
    parser.add_argument("output", type=Path, help="Hugging Face dataset folder to write")
    parser.add_argument("--max-shard-mb", type=float, default=DEFAULT_MAX_SHARD_MB,
                        help="approximate upper size of one Parquet shard in MiB (default %(default)s)")
    parser.add_argument("--card", type=Path, default=None, help="dataset card template (default: DATASET_CARD.md)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--push", metavar="REPO_ID", default=None,
                        help="upload to this Hugging Face dataset repository (needs a token: `hf auth login`)")
    parser.add_argument("--private", action="store_true", help="create the Hub repository as private (with --push)")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    console = Console(stderr=True)
    try:
        dataset = open_dataset(args.source)
        total = 2 * sum(len(dataset.case_ids(s)) for s in dataset.splits)
        with Progress(console=console, transient=True, disable=not console.is_terminal) as bar:
            task = bar.add_task("publishing cases", total=total)
            stats = publish(args.source, args.output, args.max_shard_mb, args.card, args.overwrite,
                            progress=lambda: bar.advance(task))
        url = push(args.output, args.push, args.private) if args.push else None
    except (PublishError, OSError, KeyError, ValueError, TypeError) as err:
        print(f"care-publish: {err}", file=sys.stderr)  # not through rich: it would wrap the line
        return 1
    table = Table(title=f"published {args.output.name}")
    for column in ("config", "split", "rows", "files", "bytes"):
        table.add_column(column, justify="left" if column in ("config", "split") else "right")
    for config, by_split in stats.items():
        for split, s in by_split.items():
            table.add_row(config, split, str(s.num_examples), str(len(s.files)),
                          _human_bytes(sum(f.num_bytes for f in s.files)))
    Console().print(table)
    if url:
        Console().print(f"pushed to {url}", markup=False, soft_wrap=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="care-publish", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
