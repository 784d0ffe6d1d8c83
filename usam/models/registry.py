"""Model registry: `create_model(name, ...)` and `list_models()`."""
from __future__ import annotations

import importlib
import inspect
import re
from typing import Any

from torch import nn

from usam.models.sam_weights import load_sam_checkpoint

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

# SAM ViT-H (SAMed-H): width 1280, depth 32, 16 heads, global attention in blocks 7, 15, 23, 31
_VIT_H = {**_VIT_B, "vit_embed_dim": 1280, "vit_depth": 32, "vit_num_heads": 16,
          "vit_global_attn_indexes": (7, 15, 23, 31)}

# "USAM.__init__() " at the start of a TypeError: which class refused an option is not the user's concern
_CALLER = re.compile(r"^[\w.]+\(\) ")

# name -> ("module:Class" under usam.models, default keyword arguments). A class is imported when it is first
# built: the MONAI-based baselines take seconds to import, which every usam command would otherwise pay.
_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "usam_b": ("usam:USAM", _VIT_B),
    "usam_tiny": ("usam:USAM", _VIT_TINY),
    "sam_b": ("sam_baseline:SAMBaseline", _VIT_B),
    "sam_tiny": ("sam_baseline:SAMBaseline", _VIT_TINY),
    "unet": ("unet:UNet", {"base_channels": 256}),
    "uctransnet": ("uctransnet:UCTransNet", {"base_channels": 64}),
    "multiresunet": ("multiresunet:MultiResUNet", {"base_channels": 32}),
    "resunetpp": ("resunetpp:ResUNetPlusPlus", {"base_channels": 16}),
    "missformer": ("missformer:MISSFormer", {"base_channels": 64}),
    "r2unet": ("r2unet:R2UNet", {"base_channels": 64}),
    "focalunet": ("focalunet:FocalUNet", {"base_channels": 96}),
    "vnet": ("vnet:VNet2D", {}),
    "attention_unet": ("attention_unet:AttentionUNet", {}),
    "transunet": ("transunet:TransUNet", {}),
    "swin_unet": ("swin_unet:SwinUNet", {}),
    "samed_b": ("samed:SAMed", _VIT_B),
    "samed_h": ("samed:SAMed", _VIT_H),
    "samed_tiny": ("samed:SAMed", _VIT_TINY),
}


def list_models() -> list[str]:
    """Names accepted by `create_model`, sorted."""
    return sorted(_MODELS)


def model_class(name: str) -> type[nn.Module]:
    """The class `create_model(name)` builds."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    module, cls = _MODELS[name][0].split(":")
    return getattr(importlib.import_module(f"usam.models.{module}"), cls)


def create_model(
    name: str, num_classes: int = 3, sam_checkpoint: str | None = None, pretrained: str | None = None,
    **kwargs: Any
) -> nn.Module:
    """Build a registered model; `kwargs` override its defaults (see each class).

    `sam_checkpoint`: path to an official SAM checkpoint (``sam_vit_b_01ec64.pth``; ViT-H for `samed_h`) to
    initialise the SAM parts from (a model with ``decoder="released"`` loads it as the released code does, see
    `load_sam_checkpoint`); the load report is kept as ``model.sam_load_report``. `pretrained`: the official
    ImageNet weights a baseline's encoder starts from (its ``load_pretrained``; report in
    ``model.pretrained_load_report``).
    The returned model's ``config`` rebuilds it: ``create_model(**model.config)``.
    """
    cls, defaults = model_class(name), _MODELS[name][1]
    try:
        model = cls(name=name, num_classes=num_classes, **{**defaults, **kwargs})
    except TypeError as error:  # an option the model does not take
        raise ValueError(f"model {name!r}: {_CALLER.sub('', str(error))}") from None
    if sam_checkpoint is not None:
        if not hasattr(model, "prompt_encoder"):
            raise ValueError(f"model {name!r} has no SAM parts to load {sam_checkpoint}")
        style = "released" if model.config.get("decoder") == "released" else "usam"
        model.sam_load_report = load_sam_checkpoint(model, sam_checkpoint, style)
    if pretrained is not None:
        if not hasattr(model, "load_pretrained"):
            raise ValueError(f"model {name!r} takes no pretrained weights file ({pretrained})")
        model.pretrained_load_report = model.load_pretrained(pretrained)
    return model


def takes_option(name: str, option: str) -> bool:
    """True if the registered model `name` takes the keyword argument `option` (its class or a base class)."""
    cls = model_class(name)
    return any(option in inspect.signature(base.__init__).parameters
               for base in cls.__mro__ if "__init__" in vars(base) and base is not nn.Module)
