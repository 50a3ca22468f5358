"""A Perceiver video/image classifier: Perceiver-VL's latent encoder reading
the video alone, a [CLS] query decoding the latents, a classification head.

This is the setting of dynamic query selection (a visual Perceiver
classifying images) in the synthetic world: which shapes a clip shows
(multi-label) or how many objects it holds (multi-class); an image is a
one-frame video.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from einops import repeat
from torch import Tensor, nn

from ..nn import QueryDecoder
from .base import VLModel, block_flops, linear_flops, score_in_fp32
from .config import PerceiverVLConfig
from .latents import InputArray, LatentEncoder, LatentOptions
from .registry import register_model


@dataclass
class PerceiverClassifierConfig(PerceiverVLConfig):
    """``PerceiverVLConfig``'s encoder fields (latents, depth pattern,
    LayerDrop, nested latents) plus the classifier's.

    Attributes:
        num_classes: classes of the head (> 0).
        multi_label: each class is a yes/no of its own (sigmoid, binary
            cross-entropy), e.g. which shapes are present; False: exactly one
            class (softmax, cross-entropy), e.g. the object count.
        decoder_layers: cross-attention layers of the [CLS] decoder (>= 1).
    The retrieval fields (``stream``, ``share_encoder``, ``mlm``,
    ``num_answers``) must keep their defaults: the classifier reads no text.
    """

    model_type = "perceiver_cls"
    num_classes: int = 0
    multi_label: bool = False

    def validate(self) -> None:
        super().validate()
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes <= 0:
            self._fail("num_classes", "must be a positive integer (the classes of the head)")
        if not isinstance(self.multi_label, bool):
            self._fail("multi_label", "must be true or false")
        if self.decoder_layers < 1:
            self._fail("decoder_layers", "the [CLS] decoder needs at least one layer")
        for name, default in (("stream", "single"), ("mlm", False), ("num_answers", 0)):
            if getattr(self, name) != default:
                self._fail(name, f"a classifier reads no text: leave it at {default!r}")


@register_model(PerceiverClassifierConfig, presets={
    "perceiver_cls_tiny": dict(dim=64, heads=4, num_latents=16, layers="csscss", num_classes=6, multi_label=True),
    "perceiver_cls_small": dict(dim=256, heads=4, num_latents=64, layers="cssss" * 2, num_classes=6,
                                multi_label=True),
})
class PerceiverClassifier(LatentOptions, VLModel):
    """Video ``[B, T, 3, H, W]`` -> class logits ``[B, num_classes]``.

    The latents (``active_latents`` of them) read the video's patch tokens
    through the depth pattern; one [CLS] query reads the latents; a LayerNorm
    + Linear head (in fp32) gives the logits.
    """

    config: PerceiverClassifierConfig
    modalities = ("video",)

    def __init__(self, config: PerceiverClassifierConfig):
        super().__init__(config)
        c = config
        self.encoder = LatentEncoder(c)
        self.cls_query = nn.Parameter(torch.randn(1, c.dim) * 0.02)
        self.decoder = QueryDecoder(c.dim, c.heads, c.mlp_ratio, c.decoder_layers, c.dropout)
        self.head = nn.Sequential(nn.LayerNorm(c.dim), nn.Linear(c.dim, c.num_classes))

    @property
    def capabilities(self) -> frozenset[str]:
        return frozenset({"classify", "cross_attn_keep", "active_latents"})

    def read_video(self, video: Tensor | Mapping[str, Tensor]) -> Tensor:
        """The video of an inputs mapping (or given as is), checked, on the model's device."""
        if isinstance(video, Mapping):
            if "video" not in video:
                raise ValueError(f"inputs: missing ['video']; a {self.config.model_type} reads video: "
                                 "float [B, T, 3, H, W] in [-1, 1] (an image is T=1)")
            video = video["video"]
        (video,) = self.to_device(video)
        self.check_video(video)
        return video

    def prepare(self, video: Tensor | Mapping[str, Tensor]) -> InputArray:
        """The videos' embedded input array (``InputArray``): the work that
        does not depend on the latents, done once for every latent count."""
        return InputArray(*self.embed_inputs(self.read_video(video)))

    def latents(self, video: Tensor | Mapping[str, Tensor]) -> Tensor:
        """The encoder's latents ``[B, Q, D]`` of the videos."""
        return self.encode_array(self.prepare(video))

    def classify_array(self, array: InputArray) -> Tensor:
        """Class logits ``[B, C]`` of a prepared input array (``prepare``)."""
        return self.classify_latents(self.encode_array(array))

    def distill_modules(self) -> list[nn.Module]:
        """The [CLS] decoder: what the head reads (self-distillation matches it)."""
        return [self.decoder]

    def probe(self, video: Tensor | Mapping[str, Tensor]) -> Tensor:
        """Cheap features ``[B, D]`` of the videos (``probe_inputs``): what a
        learned latent policy reads."""
        return self.probe_array(self.prepare(video))

    def classify_latents(self, latents: Tensor) -> Tensor:
        """Class logits ``[B, C]`` (fp32) from latents ``[B, Q, D]``."""
        cls = self.decoder(repeat(self.cls_query, "q d -> b q d", b=latents.shape[0]), latents)
        return score_in_fp32(self.head, cls[:, 0])

    def forward(self, video: Tensor | Mapping[str, Tensor]) -> Tensor:
        """Class logits ``[B, num_classes]`` of videos (or ``{"video": ...}``)."""
        return self.classify_array(self.prepare(video))

    def analytic_flops(self, frames: int, text_len: int = 0) -> int:
        """FLOPs to classify one clip (``text_len`` is ignored: no text)."""
        c = self.config
        decoder = c.decoder_layers * block_flops(1, c.latents_run(), c.dim, c.mlp_ratio, cross=True)
        return (self.embed_flops(frames) + self.encoder_flops(self.patch_embed.num_tokens(frames)) + decoder
                + linear_flops(1, c.dim, c.num_classes))
