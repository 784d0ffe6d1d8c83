"""What the prompt-free baselines share: `unet`'s model interface, optimiser groups and a biased conv-BN-ReLU."""
from __future__ import annotations

from typing import Any

from monai.networks.blocks import Convolution
from torch import Tensor, nn

from usam.models.blocks import split_trainable


def conv_bn(in_channels: int, out_channels: int, kernel_size: int = 3, relu: bool = True, bias: bool = True,
            **options: Any) -> Convolution:
    """k x k convolution (same padding), BatchNorm, optional ReLU: C_in x H x W -> C_out x H/stride x W/stride.

    `options` go to MONAI's `Convolution` (``strides``, ``dilation``).
    """
    return Convolution(2, in_channels, out_channels, kernel_size=kernel_size, act="RELU" if relu else None,
                       norm="BATCH", bias=bias, **options)


class PromptFreeSegmenter(nn.Module):
    """Base of a system that takes no prompts (the baselines other than SAM's and U-SAM).

    It takes the same inputs as the SAM-style models and ignores the points, as `unet` does;
    `points_per_class` is only recorded (the trainer passes ``--points``). ``config`` holds
    every constructor option, so ``create_model(**model.config)`` rebuilds the model. A subclass
    implements `segment`, or `forward` itself after `check_images`.
    """

    def __init__(self, *, name: str, num_classes: int, img_size: int, points_per_class: int,
                 multiple: int = 16, **options: Any) -> None:
        """`multiple`: the input side must be a multiple of it (the network's total downsampling)."""
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background + classes), got {num_classes}")
        if img_size < multiple or img_size % multiple:
            raise ValueError(f"img_size must be a positive multiple of {multiple}, got {img_size}")
        self.config = {"name": name, "num_classes": num_classes, "img_size": img_size,
                       "points_per_class": points_per_class, **options}
        self.num_classes = num_classes
        self.img_size = img_size

    def encoder_modules(self) -> list[nn.Module]:
        """Modules that can start from pretrained weights (the smaller-learning-rate "encoder" group)."""
        return []

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters: "encoder" (`encoder_modules`, trained with --lr-encoder), "decoder" (the rest)."""
        return split_trainable(self, self.encoder_modules())

    def check_images(self, images: Tensor) -> None:
        """Raise ValueError unless images is B x 1 x img_size x img_size."""
        size = self.img_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (1, size, size):
            raise ValueError(f"images must be B x 1 x {size} x {size}, got {tuple(images.shape)}")

    def segment(self, images: Tensor) -> Tensor:
        """images B x 1 x H x W -> B x N x H x W logits."""
        raise NotImplementedError

    def forward(self, images: Tensor, points: Tensor | None = None, point_labels: Tensor | None = None) -> Tensor:
        """images B x 1 x H x W in [0, 1] -> B x N x H x W logits; points are ignored."""
        self.check_images(images)
        return self.segment(images)
