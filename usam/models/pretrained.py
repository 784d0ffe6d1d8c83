"""Copying an official pretrained file's tensors, renamed to this model's keys, into the model (all or none)."""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from usam.models.sam_weights import LoadReport


def load_renamed(model: nn.Module, tensors: Mapping[str, torch.Tensor], skipped: Mapping[str, str],
                 source: str) -> LoadReport:
    """Copy `tensors` (this model's key -> value) into `model`; every other model tensor is reported as new.

    `skipped`: the file's keys left out and why. Raises ValueError, one line, when a key is not the model's
    or a shape differs (another configuration), before anything is copied.
    """
    own = model.state_dict()
    unknown = [key for key in tensors if key not in own]
    mismatched = [f"{key} {list(value.shape)} vs model {list(own[key].shape)}"
                  for key, value in tensors.items() if key in own and value.shape != own[key].shape]
    if unknown or mismatched:
        raise ValueError(f"{source}: {len(unknown) + len(mismatched)} tensors do not fit this model (another "
                         f"configuration?): " + "; ".join((mismatched + unknown)[:4]))
    with torch.no_grad():
        for key, value in tensors.items():
            own[key].copy_(value)
    return LoadReport(loaded=list(tensors), skipped=dict(skipped), new=[k for k in own if k not in tensors])
