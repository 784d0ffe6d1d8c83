"""What the prompt-free baselines written here share: `unet`'s model interface and a biased conv-BN-ReLU."""
from __future__ import annotations

from typing import Any

from monai.networks.blocks import Convolution
from torch import Tensor, nn


def conv_bn(in_channels: int, out_channels: int, kernel_size: int = 3, relu: bool = True, bias: bool = True,
            **options: Any) -> Convolution:
    """k x k convolution (same padding), BatchNorm, optional ReLU: C_in x H x W -> C_out x H/stride x W/stride.

    `options` go to MONAI's `Convolution` (``strides``, ``dilation``).
    """
    return Convolution(2, in_channels, out_channels, kernel_size=kernel_size, act="RELU" if relu else None,
                       norm="BATCH", bias=bias, **options)


class PromptFreeModel(nn.Module):
    """Base of a baseline that takes the SAM-style models' inputs and ignores the points, as `unet` does.

    ``config`` holds the constructor's arguments, so ``create_model(**model.config)`` rebuilds the model; a
    subclass passes its own options on as keywords and implements `segment`. Nothing is pretrained: every
    parameter is in the "decoder" group (the 1e-3 learning rate).
    """

    def __init__(self, *, name: str, num_classes: int, img_size: int, points_per_class: int, size_multiple: int,
                 **options: Any) -> None:
        super().__init__()
        if img_size <= 0 or img_size % size_multiple:
            raise ValueError(f"img_size must be a positive multiple of {size_multiple}, got {img_size}")
        self.config = {
            "name": name,
            "num_classes": num_classes,
            "img_size": img_size,
            "points_per_class": points_per_class,
            **options,
        }
        self.num_classes = num_classes
        self.img_size = img_size

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Nothing is pretrained: every parameter is in "decoder" (the 1e-3 group)."""
        return {"encoder": [], "decoder": [p for p in self.parameters() if p.requires_grad]}

    def segment(self, images: Tensor) -> Tensor:
        """images B x 1 x H x W -> B x N x H x W logits."""
        raise NotImplementedError

    def forward(self, images: Tensor, points: Tensor | None = None, point_labels: Tensor | None = None) -> Tensor:
        """images B x 1 x H x W in [0, 1] -> B x N x H x W logits; points are ignored."""
        size = self.img_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (1, size, size):
            raise ValueError(f"images must be B x 1 x {size} x {size}, got {tuple(images.shape)}")
        return self.segment(images)
