"""`usam eval`: a checkpoint on one split of a converted or published CARE folder, paper and clinical metrics.

Paper protocol: Dice and IoU per class pooled over every slice of the split holding a label, at the model's
224 x 224 resolution (sum of intersections over sum of sizes). Clinical protocol: per volume at the original
in-plane resolution (logits resized bilinearly to H x W, then argmax), Dice, IoU and the 95th-percentile
surface Hausdorff distance in mm (as defined, and penalised: a miss or a false positive scores the volume's
field-of-view diagonal); mean and std over cases. The volume is the stored slices holding a label
(``labelled``) or every slice of the scan (``full``: only for a conversion that kept them all).
Definitions and empty-set conventions: docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from torch import nn

from care_dataset.error_text import error_line
from care_dataset.format.layout import whole_scan
from care_dataset.format.published import open_any
from usam.config import SELECTION_WARNING, recipe_options
from usam.data import resize_labels
from usam.inference import (
    InferenceSettings,
    InputError,
    choose_device,
    class_argmax,
    config_value,
    forward_logits,
    inference_settings,
    iter_batches,
    logits_to_labels,
    model_input,
)
from usam.metrics import (
    SlicePositions,
    confusion_matrix,
    dice_from_confusion,
    foreground_mean,
    iou_from_confusion,
    overlap_counts,
    summarize,
    volume_metrics,
)
from usam.models.checkpoints import load_checkpoint
from usam.outputs import check_parent_creatable, error_reason, write_folder_files
from usam.overlays import save_case_grid, save_interaction_curve
from usam.prompts import PADDING_LABEL, PromptProtocol, sample_points

PAPER_PROTOCOL = "paper: Dice/IoU pooled over the slices of the split holding a label, at {size} x {size}"
VOLUME_PROTOCOLS = ("labelled", "full")
CLINICAL_PROTOCOL = {
    "labelled": "clinical: per volume over the stored slices holding a label, at the original in-plane "
                "resolution, mean and std over cases",
    "full": "clinical: per volume over every slice of the scan (all stored), at the original in-plane "
            "resolution, mean and std over cases",
}
HD95_DEFINITIONS = {
    "hd95_mm": "HD95 mm: over cases where truth and prediction both hold the class; misses and false "
               "positives are excluded (counted as HD95 undefined), so missing a tumour never worsens it.",
    "hd95_mm_penalised": "HD95 mm penalised: misses and false positives score the diagonal of the volume's "
                         "field of view in mm; only cases empty in both are excluded.",
}


@dataclass
class CaseResult:
    """Per-volume metrics of one case; arrays are indexed by class (0 = background, unused)."""

    case_id: str
    num_slices: int
    dice: np.ndarray
    iou: np.ndarray
    hd95: np.ndarray  # NaN where truth or prediction lacks the class
    hd95_penalised: np.ndarray  # field-of-view diagonal where exactly one of them lacks it
    true_voxels: np.ndarray
    pred_voxels: np.ndarray
    preview_position: int  # stored slice shown in the overlay grid (largest true foreground)
    preview_pred: np.ndarray = field(repr=False)  # (H, W) prediction on that slice

    @property
    def mean_dice(self) -> float:
        return foreground_mean(self.dice)

    @property
    def mean_iou(self) -> float:
        return foreground_mean(self.iou)


@dataclass
class Evaluation:
    """Everything `usam eval` reports for one split and one prompt setting."""

    split: str
    points_per_class: int
    settings: InferenceSettings
    pooled_confusion: np.ndarray  # at img_size x img_size, summed over every slice holding a label
    cases: list[CaseResult]
    num_slices: int  # slices pooled: those holding a label
    volume: str = "labelled"  # VOLUME_PROTOCOLS: the slices of each case its per-volume metrics cover
    protocol: PromptProtocol = PromptProtocol()  # how the prompts were built


def model_prompts(
    labels: torch.Tensor, num_classes: int, k: int, slots_per_class: int,
    protocol: PromptProtocol = PromptProtocol(),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic prompts from B x S x S labels, built as `protocol` says: k points per class placed in
    the first k of each class's `slots_per_class` model slots; the rest are padding (the released style
    fills every slot: k must equal `slots_per_class` there)."""
    batch = labels.shape[0]
    points = np.zeros((batch, (num_classes - 1) * slots_per_class, 2), np.float32)
    point_labels = np.full((batch, (num_classes - 1) * slots_per_class), PADDING_LABEL, np.int64)
    array = labels.cpu().numpy()
    for b in range(batch):
        p, lab = sample_points(array[b], num_classes, k, rng=None, protocol=protocol)
        for cls in range(1, num_classes):
            target = slice((cls - 1) * slots_per_class, (cls - 1) * slots_per_class + k)
            source = slice((cls - 1) * k, cls * k)
            points[b, target], point_labels[b, target] = p[source], lab[source]
    return torch.from_numpy(points), torch.from_numpy(point_labels)


def open_eval_data(path: str | Path) -> Any:
    """A converted folder as a `CareDataset`, a published Hugging Face folder as a `PublishedDataset`
    (`care_dataset.open_any`: the same reading interface).

    Raises InputError with one line naming the folder and the reason.
    """
    try:
        return open_any(path)
    except FileNotFoundError as error:  # its message starts with the path
        raise InputError(f"--data {error}") from None
    except (ValueError, KeyError, TypeError, json.JSONDecodeError) as error:
        raise InputError(f"--data {path}: {error_line(error)}") from None


def _case_volumes(pred: np.ndarray, truth: np.ndarray, kept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Place stored slices at their canonical z (gaps between kept slices become empty slices)."""
    if len(kept) < 2 or np.all(np.diff(kept) == 1):
        return pred, truth
    depth = int(kept.max() - kept.min() + 1)
    z = kept - kept.min()
    full_pred = np.zeros((depth, *pred.shape[1:]), pred.dtype)
    full_truth = np.zeros((depth, *truth.shape[1:]), truth.dtype)
    full_pred[z], full_truth[z] = pred, truth
    return full_pred, full_truth


def true_positions(geometry: Mapping[str, Any], kept: np.ndarray,
                   stored: np.ndarray | None = None) -> SlicePositions | None:
    """The voxel positions of a case's volume (stored slices at their canonical z, as `_case_volumes` places
    them) from cases.json's ``slice_positions``; None when the case has none (its slices are on its grid).
    ``kept``: the canonical indices of the measured slices, ``stored`` their positions among the stored slices
    (default: all of them, in order)."""
    if "slice_positions" not in geometry:
        return None
    sx, sy, sz = (float(s) for s in geometry["canonical"]["spacing"])
    direction = np.asarray(geometry["canonical"]["direction"], dtype=np.float64).reshape(3, 3)
    measured = np.asarray(geometry["slice_positions"], dtype=np.float64)
    origins = np.full((int(kept.max() - kept.min() + 1), 3), np.nan)
    origins[kept - kept.min()] = measured if stored is None else measured[stored]
    return SlicePositions(origins, row_step=direction[:, 1] * sy, column_step=direction[:, 0] * sx,
                          slice_step=direction[:, 2] * sz)


def full_volume_problem(dataset: Any, case_ids: list[str]) -> str | None:
    """Why ``--volume full`` cannot score these cases (the first whose stored slices are not its whole scan),
    or None."""
    for case_id in case_ids:
        geometry = dataset.cases[case_id]
        try:
            whole = whole_scan(geometry)
        except (KeyError, TypeError, ValueError, IndexError):
            return (f"--volume full: case {case_id} has no kept_slices and canonical size in cases.json, so "
                    "whether its whole scan is stored is unknown; use --volume labelled")
        if not whole:
            return (f"--volume full: case {case_id} stores {len(geometry['kept_slices'])} of "
                    f"{int(geometry['canonical']['size'][2])} axial slices (its conversion kept the labelled "
                    "ones); convert with [slices] margin = \"all\" to score whole scans, or use --volume labelled")
    return None


@dataclass
class EvalCase:
    """One case as read for evaluation: stored slices, where they sit, which are scored and pooled."""

    case_id: str
    image: np.ndarray  # (n, H, W) int16, stored slices
    truth: np.ndarray  # (n, H, W) uint8
    kept: np.ndarray  # (n,) canonical index of each stored slice
    spacing: tuple[float, float, float]  # z, y, x mm
    scored: np.ndarray  # stored positions the per-volume metrics cover
    pooled: np.ndarray  # (len(scored),) bool: which of them hold a label (pooled by the paper protocol)
    positions: SlicePositions | None  # true positions of the scored slices, where they are off the grid


def read_eval_case(dataset: Any, case_id: str, num_classes: int, volume: str) -> EvalCase:
    """A case's stored slices and the ones `volume` scores; InputError, one line, for a case that cannot be
    read or does not fit the model."""
    try:
        image, truth = dataset.read_case(case_id)
        geometry = dataset.cases[case_id]
        kept = np.asarray(geometry["kept_slices"], dtype=np.int64)
        sx, sy, sz = (float(s) for s in geometry["spacing"])
    except (KeyError, OSError, ValueError, TypeError) as error:
        raise InputError(f"case {case_id}: cannot be read ({type(error).__name__}: {error})") from None
    n = image.shape[0]
    if len(kept) != n or truth.shape != image.shape:
        raise InputError(f"case {case_id}: {n} stored slices but {len(kept)} kept_slices in cases.json")
    if int(truth.max(initial=0)) >= num_classes:
        raise InputError(f"case {case_id}: label value {int(truth.max())} but the model has {num_classes} classes")
    labelled = truth.reshape(n, -1).any(axis=1)
    scored = np.flatnonzero(labelled) if volume == "labelled" else np.arange(n)
    if not len(scored):
        raise InputError(f"case {case_id}: no stored slice holds a label, so --volume labelled scores nothing")
    try:
        positions = true_positions(geometry, kept[scored], scored)
    except (KeyError, ValueError, TypeError, IndexError) as error:
        raise InputError(f"case {case_id}: cannot be read ({type(error).__name__}: {error})") from None
    return EvalCase(case_id, image, truth, kept, (sz, sy, sx), scored, labelled[scored], positions)


def predict_case(model: nn.Module, settings: InferenceSettings, case: EvalCase, points_per_class: int,
                 batch_size: int, device: torch.device, pooled: np.ndarray, progress: Any | None,
                 protocol: PromptProtocol) -> np.ndarray:
    """Labels (len(scored), H, W) of the case's scored slices at its resolution, prompted as `protocol` says;
    adds the slices holding a label to the `pooled` confusion at the model's."""
    num_classes, size = settings.num_classes, settings.img_size
    height, width = case.image.shape[1:]
    pred = np.zeros((len(case.scored), height, width), case.truth.dtype)
    for batch in iter_batches(len(case.scored), batch_size):
        index = case.scored[batch]
        x = model_input(case.image[index], settings, device)
        truth_small = resize_labels(torch.from_numpy(case.truth[index]), size, settings.resize)
        points = point_labels = None
        if points_per_class:
            points, point_labels = model_prompts(truth_small, num_classes, points_per_class, settings.points_per_class,
                                                 protocol)
        logits = forward_logits(model, x, points, point_labels, device)
        pool_slices(pooled, class_argmax(logits), truth_small.to(logits.device), case.pooled[batch], num_classes)
        pred[batch] = logits_to_labels(logits, height, width, settings.corner_aligned).cpu().numpy()
        if progress is not None:
            progress(batch.stop - batch.start)
    return pred


def pool_slices(pooled: np.ndarray, pred_small: torch.Tensor, truth_small: torch.Tensor, counted: np.ndarray,
                num_classes: int) -> None:
    """Add the slices of a batch marked in `counted` (B,) to the `pooled` confusion matrix."""
    if counted.all():
        pooled += confusion_matrix(pred_small, truth_small, num_classes)
    elif counted.any():
        keep = torch.from_numpy(counted).to(pred_small.device)
        pooled += confusion_matrix(pred_small[keep], truth_small[keep], num_classes)


def score_case(case: EvalCase, pred: np.ndarray, num_classes: int) -> CaseResult:
    """Per-volume metrics of the scored slices (at their canonical z) and the overlay's preview slice."""
    truth, kept = case.truth[case.scored], case.kept[case.scored]
    volume_pred, volume_truth = _case_volumes(pred, truth, kept)
    m = volume_metrics(volume_pred, volume_truth, num_classes, spacing=case.spacing, positions=case.positions)
    foreground = (truth > 0).reshape(len(truth), -1).sum(axis=1)
    if not foreground.any():
        foreground = (pred > 0).reshape(len(pred), -1).sum(axis=1)
    best = int(np.argmax(foreground))
    return CaseResult(case.case_id, len(case.scored), m["dice"], m["iou"], m["hd95"], m["hd95_penalised"],
                      m["true_voxels"], m["pred_voxels"], int(case.scored[best]), pred[best].copy())


def evaluate_split(
    model: nn.Module,
    settings: InferenceSettings,
    dataset: Any,
    split: str,
    points_per_class: int,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    progress: Any | None = None,
    volume: str = "labelled",
    protocol: PromptProtocol | None = None,
) -> Evaluation:
    """Run the slices of `split` and collect pooled and per-volume metrics.

    dataset: a `CareDataset` or `PublishedDataset` (read_case, cases, case_ids). points_per_class = 0
    runs unprompted; otherwise prompts are sampled deterministically (rng=None) from each slice's
    truth at model resolution, built as `protocol` says (default: as the model was trained,
    `settings.protocol()`). `volume`: "labelled" runs and scores the stored slices holding a label; "full"
    runs every stored slice and scores the whole scan (InputError unless every case stores its whole scan);
    both pool only the slices holding a label. `progress`: optional callable(number_of_stored_slices_done).
    """
    protocol = protocol or settings.protocol()
    if volume not in VOLUME_PROTOCOLS:
        raise InputError(f"--volume {volume!r}: expected one of {', '.join(VOLUME_PROTOCOLS)}")
    if volume == "full" and (problem := full_volume_problem(dataset, dataset.case_ids(split))):
        raise InputError(problem)
    device = torch.device(device)
    model = model.to(device).eval()
    num_classes = settings.num_classes
    pooled = np.zeros((num_classes, num_classes), np.int64)
    results: list[CaseResult] = []
    total = 0
    for case_id in dataset.case_ids(split):
        case = read_eval_case(dataset, case_id, num_classes, volume)
        pred = predict_case(model, settings, case, points_per_class, batch_size, device, pooled, progress,
                            protocol)
        if progress is not None and len(case.image) > len(case.scored):
            progress(len(case.image) - len(case.scored))  # stored slices without a label, not run
        results.append(score_case(case, pred, num_classes))
        total += int(case.pooled.sum())
    return Evaluation(split, points_per_class, settings, pooled, results, total, volume, protocol)


# ---------------------------------------------------------------- reporting


def _number(value: float) -> float | None:
    """JSON value: NaN (undefined by the conventions) becomes null."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def _summary(values: list[float]) -> dict[str, Any]:
    """`summarize` with NaN written as null."""
    return {k: _number(v) if isinstance(v, float) else v for k, v in summarize(values).items()}


def _per_volume(evaluation: Evaluation, metric: str) -> dict[str, Any]:
    """Per foreground class, the summary of `metric` over the cases."""
    names = evaluation.settings.class_names
    return {names[c]: _summary([getattr(case, metric)[c] for case in evaluation.cases]) for c in range(1, len(names))}


def _cases_where(evaluation: Evaluation, in_truth: bool, predicted: bool) -> dict[str, int]:
    """Per class, the cases whose truth holds it (or not) and whose prediction holds it (or not)."""
    names = evaluation.settings.class_names
    return {names[c]: sum(1 for case in evaluation.cases
                          if (case.true_voxels[c] > 0) == in_truth and (case.pred_voxels[c] > 0) == predicted)
            for c in range(1, len(names))}


def report(evaluation: Evaluation, model_name: str, provenance: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The JSON report (NaN written as null). `provenance`: from the checkpoint, its training recipe and the split
    its model was selected on (`checkpoint_provenance`)."""
    provenance = dict(provenance or {"recipe": None, "selection_split": "validation"})
    names = evaluation.settings.class_names
    size = evaluation.settings.img_size
    pooled_dice = dice_from_confusion(evaluation.pooled_confusion)
    pooled_iou = iou_from_confusion(evaluation.pooled_confusion)
    _, pooled_pred, pooled_true = overlap_counts(evaluation.pooled_confusion)
    foreground = range(1, len(names))
    undefined_both = _cases_where(evaluation, in_truth=False, predicted=False)
    false_positive_cases = _cases_where(evaluation, in_truth=False, predicted=True)
    missed_cases = _cases_where(evaluation, in_truth=True, predicted=False)
    return {
        "split": evaluation.split,
        "model": model_name,
        "classes": list(names),
        "window_hu": list(evaluation.settings.window),
        "points_per_class": evaluation.points_per_class,
        "prompted": evaluation.points_per_class > 0,
        "prompt_style": evaluation.protocol.style,
        "eval_points": evaluation.protocol.placement,
        "point_order": evaluation.protocol.axis_order,
        "trained_prompt_style": evaluation.settings.prompt_style,
        "trained_point_order": evaluation.settings.point_order,
        **provenance,
        "num_cases": len(evaluation.cases),
        "num_slices": evaluation.num_slices,
        "volume_protocol": evaluation.volume,
        "paper_protocol": {
            "description": PAPER_PROTOCOL.format(size=size),
            "resolution": [size, size],
            "dice": {names[c]: _number(pooled_dice[c]) for c in foreground},
            "iou": {names[c]: _number(pooled_iou[c]) for c in foreground},
            "mean_dice": _number(foreground_mean(pooled_dice)),
            "mean_iou": _number(foreground_mean(pooled_iou)),
            "true_pixels": {names[c]: int(pooled_true[c]) for c in foreground},
            "predicted_pixels": {names[c]: int(pooled_pred[c]) for c in foreground},
        },
        "clinical_protocol": {
            "description": CLINICAL_PROTOCOL[evaluation.volume],
            "volume": evaluation.volume,
            "num_slices": sum(case.num_slices for case in evaluation.cases),
            "dice": _per_volume(evaluation, "dice"),
            "iou": _per_volume(evaluation, "iou"),
            "hd95_mm": _per_volume(evaluation, "hd95"),
            "hd95_mm_penalised": _per_volume(evaluation, "hd95_penalised"),
            "hd95_mm_definitions": HD95_DEFINITIONS,
            "mean_dice": _summary([case.mean_dice for case in evaluation.cases]),
            "mean_iou": _summary([case.mean_iou for case in evaluation.cases]),
            "cases_class_absent_in_truth_and_prediction": undefined_both,
            "cases_class_absent_in_truth_but_predicted": false_positive_cases,
            "cases_class_in_truth_but_not_predicted": missed_cases,
        },
        "cases": [
            {
                "case_id": case.case_id,
                "num_slices": case.num_slices,
                "dice": {names[c]: _number(case.dice[c]) for c in foreground},
                "iou": {names[c]: _number(case.iou[c]) for c in foreground},
                "hd95_mm": {names[c]: _number(case.hd95[c]) for c in foreground},
                "hd95_mm_penalised": {names[c]: _number(case.hd95_penalised[c]) for c in foreground},
                "true_voxels": {names[c]: int(case.true_voxels[c]) for c in foreground},
                "predicted_voxels": {names[c]: int(case.pred_voxels[c]) for c in foreground},
                "mean_dice": _number(case.mean_dice),
                "mean_iou": _number(case.mean_iou),
            }
            for case in evaluation.cases
        ],
    }


def _csv_value(value: Any) -> str:
    if value is None:
        return "NaN"
    if isinstance(value, float):
        return "NaN" if math.isnan(value) else f"{value:.6f}"
    return str(value)


def cases_csv(evaluation: Evaluation) -> str:
    """One row per case: Dice, IoU, HD95 and penalised HD95 (mm) per class, foreground means; NaN = undefined."""
    names = evaluation.settings.class_names
    header = ["case_id", "num_slices"]
    for metric in ("dice", "iou", "hd95_mm", "hd95_mm_penalised"):
        header += [f"{metric}_{names[c].replace(' ', '_')}" for c in range(1, len(names))]
    header += ["mean_dice", "mean_iou"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for case in evaluation.cases:
        row: list[Any] = [case.case_id, case.num_slices]
        for values in (case.dice, case.iou, case.hd95, case.hd95_penalised):
            row += [float(v) for v in values[1:]]
        row += [case.mean_dice, case.mean_iou]
        writer.writerow([_csv_value(v) for v in row])
    return buffer.getvalue()


def summary_csv(summary: Mapping[str, Any]) -> str:
    """Long table: protocol, metric, class, mean, std, n, n_undefined (pooled rows: mean only)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["protocol", "metric", "class", "mean", "std", "n", "n_undefined"])
    paper = summary["paper_protocol"]
    for metric in ("dice", "iou"):
        for name, value in paper[metric].items():
            writer.writerow(["paper_pooled_224", metric, name, _csv_value(value), "", "", ""])
        writer.writerow(["paper_pooled_224", metric, "mean", _csv_value(paper[f"mean_{metric}"]), "", "", ""])
    clinical = summary["clinical_protocol"]
    protocol = f"clinical_per_volume_{clinical['volume']}"
    for metric in ("dice", "iou", "hd95_mm", "hd95_mm_penalised"):
        for name, s in clinical[metric].items():
            writer.writerow([protocol, metric, name, *(_csv_value(s[k]) for k in ("mean", "std", "n", "n_undefined"))])
        if metric in ("dice", "iou"):
            s = clinical[f"mean_{metric}"]
            writer.writerow([protocol, metric, "mean", *(_csv_value(s[k]) for k in ("mean", "std", "n", "n_undefined"))])
    return buffer.getvalue()


def grid_rows(evaluation: Evaluation, dataset: Any) -> list[dict]:
    """Best, median and worst case by per-volume mean Dice (cases with a defined mean only)."""
    ranked = sorted(
        (case for case in evaluation.cases if not math.isnan(case.mean_dice)),
        key=lambda case: (-case.mean_dice, case.case_id),
    )
    if not ranked:
        return []
    picks = [("best", ranked[0]), ("median", ranked[len(ranked) // 2]), ("worst", ranked[-1])]
    rows = []
    for role, case in picks[: min(len(ranked), 3)]:
        image, truth = dataset.read_slice(case.case_id, case.preview_position)
        rows.append({
            "title": f"{role}: {case.case_id}\nmean Dice {case.mean_dice:.3f}, stored slice {case.preview_position}",
            "image": image, "truth": truth, "pred": case.preview_pred,
        })
    return rows


def _value(value: float | None) -> str:
    return "NaN" if value is None else f"{value:.4f}"


def _mean_std(summary: Mapping[str, Any], digits: int) -> str:
    return "NaN" if summary["mean"] is None else f"{summary['mean']:.{digits}f} ± {summary['std']:.{digits}f}"


def checkpoint_provenance(config: Mapping[str, Any]) -> dict[str, Any]:
    """The training recipe of a checkpoint and the split its model was selected on (flagged when the test split)."""
    options = (config.get("training") or {}).get("config") or {}
    split = config.get("selection_split", "validation")
    return {"recipe": options.get("recipe"), "selection_split": split,
            **({"selection_warning": SELECTION_WARNING} if split == "test" else {})}


def print_interaction(section: Mapping[str, Any], class_names: tuple[str, ...], console: Any) -> None:
    """One line per class: Dice after the initial clicks and after the corrections, NoC, the references."""
    for name in class_names[1:]:
        first, last = section["curve"][0]["dice"][name], section["curve"][-1]["dice"][name]
        noc = ", ".join(f"NoC@{tau} {_value(section['noc'][tau][name])}" for tau in section["noc"])
        console.print(f"interaction {name}: Dice {_value(first)} -> {_value(last)} after "
                      f"{len(section['curve']) - 1} correction(s); {noc}; unprompted "
                      f"{_value(section['unprompted']['dice'][name])}, oracle per slice "
                      f"{_value(section['oracle_per_slice']['dice'][name])}", soft_wrap=True, markup=False,
                      highlight=False)


def print_tables(summary: Mapping[str, Any], console: Any) -> None:
    prompt = (f"{summary['points_per_class']} point(s) per class, {summary['prompt_style']} prompts, "
              f"{summary['eval_points']} points, {summary['point_order']}" if summary["prompted"] else "unprompted")
    if summary.get("selection_warning"):
        console.print(f"WARNING: {summary['selection_warning']}", style="bold red", soft_wrap=True)
    paper = summary["paper_protocol"]
    table = Table(title=f"PAPER protocol - {paper['description']} ({summary['num_slices']} slices, {prompt})")
    table.add_column("class")
    table.add_column("Dice", justify="right")
    table.add_column("IoU", justify="right")
    for name in paper["dice"]:
        table.add_row(name, _value(paper["dice"][name]), _value(paper["iou"][name]))
    table.add_row("mean (foreground)", _value(paper["mean_dice"]), _value(paper["mean_iou"]), style="bold")
    console.print(table)

    clinical = summary["clinical_protocol"]
    table = Table(title=f"CLINICAL protocol - {clinical['description']} ({summary['num_cases']} cases, {prompt})")
    for column in ("class", "Dice", "IoU", "HD95 mm", "HD95 mm\npenalised"):
        table.add_column(column, justify="left" if column == "class" else "right", no_wrap=column != "class")
    for name in clinical["dice"]:
        table.add_row(name, _mean_std(clinical["dice"][name], 3), _mean_std(clinical["iou"][name], 3),
                      _mean_std(clinical["hd95_mm"][name], 2), _mean_std(clinical["hd95_mm_penalised"][name], 2))
    table.add_row("mean (fg)", _mean_std(clinical["mean_dice"], 3), _mean_std(clinical["mean_iou"], 3), "", "",
                  style="bold")
    console.print(table)
    counts = Table(title="CLINICAL protocol - cases where a class is absent from the truth or the prediction")
    for column in ("class", "both empty", "missed", "false positive", "HD95 undefined"):
        counts.add_column(column, justify="left" if column == "class" else "right")
    for name in clinical["dice"]:
        counts.add_row(name, str(clinical["cases_class_absent_in_truth_and_prediction"][name]),
                       str(clinical["cases_class_in_truth_but_not_predicted"][name]),
                       str(clinical["cases_class_absent_in_truth_but_predicted"][name]),
                       str(clinical["hd95_mm"][name]["n_undefined"]))
    console.print(counts)
    console.print("mean (fg): over the foreground classes. both empty: class absent in truth and prediction "
                  "(excluded from every mean); missed: in the truth, not predicted (Dice 0); false positive: "
                  "absent in the truth but predicted (Dice 0). "
                  f"{HD95_DEFINITIONS['hd95_mm']} {HD95_DEFINITIONS['hd95_mm_penalised']} See docs/evaluation.md.")
    if summary.get("selection_warning"):
        console.print(f"WARNING: {summary['selection_warning']}", style="bold red", soft_wrap=True)


OUTPUT_FILES = ("metrics.json", "cases.csv", "summary.csv", "cases_grid.png")
CURVE_FILE = "interaction_curve.png"  # with --interaction


def check_output_folder(out: Path, data: Path, checkpoint: Path) -> None:
    """Refuse, before any work, an --out that is a file, lies inside the data or checkpoint folder, or
    cannot be created. InputError, one line."""
    if os.path.lexists(out) and not os.path.isdir(out):
        raise InputError(f"--out {out}: exists and is not a folder")
    target = Path(os.path.abspath(out))
    for what, folder in (("--data", data), ("--checkpoint", checkpoint)):
        if target.is_relative_to(os.path.abspath(folder)):
            raise InputError(f"--out {out}: is inside the {what} folder {folder}; give a folder of its own")
    check_parent_creatable(target.parent, f"--out {out}")  # the files are staged beside it, then moved in
    if os.path.isdir(out):  # into a folder that holds other files they are moved one by one
        check_parent_creatable(out, f"--out {out}")


def render_outputs(folder: Path, evaluation: Evaluation, summary: Mapping[str, Any], dataset: Any) -> None:
    """metrics.json, cases.csv, summary.csv and cases_grid.png (OUTPUT_FILES) into `folder`."""
    (folder / OUTPUT_FILES[0]).write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    (folder / OUTPUT_FILES[1]).write_text(cases_csv(evaluation), encoding="utf-8")
    (folder / OUTPUT_FILES[2]).write_text(summary_csv(summary), encoding="utf-8")
    save_case_grid(grid_rows(evaluation, dataset), evaluation.settings.class_names,
                   evaluation.settings.window, folder / OUTPUT_FILES[3])
    if "interaction" in summary:
        save_interaction_curve(summary["interaction"], evaluation.settings.class_names, folder / CURVE_FILE)


def write_outputs(evaluation: Evaluation, summary: Mapping[str, Any], dataset: Any, out: Path) -> list[Path]:
    """metrics.json, cases.csv, summary.csv, cases_grid.png into `out`, all or nothing
    (`usam.outputs.write_folder_files`: other files already in `out` are kept). Raises InputError, one line."""
    out = Path(out)
    names = OUTPUT_FILES + ((CURVE_FILE,) if "interaction" in summary else ())
    try:
        write_folder_files(out, names, partial(render_outputs, evaluation=evaluation, summary=summary,
                                               dataset=dataset))
    except OSError as error:
        raise InputError(f"--out {out}: could not write ({error_reason(error)})") from None
    return [out / name for name in names]


# ---------------------------------------------------------------- command line


def default_out_name(split: str, points: int, volume: str) -> str:
    """``eval_<split>_points<k>``, with ``_full`` for whole-scan per-volume scores."""
    return f"eval_{split}_points{points}" + ("_full" if volume == "full" else "")


def evaluation_protocol(args: argparse.Namespace, settings: InferenceSettings, k: int) -> PromptProtocol:
    """The prompt protocol of `usam eval`: --prompt-style, --eval-points, --point-order, else --recipe's, else
    the checkpoint's. A style or axis order other than the model was trained with is refused unless
    --allow-prompt-mismatch; InputError, one line."""
    preset = {}
    if getattr(args, "recipe", None):
        preset = recipe_options(args.recipe)
    chosen = {name: getattr(args, name, None) or preset.get(name) or getattr(settings, name)
              for name in ("prompt_style", "eval_points", "point_order")}
    protocol = PromptProtocol(chosen["prompt_style"], chosen["eval_points"], chosen["point_order"])
    try:
        protocol.check(k)
    except ValueError as error:
        raise InputError(f"--points {k}: {error}") from None
    if k and protocol.style == "released" and k != settings.points_per_class:
        raise InputError(f"--points {k}: prompt style released fills every slot; use 0 or this model's "
                         f"{settings.points_per_class}")
    trained = (settings.prompt_style, settings.point_order)
    if k and (protocol.style, protocol.axis_order) != trained and not getattr(args, "allow_prompt_mismatch", False):
        raise InputError(f"the checkpoint was trained with prompt style {trained[0]} and point order {trained[1]}, "
                         f"not {protocol.style} and {protocol.axis_order}; add --allow-prompt-mismatch to evaluate "
                         "it so anyway")
    return protocol


def volume_means(evaluation: Evaluation) -> dict[str, Any]:
    """Mean per-volume Dice and HD95 (mm) per class over the cases: the interaction section's reference figures."""
    names = evaluation.settings.class_names
    return {metric: {names[c]: _number(_per_volume(evaluation, key)[names[c]]["mean"]) for c in range(1, len(names))}
            for metric, key in (("dice", "dice"), ("hd95_mm", "hd95"))}


def interaction_section(interaction: Any, evaluation: Evaluation, model: nn.Module, dataset: Any,
                        args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """--interaction: the simulated user's section beside the unprompted and oracle-per-slice figures on the same
    cases (the oracle: every slice prompted from its truth with the model's points per class)."""
    settings = evaluation.settings
    runs = {}
    for name, k in (("unprompted", 0), ("oracle_per_slice", settings.points_per_class)):
        same = evaluation.points_per_class == k and evaluation.protocol == settings.protocol()
        runs[name] = evaluation if same else evaluate_split(model, settings, dataset, args.split, k,
                                                            args.batch_size, device, volume=args.volume)
    section = interaction.run(model, settings, dataset, args.split, args.batch_size, device, args.volume)
    return {**section, **{name: volume_means(run) for name, run in runs.items()}}


def run_eval(args: argparse.Namespace, interaction: Any | None = None) -> int:
    """`usam eval`; returns the exit status (0 ok, 2 bad input). `interaction`: a simulated user
    (`usam.simulate.InteractionProtocol`, from --interaction) whose section metrics.json gains."""
    console = Console()
    try:
        if args.batch_size < 1:
            raise InputError(f"--batch-size must be >= 1, got {args.batch_size}")
        device = choose_device(args.device)
        dataset = open_eval_data(args.data)
        try:
            case_ids = dataset.case_ids(args.split)
        except KeyError as error:
            raise InputError(f"--data {args.data}: {error.args[0]}") from None
        if not case_ids:
            raise InputError(f"--data {args.data}: split {args.split!r} has no cases")
        if args.volume == "full" and (problem := full_volume_problem(dataset, case_ids)):
            raise InputError(problem)
        try:
            model, config = load_checkpoint(args.checkpoint, map_location="cpu")
        except (ValueError, FileNotFoundError) as error:
            raise InputError(str(error)) from None
        if config_value(config, "class_names", "classes") is None:
            config = {**config, "class_names": dataset.class_names}
        settings = inference_settings(config)
        if settings.num_classes != dataset.num_classes:
            raise InputError(
                f"checkpoint has {settings.num_classes} classes {list(settings.class_names)}, the data "
                f"{dataset.num_classes} {dataset.class_names}"
            )
        k = settings.points_per_class if args.points is None else args.points
        if k < 0 or k > settings.points_per_class:
            raise InputError(
                f"--points {k}: this model has {settings.points_per_class} prompt slot(s) per class "
                f"(use 0..{settings.points_per_class})"
            )
        protocol = evaluation_protocol(args, settings, k)
        if interaction is not None:
            try:
                interaction.check(settings.points_per_class)
            except ValueError as error:
                raise InputError(str(error)) from None
        out = Path(args.out) if args.out else Path(args.checkpoint).resolve().parent / default_out_name(args.split, k,
                                                                                                       args.volume)
        check_output_folder(out, Path(args.data), Path(args.checkpoint))
    except InputError as error:
        print(f"usam eval: {error}", file=sys.stderr)
        return 2

    total = sum(int(dataset.cases[c]["num_slices"]) for c in case_ids)
    with Progress(TextColumn("[bold]eval[/bold] {task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=console, transient=True) as bar:
        task = bar.add_task(f"{args.split} on {device.type}", total=total)
        try:
            evaluation = evaluate_split(model, settings, dataset, args.split, k, args.batch_size, device,
                                        progress=lambda n: bar.advance(task, n), volume=args.volume,
                                        protocol=protocol)
        except InputError as error:
            print(f"usam eval: {error}", file=sys.stderr)
            return 2
    summary = report(evaluation, str(config["model"].get("name", "model")), checkpoint_provenance(config))
    if interaction is not None:
        summary["interaction"] = interaction_section(interaction, evaluation, model, dataset, args, device)
        print_interaction(summary["interaction"], settings.class_names, console)
    print_tables(summary, console)
    try:
        written = write_outputs(evaluation, summary, dataset, out)
    except InputError as error:
        print(f"usam eval: {error}", file=sys.stderr)
        return 2
    console.print(f"wrote {', '.join(str(p) for p in written)}", soft_wrap=True, markup=False, highlight=False)
    return 0
