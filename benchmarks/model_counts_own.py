"""Parameters and GFLOPs at 224 x 224 of the baselines written in usam/models (uctransnet, multiresunet,
resunetpp, missformer, r2unet, focalunet), beside the parameter count of each official implementation.

    PYTHONPATH=. python benchmarks/model_counts_own.py

Ours: N = 3 classes, the registry's defaults, one 1 x 1 x 224 x 224 image in eval mode; FLOPs from
torch.utils.flop_counter.FlopCounterMode (2 per multiply-accumulate of convolutions and matrix products).
Official: the parameters of the official architecture definition (read from its repository; see each model's
docstring for the files) with its 3 input channels and N = 3 outputs, added up layer by layer below: weights and
biases of every convolution and linear layer, BatchNorm / LayerNorm scale and shift, learned position embeddings;
trainable parameters only (Keras' moving BatchNorm statistics are not parameters).
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from usam.models.registry import create_model

N, IN = 3, 3  # classes; the official models' input channels


def conv(c_in: int, c_out: int, k: int, bias: bool = True) -> int:
    return c_in * c_out * k * k + (c_out if bias else 0)


def linear(c_in: int, c_out: int, bias: bool = True) -> int:
    return c_in * c_out + (c_out if bias else 0)


def norm(c: int) -> int:  # BatchNorm or LayerNorm: scale and shift
    return 2 * c


def conv_norm(c_in: int, c_out: int, k: int = 3, bias: bool = True) -> int:
    return conv(c_in, c_out, k, bias) + norm(c_out)


def uctransnet_official() -> int:
    """nets/UCTransNet.py, nets/CTrans.py with Config.get_CTranS_config (C = 64, KV 960, 4 heads, 4 layers)."""
    c, heads, layers, ratio, tokens = 64, 4, 4, 4, (224 // 16) ** 2
    widths, patches = [c, 2 * c, 4 * c, 8 * c], [16, 8, 4, 2]
    kv = sum(widths)
    total = conv_norm(IN, c)
    for c_in, c_out in [(c, 2 * c), (2 * c, 4 * c), (4 * c, 8 * c), (8 * c, 8 * c)]:
        total += conv_norm(c_in, c_out) + conv_norm(c_out, c_out)
    total += sum(conv(w, w, p) + tokens * w for w, p in zip(widths, patches))  # embeddings
    layer = sum(norm(w) for w in widths) + norm(kv)  # attention norms
    layer += heads * (sum(w * w for w in widths) + 2 * kv * kv) + sum(w * w for w in widths)  # Q, K, V, out
    layer += sum(norm(w) + linear(w, ratio * w) + linear(ratio * w, w) for w in widths)  # FFNs
    total += layers * layer + sum(norm(w) for w in widths)  # encoder norms
    total += sum(conv_norm(w, w, 1) for w in widths)  # reconstruction
    for c_in, c_out in [(16 * c, 4 * c), (8 * c, 2 * c), (4 * c, c), (2 * c, c)]:
        total += 2 * linear(c_in // 2, c_in // 2) + conv_norm(c_in, c_out) + conv_norm(c_out, c_out)
    return total + conv(c, N, 1)


def multiresunet_official() -> int:
    """tensorflow/MultiResUNet.py: conv2d_bn = bias-free conv + BatchNorm without scale; N outputs."""
    def conv_bn(c_in: int, c_out: int, k: int) -> int:
        return conv(c_in, c_out, k, bias=False) + c_out

    def block(c_in: int, u: int) -> tuple[int, int]:
        w = 1.67 * u
        a, b, c = int(w * 0.167), int(w * 0.333), int(w * 0.5)
        out = a + b + c
        return conv_bn(c_in, out, 1) + conv_bn(c_in, a, 3) + conv_bn(a, b, 3) + conv_bn(b, c, 3) + 2 * norm(out), out

    def res_path(c_in: int, f: int, length: int) -> int:
        return sum(conv_bn(c, f, 1) + conv_bn(c, f, 3) + norm(f) for c in [c_in] + [f] * (length - 1))

    total, channels = 0, IN
    for level, u in enumerate([32, 64, 128, 256, 512]):
        params, channels = block(channels, u)
        total += params + (res_path(channels, u, 4 - level) if level < 4 else 0)
    for u in [256, 128, 64, 32]:
        total += conv(channels, u, 2)  # Conv2DTranspose
        params, channels = block(2 * u, u)
        total += params
    return total + conv_bn(channels, N, 1)


def resunetpp_official() -> int:
    """resunet++_pytorch.py (the same layers as the Keras m_resunet.py); N outputs."""
    def se(c: int) -> int:
        return 2 * linear(c, c // 8, bias=False)

    def res_block(c_in: int, c_out: int) -> int:
        return norm(c_in) + conv_norm(c_in, c_out) + conv(c_out, c_out, 3) + conv_norm(c_in, c_out, 1) + se(c_out)

    def aspp(c_in: int, c_out: int) -> int:
        return 4 * conv_norm(c_in, c_out) + conv(c_out, c_out, 1)

    def decoder(g: int, x: int, out: int) -> int:
        attention = norm(g) + conv(g, x, 3) + 2 * (norm(x) + conv(x, x, 3))
        return attention + res_block(g + x, out)

    stem = conv_norm(IN, 16) + conv(16, 16, 3) + conv_norm(IN, 16, 1) + se(16)
    total = stem + res_block(16, 32) + res_block(32, 64) + res_block(64, 128) + aspp(128, 256)
    total += decoder(64, 256, 128) + decoder(32, 128, 64) + decoder(16, 64, 32)
    return total + aspp(32, 16) + conv(16, N, 1)


def missformer_official() -> int:
    """networks/MISSFormer.py, networks/segformer.py (token_mlp_mode "mix_skip"), every module it builds."""
    def mix_ffn(c: int, hidden: int) -> int:  # MixFFN_skip builds three LayerNorms, uses one
        return linear(c, hidden) + conv(1, hidden, 3) + linear(hidden, c) + 3 * norm(hidden)

    def attention(d: int, r: int) -> int:
        return linear(d, d) + linear(d, 2 * d) + linear(d, d) + (conv(d, d, r) + norm(d) if r > 1 else 0)

    def block(d: int, r: int) -> int:
        return 2 * norm(d) + attention(d, r) + mix_ffn(d, 4 * d)

    dims, reductions = [64, 128, 320, 512], [8, 4, 2, 1]
    total = 0
    for c_in, d, k, r in zip([IN, *dims[:-1]], dims, [7, 3, 3, 3], reductions):
        total += conv(c_in, d, k) + norm(d) + 2 * block(d, r) + norm(d)
    bridge = 2 * norm(64) + linear(64, 64) + linear(64, 128) + linear(64, 64) + norm(64)
    bridge += conv(64, 64, 8) + conv(128, 128, 4) + conv(320, 320, 2)
    bridge += sum(mix_ffn(d, 4 * d) for d in dims)
    total += 4 * bridge
    for (d, out), r in zip([(512, 512), (288, 320), (144, 128)], [1, 2, 4]):  # decoder_3, _2, _1
        total += linear(2 * d, out) + 2 * block(out, r) + linear(out, 2 * out, bias=False) + norm(out // 2)
    last = linear(4 * 32, 64) + 2 * block(64, 8) + linear(64, 16 * 64, bias=False) + norm(64) + conv(64, N, 1)
    return total + last


def r2unet_official() -> int:
    """LeeJunHyun/Image_Segmentation network.py R2U_Net(img_ch=3, output_ch=N, t=2)."""
    def unit(c_in: int, c_out: int) -> int:
        return conv(c_in, c_out, 1) + 2 * conv_norm(c_out, c_out)

    widths = [64, 128, 256, 512, 1024]
    total = sum(unit(c_in, c_out) for c_in, c_out in zip([IN, *widths[:-1]], widths))
    total += sum(conv_norm(2 * c, c) + unit(2 * c, c) for c in widths[:-1])  # up_conv + unit per level
    return total + conv(64, N, 1)


def focalunet_official() -> int:
    """networks/FocalNet/classification/focalUnet.py focalnet_tiny_lrf: depths 4 x 4, C = 96, focal level 3,
    window 3; every module it builds (the final patch expanding's unused LayerNorm too); head N x 96 x 7 x 7."""
    def block(d: int) -> int:
        modulation = linear(d, 2 * d + 4) + conv(d, d, 1) + linear(d, d) + sum(d * k * k for k in (3, 5, 7))
        return 2 * norm(d) + modulation + linear(d, 4 * d) + linear(4 * d, d)

    dims = [96, 192, 384, 768]
    total = conv(IN, 96, 4) + norm(96) + conv(96, 96, 4) + norm(96)  # patch embedding, final expanding
    total += sum(4 * block(d) for d in dims) + sum(conv(d, 2 * d, 2) + norm(2 * d) for d in dims[:3])
    total += conv(768, 384, 2) + norm(384)  # first expanding
    total += sum(linear(2 * d, d) + block(d) for d in dims[:3])  # decoder stages
    total += sum(conv(d, d // 2, 2) + norm(d // 2) for d in dims[1:3])  # their expanding
    return total + norm(768) + norm(96) + conv(96, N, 7, bias=False)


OFFICIAL = {
    "uctransnet": uctransnet_official,
    "multiresunet": multiresunet_official,
    "resunetpp": resunetpp_official,
    "missformer": missformer_official,
    "r2unet": r2unet_official,
    "focalunet": focalunet_official,
}


def ours(name: str) -> tuple[int, float]:
    """(parameters, GFLOPs of one 224 x 224 slice)."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=N).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.rand(1, 1, 224, 224))
    return sum(p.numel() for p in model.parameters()), counter.get_total_flops() / 1e9


def main() -> None:
    print("| model | parameters | GFLOPs | official parameters | difference |")
    print("|---|---:|---:|---:|---:|")
    for name, official in OFFICIAL.items():
        params, gflops = ours(name)
        reference = official()
        change = 100 * (params - reference) / reference
        print(f"| `{name}` | {params:,} | {gflops:.1f} | {reference:,} | {change:+.2f} % |")


if __name__ == "__main__":
    main()
