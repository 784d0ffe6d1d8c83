"""Saving and loading our own checkpoints (safetensors + JSON), written all or nothing."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from care_dataset.files import make_staging_dir, previous_path, replace_folder
from usam.models.registry import create_model

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CHECKPOINT_FORMAT = "usam-checkpoint"
CHECKPOINT_FORMAT_VERSION = 1
# model options added after checkpoints were first written, with the value a model config without them had
ADDED_MODEL_OPTIONS = {"prompt_style": "classwise", "decoder": "class_tokens", "head_bias": "prior"}


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
    saved = {**{k: v for k, v in ADDED_MODEL_OPTIONS.items() if k in current}, **saved}
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
    config = read_checkpoint_config(directory)
    try:
        model = create_model(**config["model"])
    except (ValueError, TypeError) as error:
        raise ValueError(f"checkpoint {directory}: cannot build its model ({error})") from None
    load_weights(model, directory, map_location=map_location)
    return model.to(map_location), config


def checkpoint_digest(directory: str | os.PathLike, length: int = 12) -> str:
    """The first `length` hex digits of the SHA-256 of the checkpoint's config.json and then its model.safetensors:
    names these exact weights (as the version of a DICOM output's algorithm) without naming any path."""
    digest = hashlib.sha256()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        with open(Path(directory) / name, "rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:length]
