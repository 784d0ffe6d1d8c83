"""V-Net in 2-D, from MONAI.

Paper: F. Milletari, N. Navab, S.-A. Ahmadi, "V-Net: Fully Convolutional Neural Networks for Volumetric
Medical Image Segmentation", 3DV 2016. Official code: github.com/faustomilletari/VNet (Caffe, 3-D).
Built on: ``monai.networks.nets.VNet`` (the maintained PyTorch implementation of the paper's layout).
Our configuration: ``spatial_dims=2`` (the seed paper trains every baseline on 2-D slices), one input
channel, one output channel per class, MONAI's defaults otherwise (ELU, 5 x 5 convolutions, residual
stages of 1, 2, 3, 3 convolutions down and 3, 3, 2, 1 up, 16 -> 256 channels, dropout 0.5) except
``dropout_dim=2`` (channel dropout over 2-D feature maps).
"""
from __future__ import annotations

from monai.networks.nets import VNet as MonaiVNet
from torch import Tensor

from usam.models.prompt_free import PromptFreeSegmenter


class VNet2D(PromptFreeSegmenter):
    """V-Net on B x 1 x S x S slices (S a multiple of 16) -> B x N x S x S logits; points are ignored."""

    def __init__(self, *, name: str = "vnet", num_classes: int = 3, img_size: int = 224, points_per_class: int = 0,
                 dropout: float = 0.5) -> None:
        super().__init__(name=name, num_classes=num_classes, img_size=img_size, points_per_class=points_per_class,
                         dropout=dropout)
        self.net = MonaiVNet(spatial_dims=2, in_channels=1, out_channels=num_classes, dropout_prob_down=dropout,
                             dropout_prob_up=(dropout, dropout), dropout_dim=2)

    def forward(self, images: Tensor, points: Tensor | None = None, point_labels: Tensor | None = None) -> Tensor:
        """images B x 1 x S x S in [0, 1] -> B x N x S x S logits."""
        self.check_images(images)
        return self.net(images)
