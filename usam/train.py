"""``usam fit``: train a segmentation model on CARE slices, one readable loop (nanoGPT style).

Single process: ``usam fit --data out/ --model usam_b --out runs/x``.
Several GPUs: ``torchrun --nproc_per_node 8 -m usam.cli fit ...`` (DDP; gloo on CPU, NCCL on CUDA).

Run folder: config.toml (the exact resolved options), run.json (data checksum, versions, git
commit), log.jsonl, curves.png, last/ and best/ (model.safetensors + config.json, as
``usam.models.checkpoints.save_checkpoint`` writes them; last/ also holds train_state.pt).

`train` reads top to bottom: `set_up` (every check, model, data, optimizer), `prepare_run_folder`,
`restore_train_state` (--resume), then per step `training_step`, a log line from the `LogWindow`,
`validate_and_keep_best` and `save` as `due_after_step` says.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from matplotlib.figure import Figure
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeRemainingColumn
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset

from care_dataset.files import creation_problem, write_text_atomic
from care_dataset.format.published import manifest_path, open_any
from care_dataset.format.splits import carve_validation
from usam.config import RESUMABLE_CHANGES, SELECTION_WARNING, TrainConfig, read_toml, to_toml
from usam.data import MODEL_SIZE, Augmentation, EpochSampler, SliceDataset, slices_with_class
from usam.inference import choose_device, class_argmax
from usam.metrics import confusion_tensor, dice_from_confusion, foreground_mean
from usam.models.checkpoints import load_weights, read_checkpoint_config, recover_checkpoint, save_checkpoint
from usam.models.registry import create_model, list_models, takes_option
from usam.overlays import save_png

TRAIN_STATE_FILE = "train_state.pt"
LOG_FILE = "log.jsonl"
CURVES_FILE = "curves.png"
CONFIG_FILE = "config.toml"
RUN_FILE = "run.json"


def train(config: TrainConfig, *, stop_after: int | None = None) -> dict[str, Any]:
    """Run (or resume) training as ``config`` says; returns the final metrics.

    ``stop_after``: leave after this many steps of this call (the checkpoint in last/ is saved),
    as an interruption would; ``--resume`` continues from there.
    """
    run = set_up(config)
    prepare_run_folder(run)
    if run.resume_state is not None:
        restore_train_state(run)
    place_on_device(run)
    loader, val_loader = make_loaders(run)
    train_model = wrap_for_training(run)
    progress = Progress(run.ddp.main, run.plan.total_steps, run.position.step, run.plan.input_size)
    run.model.train()
    window = LogWindow(run.num_classes, run.device)
    last_validation: dict[str, Any] = {}
    steps_this_call = 0
    stopping = run.position.step >= run.plan.total_steps
    while not stopping:
        batches = epoch_batches(run, loader)
        for _ in range(run.plan.steps_per_epoch - run.position.step_in_epoch):
            wait_start = time.perf_counter()
            images, points, labels, target = batch_to_device(next(batches), run)
            window.data_wait += time.perf_counter() - wait_start
            logits, losses, used_lr = training_step(run, train_model, images, points, labels, target)
            steps_this_call += 1
            window.add(logits, target, losses)
            due = due_after_step(run, steps_this_call, stop_after)
            if due.log:
                record = window.close(run, used_lr)
                log(run, record)
                progress.update(run.position.step, record)
            pause_start = time.perf_counter()  # validation and checkpoints are not training throughput
            if due.validate and len(run.plan.val_set):
                last_validation = validate_and_keep_best(run, val_loader, progress)
            if due.end_of_epoch:
                run.position.epoch += 1
                run.position.step_in_epoch = 0
            if due.checkpoint:
                save_last(run, last_validation or None)
            window.start += time.perf_counter() - pause_start
            stopping = due.stopping
            if stopping:
                break
    progress.close()
    sync_buffers(run.model, run.ddp)
    if not len(run.plan.val_set) and run.ddp.main and run.position.step >= run.plan.total_steps:
        save(run, "best", None)  # no validation subset: best is the last
    best = run.position.best_dice
    return {"step": run.position.step, "epoch": run.position.epoch, "best_mean_dice": best if best >= 0 else None,
            "last_validation": last_validation, "out": str(run.out), "model": run.model}


# --------------------------------------------------------------------------------------------
# Setting up and resuming
# --------------------------------------------------------------------------------------------


@dataclass
class Position:
    """Where training stands; saved in last/train_state.pt and restored by --resume."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    best_dice: float = -1.0  # the best validation mean foreground Dice so far (-1: none yet)


@dataclass
class TrainingRun:
    """What the steps of one run share."""

    config: TrainConfig
    ddp: Dist
    device: torch.device
    data: TrainingData
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    plan: BatchPlan
    resume_state: dict[str, Any] | None  # the saved train state with --resume
    position: Position = field(default_factory=Position)
    class_weights: torch.Tensor | None = None  # cross-entropy weights on the device (`place_on_device`)

    @property
    def out(self) -> Path:
        return Path(self.config.out)

    @property
    def num_classes(self) -> int:
        return len(self.data.class_names)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


def set_up(config: TrainConfig) -> TrainingRun:
    """Every check, then model, data plan and optimizer; the process group is joined last, so that every user
    error is raised before any work starts and alike on every rank (rank 0 alone reports it)."""
    config.validate()
    config = config.with_absolute_paths()
    ddp = distributed_from_env()
    device = training_device(config, ddp)
    if config.batch_scope == "global" and config.batch_size % ddp.world_size:
        raise ValueError(f"--batch-size {config.batch_size} must be divisible by the {ddp.world_size} processes "
                         f"(or give the batch per process: --batch-per-device)")
    if config.sync_bn and ddp.enabled and device.type != "cuda":
        raise ValueError("--sync-bn needs CUDA (PyTorch's SyncBatchNorm runs on GPUs only); run without it on CPU")
    data = open_training_data(config)
    num_classes = len(data.class_names)
    if config.class_weights and len(config.class_weights) != num_classes:
        raise ValueError(f"--class-weights needs {num_classes} values (one per class, background first), "
                         f"got {len(config.class_weights)}")
    resume_state = resolve_resume(config, data, ddp.world_size)
    torch.manual_seed(config.seed)
    # on resume the weights come from last/: the SAM checkpoint the run started from is not read again
    model = build_model(config if resume_state is None else replace(config, sam_checkpoint="", pretrained=""),
                        num_classes)
    if config.deterministic:
        torch.use_deterministic_algorithms(True)
    plan = plan_batches(config, data, model, ddp)
    optimizer, scheduler = build_optimizer(config, model, plan.total_steps)  # torch's own checks come here
    join_process_group(ddp, device)
    return TrainingRun(config, ddp, device, data, model, optimizer, scheduler, plan, resume_state)


def restore_train_state(run: TrainingRun) -> None:
    """--resume: weights, optimizer, schedule, position and RNG as last/ saved them."""
    state = run.resume_state
    load_weights(run.model, run.out / "last")
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.position = Position(state["step"], state["epoch"], state["step_in_epoch"], state["best_dice"])
    torch.set_rng_state(state["torch_rng"])
    if run.is_cuda and len(state.get("cuda_rng", [])) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    if run.ddp.main:
        keep_log_until(run.out / LOG_FILE, run.position.step)


def place_on_device(run: TrainingRun) -> None:
    """Model, optimizer state and class weights on the run's device (channels_last on CUDA where asked)."""
    if run.is_cuda:  # every step has the same shapes: let cuDNN time its convolution algorithms once
        torch.backends.cudnn.benchmark = not run.config.deterministic
    run.model.to(run.device)
    if run.is_cuda and run.config.channels_last:
        run.model.to(memory_format=torch.channels_last)
    for state in run.optimizer.state.values():  # optimizer state loaded on CPU follows the model
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and key != "step":
                state[key] = value.to(run.device)
    if run.config.class_weights:
        run.class_weights = torch.tensor(run.config.class_weights, device=run.device)


def make_loaders(run: TrainingRun) -> tuple[DataLoader, DataLoader]:
    """The training loader (this rank's epoch sampler) and this rank's share of the validation slices."""
    config, plan, is_cuda = run.config, run.plan, run.is_cuda
    workers = config.workers if config.workers >= 0 else min(8, (os.cpu_count() or 1) // run.ddp.world_size)
    # the loader draws its workers' base seed from its own generator, not from the global RNG the model uses,
    # so that a resumed run's global RNG follows the uninterrupted run's exactly
    loader = DataLoader(
        plan.train_set, batch_size=plan.rank_batch, sampler=plan.sampler, drop_last=True, num_workers=workers,
        generator=torch.Generator().manual_seed(config.seed),
        pin_memory=is_cuda, persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
    )
    val_loader = DataLoader(
        Subset(plan.val_set, list(range(run.ddp.rank, len(plan.val_set), run.ddp.world_size))),
        batch_size=plan.rank_batch, shuffle=False, num_workers=min(workers, 2), pin_memory=is_cuda,
        generator=torch.Generator().manual_seed(config.seed),
    )
    return loader, val_loader


def wrap_for_training(run: TrainingRun) -> nn.Module:
    """The model the training steps call: DDP over the processes (BatchNorm synchronised across them with
    --sync-bn), torch.compile where asked."""
    if run.config.sync_bn and run.ddp.enabled:  # the same parameters and buffers, in SyncBatchNorm modules
        run.model = nn.SyncBatchNorm.convert_sync_batchnorm(run.model)
    train_model = run.model
    if run.ddp.enabled:
        probe = next(iter(DataLoader(run.plan.train_set, batch_size=1, generator=torch.Generator())))
        train_model = DistributedDataParallel(
            run.model, device_ids=[run.device.index] if run.is_cuda else None,
            find_unused_parameters=unused_parameters(run.model, probe, run.device))
    if run.config.compile:
        train_model = torch.compile(train_model)
    return train_model


@dataclass
class BatchPlan:
    """The training and validation slices and how training cuts them into batches and steps."""

    train_set: SliceDataset
    val_set: SliceDataset
    sampler: EpochSampler
    rank_batch: int  # this process's batch: its share of the global batch, or the batch itself (per_device)
    steps_per_epoch: int
    total_steps: int  # the length of the learning-rate schedule
    input_size: int


def plan_batches(config: TrainConfig, data: TrainingData, model: nn.Module, ddp: Dist) -> BatchPlan:
    """Datasets at the model's input size, the epoch sampler of this rank, steps per epoch and in all."""
    augment = Augmentation(config.flip_prob, config.max_rotation_deg, config.small_rotation_prob) \
        if config.augment else None
    input_size = int(model.config.get("img_size", MODEL_SIZE))
    common = dict(num_classes=len(data.class_names), points_per_class=config.points, window=tuple(config.window),
                  size=input_size, protocol=config.prompt_protocol(), clahe=config.clahe, kernel=config.resize)
    train_set = SliceDataset(data.source, data.train_ids, augment=augment, random_points=True, seed=config.seed,
                             negative_points=config.negative_points, neighbour_prompts=config.neighbour_prompts,
                             prompt_dropout=config.prompt_dropout, **common)
    val_set = SliceDataset(data.source, data.val_ids, augment=None, **common)
    rank_batch = config.batch_size if config.batch_scope == "per_device" else config.batch_size // ddp.world_size
    class_slices = slices_with_class(train_set) if config.class_balance > 0 else None
    sampler = EpochSampler(train_set, num_replicas=ddp.world_size, rank=ddp.rank, shuffle=True, seed=config.seed,
                           class_slices=class_slices, balance=config.class_balance)
    steps_per_epoch = sampler.num_samples // rank_batch
    if steps_per_epoch == 0:
        raise ValueError(f"--batch-size {config.batch_size} is larger than the {len(train_set)} training slices"
                         + (f" ({sampler.num_samples} per process)" if ddp.enabled else ""))
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    return BatchPlan(train_set, val_set, sampler, rank_batch, steps_per_epoch, total_steps, input_size)


# --------------------------------------------------------------------------------------------
# Training steps
# --------------------------------------------------------------------------------------------


def epoch_batches(run: TrainingRun, loader: DataLoader) -> Iterator[dict[str, torch.Tensor]]:
    """The batches of the current epoch, from the run's position in it on."""
    run.plan.sampler.set_epoch(run.position.epoch)
    run.plan.sampler.start = run.position.step_in_epoch * run.plan.rank_batch
    return iter(loader)


def autocast(run: TrainingRun) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA with --amp, else nothing."""
    if run.is_cuda and run.config.amp:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def batch_to_device(batch: dict[str, torch.Tensor], run: TrainingRun) -> tuple[torch.Tensor | None, ...]:
    """(images, points, point labels, target) on the run's device; no points when the run uses none."""
    device = run.device
    images = batch["image"].to(device, non_blocking=True)
    if run.is_cuda and run.config.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    points = batch["points"].to(device, non_blocking=True) if run.config.points else None
    labels = batch["point_labels"].to(device, non_blocking=True) if run.config.points else None
    return images, points, labels, batch["label"].to(device, non_blocking=True).long()


def training_step(run: TrainingRun, train_model: nn.Module, images: torch.Tensor, points: torch.Tensor | None,
                  labels: torch.Tensor | None, target: torch.Tensor) -> tuple[torch.Tensor, tuple, dict[str, float]]:
    """One optimiser step on one batch, the schedule and the run's position one step on.

    Returns the logits, the loss terms (`loss_terms`) and the learning rate of each group this step used.
    """
    with autocast(run):
        logits = train_model(images, points, labels)
    losses = loss_terms(logits, target, run)
    run.optimizer.zero_grad(set_to_none=True)
    losses[0].backward()
    run.optimizer.step()
    used_lr = {group["name"]: group["lr"] for group in run.optimizer.param_groups}
    run.scheduler.step()
    run.position.step += 1
    run.position.step_in_epoch += 1
    return logits, losses, used_lr


@dataclass(frozen=True)
class Due:
    """What follows the step just taken."""

    end_of_epoch: bool
    stopping: bool
    validate: bool
    checkpoint: bool
    log: bool


def due_after_step(run: TrainingRun, steps_this_call: int, stop_after: int | None) -> Due:
    """Validation every --val-every steps (or at each epoch's end) and at the end; a checkpoint then, at each
    epoch's end and when stopping; a log line every --log-every steps and at each checkpoint, so that no log
    window spans a checkpoint (a resumed run logs the windows an uninterrupted one does)."""
    config, step, total = run.config, run.position.step, run.plan.total_steps
    end_of_epoch = run.position.step_in_epoch == run.plan.steps_per_epoch
    stopping = step >= total or (stop_after is not None and steps_this_call >= stop_after)
    validate = bool((config.val_every and step % config.val_every == 0) or (not config.val_every and end_of_epoch)
                    or step >= total)
    checkpoint = validate or end_of_epoch or stopping
    return Due(end_of_epoch, stopping, validate, checkpoint, log=step % config.log_every == 0 or checkpoint)


class LogWindow:
    """The training steps since the last log line: sums of the loss terms, the pooled confusion matrix of the
    argmax predictions, the steps, the time spent waiting for data, and when the window started."""

    def __init__(self, num_classes: int, device: torch.device) -> None:
        self.losses = torch.zeros(3, device=device, dtype=torch.float64)
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
        self.restart()

    def restart(self) -> None:
        self.losses.zero_()
        self.confusion.zero_()
        self.steps, self.data_wait, self.start = 0, 0.0, time.perf_counter()

    def add(self, logits: torch.Tensor, target: torch.Tensor, losses: tuple[torch.Tensor, ...]) -> None:
        self.losses += torch.stack([loss.detach() for loss in losses]).double()
        self.confusion += confusion_tensor(class_argmax(logits.detach()), target, self.confusion.shape[0])
        self.steps += 1

    def close(self, run: TrainingRun, used_lr: dict[str, float]) -> dict[str, Any]:
        """The window's log record, over all ranks; a new window starts."""
        all_reduce_sum(self.losses, run.ddp)
        all_reduce_sum(self.confusion, run.ddp)
        if run.is_cuda:  # the window ends when its last step has run on the GPU, not when it was queued
            torch.cuda.synchronize(run.device)
        elapsed = time.perf_counter() - self.start
        loss, ce, dice_loss = (self.losses / (self.steps * run.ddp.world_size)).tolist()
        record = {"kind": "train", "step": run.position.step, "epoch": run.position.epoch, "loss": loss, "ce": ce,
                  "dice_loss": dice_loss, **dice_summary(self.confusion, run.data.class_names), "lr": used_lr,
                  "images_per_s": self.steps * run.plan.rank_batch * run.ddp.world_size / elapsed,
                  "data_wait_fraction": self.data_wait / elapsed}
        self.restart()
        return record


@torch.no_grad()
def validate(run: TrainingRun, val_loader: DataLoader) -> dict[str, Any]:
    """Loss and Dice pooled over all validation slices at the model input size (all ranks), with deterministic
    prompts."""
    sync_buffers(run.model, run.ddp)
    run.model.eval()
    confusion = torch.zeros(run.num_classes, run.num_classes, dtype=torch.int64, device=run.device)
    loss_sum = torch.zeros(2, dtype=torch.float64, device=run.device)  # loss x slices, slices
    for batch in val_loader:
        images, points, labels, target = batch_to_device(batch, run)
        with autocast(run):
            logits = run.model(images, points, labels)
        confusion += confusion_tensor(class_argmax(logits), target, run.num_classes)
        loss_sum += torch.stack([loss_terms(logits, target, run)[0].double() * len(images),
                                 torch.tensor(float(len(images)), dtype=torch.float64, device=run.device)])
    all_reduce_sum(confusion, run.ddp)
    all_reduce_sum(loss_sum, run.ddp)
    run.model.train()
    return {"loss": (loss_sum[0] / loss_sum[1]).item() if loss_sum[1] > 0 else None,
            **dice_summary(confusion, run.data.class_names), "slices": int(loss_sum[1].item())}


def validate_and_keep_best(run: TrainingRun, val_loader: DataLoader, progress: Progress) -> dict[str, Any]:
    """Validate and log it; a mean foreground Dice better than any before is saved as best/. Returns the record."""
    metrics = validate(run, val_loader)
    improved = metrics["mean_dice"] is not None and metrics["mean_dice"] > run.position.best_dice
    if improved:
        run.position.best_dice = metrics["mean_dice"]
    record = {"kind": "val", "step": run.position.step, "epoch": run.position.epoch,
              "split": run.config.selection_split, **metrics, "best_mean_dice": run.position.best_dice}
    log(run, record)
    progress.validation(record)
    if improved:
        save(run, "best", metrics)
    return record


# --------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5,
                   denominator: str = "sum") -> torch.Tensor:
    """1 - soft Dice of softmax(logits) against one-hot target, per class over the whole batch,
    averaged over all classes (background included, as the authors' TransUNet-derived code).

    `denominator` "sum": sum p + sum t (ours); "squares": sum p^2 + sum t^2 (the released code's loss).
    logits (B, N, H, W), target (B, H, W) int64 -> scalar.
    """
    probs = logits.float().softmax(dim=1)
    one_hot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).float()
    dims = (0, 2, 3)
    intersection = (probs * one_hot).sum(dims)
    if denominator == "squares":
        total = (probs * probs).sum(dims) + (one_hot * one_hot).sum(dims)
    else:
        total = probs.sum(dims) + one_hot.sum(dims)
    return 1.0 - ((2 * intersection + smooth) / (total + smooth)).mean()


def loss_terms(logits: torch.Tensor, target: torch.Tensor, run: TrainingRun) -> tuple[torch.Tensor, ...]:
    """(ce_weight x cross-entropy + dice_weight x soft Dice loss, cross-entropy, soft Dice loss)."""
    ce = F.cross_entropy(logits.float(), target, weight=run.class_weights)
    dice = soft_dice_loss(logits, target, denominator=run.config.dice_denominator)
    return run.config.ce_weight * ce + run.config.dice_weight * dice, ce, dice


def dice_summary(confusion: torch.Tensor, class_names: list[str]) -> dict[str, Any]:
    """Per-class Dice and their foreground mean from a confusion matrix, None (JSON null) where undefined."""
    dice = dice_from_confusion(confusion.cpu().numpy())
    mean = foreground_mean(dice)
    return {"dice": {name: None if math.isnan(d) else float(d) for name, d in zip(class_names, dice)},
            "mean_dice": None if math.isnan(mean) else mean}


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


@dataclass
class TrainingData:
    """What training reads: the source's train-split slices, classes and provenance."""

    source: Any  # care_dataset.CareDataset or care_dataset.PublishedDataset
    class_names: list[str]
    train_ids: list[str]
    val_ids: list[str]
    data_checksum: str
    manifest_sha256: str


def selection_cases(config: TrainConfig, source: Any, train_cases: list[str]) -> tuple[list[str], list[str]]:
    """(training cases, model-selection cases): a patient-level validation subset carved from the train split,
    or with selection_split test (the released code's choice, optimistic) all train cases and the test split."""
    if config.selection_split == "validation":
        return carve_validation(train_cases, config.val_fraction, config.seed)
    test_cases = source.case_ids("test")
    missing = source.missing_cases(test_cases)
    if not test_cases or missing:
        raise ValueError(f"data folder {config.data}: --selection-split test needs the test split's slices "
                         f"({'no test cases' if not test_cases else f'{len(missing)} test case(s) missing'})")
    return list(train_cases), list(test_cases)


def open_training_data(config: TrainConfig) -> TrainingData:
    """Open the data folder (converted or published) and carve the patient-level validation subset from
    its train split (or take the test split, `selection_cases`).

    Raises ValueError with one clear line for a missing or malformed folder or a class mismatch.
    """
    root = Path(config.data)
    if not root.exists():
        raise ValueError(f"data folder {root}: not found")
    if not root.is_dir():
        raise ValueError(f"data folder {root}: is not a folder")
    try:
        manifest_file = manifest_path(root)
    except FileNotFoundError as error:  # neither kind of folder; the message starts with the path
        raise ValueError(f"data folder {error}") from None
    try:
        # a published folder carries a byte copy of the converted folder's manifest under metadata/
        manifest_bytes = manifest_file.read_bytes()
        manifest = json.loads(manifest_bytes)
        class_names = [str(c) for c in manifest["classes"]]
        source = open_any(root)
        train_cases = source.case_ids("train")
    except FileNotFoundError as error:
        raise ValueError(f"data folder {root}: {error}") from None
    except (KeyError, ValueError, json.JSONDecodeError, TypeError) as error:
        raise ValueError(f"data folder {root}: malformed ({type(error).__name__}: {error})") from None
    if not train_cases:
        raise ValueError(f"data folder {root}: the train split has no cases")
    missing = source.missing_cases(train_cases)
    if missing:
        raise ValueError(f"data folder {root}: the slices of {len(missing)} train case(s) are missing "
                         f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
    if config.num_classes and config.num_classes != len(class_names):
        raise ValueError(f"--num-classes {config.num_classes} does not match the data, which has "
                         f"{len(class_names)} classes ({', '.join(class_names)})")
    train_ids, val_ids = selection_cases(config, source, train_cases)
    checksums = manifest.get("checksums", {})
    data_checksum = checksums.get("all", "") if isinstance(checksums, dict) else ""
    return TrainingData(source, class_names, train_ids, val_ids, str(data_checksum),
                        hashlib.sha256(manifest_bytes).hexdigest())


# --------------------------------------------------------------------------------------------
# Run folder: provenance, logs, curves, checkpoints
# --------------------------------------------------------------------------------------------


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("care-usam", "torch", "numpy", "segment-anything", "zarr", "h5py", "datasets", "safetensors"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    versions["cuda"] = torch.version.cuda or ""
    return versions


def git_commit() -> str:
    """The commit of the source tree this package runs from, or "" outside a git checkout."""
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return result.stdout.strip() if result.returncode == 0 else ""


def plot_curves(log_path: Path, png_path: Path) -> None:
    """Training loss and Dice, validation Dice against step, from log.jsonl."""
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "val"]
    fig = Figure(figsize=(10, 4))
    ax_loss, ax_dice = fig.subplots(1, 2)
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    ax_loss.plot([r["step"] for r in val], [r["loss"] for r in val], "o-", label="validation loss")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("CE + Dice loss")
    ax_loss.legend()
    for records_, label, style in ((train, "train", "-"), (val, "validation", "o-")):
        points = [(r["step"], r["mean_dice"]) for r in records_ if r.get("mean_dice") is not None]
        if points:
            ax_dice.plot(*zip(*points), style, label=f"{label} mean foreground Dice")
    ax_dice.set_xlabel("step")
    ax_dice.set_ylim(0, 1)
    ax_dice.legend()
    fig.tight_layout()
    save_png(fig, png_path)


def checkpoint_config(config: TrainConfig, data: TrainingData, step: int, epoch: int,
                      metrics: dict | None, input_size: int = MODEL_SIZE) -> dict[str, Any]:
    """``extra_config`` of a checkpoint: what inference needs, and where the weights came from.

    Paths in the recorded options are reduced to their last component (a checkpoint travels).
    """
    options = config.to_dict()
    for key in ("data", "out", "sam_checkpoint", "pretrained"):
        options[key] = Path(options[key]).name if options[key] else ""
    return {
        "classes": data.class_names,
        "window": [float(w) for w in config.window],
        "normalization": "clip HU to window, then (hu - low) / (high - low) in [0, 1]",
        "input_size": input_size,
        "points_per_class": config.points,
        "prompt_style": config.prompt_style,
        "eval_points": config.eval_points,
        "point_order": config.point_order,
        "clahe": config.clahe,
        "resize": config.resize,
        "selection_split": config.selection_split,
        **({"selection_warning": SELECTION_WARNING} if config.selection_split == "test" else {}),
        "training": {
            "step": step,
            "epoch": epoch,
            "metrics": metrics or {},
            "data_checksum": data.data_checksum,
            "manifest_sha256": data.manifest_sha256,
            "train_cases": len(data.train_ids),
            "val_cases": len(data.val_ids),
            "git_commit": git_commit(),
            "versions": package_versions(),
            "config": options,
        },
    }


def run_record(run: TrainingRun) -> dict[str, Any]:
    """run.json: a new run's record, or on resume the run's own record with this resume added to it."""
    started = {"device": str(run.device), "git_commit": git_commit(), "versions": package_versions()}
    record = read_run_record(run.out / RUN_FILE) if run.resume_state is not None else None
    if record is not None:  # the run's own record stays; each resume adds where it went on from
        record.setdefault("resumes", []).append({"step": run.resume_state["step"],
                                                 "total_steps": run.plan.total_steps, **started})
        return record
    data, plan = run.data, run.plan
    return {"data_checksum": data.data_checksum, "manifest_sha256": data.manifest_sha256,
            "classes": data.class_names, "train_cases": len(data.train_ids), "val_cases": len(data.val_ids),
            "train_slices": len(plan.train_set), "val_slices": len(plan.val_set),
            "steps_per_epoch": plan.steps_per_epoch, "total_steps": plan.total_steps,
            "world_size": run.ddp.world_size, "batch_per_process": plan.rank_batch, "recipe": run.config.recipe,
            "selection_split": run.config.selection_split,
            **({"selection_warning": SELECTION_WARNING} if run.config.selection_split == "test" else {}),
            **started, "resumes": []}


def prepare_run_folder(run: TrainingRun) -> None:
    """The run folder with run.json (first: it marks a run folder) and config.toml, on the main rank; what a
    run that never wrote a checkpoint left there is removed first, unless resuming."""
    if not run.ddp.main:
        return
    if run.resume_state is None:
        remove_unfinished_run(run.out)
    run.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run.out / RUN_FILE, json.dumps(run_record(run), indent=2) + "\n")
    write_text_atomic(run.out / CONFIG_FILE, to_toml(run.config))


def log(run: TrainingRun, record: dict[str, Any]) -> None:
    """One line of log.jsonl (main rank)."""
    if run.ddp.main:
        with open(run.out / LOG_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def keep_log_until(log_path: Path, step: int) -> None:
    """Drop the log lines of steps after `step`: a resumed run runs them again."""
    if log_path.exists():
        kept = [line for line in log_path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        write_text_atomic(log_path, "".join(line + "\n" for line in kept))


def train_state(run: TrainingRun) -> dict[str, Any]:
    """What last/train_state.pt holds for --resume: position, optimizer, schedule and RNG states."""
    position = run.position
    return {"step": position.step, "epoch": position.epoch, "step_in_epoch": position.step_in_epoch,
            "best_dice": position.best_dice, "world_size": run.ddp.world_size,
            "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if run.is_cuda else []}


def save(run: TrainingRun, directory: str, metrics: dict | None) -> None:
    """Checkpoint the model into out/<directory> (main rank); last/ also holds the train state."""
    if not run.ddp.main:
        return
    extra_files = {TRAIN_STATE_FILE: partial(torch.save, train_state(run))} if directory == "last" else {}
    config = checkpoint_config(run.config, run.data, run.position.step, run.position.epoch, metrics,
                               run.plan.input_size)
    save_checkpoint(run.model, run.out / directory, config, extra_files)


def save_last(run: TrainingRun, metrics: dict | None) -> None:
    """The checkpoint --resume continues from, and the curves up to it."""
    save(run, "last", metrics)
    if run.ddp.main:
        plot_curves(run.out / LOG_FILE, run.out / CURVES_FILE)


def read_run_record(path: Path) -> dict[str, Any] | None:
    """The run.json that `train` wrote at ``path``, or None."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if isinstance(record, dict) and {"manifest_sha256", "total_steps", "world_size"} <= record.keys():
        return record
    return None


def is_run_record(path: Path) -> bool:
    """True if ``path`` is a run.json that `train` wrote."""
    return read_run_record(path) is not None


def remove_unfinished_run(out: Path) -> None:
    """Remove what a run that never wrote ``last/`` left in ``out`` (only files a run writes)."""
    if (out / "last").exists() or not is_run_record(out / RUN_FILE):
        return
    for name in (CONFIG_FILE, LOG_FILE, CURVES_FILE, RUN_FILE):
        (out / name).unlink(missing_ok=True)
    try:
        read_checkpoint_config(out / "best")
    except ValueError:
        return
    shutil.rmtree(out / "best", ignore_errors=True)


def resolve_resume(config: TrainConfig, data: TrainingData, world_size: int = 1) -> dict[str, Any] | None:
    """For ``--resume``: the saved train state, after checking that neither the recipe nor the data changed.

    Without ``--resume`` a folder holding a checkpoint is refused, and so is a ``config.toml`` that no run
    wrote; a run that stopped before its first checkpoint (a crash, a bad shard) starts afresh
    (:func:`remove_unfinished_run`, after every check).
    """
    out = Path(config.out)
    if os.path.lexists(out) and not os.path.isdir(out):
        raise ValueError(f"run folder {out}: exists and is not a folder")
    if problem := creation_problem(out):
        raise ValueError(f"run folder {out}: {problem}")
    last = out / "last"
    for checkpoint in (last, out / "best"):  # a save killed between its renames, or after them
        recover_checkpoint(checkpoint)
    if not config.resume:
        if last.exists():
            raise ValueError(f"run folder {out} already holds a run; use --resume to continue it or another --out")
        if (out / CONFIG_FILE).exists() and not is_run_record(out / RUN_FILE):
            raise ValueError(f"run folder {out} holds a {CONFIG_FILE} that no usam fit run wrote there; "
                             "use another --out")
        return None
    if not (last / TRAIN_STATE_FILE).is_file() or not (out / CONFIG_FILE).is_file():
        raise ValueError(f"--resume: {out} has no checkpoint to resume from; run it again without --resume")
    saved = read_toml(out / CONFIG_FILE)
    current = config.to_dict()
    changed = sorted(k for k, v in saved.items() if k not in RESUMABLE_CHANGES and current.get(k) != v)
    if changed:
        raise ValueError(f"--resume: options differ from the saved run in {', '.join(changed)} "
                         f"(allowed to change: {', '.join(sorted(RESUMABLE_CHANGES))})")
    training = read_checkpoint_config(last)["training"]
    if training.get("manifest_sha256") != data.manifest_sha256:
        raise ValueError(f"--resume: the data in {config.data} is not the data the run was trained on "
                         f"(its dataset.json differs from the one recorded in {last / 'config.json'})")
    state = torch.load(last / TRAIN_STATE_FILE, map_location="cpu", weights_only=True)
    if state["step"] != training["step"]:
        raise ValueError(f"--resume: {last} is inconsistent (weights at step {training['step']}, "
                         f"train state at step {state['step']})")
    saved_world_size = state.get("world_size")
    if saved_world_size is None:  # a train state written before it recorded the world size: run.json says
        saved_world_size = (read_run_record(out / RUN_FILE) or {}).get("world_size", 1)
    if saved_world_size != world_size:
        raise ValueError(f"--resume: the run was trained by {saved_world_size} process(es), not {world_size}; "
                         f"each rank's share of the data and its batch depend on that number, so resume it with "
                         f"{saved_world_size}")
    return state


# --------------------------------------------------------------------------------------------
# Model and optimizer
# --------------------------------------------------------------------------------------------


def architecture_options(config: TrainConfig) -> dict[str, Any]:
    """The recipe's architecture options the model takes: prompt style (the SAM-style models), decoder (usam_*),
    head bias (models with a 1x1 head). A decoder other than class_tokens for a model without one is refused."""
    if config.model not in list_models():
        return {}  # create_model names the models there are
    wanted = {"prompt_style": config.prompt_style, "decoder": config.decoder, "head_bias": config.head_bias}
    taken = {k: v for k, v in wanted.items() if takes_option(config.model, k)}
    if "decoder" not in taken and config.decoder != "class_tokens":
        raise ValueError(f"--decoder {config.decoder}: model {config.model} has no such decoder (usam_* models "
                         "only); use --decoder class_tokens")
    return taken


def build_model(config: TrainConfig, num_classes: int) -> torch.nn.Module:
    try:
        return create_model(config.model, num_classes=num_classes, points_per_class=config.points,
                            sam_checkpoint=config.sam_checkpoint or None, pretrained=config.pretrained or None,
                            **architecture_options(config),
                            **config.model_args)
    except ValueError as error:
        message = str(error)
        if config.sam_checkpoint and config.sam_checkpoint in message:
            raise ValueError(f"--sam-checkpoint does not fit model {config.model}: {message}") from None
        if config.pretrained and config.pretrained in message:
            raise ValueError(f"--pretrained does not fit model {config.model}: {message}") from None
        raise


def build_optimizer(config: TrainConfig, model: nn.Module, total_steps: int) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW over the model's encoder and decoder groups at their learning rates, with polynomial decay."""
    groups = model.parameter_groups()
    optimizer = torch.optim.AdamW(
        [{"params": groups[name], "lr": lr, "name": name}
         for name, lr in (("encoder", config.lr_encoder), ("decoder", config.lr_decoder)) if groups[name]],
        weight_decay=config.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=total_steps, power=config.poly_power)
    return optimizer, scheduler


def unused_parameters(model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device) -> bool:
    """True if some trainable parameter gets no gradient (DDP must then look for them each step).

    One forward/backward in eval mode, so BatchNorm statistics are left untouched.
    """
    model.eval()
    images = batch["image"][:1].to(device)
    points, labels = batch["points"][:1].to(device), batch["point_labels"][:1].to(device)
    model(images, points, labels).float().sum().backward()
    unused = any(p.requires_grad and p.grad is None for p in model.parameters())
    model.zero_grad(set_to_none=True)
    model.train()
    return unused


# --------------------------------------------------------------------------------------------
# Distributed helpers
# --------------------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def distributed_from_env() -> Dist:
    """This process's place in the run torchrun describes in the environment (one process without it)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Dist()
    return Dist(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), world_size)


def join_process_group(ddp: Dist, device: torch.device) -> None:
    """Join the process group (NCCL on CUDA, gloo on CPU); a no-op for one process."""
    if ddp.enabled and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", rank=ddp.rank,
                                world_size=ddp.world_size)


def sync_buffers(model: torch.nn.Module, ddp: Dist) -> None:
    """Give every rank rank 0's buffers (BatchNorm statistics), as DDP does before each forward."""
    if ddp.enabled:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def all_reduce_sum(tensor: torch.Tensor, ddp: Dist) -> torch.Tensor:
    if ddp.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def training_device(config: TrainConfig, ddp: Dist) -> torch.device:
    """--device (`usam.inference.choose_device`; each torchrun rank its own GPU), made the current CUDA device
    (NCCL, pinned-memory threads)."""
    device = choose_device(config.device, ddp.local_rank if ddp.enabled else None)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


class Progress:
    """rich progress bar on a terminal (main rank); otherwise one line per validation."""

    def __init__(self, enabled: bool, total: int, completed: int, size: int) -> None:
        self.console = Console(stderr=True)
        self.enabled = enabled
        self.size = size
        self.bar = None
        if enabled and self.console.is_terminal:
            self.bar = RichProgress(TextColumn("fit"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                    TextColumn("{task.fields[status]}"), console=self.console)
            self.task = self.bar.add_task("fit", total=total, completed=completed, status="")
            self.bar.start()

    def update(self, step: int, record: dict[str, Any]) -> None:
        if self.bar is not None:
            dice = record["mean_dice"]
            status = (f"loss {record['loss']:.4f}  Dice {dice:.3f}  " if dice is not None else
                      f"loss {record['loss']:.4f}  ") + f"{record['images_per_s']:.1f} img/s  " \
                f"data wait {100 * record['data_wait_fraction']:.0f}%"
            self.bar.update(self.task, completed=step, status=status)

    def validation(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        dice = ", ".join(f"{k} {v:.3f}" if v is not None else f"{k} n/a" for k, v in list(record["dice"].items())[1:])
        mean = record["mean_dice"]
        self.console.print(f"step {record['step']} validation ({record['slices']} slices, pooled at {self.size} px): "
                           f"loss {record['loss']:.4f}, Dice {dice}, mean "
                           f"{'n/a' if mean is None else f'{mean:.3f}'}", highlight=False, soft_wrap=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
