"""Reading a published Hugging Face folder: care_dataset.format.published.PublishedDataset against the plain `datasets`
numpy formatter (image and label of the `slices` rows through `with_format("numpy")`, whole cases from the
`volumes` configuration, their NIfTI cells decoded by nibabel), with CareDataset
on the converted folder it was published from for reference. Same process, same random picks; every reader's
values are checked equal first.

python benchmarks/published_reader_bench.py [--cases 8] [--slices 40] [--size 512] [--reads 400]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # converted_folders.make_converted


class FormatterSlices:
    """Slices through the `datasets` numpy formatter, one row per slice."""

    def __init__(self, dataset):
        self.dataset = dataset.select_columns(["image", "label"]).with_format("numpy", dtype=None)
        self.labels = dataset.select_columns(["label"]).with_format("numpy", dtype=None)
        case_of_row = dataset.select_columns(["case_id"]).with_format("arrow")[:].column("case_id").to_pylist()
        self.rows = {}
        for row, case_id in enumerate(case_of_row):
            self.rows.setdefault(case_id, []).append(row)
        self.cases = {c: {"num_slices": len(rows)} for c, rows in self.rows.items()}

    def read_slice(self, case_id, position):
        row = self.dataset[self.rows[case_id][position]]
        return np.asarray(row["image"], dtype=np.int16), np.asarray(row["label"], dtype=np.uint8)

    def read_labels(self, case_id):
        return np.stack([np.asarray(label, dtype=np.uint8) for label in self.labels[self.rows[case_id]]["label"]])


class FormatterCases:
    """Whole cases through `datasets`, one `volumes` row per case: its NIfTI cells decoded by nibabel, the stored
    slices taken from the span at their kept canonical indices."""

    def __init__(self, volumes):
        columns = ["image", "label", "kept_slices"]
        self.volumes = {split: table.with_format(None).select_columns(columns) for split, table in volumes.items()}
        self._rows = {}
        for split, table in volumes.items():
            ids = table.select_columns(["case_id"]).with_format("arrow")[:].column("case_id").to_pylist()
            for row, case_id in enumerate(ids):
                self._rows[case_id] = (split, row)

    def read_case(self, case_id):
        split, row = self._rows[case_id]
        record = self.volumes[split][row]
        kept = np.asarray(record["kept_slices"])
        stored = kept - kept[0]
        return tuple(np.asanyarray(record[name].dataobj).transpose(2, 1, 0)[stored] for name in ("image", "label"))


def timed(fn, reps):
    start = time.perf_counter()
    for args in reps:
        fn(*args)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--slices", type=int, default=40)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--reads", type=int, default=400)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pubbench-"))
    os.environ["HF_DATASETS_CACHE"] = str(work / "hf_cache")
    os.environ["HF_HUB_OFFLINE"] = "1"
    import datasets  # deferred: datasets reads HF_DATASETS_CACHE when imported, so after it is set

    datasets.disable_progress_bars()
    from care_dataset import open_any, open_dataset  # deferred: after datasets, for the same reason
    from care_dataset.format.hf import SLICES, VOLUMES, load_published  # deferred: as above
    from care_dataset.publish.job import publish  # deferred: as above
    from converted_folders import make_converted  # deferred: as above

    shapes = [(args.slices, args.size, args.size)] * (args.cases + 1)  # the last case is the test split
    source = make_converted(work / "converted", "zarr", shapes, seed=0)
    output = work / "care"
    publish(source, output)

    t0 = time.perf_counter()
    new = open_any(output)
    t_open_new = time.perf_counter() - t0
    t0 = time.perf_counter()
    old = FormatterSlices(load_published(output, SLICES, split="train"))
    t_open_old = time.perf_counter() - t0
    care = open_dataset(source)

    rng = np.random.default_rng(0)
    train = new.case_ids("train")
    picks = [(train[rng.integers(len(train))], int(rng.integers(args.slices))) for _ in range(args.reads)]
    for case_id, position in picks[:20]:  # same values from all three
        a, b, c = (reader.read_slice(case_id, position) for reader in (new, old, care))
        assert all(np.array_equal(x, y) and np.array_equal(x, z) for x, y, z in zip(a, b, c))
    print(f"data: {args.cases} train cases x {args.slices} slices of {args.size}x{args.size}; "
          f"{args.reads} random slice reads (second pass = warm page cache)")
    print(f"open: PublishedDataset {t_open_new:.2f} s, numpy formatter {t_open_old:.2f} s (Arrow cache built "
          "by the first, reused by the second)")
    def report(what: str, unit: str, rates: dict[str, float], baseline: str = "numpy formatter") -> None:
        for name, rate in rates.items():
            print(f"{what + ', ' + name:44s} {rate:9.1f} {unit}  ({rate / rates[baseline]:.2f}x {baseline})")

    def best_rate(fn, calls) -> float:
        return len(calls) / min(timed(fn, calls) for _ in range(2))

    readers = {"PublishedDataset": new, "numpy formatter": old, "CareDataset (zarr)": care}
    report("random read_slice", "slices/s", {n: best_rate(r.read_slice, picks) for n, r in readers.items()})
    cases = [(c,) for c in train]
    report("read_labels", "cases/s", {n: best_rate(r.read_labels, cases) for n, r in readers.items()})
    t0 = time.perf_counter()
    volumes = FormatterCases(load_published(output, VOLUMES))
    print(f"`datasets` over `volumes`: open {time.perf_counter() - t0:.2f} s (Arrow cache built)")
    readers = {"PublishedDataset": new, "volumes + nibabel": volumes, "CareDataset (zarr)": care}
    for case_id in train[:2]:  # same cases from all three
        a, b, c = (reader.read_case(case_id) for reader in readers.values())
        assert all(np.array_equal(x, y) and np.array_equal(x, z) for x, y, z in zip(a, b, c))
    report("read_case", "cases/s", {n: best_rate(r.read_case, cases) for n, r in readers.items()},
           "volumes + nibabel")


if __name__ == "__main__":
    main()
