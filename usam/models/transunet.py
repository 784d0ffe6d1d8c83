"""TransUNet (R50-ViT-B/16 hybrid encoder, cascaded upsampler with skips), on MONAI's ResNet and ViT.

Paper: J. Chen et al., "TransUNet: Transformers Make Strong Encoders for Medical Image Segmentation",
arXiv:2102.04306, 2021. Official code: github.com/Beckschen/TransUNet (``networks/vit_seg_modeling.py``,
``vit_seg_modeling_resnet_skip.py``, configuration ``R50-ViT-B_16``).
Built on: ``monai.networks.nets.ResNet`` (bottleneck units) and ``monai.networks.nets.ViT``; written here:
the BiT-style changes to the ResNet (below), the decoder ("CUP") and the head. timm's hybrid ViT would be
the closer match, but timm cannot be imported without torchvision, which has no build for the CPU torch.
Our configuration, the official R50-ViT-B/16 one at 224 x 224:

- R50 (BiT): weight-standardised convolutions, GroupNorm (32 groups; one group per channel after a
  projection shortcut), stride on the 3 x 3 convolution, units (3, 4, 9), width 64 -> features 64 x H/2,
  256 x H/4, 512 x H/8 (the skips) and 1024 x H/16. MONAI builds its blocks with BatchNorm whatever `norm`
  says, so the norms are replaced after construction. Max pooling pads by 1 (H/4 exactly; the official
  pools unpadded and zero-pads the skip back to H/4).
- ViT-B: a 1 x 1 patch embedding of the 1024 x H/16 grid to 768, learned positions, 12 pre-norm blocks
  (12 heads, MLP 3072, qkv bias, dropout 0.1 in MLP and attention output), final LayerNorm.
- CUP: 3 x 3 conv-BN-ReLU to 512, four blocks (2x bilinear upsampling, concatenation with the skip,
  two 3 x 3 conv-BN-ReLU) to 256, 128, 64, 16 channels (skips at the first three), 3 x 3 head to N classes.
- The grey slice is repeated over three channels, as the official forward does.
"""
from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import ViT, ResNet
from torch import Tensor, nn

from usam.models.blocks import ConvBNReLU
from usam.models.pretrained import load_renamed
from usam.models.prompt_free import PromptFreeSegmenter
from usam.models.sam_weights import LoadReport

# official R50+ViT-B_16.npz keys (Google's JAX layout, as TransUNet's load_from reads them)
_UNIT = re.compile(r"block(\d)/unit(\d+)/(conv[123]|gn[123]|conv_proj|gn_proj)/(kernel|scale|bias)")
_VIT_BLOCK = re.compile(r"Transformer/encoderblock_(\d+)/(.+)/(kernel|scale|bias)")
_VIT_PARTS = {"LayerNorm_0": "norm1", "LayerNorm_2": "norm2", "MlpBlock_3/Dense_0": "mlp.linear1",
              "MlpBlock_3/Dense_1": "mlp.linear2", "MultiHeadDotProductAttention_1/out": "attn.out_proj"}
_QKV = ("query", "key", "value")


class StdConv2d(nn.Conv2d):
    """Convolution with a weight-standardised kernel (zero mean, unit variance per output channel), as BiT."""

    def forward(self, x: Tensor) -> Tensor:
        var, mean = torch.var_mean(self.weight, dim=(1, 2, 3), keepdim=True, unbiased=False)
        weight = (self.weight - mean) / torch.sqrt(var + 1e-5)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def build_bit_resnet(units: tuple[int, ...], width: int) -> ResNet:
    """MONAI's bottleneck ResNet with three stages of `units`, turned into BiT's (see the module docstring)."""
    resnet = ResNet("bottleneck", [*units, 1], [width, 2 * width, 4 * width, 8 * width], spatial_dims=2,
                    n_input_channels=3, conv1_t_size=7, conv1_t_stride=2, feed_forward=False, bias_downsample=False)
    del resnet.layer4, resnet.avgpool  # TransUNet's R50 stops at H/16
    for block in (b for layer in (resnet.layer1, resnet.layer2, resnet.layer3) for b in layer):
        for name in ("bn1", "bn2", "bn3"):
            setattr(block, name, nn.GroupNorm(32, getattr(block, name).num_features, eps=1e-6))
        if block.downsample is not None:
            channels = block.downsample[1].num_features
            block.downsample[1] = nn.GroupNorm(channels, channels)
    resnet.bn1 = nn.GroupNorm(32, width, eps=1e-6)
    for module in resnet.modules():
        if type(module) is nn.Conv2d:
            module.__class__ = StdConv2d
    return resnet


class DecoderBlock(nn.Module):
    """2x bilinear upsampling, concatenation with the skip (if any), two ConvBNReLU."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.skip_channels = skip_channels
        self.conv1 = ConvBNReLU(in_channels + skip_channels, out_channels)
        self.conv2 = ConvBNReLU(out_channels, out_channels)

    def forward(self, x: Tensor, skip: Tensor | None) -> Tensor:
        """x B x C_in x h x w, skip B x C_skip x 2h x 2w or None -> B x C_out x 2h x 2w."""
        x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=True)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


class TransUNet(PromptFreeSegmenter):
    """TransUNet on B x 1 x S x S slices (S a multiple of 16) -> B x N x S x S logits; points are ignored."""

    def __init__(
        self,
        *,
        name: str = "transunet",
        num_classes: int = 3,
        img_size: int = 224,
        points_per_class: int = 0,
        resnet_units: tuple[int, ...] | list[int] = (3, 4, 9),
        resnet_width: int = 64,
        vit_embed_dim: int = 768,
        vit_depth: int = 12,
        vit_num_heads: int = 12,
        vit_mlp_dim: int = 3072,
        dropout: float = 0.1,
        decoder_channels: tuple[int, ...] | list[int] = (256, 128, 64, 16),
    ) -> None:
        """Defaults: the official R50-ViT-B/16 configuration; smaller values give a model for CPU tests."""
        options: dict[str, Any] = {
            "resnet_units": [int(u) for u in resnet_units], "resnet_width": resnet_width,
            "vit_embed_dim": vit_embed_dim, "vit_depth": vit_depth, "vit_num_heads": vit_num_heads,
            "vit_mlp_dim": vit_mlp_dim, "dropout": dropout, "decoder_channels": [int(c) for c in decoder_channels],
        }
        super().__init__(name=name, num_classes=num_classes, img_size=img_size, points_per_class=points_per_class,
                         **options)
        if len(options["resnet_units"]) != 3 or len(options["decoder_channels"]) != 4:
            raise ValueError("resnet_units needs 3 values and decoder_channels 4")
        w = resnet_width
        self.resnet = build_bit_resnet(tuple(options["resnet_units"]), w)
        self.vit = ViT(in_channels=16 * w, img_size=img_size // 16, patch_size=1, hidden_size=vit_embed_dim,
                       mlp_dim=vit_mlp_dim, num_layers=vit_depth, num_heads=vit_num_heads, proj_type="conv",
                       classification=False, dropout_rate=dropout, spatial_dims=2, qkv_bias=True)
        for block in self.vit.blocks:  # MONAI keeps a cross-attention norm even without cross-attention
            del block.norm_cross_attn
        self.conv_more = ConvBNReLU(vit_embed_dim, 512)
        channels = [512, *options["decoder_channels"]]
        skips = [8 * w, 4 * w, w, 0]
        self.blocks = nn.ModuleList(DecoderBlock(channels[i], skips[i], channels[i + 1]) for i in range(4))
        self.head = nn.Conv2d(channels[-1], num_classes, kernel_size=3, padding=1)

    def encoder_modules(self) -> list[nn.Module]:
        return [self.resnet, self.vit]

    def load_pretrained(self, path: str | os.PathLike) -> LoadReport:
        """Initialise the encoder from the official ImageNet-21k R50+ViT-B_16.npz, as TransUNet's ``load_from``
        does: the ResNet, the patch embedding, the positions (the class token's dropped, the grid resized
        bilinearly where the input size differs), the 12 blocks and the final norm; decoder and head stay new.
        Read with ``numpy.load(allow_pickle=False)``."""
        arrays = _read_npz(Path(path))
        tensors: dict[str, Tensor] = {}
        skipped: dict[str, str] = {}
        qkv: dict[tuple[int, str], list[Tensor | None]] = {}
        for key, array in arrays.items():
            value = torch.from_numpy(array)
            target = _r50_target(key, value)
            if target is not None:
                tensors[target[0]] = target[1]
            elif match := _VIT_BLOCK.fullmatch(key):
                block, part, kind = int(match[1]), match[2], match[3]
                name = f"vit.blocks.{block}"
                if part.startswith("MultiHeadDotProductAttention_1/") and part.split("/")[1] in _QKV:
                    slot = qkv.setdefault((block, "weight" if kind == "kernel" else "bias"), [None, None, None])
                    slot[_QKV.index(part.split("/")[1])] = value.reshape(value.shape[0], -1).t() \
                        if kind == "kernel" else value.reshape(-1)
                elif part in _VIT_PARTS:
                    tensors[f"{name}.{_VIT_PARTS[part]}.{'bias' if kind == 'bias' else 'weight'}"] = \
                        _dense(value, kind, out_last=part.endswith("/out"))
                else:
                    skipped[key] = "not in this model"
            elif key == "embedding/kernel":
                tensors["vit.patch_embedding.patch_embeddings.weight"] = value.permute(3, 2, 0, 1)
            elif key == "embedding/bias":
                tensors["vit.patch_embedding.patch_embeddings.bias"] = value
            elif key == "Transformer/posembed_input/pos_embedding":
                tensors["vit.patch_embedding.position_embeddings"] = self._positions(value)
            elif key in ("Transformer/encoder_norm/scale", "Transformer/encoder_norm/bias"):
                tensors[f"vit.norm.{'weight' if key.endswith('scale') else 'bias'}"] = value
            else:
                skipped[key] = "not in this model (classifier head, pre-logits)"
        for (block, kind), parts in qkv.items():
            if any(p is None for p in parts):
                raise ValueError(f"{path}: block {block} lacks a query, key or value {kind}")
            tensors[f"vit.blocks.{block}.attn.qkv.{kind}"] = torch.cat(parts, dim=0)
        return load_renamed(self, tensors, skipped, f"TransUNet weights {path}")

    def _positions(self, positions: Tensor) -> Tensor:
        """1 x (1 + g0^2) x D or 1 x g0^2 x D official positions -> this model's 1 x g^2 x D."""
        grid = self.img_size // 16
        if positions.shape[1] != grid * grid:
            old = int(round((positions.shape[1] - 1) ** 0.5))
            if old * old == positions.shape[1] - 1:  # a class-token position first, as the ImageNet files have
                positions = positions[:, 1:]
            old = int(round(positions.shape[1] ** 0.5))
            if old * old == positions.shape[1] and old != grid:
                x = positions.reshape(1, old, old, -1).permute(0, 3, 1, 2)
                x = F.interpolate(x, size=(grid, grid), mode="bilinear", align_corners=True)
                positions = x.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)
        return positions

    def forward(self, images: Tensor, points: Tensor | None = None, point_labels: Tensor | None = None) -> Tensor:
        """images B x 1 x S x S in [0, 1] -> B x N x S x S logits."""
        self.check_images(images)
        r = self.resnet
        f1 = r.act(r.bn1(r.conv1(images.expand(-1, 3, -1, -1))))  # 64 x S/2
        f2 = r.layer1(r.maxpool(f1))  # 256 x S/4
        f3 = r.layer2(f2)  # 512 x S/8
        tokens, _ = self.vit(r.layer3(f3))  # B x (S/16)^2 x D
        grid = self.img_size // 16
        x = self.conv_more(tokens.transpose(1, 2).reshape(len(images), -1, grid, grid))
        for block, skip in zip(self.blocks, (f3, f2, f1, None)):
            x = block(x, skip)
        return self.head(x)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise ValueError(f"TransUNet weights {path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise ValueError(f"TransUNet weights {path}: not a readable .npz file ({type(error).__name__})") from None
    if "conv_root/kernel" not in arrays or "Transformer/encoderblock_0/LayerNorm_0/scale" not in arrays:
        raise ValueError(f"TransUNet weights {path}: no conv_root/kernel and Transformer/encoderblock_* arrays, "
                         "not the official R50+ViT-B_16.npz")
    return arrays


def _r50_target(key: str, value: Tensor) -> tuple[str, Tensor] | None:
    """(this model's key, tensor) for an official ResNet array: kernels HWIO -> OIHW; None for other keys."""
    if key == "conv_root/kernel":
        return "resnet.conv1.weight", value.permute(3, 2, 0, 1)
    if key in ("gn_root/scale", "gn_root/bias"):
        return f"resnet.bn1.{'weight' if key.endswith('scale') else 'bias'}", value.reshape(-1)
    match = _UNIT.fullmatch(key)
    if match is None:
        return None
    block, unit, layer, kind = int(match[1]), int(match[2]), match[3], match[4]
    name = {"conv_proj": "downsample.0", "gn_proj": "downsample.1"}.get(layer, layer.replace("gn", "bn"))
    prefix = f"resnet.layer{block}.{unit - 1}.{name}"
    if kind == "kernel":
        return f"{prefix}.weight", value.permute(3, 2, 0, 1)
    return f"{prefix}.{'weight' if kind == 'scale' else 'bias'}", value.reshape(-1)


def _dense(value: Tensor, kind: str, out_last: bool) -> Tensor:
    """A JAX dense or LayerNorm array -> torch: kernels (in..., out) -> (out, in); others flattened."""
    if kind != "kernel":
        return value.reshape(-1)
    return (value.reshape(-1, value.shape[-1]) if out_last else value.reshape(value.shape[0], -1)).t()
