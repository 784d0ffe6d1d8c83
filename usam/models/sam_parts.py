"""segment-anything's ViT, prompt encoder and mask decoder, built for a 224 x 224 input."""
from __future__ import annotations

import importlib
import importlib.util
import sys
import traceback
from collections.abc import Mapping
from functools import partial
from types import ModuleType
from typing import Any

import torch
from torch import nn


def _import_sam_modeling() -> ModuleType:
    """Import `segment_anything.modeling`, which needs only torch.

    The package's own ``__init__`` also imports the predictor, which needs torchvision. Where
    torchvision is missing, or fails to import (one built for another torch raises RuntimeError),
    we register an empty parent package (its spec, never executed) in ``sys.modules`` and import
    the ``modeling`` subpackage under it; ``build_sam`` imports the same way. The normal import is
    always tried first.
    """
    try:
        return importlib.import_module("segment_anything.modeling")
    except Exception as error:
        if not _raised_by_torchvision(error):
            raise
    spec = importlib.util.find_spec("segment_anything")
    if spec is None or spec.submodule_search_locations is None:  # pragma: no cover
        raise ImportError("segment-anything is not installed (pip install segment-anything)")
    parent = importlib.util.module_from_spec(spec)
    sys.modules["segment_anything"] = parent
    return importlib.import_module("segment_anything.modeling")


def _raised_by_torchvision(error: BaseException) -> bool:
    frames = traceback.extract_tb(error.__traceback__)
    return "torchvision" in str(error) or any("torchvision" in frame.filename for frame in frames)


sam_modeling = _import_sam_modeling()
ImageEncoderViT = sam_modeling.ImageEncoderViT
PromptEncoder = sam_modeling.PromptEncoder
MaskDecoder = sam_modeling.MaskDecoder
TwoWayTransformer = sam_modeling.TwoWayTransformer

PATCH_SIZE = 16  # every SAM ViT: one token per 16 x 16 pixels


def build_image_encoder(
    *,
    img_size: int,
    in_chans: int,
    embed_dim: int,
    depth: int,
    num_heads: int,
    global_attn_indexes: tuple[int, ...],
    window_size: int,
    out_chans: int,
) -> ImageEncoderViT:
    """SAM's ViT (relative positions, windowed + global attention, neck to `out_chans`)."""
    return ImageEncoderViT(
        img_size=img_size,
        patch_size=PATCH_SIZE,
        in_chans=in_chans,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=4,
        out_chans=out_chans,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        window_size=window_size,
        global_attn_indexes=tuple(global_attn_indexes),
    )


def image_encoder_of(config: Mapping[str, Any], in_chans: int) -> ImageEncoderViT:
    """SAM's ViT with the sizes of a SAM-based model's `config` (img_size, embed_dim, vit_embed_dim, vit_depth,
    vit_num_heads, vit_global_attn_indexes, vit_window_size), taking `in_chans` channels, giving embed_dim."""
    return build_image_encoder(
        img_size=config["img_size"],
        in_chans=in_chans,
        embed_dim=config["vit_embed_dim"],
        depth=config["vit_depth"],
        num_heads=config["vit_num_heads"],
        global_attn_indexes=tuple(config["vit_global_attn_indexes"]),
        window_size=config["vit_window_size"],
        out_chans=config["embed_dim"],
    )


def build_prompt_encoder(*, embed_dim: int, img_size: int) -> PromptEncoder:
    """SAM's prompt encoder for an `img_size` square input, frozen (requires_grad False)."""
    grid = img_size // PATCH_SIZE
    encoder = PromptEncoder(
        embed_dim=embed_dim,
        image_embedding_size=(grid, grid),
        input_image_size=(img_size, img_size),
        mask_in_chans=16,
    )
    encoder.requires_grad_(False)
    return encoder


def build_mask_decoder(
    *, embed_dim: int, num_mask_tokens: int, depth: int, mlp_dim: int, num_heads: int
) -> MaskDecoder:
    """SAM's mask decoder with `num_mask_tokens` mask tokens, each with its own hypernetwork MLP.

    One token per class (`num_mask_tokens = num_classes`, via SAM's `num_multimask_outputs =
    num_mask_tokens - 1`) in the paper's text; D/8 tokens in the released code's decoder. The IoU
    prediction head is removed: nothing here predicts mask quality.
    """
    decoder = MaskDecoder(
        transformer_dim=embed_dim,
        transformer=TwoWayTransformer(
            depth=depth, embedding_dim=embed_dim, mlp_dim=mlp_dim, num_heads=num_heads
        ),
        num_multimask_outputs=num_mask_tokens - 1,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    del decoder.iou_prediction_head
    return decoder


def mask_decoder_of(config: Mapping[str, Any], num_mask_tokens: int) -> MaskDecoder:
    """SAM's mask decoder with the sizes of a SAM-based model's `config` (embed_dim, decoder_depth,
    decoder_mlp_dim, decoder_num_heads) and `num_mask_tokens` mask tokens."""
    return build_mask_decoder(
        embed_dim=config["embed_dim"],
        num_mask_tokens=num_mask_tokens,
        depth=config["decoder_depth"],
        mlp_dim=config["decoder_mlp_dim"],
        num_heads=config["decoder_num_heads"],
    )


def run_two_way_transformer(
    decoder: MaskDecoder,
    image_embeddings: torch.Tensor,
    image_pe: torch.Tensor,
    sparse_embeddings: torch.Tensor,
    dense_embeddings: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The token/image attention step of `MaskDecoder.predict_masks`, one prompt set per image.

    Args:
      image_embeddings: B x D x h x w.  image_pe: 1 x D x h x w.
      sparse_embeddings: B x T x D prompt tokens.  dense_embeddings: B x D x h x w.
    Returns:
      hyper_in: B x T x D/8, each of the T mask tokens through its hypernetwork MLP.
      src: B x D x h x w, the image embedding after the transformer (SAM's Src).
    """
    batch = image_embeddings.shape[0]
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    output_tokens = output_tokens.unsqueeze(0).expand(batch, -1, -1)
    tokens = torch.cat((output_tokens, sparse_embeddings), dim=1)
    src = image_embeddings + dense_embeddings
    pos_src = image_pe.expand(batch, -1, -1, -1)
    b, c, h, w = src.shape
    hs, src = decoder.transformer(src, pos_src, tokens)
    mask_tokens_out = hs[:, 1 : 1 + decoder.num_mask_tokens, :]
    hyper_in = torch.stack(
        [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)],
        dim=1,
    )
    src = src.transpose(1, 2).reshape(b, c, h, w)
    return hyper_in, src


def mask_logits(hyper_in: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Per-class logits l = Mt' . Src': (B x N x C) with (B x C x H x W) -> B x N x H x W."""
    b, c, h, w = features.shape
    return (hyper_in @ features.reshape(b, c, h * w)).reshape(b, -1, h, w)
