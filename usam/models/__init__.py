"""The U-SAM model zoo: U-SAM, the SAM baseline, a U-Net, the seed paper's baselines; registry, official SAM
weights and checkpoints."""
from __future__ import annotations

from usam.models.checkpoints import load_checkpoint, load_weights, save_checkpoint
from usam.models.registry import create_model, list_models
from usam.models.sam_baseline import SAMBaseline
from usam.models.sam_weights import LoadReport, load_sam_checkpoint
from usam.models.unet import UNet
from usam.models.usam import USAM

__all__ = [
    "USAM",
    "SAMBaseline",
    "UNet",
    "LoadReport",
    "create_model",
    "list_models",
    "load_checkpoint",
    "load_sam_checkpoint",
    "load_weights",
    "save_checkpoint",
]
