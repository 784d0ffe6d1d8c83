"""``care-publish out/ care/``: write a converted CARE folder as a Hugging Face dataset folder.

Output layout (every file deterministic: same input -> same bytes):

    care/README.md                          YAML header (configs, dataset_info, license, tags) + dataset card
    care/slices/<split>-00000-of-000NN.parquet   one row per stored slice (see care_dataset.format.hf)
    care/volumes/<split>-00000-of-000NN.parquet  one row per case
    care/metadata/{dataset,splits,cases}.json    copies of the converted folder's manifest files

Everything is built in a hidden sibling folder and renamed into place at the end. ``push`` uploads such a folder
to a private Hub repository (public only when asked and the card names a licence), after care-verify's leak scan.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import huggingface_hub
from huggingface_hub import HfApi

from care_dataset.deid.verify import collect_identifying_values, scan_for_leaks
from care_dataset.files import atomic_folder, creation_problem
from care_dataset.format.hf import CONFIGS, SLICES, VOLUMES, slice_features, split_order, volume_features
from care_dataset.format.reader import CareDataset, open_dataset
from care_dataset.publish.card import LEAK_SCAN_NOTES, build_readme, default_card_path, public_licence_problem
from care_dataset.publish.errors import PublishError
from care_dataset.publish.parquet import SplitStats, write_split
from care_dataset.version import __version__

DEFAULT_MAX_SHARD_MB = 400.0
METADATA_FILES = ("dataset.json", "splits.json", "cases.json")
T = TypeVar("T")


def common_inplane_shape(dataset: CareDataset, case_ids: list[str]) -> tuple[int, int] | None:
    """(H, W) shared by every case, or None when in-plane sizes differ."""
    shapes = {tuple(dataset.read_slice(c, 0)[0].shape) for c in case_ids}
    return shapes.pop() if len(shapes) == 1 else None


def publish(source: str | Path, output: str | Path, max_shard_mb: float = DEFAULT_MAX_SHARD_MB,
            card_path: str | Path | None = None, overwrite: bool = False, progress: Any = None,
            leak_scan: str | None = None) -> dict:
    """Write the Hugging Face dataset folder ``output`` from the converted folder ``source``; ``leak_scan`` (a
    LEAK_SCAN_NOTES key, for a folder to push) records in the card whether the upload is leak-scanned.

    Returns {config: {split: SplitStats}}. Raises PublishError (one line, names the case) on bad input.
    """
    source, output = Path(source).resolve(), Path(output).resolve()
    _check_options(source, output, max_shard_mb, overwrite)
    if leak_scan is not None and leak_scan not in LEAK_SCAN_NOTES:
        raise PublishError(f"leak_scan must be one of {', '.join(LEAK_SCAN_NOTES)}, got {leak_scan!r}")
    card = Path(card_path) if card_path else default_card_path()
    if not card.is_file():
        raise PublishError(f"dataset card {card.name} not found")
    dataset = open_dataset(source)
    splits = _splits_to_publish(dataset)
    shape = common_inplane_shape(dataset, [c for s in splits for c in dataset.case_ids(s)])
    features = {SLICES: slice_features(dataset.class_names, shape),
                VOLUMES: volume_features(dataset.class_names)}
    with atomic_folder(output, "publish") as tmp:
        stats = _write_shards(tmp, dataset, splits, features, int(max_shard_mb * 2**20), progress)
        (tmp / "metadata").mkdir()
        for name in METADATA_FILES:
            shutil.copyfile(source / name, tmp / "metadata" / name)
        readme = build_readme(dataset, splits, features, stats, shape, card, leak_scan)
        (tmp / "README.md").write_text(readme, encoding="utf-8")
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


def check_no_leaks(folder: Path, raw: Path) -> None:
    """care-verify's scan of ``folder`` for the identifying values of ``raw``; PublishError on any leak."""
    leaks = scan_for_leaks(folder, collect_identifying_values(raw))
    if leaks:
        paths = len({leak.path for leak in leaks})
        raise PublishError(f"leak scan: {len(leaks)} identifying value(s) of {raw} found in {paths} path(s) under "
                           f"{folder}; nothing was uploaded (`care-verify {folder} --raw {raw}` lists them, masked)")


def push(folder: str | Path, repo_id: str, public: bool = False, raw: str | Path | None = None) -> tuple[str, bool]:
    """Upload a published folder to the Hub as a dataset repository; returns (commit URL, whether the repository
    is private).

    Before any network access: with ``raw`` the folder must pass ``check_no_leaks``, and ``public`` needs a
    licence other than unknown in the folder's README.md. The repository is created private unless ``public``;
    an existing public one is uploaded to only with ``public``.
    """
    folder = Path(folder)
    if public and (problem := public_licence_problem(folder / "README.md")):
        raise PublishError(problem)
    if raw is not None:
        check_no_leaks(folder, Path(raw))
    if huggingface_hub.get_token() is None:
        raise PublishError("no Hugging Face token: run `hf auth login` or set HF_TOKEN to use --push")
    api = HfApi()
    _hub(repo_id, lambda: api.create_repo(repo_id, repo_type="dataset", private=not public, exist_ok=True))
    private = bool(_hub(repo_id, lambda: api.repo_info(repo_id, repo_type="dataset")).private)
    if not public and not private:
        raise PublishError(f"{repo_id} is an existing repository that is not private; nothing was uploaded: pass "
                           "--public to publish to it, or push to a new repository (created private)")
    commit = _hub(repo_id, lambda: api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="dataset",
                                                     commit_message=f"Publish CARE with care-usam {__version__}"))
    return str(getattr(commit, "commit_url", commit)), private


def _hub(repo_id: str, call: Callable[[], T]) -> T:
    """``call()`` with the Hub client's errors (network, permission, offline mode) as one PublishError line."""
    try:
        return call()
    except Exception as err:
        raise PublishError(f"push to {repo_id} failed: {err}") from None
