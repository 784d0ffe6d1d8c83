"""MultiResUNet: a U-Net of MultiRes blocks (factorised 3x3 / 5x5 / 7x7 receptive fields) and Res paths.

Paper: N. Ibtehaz, M. S. Rahman, "MultiResUNet: Rethinking the U-Net architecture for multimodal biomedical
image segmentation", Neural Networks 121 (2020) 74-87. Official code: https://github.com/nibtehaz/MultiResUNet
(tensorflow/MultiResUNet.py, the original Keras model; pytorch/MultiResUNet.py is a later port).

Configuration, the paper and its Keras model: U = 32, 64, 128, 256, 512 per level, alpha = 1.67 (W = alpha U,
three chained 3x3 convolutions of int(0.167 W), int(0.333 W), int(0.5 W) filters plus a 1x1 shortcut), Res paths
of 4, 3, 2, 1 residual units with U filters (32, 64, 128, 256), 2x2 stride-2 transposed convolutions up.
Ours: one input channel; BatchNorm with a learned scale everywhere (Keras' conv-BN pairs have none); a head of N
logits, a biased 1x1 convolution (Keras: 1x1 conv-BN, sigmoid) with its bias at the log class priors.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from usam.models.blocks import init_prior_bias
from usam.models.prompt_free import PromptFreeSegmenter, conv_bn

ALPHA = 1.67
RES_PATH_LENGTHS = (4, 3, 2, 1)  # residual units on the skips of levels 1..4


def multires_widths(u: int) -> tuple[int, int, int]:
    """Filters of a MultiRes block's three chained 3x3 convolutions for a U-Net level of `u` filters."""
    w = ALPHA * u
    return int(w * 0.167), int(w * 0.333), int(w * 0.5)


class MultiResBlock(nn.Module):
    """Three chained 3x3 conv-BN-ReLU (receptive fields 3, 5, 7) concatenated and normalised, plus a 1x1 conv-BN
    shortcut, then ReLU and BN: C_in x H x W -> C_out x H x W, C_out = sum(multires_widths(u))."""

    def __init__(self, in_channels: int, u: int) -> None:
        super().__init__()
        widths = multires_widths(u)
        self.out_channels = sum(widths)
        self.shortcut = conv_bn(in_channels, self.out_channels, kernel_size=1, relu=False, bias=False)
        self.convs = nn.ModuleList(
            conv_bn(c_in, c_out, bias=False) for c_in, c_out in zip((in_channels, *widths[:2]), widths)
        )
        self.concat_norm = nn.BatchNorm2d(self.out_channels)
        self.out_norm = nn.BatchNorm2d(self.out_channels)

    def forward(self, x: Tensor) -> Tensor:
        features, y = [], x
        for conv in self.convs:
            y = conv(y)
            features.append(y)
        return self.out_norm(F.relu(self.concat_norm(torch.cat(features, dim=1)) + self.shortcut(x)))


class ResPathUnit(nn.Module):
    """3x3 conv-BN-ReLU plus a 1x1 conv-BN shortcut, then ReLU and BN: C_in x H x W -> C_out x H x W."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = conv_bn(in_channels, out_channels, bias=False)
        self.shortcut = conv_bn(in_channels, out_channels, kernel_size=1, relu=False, bias=False)
        self.norm = nn.BatchNorm2d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(F.relu(self.conv(x) + self.shortcut(x)))


def res_path(in_channels: int, out_channels: int, length: int) -> nn.Sequential:
    """`length` ResPathUnits on a skip: C_in x H x W -> C_out x H x W."""
    return nn.Sequential(*(ResPathUnit(in_channels if i == 0 else out_channels, out_channels) for i in range(length)))


class MultiResUNet(PromptFreeSegmenter):
    """MultiResUNet (see the module docstring); `base_channels` is the first level's U."""

    def __init__(self, *, name: str = "multiresunet", num_classes: int = 3, img_size: int = 224,
                 points_per_class: int = 0, base_channels: int = 32) -> None:
        super().__init__(name=name, num_classes=num_classes, img_size=img_size, points_per_class=points_per_class,
                         multiple=16, base_channels=base_channels)
        u = [base_channels * 2**i for i in range(5)]
        self.encoder = nn.ModuleList()
        self.res_paths = nn.ModuleList()
        channels = 1
        for level in range(5):
            block = MultiResBlock(channels, u[level])
            self.encoder.append(block)
            channels = block.out_channels
            if level < 4:
                self.res_paths.append(res_path(channels, u[level], RES_PATH_LENGTHS[level]))
        self.ups = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for level in range(3, -1, -1):
            self.ups.append(nn.ConvTranspose2d(channels, u[level], kernel_size=2, stride=2))
            block = MultiResBlock(2 * u[level], u[level])
            self.decoder.append(block)
            channels = block.out_channels
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Conv2d(channels, num_classes, kernel_size=1)
        init_prior_bias(self.head)

    def segment(self, images: Tensor) -> Tensor:
        skips, x = [], images
        for level, block in enumerate(self.encoder):
            x = block(x)
            if level < 4:
                skips.append(self.res_paths[level](x))
                x = self.pool(x)
        for up, block, skip in zip(self.ups, self.decoder, reversed(skips)):
            x = block(torch.cat([up(x), skip], dim=1))
        return self.head(x)
