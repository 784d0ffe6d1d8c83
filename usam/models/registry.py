"""Model registry: `create_model(name, ...)` and `list_models()`."""
from __future__ import annotations

import inspect
import re
from typing import Any

from torch import nn

from usam.models.sam_baseline import SAMBaseline
from usam.models.sam_weights import load_sam_checkpoint
from usam.models.unet import UNet
from usam.models.usam import USAM

_VIT_B = {
    "embed_dim": 256,
    "vit_embed_dim": 768,
    "vit_depth": 12,
    "vit_num_heads": 12,
    "vit_global_attn_indexes": (2, 5, 8, 11),
    "decoder_depth": 2,
    "decoder_mlp_dim": 2048,
    "decoder_num_heads": 8,
}
# Same code, small enough to train on a CPU: ViT depth 2, width 192 (= 3D), D = 64.
_VIT_TINY = {
    "embed_dim": 64,
    "vit_embed_dim": 192,
    "vit_depth": 2,
    "vit_num_heads": 3,
    "vit_global_attn_indexes": (1,),
    "decoder_depth": 2,
    "decoder_mlp_dim": 256,
    "decoder_num_heads": 4,
}

# "USAM.__init__() " at the start of a TypeError: which class refused an option is not the user's concern
_CALLER = re.compile(r"^[\w.]+\(\) ")

# name -> (class, default keyword arguments)
_MODELS: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    "usam_b": (USAM, _VIT_B),
    "usam_tiny": (USAM, _VIT_TINY),
    "sam_b": (SAMBaseline, _VIT_B),
    "sam_tiny": (SAMBaseline, _VIT_TINY),
    "unet": (UNet, {"base_channels": 256}),
}


def list_models() -> list[str]:
    """Names accepted by `create_model`, sorted."""
    return sorted(_MODELS)


def create_model(
    name: str, num_classes: int = 3, sam_checkpoint: str | None = None, **kwargs: Any
) -> nn.Module:
    """Build a registered model; `kwargs` override its defaults (see each class).

    `sam_checkpoint`: path to an official SAM ViT-B checkpoint (``sam_vit_b_01ec64.pth``) to
    initialise the SAM parts from (a model with ``decoder="released"`` loads it as the released
    code does, see `load_sam_checkpoint`); the load report is kept as ``model.sam_load_report``.
    The returned model's ``config`` rebuilds it: ``create_model(**model.config)``.
    """
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    cls, defaults = _MODELS[name]
    try:
        model = cls(name=name, num_classes=num_classes, **{**defaults, **kwargs})
    except TypeError as error:  # an option the model does not take
        raise ValueError(f"model {name!r}: {_CALLER.sub('', str(error))}") from None
    if sam_checkpoint is not None:
        if not hasattr(model, "prompt_encoder"):
            raise ValueError(f"model {name!r} has no SAM parts to load {sam_checkpoint}")
        style = "released" if model.config.get("decoder") == "released" else "usam"
        model.sam_load_report = load_sam_checkpoint(model, sam_checkpoint, style)
    return model


def takes_option(name: str, option: str) -> bool:
    """True if the registered model `name` takes the keyword argument `option` (its class or a base class)."""
    cls = _MODELS[name][0]
    return any(option in inspect.signature(base.__init__).parameters
               for base in cls.__mro__ if "__init__" in vars(base) and base is not nn.Module)
