"""Input pipeline: HU window + [0, 1] scaling, resize to the model size, augmentation, prompt points.

The shared preprocessing (``window_normalize``, ``resize_images``, ``resize_labels``,
``preprocess_slices``) is used by training, evaluation and prediction alike, so a checkpoint sees the
same intensities everywhere.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_WINDOW: tuple[float, float] = (-125.0, 275.0)
MODEL_SIZE = 224


def window_normalize(hu: np.ndarray | torch.Tensor, window: tuple[float, float] = DEFAULT_WINDOW):
    """Clip Hounsfield units to ``window = (low, high)`` and scale to [0, 1]; float32, same array type."""
    low, high = float(window[0]), float(window[1])
    if not high > low:
        raise ValueError(f"intensity window must satisfy low < high, got {window}")
    scale = 1.0 / (high - low)
    if isinstance(hu, torch.Tensor):
        return ((hu.float().clamp(low, high) - low) * scale).to(torch.float32)
    out = np.clip(np.asarray(hu, dtype=np.float32), low, high)
    out -= low
    out *= scale
    return out


def resize_images(x: torch.Tensor, size: int = MODEL_SIZE) -> torch.Tensor:
    """Bilinear resize: x (B, 1, H, W) float -> (B, 1, size, size)."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)


def resize_labels(y: torch.Tensor, size: int = MODEL_SIZE) -> torch.Tensor:
    """Nearest-neighbour resize of label maps: y (B, H, W) integer -> (B, size, size) int64."""
    if y.shape[-2:] == (size, size):
        return y.long()
    resized = F.interpolate(y[:, None].float(), size=(size, size), mode="nearest")
    return resized[:, 0].round().long()


def preprocess_slices(
    images_hu: np.ndarray, window: tuple[float, float] = DEFAULT_WINDOW, size: int = MODEL_SIZE
) -> torch.Tensor:
    """Model input from raw slices: images_hu (B, H, W) int16 HU -> (B, 1, size, size) float32 in [0, 1]."""
    images = np.asarray(images_hu)
    if images.ndim == 2:
        images = images[None]
    x = window_normalize(torch.from_numpy(np.ascontiguousarray(images)), window)[:, None]
    return resize_images(x, size).contiguous()
