#!/usr/bin/env bash
# One call on a CUDA machine: the CUDA tests, then the GPU figures as a short table. Under 8 minutes on an H100:
# the steps' timeouts add up to 440 s, so the script ends in time even when a step hangs.
#
# Here, once:   bash benchmarks/gpu_wheels.sh          (wheels the GPU image lacks, into the ignored .whl/)
# Device tool:  run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=500)
# Figures land in $OUT (or /tmp/gpu_check) as figures.jsonl and logs; record them in docs/benchmarks.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${OUT:-/tmp/gpu_check}
mkdir -p "$OUTDIR"
FIG="$OUTDIR/figures.jsonl"
: > "$FIG"
# A failed install is reported, not fatal: the steps that do not need the package still give their figures.
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || echo "gpu_check: installing the carried wheels FAILED"
  if [ -f .whl/simpleitk.tar.xz ]; then  # Python's tarfile, not tar -J: the image may lack the xz program
    python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="data")' \
      .whl/simpleitk.tar.xz /tmp/site \
      || echo "gpu_check: unpacking SimpleITK FAILED"
  fi
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export HF_DATASETS_DISABLE_PROGRESS_BARS=1 HF_HUB_OFFLINE=1 HF_DATASETS_CACHE=$(mktemp -d) PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
python3 -c 'import numpy, zarr, numcodecs, SimpleITK, nibabel, pydicom, safetensors, rich, matplotlib, scipy
from usam.models import sam_parts
print("numpy", numpy.__version__, "zarr", zarr.__version__, "SimpleITK", SimpleITK.Version_VersionString())' \
  || echo "gpu_check: an import FAILED (above); the steps that need it will fail too"
df -h /dev/shm | tail -1  # DataLoader workers pass batches through it

echo "== CUDA tests"
timeout 80 python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py 2>&1 | tee "$OUTDIR/cuda_tests.log" | tail -5

echo "== bf16 matrix rate (8192^3, mean of 10 after 3 warm-ups)"
timeout 20 python3 - "$FIG" <<'PY'
import json, sys, time, torch
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16); b = torch.randn_like(a)
for _ in range(3): a @ b
torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(10): a @ b
torch.cuda.synchronize(); rate = 10 * 2 * 8192**3 / (time.perf_counter() - t)
print(f"bf16 matmul: {rate / 1e12:.0f} TFLOP/s")
open(sys.argv[1], "a").write(json.dumps({"bench": "matmul", "tflops": rate / 1e12}) + "\n")
PY

echo "== training step, model only (usam_b, batch 24)"
timeout 190 python3 benchmarks/train_bench.py --model usam_b --batch-size 24 --steps 15 --json "$FIG" 2>&1 \
  | tee "$OUTDIR/train.log" | tail -8

echo "== usam fit with the real data pipeline (usam_b, batch 24, 8 workers, bf16 + channels_last)"
timeout 90 python3 benchmarks/fit_probe.py --model usam_b --batch-size 24 --steps 48 --workers 8 --json "$FIG" 2>&1 \
  | tee "$OUTDIR/fit.log" | tail -2

echo "== inference, 100 x 512 x 512 volume end to end (read, predict, write)"
timeout 60 python3 benchmarks/infer_bench.py --device cuda --repeats 3 --batch-size 32 --baseline-slices 20 --json "$FIG" 2>&1 \
  | tee "$OUTDIR/infer.log" | tail -5

echo "== summary"
python3 - "$FIG" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
get = lambda bench: [r for r in rows if r["bench"] == bench]
peak = get("matmul")[0]["tflops"] if get("matmul") else float("nan")
print(f"{'figure':52s} value")
for r in get("train"):
    tf = r["images_per_s"] * r["flops_per_image"] / 1e12
    print(f"{'train images/s, ' + r['variant']:52s} {r['images_per_s']:8.1f}  ({tf:.0f} TFLOP/s = {100 * tf / peak:.0f}% of bf16 matmul), peak {r['peak_gib']:.1f} GiB")
for r in get("fit"):
    print(f"{'usam fit images/s (real loader, bf16+cl)':52s} {r['images_per_s']:8.1f}")
    print(f"{'usam fit step time':52s} {1e3 * r['step_s']:8.0f} ms")
    print(f"{'usam fit data-loader wait':52s} {100 * r['data_wait_fraction']:8.1f} %")
    print(f"{'usam fit peak memory':52s} {r['peak_gib']:8.1f} GiB")
for r in get("infer"):
    print(f"{'inference, %d-slice volume end to end' % r['slices']:52s} {r['seconds_per_volume']:8.2f} s (baseline {r['baseline_seconds']:.1f} s)")
PY
