"""Convolutional building blocks of the U-shaped paths (U-SAM's CNN encoder and decoder, U-Net)."""
from __future__ import annotations

import torch
from torch import nn


BACKGROUND_PRIOR = 0.99
"""Typical fraction of background pixels in a CARE slice (rectum ~0.5 %, tumour ~0.1 %)."""

HEAD_BIASES = ("prior", "default", "none")


def init_prior_bias(head: nn.Conv2d, background_prior: float = BACKGROUND_PRIOR) -> None:
    """Set a classification head's bias to log class priors (background first, the rest split evenly).

    An untrained network then predicts the class frequencies instead of a uniform guess, so
    training does not spend its first thousands of Adam steps (each moves a bias by about the
    learning rate) pushing the background logit to log(0.99 / 0.005) ~ 5.3.
    """
    n = head.out_channels
    prior = torch.full((n,), (1.0 - background_prior) / (n - 1))
    prior[0] = background_prior
    with torch.no_grad():
        head.bias.copy_(prior.log())


def class_head(in_channels: int, num_classes: int, bias: str = "prior") -> nn.Conv2d:
    """1x1 convolution C x H x W -> num_classes x H x W logits.

    `bias`: "prior" starts at the log class priors (`init_prior_bias`; ours), "default" keeps PyTorch's
    initialisation, "none" has no bias term (the released code's final convolution).
    """
    if bias not in HEAD_BIASES:
        raise ValueError(f"head_bias must be one of {', '.join(HEAD_BIASES)}, got {bias!r}")
    head = nn.Conv2d(in_channels, num_classes, kernel_size=1, bias=bias != "none")
    if bias == "prior":
        init_prior_bias(head)
    return head


class ConvBNReLU(nn.Sequential):
    """3x3 convolution, BatchNorm, ReLU; keeps H x W."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class DownBlock(nn.Sequential):
    """2x2 max-pooling then two ConvBNReLU: C_in x H x W -> C_out x H/2 x W/2."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.MaxPool2d(2),
            ConvBNReLU(in_channels, out_channels),
            ConvBNReLU(out_channels, out_channels),
        )


class UpBlock(nn.Module):
    """2x transposed convolution, optional concatenation with a skip feature, two ConvBNReLU.

    C_in x H x W (+ C_skip x 2H x 2W) -> C_out x 2H x 2W. With `skip_channels = 0` the block
    takes no skip feature.
    """

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.skip_channels = skip_channels
        self.up = nn.ConvTranspose2d(in_channels, in_channels, kernel_size=2, stride=2)
        self.convs = nn.Sequential(
            ConvBNReLU(in_channels + skip_channels, out_channels),
            ConvBNReLU(out_channels, out_channels),
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        x = self.up(x)
        if self.skip_channels:
            x = torch.cat([x, skip], dim=1)
        return self.convs(x)


class CNNEncoder(nn.Module):
    """U-SAM's downsampling path: a ConvBNReLU stem then four DownBlocks.

    1 x H x W -> f0 (D/8 x H), f1 (D/4 x H/2), f2 (D/2 x H/4), f3 (D x H/8), f4 (C4 x H/16),
    where C4 is the ViT width (3D = 768 for U-SAM-B).
    """

    def __init__(self, in_channels: int, embed_dim: int, out_channels: int) -> None:
        super().__init__()
        d = embed_dim
        self.stem = ConvBNReLU(in_channels, d // 8)
        self.down1 = DownBlock(d // 8, d // 4)
        self.down2 = DownBlock(d // 4, d // 2)
        self.down3 = DownBlock(d // 2, d)
        self.down4 = DownBlock(d, out_channels)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Returns f4 and the skip features [f0, f1, f2, f3]."""
        f0 = self.stem(x)
        f1 = self.down1(f0)
        f2 = self.down2(f1)
        f3 = self.down3(f2)
        f4 = self.down4(f3)
        return f4, [f0, f1, f2, f3]


class TokenGrid(nn.Module):
    """Stands in for SAM's patch embedding: a B x C x h x w feature map as B x h x w x C tokens."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1)


def split_trainable(model: nn.Module, encoder_modules: list[nn.Module]) -> dict[str, list[nn.Parameter]]:
    """A model's trainable parameters as the optimiser groups: "encoder" (those of `encoder_modules`, the
    smaller learning rate) and "decoder" (the rest); frozen parameters are in neither."""
    encoder_ids = {id(p) for m in encoder_modules for p in m.parameters()}
    groups: dict[str, list[nn.Parameter]] = {"encoder": [], "decoder": []}
    for parameter in model.parameters():
        if parameter.requires_grad:
            groups["encoder" if id(parameter) in encoder_ids else "decoder"].append(parameter)
    return groups
