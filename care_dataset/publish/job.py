"""``care-publish out/ care/``: write a converted CARE folder as a Hugging Face dataset folder.

Output layout (every file deterministic: same input -> same bytes):

    care/README.md                          YAML header (configs, dataset_info, license, tags) + dataset card
    care/slices/<split>-00000-of-000NN.parquet   one row per stored slice (see care_dataset.format.hf)
    care/volumes/<split>-00000-of-000NN.parquet  one row per case
    care/metadata/{dataset,splits,cases}.json    copies of the converted folder's manifest files

Everything is built in a hidden sibling folder and renamed into place at the end.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import huggingface_hub
from huggingface_hub import HfApi

from care_dataset.files import creation_problem, replace_folder
from care_dataset.format.hf import CONFIGS, SLICES, VOLUMES, slice_features, split_order, volume_features
from care_dataset.format.reader import CareDataset, open_dataset
from care_dataset.publish.card import build_readme, default_card_path
from care_dataset.publish.errors import PublishError
from care_dataset.publish.parquet import SplitStats, write_split
from care_dataset.version import __version__

DEFAULT_MAX_SHARD_MB = 400.0
METADATA_FILES = ("dataset.json", "splits.json", "cases.json")


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
    _check_options(source, output, max_shard_mb, overwrite)
    card = Path(card_path) if card_path else default_card_path()
    if not card.is_file():
        raise PublishError(f"dataset card {card.name} not found")
    dataset = open_dataset(source)
    splits = _splits_to_publish(dataset)
    shape = common_inplane_shape(dataset, [c for s in splits for c in dataset.case_ids(s)])
    features = {SLICES: slice_features(dataset.class_names, shape),
                VOLUMES: volume_features(dataset.class_names, shape)}
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.publish-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        stats = _write_shards(tmp, dataset, splits, features, int(max_shard_mb * 2**20), progress)
        (tmp / "metadata").mkdir()
        for name in METADATA_FILES:
            shutil.copyfile(source / name, tmp / "metadata" / name)
        readme = build_readme(dataset, splits, features, stats, shape, card)
        (tmp / "README.md").write_text(readme, encoding="utf-8")
        replace_folder(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return stats


def _check_options(source: Path, output: Path, max_shard_mb: float, overwrite: bool) -> None:
    if max_shard_mb <= 0:
        raise PublishError(f"--max-shard-mb must be positive, got {max_shard_mb}")
    if output == source or source in output.parents:
        raise PublishError("the output folder must be outside the converted folder")
    if output.exists() and not overwrite:
        raise PublishError(f"{output.name}: output folder exists; pass --overwrite to replace it")
    if problem := creation_problem(output.parent):  # the folder is staged beside its final place
        raise PublishError(f"output folder {output}: {problem}")


def _splits_to_publish(dataset: CareDataset) -> list[str]:
    """The splits holding cases, in publishing order; PublishError when none does or a case lacks its entry."""
    splits = [s for s in split_order(list(dataset.splits)) if dataset.case_ids(s)]
    if not splits:
        raise PublishError("the converted folder has no case in any split")
    for case_id in (c for s in splits for c in dataset.case_ids(s)):
        if case_id not in dataset.cases:
            raise PublishError(f"case {case_id}: listed in splits.json but missing from cases.json")
    return splits


def _write_shards(folder: Path, dataset: CareDataset, splits: list[str], features: dict[str, Any], max_bytes: int,
                  progress: Any) -> dict[str, dict[str, SplitStats]]:
    """The Parquet shards of every configuration and split under `folder`/<config>/."""
    stats: dict[str, dict[str, SplitStats]] = {}
    for config in CONFIGS:
        (folder / config).mkdir(parents=True)
        schema = features[config].arrow_schema
        stats[config] = {split: write_split(dataset, config, split, folder / config, schema, max_bytes, progress)
                         for split in splits}
    return stats


def push(folder: str | Path, repo_id: str, private: bool = False) -> str:
    """Upload a published folder to the Hub as a dataset repository; returns the commit URL."""
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
