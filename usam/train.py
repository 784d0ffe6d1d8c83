"""``usam fit``: train a segmentation model on CARE slices, one readable loop (nanoGPT style).

Single process: ``usam fit --data out/ --model usam_b --out runs/x``.
Several GPUs: ``torchrun --nproc_per_node 8 -m usam.cli fit ...`` (DDP; gloo on CPU, NCCL on CUDA).

Run folder: config.toml (the exact resolved options), run.json (data checksum, versions, git
commit), log.jsonl, curves.png, last/ and best/ (model.safetensors + config.json, as
``usam.models.checkpoints.save_checkpoint`` writes them; last/ also holds train_state.pt).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import subprocess
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from usam.config import RESUMABLE_CHANGES, TrainConfig, read_toml, to_toml
from usam.data import MODEL_SIZE, Augmentation, EpochSampler, SliceDataset, slices_with_class

TRAIN_STATE_FILE = "train_state.pt"
LOG_FILE = "log.jsonl"
CURVES_FILE = "curves.png"
CONFIG_FILE = "config.toml"
RUN_FILE = "run.json"


# --------------------------------------------------------------------------------------------
# Loss and overlap counts
# --------------------------------------------------------------------------------------------


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """1 - soft Dice of softmax(logits) against one-hot target, per class over the whole batch,
    averaged over all classes (background included, as the authors' TransUNet-derived code).

    logits (B, N, H, W), target (B, H, W) int64 -> scalar.
    """
    probs = logits.float().softmax(dim=1)
    one_hot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).float()
    dims = (0, 2, 3)
    intersection = (probs * one_hot).sum(dims)
    total = probs.sum(dims) + one_hot.sum(dims)
    return 1.0 - ((2 * intersection + smooth) / (total + smooth)).mean()


def overlap_counts(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(3, N) float64: per class, |pred & truth|, |pred|, |truth| of the argmax prediction."""
    n = logits.shape[1]
    pred = logits.argmax(dim=1).flatten()
    confusion = torch.bincount(pred * n + target.flatten(), minlength=n * n).view(n, n)  # [pred, truth]
    return torch.stack([confusion.diagonal(), confusion.sum(1), confusion.sum(0)]).double()


def dice_from_counts(counts: torch.Tensor) -> list[float | None]:
    """Per-class Dice 2|P&T| / (|P| + |T|); None where the class is absent in prediction and truth."""
    intersection, pred, truth = counts.tolist()
    return [2 * i / (p + t) if p + t > 0 else None for i, p, t in zip(intersection, pred, truth)]


def mean_foreground(dice: list[float | None]) -> float | None:
    values = [d for d in dice[1:] if d is not None]
    return float(np.mean(values)) if values else None


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


@dataclass
class TrainingData:
    """What training reads: the source's train-split slices, classes and provenance."""

    source: Any  # care_dataset.store.CareDataset or care_dataset.published.PublishedDataset
    class_names: list[str]
    train_ids: list[str]
    val_ids: list[str]
    data_checksum: str
    manifest_sha256: str


def open_training_data(config: TrainConfig) -> TrainingData:
    """Open the data folder (converted or published) and carve the patient-level validation subset from
    its train split.

    Raises ValueError with one clear line for a missing or malformed folder or a class mismatch.
    """
    from care_dataset.format.published import manifest_path, open_any
    from care_dataset.format.splits import carve_validation

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
    train_ids, val_ids = carve_validation(train_cases, config.val_fraction, config.seed)
    checksums = manifest.get("checksums", {})
    data_checksum = checksums.get("all", "") if isinstance(checksums, dict) else ""
    return TrainingData(source, class_names, train_ids, val_ids, str(data_checksum),
                        hashlib.sha256(manifest_bytes).hexdigest())


# --------------------------------------------------------------------------------------------
# Run folder: provenance, logs, curves, checkpoints
# --------------------------------------------------------------------------------------------


def package_versions() -> dict[str, str]:
    from importlib import metadata

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


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def plot_curves(log_path: Path, png_path: Path) -> None:
    """Training loss and Dice, validation Dice against step, from log.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "val"]
    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(10, 4))
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
    tmp = png_path.with_name(f".{png_path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)


def checkpoint_config(config: TrainConfig, data: TrainingData, step: int, epoch: int,
                      metrics: dict | None, input_size: int = MODEL_SIZE) -> dict[str, Any]:
    """``extra_config`` of a checkpoint: what inference needs, and where the weights came from.

    Paths in the recorded options are reduced to their last component (a checkpoint travels).
    """
    options = config.to_dict()
    for key in ("data", "out", "sam_checkpoint"):
        options[key] = Path(options[key]).name if options[key] else ""
    return {
        "classes": data.class_names,
        "window": [float(w) for w in config.window],
        "normalization": "clip HU to window, then (hu - low) / (high - low) in [0, 1]",
        "input_size": input_size,
        "points_per_class": config.points,
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


def choose_device(name: str, ddp: Dist) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available on this machine")
        if ddp.enabled or name == "cuda":
            name = f"cuda:{ddp.local_rank}"
    elif name != "cpu":
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    return torch.device(name)


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


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
    from usam.models.checkpoints import read_checkpoint_config

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
    from care_dataset.files import creation_problem

    from usam.models.checkpoints import read_checkpoint_config, recover_checkpoint

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


def build_model(config: TrainConfig, num_classes: int) -> torch.nn.Module:
    from usam.models.registry import create_model

    try:
        return create_model(config.model, num_classes=num_classes, points_per_class=config.points,
                            sam_checkpoint=config.sam_checkpoint or None, **config.model_args)
    except ValueError as error:
        message = str(error)
        if config.sam_checkpoint and config.sam_checkpoint in message:
            raise ValueError(f"--sam-checkpoint does not fit model {config.model}: {message}") from None
        raise


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


def train(config: TrainConfig, *, stop_after: int | None = None) -> dict[str, Any]:
    """Run (or resume) training as ``config`` says; returns the final metrics.

    ``stop_after``: leave after this many steps of this call (the checkpoint in last/ is saved),
    as an interruption would; ``--resume`` continues from there.
    """
    # ---- checks and setup: every user error is raised before any work starts ----
    config.validate()
    config = config.with_absolute_paths()
    ddp = distributed_from_env()
    device = choose_device(config.device, ddp)
    if device.type == "cuda":  # this rank's GPU is the current one (NCCL, pinned-memory threads)
        torch.cuda.set_device(device)
    if config.batch_size % ddp.world_size:
        raise ValueError(f"--batch-size {config.batch_size} must be divisible by the {ddp.world_size} processes")
    data = open_training_data(config)
    num_classes = len(data.class_names)
    if config.class_weights and len(config.class_weights) != num_classes:
        raise ValueError(f"--class-weights needs {num_classes} values (one per class, background first), "
                         f"got {len(config.class_weights)}")
    resume_state = resolve_resume(config, data, ddp.world_size)
    torch.manual_seed(config.seed)
    # on resume the weights come from last/: the SAM checkpoint the run started from is not read again
    model = build_model(config if resume_state is None else replace(config, sam_checkpoint=""), num_classes)
    if config.deterministic:
        torch.use_deterministic_algorithms(True)

    augment = Augmentation(config.flip_prob, config.max_rotation_deg, config.small_rotation_prob) \
        if config.augment else None
    input_size = int(model.config.get("img_size", MODEL_SIZE))
    common = dict(num_classes=num_classes, points_per_class=config.points, window=tuple(config.window),
                  size=input_size)
    train_set = SliceDataset(data.source, data.train_ids, augment=augment, random_points=True, seed=config.seed,
                             **common)
    val_set = SliceDataset(data.source, data.val_ids, augment=None, **common)
    rank_batch = config.batch_size // ddp.world_size
    class_slices = slices_with_class(train_set) if config.class_balance > 0 else None
    sampler = EpochSampler(train_set, num_replicas=ddp.world_size, rank=ddp.rank, shuffle=True, seed=config.seed,
                           class_slices=class_slices, balance=config.class_balance)
    steps_per_epoch = sampler.num_samples // rank_batch
    if steps_per_epoch == 0:
        raise ValueError(f"--batch-size {config.batch_size} is larger than the {len(train_set)} training slices")
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)

    # ---- optimizer, schedule (before the run folder: torch's own checks come first) ----
    groups = model.parameter_groups()
    optimizer = torch.optim.AdamW(
        [{"params": groups[name], "lr": lr, "name": name}
         for name, lr in (("encoder", config.lr_encoder), ("decoder", config.lr_decoder)) if groups[name]],
        weight_decay=config.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=total_steps, power=config.poly_power)
    # after every check: an error raised before here is the same on every rank, and rank 0 alone reports it
    join_process_group(ddp, device)

    # ---- run folder ----
    out = Path(config.out)
    if ddp.main:
        if resume_state is None:
            remove_unfinished_run(out)
        out.mkdir(parents=True, exist_ok=True)
        started = {"device": str(device), "git_commit": git_commit(), "versions": package_versions()}
        run_info = read_run_record(out / RUN_FILE) if resume_state is not None else None
        if run_info is None:
            run_info = {"data_checksum": data.data_checksum, "manifest_sha256": data.manifest_sha256,
                        "classes": data.class_names, "train_cases": len(data.train_ids),
                        "val_cases": len(data.val_ids), "train_slices": len(train_set), "val_slices": len(val_set),
                        "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
                        "world_size": ddp.world_size, **started, "resumes": []}
        else:  # the run's own record stays; each resume adds where it went on from
            run_info.setdefault("resumes", []).append({"step": resume_state["step"], "total_steps": total_steps,
                                                       **started})
        write_text_atomic(out / RUN_FILE, json.dumps(run_info, indent=2) + "\n")  # first: it marks a run folder
        write_text_atomic(out / CONFIG_FILE, to_toml(config))

    # ---- resumed state ----
    step, epoch, step_in_epoch, best_dice = 0, 0, 0, -1.0
    if resume_state is not None:
        from usam.models.checkpoints import load_weights

        load_weights(model, out / "last")
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        step, epoch, step_in_epoch = resume_state["step"], resume_state["epoch"], resume_state["step_in_epoch"]
        best_dice = resume_state["best_dice"]
        torch.set_rng_state(resume_state["torch_rng"])
        if device.type == "cuda" and len(resume_state.get("cuda_rng", [])) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(resume_state["cuda_rng"])
        if ddp.main:  # drop log lines of steps after the checkpoint: they are run again
            log_path = out / LOG_FILE
            if log_path.exists():
                kept = [line for line in log_path.read_text().splitlines()
                        if line.strip() and json.loads(line)["step"] <= step]
                write_text_atomic(log_path, "".join(line + "\n" for line in kept))
    is_cuda = device.type == "cuda"
    if is_cuda:  # every step has the same shapes: let cuDNN time its convolution algorithms once
        torch.backends.cudnn.benchmark = not config.deterministic
    model.to(device)
    if is_cuda and config.channels_last:
        model.to(memory_format=torch.channels_last)
    for state in optimizer.state.values():  # optimizer state loaded on CPU follows the model
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and key != "step":
                state[key] = value.to(device)

    workers = config.workers if config.workers >= 0 else min(8, (os.cpu_count() or 1) // ddp.world_size)
    # the loader draws its workers' base seed from its own generator, not from the global RNG the model uses,
    # so that a resumed run's global RNG follows the uninterrupted run's exactly
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=rank_batch, sampler=sampler, drop_last=True, num_workers=workers,
        generator=torch.Generator().manual_seed(config.seed),
        pin_memory=is_cuda, persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
    )
    val_loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(val_set, list(range(ddp.rank, len(val_set), ddp.world_size))),
        batch_size=rank_batch, shuffle=False, num_workers=min(workers, 2), pin_memory=is_cuda,
        generator=torch.Generator().manual_seed(config.seed),
    )
    train_model = model
    if ddp.enabled:
        probe = next(iter(torch.utils.data.DataLoader(train_set, batch_size=1, generator=torch.Generator())))
        train_model = DistributedDataParallel(
            model, device_ids=[device.index] if is_cuda else None,
            find_unused_parameters=unused_parameters(model, probe, device))
    if config.compile:
        train_model = torch.compile(train_model)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if is_cuda and config.amp \
        else contextlib.nullcontext

    def to_device(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        images = batch["image"].to(device, non_blocking=True)
        if is_cuda and config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        points = batch["points"].to(device, non_blocking=True) if config.points else None
        labels = batch["point_labels"].to(device, non_blocking=True) if config.points else None
        return images, points, labels, batch["label"].to(device, non_blocking=True).long()

    ce_weights = torch.tensor(config.class_weights, device=device) if config.class_weights else None

    def loss_of(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ce = F.cross_entropy(logits.float(), target, weight=ce_weights)
        dice = soft_dice_loss(logits, target)
        return config.ce_weight * ce + config.dice_weight * dice, ce, dice

    @torch.no_grad()
    def validate() -> dict[str, Any]:
        """Pooled over all validation slices at the model input size (all ranks), with deterministic prompts."""
        sync_buffers(model, ddp)
        model.eval()
        counts = torch.zeros(3, num_classes, dtype=torch.float64, device=device)
        loss_sum = torch.zeros(2, dtype=torch.float64, device=device)
        for batch in val_loader:
            images, points, labels, target = to_device(batch)
            with autocast():
                logits = model(images, points, labels)
            counts += overlap_counts(logits, target)
            loss_sum += torch.stack([loss_of(logits, target)[0].double() * len(images),
                                     torch.tensor(float(len(images)), dtype=torch.float64, device=device)])
        all_reduce_sum(counts, ddp)
        all_reduce_sum(loss_sum, ddp)
        model.train()
        dice = dice_from_counts(counts.cpu())
        return {"loss": (loss_sum[0] / loss_sum[1]).item() if loss_sum[1] > 0 else None,
                "dice": dict(zip(data.class_names, dice)), "mean_dice": mean_foreground(dice),
                "slices": int(loss_sum[1].item())}

    def log(record: dict[str, Any]) -> None:
        if ddp.main:
            with open(out / LOG_FILE, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def save(directory: str, metrics: dict | None) -> None:
        from usam.models.checkpoints import save_checkpoint

        if not ddp.main:
            return
        extra_files = {}
        if directory == "last":
            state = {"step": step, "epoch": epoch, "step_in_epoch": step_in_epoch, "best_dice": best_dice,
                     "world_size": ddp.world_size,
                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "torch_rng": torch.get_rng_state(),
                     "cuda_rng": torch.cuda.get_rng_state_all() if is_cuda else []}
            extra_files[TRAIN_STATE_FILE] = lambda path: torch.save(state, path)
        save_checkpoint(model, out / directory, checkpoint_config(config, data, step, epoch, metrics, input_size),
                        extra_files)

    # ---- the loop ----
    progress = Progress(ddp.main, total_steps, step, input_size)
    model.train()
    window_stats = torch.zeros(3, device=device, dtype=torch.float64)  # loss sum, ce sum, dice-loss sum
    window_counts = torch.zeros(3, num_classes, dtype=torch.float64, device=device)
    window_steps, window_wait, window_start = 0, 0.0, time.perf_counter()
    last_metrics: dict[str, Any] = {}
    steps_this_call = 0
    stopping = step >= total_steps
    while not stopping:
        sampler.set_epoch(epoch)
        sampler.start = step_in_epoch * rank_batch
        batches = iter(loader)
        for _ in range(steps_per_epoch - step_in_epoch):
            wait_start = time.perf_counter()
            batch = next(batches)
            images, points, labels, target = to_device(batch)
            window_wait += time.perf_counter() - wait_start

            with autocast():
                logits = train_model(images, points, labels)
            loss, ce, dice_loss = loss_of(logits, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step_lr = {g["name"]: g["lr"] for g in optimizer.param_groups}  # the rates this step used
            scheduler.step()
            step += 1
            step_in_epoch += 1
            steps_this_call += 1
            window_stats += torch.stack([loss.detach(), ce.detach(), dice_loss.detach()]).double()
            window_counts += overlap_counts(logits.detach(), target)
            window_steps += 1

            end_of_epoch = step_in_epoch == steps_per_epoch
            stopping = step >= total_steps or (stop_after is not None and steps_this_call >= stop_after)
            validate_now = (config.val_every and step % config.val_every == 0) or \
                (not config.val_every and end_of_epoch) or step >= total_steps
            checkpoint_now = validate_now or end_of_epoch or stopping
            # no window spans a checkpoint: a resumed run logs the windows an uninterrupted one does
            if step % config.log_every == 0 or checkpoint_now:
                all_reduce_sum(window_stats, ddp)
                all_reduce_sum(window_counts, ddp)
                if is_cuda:  # the window ends when its last step has run on the GPU, not when it was queued
                    torch.cuda.synchronize(device)
                elapsed = time.perf_counter() - window_start
                mean = (window_stats / (window_steps * ddp.world_size)).tolist()
                dice = dice_from_counts(window_counts.cpu())
                record = {"kind": "train", "step": step, "epoch": epoch, "loss": mean[0], "ce": mean[1],
                          "dice_loss": mean[2], "dice": dict(zip(data.class_names, dice)),
                          "mean_dice": mean_foreground(dice),
                          "lr": step_lr,
                          "images_per_s": window_steps * config.batch_size / elapsed,
                          "data_wait_fraction": window_wait / elapsed}
                log(record)
                progress.update(step, record)
                window_stats.zero_()
                window_counts.zero_()
                window_steps, window_wait, window_start = 0, 0.0, time.perf_counter()

            pause_start = time.perf_counter()  # validation and checkpoints are not training throughput
            if validate_now and len(val_set):
                metrics = validate()
                improved = metrics["mean_dice"] is not None and metrics["mean_dice"] > best_dice
                if improved:
                    best_dice = metrics["mean_dice"]
                last_metrics = {"kind": "val", "step": step, "epoch": epoch, **metrics, "best_mean_dice": best_dice}
                log(last_metrics)
                progress.validation(last_metrics)
                if improved:
                    save("best", metrics)
            if end_of_epoch:
                epoch += 1
                step_in_epoch = 0
            if checkpoint_now:
                save("last", last_metrics or None)
                if ddp.main:
                    plot_curves(out / LOG_FILE, out / CURVES_FILE)
            window_start += time.perf_counter() - pause_start
            if stopping:
                break
    progress.close()
    sync_buffers(model, ddp)
    if not len(val_set) and ddp.main and step >= total_steps:  # no validation subset: best is the last
        save("best", None)
    return {"step": step, "epoch": epoch, "best_mean_dice": best_dice if best_dice >= 0 else None,
            "last_validation": last_metrics, "out": str(out), "model": model}


class Progress:
    """rich progress bar on a terminal (main rank); otherwise one line per validation."""

    def __init__(self, enabled: bool, total: int, completed: int, size: int) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)
        self.enabled = enabled
        self.size = size
        self.bar = None
        if enabled and self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, \
                TimeRemainingColumn

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
