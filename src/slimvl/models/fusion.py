"""Fusion classifiers: video, audio and text tokens fused by one of the
encoders of ``slimvl.nn.fusion`` (early, late, MBT, LoCoMT), at equal width
and depth, so that only the fusion differs.

    video [B, T, 3, H, W] -> PatchEmbed        \\
    audio [B, n_mels, F]  -> SpectrogramEmbed   } + modality tag -> FusionEncoder -> LayerNorm
    text  [B, L] (+ mask) -> TextEmbed         /
    -> per modality: mean over its real tokens -> LayerNorm + Linear -> logits, averaged over the modalities

Averaging per-modality logits is how MBT and late fusion predict; every
scheme predicts that way here, so the heads are the same for all four.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..nn import FusionEncoder, SpectrogramEmbed
from ..nn.fusion import SCHEMES
from ..nn.modalities import MODALITIES, rows_of
from ..nn.views import view_map
from .base import VLModel, linear_flops, score_in_fp32
from .config import VLConfig
from .registry import register_model

FUSION_MODALITIES = ("video", "audio", "text")


@dataclass
class FusionConfig(VLConfig):
    """``VLConfig``'s video and text fields plus the fusion encoder's, the
    audio front end's and the classifier's.

    Attributes:
        fusion: ``"early"``, ``"late"``, ``"mbt"`` or ``"locomt"`` (``nn.fusion``).
        modalities: what the model reads, distinct names among ``"video"``,
            ``"audio"``, ``"text"``, in the order their tokens are concatenated.
        depth: layers of the encoder.
        bottlenecks: MBT's shared tokens.
        fusion_layer: MBT's first fused layer (None: ``FusionEncoder``'s default).
        views: LoCoMT's view map (``nn.views.view_map``), checked against
            ``modalities``, ``heads`` and ``depth`` here, at config time.
        num_classes, multi_label: the head (multi-label: sigmoid per class).
        sample_rate, audio_seconds, n_fft, hop_length, n_mels, f_max: how a
            waveform becomes a log-mel spectrogram ``[n_mels, audio_frames]``
            (what the data pipeline computes; the model checks the shape).
        audio_patch, audio_patch_time: mel bins and frames per audio patch.
        audio_mean, audio_std: the training split's log-mel statistics. The
            data pipeline normalises with them; the model records them so
            that evaluation normalises as training did.
    """

    model_type: ClassVar[str] = "fusion"
    fusion: str = "early"
    modalities: list = field(default_factory=lambda: ["video", "audio"])
    depth: int = 4
    bottlenecks: int = 4
    fusion_layer: int | None = None
    views: Any = "default"
    num_classes: int = 13
    multi_label: bool = True
    sample_rate: int = 16000
    audio_seconds: float = 2.0
    n_fft: int = 1024
    hop_length: int = 256
    n_mels: int = 128
    f_max: float = 4000.0
    audio_patch: int = 16
    audio_patch_time: int = 8
    audio_mean: float = 0.0
    audio_std: float = 1.0

    @property
    def audio_frames(self) -> int:
        """Spectrogram frames of a whole clip (``torch.stft`` with ``center=True``)."""
        return int(round(self.audio_seconds * self.sample_rate)) // self.hop_length + 1

    def validate(self) -> None:
        super().validate()
        if self.num_answers != 0:
            self._fail("num_answers", "a fusion model classifies: leave it at 0")
        if self.fusion not in SCHEMES:
            self._fail("fusion", f"must be one of {list(SCHEMES)}")
        mods = self.modalities
        if not isinstance(mods, (list, tuple)) or not mods or len(set(mods)) != len(mods) \
                or any(m not in FUSION_MODALITIES for m in mods):
            self._fail("modalities", f"must be distinct names among {list(FUSION_MODALITIES)}, e.g. ['video', 'audio']")
        self.modalities = list(mods)  # one form, however given: configs are compared and saved
        ints = ("depth", "bottlenecks", "num_classes", "sample_rate", "n_fft", "hop_length", "n_mels", "audio_patch",
                "audio_patch_time")
        for name in ints:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                self._fail(name, "must be a positive integer")
        fl = self.fusion_layer
        if fl is not None and (isinstance(fl, bool) or not isinstance(fl, int) or not 0 <= fl <= self.depth):
            self._fail("fusion_layer", f"must be None (the default) or a layer in 0..depth={self.depth}")
        if not isinstance(self.multi_label, bool):
            self._fail("multi_label", "must be true or false")
        for name in ("audio_seconds", "f_max", "audio_mean", "audio_std"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                self._fail(name, "must be a finite number")
        if self.audio_seconds <= 0:
            self._fail("audio_seconds", "must be positive")
        if not 0 < self.f_max <= self.sample_rate / 2:
            self._fail("f_max", f"must be in (0, sample_rate / 2 = {self.sample_rate / 2}]")
        if self.hop_length > self.n_fft:
            self._fail("hop_length", f"must be at most n_fft={self.n_fft} (a longer hop skips samples)")
        if self.n_mels % self.audio_patch:
            self._fail("audio_patch", f"must divide n_mels={self.n_mels} (mel bins per patch)")
        if self.audio_std <= 0:
            self._fail("audio_std", "must be positive (the training split's log-mel standard deviation)")
        self._check_views()

    def _check_views(self) -> None:
        if isinstance(self.views, (list, tuple)):  # one saved form: lists of strings
            self.views = [[str(v) for v in x] if isinstance(x, (list, tuple)) else str(x) for x in self.views]
        # The default map only matters to LoCoMT (and needs a head per modality there); a given map must fit
        # the model whatever the scheme, so that switching to LoCoMT cannot turn it into an error later.
        if self.fusion != "locomt" and self.views == "default":
            return
        try:
            view_map(self.views, self.modalities, self.heads, self.depth)
        except ValueError as e:
            why = str(e)
            self._fail("views", why.split(": ", 1)[1] if why.startswith("views") and ": " in why else why)


def _pool(tokens: Tensor, mask: Tensor | None) -> Tensor:
    """Mean ``[B, D]`` of tokens ``[B, L, D]`` over the real ones (``mask``
    ``[B, L]``, True = real); a row without any is zero."""
    if mask is None:
        return tokens.mean(1)
    w = mask.to(tokens.dtype)[..., None]
    return (tokens * w).sum(1) / w.sum(1).clamp(min=1)


_TINY = dict(dim=64, heads=4, depth=4, image_size=64, patch_size=8, tubelet=2, max_frames=8, max_text_len=16)
_BASE = dict(dim=768, heads=12, depth=12, image_size=224, patch_size=16, tubelet=2, max_frames=8, audio_seconds=10.0,
             n_fft=400, hop_length=160, n_mels=128, f_max=8000.0, audio_patch=16, audio_patch_time=16)


@register_model(FusionConfig, presets={f"fusion_{s}_{size}": dict(fields, fusion=s)
                                      for s in SCHEMES for size, fields in (("tiny", _TINY), ("base", _BASE))})
class FusionModel(VLModel):
    """Inputs ``{"video": [B, T, 3, H, W], "audio": [B, n_mels, F], "text":
    [B, L], "text_mask": [B, L]}`` (those of ``config.modalities``) -> class
    logits ``[B, num_classes]`` (float32)."""

    config: FusionConfig

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.config.modalities)

    def __init__(self, config: FusionConfig):
        super().__init__(config)
        c = config
        if "video" not in self.modalities:
            self.patch_embed = None  # VLModel builds one for every model; a model without video has no use for it
        self.audio_embed = SpectrogramEmbed(c.n_mels, c.audio_frames, c.audio_patch, c.audio_patch_time, c.dim) \
            if "audio" in self.modalities else None
        self.encoder = FusionEncoder(c.fusion, self.modalities, c.dim, c.heads, c.depth, c.mlp_ratio, c.dropout,
                                     c.bottlenecks, c.fusion_layer, c.views)
        self.norm = nn.LayerNorm(c.dim)
        self.class_heads = nn.ModuleDict({m: nn.Sequential(nn.LayerNorm(c.dim), nn.Linear(c.dim, c.num_classes))
                                          for m in self.modalities})

    @property
    def capabilities(self) -> frozenset[str]:
        return frozenset({"classify"})

    # -- boundary -------------------------------------------------------
    def expected(self, modality: str) -> str:
        """The shapes this model takes for ``modality``, in words."""
        c = self.config
        return {"video": f"video: float [B, T<={c.max_frames}, 3, {c.image_size}, {c.image_size}]",
                "audio": f"audio: float [B, n_mels={c.n_mels}, F<={c.audio_frames}] (audio_frames of "
                         f"{c.audio_seconds} s at hop_length={c.hop_length})",
                "text": f"text: integer ids [B, L<={c.max_text_len}] and text_mask: bool [B, L]"}[modality]

    def read(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The tensors of this model's modalities in ``inputs`` (other keys
        ignored), checked, on the model's device."""
        keys = [k for m in self.modalities for k in MODALITIES[m].keys]
        missing = [k for k in keys if inputs.get(k) is None]
        if missing:
            raise ValueError(f"inputs: missing {missing}; this {self.config.model_type} model reads {keys} ("
                             + "; ".join(f"{MODALITIES[m].describe} -- here {self.expected(m)}"
                                         for m in self.modalities) + ")")
        x = dict(zip(keys, self.to_device(*(inputs[k] for k in keys))))
        for m in self.modalities:
            if not self._fits(m, x):
                got = ", ".join(f"{k} {x[k].dtype} {tuple(x[k].shape)}" for k in MODALITIES[m].keys)
                raise ValueError(f"inputs: expected {self.expected(m)}; got {got}")
        rows_of(x)  # one batch size for all
        if "text" in x:
            self.check_token_ids(x["text"])
        return x

    def _fits(self, modality: str, x: Mapping[str, Tensor]) -> bool:
        c = self.config
        if modality == "video":
            v = x["video"]
            return v.dim() == 5 and v.shape[2] == 3 and v.shape[3:] == (c.image_size, c.image_size) \
                and 1 <= v.shape[1] <= c.max_frames and v.is_floating_point()
        if modality == "audio":
            a = x["audio"]
            return a.dim() == 3 and a.shape[1] == c.n_mels and 1 <= a.shape[2] <= c.audio_frames \
                and a.is_floating_point()
        t, tm = x["text"], x["text_mask"]
        return t.dim() == 2 and 1 <= t.shape[1] <= c.max_text_len and t.dtype in (torch.int64, torch.int32) \
            and tm.shape == t.shape and tm.dtype == torch.bool

    # -- model ----------------------------------------------------------
    def embed(self, x: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Tokens ``{modality: [B, L_m, D]}`` (tagged with their modality) and
        key-padding masks ``{modality: [B, L_m]}`` (text only) of read inputs."""
        tokens, masks = {}, {}
        for m in self.modalities:
            if m == "video":
                t = self.patch_embed(x["video"])
            elif m == "audio":
                t = self.audio_embed(x["audio"])
            else:
                t = self.text_embed(x["text"])
                masks["text"] = x["text_mask"]
            tokens[m] = self.modality(t, m)
        return tokens, masks

    def forward(self, inputs: Mapping[str, Tensor] | Tensor, text_ids: Tensor | None = None,
                text_mask: Tensor | None = None) -> Tensor:
        """Class logits ``[B, num_classes]`` (float32) of an inputs mapping
        (a video-text model may also be called ``model(video, text_ids,
        text_mask)``, as every video-text model is)."""
        if not isinstance(inputs, Mapping):
            if self.modalities != ("video", "text"):
                raise TypeError(f"a fusion model of {list(self.modalities)} takes one inputs mapping")
            inputs = {"video": inputs, "text": text_ids, "text_mask": text_mask}
        tokens, masks = self.embed(self.read(inputs))
        out = self.encoder(tokens, masks)
        logits = [score_in_fp32(self.class_heads[m], _pool(self.norm(out[m]), masks.get(m))) for m in self.modalities]
        return torch.stack(logits).mean(0)

    # -- cost -----------------------------------------------------------
    def token_lengths(self, frames: int, text_len: int = 0, audio_frames: int | None = None) -> dict[str, int]:
        """Tokens per modality of a clip of ``frames`` video frames,
        ``audio_frames`` spectrogram frames (default: a whole clip,
        ``config.audio_frames``) and ``text_len`` text tokens."""
        if "text" in self.modalities and text_len < 1:
            raise ValueError(f"text_len={text_len}: this model reads text, give at least one token")
        n = {"video": lambda: self.patch_embed.num_tokens(frames),
             "audio": lambda: self.audio_embed.num_tokens(audio_frames or self.config.audio_frames),
             "text": lambda: text_len}
        return {m: n[m]() for m in self.modalities}

    def analytic_flops(self, frames: int, text_len: int = 0, audio_frames: int | None = None) -> int:
        """FLOPs (as torch counts them) to classify one clip: patch and
        spectrogram projections, the encoder, one head per modality."""
        c, n = self.config, self.token_lengths(frames, text_len, audio_frames)
        embeds = {"video": self.patch_embed, "audio": self.audio_embed}
        f = sum(linear_flops(n[m], e.proj.in_features, e.proj.out_features) for m, e in embeds.items() if m in n)
        return f + self.encoder.flops(n) + len(n) * linear_flops(1, c.dim, c.num_classes)


__all__ = ["FusionConfig", "FusionModel", "FUSION_MODALITIES"]
