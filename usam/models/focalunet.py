"""Focal-UNet: a Swin-UNet-like encoder-decoder whose blocks use focal modulation instead of attention.

Paper: M. Naderi, M. Givkashi, F. Piri, N. Karimi, S. Samavi, "Focal-UNet: UNet-like Focal Modulation for
Medical Image Segmentation", arXiv:2212.09263 (2022). Official code: https://github.com/givkashi/Focal-Unet
(networks/FocalNet/classification/focalUnet.py, built by train.py through networks/FocalNet/main.py).

Configuration, the official training script's model (``focalnet_tiny_lrf``): 4x4 patch embedding to C = 96,
four encoder stages of widths C, 2C, 4C, 8C with 4 focal modulation blocks each (focal level 3, focal window 3:
depthwise kernels 3, 5, 7; MLP ratio 4; stochastic depth rising to 0.2) and 2x2 stride-2 patch merging between
them; the skips are each stage's input; decoder (asymmetric, one block per stage): 2x2 transposed-conv patch
expanding, concatenation with the skip and a linear back to the stage width, one focal block, at H/16, H/8,
H/4; LayerNorm, a 4x4 stride-4 transposed convolution to H x W and a 7x7 head. Ours: one input channel (the
official code repeats a grey image to 3); N logits with the head's bias (the official head has none) at the
log class priors; no pretrained weights (the official training loads ImageNet FocalNet-T LRF weights into the
encoder).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.blocks import MLPBlock
from monai.networks.layers import DropPath
from torch import Tensor, nn

from usam.models.blocks import init_prior_bias
from usam.models.prompt_free import PromptFreeSegmenter

ENCODER_DEPTH = 4  # focal blocks per encoder stage
FOCAL_LEVEL = 3
FOCAL_WINDOW = 3
MLP_RATIO = 4
DROP_PATH = 0.2  # stochastic depth of the last encoder block


class FocalModulation(nn.Module):
    """Focal modulation: B x H x W x C -> B x H x W x C.

    One linear gives the query, the context and L + 1 gates; the context passes L depthwise convolutions (kernels
    w, w + 2, ..., GELU), each level's output weighted by its gate and summed with the gated global average of
    the last level; a 1x1 convolution of that sum multiplies the query; an output projection.
    """

    def __init__(self, dim: int, level: int = FOCAL_LEVEL, window: int = FOCAL_WINDOW) -> None:
        super().__init__()
        self.level = level
        self.f = nn.Linear(dim, 2 * dim + level + 1)
        self.h = nn.Conv2d(dim, dim, kernel_size=1)
        self.proj = nn.Linear(dim, dim)
        self.levels = nn.ModuleList(
            nn.Sequential(nn.Conv2d(dim, dim, window + 2 * k, padding=(window + 2 * k) // 2, groups=dim, bias=False),
                          nn.GELU())
            for k in range(level)
        )

    def forward(self, x: Tensor) -> Tensor:
        dim = x.shape[-1]
        q, context, gates = self.f(x).permute(0, 3, 1, 2).split([dim, dim, self.level + 1], dim=1)
        total = 0
        for k, layer in enumerate(self.levels):
            context = layer(context)
            total = total + context * gates[:, k:k + 1]
        total = total + F.gelu(context.mean(dim=(2, 3), keepdim=True)) * gates[:, self.level:]
        return self.proj((q * self.h(total)).permute(0, 2, 3, 1))


class FocalBlock(nn.Module):
    """Pre-norm focal modulation and MLP, each residual with stochastic depth: B x H x W x C -> same."""

    def __init__(self, dim: int, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.modulation = FocalModulation(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, MLP_RATIO * dim)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.modulation(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchConv(nn.Module):
    """A k x k stride-k patch convolution (merging) or transposed convolution (expanding), then LayerNorm:
    B x H x W x C_in -> B x H' x W' x C_out."""

    def __init__(self, in_channels: int, out_channels: int, patch: int, expand: bool = False) -> None:
        super().__init__()
        conv = nn.ConvTranspose2d if expand else nn.Conv2d
        self.proj = conv(in_channels, out_channels, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.proj(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class DecoderStage(nn.Module):
    """Concatenation with the skip, a linear back to C, one focal block, optional 2x patch expanding:
    x, skip B x H x W x C -> B x 2H x 2W x C/2 (or B x H x W x C for the last stage)."""

    def __init__(self, dim: int, drop_path: float, expand: bool) -> None:
        super().__init__()
        self.fuse = nn.Linear(2 * dim, dim)
        self.block = FocalBlock(dim, drop_path)
        self.expand = PatchConv(dim, dim // 2, 2, expand=True) if expand else nn.Identity()

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return self.expand(self.block(self.fuse(torch.cat([x, skip], dim=-1))))


class FocalUNet(PromptFreeSegmenter):
    """Focal-UNet (see the module docstring); `base_channels` is the patch embedding's width C (96)."""

    def __init__(self, *, name: str = "focalunet", num_classes: int = 3, img_size: int = 224,
                 points_per_class: int = 0, base_channels: int = 96) -> None:
        super().__init__(name=name, num_classes=num_classes, img_size=img_size, points_per_class=points_per_class,
                         multiple=32, base_channels=base_channels)
        dims = [base_channels * 2**i for i in range(4)]
        blocks = 4 * ENCODER_DEPTH
        rates = [DROP_PATH * i / (blocks - 1) for i in range(blocks)]  # linear from 0
        self.patch_embed = PatchConv(1, dims[0], 4)
        self.stages = nn.ModuleList(
            nn.Sequential(*(FocalBlock(dims[i], rates[i * ENCODER_DEPTH + j]) for j in range(ENCODER_DEPTH)))
            for i in range(4)
        )
        self.merges = nn.ModuleList(PatchConv(dims[i], dims[i + 1], 2) for i in range(3))
        self.norm = nn.LayerNorm(dims[3])
        self.expand = PatchConv(dims[3], dims[2], 2, expand=True)
        # the official decoder's stochastic depth: stage i takes the encoder schedule's i-th rate
        self.decoder = nn.ModuleList(DecoderStage(dims[i], rates[i], expand=i > 0) for i in range(2, -1, -1))
        self.norm_up = nn.LayerNorm(dims[0])
        self.final_expand = nn.ConvTranspose2d(dims[0], dims[0], kernel_size=4, stride=4)
        self.head = nn.Conv2d(dims[0], num_classes, kernel_size=7, padding=3)
        self.apply(_init_linear_and_norm)
        init_prior_bias(self.head)

    def segment(self, images: Tensor) -> Tensor:
        x = self.patch_embed(images.permute(0, 2, 3, 1))  # B x H/4 x W/4 x C
        skips = []
        for i, stage in enumerate(self.stages):
            skips.append(x)
            x = stage(x)
            if i < 3:
                x = self.merges[i](x)
        x = self.expand(self.norm(x))
        for stage, skip in zip(self.decoder, reversed(skips[:3])):
            x = stage(x, skip)
        x = self.final_expand(self.norm_up(x).permute(0, 3, 1, 2))
        return self.head(x)


def _init_linear_and_norm(m: nn.Module) -> None:
    """The official initialisation: linear weights truncated normal (std 0.02), biases 0; LayerNorm 1 and 0."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
