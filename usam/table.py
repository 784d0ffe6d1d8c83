"""``usam table``: train and evaluate several systems alike, then the seed paper's comparison table.

Every system is trained by ``usam fit``'s `train` (same data, split, validation carve, recipe and seed
list) into ``<out>/runs/<system>/seed<k>``, then its best checkpoint is evaluated by ``usam eval``'s
`run_eval` on the test split into ``.../eval_test_points<p>``. A finished run is not trained again, an
interrupted one is resumed (``--resume``), an evaluation newer than its checkpoint is kept. Results:
``table.md`` and ``table.csv`` (mean and std over seeds beside the paper's figures, in %) and
``table.png`` (mean Dice per row). The paper's figures: ``usam/paper_tables.toml``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import os
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from care_dataset.files import write_text_atomic
from usam import evaluate
from usam.config import (
    RESUMABLE_CHANGES,
    TrainConfig,
    build_config,
    read_toml,
    tomllib,
)
from usam.models.checkpoints import read_checkpoint_config
from usam.models.prompted import PromptedSegmenter
from usam.models.registry import list_models, model_class
from usam.overlays import save_png
from usam.train import CONFIG_FILE, RUN_FILE, TRAIN_STATE_FILE, read_run_record, train

PAPER_TABLES = Path(__file__).with_name("paper_tables.toml")
TABLE_FILES = ("table.md", "table.csv", "table.png")
SPLIT = "test"


@dataclass(frozen=True)
class Row:
    """One row of the table: a system evaluated with `points` prompts per class, and the paper's figures."""

    label: str  # the paper's method name, or the system's name
    system: str
    points: int
    paper: dict[str, Any] | None  # the paper's row (dice, iou lists per class; mean_dice, mean_iou), in %


@dataclass
class Plan:
    """What ``--systems`` resolves to."""

    table: str  # the paper table whose figures stand beside ours
    classes: list[str]  # that table's classes
    rows: list[Row]
    unavailable: list[str]  # paper rows whose system this build does not register

    @property
    def systems(self) -> list[str]:
        return list(dict.fromkeys(row.system for row in self.rows))


def paper_tables() -> dict[str, Any]:
    with open(PAPER_TABLES, "rb") as f:
        return tomllib.load(f)


def plan_rows(systems: str) -> Plan:
    """``table2`` / ``table3``: the paper table's rows; ``all``: every registered model; else comma-separated
    names. A name in a paper table gets that table's rows (Table 2's, unless ``table3``), any other one row."""
    tables, available = paper_tables(), list_models()
    name = "table3" if systems == "table3" else "table2"
    table = tables[name]
    if systems in ("table2", "table3"):
        wanted = list(dict.fromkeys(row["system"] for row in table["rows"]))
    elif systems == "all":
        wanted = available
    else:
        wanted = [s.strip() for s in systems.split(",") if s.strip()]
        known = set(available) | {row["system"] for t in tables.values() for row in t["rows"]}
        unknown = [s for s in wanted if s not in known]
        if unknown or not wanted:
            raise ValueError(f"--systems: unknown system {', '.join(unknown) or '(none given)'}; give table2, table3, "
                             f"all or names from: {', '.join(available)}")
    rows, unavailable = [], []
    for system in wanted:
        paper_rows = [row for row in table["rows"] if row["system"] == system]
        if system not in available:
            unavailable += [f"{row['name']} ({system})" for row in paper_rows] or [system]
            continue
        rows += [Row(row["name"], system, int(row["points"]), row) for row in paper_rows] or \
            [Row(system, system, 0, None)]
    return Plan(name, list(table["classes"]), rows, unavailable)


def takes_prompts(system: str) -> bool:
    """True for the SAM-style models with point prompts."""
    return issubclass(model_class(system), PromptedSegmenter)


# ---------------------------------------------------------------- training


def fit_options(args: argparse.Namespace, system: str, seed: int, prompted: dict[str, bool]) -> dict[str, Any]:
    """The ``usam fit`` options of one system and seed (besides the ``--config`` file's); a system without
    prompts (`prompted`: system -> `takes_prompts`) trains with ``--points 0``."""
    options: dict[str, Any] = {"data": str(Path(args.data).resolve()), "model": system, "seed": seed,
                               "out": str(run_folder(args.out, system, seed).resolve())}
    if not prompted[system]:
        options["points"] = 0
    options["recipe"] = args.recipe  # every system trains with the same recipe
    for key in ("max_steps", "batch_size", "device"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    for key, given in (("sam_checkpoint", args.sam_checkpoints), ("pretrained", args.pretrained)):
        for name, path in given:
            if name == system:
                options[key] = str(Path(path).resolve())
    model_args = {key: value for name, key, value in args.model_args if name == system}
    if model_args:
        options["model_args"] = model_args
    return options


def run_folder(out: str | os.PathLike, system: str, seed: int) -> Path:
    return Path(out) / "runs" / system / f"seed{seed}"


def fit_config(args: argparse.Namespace, options: dict[str, Any]) -> TrainConfig:
    """``--config`` file < the table's options, as ``usam fit --config FILE --OPTION ...`` resolves them."""
    return build_config(read_toml(args.config) if args.config else {}, options)


def fit_command(args: argparse.Namespace, options: dict[str, Any], resume: bool) -> str:
    """The shell command that trains one system and seed (``torchrun`` with ``--nproc-per-node`` > 1)."""
    command = ["usam", "fit"] if args.nproc_per_node == 1 else \
        ["torchrun", "--nproc_per_node", str(args.nproc_per_node), "-m", "usam.cli", "fit"]
    if args.config:
        command += ["--config", args.config]
    for key, value in options.items():
        if key == "model_args":
            for name, arg in value.items():
                command += ["--model-arg", f"{name}={_toml_text(arg)}"]
        else:
            command += ["--" + key.replace("_", "-"), str(value)]
    return shlex.join(command + (["--resume"] if resume else []))


def _toml_text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_toml_text(v) for v in value) + "]"
    return str(value).lower() if isinstance(value, bool) else str(value)


def run_state(config: TrainConfig) -> str:
    """"new" (no checkpoint yet), "finished" (trained to the planned step) or "unfinished" (resume it).

    A finished run trained with other options (besides those a resume may change) is refused."""
    out = Path(config.out)
    if not (out / "last" / TRAIN_STATE_FILE).is_file() or not (out / CONFIG_FILE).is_file():
        return "new"
    saved = read_toml(out / CONFIG_FILE)
    current = config.with_absolute_paths().to_dict()
    changed = sorted(k for k, v in saved.items() if k not in RESUMABLE_CHANGES and current.get(k) != v)
    if changed:
        raise ValueError(f"run folder {out} was trained with other options ({', '.join(changed)}); "
                         "give another --out or remove it")
    record = read_run_record(out / RUN_FILE) or {}
    step = read_checkpoint_config(out / "last")["training"]["step"]
    same_plan = saved.get("max_steps") == config.max_steps and saved.get("epochs") == config.epochs
    return "finished" if same_plan and step >= record.get("total_steps", math.inf) else "unfinished"


def train_system(config: TrainConfig) -> str:
    """Train (or resume, or leave) one run; returns what was done."""
    state = run_state(config)
    if state == "finished":
        return "finished earlier, not trained"
    resumed = state == "unfinished"
    result = train(build_config(config.to_dict(), {"resume": resumed}))
    return f"{'resumed, ' if resumed else ''}trained to step {result['step']}"


# ---------------------------------------------------------------- evaluation


def eval_folder(run: Path, points: int) -> Path:
    return run / f"eval_{SPLIT}_points{points}"


def evaluate_row(args: argparse.Namespace, run: Path, points: int,
                 parse_eval_args: Callable[[list[str]], argparse.Namespace]) -> str:
    """``usam eval`` of the run's best checkpoint with `points` prompts per class, unless one newer than the
    checkpoint is there; its printout goes to eval.log in the evaluation folder. `parse_eval_args` is usam
    eval's own parser, so every option it does not set takes usam eval's default."""
    out, best = eval_folder(run, points), run / "best"
    metrics = out / evaluate.OUTPUT_FILES[0]
    if metrics.is_file() and metrics.stat().st_mtime >= (best / "model.safetensors").stat().st_mtime:
        return "evaluated earlier"
    eval_args = parse_eval_args(["--data", str(args.data), "--checkpoint", str(best), "--split", SPLIT,
                                 "--points", str(points), "--batch-size", str(args.eval_batch_size),
                                 "--device", args.device or "auto", "--out", str(out)])
    printed, errors = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(errors):
        code = evaluate.run_eval(eval_args)
    if code != 0:
        message = errors.getvalue().strip().removeprefix("usam eval: ")
        raise ValueError(f"evaluating {best}: {message}")
    write_text_atomic(out / "eval.log", printed.getvalue())
    return "evaluated"


# ---------------------------------------------------------------- the table


def row_values(metrics: dict[str, Any]) -> dict[str, float]:
    """One evaluation's figures for the table, in % (HD95 in mm): pooled Dice and IoU per class and mean,
    per-volume mean Dice, penalised HD95 averaged over the foreground classes."""
    paper, clinical = metrics["paper_protocol"], metrics["clinical_protocol"]
    values = {}
    for name in paper["dice"]:
        values[f"dice:{name}"] = _percent(paper["dice"][name])
        values[f"iou:{name}"] = _percent(paper["iou"][name])
    values["mean_dice"] = _percent(paper["mean_dice"])
    values["mean_iou"] = _percent(paper["mean_iou"])
    values["volume_dice"] = _percent(clinical["mean_dice"]["mean"])
    hd95 = [s["mean"] for s in clinical["hd95_mm_penalised"].values() if s["mean"] is not None]
    values["hd95_mm"] = float(np.mean(hd95)) if hd95 else math.nan
    return values


def _percent(value: float | None) -> float:
    return math.nan if value is None else 100.0 * value


@dataclass
class Result:
    row: Row
    seeds: int
    mean: dict[str, float]
    std: dict[str, float]


def collect(args: argparse.Namespace, plan: Plan, seeds: list[int]) -> list[Result]:
    results = []
    for row in plan.rows:
        per_seed = [row_values(_read_json(eval_folder(run_folder(args.out, row.system, s), row.points)
                                          / evaluate.OUTPUT_FILES[0])) for s in seeds]
        keys = per_seed[0].keys()
        stack = {k: np.array([v[k] for v in per_seed], dtype=float) for k in keys}
        results.append(Result(row, len(seeds), {k: float(np.mean(a)) for k, a in stack.items()},
                              {k: float(np.std(a, ddof=1)) if len(a) > 1 else 0.0 for k, a in stack.items()}))
    return results


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def columns(results: list[Result], plan: Plan) -> list[tuple[str, str, Any]]:
    """(header, our key, the paper's figure getter) per metric column; our classes, in label order."""
    classes = [k.split(":", 1)[1] for k in results[0].mean if k.startswith("dice:")]
    matched = len(classes) == len(plan.classes)  # the paper's classes line up with ours by position
    cols = []
    for i, name in enumerate(classes):
        for metric in ("dice", "iou"):
            cols.append((f"{name} {'Dice' if metric == 'dice' else 'IoU'}", f"{metric}:{name}",
                         (lambda p, m=metric, i=i: p[m][i] if m in p else None) if matched else None))
    cols.append(("mean Dice", "mean_dice", lambda p: p.get("mean_dice")))
    cols.append(("mean IoU", "mean_iou", lambda p: p.get("mean_iou")))
    return cols


def _cell(mean: float, std: float, seeds: int, digits: int = 2) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if seeds > 1 else f"{mean:.{digits}f}"


def table_markdown(results: list[Result], plan: Plan, args: argparse.Namespace, seeds: list[int]) -> str:
    cols = columns(results, plan)
    header = ["method", "system", "points"]
    for title, _, _ in cols:
        header += [title, "(paper)"]
    header += ["per-volume Dice", "HD95 mm"]
    lines = [
        f"# Comparison on the {SPLIT} split of {Path(args.data).name}",
        "",
        f"Recipe `{args.recipe}`, seeds {', '.join(map(str, seeds))}"
        + (f", at most {args.max_steps} steps" if args.max_steps else "") + ". Ours: mean"
        + (" ± std over seeds" if len(seeds) > 1 else "") + f", in %; Dice and IoU pooled over every slice at the "
        f"model's input size (the paper's protocol); per-volume Dice: mean over cases of the foreground mean; HD95: "
        f"penalised 95th-percentile surface distance (mm), mean over cases and foreground classes. (paper): the "
        f"seed paper's {plan.table.replace('table', 'Table ')} ({paper_tables()[plan.table]['dataset']}).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * 3 + "---:|" * (len(header) - 3),
    ]
    for r in results:
        cells = [r.row.label, f"`{r.row.system}`", str(r.row.points)]
        for _, key, paper in cols:
            figure = paper(r.row.paper) if (paper and r.row.paper) else None
            cells += [_cell(r.mean[key], r.std[key], r.seeds), "—" if figure is None else f"{figure:.2f}"]
        cells += [_cell(r.mean["volume_dice"], r.std["volume_dice"], r.seeds),
                  _cell(r.mean["hd95_mm"], r.std["hd95_mm"], r.seeds, 1)]
        lines.append("| " + " | ".join(cells) + " |")
    if plan.unavailable:
        lines += ["", "Not available in this build: " + ", ".join(plan.unavailable) + "."]
    return "\n".join(lines) + "\n"


def table_csv(results: list[Result], plan: Plan) -> str:
    """Long form: one line per row and metric, with the paper's figure where it has one."""
    cols = {key: paper for _, key, paper in columns(results, plan)}
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["table", "method", "system", "points", "metric", "mean", "std", "seeds", "paper"])
    for r in results:
        for key, mean in r.mean.items():
            paper = cols.get(key)
            figure = paper(r.row.paper) if (paper and r.row.paper) else None
            writer.writerow([plan.table, r.row.label, r.row.system, r.row.points, key,
                             "NaN" if math.isnan(mean) else f"{mean:.4f}", f"{r.std[key]:.4f}", r.seeds,
                             "" if figure is None else f"{figure:.2f}"])
    return buffer.getvalue()


def save_chart(results: list[Result], path: Path) -> None:
    """Mean Dice per row: ours (error bar: std over seeds) beside the paper's."""
    fig = Figure(figsize=(max(6.0, 0.9 * len(results) + 2), 4.5))
    ax = fig.subplots()
    x = np.arange(len(results))
    ours = [0.0 if math.isnan(r.mean["mean_dice"]) else r.mean["mean_dice"] for r in results]
    ax.bar(x - 0.2, ours, 0.4, yerr=[r.std["mean_dice"] for r in results], capsize=3, label="ours")
    paper = [r.row.paper.get("mean_dice", 0.0) if r.row.paper else 0.0 for r in results]
    ax.bar(x + 0.2, paper, 0.4, label="paper")
    ax.set_xticks(x, [r.row.label for r in results], rotation=30, ha="right")
    ax.set_ylabel("mean foreground Dice (%)")
    ax.set_ylim(0, 100)
    ax.legend()
    fig.tight_layout()
    save_png(fig, path)


# ---------------------------------------------------------------- command line


def run_table(args: argparse.Namespace, parse_eval_args: Callable[[list[str]], argparse.Namespace]) -> int:
    """`usam table`; raises ValueError (one line) for a user error. `parse_eval_args`: see `evaluate_row`."""
    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    plan = plan_rows(args.systems)
    for missing in plan.unavailable:
        print(f"{missing}: not available in this build")
    if not plan.rows:
        raise ValueError(f"--systems {args.systems}: none of its systems is available in this build")
    seeds = list(range(args.seeds))
    prompted = {system: takes_prompts(system) for system in plan.systems}
    configs = {(s, k): fit_options(args, s, k, prompted) for s in plan.systems for k in seeds}
    if args.dry_run:
        for (system, seed), options in configs.items():
            config = fit_config(args, options)
            print(fit_command(args, options, resume=run_state(config) == "unfinished"))
        print("# when they have run: the same usam table command without --dry-run evaluates and writes the table")
        return 0
    for (system, seed), options in configs.items():
        print(f"{system} seed {seed}: {train_system(fit_config(args, options))}", flush=True)
    for row in plan.rows:
        for seed in seeds:
            done = evaluate_row(args, run_folder(args.out, row.system, seed), row.points, parse_eval_args)
            print(f"{row.label} ({row.system}, {row.points} points) seed {seed}: {done}", flush=True)
    results = collect(args, plan, seeds)
    out = Path(args.out)
    write_text_atomic(out / TABLE_FILES[0], table_markdown(results, plan, args, seeds))
    write_text_atomic(out / TABLE_FILES[1], table_csv(results, plan))
    save_chart(results, out / TABLE_FILES[2])
    print(f"wrote {', '.join(str(out / name) for name in TABLE_FILES)}")
    sys.stdout.flush()
    return 0
