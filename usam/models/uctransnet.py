"""UCTransNet: a U-Net whose skip connections pass through a channel-wise transformer (CTrans).

Paper: H. Wang, P. Cao, J. Wang, O. R. Zaiane, "UCTransNet: Rethinking the Skip Connections in U-Net from a
Channel-wise Perspective with Transformer", AAAI 2022. Official code: https://github.com/McGregorWwww/UCTransNet
(nets/UCTransNet.py, nets/CTrans.py, Config.py).

Configuration, the official ``get_CTranS_config``: base width C = 64 (encoder C, 2C, 4C, 8C, 8C: a 3x3
conv-BN-ReLU stem, then 2x2 max pooling and two conv-BN-ReLU per level); CTrans on the four skips with patch
sizes 16, 8, 4, 2 (every scale becomes the same H/16 x W/16 token grid), 4 layers, 4 heads, KV size 15C = 960,
MLP ratio 4, dropout 0.1 on the embeddings and attention weights; four up blocks with channel-wise cross
attention (CCA). Ours: one input channel, a head of N logits with its bias at the log class priors.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import MLPBlock
from torch import Tensor, nn

from usam.models.blocks import init_prior_bias
from usam.models.prompt_free import PromptFreeSegmenter, conv_bn

PATCH_SIZES = (16, 8, 4, 2)  # per skip scale (H, H/2, H/4, H/8): one H/16 x W/16 token grid at every scale
NUM_LAYERS = 4
NUM_HEADS = 4
MLP_RATIO = 4
DROPOUT = 0.1  # embeddings and attention weights (the MLPs have none)


class ChannelEmbedding(nn.Module):
    """A p x p patch convolution and a learned position embedding: B x C x H x W -> B x n x C tokens, n = (H/p)^2."""

    def __init__(self, channels: int, patch_size: int, num_tokens: int) -> None:
        super().__init__()
        self.patch = nn.Conv2d(channels, channels, kernel_size=patch_size, stride=patch_size)
        self.position = nn.Parameter(torch.zeros(1, num_tokens, channels))
        self.dropout = nn.Dropout(DROPOUT)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.patch(x).flatten(2).transpose(1, 2) + self.position)


class ChannelCrossAttention(nn.Module):
    """Each scale's channels attend to the channels of all scales; the tokens (grid positions) are the features.

    queries: per scale B x n x C_i; context: B x n x K (the scales concatenated, K = sum C_i) -> per scale
    B x n x C_i. Per head the scores are C_i x K, instance-normalised over that map before the softmax; the
    heads' outputs are averaged.
    """

    def __init__(self, channels: Sequence[int], num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.kv_size = sum(channels)
        # the heads' projections side by side in one layer each
        self.queries = nn.ModuleList(nn.Linear(c, c * num_heads, bias=False) for c in channels)
        self.key = nn.Linear(self.kv_size, self.kv_size * num_heads, bias=False)
        self.value = nn.Linear(self.kv_size, self.kv_size * num_heads, bias=False)
        self.outs = nn.ModuleList(nn.Linear(c, c, bias=False) for c in channels)
        self.score_norm = nn.InstanceNorm2d(num_heads)
        self.attn_dropout = nn.Dropout(DROPOUT)
        self.proj_dropout = nn.Dropout(DROPOUT)

    def _heads(self, x: Tensor) -> Tensor:
        """B x n x (h C) -> B x h x n x C."""
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, -1).transpose(1, 2)

    def forward(self, queries: list[Tensor], context: Tensor) -> list[Tensor]:
        keys = self._heads(self.key(context))  # B h n K
        values = self._heads(self.value(context))  # B h n K
        outputs = []
        for project, out, x in zip(self.queries, self.outs, queries):
            q = self._heads(project(x)).transpose(-1, -2)  # B h C_i n
            scores = q @ keys / math.sqrt(self.kv_size)  # B h C_i K
            weights = self.attn_dropout(self.score_norm(scores).softmax(dim=-1))
            mixed = (weights @ values.transpose(-1, -2)).mean(dim=1)  # B C_i n
            outputs.append(self.proj_dropout(out(mixed.transpose(1, 2))))
        return outputs


class CTransLayer(nn.Module):
    """Pre-norm channel cross attention and per-scale MLPs, each residual: tokens per scale B x n x C_i -> same."""

    def __init__(self, channels: Sequence[int]) -> None:
        super().__init__()
        self.attn_norms = nn.ModuleList(nn.LayerNorm(c, eps=1e-6) for c in channels)
        self.context_norm = nn.LayerNorm(sum(channels), eps=1e-6)
        self.attention = ChannelCrossAttention(channels, NUM_HEADS)
        self.mlp_norms = nn.ModuleList(nn.LayerNorm(c, eps=1e-6) for c in channels)
        self.mlps = nn.ModuleList(MLPBlock(c, c * MLP_RATIO, dropout_rate=0.0) for c in channels)
        for mlp in self.mlps:
            for linear in (mlp.linear1, mlp.linear2):
                nn.init.xavier_uniform_(linear.weight)
                nn.init.normal_(linear.bias, std=1e-6)

    def forward(self, tokens: list[Tensor]) -> list[Tensor]:
        context = self.context_norm(torch.cat(tokens, dim=2))
        attended = self.attention([norm(t) for norm, t in zip(self.attn_norms, tokens)], context)
        tokens = [t + a for t, a in zip(tokens, attended)]
        return [t + mlp(norm(t)) for norm, mlp, t in zip(self.mlp_norms, self.mlps, tokens)]


class Reconstruct(nn.Module):
    """Tokens back to a feature map: B x n x C -> nearest p x upsampling of the grid, 1x1 conv-BN-ReLU ->
    B x C x H x W."""

    def __init__(self, channels: int, patch_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.conv = conv_bn(channels, channels, kernel_size=1)

    def forward(self, tokens: Tensor) -> Tensor:
        b, n, c = tokens.shape
        side = math.isqrt(n)
        grid = tokens.transpose(1, 2).reshape(b, c, side, side)
        return self.conv(F.interpolate(grid, scale_factor=self.patch_size, mode="nearest"))


class ChannelTransformer(nn.Module):
    """CTrans: the skips f1..f4 (C_i x H/2^i x W/2^i) -> the same shapes, each plus its transformer output."""

    def __init__(self, channels: Sequence[int], img_size: int) -> None:
        super().__init__()
        num_tokens = (img_size // PATCH_SIZES[0]) ** 2
        self.embeddings = nn.ModuleList(ChannelEmbedding(c, p, num_tokens) for c, p in zip(channels, PATCH_SIZES))
        self.layers = nn.ModuleList(CTransLayer(channels) for _ in range(NUM_LAYERS))
        self.norms = nn.ModuleList(nn.LayerNorm(c, eps=1e-6) for c in channels)
        self.reconstruct = nn.ModuleList(Reconstruct(c, p) for c, p in zip(channels, PATCH_SIZES))

    def forward(self, skips: list[Tensor]) -> list[Tensor]:
        tokens = [embed(f) for embed, f in zip(self.embeddings, skips)]
        for layer in self.layers:
            tokens = layer(tokens)
        return [f + rebuild(norm(t)) for f, rebuild, norm, t in zip(skips, self.reconstruct, self.norms, tokens)]


class ChannelCrossFusion(nn.Module):
    """CCA: a skip's channels gated by the global averages of the skip and of the upsampled decoder feature.

    decoder B x C_d x H x W, skip B x C_s x H x W -> B x C_s x H x W.
    """

    def __init__(self, decoder_channels: int, skip_channels: int) -> None:
        super().__init__()
        self.skip_mlp = nn.Linear(skip_channels, skip_channels)
        self.decoder_mlp = nn.Linear(decoder_channels, skip_channels)

    def forward(self, decoder: Tensor, skip: Tensor) -> Tensor:
        logits = (self.skip_mlp(skip.mean(dim=(2, 3))) + self.decoder_mlp(decoder.mean(dim=(2, 3)))) / 2
        return F.relu(skip * torch.sigmoid(logits)[:, :, None, None])


class CCAUpBlock(nn.Module):
    """Nearest 2x upsampling, the CCA-gated skip concatenated before it, two conv-BN-ReLU.

    B x C_in x H x W (+ B x C_skip x 2H x 2W) -> B x C_out x 2H x 2W.
    """

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.fusion = ChannelCrossFusion(in_channels, skip_channels)
        self.convs = nn.Sequential(conv_bn(in_channels + skip_channels, out_channels),
                                   conv_bn(out_channels, out_channels))

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.convs(torch.cat([self.fusion(x, skip), x], dim=1))


def _down(in_channels: int, out_channels: int) -> nn.Sequential:
    """2x2 max pooling, two conv-BN-ReLU: C_in x H x W -> C_out x H/2 x W/2."""
    return nn.Sequential(nn.MaxPool2d(2), conv_bn(in_channels, out_channels), conv_bn(out_channels, out_channels))


class UCTransNet(PromptFreeSegmenter):
    """UCTransNet (see the module docstring); `base_channels` is C."""

    def __init__(self, *, name: str = "uctransnet", num_classes: int = 3, img_size: int = 224,
                 points_per_class: int = 0, base_channels: int = 64) -> None:
        super().__init__(name=name, num_classes=num_classes, img_size=img_size, points_per_class=points_per_class,
                         multiple=PATCH_SIZES[0], base_channels=base_channels)
        c = base_channels
        self.stem = conv_bn(1, c)
        self.down1 = _down(c, 2 * c)
        self.down2 = _down(2 * c, 4 * c)
        self.down3 = _down(4 * c, 8 * c)
        self.down4 = _down(8 * c, 8 * c)
        self.ctrans = ChannelTransformer([c, 2 * c, 4 * c, 8 * c], img_size)
        self.up4 = CCAUpBlock(8 * c, 8 * c, 4 * c)
        self.up3 = CCAUpBlock(4 * c, 4 * c, 2 * c)
        self.up2 = CCAUpBlock(2 * c, 2 * c, c)
        self.up1 = CCAUpBlock(c, c, c)
        self.head = nn.Conv2d(c, num_classes, kernel_size=1)
        init_prior_bias(self.head)

    def segment(self, images: Tensor) -> Tensor:
        f1 = self.stem(images)
        f2 = self.down1(f1)
        f3 = self.down2(f2)
        f4 = self.down3(f3)
        x = self.down4(f4)
        f1, f2, f3, f4 = self.ctrans([f1, f2, f3, f4])
        x = self.up4(x, f4)
        x = self.up3(x, f3)
        x = self.up2(x, f2)
        return self.head(self.up1(x, f1))
