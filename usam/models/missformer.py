"""MISSFormer: a SegFormer-style encoder, a bridge of attention over all scales at once, a transformer decoder.

Paper: X. Huang, Z. Deng, D. Li, X. Yuan, Y. Fu, "MISSFormer: An Effective Transformer for 2D Medical Image
Segmentation", IEEE Transactions on Medical Imaging (2022), doi:10.1109/TMI.2022.3230943; arXiv:2109.07162.
Official code: https://github.com/ZhifangDeng/MISSFormer (networks/MISSFormer.py, networks/segformer.py).

Configuration, the official ``MISSFormer``: encoder stages of widths b, 2b, 5b, 8b with b = 64 (64, 128, 320,
512) at H/4 .. H/32, overlapping patch embeddings (7x7 stride 4, then 3x3 stride 2), 2 blocks per stage, heads
1, 2, 5, 8, key/value reduction 8, 4, 2, 1, Mix-FFN with the skip variant (3x3 depthwise conv added to its
input, LayerNorm, GELU; ratio 4); a bridge of 4 layers over the four scales' tokens cut to width b (one head,
keys and values from the scales reduced to the H/32 grid) with a Mix-FFN per scale; decoder stages at H/16, H/8,
H/4 (linear fusion with the bridge's skip, 2 blocks, patch expanding) and a final 4x patch expanding.
Ours: one input channel (the official code repeats a grey image to 3); the official code's modules whose output
is never used are left out (the top decoder stage's fusion and blocks, two LayerNorms in every Mix-FFN); N
logits with the head's bias at the log class priors.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from usam.models.blocks import init_prior_bias
from usam.models.prompt_free import PromptFreeSegmenter

WIDTHS = (1, 2, 5, 8)  # stage widths in units of b
HEADS = (1, 2, 5, 8)
REDUCTIONS = (8, 4, 2, 1)  # key/value spatial reduction per stage
DEPTH = 2  # transformer blocks per encoder and decoder stage
BRIDGE_LAYERS = 4
MLP_RATIO = 4


def _grid(tokens: Tensor, height: int, width: int) -> Tensor:
    """B x HW x C tokens -> B x C x H x W."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, height, width)


def _attend(q: Tensor, kv: Tensor, heads: int) -> Tensor:
    """Multi-head attention: queries B x n x C, keys and values B x m x 2C (side by side) -> B x n x C."""
    b, n, c = q.shape
    k, v = kv.view(b, -1, 2, heads, c // heads).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(q.view(b, n, heads, c // heads).transpose(1, 2), k, v)
    return out.transpose(1, 2).reshape(b, n, c)


class EfficientAttention(nn.Module):
    """SegFormer's efficient self-attention: keys and values from an r x r stride-r convolution of the grid.
    B x HW x C -> B x HW x C."""

    def __init__(self, dim: int, heads: int, reduction: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.reduce = nn.Conv2d(dim, dim, reduction, stride=reduction) if reduction > 1 else None
        self.norm = nn.LayerNorm(dim) if reduction > 1 else None

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        context = x
        if self.reduce is not None:
            context = self.norm(self.reduce(_grid(x, height, width)).flatten(2).transpose(1, 2))
        return self.proj(_attend(self.q(x), self.kv(context), self.heads))


class MixFFN(nn.Module):
    """Mix-FFN, skip variant: linear up, a 3x3 depthwise conv of the grid added to its input, LayerNorm, GELU,
    linear down: B x HW x C -> B x HW x C."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, kernel_size=3, padding=1, groups=hidden)
        self.norm = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        x = self.fc1(x)
        local = self.dwconv(_grid(x, height, width)).flatten(2).transpose(1, 2)
        return self.fc2(F.gelu(self.norm(local + x)))


class TransformerBlock(nn.Module):
    """Pre-norm efficient attention and Mix-FFN, each residual: B x HW x C -> B x HW x C."""

    def __init__(self, dim: int, heads: int, reduction: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = EfficientAttention(dim, heads, reduction)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MixFFN(dim, MLP_RATIO * dim)

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        x = x + self.attn(self.norm1(x), height, width)
        return x + self.mlp(self.norm2(x), height, width)


class EncoderStage(nn.Module):
    """Overlapping patch embedding (conv, LayerNorm), transformer blocks, LayerNorm:
    B x C_in x H x W -> B x C x H/s x W/s."""

    def __init__(self, in_channels: int, dim: int, heads: int, reduction: int, first: bool) -> None:
        super().__init__()
        kernel, stride = (7, 4) if first else (3, 2)
        self.embed = nn.Conv2d(in_channels, dim, kernel, stride=stride, padding=kernel // 2)
        self.embed_norm = nn.LayerNorm(dim)
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, reduction) for _ in range(DEPTH))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.embed(x)
        height, width = x.shape[2:]
        x = self.embed_norm(x.flatten(2).transpose(1, 2))
        for block in self.blocks:
            x = block(x, height, width)
        return _grid(self.norm(x), height, width)


class BridgeAttention(nn.Module):
    """One-head attention over the tokens of all four scales as one sequence of width b; keys and values from
    scales 1-3 reduced to scale 4's grid (stride-8, -4, -2 convolutions) and scale 4 as it is.

    tokens B x N x b (scale i: H_i W_i C_i / b tokens, its channels-last values cut to width b) -> B x N x b.
    """

    def __init__(self, base: int, channels: Sequence[int]) -> None:
        super().__init__()
        self.channels = list(channels)
        self.q = nn.Linear(base, base)
        self.kv = nn.Linear(base, 2 * base)
        self.proj = nn.Linear(base, base)
        self.reduce = nn.ModuleList(nn.Conv2d(c, c, r, stride=r) for c, r in zip(channels[:-1], REDUCTIONS))
        self.norm = nn.LayerNorm(base)

    def forward(self, tokens: Tensor, sizes: Sequence[int]) -> Tensor:
        b, _, base = tokens.shape
        scales = tokens.split([s * s * c // base for s, c in zip(sizes, self.channels)], dim=1)
        reduced = [
            reduce(x.reshape(b, s, s, c).permute(0, 3, 1, 2)).reshape(b, base, -1).transpose(1, 2)
            for reduce, x, s, c in zip(self.reduce, scales, sizes, self.channels)
        ]
        context = self.norm(torch.cat([*reduced, scales[-1]], dim=1))
        return self.proj(_attend(self.q(tokens), self.kv(context), 1))


class BridgeLayer(nn.Module):
    """Bridge attention, then each scale's Mix-FFN at its own width and grid, each residual: B x N x b -> same."""

    def __init__(self, base: int, channels: Sequence[int]) -> None:
        super().__init__()
        self.channels = list(channels)
        self.norm1 = nn.LayerNorm(base)
        self.attn = BridgeAttention(base, channels)
        self.norm2 = nn.LayerNorm(base)
        self.mlps = nn.ModuleList(MixFFN(c, MLP_RATIO * c) for c in channels)

    def forward(self, tokens: Tensor, sizes: Sequence[int]) -> Tensor:
        b, _, base = tokens.shape
        tokens = tokens + self.attn(self.norm1(tokens), sizes)
        scales = self.norm2(tokens).split([s * s * c // base for s, c in zip(sizes, self.channels)], dim=1)
        mixed = [mlp(x.reshape(b, s * s, c), s, s).reshape(b, -1, base)
                 for mlp, x, s, c in zip(self.mlps, scales, sizes, self.channels)]
        return tokens + torch.cat(mixed, dim=1)


class PatchExpand(nn.Module):
    """A bias-free linear C -> s^2 C_out, its outputs spread over s x s pixels, LayerNorm:
    B x HW x C -> B x (sH)(sW) x C_out."""

    def __init__(self, dim: int, out_dim: int, scale: int) -> None:
        super().__init__()
        self.scale = scale
        self.expand = nn.Linear(dim, scale * scale * out_dim, bias=False)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        b, s = x.shape[0], self.scale
        x = self.expand(x).view(b, height, width, s, s, -1).permute(0, 1, 3, 2, 4, 5)
        return self.norm(x.reshape(b, height * s * width * s, -1))


class DecoderStage(nn.Module):
    """Concatenation with the bridge's skip, a linear to C, transformer blocks, patch expanding:
    x B x hw x C_in, skip B x C_skip x h x w -> B x (sh)(sw) x C_out."""

    def __init__(self, in_dim: int, skip_dim: int, dim: int, heads: int, reduction: int, out_dim: int,
                 scale: int) -> None:
        super().__init__()
        self.fuse = nn.Linear(in_dim + skip_dim, dim)
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, reduction) for _ in range(DEPTH))
        self.expand = PatchExpand(dim, out_dim, scale)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        height, width = skip.shape[2:]
        x = self.fuse(torch.cat([x, skip.flatten(2).transpose(1, 2)], dim=2))
        for block in self.blocks:
            x = block(x, height, width)
        return self.expand(x, height, width)


class MISSFormer(PromptFreeSegmenter):
    """MISSFormer (see the module docstring); `base_channels` is b (stage widths b, 2b, 5b, 8b; even)."""

    def __init__(self, *, name: str = "missformer", num_classes: int = 3, img_size: int = 224,
                 points_per_class: int = 0, base_channels: int = 64) -> None:
        super().__init__(name=name, num_classes=num_classes, img_size=img_size, points_per_class=points_per_class,
                         multiple=32, base_channels=base_channels)
        if base_channels <= 0 or base_channels % 2:
            raise ValueError(f"base_channels must be a positive even number, got {base_channels}")
        b = base_channels
        self.base = b
        self.channels = [w * b for w in WIDTHS]
        self.encoder = nn.ModuleList(
            EncoderStage(c_in, c, heads, r, first=i == 0)
            for i, (c_in, c, heads, r) in enumerate(zip([1, *self.channels[:-1]], self.channels, HEADS, REDUCTIONS))
        )
        self.bridge = nn.ModuleList(BridgeLayer(b, self.channels) for _ in range(BRIDGE_LAYERS))
        c1, c2, c3, c4 = self.channels
        self.expand4 = PatchExpand(c4, c4 // 2, 2)
        self.decoder = nn.ModuleList([
            DecoderStage(c4 // 2, c3, c3, HEADS[2], REDUCTIONS[2], c3 // 2, 2),
            DecoderStage(c3 // 2, c2, c2, HEADS[1], REDUCTIONS[1], c2 // 2, 2),
            DecoderStage(c2 // 2, c1, c1, HEADS[0], REDUCTIONS[0], c1, 4),
        ])
        self.head = nn.Conv2d(c1, num_classes, kernel_size=1)
        for module in [self.expand4, *self.decoder, self.head]:  # the official decoder's initialisation
            for m in module.modules():
                if isinstance(m, (nn.Linear, nn.Conv2d)):
                    nn.init.xavier_uniform_(m.weight)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
        init_prior_bias(self.head)

    def segment(self, images: Tensor) -> Tensor:
        features, x = [], images
        for stage in self.encoder:
            x = stage(x)
            features.append(x)
        sizes = [f.shape[-1] for f in features]
        b = images.shape[0]
        tokens = torch.cat([f.permute(0, 2, 3, 1).reshape(b, -1, self.base) for f in features], dim=1)
        for layer in self.bridge:
            tokens = layer(tokens, sizes)
        scales = tokens.split([s * s * c // self.base for s, c in zip(sizes, self.channels)], dim=1)
        skips = [x.reshape(b, s, s, c).permute(0, 3, 1, 2) for x, s, c in zip(scales, sizes, self.channels)]
        x = self.expand4(skips[3].flatten(2).transpose(1, 2), sizes[3], sizes[3])
        for stage, skip in zip(self.decoder, reversed(skips[:3])):
            x = stage(x, skip)
        side = 4 * sizes[0]
        return self.head(x.transpose(1, 2).reshape(b, -1, side, side))
