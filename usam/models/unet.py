"""A small plain U-Net baseline (no prompts, no transformer)."""
from __future__ import annotations

from torch import Tensor, nn

from usam.models.blocks import CNNEncoder, UpBlock, class_head


class UNet(nn.Module):
    """U-Net with U-SAM's CNN encoder (channels C/8 .. C, bottleneck 2C) and four UpBlocks.

    Takes the same inputs as the SAM-style models and ignores the points. `head_bias` ("prior",
    "default" or "none", see `class_head`): the head's bias starts at the log class priors by default.
    """

    def __init__(
        self,
        *,
        name: str = "unet",
        num_classes: int = 3,
        img_size: int = 224,
        points_per_class: int = 0,
        base_channels: int = 256,
        head_bias: str = "prior",
    ) -> None:
        super().__init__()
        if img_size % 16:
            raise ValueError(f"img_size must be a multiple of 16, got {img_size}")
        if base_channels % 8:
            raise ValueError(f"base_channels must be a multiple of 8, got {base_channels}")
        self.config = {
            "name": name,
            "num_classes": num_classes,
            "img_size": img_size,
            "points_per_class": points_per_class,
            "base_channels": base_channels,
            "head_bias": head_bias,
        }
        self.num_classes = num_classes
        self.img_size = img_size
        c = base_channels
        self.cnn = CNNEncoder(in_channels=1, embed_dim=c, out_channels=2 * c)
        self.up4 = UpBlock(2 * c, c, c)
        self.up3 = UpBlock(c, c // 2, c // 2)
        self.up2 = UpBlock(c // 2, c // 4, c // 4)
        self.up1 = UpBlock(c // 4, c // 8, c // 8)
        self.head = class_head(c // 8, num_classes, head_bias)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Nothing is pretrained: every parameter is in "decoder" (the 1e-3 group)."""
        return {"encoder": [], "decoder": [p for p in self.parameters() if p.requires_grad]}

    def forward(self, images: Tensor, points: Tensor | None = None, point_labels: Tensor | None = None) -> Tensor:
        """images B x 1 x H x W in [0, 1] -> B x N x H x W logits; points are ignored."""
        size = self.img_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (1, size, size):
            raise ValueError(f"images must be B x 1 x {size} x {size}, got {tuple(images.shape)}")
        f4, (f0, f1, f2, f3) = self.cnn(images)
        x = self.up4(f4, f3)
        x = self.up3(x, f2)
        x = self.up2(x, f1)
        return self.head(self.up1(x, f0))
