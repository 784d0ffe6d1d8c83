"""The README's end-to-end demo on the embedded synthetic default, one command after another.

    python -m usam.demo --workdir demo [--cases 12] [--size 256] [--epochs 8]

care-synth -> care-convert -> care-verify -> care-publish -> usam fit (tiny model) -> usam eval (clicks on every
slice, and a simulated user clicking one slice per class) -> usam predict on a new synthetic patient, with 3 clicks
per class on every slice that shows the class, with 3 clicks per class on one slice, propagated, and with those plus
a negative click past each end the propagation overran; then the Dice of those predictions against the patient's
annotation. Each step is the installed command a user would type; it is printed before it runs. Steps whose output
already exists are not redone.

Training is from scratch (no SAM checkpoint), so every parameter group gets the same learning rate
3e-3 (the 1e-4 encoder default protects pretrained weights, of which there are none here) at batch 8;
the model heads start from the class priors (usam.models.blocks.init_prior_bias). The tumour is about
0.1 % of a batch's pixels: with the paper's plain sampling and unweighted loss this short run never
predicts it, so the demo over-samples slices by class (--class-balance 0.5) and weights the tumour 5x
in the cross-entropy (--class-weights 1 1 5); see docs/training.md. For few clicks it trains for
propagation (--neighbour-prompts 0.5 --prompt-dropout 0.3: prompts from adjacent slices, and classes segmented
only when prompted; docs/evaluation.md#propagation). The synthetic CT
is 256 px in-plane: its field of view is drawn in millimetres, so anatomy keeps its size and only
the conversion gets cheaper (slices are resampled to 224 px for the model anyway).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from rich.console import Console
from rich.table import Table

from usam.prompts import interior_points
from usam.simulate import chosen_slices

console = Console()
CLASS_NAMES = ("normal rectum", "tumor")
# usam fit options of the demo (strings, as on a command line): from scratch, one learning rate for every group
FROM_SCRATCH = ["--batch-size", "8", "--lr-encoder", "3e-3", "--lr-decoder", "3e-3", "--points", "3", "--seed", "0"]
CLASS_BALANCE = ["--class-balance", "0.5"]
CLASS_WEIGHTS = ["--class-weights", "1", "1", "5"]
RARE_CLASS_RECIPE = CLASS_BALANCE + CLASS_WEIGHTS
# training for few clicks (usam.interactive): half of a class's training prompts come from an adjacent slice, as
# propagated prompts do, and 30 % of prompted classes lose their prompt and their target, so the model segments
# what the clicks ask for and propagation carries it through the volume
PROPAGATION_TRAINING = ["--neighbour-prompts", "0.5", "--prompt-dropout", "0.3"]
# the simulated user of the demo's sparse evaluation: one slice per class, 3 points, then up to 4 corrections
SPARSE_EVAL = ["--interaction", "sparse", "--clicked-slices", "1", "--clicks", "3", "--corrections", "4"]


def run(*command: str | Path) -> None:
    bin_dir = Path(sys.executable).parent
    argv = [str(bin_dir / str(command[0]))] + [str(c) for c in command[1:]]
    console.rule(f"[bold]{command[0]}")
    console.print("$ " + shlex.join([str(c) for c in command]), style="cyan", highlight=False)
    start = time.perf_counter()
    result = subprocess.run(argv)
    if result.returncode != 0:
        console.print(f"[red]{command[0]} exited with {result.returncode}")
        raise SystemExit(result.returncode)
    console.print(f"[dim]{command[0]}: {time.perf_counter() - start:.0f} s")


def find_label_file(case_dir: Path) -> Path:
    return next(p for p in sorted(case_dir.rglob("*"))
                if p.is_file() and any(t in p.name.lower() for t in ("seg", "label")) and p.suffix != ".txt")


def voxel_index(canonical: sitk.Image, image: sitk.Image, x: float, y: float, k: int) -> list[int]:
    """Pixel (x, y) of axial slice k of `canonical` (``DICOMOrient(image, "LPS")``) -> `image`'s voxel index."""
    world = canonical.TransformContinuousIndexToPhysicalPoint((float(x), float(y), float(k)))
    return [int(i) for i in image.TransformPhysicalPointToIndex(world)]


def write_clicks(label_path: Path, clicks_path: Path, per_class: int, clicked_slices: int | None = None) -> None:
    """Simulated user clicks: ``per_class`` voxel positions per class on every axial slice that shows it, or (with
    `clicked_slices`) on that many slices per class, chosen as ``usam eval --interaction sparse`` chooses them
    (`usam.simulate.chosen_slices`: the largest cross-section first).

    Deterministic (``usam.prompts.interior_points``: points far from the boundary), in voxel indices of the
    original label volume, i.e. the CT's own grid as ITK-SNAP shows it.
    """
    label = sitk.ReadImage(str(label_path))
    canonical = sitk.DICOMOrient(label, "LPS")
    array = sitk.GetArrayFromImage(canonical)
    points = []
    for c in range(1, len(CLASS_NAMES) + 1):
        areas = (array == c).sum(axis=(1, 2))
        holding = np.flatnonzero(areas)
        slices = holding if clicked_slices is None else chosen_slices(areas, clicked_slices)
        for k in sorted(int(s) for s in slices):
            for x, y in interior_points(array[k] == c, per_class):
                points.append({"class": c, "position": voxel_index(canonical, label, x, y, k)})
    clicks_path.write_text(json.dumps({"coordinates": "voxel", "points": points}, indent=1))


def write_end_corrections(prediction_path: Path, label_path: Path, clicks_path: Path, corrected_path: Path) -> int:
    """A simulated user's corrections of a propagated prediction: where a class runs past its first or last axial
    slice in the truth, one negative click on the first slice past that end, at the deepest pixel of the class's
    predicted region there. Writes `clicks_path`'s clicks plus those to `corrected_path`; returns how many."""
    label = sitk.ReadImage(str(label_path))
    canonical = sitk.DICOMOrient(label, "LPS")
    truth = sitk.GetArrayFromImage(canonical)
    predicted = sitk.GetArrayFromImage(sitk.DICOMOrient(sitk.ReadImage(str(prediction_path)), "LPS"))
    clicks = json.loads(clicks_path.read_text())
    added = 0
    for c in range(1, len(CLASS_NAMES) + 1):
        holding = np.flatnonzero((truth == c).any(axis=(1, 2)))
        for k in (holding[0] - 1, holding[-1] + 1) if len(holding) else ():
            if 0 <= k < len(predicted) and (predicted[k] == c).any():
                x, y = interior_points(predicted[k] == c, 1)[0]
                clicks["points"].append({"class": c, "position": voxel_index(canonical, label, x, y, k),
                                         "label": "negative"})
                added += 1
    corrected_path.write_text(json.dumps(clicks, indent=1))
    return added


def dice_table(prediction_path: Path, label_path: Path) -> dict[str, float]:
    prediction = sitk.GetArrayFromImage(sitk.ReadImage(str(prediction_path)))
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(label_path)))
    scores = {}
    for cls, name in enumerate(CLASS_NAMES, start=1):
        p, t = prediction == cls, truth == cls
        # absent in both: undefined (NaN), never counted as perfect or as zero (docs/evaluation.md)
        scores[name] = float(2 * (p & t).sum() / (p.sum() + t.sum())) if p.any() or t.any() else float("nan")
    return scores


def predict(checkpoint: Path, case_dir: Path, clicks: Path, propagation: str) -> None:
    """usam predict with the clicks `clicks`.json, writing `clicks`.nii.gz and overlays in the folder `clicks`."""
    run("usam", "predict", "--checkpoint", checkpoint, "--image", case_dir, "--points", clicks.with_suffix(".json"),
        propagation, "--out", clicks.with_suffix(".nii.gz"), "--overlays", clicks)


def results_table(work: Path, label_path: Path, new_patient: list[tuple[str, Path]]) -> Table:
    """Per-volume Dice of the test split (`usam eval` with clicks on every slice, and its simulated user clicking one
    slice per class) and of the new patient's predictions `new_patient` ((clicks, prediction path without suffix))."""
    metrics = json.loads((work / "eval" / "metrics.json").read_text())
    oracle, sparse = metrics["clinical_protocol"]["dice"], metrics["interaction"]["curve"][0]["dice"]
    table = Table(title="Held-out synthetic patients: per-volume Dice, 3 clicks per class on the slices named")
    table.add_column("patients")
    table.add_column("clicked slices")
    for name in CLASS_NAMES:
        table.add_column(name, justify="right")
    cases = f"test split ({metrics['num_cases']})"
    table.add_row(f"{cases}, mean ± std", "every slice holding the class",
                  *(f"{oracle[n]['mean']:.3f} ± {oracle[n]['std']:.3f}" for n in CLASS_NAMES))
    table.add_row(f"{cases}, mean", "1 per class, propagated", *(f"{sparse[n]:.3f}" for n in CLASS_NAMES))
    for how, prediction in new_patient:
        scores = dice_table(prediction.with_suffix(".nii.gz"), label_path)
        table.add_row("new patient", how, *(f"{scores[n]:.3f}" for n in CLASS_NAMES))
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m usam.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("demo"))
    parser.add_argument("--cases", type=int, default=12, help="synthetic patients to generate (default 12)")
    parser.add_argument("--size", type=int, default=256, help="in-plane size of the synthetic CT (default 256)")
    parser.add_argument("--epochs", type=int, default=8, help="training epochs of the tiny model (default 8)")
    parser.add_argument("--model", default="usam_tiny")
    args = parser.parse_args(argv)
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_CACHE", str(work / ".hf_cache"))
    start = time.perf_counter()

    # The data custodian's secret, kept outside every output folder. Synthetic data has nothing to protect, so the
    # demo uses a fixed key: the same pseudonyms, splits and results on every run. Real data needs a secret key.
    key = work / "site.key"
    key.write_bytes(b"care-usam demo key: synthetic data only\n")
    key.chmod(0o600)  # as care-keygen makes keys: readable by their owner only
    raw, out, care, run_dir = work / "raw", work / "out", work / "care", work / "runs" / args.model
    if not raw.exists():
        run("care-synth", raw, "--cases", args.cases, "--seed", 0, "--size", args.size)
    if not (out / "dataset.json").exists():
        run("care-convert", raw, out, "--key-file", key, "--workers", 2)
    run("care-verify", out, "--raw", raw)
    if not care.exists():
        run("care-publish", out, care)
    if not (run_dir / "best").exists():
        run("usam", "fit", "--data", care, "--model", args.model, "--out", run_dir, "--epochs", args.epochs,
            *FROM_SCRATCH, *RARE_CLASS_RECIPE, *PROPAGATION_TRAINING, "--workers", 1)
    run("usam", "eval", "--data", out, "--checkpoint", run_dir / "best", "--split", "test",
        "--out", work / "eval", *SPARSE_EVAL)

    new_patient = work / "new_patient"
    if not new_patient.exists():
        run("care-synth", new_patient, "--cases", 1, "--seed", 2024, "--size", args.size, "--no-messy")
    case_dir = next(p for p in new_patient.iterdir() if p.is_dir())
    label_path = find_label_file(case_dir)
    every_slice, one_slice, corrected = (work / f"new_patient_{name}" for name in ("every_slice", "one_slice",
                                                                                   "corrected"))
    write_clicks(label_path, every_slice.with_suffix(".json"), per_class=3)
    write_clicks(label_path, one_slice.with_suffix(".json"), per_class=3, clicked_slices=1)
    # every slice showing a class clicked: no propagation needed; one slice per class: propagated through the scan
    for clicks, how in ((every_slice, "--no-propagate"), (one_slice, "--propagate")):
        predict(run_dir / "best", case_dir, clicks, how)
    # where propagation ran past a class's end (into the unlabelled sigmoid or anal canal): a negative click there
    added = write_end_corrections(one_slice.with_suffix(".nii.gz"), label_path, one_slice.with_suffix(".json"),
                                  corrected.with_suffix(".json"))
    predict(run_dir / "best", case_dir, corrected, "--propagate")
    console.print(results_table(work, label_path, [
        ("every slice holding the class", every_slice), ("1 per class, propagated", one_slice),
        (f"1 per class, propagated, + {added} negative click(s) past its ends", corrected)]))
    console.print(f"demo finished in {time.perf_counter() - start:.0f} s; everything is under {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
