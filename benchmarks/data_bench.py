"""Augmented 224 x 224 training samples per second on one CPU core: ours (shards) vs the original U-SAM way.

Baseline (what the authors' data loader does per sample): load a per-slice .npz, window, rotate by quarter
turns + flip or by a small angle with scipy.ndimage.rotate, scipy.ndimage.zoom to 224 (cubic image, nearest
label), sample points from the label. Ours: ``usam.data.SliceDataset`` reading zarr shards: one slice read,
one resampling per sample that windows, resizes, flips and rotates, then points from the augmented label.

    python benchmarks/data_bench.py [--size 512] [--cases 4] [--slices 24] [--samples 300]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from care_dataset import files
from care_dataset.format import layout, reader, writer
from care_dataset.synth.phantom import phantom_volume
from usam.data import DEFAULT_WINDOW, Augmentation, SliceDataset, window_normalize
from usam.prompts import sample_points


def make_data(root: Path, cases: int, slices: int, size: int) -> tuple[reader.CareDataset, list[Path]]:
    """Synthetic phantoms as zarr shards (ours) and as one .npz per slice (baseline)."""
    writer.init_store(root, "zarr")
    npz_files, case_table = [], {}
    for c in range(cases):
        hu, label = phantom_volume((slices, size, size), (5.0, 400 / size, 400 / size), np.random.default_rng(c),
                                   tumour=True)
        case_id = f"P{c:03d}_a"
        writer.write_case(root, "zarr", case_id, hu, label)
        case_table[case_id] = {"split": "train", "num_slices": slices, "kept_slices": list(range(slices)),
                               "spacing": [1.0, 1.0, 5.0]}
        for s in range(slices):
            path = root / "npz" / f"{case_id}_{s:03d}.npz"
            path.parent.mkdir(exist_ok=True)
            np.savez_compressed(path, image=hu[s], label=label[s])
            npz_files.append(path)
    files.write_json_atomic(root / "dataset.json", {"format": layout.FORMAT_NAME, "format_version": "1.0",
                                                    "storage": "zarr", "classes": ["bg", "rectum", "tumor"]})
    files.write_json_atomic(root / "splits.json", {"train": sorted(case_table)})
    files.write_json_atomic(root / "cases.json", case_table)
    return reader.open_dataset(root), npz_files


def baseline_sample(path: Path, rng: np.random.Generator, size: int = 224, k: int = 3) -> dict:
    """The original per-sample pipeline (TransUNet-style random generator as U-SAM's code uses it)."""
    with np.load(path) as f:
        image, label = window_normalize(f["image"], DEFAULT_WINDOW), f["label"]
    if rng.random() > 0.5:
        turns = int(rng.integers(4))
        image, label = np.rot90(image, turns), np.rot90(label, turns)
        axis = int(rng.integers(2))
        image, label = np.flip(image, axis).copy(), np.flip(label, axis).copy()
    elif rng.random() > 0.5:
        angle = rng.uniform(-20, 20)
        image = ndimage.rotate(image, angle, order=0, reshape=False)
        label = ndimage.rotate(label, angle, order=0, reshape=False)
    h, w = image.shape
    image = ndimage.zoom(image, (size / h, size / w), order=3)
    label = ndimage.zoom(label, (size / h, size / w), order=0)
    points, point_labels = sample_points(label, 3, k, rng)
    return {"image": torch.from_numpy(image)[None], "label": torch.from_numpy(label),
            "points": torch.from_numpy(points), "point_labels": torch.from_numpy(point_labels)}


def rate(fn, n: int) -> tuple[float, float]:
    """(samples per wall-clock second, samples per CPU second of this process): on a shared machine
    the second is the per-core figure."""
    fn(0)
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(n):
        fn(i)
    return n / (time.perf_counter() - wall), n / (time.process_time() - cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="in-plane size of the stored slices")
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--slices", type=int, default=24)
    parser.add_argument("--samples", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)  # per core
    with tempfile.TemporaryDirectory() as tmp:
        dataset, npz_files = make_data(Path(tmp), args.cases, args.slices, args.size)
        ids = dataset.case_ids("train")
        ours = SliceDataset(dataset, ids, num_classes=3, points_per_class=3, augment=Augmentation(), seed=0)
        total = len(ours)
        order = np.random.default_rng(0).permutation(args.samples) % total
        memory = [dataset.read_slice(*ours.slices[i]) for i in range(total)]
        rng = np.random.default_rng(0)

        rows = {
            "baseline (.npz + scipy zoom/rotate)": rate(lambda i: baseline_sample(npz_files[order[i]], rng),
                                                        args.samples),
            "ours, full (zarr read + augment + points)": rate(lambda i: ours[(0, int(order[i]))], args.samples),
            "  zarr read only (image + label)": rate(lambda i: dataset.read_slice(*ours.slices[order[i]]),
                                                      args.samples),
            "  augment + points from memory": rate(lambda i: ours.transform(*memory[order[i]], 0, int(order[i])),
                                                    args.samples),
        }
    print(f"{args.cases} cases x {args.slices} slices of {args.size} x {args.size}, {args.samples} samples, "
          f"1 thread, torch {torch.__version__}")
    print(f"{'':45s} {'wall':>14s} {'per CPU second':>16s}")
    for name, (wall, cpu) in rows.items():
        print(f"{name:45s} {wall:8.1f} /s {cpu:10.1f} /s  ({1000 / cpu:6.2f} CPU ms/sample)")
    base, full = rows["baseline (.npz + scipy zoom/rotate)"], rows["ours, full (zarr read + augment + points)"]
    print(f"speed-up ours / baseline: {full[0] / base[0]:.1f}x wall, {full[1] / base[1]:.1f}x CPU time")

if __name__ == "__main__":
    main()
