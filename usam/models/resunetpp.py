"""ResUNet++: a residual U-Net with squeeze-and-excitation, ASPP bridges and attention on the decoder.

Paper: D. Jha, P. H. Smedsrud, M. A. Riegler, D. Johansen, T. de Lange, P. Halvorsen, H. D. Johansen,
"ResUNet++: An Advanced Architecture for Medical Image Segmentation", IEEE ISM 2019. Official code:
https://github.com/DebeshJha/ResUNetPlusPlus (m_resunet.py, Keras; resunet++_pytorch.py, the authors' port).

Configuration, the official model: filters 16, 32, 64, 128, 256; a stem unit and three stride-2 residual units
(pre-activated BN-ReLU-conv3x3 twice, 1x1 conv-BN shortcut, squeeze-and-excitation with ratio 8); an ASPP bridge
(3x3 conv-BN branches dilated 1, 6, 12, 18, summed, 1x1 conv) of 256 filters; three decoder steps (attention of
the encoder feature on the decoder feature, nearest 2x upsampling, concatenation, residual unit) to 128, 64, 32;
an ASPP of 16 filters and a 1x1 head. Ours: one input channel, N logits with the head's bias at the log class
priors; MONAI's squeeze-and-excitation layer, whose two linear layers have biases (the official ones do not).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import ADN, ChannelSELayer
from torch import Tensor, nn

from usam.models.blocks import init_prior_bias
from usam.models.prompt_free import PromptFreeSegmenter, conv_bn

ASPP_RATES = (1, 6, 12, 18)
SE_RATIO = 8


def preactivated_conv(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    """BN, ReLU, 3x3 convolution: C_in x H x W -> C_out x H/stride x W/stride."""
    return nn.Sequential(ADN("NA", in_channels=in_channels, act="RELU", norm="BATCH", norm_dim=2),
                         nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1))


class ResidualSEUnit(nn.Module):
    """Two 3x3 convolutions (the first strided) plus a 1x1 conv-BN shortcut, then squeeze-and-excitation:
    C_in x H x W -> C_out x H/stride x W/stride. Pre-activated (BN-ReLU before each convolution) except the stem,
    whose first convolution sees the image and is followed by BN-ReLU instead."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, stem: bool = False) -> None:
        super().__init__()
        if stem:
            first = conv_bn(in_channels, out_channels, strides=stride)
            second = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        else:
            first = preactivated_conv(in_channels, out_channels, stride)
            second = preactivated_conv(out_channels, out_channels)
        self.residual = nn.Sequential(first, second)
        self.shortcut = conv_bn(in_channels, out_channels, kernel_size=1, relu=False, strides=stride)
        self.excite = ChannelSELayer(2, out_channels, r=SE_RATIO)

    def forward(self, x: Tensor) -> Tensor:
        return self.excite(self.residual(x) + self.shortcut(x))


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling as ResUNet++ has it: 3x3 conv-BN branches at dilations 1, 6, 12, 18,
    summed, then a 1x1 convolution: C_in x H x W -> C_out x H x W."""

    def __init__(self, in_channels: int, out_channels: int, rates: Sequence[int] = ASPP_RATES) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            conv_bn(in_channels, out_channels, relu=False, dilation=rate) for rate in rates
        )
        self.project = nn.Conv2d(out_channels, out_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.project(sum(branch(x) for branch in self.branches))


class DecoderAttention(nn.Module):
    """Gates the decoder feature x (C_x x h x w) by the encoder feature g (C_g x 2h x 2w): each pre-activated
    conv3x3 to C_x (g then 2x2 max pooled), summed, one more pre-activated conv3x3, times x -> C_x x h x w."""

    def __init__(self, encoder_channels: int, decoder_channels: int) -> None:
        super().__init__()
        self.encoder_conv = nn.Sequential(preactivated_conv(encoder_channels, decoder_channels), nn.MaxPool2d(2))
        self.decoder_conv = preactivated_conv(decoder_channels, decoder_channels)
        self.mix = preactivated_conv(decoder_channels, decoder_channels)

    def forward(self, g: Tensor, x: Tensor) -> Tensor:
        return self.mix(self.encoder_conv(g) + self.decoder_conv(x)) * x


class DecoderStep(nn.Module):
    """Attention, nearest 2x upsampling, concatenation with the encoder feature, a residual unit:
    x B x C_x x h x w, g B x C_g x 2h x 2w -> B x C_out x 2h x 2w."""

    def __init__(self, encoder_channels: int, decoder_channels: int, out_channels: int) -> None:
        super().__init__()
        self.attention = DecoderAttention(encoder_channels, decoder_channels)
        self.unit = ResidualSEUnit(encoder_channels + decoder_channels, out_channels)

    def forward(self, x: Tensor, g: Tensor) -> Tensor:
        x = F.interpolate(self.attention(g, x), scale_factor=2, mode="nearest")
        return self.unit(torch.cat([x, g], dim=1))


class ResUNetPlusPlus(PromptFreeSegmenter):
    """ResUNet++ (see the module docstring); `base_channels` is the stem's 16 filters (then 2x, 4x, 8x, 16x)."""

    def __init__(self, *, name: str = "resunetpp", num_classes: int = 3, img_size: int = 224,
                 points_per_class: int = 0, base_channels: int = 16) -> None:
        super().__init__(name=name, num_classes=num_classes, img_size=img_size, points_per_class=points_per_class,
                         multiple=8, base_channels=base_channels)
        f = [base_channels * 2**i for i in range(5)]
        self.stem = ResidualSEUnit(1, f[0], stem=True)
        self.down1 = ResidualSEUnit(f[0], f[1], stride=2)
        self.down2 = ResidualSEUnit(f[1], f[2], stride=2)
        self.down3 = ResidualSEUnit(f[2], f[3], stride=2)
        self.bridge = ASPP(f[3], f[4])
        self.up1 = DecoderStep(f[2], f[4], f[3])
        self.up2 = DecoderStep(f[1], f[3], f[2])
        self.up3 = DecoderStep(f[0], f[2], f[1])
        self.aspp = ASPP(f[1], f[0])
        self.head = nn.Conv2d(f[0], num_classes, kernel_size=1)
        init_prior_bias(self.head)

    def segment(self, images: Tensor) -> Tensor:
        c1 = self.stem(images)
        c2 = self.down1(c1)
        c3 = self.down2(c2)
        x = self.bridge(self.down3(c3))
        x = self.up1(x, c3)
        x = self.up2(x, c2)
        x = self.up3(x, c1)
        return self.head(self.aspp(x))
