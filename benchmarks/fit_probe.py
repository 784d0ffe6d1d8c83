"""A real `usam fit` run on synthetic shards, for the figures a model-only benchmark cannot give: step time,
images/s and the fraction of step time spent waiting for data, with the real DataLoader and augmentation.

    python benchmarks/fit_probe.py --model usam_b --batch-size 24 --steps 60 --workers 8   # CUDA
    python benchmarks/fit_probe.py --model usam_tiny --batch-size 4 --steps 6 --workers 1  # CPU smoke run

Data: CASES cases of SLICES x 512 x 512 written as zarr shards per docs/format.md, each holding the labelled
slices of one phantom (care_dataset.synth.phantom) repeated: a probe measures throughput, so the cases need not
differ. By default SLICES is chosen so that one epoch outlasts --steps: a window that starts an epoch waits for
the workers' first batches and ends with a validation and a checkpoint, which a real run of hundreds of steps per
epoch amortises. The first logging window (start-up, compilation, worker spawn) is left out of the figures.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from care_dataset import files
from care_dataset.format import layout, writer
from care_dataset.synth.phantom import phantom_volume
from usam.config import build_config
from usam.train import train


def synthetic_shards(root: Path, cases: int, slices: int, size: int = 512) -> Path:
    hu, label = phantom_volume((48, size, size), (2.5, 0.8, 0.8), np.random.default_rng(0), tumour=True)
    labelled = np.flatnonzero(label.reshape(len(label), -1).max(1) > 0)
    repeated = np.resize(labelled, slices)
    hu, label = np.ascontiguousarray(hu[repeated]), np.ascontiguousarray(label[repeated])
    checksum = layout.content_checksum(hu, label)
    writer.init_store(root, "zarr")
    ids = [f"care_{c:012x}-000000" for c in range(cases)]
    for case_id in ids:
        writer.write_case(root, "zarr", case_id, hu, label)
    records = {case_id: {"num_slices": slices, "kept_slices": list(range(slices)), "spacing": [0.8, 0.8, 2.5],
                         "split": "train"} for case_id in ids}
    files.write_json_atomic(root / "cases.json", records)
    files.write_json_atomic(root / "splits.json", {"seed": 0, "strategy": "patient", "train": ids, "test": []})
    files.write_json_atomic(root / "dataset.json", {
        "format": layout.FORMAT_NAME, "format_version": layout.FORMAT_VERSION, "storage": "zarr",
        "classes": ["background", "normal rectum", "tumor"],
        "checksums": {"cases": dict.fromkeys(ids, checksum), "all": ""}})
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="usam_b")
    parser.add_argument("--batch-size", type=int, default=24)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--slices", type=int, default=None,
                        help="slices per case (default: enough that one epoch outlasts --steps)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--json", default=None, help="also append the figures as one JSON line here")
    args = parser.parse_args()
    val_fraction = 0.125
    train_cases = args.cases - min(max(1, round(val_fraction * args.cases)), args.cases - 1)  # carve_validation's
    slices = args.slices or math.ceil((args.steps + 1) * args.batch_size / train_cases)
    with tempfile.TemporaryDirectory() as tmp:
        data = synthetic_shards(Path(tmp) / "out", args.cases, slices)
        run = Path(tmp) / "run"
        log_every = max(1, args.steps // 6)
        config = build_config({"data": str(data), "out": str(run), "model": args.model, "batch_size": args.batch_size,
                               "max_steps": args.steps, "workers": args.workers, "device": args.device,
                               "log_every": log_every, "val_every": 0, "val_fraction": val_fraction,
                               "compile": args.compile})
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        train(config)
        wall = time.perf_counter() - start
        records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    windows = [r for r in records if r["kind"] == "train"][1:] or [r for r in records if r["kind"] == "train"]
    images_per_s = statistics.median(r["images_per_s"] for r in windows)
    wait = statistics.median(r["data_wait_fraction"] for r in windows)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    figures = {"bench": "fit", "device": device, "model": args.model, "batch_size": args.batch_size,
               "workers": args.workers, "images_per_s": images_per_s, "step_s": args.batch_size / images_per_s,
               "data_wait_fraction": wait, "peak_gib": peak, "wall_s": wall}
    print(f"usam fit {args.model} batch {args.batch_size}, {args.workers} workers, {device}: "
          f"{images_per_s:.1f} images/s, step {figures['step_s'] * 1e3:.0f} ms, data wait {100 * wait:.1f}%, "
          f"peak {peak:.1f} GiB, {wall:.0f} s in all")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(figures) + "\n")


if __name__ == "__main__":
    main()
