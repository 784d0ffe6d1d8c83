"""R2U-Net: a U-Net of recurrent residual convolutional units.

Paper: M. Z. Alom, C. Yakopcic, M. Hasan, T. M. Taha, V. K. Asari, "Recurrent residual U-Net for medical image
segmentation", Journal of Medical Imaging 6(1) 014006 (2019); preprint arXiv:1802.06955 (2018). The authors
published no code; we follow the most widely used implementation,
https://github.com/LeeJunHyun/Image_Segmentation (network.py, ``R2U_Net``).

Configuration, that implementation: widths 64, 128, 256, 512, 1024, recurrence t = 2. Each unit is a 1x1
convolution to the level's width, then two recurrent convolutional layers (one shared 3x3 conv-BN-ReLU applied
t + 1 times, each time to the unit's input plus its last output), added to the 1x1 output; 2x2 max pooling
down; nearest 2x upsampling and a 3x3 conv-BN-ReLU up, concatenation (skip first) and a unit. Ours: one input
channel, N logits with the head's bias at the log class priors.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from usam.models.blocks import init_prior_bias
from usam.models.prompt_free import PromptFreeSegmenter, conv_bn

RECURRENCE = 2  # t


class RecurrentConv(nn.Module):
    """A recurrent convolutional layer unrolled over t steps: y = f(x), then t times y = f(x + y), with f one
    3x3 conv-BN-ReLU: C x H x W -> C x H x W."""

    def __init__(self, channels: int, steps: int = RECURRENCE) -> None:
        super().__init__()
        self.steps = steps
        self.conv = conv_bn(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        for _ in range(self.steps):
            y = self.conv(x + y)
        return y


class RecurrentResidualUnit(nn.Module):
    """RRCNN unit: a 1x1 convolution to C_out, two RecurrentConv layers, plus the 1x1 output:
    C_in x H x W -> C_out x H x W."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.project = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        self.recurrent = nn.Sequential(RecurrentConv(out_channels), RecurrentConv(out_channels))

    def forward(self, x: Tensor) -> Tensor:
        x = self.project(x)
        return x + self.recurrent(x)


class UpConv(nn.Module):
    """Nearest 2x upsampling, 3x3 conv-BN-ReLU: C_in x H x W -> C_out x 2H x 2W."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = conv_bn(in_channels, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class R2UNet(PromptFreeSegmenter):
    """R2U-Net (see the module docstring); `base_channels` is the first level's width (64)."""

    def __init__(self, *, name: str = "r2unet", num_classes: int = 3, img_size: int = 224,
                 points_per_class: int = 0, base_channels: int = 64) -> None:
        super().__init__(name=name, num_classes=num_classes, img_size=img_size, points_per_class=points_per_class,
                         multiple=16, base_channels=base_channels)
        widths = [base_channels * 2**i for i in range(5)]
        self.encoder = nn.ModuleList(
            RecurrentResidualUnit(c_in, c_out) for c_in, c_out in zip([1, *widths[:-1]], widths)
        )
        self.ups = nn.ModuleList(UpConv(widths[i + 1], widths[i]) for i in range(3, -1, -1))
        self.decoder = nn.ModuleList(RecurrentResidualUnit(2 * widths[i], widths[i]) for i in range(3, -1, -1))
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Conv2d(widths[0], num_classes, kernel_size=1)
        init_prior_bias(self.head)

    def segment(self, images: Tensor) -> Tensor:
        skips, x = [], images
        for level, unit in enumerate(self.encoder):
            x = unit(x if level == 0 else self.pool(x))
            skips.append(x)
        skips.pop()
        for up, unit, skip in zip(self.ups, self.decoder, reversed(skips)):
            x = unit(torch.cat([skip, up(x)], dim=1))
        return self.head(x)
