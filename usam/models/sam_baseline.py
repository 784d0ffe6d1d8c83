"""The paper's "initial approach": SAM itself with one mask token per class."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from usam.models.prompted import PromptedSegmenter
from usam.models.sam_parts import image_encoder_of, mask_decoder_of, mask_logits

# SAM's RGB normalisation, applied to the grey slice repeated over three channels.
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class SAMFeatures:
    """The SAM baseline's image side for B slices: the ViT's embeddings (B x D x H/16 x W/16) and the input's
    H x W. `select(index)` keeps the slices `index` names."""

    embeddings: Tensor
    size: tuple[int, int]

    def select(self, index: Any) -> "SAMFeatures":
        return SAMFeatures(self.embeddings[index], self.size)


class SAMBaseline(PromptedSegmenter):
    """SAM with patch embedding, no CNN path: Src upsampled 4x, logits upsampled 4x bilinearly.

    The [0, 1] slice is scaled to [0, 255], repeated to three channels and normalised with
    SAM's pixel mean and std, so SAM's pretrained patch embedding sees what it was trained on.
    The decoder is SAM's own: two-way transformer, `output_upscaling` (D/8 x H/4), logits
    l = Mt' . Src' (N x H/4), then bilinear interpolation to N x H x W.
    """

    def __init__(self, *, name: str = "sam_b", **sizes: Any) -> None:
        """`sizes`: `PromptedSegmenter`'s keyword arguments (classes, input size, points, SAM's sizes)."""
        super().__init__(**sizes)
        self.config = {"name": name, **self.config}
        self.mask_decoder = mask_decoder_of(self.config, self.num_classes)  # one mask token per class
        self.image_encoder = image_encoder_of(self.config, in_chans=3)
        self.register_buffer(
            "pixel_mean", torch.tensor(SAM_PIXEL_MEAN).view(1, 3, 1, 1) / 255.0, persistent=False
        )
        self.register_buffer(
            "pixel_std", torch.tensor(SAM_PIXEL_STD).view(1, 3, 1, 1) / 255.0, persistent=False
        )

    def encoder_modules(self) -> list[nn.Module]:
        return [self.image_encoder]

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """B x 1 x H x W in [0, 1] -> B x 3 x H x W normalised as SAM expects."""
        return (images.expand(-1, 3, -1, -1) - self.pixel_mean) / self.pixel_std

    def encode_image(self, images: Tensor) -> SAMFeatures:
        """images B x 1 x H x W in [0, 1] -> the prompt-independent ViT embeddings (D x H/16)."""
        self.check_inputs(images, None, None)
        return SAMFeatures(self.image_encoder(self.preprocess(images)), tuple(images.shape[-2:]))

    def decode_prompts(self, features: SAMFeatures, points: Tensor | None = None,
                       point_labels: Tensor | None = None) -> Tensor:
        """`encode_image`'s features, points B x K' x 2, point_labels B x K' -> B x N x H x W logits."""
        self.check_prompts(features.embeddings.shape[0], points, point_labels)
        hyper_in, src = self.decode(features.embeddings, points, point_labels)
        logits = mask_logits(hyper_in, self.mask_decoder.output_upscaling(src))
        return F.interpolate(logits, size=features.size, mode="bilinear", align_corners=False)

    def forward(self, images: Tensor, points: Tensor | None = None, point_labels: Tensor | None = None) -> Tensor:
        """images B x 1 x H x W in [0, 1], points B x K x 2, point_labels B x K -> B x N x H x W."""
        self.check_inputs(images, points, point_labels)
        return self.decode_prompts(self.encode_image(images), points, point_labels)
