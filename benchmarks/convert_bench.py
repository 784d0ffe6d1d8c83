"""Conversion speed and size against its floor and against a naive per-slice .npz baseline, in one run.

Two synthetic raw sets of 512 x 512 x SLICES cases:
  care: DICOM series + ITK-SNAP labels (CARE profile: only rectum slices kept);
  word: NIfTI image/label pairs with an organ on every slice (WORD profile: every slice kept).
For each it prints (a) reading every input with SimpleITK only, (b) compressing the kept slices only with the
converter's codec, (c) care-convert with 1 and 2 workers, (d) the naive baseline (read each volume, save every
kept slice as its own compressed .npz, as the original U-SAM and TransUNet pipelines store data), (e) sizes.
The floor (a) + (b) is measured in a pool of the same number of processes as the conversion it is compared with;
the pool starts once, inside (a), and (b) compresses arrays the workers memory-map rather than receive by pipe.
Every time in the tables is the best of --repeats runs (floors and conversions alike, interleaved). (c) runs the
installed command, so it includes starting Python and its imports, which the in-process floor does not (that
start-up is printed beside the tables); (c') times the same conversion (``convert_dataset``) in a fresh process
after it has imported what this process had imported before the floor ran (numpy, SimpleITK, numcodecs,
pydicom), its pool started inside the timing as the floor's is, so floor and (c') pay the same fixed costs. Every
process keeps freed buffers as care-convert does (``keep_freed_buffers``); the floor's pool inherits that.

    python benchmarks/convert_bench.py [--cases 8] [--slices 100] [--repeats 3] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from care_dataset.format import writer
from care_dataset.synth import phantom
from care_dataset.synth import raw_export as synth
from care_dataset.convert.pool import keep_freed_buffers
from care_dataset.convert.case import load_case
from care_dataset.raw.discover import discover_cases
from care_dataset.raw.profiles import load_profile

CODEC = writer.shard_codec()  # the converter's own


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def make_word_set(root: Path, cases: int, slices: int, seed: int) -> None:
    """NIfTI pairs in WORD's layout; every slice holds at least one organ (bone or rectum)."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(seed)
    for i in range(cases):
        hu, label = phantom.phantom_volume((slices, 512, 512), (2.5, 0.8, 0.8), rng)
        organs = np.zeros_like(label)
        organs[hu > 250] = 15            # bone, shown as "head of femur left"
        organs[label > 0] = 13           # rectum
        for array, folder in ((hu, "imagesTr"), (organs, "labelsTr")):
            image = sitk.GetImageFromArray(array)
            image.SetSpacing((0.8, 0.8, 2.5))
            sitk.WriteImage(image, str(root / folder / f"word_{i:04d}.nii.gz"))


def read_only(job: tuple[str, str]) -> float:
    """(a) for one case: read image and label with SimpleITK, nothing else."""
    image_path, label_path = job
    start = time.perf_counter()
    if Path(image_path).is_dir():
        reader = sitk.ImageSeriesReader()
        series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(image_path)
        files = max((sitk.ImageSeriesReader.GetGDCMSeriesFileNames(image_path, s, False, True) for s in series), key=len)
        reader.SetFileNames(files)
        sitk.GetArrayViewFromImage(reader.Execute())
    else:
        sitk.GetArrayViewFromImage(sitk.ReadImage(image_path))
    sitk.GetArrayViewFromImage(sitk.ReadImage(label_path))
    return time.perf_counter() - start


def compress_only(job: tuple[str, str]) -> float:
    """(b) for one case: compress each kept slice of image and label with the converter's codec.

    The kept slices were saved as .npy beforehand and are memory-mapped (from the page cache), so a pool
    worker starts from arrays in memory, as the converter does after reading, without receiving them by pipe.
    """
    image, label = (np.load(path, mmap_mode="r") for path in job)
    start = time.perf_counter()
    for k in range(image.shape[0]):
        CODEC.encode(np.ascontiguousarray(image[k]))
        CODEC.encode(np.ascontiguousarray(label[k]))
    return time.perf_counter() - start


def naive_baseline(raw_cases, profile, out: Path) -> float:
    """(d) read each volume, save every kept slice as its own compressed .npz (single process)."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    start = time.perf_counter()
    for n, raw in enumerate(raw_cases):
        case = load_case(raw, profile)
        image, label = sitk.GetArrayFromImage(case.image), sitk.GetArrayFromImage(case.label)
        for k in np.flatnonzero(np.isin(label, profile.keep_classes).any(axis=(1, 2))):
            np.savez_compressed(out / f"case{n:04d}_slice{k:03d}.npz", image=image[k], label=label[k])
    return time.perf_counter() - start


def floor_times(read_jobs, compress_jobs, workers: int) -> tuple[float, float]:
    """(a) and (b) with ``workers`` processes: one pool for both, its start-up counted once, in (a)."""
    start = time.perf_counter()
    if workers == 1:
        for job in read_jobs:
            read_only(job)
        read_t = time.perf_counter() - start
        start = time.perf_counter()
        for job in compress_jobs:
            compress_only(job)
        return read_t, time.perf_counter() - start
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(read_only, read_jobs))
        read_t = time.perf_counter() - start
        start = time.perf_counter()
        list(pool.map(compress_only, compress_jobs))
        return read_t, time.perf_counter() - start


def convert_cli(raw: Path, out: Path, profile: str, workers: int, key: Path) -> float:
    if out.exists():
        shutil.rmtree(out)
    start = time.perf_counter()
    subprocess.run([str(Path(sys.executable).with_name("care-convert")), str(raw), str(out), "--profile", profile,
                    "--workers", str(workers), "--key-file", str(key), "--quiet"], check=True)
    return time.perf_counter() - start


IMPORTS_DONE_THEN_CONVERT = """
import sys, time
from pathlib import Path
import numcodecs, care_dataset.raw.dicom  # what the floor's process has imported too
from care_dataset.convert.pipeline import convert_dataset
from care_dataset.convert.pool import keep_freed_buffers
from care_dataset.raw.profiles import load_profile
raw, out, profile, workers, key = sys.argv[1:]
keep_freed_buffers()  # as the care-convert command does
start = time.perf_counter()
convert_dataset(Path(raw), Path(out), load_profile(profile), Path(key).read_bytes(), True, workers=int(workers),
                progress=False)
print(time.perf_counter() - start)
"""


def convert_after_imports(raw: Path, out: Path, profile_name: str, workers: int, key: Path) -> float:
    """(c') the conversion the command runs, timed in a fresh process after its imports (as the floor is)."""
    if out.exists():
        shutil.rmtree(out)
    done = subprocess.run([sys.executable, "-c", IMPORTS_DONE_THEN_CONVERT, str(raw), str(out), profile_name,
                           str(workers), str(key)], check=True, capture_output=True, text=True)
    return float(done.stdout.split()[-1])


def bench(name: str, raw: Path, profile_name: str, work: Path, key: Path, repeats: int) -> list[str]:
    profile = load_profile(profile_name)
    raw_cases = discover_cases(raw, profile)
    read_jobs = []
    for r in raw_cases:
        image_path = r.root if r.root.is_file() else next(p.parent for p in r.root.rglob("*")
                                                          if p.is_file() and not profile.is_label_file(p.name)
                                                          and not p.suffix == ".txt")
        read_jobs.append((str(image_path), str(r.label_path)))
    compress_jobs, total = [], 0
    kept_dir = work / f"{name}_kept"
    kept_dir.mkdir(exist_ok=True)
    for n, r in enumerate(raw_cases):
        case = load_case(r, profile)
        image, label = sitk.GetArrayFromImage(case.image), sitk.GetArrayFromImage(case.label)
        keep = np.isin(label, profile.keep_classes).any(axis=(1, 2))
        paths = (str(kept_dir / f"{n:04d}_image.npy"), str(kept_dir / f"{n:04d}_label.npy"))
        np.save(paths[0], image[keep])
        np.save(paths[1], label[keep])
        compress_jobs.append(paths)
        total += int(keep.sum())
    rows = []
    times: dict[int, tuple[float, float, float, float]] = {}
    for _ in range(repeats):
        for workers in (1, 2):
            read_t, comp_t = floor_times(read_jobs, compress_jobs, workers)
            conv_t = convert_cli(raw, work / f"{name}_out_w{workers}", profile_name, workers, key)
            here_t = convert_after_imports(raw, work / f"{name}_here_w{workers}", profile_name, workers, key)
            best = times.get(workers, (float("inf"),) * 4)
            times[workers] = (min(best[0], read_t), min(best[1], comp_t), min(best[2], conv_t), min(best[3], here_t))
    naive_t = naive_baseline(raw_cases, profile, work / f"{name}_naive")
    out_size = folder_bytes(work / f"{name}_out_w1")
    naive_size = folder_bytes(work / f"{name}_naive")
    raw_size = folder_bytes(raw)
    rows.append(f"### {name} ({len(raw_cases)} cases, {total} kept slices of 512 x 512; best of {repeats} runs)")
    rows.append("")
    rows.append("| workers | (a) read | (b) compress | floor (a)+(b) | (c) care-convert | (c) / floor "
                "| (c') after imports | (c') / floor |")
    rows.append("|---|---|---|---|---|---|---|---|")
    for workers, (read_t, comp_t, conv_t, here_t) in times.items():
        floor = read_t + comp_t
        rows.append(f"| {workers} | {read_t:.1f} s | {comp_t:.1f} s | {floor:.1f} s | {conv_t:.1f} s "
                    f"| {conv_t / floor:.2f}x | {here_t:.1f} s | {here_t / floor:.2f}x |")
    rows.append("")
    conv1 = times[1][2]
    rows.append(f"(d) naive per-slice .npz baseline, 1 process: {naive_t:.1f} s; care-convert 1 worker is "
                f"{naive_t / conv1:.1f}x faster, 2 workers {naive_t / times[2][2]:.1f}x faster.")
    rows.append(f"(e) sizes: raw {raw_size / 1e6:.0f} MB, care-convert output {out_size / 1e6:.1f} MB, "
                f"naive .npz {naive_size / 1e6:.1f} MB (output / naive = {out_size / naive_size:.2f}).")
    rows.append("")
    return rows


def python_start_up(repeats: int) -> float:
    """Seconds for a fresh Python to import what the floor uses (numpy, SimpleITK, numcodecs) and exit."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import numpy, SimpleITK, numcodecs"], check=True)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3, help="runs per timing; the best is printed")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    keep_freed_buffers()  # as care-convert does; the pools forked below inherit it
    work = args.workdir or Path(tempfile.mkdtemp(prefix="care-convert-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    key = work / "bench.key"
    key.write_bytes(os.urandom(32))
    start = time.perf_counter()
    if not (work / "care_raw").exists():  # a --workdir of an earlier run with the same settings is reused
        synth.write_raw_dataset(work / "care_raw", cases=args.cases, seed=0, size=512, slices=args.slices,
                                messy=False)
    if not (work / "word_raw").exists():
        make_word_set(work / "word_raw", args.cases, args.slices, seed=0)
    print(f"inputs ready in {time.perf_counter() - start:.0f} s under {work}", flush=True)
    lines = (bench("care", work / "care_raw", "care", work, key, args.repeats)
             + bench("word", work / "word_raw", "word", work, key, args.repeats))
    lines.append(f"Start-up inside (c) but not the floor: a fresh Python importing numpy, SimpleITK and numcodecs "
                 f"takes {python_start_up(args.repeats):.2f} s.")
    print("\n".join(lines))
    if args.workdir is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
