"""What U-SAM and the SAM baseline share: point prompts, class embeddings, the two-way decoder."""
from __future__ import annotations

import torch
from torch import nn

from usam.models.blocks import split_trainable
from usam.models.sam_parts import (
    PATCH_SIZE,
    build_prompt_encoder,
    run_two_way_transformer,
)
from usam.prompts import PROMPT_STYLES


class PromptedSegmenter(nn.Module):
    """Base of the SAM-style models: frozen prompt encoder, class embeddings, mask decoder.

    Prompts: K = (num_classes - 1) * points_per_class points per image, (x, y) in input-pixel
    coordinates (SAM's convention: integers are pixel centres). Label 1 marks a real point, -1
    padding (coordinates ignored, SAM's not-a-point embedding). `points=None` gives null prompts.

    `prompt_style` (usam.prompts): "classwise" (ours) - slot j belongs to foreground class
    1 + j // points_per_class, an absent class's slots are padding, and a learned class embedding
    (one D-vector per foreground class, initialised to zero) is added to every real point token
    after the frozen prompt encoder, because SAM's prompt encoder cannot tell which class a point
    belongs to and the decoder's attention is permutation-equivariant over tokens. "released" (the
    authors' code) - the points go through SAM's prompt encoder as they are, with no class embedding.
    """

    def __init__(
        self,
        *,
        num_classes: int = 3,
        img_size: int = 224,
        points_per_class: int = 3,
        embed_dim: int = 256,
        vit_embed_dim: int = 768,
        vit_depth: int = 12,
        vit_num_heads: int = 12,
        vit_global_attn_indexes: tuple[int, ...] | list[int] = (2, 5, 8, 11),
        vit_window_size: int = 14,
        decoder_depth: int = 2,
        decoder_mlp_dim: int = 2048,
        decoder_num_heads: int = 8,
        prompt_style: str = "classwise",
    ) -> None:
        """Sizes of SAM's parts (ViT-B's by default) and the prompt style. The subclass builds the mask
        decoder first (`usam.models.sam_parts.mask_decoder_of` its config, with its count of mask tokens) and the
        ViT (`image_encoder_of`) where its place in the architecture needs it."""
        super().__init__()
        if prompt_style not in PROMPT_STYLES:
            raise ValueError(f"prompt_style must be one of {', '.join(PROMPT_STYLES)}, got {prompt_style!r}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background + classes), got {num_classes}")
        if points_per_class < 0:
            raise ValueError(f"points_per_class must be >= 0, got {points_per_class}")
        if img_size % PATCH_SIZE:
            raise ValueError(f"img_size must be a multiple of {PATCH_SIZE}, got {img_size}")
        self.config = {
            "num_classes": num_classes,
            "img_size": img_size,
            "points_per_class": points_per_class,
            "prompt_style": prompt_style,
            "embed_dim": embed_dim,
            "vit_embed_dim": vit_embed_dim,
            "vit_depth": vit_depth,
            "vit_num_heads": vit_num_heads,
            "vit_global_attn_indexes": [int(i) for i in vit_global_attn_indexes],
            "vit_window_size": vit_window_size,
            "decoder_depth": decoder_depth,
            "decoder_mlp_dim": decoder_mlp_dim,
            "decoder_num_heads": decoder_num_heads,
        }
        self.num_classes = num_classes
        self.points_per_class = points_per_class
        self.img_size = img_size
        self.prompt_style = prompt_style
        self.prompt_encoder = build_prompt_encoder(embed_dim=embed_dim, img_size=img_size)
        self.class_embed = None
        if prompt_style == "classwise":
            self.class_embed = nn.Parameter(torch.zeros(num_classes - 1, embed_dim))
            slot_classes = torch.arange((num_classes - 1) * points_per_class)
            if points_per_class:
                slot_classes = slot_classes // points_per_class
            self.register_buffer("slot_classes", slot_classes, persistent=False)

    @property
    def num_points(self) -> int:
        """K, the number of point slots per image."""
        return (self.num_classes - 1) * self.points_per_class

    def check_inputs(
        self,
        images: torch.Tensor,
        points: torch.Tensor | None,
        point_labels: torch.Tensor | None,
    ) -> None:
        """Raise ValueError on inputs that do not match the model's contract."""
        size = self.img_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (1, size, size):
            raise ValueError(f"images must be B x 1 x {size} x {size}, got {tuple(images.shape)}")
        self.check_prompts(images.shape[0], points, point_labels)

    def check_prompts(self, batch: int, points: torch.Tensor | None, point_labels: torch.Tensor | None) -> None:
        """Raise ValueError on prompts that do not match the model's contract: points B x K' x 2 and point_labels
        B x K' with K' = K (the class slots) or K' > K, the slots after K being extra negative clicks (label 0,
        SAM's background point; or -1, padding). Extra slots carry no class embedding."""
        if (points is None) != (point_labels is None):
            raise ValueError("points and point_labels must be given together")
        if points is None or points.shape[1] == 0:
            return
        k = self.num_points
        shapes_ok = (points.ndim == 3 and points.shape[0] == batch and points.shape[2] == 2
                     and points.shape[1] >= k and tuple(point_labels.shape) == tuple(points.shape[:2]))
        if not shapes_ok:
            raise ValueError(
                f"points must be B x K x 2 and point_labels B x K with K = (num_classes - 1) * "
                f"points_per_class = {self.num_points} (or more slots: extra negative clicks); got "
                f"{tuple(points.shape)} and {tuple(point_labels.shape)}"
            )
        if points.shape[1] > k and bool((point_labels[:, k:] > 0).any()):
            raise ValueError(f"slots after the first {k} are for negative clicks: label 0 (or -1 padding)")

    def embed_prompts(
        self, points: torch.Tensor | None, point_labels: torch.Tensor | None, batch: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse (B x T x D) and dense (B x D x h x w) prompt embeddings.

        Points go through SAM's frozen prompt encoder (which appends one not-a-point token, as
        SAM does for points without boxes); then (classwise style) the class embedding of each
        slot is added to the real (label >= 0) point tokens. Null prompts give B x 0 x D sparse
        embeddings.
        """
        encoder = self.prompt_encoder
        if points is None or points.shape[1] == 0:
            sparse = encoder.no_mask_embed.weight.new_zeros(batch, 0, encoder.embed_dim)
            dense = encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
                batch, -1, *encoder.image_embedding_size
            )
            return sparse, dense
        with torch.no_grad():
            sparse, dense = encoder(points=(points, point_labels), boxes=None, masks=None)
        if self.class_embed is None:
            return sparse, dense
        k = self.num_points
        is_point = (point_labels[:, :k] >= 0).unsqueeze(-1).to(self.class_embed.dtype)
        class_tokens = self.class_embed[self.slot_classes].unsqueeze(0) * is_point
        sparse = torch.cat([sparse[:, :k] + class_tokens, sparse[:, k:]], dim=1)
        return sparse, dense

    def decode(
        self,
        image_embeddings: torch.Tensor,
        points: torch.Tensor | None,
        point_labels: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Two-way transformer over prompts and image: (hyper_in B x T x D/8 for T mask tokens, Src B x D x h x w)."""
        sparse, dense = self.embed_prompts(points, point_labels, image_embeddings.shape[0])
        return run_two_way_transformer(
            self.mask_decoder,
            image_embeddings,
            self.prompt_encoder.get_dense_pe(),
            sparse,
            dense,
        )

    def encoder_modules(self) -> list[nn.Module]:
        """Modules in the 'encoder' optimiser group (the ViT, and the CNN path where there is one)."""
        raise NotImplementedError

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters split for the optimiser.

        "encoder": the ViT (pretrained from SAM) and U-SAM's CNN down path, trained with the
        smaller learning rate in the authors' code (1e-4); "decoder": everything else that
        trains (1e-3). The frozen prompt encoder is in neither.
        """
        return split_trainable(self, self.encoder_modules())
