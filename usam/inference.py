"""What usam eval and usam predict (and usam fit, for the device) share: settings from a checkpoint config,
the device, model input from HU slices, the forward pass in batches, labels from logits."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from usam.data import (
    CLAHE_EVAL_CLIP,
    DEFAULT_WINDOW,
    MODEL_SIZE,
    RESIZE_KERNELS,
    preprocess_slices,
    resize_images,
    window_normalize,
)
from usam.prompts import PromptProtocol


class InputError(ValueError):
    """A problem with the user's input, reported as one line."""


@dataclass(frozen=True)
class InferenceSettings:
    """What inference needs from a checkpoint besides the weights."""

    class_names: tuple[str, ...]
    window: tuple[float, float]
    img_size: int
    points_per_class: int  # the model's prompt slots per class (0: the model takes no prompts)
    prompt_style: str = "classwise"  # how the model was prompted in training (usam.prompts)
    eval_points: str = "interior"  # where its validation points were placed
    point_order: str = "xy"  # the axis order of its point coordinates
    clahe: bool = False  # CLAHE before resizing (usam.data.clahe)
    resize: str = "bilinear"  # resize kernel (usam.data)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def corner_aligned(self) -> bool:
        """True where the resize aligns corner pixels (the released code's zoom) rather than pixel edges."""
        return self.resize == "cubic"

    def protocol(self) -> PromptProtocol:
        return PromptProtocol(self.prompt_style, self.eval_points, self.point_order)


def config_value(config: Mapping[str, Any], *keys: str) -> Any:
    """The first of `keys` found at the top level of `config`, else in one of its sub-tables."""
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    for value in config.values():
        if isinstance(value, Mapping):
            for key in keys:
                if value.get(key) is not None:
                    return value[key]
    return None


def inference_settings(config: Mapping[str, Any]) -> InferenceSettings:
    """Read class names, HU window, input size and prompt slots from a checkpoint config.

    The model table (``config["model"]``) gives num_classes, img_size and points_per_class; class
    names ('class_names' or 'classes') and the window ('window') are looked up at the top level,
    then in the config's sub-tables. A config without a window gets DEFAULT_WINDOW.
    """
    model = config.get("model", {}) if isinstance(config.get("model"), Mapping) else {}
    num_classes = int(model.get("num_classes") or config_value(config, "num_classes") or 0)
    names = config_value(config, "class_names", "classes")
    if names is None:
        names = ["background"] + [f"class {c}" for c in range(1, num_classes)]
    names = tuple(str(n) for n in names)
    if num_classes and len(names) != num_classes:
        raise InputError(f"checkpoint: {len(names)} class names for a {num_classes}-class model")
    window = config_value(config, "window")
    try:
        window = tuple(float(v) for v in (window if window is not None else DEFAULT_WINDOW))
    except (TypeError, ValueError):
        raise InputError(f"checkpoint: invalid intensity window {window!r}") from None
    if len(window) != 2 or not window[1] > window[0]:
        raise InputError(f"checkpoint: invalid intensity window {window}")
    img_size = int(model.get("img_size") or config_value(config, "img_size") or MODEL_SIZE)
    points_per_class = int(model.get("points_per_class", 0))
    # written by usam fit since recipes exist; a checkpoint without them was trained as the defaults say
    pipeline = {"prompt_style": model.get("prompt_style", "classwise"),
                "eval_points": config.get("eval_points", "interior"), "point_order": config.get("point_order", "xy"),
                "clahe": config.get("clahe", False), "resize": config.get("resize", "bilinear")}
    settings = InferenceSettings(names, window, img_size, points_per_class, **pipeline)
    try:
        settings.protocol().check(0)
    except ValueError as error:
        raise InputError(f"checkpoint: {error}") from None
    if settings.resize not in RESIZE_KERNELS or not isinstance(settings.clahe, bool):
        raise InputError(f"checkpoint: invalid preprocessing (resize {settings.resize!r}, clahe {settings.clahe!r})")
    return settings


def choose_device(name: str = "auto", local_rank: int | None = None) -> torch.device:
    """The device ``--device`` names: auto (CUDA when present, else CPU), cpu, cuda or cuda:N.

    CUDA always comes with an index: a bare cuda (or auto) is cuda:0, and under torchrun (``local_rank``
    given) every CUDA choice is the rank's own GPU, cuda:LOCAL_RANK. Raises InputError, one line, for
    another name or for CUDA where there is none.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"--device {name!r}: not a device; give auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index is not None):
        raise InputError(f"--device {name!r}: give auto, cpu, cuda or cuda:N")
    if device.type == "cpu":
        return device
    if not torch.cuda.is_available():
        raise InputError(f"--device {name!r}: CUDA is not available on this machine")
    return torch.device("cuda", local_rank if local_rank is not None else device.index or 0)


def model_input(images_hu: np.ndarray, settings: InferenceSettings, device: torch.device) -> torch.Tensor:
    """(B, H, W) int16 HU -> (B, 1, S, S) float32 in [0, 1] on `device`.

    The same operations as `usam.data.preprocess_slices` (window, then bilinear resize), run on the
    device so that only int16 voxels cross to it; with CLAHE or the cubic resize, `preprocess_slices` itself
    on the CPU (CLAHE at its evaluation clip limit).
    """
    if settings.clahe or settings.resize != "bilinear":
        clip = CLAHE_EVAL_CLIP if settings.clahe else None
        x = preprocess_slices(images_hu, settings.window, settings.img_size, clip, settings.resize)
        return x.to(device, non_blocking=True).contiguous()
    hu = torch.from_numpy(np.ascontiguousarray(images_hu)).to(device, non_blocking=True)
    return resize_images(window_normalize(hu, settings.window)[:, None], settings.img_size).contiguous()


def forward_logits(
    model: nn.Module,
    images: torch.Tensor,
    points: torch.Tensor | None,
    point_labels: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor:
    """One batch through the model: images B x 1 x S x S -> float32 logits B x C x S x S on `device`.

    bf16 autocast and channels_last on CUDA; plain fp32 on CPU.
    """
    images = images.to(device, non_blocking=True)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    if points is not None:
        points = points.to(device, non_blocking=True)
        point_labels = point_labels.to(device, non_blocking=True)
    with inference_context(device):
        logits = model(images, points, point_labels)
    return logits.float()


@contextmanager
def inference_context(device: torch.device) -> Iterator[None]:
    """Inference mode, and bf16 autocast on CUDA."""
    with torch.inference_mode(), torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                                                enabled=device.type == "cuda"):
        yield


def class_argmax(logits: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """The class of each pixel, the first maximum along `dim` as ``argmax`` gives it: ``max(dim).indices``, which on
    CPU tensors is about 20x faster than ``argmax`` across the class axis."""
    return logits.max(dim=dim).indices


def logits_to_labels(logits: torch.Tensor, height: int, width: int, corner_aligned: bool = False) -> torch.Tensor:
    """B x C x S x S logits -> B x height x width uint8 labels (bilinear logits, then argmax); `corner_aligned`
    for a model whose input was resized with corner pixels aligned (`InferenceSettings.corner_aligned`)."""
    if tuple(logits.shape[-2:]) != (height, width):
        logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=corner_aligned)
    return class_argmax(logits).to(torch.uint8)


def iter_batches(n: int, batch_size: int) -> Iterator[slice]:
    """Consecutive slices of at most batch_size over range(n)."""
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def segment_slices(
    model: nn.Module,
    settings: InferenceSettings,
    images_hu: np.ndarray,
    points: np.ndarray | None = None,
    point_labels: np.ndarray | None = None,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Label every slice: images_hu (n, H, W) int16 HU, points (n, K, 2) model-input (x, y) and
    point_labels (n, K) or None -> (n, H, W) uint8 at the slices' own resolution."""
    device = torch.device(device)
    n, height, width = images_hu.shape
    out = np.zeros((n, height, width), dtype=np.uint8)
    for batch in iter_batches(n, batch_size):
        x = model_input(images_hu[batch], settings, device)
        p = l = None
        if points is not None:
            p = torch.from_numpy(np.ascontiguousarray(points[batch], dtype=np.float32))
            l = torch.from_numpy(np.ascontiguousarray(point_labels[batch], dtype=np.int64))
        logits = forward_logits(model, x, p, l, device)
        out[batch] = logits_to_labels(logits, height, width, settings.corner_aligned).cpu().numpy()
    return out
