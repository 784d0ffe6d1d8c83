"""Attention U-Net, from MONAI.

Paper: O. Oktay et al., "Attention U-Net: Learning Where to Look for the Pancreas", MIDL 2018. Official code:
github.com/ozan-oktay/Attention-Gated-Networks. Built on: ``monai.networks.nets.AttentionUnet`` (additive
attention gates on every skip connection). Our configuration: 2-D, one input channel, one output channel
per class, five levels of 64, 128, 256, 512, 1024 channels (the U-Net widths the 2-D Attention U-Net
baselines use), four 2x downsamplings, 3 x 3 kernels, no dropout.
"""
from __future__ import annotations

from monai.networks.nets import AttentionUnet as MonaiAttentionUnet
from torch import Tensor

from usam.models.prompt_free import PromptFreeSegmenter


class AttentionUNet(PromptFreeSegmenter):
    """Attention U-Net on B x 1 x S x S slices (S a multiple of 16) -> B x N x S x S logits; points are ignored."""

    def __init__(self, *, name: str = "attention_unet", num_classes: int = 3, img_size: int = 224,
                 points_per_class: int = 0, base_channels: int = 64) -> None:
        super().__init__(name=name, num_classes=num_classes, img_size=img_size, points_per_class=points_per_class,
                         base_channels=base_channels)
        channels = tuple(base_channels * 2**i for i in range(5))
        self.net = MonaiAttentionUnet(spatial_dims=2, in_channels=1, out_channels=num_classes, channels=channels,
                                      strides=(2, 2, 2, 2))

    def forward(self, images: Tensor, points: Tensor | None = None, point_labels: Tensor | None = None) -> Tensor:
        """images B x 1 x S x S in [0, 1] -> B x N x S x S logits."""
        self.check_images(images)
        return self.net(images)
