"""Official SAM weights (e.g. sam_vit_b_01ec64.pth) loaded into a model's SAM parts, resized to its input size."""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from care_dataset.error_text import error_line

# Mask-decoder keys that may legitimately differ from SAM's (its 4 mask tokens, 4 hypernetwork
# MLPs, IoU head, output upscaling): loaded where name and shape agree, skipped otherwise.
_HEAD_KEY = re.compile(
    r"mask_decoder\.(mask_tokens|output_hypernetworks_mlps|iou_prediction_head|output_upscaling)\."
)
_SAM_PREFIXES = ("image_encoder.", "prompt_encoder.", "mask_decoder.")
# Layers a model adds inside SAM's parts (SAMed's LoRA matrices): new, never in a SAM file.
_ADDED_KEY = re.compile(r"\.lora_\w+\.weight$")


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


LOADING_STYLES = ("usam", "released")


def _resize_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
    """1 x H x W x C absolute position embedding -> 1 x h x w x C: bicubic, antialiased (ours), or bilinear
    without antialiasing (`mode="bilinear"`, the released code's)."""
    x = pos_embed.permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=grid, mode=mode, align_corners=False, antialias=mode == "bicubic")
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


def load_sam_checkpoint(model: nn.Module, path: str | os.PathLike, style: str = "usam") -> LoadReport:
    """Initialise `model`'s SAM parts from an official SAM checkpoint (e.g. sam_vit_b_01ec64.pth).

    The file is read with ``torch.load(weights_only=True)``. ``pos_embed`` is resized to the
    model's token grid and relative-position tables to the model's rows (linear).
    Keys the model lacks (the patch embedding for U-SAM, a fourth mask MLP, the IoU head) are
    skipped. `style` "usam": mask-decoder head keys (mask tokens, hypernetwork MLPs, IoU head,
    upscaling) load where their shape agrees, and ``pos_embed`` is resized bicubic (antialiased);
    "released" (as the released code's ``load_from``): every such head key is skipped, and
    ``pos_embed`` is resized bilinear. Every model tensor not filled from the file is reported as
    new. Any other shape mismatch, or a SAM part of the model missing from the file, raises
    ValueError.
    """
    if style not in LOADING_STYLES:
        raise ValueError(f"SAM checkpoint loading style must be one of {', '.join(LOADING_STYLES)}, got {style!r}")
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
        if style == "released" and _HEAD_KEY.match(key):
            report.skipped[key] = "not loaded by the released code (mask-decoder head)"
            continue
        if value.shape == target.shape:
            updates[key] = value
            report.loaded.append(key)
            continue
        resized = None
        if key.endswith(".pos_embed") and value.ndim == 4 and value.shape[3] == target.shape[3]:
            resized = _resize_pos_embed(value, tuple(target.shape[1:3]),
                                        "bilinear" if style == "released" else "bicubic")
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
        if k not in updates and k.startswith(_SAM_PREFIXES) and not _HEAD_KEY.match(k) and not _ADDED_KEY.search(k)
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
