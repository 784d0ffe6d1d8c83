"""Which training recipe lets the demo's tiny model learn the tumour: held-out Dice per recipe, in one run.

    python benchmarks/recipe_ablation.py [--cases 20] [--size 256] [--epochs 5] [--recipes paper,balanced] [--workdir DIR]

Data: the README demo's synthetic CARE-like set (care-synth with seed 0, converted with care-convert and the demo's
fixed key, so the same patients land in the test split). For each recipe, `usam fit` trains `usam_tiny` from scratch with the demo's options (usam.demo.FROM_SCRATCH) and `usam eval` scores the best checkpoint on the test split with 3 points per class. It prints
both protocols (pooled at 224 x 224, and per volume at the stored resolution) for each class, and each recipe's
tumour Dice minus the paper recipe's when the paper recipe is in the run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from usam.demo import CLASS_BALANCE, CLASS_WEIGHTS, FROM_SCRATCH, RARE_CLASS_RECIPE

RECIPES: dict[str, list[str]] = {
    "paper": [],
    "balance": CLASS_BALANCE,
    "weights": CLASS_WEIGHTS,
    "balanced": RARE_CLASS_RECIPE,
}


def command(name: str, *args: object) -> None:
    executable = Path(sys.executable).parent / name
    subprocess.run([str(executable), *map(str, args)], check=True, stdout=subprocess.DEVNULL)


def prepare(work: Path, cases: int, size: int) -> Path:
    out = work / "out"
    if not (out / "dataset.json").exists():
        key = work / "site.key"
        key.write_bytes(b"care-usam demo key: synthetic data only\n")  # the demo's key: the demo's split
        key.chmod(0o600)  # as care-keygen makes keys: readable by their owner only
        command("care-synth", work / "raw", "--cases", cases, "--seed", 0, "--size", size)
        command("care-convert", work / "raw", out, "--key-file", key, "--workers", 2, "--quiet")
    return out


def run_recipe(data: Path, run: Path, recipe: list[str], epochs: int) -> dict:
    start = time.perf_counter()
    command("usam", "fit", "--data", data, "--model", "usam_tiny", "--out", run, "--epochs", epochs,
            *FROM_SCRATCH, *recipe, "--workers", 1)
    fit_s = time.perf_counter() - start
    command("usam", "eval", "--data", data, "--checkpoint", run / "best", "--split", "test", "--out", run / "eval")
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    return {"fit_s": fit_s, "steps": json.loads((run / "run.json").read_text())["total_steps"],
            "pooled": metrics["paper_protocol"]["dice"],
            "volume": {c: v["mean"] for c, v in metrics["clinical_protocol"]["dice"].items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated, from {', '.join(RECIPES)}")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    names = [n for n in args.recipes.split(",") if n]
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        parser.error(f"unknown recipes {', '.join(unknown)}; known: {', '.join(RECIPES)}")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="recipe_ablation_"))
    work.mkdir(parents=True, exist_ok=True)
    data = prepare(work, args.cases, args.size)
    results = {}
    for name in names:
        results[name] = run_recipe(data, work / "runs" / name, RECIPES[name], args.epochs)
        print(f"{name}: {json.dumps(results[name])}", flush=True)
    print(f"\n{args.cases} synthetic cases at {args.size} px, usam_tiny from scratch, {args.epochs} epochs; "
          f"test split, 3 points per class\n")
    print("| recipe | steps | fit | rectum pooled | tumour pooled | rectum per volume | tumour per volume "
          "| tumour per volume - paper |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        delta = (f"{r['volume']['tumor'] - results['paper']['volume']['tumor']:+.3f}"
                 if "paper" in results else "n/a")
        print(f"| {name} | {r['steps']} | {r['fit_s']:.0f} s | {r['pooled']['normal rectum']:.3f} | "
              f"{r['pooled']['tumor']:.3f} | {r['volume']['normal rectum']:.3f} | {r['volume']['tumor']:.3f} | {delta} |")
    print(f"\nrun folders under {work}")


if __name__ == "__main__":
    main()
