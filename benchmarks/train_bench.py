"""Training throughput of one model: images/s and peak memory, fp32 vs bf16 autocast (+ channels_last,
+ torch.compile), and the model FLOPs per training image (forward + backward, counted once).

    python benchmarks/train_bench.py --model usam_b --batch-size 24 --steps 20           # CUDA
    python benchmarks/train_bench.py --model usam_b --batch-size 2 --steps 2 --no-compile  # CPU, small

Random inputs with the real shapes (1 x 224 x 224 images, 3 points per class): this measures the model and
optimiser step only; the data-loader wait fraction of a real run is in its log.jsonl (``usam fit``).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from usam.models.registry import create_model
from usam.train import soft_dice_loss


def batch(size: int, num_classes: int, k: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(size, 1, 224, 224, generator=g)
    points = torch.rand(size, (num_classes - 1) * k, 2, generator=g) * 223
    labels = torch.ones(size, (num_classes - 1) * k, dtype=torch.int64)
    target = torch.randint(0, num_classes, (size, 224, 224), generator=g)
    return tuple(t.to(device) for t in (images, points, labels, target))


def train_step(model, optimizer, inputs, autocast: bool, device: torch.device) -> None:
    images, points, labels, target = inputs
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        logits = model(images, points, labels)
    loss = 0.4 * F.cross_entropy(logits.float(), target) + 0.6 * soft_dice_loss(logits, target)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def flops_per_image(name: str, device: torch.device) -> float:
    model = create_model(name).to(device)
    inputs = batch(2, 3, 3, device)
    with FlopCounterMode(display=False) as counter:
        logits = model(*inputs[:3])
        F.cross_entropy(logits, inputs[3]).backward()
    return counter.get_total_flops() / 2


def measure(name: str, variant: str, size: int, steps: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = create_model(name).to(device)
    inputs = list(batch(size, 3, 3, device))
    if "channels_last" in variant:
        model = model.to(memory_format=torch.channels_last)
        inputs[0] = inputs[0].contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step_model = torch.compile(model) if "compile" in variant else model
    autocast = "bf16" in variant
    train_step(step_model, optimizer, inputs, autocast, device)  # warm-up (and compilation)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)  # the steady state's peak, without cuDNN's and Inductor's trials
    start = time.perf_counter()
    for _ in range(steps):
        train_step(step_model, optimizer, inputs, autocast, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"variant": variant, "images_per_s": steps * size / elapsed, "peak_gib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="usam_b")
    parser.add_argument("--batch-size", type=int, default=24)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--json", default=None, help="also append the figures as JSON lines here")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":  # TF32 stays as torch sets it (matmuls in fp32), as in usam fit with --no-amp
        torch.backends.cudnn.benchmark = True  # as usam fit does on CUDA
    flops = flops_per_image(args.model, device)
    variants = ["fp32", "bf16", "bf16+channels_last"] + (["bf16+channels_last+compile"] if args.compile else [])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.model}, batch {args.batch_size}, {args.steps} timed steps after 1 warm-up, {name}, "
          f"torch {torch.__version__}")
    print(f"model FLOPs per training image (forward + backward): {flops / 1e9:.1f} GFLOP")
    print(f"{'variant':30s} {'images/s':>10s} {'TFLOP/s':>9s} {'peak GiB':>9s}")
    for variant in variants:
        row = measure(args.model, variant, args.batch_size, args.steps, device)
        print(f"{variant:30s} {row['images_per_s']:10.2f} {row['images_per_s'] * flops / 1e12:9.3f} "
              f"{row['peak_gib']:9.2f}")
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps({"bench": "train", "device": name, "model": args.model,
                                    "batch_size": args.batch_size, "flops_per_image": flops, **row}) + "\n")


if __name__ == "__main__":
    main()
