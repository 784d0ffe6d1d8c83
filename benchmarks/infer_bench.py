"""Inference benchmark: seconds for one CT volume end to end (read + predict + write).

    python benchmarks/infer_bench.py [--slices 100] [--size 512] [--model usam_b] [--batch-size 16]
                                     [--device auto] [--repeats 3] [--baseline-slices 100]

Ours: `usam.predict` (the volume read with SimpleITK, every axial slice windowed and resized on the
device side in batches, bf16 autocast on CUDA, logits resized back, argmax, written as .nii.gz).
Baseline, in the same process on the same volume: what the original U-SAM test loop does per slice,
batch 1 in fp32: scipy.ndimage.zoom (cubic) to 224, forward, argmax, zoom back (nearest). The model
is randomly initialised (timings do not depend on the weights). Prints both and their ratio.

    python benchmarks/infer_bench.py --interactive [--slices 40] [--size 512] [--model usam_b] [--device cpu]

Interactive (`usam.interactive`), in one run on one volume: the full volume from one click (every slice's
image side encoded, clicks propagated, the rest unprompted), then one corrective (negative) click with the cache
reused (image features and decoded logits: the prompt decoder runs only where a prompt changed), with the affected
slices run whole (the decoded logits and labels kept, the image features not: the slices whose prompt changed are
encoded and decoded again), and without any reuse (a fresh cache: every slice encoded and decoded again). Prints the four
times and the ratios to the reused run. The random model makes the propagation's reach arbitrary (min area 1);
both corrective runs take the same clicks, so they do the same decoder work.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage

from usam.data import window_normalize
from usam.models.registry import create_model
from usam.inference import InferenceSettings, choose_device, forward_logits
from usam.interactive import FeatureCache, SliceClicks, propagate
from usam.outputs import write_image_atomic
from usam.predict import canonical_hu, labels_on_original_grid, predict_canonical, read_image


def synthetic_ct(slices: int, size: int, seed: int = 0) -> sitk.Image:
    """A 512 x 512 x n int16 volume with body-like HU structure (values do not change timings)."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:size, 0:size]
    body = ((rows - size / 2) / (0.42 * size)) ** 2 + ((cols - size / 2) / (0.47 * size)) ** 2 <= 1
    volume = np.full((slices, size, size), -1000, np.int16)
    volume[:, body] = 40
    volume += rng.integers(-30, 30, volume.shape, dtype=np.int16)
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing((0.78, 0.78, 3.0))
    return image


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_ours(model, settings, source: Path, out: Path, batch_size: int, device: torch.device) -> float:
    start = time.perf_counter()
    image = read_image(source)
    canonical, hu = canonical_hu(image)
    labels = predict_canonical(model, settings, hu, None, batch_size, device)
    write_image_atomic(labels_on_original_grid(labels, canonical, image), out)
    synchronize(device)
    return time.perf_counter() - start


def run_baseline(model, settings, source: Path, out: Path, slices: int, device: torch.device) -> tuple[float, float]:
    """Per slice: cubic zoom to 224, batch-1 fp32 forward, argmax, nearest zoom back. Only the first `slices`
    slices are segmented; the whole volume is read and written. Returns (read + write seconds, loop seconds)."""
    start = time.perf_counter()
    image = read_image(source)
    volume = sitk.GetArrayFromImage(image)
    prediction = np.zeros(volume.shape, np.uint8)
    size = settings.img_size
    io_seconds = time.perf_counter() - start
    start = time.perf_counter()
    for z, hu in enumerate(volume[:slices]):
        x = window_normalize(hu, settings.window)
        h, w = x.shape
        small = ndimage.zoom(x, (size / h, size / w), order=3)
        tensor = torch.from_numpy(np.ascontiguousarray(small, np.float32))[None, None].to(device)
        with torch.inference_mode():
            logits = model(tensor, None, None)
        label = logits.argmax(dim=1)[0].cpu().numpy().astype(np.uint8)
        prediction[z] = ndimage.zoom(label, (h / size, w / size), order=0)
    synchronize(device)
    loop_seconds = time.perf_counter() - start
    start = time.perf_counter()
    result = sitk.GetImageFromArray(prediction)
    result.SetSpacing(image.GetSpacing())
    sitk.WriteImage(result, str(out), useCompression=True)
    return io_seconds + time.perf_counter() - start, loop_seconds


def run_interactive(model, settings, hu: np.ndarray, batch_size: int, device: torch.device
                    ) -> tuple[dict[str, float], int]:
    """Seconds: 'full' (one click, fresh cache), 'reuse', 'affected_rerun' and 'no_reuse' (one more, negative,
    click); and the number of slices the corrective click affected."""
    middle, centre = len(hu) // 2, np.array([settings.img_size / 2] * 2, np.float32)
    clicks = {middle: SliceClicks(positive={1: [centre]})}
    corrected = {**clicks, middle + 1: SliceClicks(negative={1: [centre + 8]})}
    times = {}
    start = time.perf_counter()
    cache = FeatureCache(model, settings, hu, device, batch_size)
    propagate(cache, clicks, min_area=1)
    synchronize(device)
    times["full"] = time.perf_counter() - start
    encoded, decoded, kept_logits, kept_labels = cache.encoded, cache.decoded, dict(cache.logits), dict(cache.labels)
    start = time.perf_counter()
    propagate(cache, corrected, min_area=1)
    synchronize(device)
    times["reuse"] = time.perf_counter() - start
    assert cache.encoded == encoded, "the corrective click encoded slices again"
    affected = FeatureCache(model, settings, hu, device, batch_size)
    affected.logits, affected.labels = kept_logits, kept_labels
    start = time.perf_counter()
    propagate(affected, corrected, min_area=1)
    synchronize(device)
    times["affected_rerun"] = time.perf_counter() - start
    assert affected.decoded == affected.encoded == cache.decoded - decoded, "not the same slices as the reused run"
    start = time.perf_counter()
    propagate(FeatureCache(model, settings, hu, device, batch_size), corrected, min_area=1)
    synchronize(device)
    times["no_reuse"] = time.perf_counter() - start
    return times, affected.encoded


def main_interactive(args: argparse.Namespace, model, settings, device: torch.device, name: str) -> None:
    hu = sitk.GetArrayFromImage(synthetic_ct(args.slices, args.size))
    forward_logits(model, torch.zeros(1, 1, settings.img_size, settings.img_size), None, None, device)  # warm-up
    times, affected = run_interactive(model, settings, hu, args.batch_size, device)
    print(f"device: {device.type} ({name}), torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print(f"volume: {args.slices} x {args.size} x {args.size} int16, model {args.model}, batch {args.batch_size}")
    print(f"full volume from one click: {times['full']:.2f} s")
    print(f"corrective click, image features reused: {times['reuse']:.2f} s")
    print(f"corrective click, the {affected} affected slices run whole: "
          f"{times['affected_rerun']:.2f} s ({times['affected_rerun'] / times['reuse']:.1f}x the reused run)")
    print(f"corrective click, the whole volume run again: {times['no_reuse']:.2f} s "
          f"({times['no_reuse'] / times['reuse']:.1f}x the reused run)")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({"bench": "interactive", "device": name, "model": args.model, "slices": args.slices,
                                "affected_slices": affected, **{f"seconds_{k}": v for k, v in times.items()}}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--model", default="usam_b")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of ours (median reported)")
    parser.add_argument("--baseline-slices", type=int, default=None,
                        help="slices the baseline runs (default: all); its time is scaled to --slices")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--json", type=Path, default=None, help="also append the figures as one JSON line here")
    parser.add_argument("--interactive", action="store_true",
                        help="time a corrective click with and without image-feature reuse (module docstring)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = choose_device(args.device)
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=3).to(device).eval()
    settings = InferenceSettings(("background", "normal rectum", "tumor"), (-125.0, 275.0),
                                 int(model.config["img_size"]), int(model.config.get("points_per_class", 0)))
    if args.interactive:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "CPU")
        return main_interactive(args, model, settings, device, name)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = tmp / "ct.nii.gz"
        sitk.WriteImage(synthetic_ct(args.slices, args.size), str(source), useCompression=True)
        # warm-up: allocator, kernels, autotuning
        warm = torch.zeros(min(args.batch_size, args.slices), 1, settings.img_size, settings.img_size)
        forward_logits(model, warm, None, None, device)
        forward_logits(model, warm[:1], None, None, device)
        with torch.inference_mode():  # the baseline's own path: batch 1 in fp32
            model(warm[:1].to(device), None, None)
        synchronize(device)
        ours = [run_ours(model, settings, source, tmp / "ours.nii.gz", args.batch_size, device)
                for _ in range(args.repeats)]
        baseline_slices = min(args.baseline_slices or args.slices, args.slices)
        baseline_io, baseline_loop = run_baseline(model, settings, source, tmp / "base.nii.gz", baseline_slices,
                                                  device)
    baseline_scaled = baseline_io + baseline_loop * args.slices / baseline_slices  # the per-slice work scales
    ours_median = statistics.median(ours)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "CPU")
    print(f"device: {device.type} ({name}), torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print(f"volume: {args.slices} x {args.size} x {args.size} int16, model {args.model}")
    print(f"ours     (batch {args.batch_size}, {'bf16' if device.type == 'cuda' else 'fp32'}): "
          f"{ours_median:.2f} s median of {args.repeats} ({args.slices / ours_median:.1f} slices/s)")
    note = "" if baseline_slices == args.slices else f", measured on {baseline_slices} slices and scaled"
    print(f"baseline (per slice, batch 1, fp32, scipy zoom): {baseline_scaled:.2f} s{note} "
          f"({args.slices / baseline_scaled:.1f} slices/s)")
    print(f"speed-up: {baseline_scaled / ours_median:.2f}x")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({"bench": "infer", "device": name, "model": args.model, "slices": args.slices,
                                "seconds_per_volume": ours_median, "baseline_seconds": baseline_scaled}) + "\n")


if __name__ == "__main__":
    main()
