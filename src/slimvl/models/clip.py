"""A CLIP-style dual encoder (Radford et al., 2021), with CrossGET's cross
tokens (Shi et al., ICML 2024) as an option.

Two towers meet only in a shared embedding space: a ViT over space-time
patches read through a [CLS] token (an image is a one-frame video), and a
causal text transformer read at its last real token (the EOT, [SEP] in
``[CLS] words [SEP] [PAD]...``). A pair's score is the cosine of the two
embeddings, so every video and caption is encoded once and cached, and a
query costs one encoding and a matrix product.

Cross tokens (``cross_tokens=True``): each tower appends one more token,
last, that starts as a copy of the token it pools ([CLS] or EOT). Before
every layer it is set again, to a value with the gradient stopped (vision:
its own current value; text: the EOT's, since in a causal tower no token
reads the last one) plus a learned per-layer offset, as CrossGET's code
does. A consistency term (``cross_consistency_loss``) pulls the two towers'
cross tokens of a matched pair together at every layer; since the values
it sees are the stopped ones plus offsets, it trains the offsets alone,
while the towers' layers learn from the task loss. The vision cross
token's query is what guides token merging (``slimvl.merge``): which
tokens are important to what the other modality cares about. Cross tokens
are never pooled.

In the text tower no token reads the cross token (it is last, and the
tower is causal); in the vision tower every token does, as in CrossGET's
code: a copy of [CLS] that doubles [CLS]'s weight in every attention, so a
trained model changes the moment cross tokens are added. ``cross_hidden``
hides it there too (a key no other token reads, the cross token still
reading them all): with zero offsets the model is then exactly the model
without cross tokens, and fine-tuning starts from where it was.

The tower loop is the methods ``tower_input`` -> ``run_tower`` ->
``pool_tower``; ``run_tower`` is the one place where the layers run, which
a token-merging patch overrides.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import Block
from ..nn.masks import causal_mask
from .base import DualEncoding, VLModel, block_flops, linear_flops, score_in_fp32, without_autocast
from .config import VLConfig
from .registry import register_model

TOWERS = ("video", "text")


@dataclass
class ClipConfig(VLConfig):
    """A CLIP dual encoder.

    Attributes:
        depth: layers of the vision tower.
        text_depth: layers of the (causal) text tower.
        cross_tokens: add CrossGET's cross token to each tower.
        cross_hidden: no vision token reads the vision cross token (as
            no text token reads the text one); needs ``cross_tokens``.
        cross_weight: ``w`` of the training loss ``(1 - w) * task + w *
            cross`` when cross tokens are on (0: cross tokens without their
            consistency term).
        temperature: initial temperature of the contrastive loss (the
            learned ``logit_scale`` starts at ``log(1 / temperature)``).
    """

    model_type: ClassVar[str] = "clip"
    depth: int = 4
    text_depth: int = 4
    cross_tokens: bool = False
    cross_hidden: bool = False
    cross_weight: float = 0.5
    temperature: float = 0.07

    def validate(self) -> None:
        super().validate()
        for name in ("depth", "text_depth"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                self._fail(name, "must be a positive integer")
        for name in ("cross_tokens", "cross_hidden"):
            if not isinstance(getattr(self, name), bool):
                self._fail(name, "must be true or false")
        if self.cross_hidden and not self.cross_tokens:
            self._fail("cross_hidden", "hides the cross tokens: it needs cross_tokens=True")
        w = self.cross_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w < 1:
            self._fail("cross_weight", "must be a weight in [0, 1): the loss is (1 - w) * task + w * cross")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.01 <= t < float("inf"):
            # The contrastive loss caps 1/temperature at 100: a lower start would silently train at 0.01.
            self._fail("temperature", "must be a number >= 0.01 (e.g. 0.07; the loss caps 1/temperature at 100)")
        if self.num_answers:
            self._fail("num_answers", "a CLIP dual encoder has no question-answering head; keep it 0")


@register_model(ClipConfig, presets={
    "clip_tiny": dict(dim=64, heads=4, depth=4, text_depth=4, patch_size=8, tubelet=1),
    # 4x4 patches: 256 tokens per 64x64 frame, where merging tokens pays.
    "clip_small": dict(dim=128, heads=4, depth=6, text_depth=4, patch_size=4, tubelet=1),
    "clip_base": dict(image_size=224, patch_size=16, tubelet=1, max_frames=8, vocab_size=30522, max_text_len=40,
                      dim=768, heads=12, depth=12, text_depth=12, embed_dim=512),
})
class ClipModel(DualEncoding, VLModel):
    """Vision and text towers and their projections.

    ``encode_video(video [B, T, 3, H, W])`` and ``encode_text(ids, mask
    [B, L])`` give unit-norm float32 embeddings ``[B, embed_dim]``; a pair's
    score is their dot product, however it is asked for (``forward``,
    ``score_cached``, an index search). Captions must hold their real
    tokens first (the mask a prefix of True), at least one per caption.
    """

    config: ClipConfig

    def __init__(self, config: ClipConfig):
        super().__init__(config)  # patch_embed, text_embed (VLModel.modality stays unused: one modality a tower)
        c = config
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / c.temperature)))
        self.cls = nn.Parameter(torch.randn(1, c.dim) * 0.02)
        self.vision_blocks = nn.ModuleList(Block(c.dim, c.heads, c.mlp_ratio, c.dropout) for _ in range(c.depth))
        self.vision_norm = nn.LayerNorm(c.dim)
        self.proj = nn.Linear(c.dim, c.embed_dim, bias=False)
        self.text_blocks = nn.ModuleList(Block(c.dim, c.heads, c.mlp_ratio, c.dropout) for _ in range(c.text_depth))
        self.text_norm = nn.LayerNorm(c.dim)
        self.text_proj = nn.Linear(c.dim, c.embed_dim, bias=False)
        if c.cross_tokens:
            # Zero: before training, each layer's cross token is just the previous layer's output.
            self.vision_cross = nn.Parameter(torch.zeros(c.depth, c.dim))
            self.text_cross = nn.Parameter(torch.zeros(c.text_depth, c.dim))
        else:
            self.register_parameter("vision_cross", None)
            self.register_parameter("text_cross", None)
        # Set to a dict by CrossConsistencyObjective while it runs a step: run_tower records there.
        self.cross_record: dict[str, Tensor] | None = None

    # -- the tower loop -------------------------------------------------------
    def tower_input(self, tower: str, video: Tensor | None = None, text_ids: Tensor | None = None,
                    text_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Embedded tokens ``[B, N, D]`` and key-padding mask ``[B, N]`` (True =
        real) of one tower: ``"video"`` is ``[CLS; patches]`` of ``video [B,
        T, 3, H, W]``, ``"text"`` the tokens of ``text_ids``/``text_mask [B,
        L]``; with cross tokens, one more token, last and real."""
        if tower == "video":
            x = self.patch_embed(video)
            x = torch.cat([self.cls.to(x.dtype).expand(x.shape[0], 1, -1), x], 1)
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
            pooled = x[:, 0]
        elif tower == "text":
            x, mask = self.text_embed(text_ids), text_mask
            pooled = x[torch.arange(x.shape[0], device=x.device), mask.sum(1) - 1]
        else:
            raise ValueError(f"tower={tower!r}: expected one of {list(TOWERS)}")
        if self.config.cross_tokens:
            x = torch.cat([x, pooled[:, None]], 1)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
        return x, mask

    def tower_layers(self, tower: str) -> tuple[nn.ModuleList, nn.Parameter | None]:
        """The tower's blocks and its cross-token offsets ``[layers, D]`` (None when off)."""
        if tower == "video":
            return self.vision_blocks, self.vision_cross
        if tower == "text":
            return self.text_blocks, self.text_cross
        raise ValueError(f"tower={tower!r}: expected one of {list(TOWERS)}")

    @staticmethod
    def causal_mask(n: int, device: torch.device | str | None = None) -> Tensor:
        """Bool ``[n, n]``, True where query ``i`` may read key ``j <= i`` (``nn.masks.causal_mask``)."""
        return causal_mask(n, device)

    def cross_value(self, x: Tensor, offset_i: Tensor, source: Tensor | None = None) -> Tensor:
        """The cross token ``[B, D]`` entering a layer: the value of token
        ``source [B]`` of ``x [B, N, D]`` (None: the cross token itself, the
        last) with the gradient stopped, plus ``offset_i [D]``."""
        seed = x[:, -1] if source is None else x[torch.arange(x.shape[0], device=x.device), source]
        return seed.detach() + offset_i.to(x.dtype)

    def cross_step(self, x: Tensor, offset_i: Tensor, source: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``x`` with its last token replaced by ``cross_value``, and that
        token ``[B, D]``. Built by concatenation: the tokens before may be
        needed by autograd. The token is returned apart for the consistency
        loss: read back out of the new ``x``, its gradient would reach every
        earlier layer (as zeros) through the concatenation."""
        token = self.cross_value(x, offset_i, source)
        return torch.cat([x[:, :-1], token[:, None]], 1), token

    def key_mask(self, tower: str, mask: Tensor) -> Tensor | None:
        """The key-padding mask ``[B, N]`` of a tower's attention (True = a
        key to read): the text's padding; None for video (no padding: SDPA's
        fused kernels), or, with ``cross_hidden``, every key but the last
        (the cross token)."""
        if tower == "text":
            return mask
        if not self.config.cross_hidden:
            return None
        keys = torch.ones_like(mask)
        keys[:, -1] = False
        return keys

    def cross_source(self, tower: str, mask: Tensor) -> Tensor | None:
        """Which token seeds a tower's cross token before each layer: the
        cross token itself for video (None), the EOT for text (``[B]``: the
        last real token before the cross token; real tokens are a prefix)."""
        return None if tower == "video" else mask.sum(1) - 2

    def run_tower(self, tower: str, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Run the tower's blocks over ``x [B, N, D]`` (``tower_input``): the
        final, un-normalised tokens ``[B, N, D]`` and their mask ``[B, N]``.

        The text tower is causal. Video rows have no padding, so the video
        tower passes no key-padding mask to attention (without one SDPA may
        pick its fused kernels). While ``cross_record`` is a dict, the cross
        token *entering* every block (``cross_step``'s token, a stopped
        value plus the layer's offset) is kept there as ``[B, layers, D]``
        under the tower's name, the first encoding of a step only: as in
        CrossGET's code, the consistency term then trains the offsets alone,
        and the towers' layers learn from the task loss only.
        """
        blocks, offsets = self.tower_layers(tower)
        causal = self.causal_mask(x.shape[1], x.device) if tower == "text" else None
        padding = self.key_mask(tower, mask)
        record = [] if offsets is not None and self.cross_record is not None else None
        source = self.cross_source(tower, mask) if offsets is not None else None
        for i, block in enumerate(blocks):
            if offsets is not None:
                x, token = self.cross_step(x, offsets[i], source)
                if record is not None:
                    record.append(token)  # a stopped value plus the offset: no path back into the layers
            x = block(x, key_padding_mask=padding, mask=causal)
        if record is not None:
            self.cross_record.setdefault(tower, torch.stack(record, 1))
        return x, mask

    def pool_tower(self, tower: str, x: Tensor, mask: Tensor) -> Tensor:
        """Projected (not normalised) float32 embeddings ``[B, embed_dim]`` of
        ``run_tower``'s output: the [CLS] (index 0) for video, the EOT (the
        last real token before the cross token) for text. Holds as long as
        the real tokens are a prefix and the cross token is last."""
        if tower == "video":
            return score_in_fp32(self.proj, score_in_fp32(self.vision_norm, x[:, 0]))
        if tower == "text":
            eot = mask.sum(1) - 1 - int(self.config.cross_tokens)
            h = x[torch.arange(x.shape[0], device=x.device), eot]
            # fp32 heads: embeddings rounded to bf16 would make near scores tie (score_in_fp32).
            return score_in_fp32(self.text_proj, score_in_fp32(self.text_norm, h))
        raise ValueError(f"tower={tower!r}: expected one of {list(TOWERS)}")

    # -- the protocol ---------------------------------------------------------
    def check_text(self, text_ids: Tensor, text_mask: Tensor) -> None:
        """VLModel's checks, and: every caption's real tokens come first
        (the EOT is found from the count of real tokens), at least one."""
        super().check_text(text_ids, text_mask)
        if not self.checks_values(text_mask):
            return
        lengths = text_mask.sum(1, keepdim=True)
        prefix = torch.arange(text_mask.shape[1], device=text_mask.device) < lengths
        if bool(((text_mask != prefix).any(1) | (lengths[:, 0] == 0)).any()):  # one device sync
            raise ValueError("text_mask: expected each row to be True for its real tokens, first, then False for "
                             f"padding, with at least one real token; got {text_mask.int().tolist()[:4]}...")

    def embed_video(self, video: Tensor) -> Tensor:
        """Projected embeddings ``[B, embed_dim]`` (float32, not normalised) of ``video [B, T, 3, H, W]``."""
        (video,) = self.to_device(video)
        self.check_video(video)
        return self.pool_tower("video", *self.run_tower("video", *self.tower_input("video", video=video)))

    def embed_text(self, text_ids: Tensor, text_mask: Tensor) -> Tensor:
        """Projected embeddings ``[B, embed_dim]`` (float32, not normalised) of captions ``[B, L]``."""
        text_ids, text_mask = self.to_device(text_ids, text_mask)
        self.check_text(text_ids, text_mask)
        x, mask = self.tower_input("text", text_ids=text_ids, text_mask=text_mask)
        return self.pool_tower("text", *self.run_tower("text", x, mask))

    # -- cost -----------------------------------------------------------------
    def tower_flops(self, tower: str, tokens: int) -> int:
        """FLOPs of one tower over ``tokens`` input tokens (patches, or
        caption tokens) and its projection; [CLS] and cross token included."""
        c, extra = self.config, int(self.config.cross_tokens)
        n, depth = (tokens + 1 + extra, c.depth) if tower == "video" else (tokens + extra, c.text_depth)
        # The causal mask saves nothing: SDPA computes every score and masks it.
        return depth * block_flops(n, n, c.dim, c.mlp_ratio, cross=False) + linear_flops(1, c.dim, c.embed_dim)

    def retrieval_flops(self, frames: int, text_len: int) -> dict[str, int]:
        """Per video: patches and the vision tower; per caption: the text
        tower; per pair: one dot product."""
        video = self.embed_flops(frames) + self.tower_flops("video", self.patch_embed.num_tokens(frames))
        return {"video": video, "text": self.tower_flops("text", text_len), "pair": 2 * self.config.embed_dim}

    # -- training -------------------------------------------------------------
    def training_objective(self, objective: nn.Module) -> nn.Module:
        """With cross tokens and ``cross_weight > 0``, the task's objective
        plus the cross-token consistency term (``CrossConsistencyObjective``)."""
        c = self.config
        return CrossConsistencyObjective(objective, self) if c.cross_tokens and c.cross_weight > 0 else objective


def _frozen_head(x: Tensor, norm: nn.LayerNorm, proj: nn.Linear) -> Tensor:
    """``proj(norm(x))`` in float32 with the parameters' gradient stopped: the
    consistency term trains the cross tokens, not the towers' output heads."""
    def frozen(p: Tensor | None) -> Tensor | None:
        return None if p is None else p.detach().float()

    x = F.layer_norm(x.float(), norm.normalized_shape, frozen(norm.weight), frozen(norm.bias), norm.eps)
    return F.linear(x, frozen(proj.weight), frozen(proj.bias))


def cross_consistency_loss(video_cross: Tensor, text_cross: Tensor, model: ClipModel) -> Tensor:
    """CrossGET's consistency term between matched pairs' cross tokens.

    Args:
        video_cross: ``[B, Lv, D]`` the vision cross token after each layer.
        text_cross: ``[B, Lt, D]`` the text cross token after each layer;
            row ``i`` is the caption of row ``i``'s video.
        model: whose heads map them to the embedding space (``vision_norm``
            + ``proj``, ``text_norm`` + ``text_proj``), gradient stopped.

    Each layer's tokens become distributions over the embedding dimensions
    (softmax of the projection): ``P`` (video), ``Q`` (text), ``M = (P +
    Q) / 2``; the term is ``(KL(M || P) + KL(M || Q)) / 2``, averaged over
    pairs and layers. When the depths differ the layers are paired from the
    last backwards (the last ``min(Lv, Lt)`` of each). A float32 scalar.
    """
    if video_cross.dim() != 3 or text_cross.dim() != 3 or video_cross.shape[0] != text_cross.shape[0] \
            or video_cross.shape[2] != text_cross.shape[2]:
        raise ValueError(f"cross_consistency_loss: expected video_cross [B, Lv, D] and text_cross [B, Lt, D] with "
                         f"matched rows, got {tuple(video_cross.shape)} and {tuple(text_cross.shape)}")
    n = min(video_cross.shape[1], text_cross.shape[1])
    with without_autocast(video_cross.device):
        log_p = _frozen_head(video_cross[:, -n:], model.vision_norm, model.proj).log_softmax(-1)
        log_q = _frozen_head(text_cross[:, -n:], model.text_norm, model.text_proj).log_softmax(-1)
        # log M from the logs: finite even where P and Q underflow to 0.
        log_m = torch.logaddexp(log_p, log_q) - math.log(2)
        m = log_m.exp()
        kl_p = (m * (log_m - log_p)).sum(-1)  # [B, n]
        kl_q = (m * (log_m - log_q)).sum(-1)
        return 0.5 * (kl_p + kl_q).mean()


class CrossConsistencyObjective(nn.Module):
    """A task objective plus the cross-token consistency term:
    ``(1 - w) * loss + w * cross_consistency_loss`` (``w = cross_weight``).

    While the objective runs, the model records its cross tokens; the first
    video and text encodings of the step (the objective's matched pairs,
    row ``i`` with row ``i``, as ``encode_unimodal`` gives them) are the
    ones compared. The step's parts gain ``cross``.
    """

    def __init__(self, objective: nn.Module, model: ClipModel):
        super().__init__()
        self.objective, self.model = objective, model

    def forward(self, batch: Any) -> tuple[Tensor, dict[str, Tensor | float]]:
        model, w = self.model, self.model.config.cross_weight
        model.cross_record = {}
        try:
            loss, parts = self.objective(batch)
            record = model.cross_record
            missing = [t for t in TOWERS if t not in record]
            if missing:
                raise RuntimeError(f"cross tokens: the objective encoded no {' and no '.join(missing)} alone, so "
                                   "there is nothing to compare; set cross_weight=0 for this objective")
            cross = cross_consistency_loss(record["video"], record["text"], model)
        finally:
            model.cross_record = None
        return (1 - w) * loss + w * cross, {**parts, "cross": cross.detach()}


__all__ = ["ClipConfig", "ClipModel", "CrossConsistencyObjective", "cross_consistency_loss"]
