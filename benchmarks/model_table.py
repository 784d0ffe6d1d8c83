"""Parameter counts and GFLOPs at 224 x 224 of the library-built baselines, beside the official implementations'
parameter counts at the same configuration; prints the Markdown table of docs/models.md.

    python benchmarks/model_table.py

GFLOPs: one 224 x 224 slice, forward, counted by torch.utils.flop_counter.FlopCounterMode (2 FLOPs per
multiply-add; matrix products and convolutions only). Official counts: TransUNet and Swin-Unet summed layer by
layer from the official architecture definitions (the functions below name each layer); SAMed built from
segment-anything's own modules (which SAMed uses) with SAMed's mask decoder (``num_classes + 1`` tokens, IoU
head kept) plus its rank-4 LoRA matrices; V-Net and Attention U-Net have official code in 3-D only.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from usam.models import create_model
from usam.models.sam_parts import MaskDecoder, TwoWayTransformer, build_image_encoder, build_prompt_encoder

NUM_CLASSES = 3  # background, normal rectum, tumour
SIZE = 224


def conv(cin: int, cout: int, k: int, bias: bool) -> int:
    return cin * cout * k * k + (cout if bias else 0)


def linear(cin: int, cout: int, bias: bool = True) -> int:
    return cin * cout + (cout if bias else 0)


def norm(channels: int) -> int:  # LayerNorm, GroupNorm, BatchNorm: a scale and a shift per channel
    return 2 * channels


def official_transunet(n: int = NUM_CLASSES, units: tuple[int, ...] = (3, 4, 9), hidden: int = 768,
                       mlp: int = 3072, layers: int = 12, grid: int = SIZE // 16) -> int:
    """Beckschen/TransUNet, R50-ViT-B_16 (networks/vit_seg_modeling*.py, vit_seg_configs.py), n_skip 3."""
    total = conv(3, 64, 7, False) + norm(64)  # ResNetV2 root: StdConv2d, GroupNorm
    cin = 64
    for stage, count in enumerate(units):  # PreActBottleneck units: conv1/2/3 with gn1/2/3, projection on unit 1
        cmid, cout = 64 * 2**stage, 256 * 2**stage
        for unit in range(count):
            total += conv(cin, cmid, 1, False) + conv(cmid, cmid, 3, False) + conv(cmid, cout, 1, False)
            total += norm(cmid) * 2 + norm(cout)
            if unit == 0:
                total += conv(cin, cout, 1, False) + norm(cout)  # downsample + gn_proj
            cin = cout
    total += conv(cin, hidden, 1, True) + grid * grid * hidden  # patch_embeddings, position_embeddings
    block = 2 * norm(hidden) + 4 * linear(hidden, hidden) + linear(hidden, mlp) + linear(mlp, hidden)
    total += layers * block + norm(hidden)  # Encoder: Blocks (query, key, value, out, fc1, fc2), encoder_norm
    total += conv(hidden, 512, 3, False) + norm(512)  # DecoderCup.conv_more (Conv2dReLU with BatchNorm)
    for cin, skip, cout in ((512, 512, 256), (256, 256, 128), (128, 64, 64), (64, 0, 16)):  # DecoderBlocks
        total += conv(cin + skip, cout, 3, False) + norm(cout) + conv(cout, cout, 3, False) + norm(cout)
    return total + conv(16, n, 3, True)  # SegmentationHead


def official_swin_unet(n: int = NUM_CLASSES, dim: int = 96, depths: tuple[int, ...] = (2, 2, 2, 2),
                       heads: tuple[int, ...] = (3, 6, 12, 24), window: int = 7) -> int:
    """HuCaoFighting/Swin-Unet, SwinTransformerSys with configs/swin_tiny_patch4_window7_224_lite.yaml."""
    def swin_block(d: int, h: int) -> int:  # norm1, WindowAttention (bias table, qkv, proj), norm2, Mlp
        return (norm(d) + (2 * window - 1) ** 2 * h + linear(d, 3 * d) + linear(d, d) + norm(d)
                + linear(d, 4 * d) + linear(4 * d, d))

    total = conv(3, dim, 4, True) + norm(dim)  # PatchEmbed with patch_norm
    for i, (depth, h) in enumerate(zip(depths, heads)):  # encoder BasicLayers, PatchMerging after all but the last
        d = dim * 2**i
        total += depth * swin_block(d, h) + (norm(4 * d) + linear(4 * d, 2 * d, False) if i < 3 else 0)
    total += norm(8 * dim)  # norm
    total += linear(8 * dim, 16 * dim, False) + norm(4 * dim)  # layers_up[0]: PatchExpand
    for i in (2, 1, 0):  # concat_back_dim, BasicLayer_up (+ PatchExpand but the last)
        d = dim * 2**i
        total += linear(2 * d, d) + depths[i] * swin_block(d, heads[i])
        total += linear(d, 2 * d, False) + norm(d // 2) if i else 0
    total += norm(dim) + linear(dim, 16 * dim, False) + norm(dim)  # norm_up, FinalPatchExpand_X4
    return total + dim * n  # output: 1 x 1 convolution without bias


def official_samed(vit: dict, n: int = NUM_CLASSES, rank: int = 4) -> int:
    """hitachinsk/SAMed: segment-anything's encoder, prompt encoder and mask decoder (num_classes + 1 tokens with
    its IoU head) at 224 x 224, plus LoRA A and B for q and v in every block."""
    with torch.device("meta"):
        parts = [
            build_image_encoder(img_size=SIZE, in_chans=3, embed_dim=vit["vit_embed_dim"], depth=vit["vit_depth"],
                                num_heads=vit["vit_num_heads"], global_attn_indexes=vit["vit_global_attn_indexes"],
                                window_size=14, out_chans=256),
            build_prompt_encoder(embed_dim=256, img_size=SIZE),
            MaskDecoder(transformer_dim=256, transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048,
                                                                           num_heads=8),
                        num_multimask_outputs=n - 1, iou_head_depth=3, iou_head_hidden_dim=256),
        ]
    lora = vit["vit_depth"] * 4 * rank * vit["vit_embed_dim"]
    return sum(p.numel() for part in parts for p in part.parameters()) + lora


VIT_B = {"vit_embed_dim": 768, "vit_depth": 12, "vit_num_heads": 12, "vit_global_attn_indexes": (2, 5, 8, 11)}
VIT_H = {"vit_embed_dim": 1280, "vit_depth": 32, "vit_num_heads": 16, "vit_global_attn_indexes": (7, 15, 23, 31)}
OFFICIAL = {
    "vnet": (None, "official code (Caffe) is 3-D only; MONAI's VNet used unmodified"),
    "attention_unet": (None, "official segmentation code is 3-D only; MONAI's AttentionUnet used unmodified"),
    "transunet": (official_transunet, "summed from the official R50-ViT-B_16 definition"),
    "swin_unet": (official_swin_unet, "summed from the official definition and config"),
    "samed_b": (lambda: official_samed(VIT_B), "segment-anything's modules as SAMed builds them, + LoRA"),
    "samed_h": (lambda: official_samed(VIT_H), "segment-anything's modules as SAMed builds them, + LoRA"),
}


def build(name: str) -> tuple[nn.Module, torch.device]:
    """The model on the meta device where its constructor allows (nothing allocated), else on the CPU."""
    try:
        with torch.device("meta"):
            return create_model(name, num_classes=NUM_CLASSES).eval(), torch.device("meta")
    except (RuntimeError, NotImplementedError):  # MONAI's Swin reads a tensor's value while building
        return create_model(name, num_classes=NUM_CLASSES).eval(), torch.device("cpu")


def gflops(model: nn.Module, device: torch.device) -> float:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 1, SIZE, SIZE, device=device))
    return counter.get_total_flops() / 1e9


def table() -> str:
    lines = ["| system | parameters | trainable | GFLOPs | official parameters | difference | official count from |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for name, (official, source) in OFFICIAL.items():
        model, device = build(name)
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        reference = official() if official else None
        difference = "—" if reference is None else f"{100 * (total - reference) / reference:+.2f} %"
        lines.append(f"| `{name}` | {total:,} | {trainable:,} | {gflops(model, device):.1f} | "
                     f"{'—' if reference is None else f'{reference:,}'} | {difference} | {source} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
