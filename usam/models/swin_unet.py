"""Swin-Unet (Swin Transformer encoder, patch-expanding Swin decoder, skips), on MONAI's Swin Transformer.

Paper: H. Cao et al., "Swin-Unet: Unet-like Pure Transformer for Medical Image Segmentation", ECCV
Workshops 2022. Official code: github.com/HuCaoFighting/Swin-Unet
(``networks/swin_transformer_unet_skip_expand_decoder_sys.py``, ``configs/swin_tiny_patch4_window7_224_lite.yaml``).
Built on: ``monai.networks.nets.swin_unetr.SwinTransformer`` (encoder: patch embedding, shifted-window
blocks with relative position bias, patch merging) and its ``BasicLayer`` (the decoder's Swin blocks);
written here: patch expanding, the skip fusion and the head. timm's Swin would serve as well, but timm
cannot be imported without torchvision, which has no build for the CPU torch.
Our configuration, the official one at 224 x 224: patch 4, embedding 96, window 7, stage depths
(2, 2, 2, 2) with 3, 6, 12, 24 heads (the official "swin_tiny ... lite" config; Swin-T's ImageNet
model has (2, 2, 6, 2)), MLP ratio 4, qkv bias, patch norm, stochastic depth 0.2, no absolute positions.

- Encoder: 96 x S/4 -> stages with patch merging -> 768 x S/32; the skips are each stage's input
  (96 x S/4, 192 x S/8, 384 x S/16), the bottleneck is LayerNorm'd. MONAI also merges after the last
  stage (for SwinUNETR); that merge is removed.
- Decoder: patch expanding (linear C -> 2C, 2 x 2 pixel shuffle to C/2, LayerNorm) to 384 x S/16; then
  per stage: concatenation with the skip, linear 2C -> C, the stage's Swin blocks (depth and heads of the
  mirrored encoder stage), patch expanding (all but the last); LayerNorm; final 4x expanding (linear
  C -> 16C, 4 x 4 pixel shuffle, LayerNorm) and a 1 x 1 convolution (no bias) to N classes.
- The grey slice is repeated over three channels, as the official forward does.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from monai.networks.nets.swin_unetr import BasicLayer, SwinTransformer
from torch import Tensor, nn

from usam.models.pretrained import load_renamed
from usam.models.prompt_free import PromptFreeSegmenter
from usam.models.sam_weights import LoadReport

# official Swin Transformer keys: a block's tensors, a patch merging's; the block layers MONAI names otherwise
_SWIN_BLOCK = re.compile(r"layers\.(\d)\.blocks\.(\d+)\.(.+)")
_SWIN_MERGE = re.compile(r"layers\.(\d)\.downsample\.((?:reduction|norm)\.\w+)")
_BLOCK_RENAMES = {"mlp.fc1.": "mlp.linear1.", "mlp.fc2.": "mlp.linear2."}
_BLOCK_BUFFERS = ("attn.relative_position_index", "attn_mask")


class PatchExpand(nn.Module):
    """Patch expanding: a linear layer, then a scale x scale pixel shuffle of its output, then LayerNorm."""

    def __init__(self, dim: int, scale: int) -> None:
        """scale 2: C -> C/2 channels (Swin-Unet's patch expanding); scale 4: C -> C (its final expanding)."""
        super().__init__()
        self.scale = scale
        self.out_dim = dim // 2 if scale == 2 else dim
        self.expand = nn.Linear(dim, scale * scale * self.out_dim, bias=False)
        self.norm = nn.LayerNorm(self.out_dim)

    def forward(self, x: Tensor) -> Tensor:
        """x B x C x h x w -> B x C_out x (scale h) x (scale w)."""
        b, _, h, w = x.shape
        s, c = self.scale, self.out_dim
        x = self.expand(x.permute(0, 2, 3, 1))  # B x h x w x (s s C_out), channels in (p1 p2 c) order
        x = x.reshape(b, h, w, s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h * s, w * s, c)
        return self.norm(x).permute(0, 3, 1, 2)


class ChannelsLast(nn.Module):
    """Apply a module that acts on the last dimension (Linear, LayerNorm) to B x C x h x w maps."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: Tensor) -> Tensor:
        return self.module(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SwinUNet(PromptFreeSegmenter):
    """Swin-Unet on B x 1 x S x S slices (S a multiple of 32) -> B x N x S x S logits; points are ignored."""

    def __init__(
        self,
        *,
        name: str = "swin_unet",
        num_classes: int = 3,
        img_size: int = 224,
        points_per_class: int = 0,
        embed_dim: int = 96,
        depths: tuple[int, ...] | list[int] = (2, 2, 2, 2),
        num_heads: tuple[int, ...] | list[int] = (3, 6, 12, 24),
        window_size: int = 7,
        drop_path_rate: float = 0.2,
    ) -> None:
        """Defaults: the official configuration; smaller values give a model for CPU tests."""
        options: dict[str, Any] = {"embed_dim": embed_dim, "depths": [int(d) for d in depths],
                                   "num_heads": [int(h) for h in num_heads], "window_size": window_size,
                                   "drop_path_rate": drop_path_rate}
        super().__init__(name=name, num_classes=num_classes, img_size=img_size, points_per_class=points_per_class,
                         multiple=32, **options)
        depths, heads = options["depths"], options["num_heads"]
        if len(depths) != 4 or len(heads) != 4:
            raise ValueError("depths and num_heads need 4 values (one per stage)")
        window = (window_size, window_size)
        self.encoder = SwinTransformer(in_chans=3, embed_dim=embed_dim, window_size=window, patch_size=(4, 4),
                                       depths=depths, num_heads=heads, drop_path_rate=drop_path_rate,
                                       patch_norm=True, spatial_dims=2)
        # the encoder's stochastic depth (rising linearly over its blocks), mirrored in the decoder
        drop_path = [drop_path_rate * i / max(sum(depths) - 1, 1) for i in range(sum(depths))]
        self.encoder.layers4[0].downsample = None  # Swin-Unet's bottleneck stays at S/32
        self.norm = ChannelsLast(nn.LayerNorm(8 * embed_dim))
        self.expand_bottleneck = PatchExpand(8 * embed_dim, scale=2)
        self.fuse = nn.ModuleList()
        self.stages = nn.ModuleList()
        self.expands = nn.ModuleList()
        for stage in (2, 1, 0):  # the mirrored encoder stage
            dim = embed_dim * 2**stage
            self.fuse.append(ChannelsLast(nn.Linear(2 * dim, dim)))
            self.stages.append(BasicLayer(dim=dim, depth=depths[stage], num_heads=heads[stage], window_size=window,
                                          drop_path=drop_path[sum(depths[:stage]):sum(depths[:stage + 1])],
                                          qkv_bias=True, downsample=None))
            self.expands.append(PatchExpand(dim, scale=2) if stage else nn.Identity())
        self.norm_up = ChannelsLast(nn.LayerNorm(embed_dim))
        self.expand_final = PatchExpand(embed_dim, scale=4)
        self.head = nn.Conv2d(embed_dim, num_classes, kernel_size=1, bias=False)

    def encoder_modules(self) -> list[nn.Module]:
        return [self.encoder]

    def load_pretrained(self, path: str | os.PathLike) -> LoadReport:
        """Initialise from an official Swin Transformer ImageNet checkpoint (swin_tiny_patch4_window7_224.pth),
        as Swin-Unet's ``load_from`` does: the encoder and its final norm, and each decoder stage's Swin blocks
        from the mirrored encoder stage; blocks the file has beyond this model's depth, its classifier and its
        buffers are skipped. Read with ``torch.load(weights_only=True)``."""
        state = _read_swin_state(Path(path))
        tensors: dict[str, Tensor] = {}
        skipped: dict[str, str] = {}
        own = self.state_dict()
        for key, value in state.items():
            targets = _swin_targets(key)
            kept = [t for t in targets if t in own]
            for target in kept:
                tensors[target] = value
            if not kept:
                skipped[key] = "not in this model" if targets else "not a Swin encoder tensor (classifier, buffer)"
        return load_renamed(self, tensors, skipped, f"Swin checkpoint {path}")

    def forward(self, images: Tensor, points: Tensor | None = None, point_labels: Tensor | None = None) -> Tensor:
        """images B x 1 x S x S in [0, 1] -> B x N x S x S logits."""
        self.check_images(images)
        x0, x1, x2, _, x4 = self.encoder(images.expand(-1, 3, -1, -1), normalize=False)
        x = self.expand_bottleneck(self.norm(x4))  # 4C x S/16
        for fuse, stage, expand, skip in zip(self.fuse, self.stages, self.expands, (x2, x1, x0)):
            x = expand(stage(fuse(torch.cat([x, skip], dim=1))))
        return self.head(self.expand_final(self.norm_up(x)))


def _read_swin_state(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise ValueError(f"Swin checkpoint {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling refused or not a torch file at all
        raise ValueError(f"Swin checkpoint {path}: not a plain torch file of tensors "
                         f"({type(error).__name__})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # the official release wraps the weights as {"model": ...}
    if not isinstance(state, dict) or "patch_embed.proj.weight" not in state or "layers.0.blocks.0.norm1.weight" \
            not in state:
        raise ValueError(f"Swin checkpoint {path}: no patch_embed.* and layers.* tensors, not an official Swin "
                         "Transformer checkpoint (swin_tiny_patch4_window7_224.pth)")
    return {k: v for k, v in state.items() if isinstance(v, Tensor)}


def _swin_targets(key: str) -> list[str]:
    """This model's keys for an official Swin key: one in the encoder, and for a block of stages 0-2 one in the
    mirrored decoder stage (decoder stage i holds encoder stage 2 - i); none for buffers and the classifier."""
    if key.startswith("patch_embed."):
        return ["encoder." + key]
    if key in ("norm.weight", "norm.bias"):
        return ["norm.module." + key.removeprefix("norm.")]
    if match := _SWIN_MERGE.fullmatch(key):
        return [f"encoder.layers{int(match[1]) + 1}.0.downsample.{match[2]}"]
    match = _SWIN_BLOCK.fullmatch(key)
    if match is None or match[3].startswith(_BLOCK_BUFFERS):
        return []
    part = match[3]
    for old, new in _BLOCK_RENAMES.items():
        if part.startswith(old):
            part = new + part.removeprefix(old)
    stage, name = int(match[1]), f"blocks.{match[2]}.{part}"
    return [f"encoder.layers{stage + 1}.0.{name}"] + ([f"stages.{2 - stage}.{name}"] if stage < 3 else [])
