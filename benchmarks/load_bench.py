"""Random-access slice loading: zarr shards vs HDF5 vs the published Hugging Face dataset.

Builds its own synthetic data in a temporary folder (CT phantoms, 512 x 512 int16 HU), writes it as a zarr and
an HDF5 converted folder, publishes the zarr one with care-publish and loads it with ``datasets`` (offline,
private cache). Then it reads the same random slice indices through ``CareSliceDataset`` from each source, in
one process and through a DataLoader with 2 workers, and prints slices/s with ratios to zarr in one process.
The published dataset is read twice: through CareSliceDataset (Arrow columns to numpy) and through the
``datasets`` formatter (``with_format("numpy"/"torch", dtype=None)``).

    python benchmarks/load_bench.py [--cases 8] [--slices 60] [--size 512] [--reads 600]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader

from care_dataset.files import write_json_atomic
from care_dataset.format import layout, writer
from care_dataset.synth.phantom import phantom_volume


def make_case(rng: np.random.Generator, slices: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic case: image (slices, size, size) int16 HU, label uint8."""
    return phantom_volume((slices, size, size), (2.5, 0.8, 0.8), rng)


def write_converted(root: Path, storage: str, cases: dict[str, tuple[np.ndarray, np.ndarray]]) -> Path:
    """A converted folder (docs/format.md) holding ``cases``; every case in split ``train``."""
    writer.init_store(root, storage)
    records = {}
    for case_id, (image, label) in cases.items():
        writer.write_case(root, storage, case_id, image, label)
        n, h, w = image.shape
        canonical = {"size": [w, h, n], "spacing": [0.8, 0.8, 2.5], "origin": [0.0, 0.0, 0.0],
                     "direction": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]}
        records[case_id] = {"split": "train", "num_slices": n, "kept_slices": list(range(n)),
                            "canonical": canonical, "spacing": canonical["spacing"],
                            "original": {**canonical, "orientation": "LPS"},
                            "checksum": layout.content_checksum(image, label)}
    classes = ["background", "normal rectum", "tumor"]
    write_json_atomic(root / "dataset.json", {
        "format": layout.FORMAT_NAME, "format_version": layout.FORMAT_VERSION, "storage": storage,
        "classes": classes, "profile": {"name": "benchmark"}, "key_reproducible": True,
        "checksums": {"cases": {c: r["checksum"] for c, r in records.items()}}})
    write_json_atomic(root / "splits.json", {"seed": 0, "strategy": "patient", "train": sorted(cases)})
    write_json_atomic(root / "cases.json", records)
    return root


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def column_bytes(folder: Path, leaf: str) -> int:
    """Compressed bytes of one Parquet leaf column (``preview.bytes``) over the shards in `folder`."""
    total = 0
    for path in Path(folder).glob("*.parquet"):
        meta = pq.read_metadata(path)
        for group in range(meta.num_row_groups):
            columns = (meta.row_group(group).column(i) for i in range(meta.num_columns))
            total += sum(c.total_compressed_size for c in columns if c.path_in_schema == leaf)
    return total


def single_process_rate(dataset, indices: np.ndarray) -> float:
    dataset[int(indices[0])]  # open handles / memory maps before timing
    start = time.perf_counter()
    for i in indices:
        dataset[int(i)]
    return len(indices) / (time.perf_counter() - start)


def loader_rate(dataset, indices: np.ndarray, workers: int, batch_size: int = 16) -> float:
    """Slices/s through a DataLoader with ``workers`` processes, after the first batch (worker start-up)."""
    loader = DataLoader(dataset, batch_size=batch_size, sampler=[int(i) for i in indices], num_workers=workers,
                        prefetch_factor=4)
    iterator = iter(loader)
    first = next(iterator)
    start, count = time.perf_counter(), 0
    for batch in iterator:
        count += len(batch["image"])
    del first
    return count / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--slices", type=int, default=60)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--reads", type=int, default=600, help="random slice reads per measurement")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="care-load-bench-") as tmp:
        tmp = Path(tmp)
        os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_DISABLE_PROGRESS_BARS="1",
                          HF_DATASETS_CACHE=str(tmp / "hf_cache"))
        import datasets  # deferred: datasets reads HF_DATASETS_CACHE when imported, so after it is set

        from care_dataset.format.hf import SAMPLE_KEYS  # deferred: after datasets, for the same reason
        from care_dataset.format.torch_dataset import CareSliceDataset  # deferred: as above
        from care_dataset.publish.job import publish  # deferred: as above

        datasets.disable_progress_bars()
        console = Console(width=120)
        rng = np.random.default_rng(args.seed)
        start = time.perf_counter()
        cases = {f"bench{k:02d}_0": make_case(rng, args.slices, args.size) for k in range(args.cases)}
        console.print(f"synthetic data: {args.cases} cases x {args.slices} slices x {args.size}^2 "
                      f"({time.perf_counter() - start:.1f} s)")
        zarr_dir = write_converted(tmp / "zarr", "zarr", cases)
        h5_dir = write_converted(tmp / "h5", "h5", cases)
        start = time.perf_counter()
        publish(zarr_dir, tmp / "care", max_shard_mb=400)
        publish_s = time.perf_counter() - start
        start = time.perf_counter()
        hub = datasets.load_dataset(str(tmp / "care"), split="train")
        load_s = time.perf_counter() - start
        del cases

        columns = hub.select_columns(list(SAMPLE_KEYS))  # the sample dict's columns (collatable)
        sources = {"zarr shards": CareSliceDataset(zarr_dir), "HDF5": CareSliceDataset(h5_dir),
                   "HF dataset, CareSliceDataset (Arrow)": CareSliceDataset(hub),
                   "HF dataset, with_format(dtype=None)": columns.with_format("numpy", dtype=None)}
        total = len(sources["zarr shards"])
        indices = np.random.default_rng(args.seed + 1).integers(0, total, args.reads)
        rates = {}
        for name, dataset in sources.items():
            # the torch formatter (not numpy, whose string scalars default_collate rejects) feeds the DataLoader
            batched = columns.with_format("torch", dtype=None) if name.endswith("with_format(dtype=None)") else dataset
            rates[name] = (single_process_rate(dataset, indices), loader_rate(batched, indices, workers=2))
        baseline = rates["zarr shards"][0]

        table = Table(title=f"random-access slice reads ({args.reads} random of {total} slices, "
                            f"{args.size}x{args.size} int16 + uint8)")
        for column in ("source", "1 process slices/s", "ratio", "2 workers slices/s", "ratio", "on disk"):
            table.add_column(column, justify="left" if column == "source" else "right")
        parquet = folder_bytes(tmp / "care" / "slices")
        disk = {"zarr shards": folder_bytes(zarr_dir / "slices.zarr"), "HDF5": folder_bytes(h5_dir / "slices_h5"),
                "HF dataset, CareSliceDataset (Arrow)": parquet, "HF dataset, with_format(dtype=None)": parquet}
        for name, (single, workers) in rates.items():
            table.add_row(name, f"{single:,.0f}", f"{single / baseline:.2f}", f"{workers:,.0f}",
                          f"{workers / baseline:.2f}", f"{disk[name] / 2**20:,.1f} MiB")
        console.print(table)
        console.print(f"raw arrays: {total * args.size * args.size * 3 / 2**20:,.1f} MiB; HF on disk = slices "
                      f"Parquet (the Arrow cache from load_dataset adds {folder_bytes(tmp / 'hf_cache') / 2**20:,.1f} "
                      f"MiB); care-publish {publish_s:.1f} s, first load_dataset {load_s:.1f} s; "
                      f"{os.cpu_count()} CPUs")
        previews = column_bytes(tmp / "care" / "slices", "preview.bytes")
        console.print(f"`preview` PNGs: {previews / total / 1024:.1f} KiB a slice, "
                      f"{100 * previews / parquet:.1f} % of the slices Parquet")


if __name__ == "__main__":
    main()
