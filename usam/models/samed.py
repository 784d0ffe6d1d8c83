"""SAMed: SAM with low-rank adaptation (LoRA) of its image encoder, prompt-free, mask decoder fine-tuned.

Paper: K. Zhang and D. Liu, "Customized Segment Anything Model for Medical Image Segmentation",
arXiv:2304.13785, 2023. Official code: github.com/hitachinsk/SAMed (``sam_lora_image_encoder.py``;
ViT-H in ``SAMed_h/``).
Built on: segment-anything's ``ImageEncoderViT``, ``PromptEncoder`` and ``MaskDecoder`` (through
``usam.models.sam_parts``); written here: the LoRA branch, as SAMed's: rank-r matrices A (kaiming-uniform)
and B (zeros) adding B A x to the query and to the value thirds of every block's fused qkv projection
(none to the key). No library offers LoRA on slices of a fused projection (peft adapts whole layers).
Our configuration: ViT-B (``samed_b``) or ViT-H (``samed_h``, the seed paper's SAMed-H), rank 4 on all
blocks, 224 x 224 input (the seed paper's; SAMed used 512), one mask token per class including the
background (SAMed's ``num_classes + 1`` tokens), no prompts (SAM's no-mask dense embedding, no sparse
tokens). Trained: the LoRA matrices, the mask decoder and the no-mask embedding (SAMed leaves the whole
prompt encoder trainable; with no prompts only that embedding receives gradients); frozen: the ViT.
Input: the [0, 1] slice repeated over three channels, no normalisation (SAMed's pixel mean 0, std 1).
Output: SAM's 4x upscaling gives logits at S/4 (SAMed's low-resolution logits), upsampled bilinearly
to S x S. SAM's IoU head, which SAMed keeps but never trains, is left out.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from usam.models.prompt_free import PromptFreeSegmenter
from usam.models.sam_parts import (
    build_prompt_encoder,
    image_encoder_of,
    mask_decoder_of,
    mask_logits,
    run_two_way_transformer,
)


class LoRAQKV(nn.Linear):
    """SAM's fused qkv projection (its weight and bias keep their names) plus LoRA on the q and v parts.

    qkv(x) = W x + b, with B_q A_q x added to the first third and B_v A_v x to the last.
    """

    def __init__(self, base: nn.Linear, rank: int) -> None:
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None,
                         device=base.weight.device, dtype=base.weight.dtype)
        self.weight, self.bias = base.weight, base.bias
        dim = base.in_features
        if base.out_features != 3 * dim:
            raise ValueError(f"qkv projection must map {dim} to {3 * dim} features, got {base.out_features}")
        kwargs = {"bias": False, "device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_a_q, self.lora_b_q = nn.Linear(dim, rank, **kwargs), nn.Linear(rank, dim, **kwargs)
        self.lora_a_v, self.lora_b_v = nn.Linear(dim, rank, **kwargs), nn.Linear(rank, dim, **kwargs)
        for a, b in ((self.lora_a_q, self.lora_b_q), (self.lora_a_v, self.lora_b_v)):
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
            nn.init.zeros_(b.weight)

    def forward(self, x: Tensor) -> Tensor:
        """x ... x C -> ... x 3C."""
        q, k, v = super().forward(x).chunk(3, dim=-1)
        return torch.cat([q + self.lora_b_q(self.lora_a_q(x)), k, v + self.lora_b_v(self.lora_a_v(x))], dim=-1)


class SAMed(PromptFreeSegmenter):
    """SAMed on B x 1 x S x S slices (S a multiple of 16) -> B x N x S x S logits; points are ignored."""

    def __init__(
        self,
        *,
        name: str = "samed_b",
        num_classes: int = 3,
        img_size: int = 224,
        points_per_class: int = 0,
        lora_rank: int = 4,
        embed_dim: int = 256,
        vit_embed_dim: int = 768,
        vit_depth: int = 12,
        vit_num_heads: int = 12,
        vit_global_attn_indexes: tuple[int, ...] | list[int] = (2, 5, 8, 11),
        vit_window_size: int = 14,
        decoder_depth: int = 2,
        decoder_mlp_dim: int = 2048,
        decoder_num_heads: int = 8,
    ) -> None:
        """SAM's sizes (ViT-B's by default, as `PromptedSegmenter`'s) and the LoRA rank."""
        super().__init__(
            name=name, num_classes=num_classes, img_size=img_size, points_per_class=points_per_class,
            lora_rank=lora_rank, embed_dim=embed_dim, vit_embed_dim=vit_embed_dim, vit_depth=vit_depth,
            vit_num_heads=vit_num_heads, vit_global_attn_indexes=[int(i) for i in vit_global_attn_indexes],
            vit_window_size=vit_window_size, decoder_depth=decoder_depth, decoder_mlp_dim=decoder_mlp_dim,
            decoder_num_heads=decoder_num_heads,
        )
        if lora_rank < 1:
            raise ValueError(f"lora_rank must be >= 1, got {lora_rank}")
        self.image_encoder = image_encoder_of(self.config, in_chans=3)
        self.image_encoder.requires_grad_(False)
        for block in self.image_encoder.blocks:
            block.attn.qkv = LoRAQKV(block.attn.qkv, lora_rank)  # only its lora_* layers train
        self.prompt_encoder = build_prompt_encoder(embed_dim=embed_dim, img_size=img_size)
        self.prompt_encoder.no_mask_embed.requires_grad_(True)
        self.mask_decoder = mask_decoder_of(self.config, num_classes)

    def forward(self, images: Tensor, points: Tensor | None = None, point_labels: Tensor | None = None) -> Tensor:
        """images B x 1 x S x S in [0, 1] -> B x N x S x S logits."""
        self.check_images(images)
        embeddings = self.image_encoder(images.expand(-1, 3, -1, -1))  # B x D x S/16 x S/16
        batch, encoder = len(images), self.prompt_encoder
        sparse = embeddings.new_zeros(batch, 0, encoder.embed_dim)
        dense = encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(batch, -1, *encoder.image_embedding_size)
        hyper_in, src = run_two_way_transformer(self.mask_decoder, embeddings, encoder.get_dense_pe(), sparse, dense)
        logits = mask_logits(hyper_in, self.mask_decoder.output_upscaling(src))  # B x N x S/4 x S/4
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
