"""U-SAM: a CNN encoder feeding SAM's ViT, SAM's prompt encoder and two-way decoder, U-Net decoder."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from usam.models.blocks import CNNEncoder, ConvBNReLU, TokenGrid, UpBlock, class_head
from usam.models.prompted import PromptedSegmenter
from usam.models.sam_parts import image_encoder_of, mask_decoder_of, mask_logits

DECODERS = ("class_tokens", "released")


@dataclass(frozen=True)
class USAMFeatures:
    """U-SAM's image side for a batch of B slices (D = `embed_dim`, H x W the input): the CNN skips f0 (D/8 x H)
    .. f3 (D x H/8) and the ViT's image embeddings (D x H/16). `select(index)` keeps the slices `index` names."""

    skips: tuple[Tensor, Tensor, Tensor, Tensor]
    embeddings: Tensor

    def select(self, index: Any) -> "USAMFeatures":
        return USAMFeatures(tuple(f[index] for f in self.skips), self.embeddings[index])


class USAM(PromptedSegmenter):
    """U-shaped Segment Anything for a single-channel 224 x 224 slice (D = `embed_dim`).

    Encoder: stem + four max-pool/conv blocks give f0 (D/8 x H) .. f3 (D x H/8) and f4
    (`vit_embed_dim` x H/16); f4's 14 x 14 tokens replace SAM's patch embedding and go through
    SAM's ViT (absolute + relative positions, windowed/global attention, neck to D).
    Decoder: SAM's two-way transformer with T mask tokens; Src (D x H/16) goes up through UP4,
    UP3, UP2 (skips f3, f2, f1) to Src' (D/8 x H/2); l = Mt' . Src' (T x H/2); UP1 (skip f0) and
    a head give N x H x W logits. `decoder`:

    - "class_tokens" (the paper's text, our default): T = N, one mask token per class; the head is
      a 1x1 convolution.
    - "released" (the authors' released code): T = D/8 mask tokens with as many hypernetwork MLPs;
      UP1 works on D/8 channels; the head is a 3x3 conv-BN-ReLU then a 1x1 convolution to N.

    `head_bias` of the final 1x1 convolution ("prior", "default", "none"; see `class_head`;
    default: "prior" for class_tokens, "none" for released, as that code has no bias there).
    `skip_connections` (0..4) keeps that many skips, coarsest first (4 = the paper's model).
    The [0, 1] input goes to the CNN as is (its first BatchNorm normalises).
    """

    def __init__(self, *, name: str = "usam_b", skip_connections: int = 4, decoder: str = "class_tokens",
                 head_bias: str | None = None, **sizes: Any) -> None:
        """`sizes`: `PromptedSegmenter`'s keyword arguments (classes, input size, points, SAM's sizes, prompt
        style)."""
        super().__init__(**sizes)
        if not 0 <= skip_connections <= 4:
            raise ValueError(f"skip_connections must be 0..4, got {skip_connections}")
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
        d, num_classes = self.config["embed_dim"], self.num_classes
        if d % 8:
            raise ValueError(f"embed_dim must be a multiple of 8, got {d}")
        head_bias = head_bias or ("none" if decoder == "released" else "prior")
        self.config = {"name": name, **self.config, "skip_connections": skip_connections, "decoder": decoder,
                       "head_bias": head_bias}
        tokens = num_classes if decoder == "class_tokens" else d // 8
        self.mask_decoder = mask_decoder_of(self.config, tokens)
        del self.mask_decoder.output_upscaling  # replaced by the UP4..UP2 path below
        self.cnn = CNNEncoder(in_channels=1, embed_dim=d, out_channels=self.config["vit_embed_dim"])
        self.image_encoder = image_encoder_of(self.config, in_chans=1)
        self.image_encoder.patch_embed = TokenGrid()
        # skips[i] is True when UP(4 - i) concatenates f(3 - i)
        self.skips = [i < skip_connections for i in range(4)]
        self.up4 = UpBlock(d, d if self.skips[0] else 0, d // 2)
        self.up3 = UpBlock(d // 2, d // 2 if self.skips[1] else 0, d // 4)
        self.up2 = UpBlock(d // 4, d // 4 if self.skips[2] else 0, d // 8)
        self.up1 = UpBlock(tokens, d // 8 if self.skips[3] else 0, d // 8)
        head = class_head(d // 8, num_classes, head_bias)
        self.head = head if decoder == "class_tokens" else nn.Sequential(ConvBNReLU(d // 8, d // 8), head)

    def encoder_modules(self) -> list[nn.Module]:
        return [self.cnn, self.image_encoder]

    def encode_image(self, images: Tensor) -> USAMFeatures:
        """images B x 1 x H x W in [0, 1] -> the prompt-independent features (CNN skips, ViT embeddings)."""
        self.check_inputs(images, None, None)
        f4, skips = self.cnn(images)
        return USAMFeatures(tuple(skips), self.image_encoder(f4))

    def decode_prompts(self, features: USAMFeatures, points: Tensor | None = None,
                       point_labels: Tensor | None = None) -> Tensor:
        """`encode_image`'s features, points B x K' x 2, point_labels B x K' -> B x N x H x W logits."""
        self.check_prompts(features.embeddings.shape[0], points, point_labels)
        f0, f1, f2, f3 = features.skips
        hyper_in, src = self.decode(features.embeddings, points, point_labels)
        x = self.up4(src, f3)
        x = self.up3(x, f2)
        x = self.up2(x, f1)
        logits = mask_logits(hyper_in, x)
        return self.head(self.up1(logits, f0))

    def forward(self, images: Tensor, points: Tensor | None = None, point_labels: Tensor | None = None) -> Tensor:
        """images B x 1 x H x W in [0, 1], points B x K x 2, point_labels B x K -> B x N x H x W."""
        self.check_inputs(images, points, point_labels)
        return self.decode_prompts(self.encode_image(images), points, point_labels)
