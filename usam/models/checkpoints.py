"""Loading official SAM weights; saving and loading our own checkpoints (safetensors + JSON)."""
from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from care_dataset.error_text import error_line
from care_dataset.files import make_staging_dir, previous_path, replace_folder

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CHECKPOINT_FORMAT = "usam-checkpoint"
CHECKPOINT_FORMAT_VERSION = 1

# Mask-decoder keys that may legitimately differ from SAM's (its 4 mask tokens, 4 hypernetwork
# MLPs, IoU head, output upscaling): loaded where name and shape agree, skipped otherwise.
_HEAD_KEY = re.compile(
    r"mask_decoder\.(mask_tokens|output_hypernetworks_mlps|iou_prediction_head|output_upscaling)\."
)
_SAM_PREFIXES = ("image_encoder.", "prompt_encoder.", "mask_decoder.")


@dataclass
class LoadReport:
    """What `load_sam_checkpoint` did with each key."""

    loaded: list[str] = field(default_factory=list)
    resized: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    new: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"SAM checkpoint: {len(self.loaded)} tensors loaded as is, {len(self.resized)} "
            f"resized, {len(self.skipped)} skipped, {len(self.new)} new (from scratch)"
        ]
        for key, (old, new) in self.resized.items():
            lines.append(f"  resized  {key}: {list(old)} -> {list(new)}")
        for key, reason in self.skipped.items():
            lines.append(f"  skipped  {key}: {reason}")
        for module, keys in _group_by_module(self.new).items():
            shown = f"{module}.* ({len(keys)} tensors)" if len(keys) > 1 else keys[0]
            lines.append(f"  new      {shown}")
        return "\n".join(lines)


def _group_by_module(keys: list[str]) -> dict[str, list[str]]:
    """Keys per top-level module (two levels for SAM's parts), in first-seen order."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        depth = 2 if key.startswith(_SAM_PREFIXES) else 1
        groups.setdefault(".".join(key.split(".")[:depth]), []).append(key)
    return groups


def _resize_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """1 x H x W x C absolute position embedding -> 1 x h x w x C, bicubic (antialiased)."""
    x = pos_embed.permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=grid, mode="bicubic", align_corners=False, antialias=True)
    return x.permute(0, 2, 3, 1).to(pos_embed.dtype)


def _resize_rel_pos(rel_pos: torch.Tensor, rows: int) -> torch.Tensor:
    """L x C relative position table -> rows x C, linear along L (as SAM's get_rel_pos does)."""
    x = rel_pos.float().t().unsqueeze(0)
    x = F.interpolate(x, size=rows, mode="linear", align_corners=False)
    return x.squeeze(0).t().contiguous().to(rel_pos.dtype)


def _described(error: Exception) -> str:
    if isinstance(error, EOFError):
        return "an empty or truncated file"
    reason = error_line(error)
    return reason if reason == type(error).__name__ else f"{type(error).__name__}: {reason}"


def _read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"SAM checkpoint {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling refused or not a torch file at all
        raise ValueError(
            f"SAM checkpoint {path}: not a plain torch state dict ({_described(error)})"
        ) from None
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ValueError(f"SAM checkpoint {path}: not a state dict of named tensors")
    if not any(k.startswith("image_encoder.") for k in state):
        raise ValueError(f"SAM checkpoint {path}: no image_encoder.* keys, not a SAM checkpoint")
    return dict(state)


def load_sam_checkpoint(model: nn.Module, path: str | os.PathLike) -> LoadReport:
    """Initialise `model`'s SAM parts from an official SAM checkpoint (e.g. sam_vit_b_01ec64.pth).

    The file is read with ``torch.load(weights_only=True)``. ``pos_embed`` is resized to the
    model's token grid (bicubic) and relative-position tables to the model's rows (linear).
    Keys the model lacks (the patch embedding for U-SAM, a fourth mask MLP, the IoU head) and
    mask-decoder head keys of another shape (mask tokens) are skipped; every model tensor not
    filled from the file is reported as new. Any other shape mismatch, or a SAM part of the
    model missing from the file, raises ValueError.
    """
    state = _read_state_dict(path)
    own = model.state_dict()
    report = LoadReport()
    updates: dict[str, torch.Tensor] = {}
    mismatched: list[str] = []
    for key, value in state.items():
        if key not in own:
            report.skipped[key] = "not in this model"
            continue
        target = own[key]
        if value.shape == target.shape:
            updates[key] = value
            report.loaded.append(key)
            continue
        resized = None
        if key.endswith(".pos_embed") and value.ndim == 4 and value.shape[3] == target.shape[3]:
            resized = _resize_pos_embed(value, tuple(target.shape[1:3]))
        elif (
            key.endswith((".rel_pos_h", ".rel_pos_w"))
            and value.ndim == 2
            and value.shape[1] == target.shape[1]
        ):
            resized = _resize_rel_pos(value, target.shape[0])
        if resized is not None:
            updates[key] = resized
            report.resized[key] = (tuple(value.shape), tuple(target.shape))
        elif _HEAD_KEY.match(key):
            report.skipped[key] = f"shape {list(value.shape)} != model's {list(target.shape)}"
        else:
            mismatched.append(f"{key} {list(value.shape)} vs model {list(target.shape)}")
    if mismatched:
        raise ValueError(
            f"SAM checkpoint {path}: {len(mismatched)} tensors have unexpected shapes (another "
            f"SAM size or model width?): " + "; ".join(mismatched[:5])
        )
    missing = [
        k
        for k in own
        if k not in updates and k.startswith(_SAM_PREFIXES) and not _HEAD_KEY.match(k)
    ]
    if missing:
        raise ValueError(
            f"SAM checkpoint {path}: lacks {len(missing)} tensors of the model's SAM parts, "
            f"e.g. {', '.join(missing[:5])}"
        )
    report.new = [k for k in own if k not in updates]
    with torch.no_grad():
        for key, value in updates.items():
            own[key].copy_(value)
    return report


def _json_ready(config: Mapping[str, Any]) -> dict[str, Any]:
    try:
        return json.loads(json.dumps(config, sort_keys=False))
    except (TypeError, ValueError) as error:
        raise ValueError(f"checkpoint config is not JSON-serialisable: {error}") from None


def save_checkpoint(
    model: nn.Module,
    directory: str | os.PathLike,
    extra_config: Mapping[str, Any] | None = None,
    extra_files: Mapping[str, Callable[[Path], None]] | None = None,
) -> Path:
    """Write `directory`/model.safetensors and `directory`/config.json (and `extra_files`), as one unit.

    config.json holds ``{"format", "format_version", "model": model.config, **extra_config}``;
    `extra_config` carries what inference needs besides the weights (classes, intensity
    window, normalisation, prompt settings, provenance). `extra_files` maps a file name to a
    function writing that file at the path it is given (e.g. a training state). Everything is
    written to a staging folder that then takes the place of `directory` whole (the old folder
    is moved aside first), so an interruption leaves the old checkpoint or the new one, never
    files of both; see :func:`recover_checkpoint`. A reader that opens the folder's files one
    by one while a save replaces it may still see both.
    """
    directory = Path(directory)
    extra = dict(extra_config or {})
    clash = {"format", "format_version", "model"} & set(extra)
    if clash:
        raise ValueError(f"extra_config may not set reserved keys: {', '.join(sorted(clash))}")
    clash = {WEIGHTS_FILE, CONFIG_FILE} & set(extra_files or {})
    if clash:
        raise ValueError(f"extra_files may not replace {', '.join(sorted(clash))}")
    config = _json_ready(
        {
            "format": CHECKPOINT_FORMAT,
            "format_version": CHECKPOINT_FORMAT_VERSION,
            "model": dict(model.config),
            **extra,
        }
    )
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    directory.parent.mkdir(parents=True, exist_ok=True)
    recover_checkpoint(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"checkpoint path {directory} exists and is not a directory")
    staging = make_staging_dir(directory.parent, f".{directory.name}.staging-")
    try:
        save_file(tensors, staging / WEIGHTS_FILE, metadata={"format": "pt"})
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        for name, write in (extra_files or {}).items():
            write(staging / name)
        replace_folder(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def recover_checkpoint(directory: str | os.PathLike) -> None:
    """Tidy up after a `save_checkpoint` that was killed: killed between its two renames, the
    previous checkpoint (moved aside) takes its place again; killed after them, the previous one
    is removed; staging folders of killed saves are removed. Safe to call from several processes."""
    directory = Path(directory)
    previous = previous_path(directory)
    if previous.is_dir() and not directory.exists():
        try:
            os.replace(previous, directory)
        except FileNotFoundError:  # another process recovered it first
            pass
    if previous.is_dir() and directory.is_dir():
        shutil.rmtree(previous, ignore_errors=True)
    for staging in directory.parent.glob(f".{directory.name}.staging-*"):
        shutil.rmtree(staging, ignore_errors=True)


def read_checkpoint_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The config.json of a checkpoint written by `save_checkpoint`, validated."""
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if not directory.is_dir():
        raise ValueError(f"checkpoint {directory}: no such folder")
    if not config_path.is_file() or not (directory / WEIGHTS_FILE).is_file():
        raise ValueError(f"checkpoint {directory}: needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"checkpoint {directory}: {CONFIG_FILE} is not valid JSON ({error})") from None
    if not isinstance(config, dict) or config.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {directory}: {CONFIG_FILE} is not a {CHECKPOINT_FORMAT} config")
    if config.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise ValueError(
            f"checkpoint {directory}: format_version {config.get('format_version')!r} is not "
            f"supported (expected {CHECKPOINT_FORMAT_VERSION})"
        )
    if not isinstance(config.get("model"), dict) or "name" not in config["model"]:
        raise ValueError(f"checkpoint {directory}: {CONFIG_FILE} has no model config")
    return config


def load_weights(
    model: nn.Module, directory: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Load a checkpoint's weights into `model`, which must have the same config; returns it."""
    directory = Path(directory)
    config = read_checkpoint_config(directory)
    saved, current = config["model"], _json_ready(model.config)
    if saved.get("name") != current.get("name"):
        raise ValueError(
            f"checkpoint {directory} holds model {saved.get('name')!r}, not {current.get('name')!r}"
        )
    if saved != current:
        differing = sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k))
        raise ValueError(
            f"checkpoint {directory}: model config differs in {', '.join(differing)}"
        )
    try:
        state = load_file(directory / WEIGHTS_FILE, device=str(map_location))
    except (SafetensorError, OSError) as error:
        raise ValueError(f"checkpoint {directory}: {WEIGHTS_FILE} is not a readable safetensors file "
                         f"({error})") from None
    own = model.state_dict()
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {directory}: weights do not match the config "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.load_state_dict(state, strict=True)
    return config


def load_checkpoint(
    directory: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model from config.json alone, load its weights; returns (model, config)."""
    from usam.models.registry import create_model

    config = read_checkpoint_config(directory)
    try:
        model = create_model(**config["model"])
    except (ValueError, TypeError) as error:
        raise ValueError(f"checkpoint {directory}: cannot build its model ({error})") from None
    load_weights(model, directory, map_location=map_location)
    return model.to(map_location), config
