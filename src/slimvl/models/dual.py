"""VLDeformer's decomposition (Zhang et al., 2022): a cross-encoder's own
weights used as two individual encoders, one per modality.

A single-stream cross-encoder reads ``[video; text]`` together, so a gallery
of ``n`` items costs ``n`` forward passes per query. Fed only the video, or
only the text, the same network gives each item an embedding computed once:
a query then costs one encoding and a nearest-neighbour search. The output
is pooled by a mean over the *valid* positions (the reference code averages
padding too, which makes an embedding depend on how long the batch's
longest caption was), projected by the model's contrastive projection and
L2-normalised; contrastive fine-tuning (``slimvl.tasks.retrieval``'s ITC
term, with bi-modal hard negatives) then teaches the towers to meet.

``decompose(model)`` shares the cross-encoder's weights (fine-tuning the
dual encoder then changes the cross-encoder too); ``copy=True`` gives it its
own. The dual encoder is a model like any other: ``encode_video`` /
``encode_text`` (open_clip's names), the ``"cache"`` protocol that
retrieval evaluation uses, checkpoints through the registry.
"""
from __future__ import annotations

import copy as copying
import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..nn import VIDEO
from .base import DualEncoding, VLModel, linear_flops
from .config import VLConfig
from .registry import build_model, config_from_dict, register_model

# What can be decomposed: a model whose pair score needs both inputs at once.
DECOMPOSABLE = ("single_stream", "perceiver_vl")
_SHARED = [f.name for f in dataclasses.fields(VLConfig)]


@dataclass
class DualEncoderConfig(VLConfig):
    """A decomposed cross-encoder.

    Attributes:
        backbone: the cross-encoder's config (``to_dict()`` form): a
            ``single_stream`` model or a single-stream ``perceiver_vl``. The
            shared fields (``image_size``, ``dim``, ``vocab_size``...) are
            the backbone's; they mirror it and cannot be set apart from it.
        temperature: the initial (or, with ``learn_temperature=False``,
            fixed) softmax temperature of the contrastive loss (>= 0.01;
            the reference code's 0.005 is below the loss's cap).
        learn_temperature: learn it (as CLIP does) or keep it fixed.
        per_direction: one temperature per direction (text->video,
            video->text), as the reference code has.
        source_checksum: ``slimvl.checkpoint.weights_checksum`` of the
            cross-encoder when it was decomposed ("" if unknown): whether the
            backbone is still the cross-encoder (re-ranking may use it).
    """

    model_type: ClassVar[str] = "dual_encoder"
    backbone: dict = dataclasses.field(default_factory=dict)
    temperature: float = 0.05
    learn_temperature: bool = True
    per_direction: bool = False
    source_checksum: str = ""

    def validate(self) -> None:
        if not isinstance(self.backbone, Mapping) or self.backbone.get("model_type") not in DECOMPOSABLE:
            found = self.backbone.get("model_type") if isinstance(self.backbone, Mapping) else self.backbone
            self._fail("backbone", f"must be the config dict of a cross-encoder ({' or '.join(DECOMPOSABLE)}); "
                                   f"got model_type {found!r}")
        inner = config_from_dict(dict(self.backbone))
        if getattr(inner, "stream", "single") != "single":
            self._fail("backbone", f"a {inner.stream}-stream Perceiver-VL already encodes video and text apart: "
                                   "use it as a dual encoder as it is")
        defaults = VLConfig()
        for name in _SHARED:  # mirrors of the backbone: a value set apart from it would be ignored, so refuse it
            mine, theirs = getattr(self, name), getattr(inner, name)
            if mine != theirs and mine != getattr(defaults, name):
                self._fail(name, f"is the backbone's ({theirs!r}); set backbone[{name!r}] instead")
            setattr(self, name, theirs)
        self.backbone = inner.to_dict()
        super().validate()
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not 0.01 <= self.temperature < float("inf"):
            # The contrastive loss caps the inverse temperature at 100 (CLIP's cap on a learned scale):
            # a lower temperature would silently train at 0.01.
            self._fail("temperature", "must be a number >= 0.01 (e.g. 0.05; the loss caps 1/temperature at 100)")
        for name in ("learn_temperature", "per_direction"):
            if not isinstance(getattr(self, name), bool):
                self._fail(name, "must be true or false")
        if not isinstance(self.source_checksum, str):
            self._fail("source_checksum", "must be a string")


@register_model(DualEncoderConfig)
class DualEncoder(DualEncoding, VLModel):
    """A cross-encoder's network run on one modality at a time.

    ``encode_video(video [B, T, 3, H, W])`` and ``encode_text(ids, mask
    [B, L])`` give unit-norm float32 embeddings ``[B, embed_dim]``; a pair's
    score is their dot product (the cosine), whichever way it is asked for
    (``forward``, ``score_cached``, an index search).

    Pooling: the single-stream model's final tokens (its [CLS] and the
    modality's real tokens, padding excluded), or a Perceiver-VL's latents,
    averaged; then the backbone's ``proj``.
    """

    config: DualEncoderConfig

    def __init__(self, config: DualEncoderConfig, backbone: VLModel | None = None):
        # Not VLModel.__init__: the embeddings and projection are the backbone's.
        nn.Module.__init__(self)
        self.config = config
        if backbone is None:
            backbone = build_model(config.backbone)
        elif backbone.config.to_dict() != config.backbone:
            raise ValueError("DualEncoder: the backbone given does not match config.backbone")
        self.backbone = backbone
        self.pretrained_names: set[str] = set()
        start = math.log(1 / config.temperature)
        self.logit_scale = nn.Parameter(torch.full((2,) if config.per_direction else (), start),
                                        requires_grad=config.learn_temperature)

    # The backbone's input layers, which VLModel's embedding helpers read.
    @property
    def patch_embed(self) -> nn.Module:
        return self.backbone.patch_embed

    @property
    def text_embed(self) -> nn.Module:
        return self.backbone.text_embed

    @property
    def modality(self) -> nn.Module:
        return self.backbone.modality

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    # -- encoding -----------------------------------------------------------
    def encode_positions(self, inputs: Tensor, mask: Tensor, modality: int) -> tuple[Tensor, Tensor]:
        """The backbone's output positions for one modality's input array
        ``[B, M, D]``: ``([B, P, D], valid [B, P])`` (the single stream's
        [CLS] and tokens, or all latents)."""
        b = self.backbone
        if self.config.backbone["model_type"] == "single_stream":
            return b.encode_tokens(inputs, mask)
        latents = b.encode(inputs, mask, modality)
        return latents, torch.ones(latents.shape[:2], dtype=torch.bool, device=latents.device)

    def pool_unimodal(self, inputs: Tensor, mask: Tensor, modality: int | None = None) -> Tensor:
        """Mean over the valid output positions, projected: ``[B, embed_dim]``."""
        x, valid = self.encode_positions(inputs, mask, VIDEO if modality is None else modality)
        w = self.pool_weights(valid).to(x.dtype).unsqueeze(-1)
        return self.backbone.proj((x * w).sum(1) / w.sum(1))

    def pool_weights(self, valid: Tensor) -> Tensor:
        """Each output position's weight in the pooled mean ``[B, P]``: 1 if
        valid, else 0 (a token-merging patch weighs merged tokens by size)."""
        return valid.float()

    # -- cost -----------------------------------------------------------------
    def retrieval_flops(self, frames: int, text_len: int) -> dict[str, int]:
        """Per video and per caption: the backbone over that modality alone,
        and the projection; per pair: one dot product."""
        b, e = self.backbone, self.config.embed_dim
        proj = linear_flops(1, self.config.dim, e)
        video = b.embed_flops(frames) + b.encoder_flops(self.patch_embed.num_tokens(frames)) + proj
        return {"video": video, "text": b.encoder_flops(text_len) + proj, "pair": 2 * e}

def decompose(model: VLModel, copy: bool = False, **options: Any) -> DualEncoder:
    """The dual encoder made of ``model``'s weights (VLDeformer).

    Args:
        model: a cross-encoder: ``single_stream`` or a single-stream
            ``perceiver_vl`` (multi/mixed streams already encode apart).
        copy: give the dual encoder its own copy of the weights (False:
            shared, so training one trains the other).
        options: ``DualEncoderConfig`` fields (``temperature``,
            ``learn_temperature``, ``per_direction``).

    The dual encoder records the cross-encoder's weight checksum
    (``config.source_checksum``) so that re-ranking can tell whether its
    backbone is still the cross-encoder.
    """
    from ..checkpoint import weights_checksum

    if isinstance(model, DualEncoder):
        raise ValueError("decompose: the model is already a dual encoder")
    if "_merge" in vars(model):  # its patched layer loop would merge the captions of the text tower too
        raise ValueError("decompose: the model is patched for token merging; slimvl.merge.unpatch(model) first, "
                         "then patch the dual encoder (slimvl.merge.patch(dual, ...))")
    kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    if kind not in DECOMPOSABLE:
        raise ValueError(f"decompose: a {kind} cannot be decomposed; expected one of {list(DECOMPOSABLE)}")
    unknown = sorted(set(options) - {"temperature", "learn_temperature", "per_direction"})
    if unknown:
        raise ValueError(f"decompose: unknown options {unknown}; known: temperature, learn_temperature, "
                         "per_direction")
    config = DualEncoderConfig(backbone=model.config.to_dict(), source_checksum=weights_checksum(model), **options)
    backbone = copying.deepcopy(model) if copy else model
    dual = DualEncoder(config, backbone).to(model.device)
    dual.train(model.training)
    return dual


__all__ = ["DualEncoder", "DualEncoderConfig", "decompose", "DECOMPOSABLE"]
