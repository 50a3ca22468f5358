"""ViLT-style single-stream cross-encoder: full self-attention over the
concatenated video and text tokens; the accuracy baseline whose cost is
quadratic in the input length."""
from __future__ import annotations

from collections.abc import Mapping

import torch
from einops import repeat
from torch import Tensor, nn

from ..nn import AnswerHead, Block
from .base import VLModel, VLOutput, block_flops, linear_flops, score_in_fp32
from .config import SingleStreamConfig
from .registry import register_model


@register_model(SingleStreamConfig, presets={
    "single_stream_tiny": dict(dim=64, heads=4, depth=4),
    "single_stream_small": dict(dim=256, heads=4, depth=8),
    "single_stream_base": dict(image_size=224, patch_size=32, tubelet=1, max_frames=16, vocab_size=30522,
                               max_text_len=40, dim=768, heads=12, depth=12, embed_dim=256),
})
class SingleStream(VLModel):
    """``depth`` self-attention layers over ``[CLS; video; text]``; the VTM head
    and the projection read the final [CLS] token."""

    def __init__(self, config: SingleStreamConfig):
        super().__init__(config)
        c = config
        self.cls = nn.Parameter(torch.randn(1, c.dim) * 0.02)
        self.blocks = nn.ModuleList(Block(c.dim, c.heads, c.mlp_ratio, c.dropout) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.dim)
        self.vtm_head = nn.Linear(c.dim, 1)
        self.proj = nn.Linear(c.dim, c.embed_dim)
        self.qa_head = AnswerHead(c.dim, c.num_answers) if c.num_answers else None

    def run_blocks(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Full self-attention over ``[CLS; x]`` (``x [B, M, D]``, ``mask
        [B, M]``): the final, un-normalised tokens ``[B, 1 + M, D]`` and their
        mask (the [CLS] is always real)."""
        b = x.shape[0]
        x = torch.cat([repeat(self.cls, "n d -> b n d", b=b), x], 1)
        mask = torch.cat([mask.new_ones(b, 1), mask], 1)
        for blk in self.blocks:
            x = blk(x, key_padding_mask=mask)
        return x, mask

    def encode_cls(self, x: Tensor, mask: Tensor) -> Tensor:
        """Full self-attention over ``[CLS; x]``; returns the final [CLS] ``[B, D]``."""
        return self.norm(self.run_blocks(x, mask)[0][:, 0])

    def encode_tokens(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Every final token ``[B, 1 + M, D]`` (normalised, [CLS] first) and
        its mask: what a decomposed encoder pools (``slimvl.decompose``)."""
        x, mask = self.run_blocks(x, mask)
        return self.norm(x), mask

    def forward(self, video: Tensor | Mapping[str, Tensor], text_ids: Tensor | None = None,
                text_mask: Tensor | None = None) -> VLOutput:
        """Score pairs: ``video [B, T, 3, H, W]``, ``text_ids``/``text_mask [B, L]``
        (or one inputs mapping with ``video``, ``text``, ``text_mask``)."""
        video, text_ids, text_mask = self.read_inputs(video, text_ids, text_mask)
        self.check_inputs(video, text_ids, text_mask)
        cls = self.encode_cls(*self.embed_inputs(video, text_ids, text_mask))
        return VLOutput(logits=score_in_fp32(self.vtm_head, cls).squeeze(-1), pooled=self.proj(cls))

    def answer(self, video: Tensor | Mapping[str, Tensor], question_ids: Tensor | None = None,
               question_mask: Tensor | None = None) -> Tensor:
        """Answer logits ``[B, num_answers]`` from the final [CLS] (ViLT's VQA
        head); the question given positionally, or as an inputs mapping's
        ``text``/``text_mask``."""
        if self.qa_head is None:
            raise ValueError("this single_stream model has no qa_head: build it with num_answers set "
                             "(e.g. create_model(..., num_answers=N))")
        video, question_ids, question_mask = self.read_inputs(video, question_ids, question_mask)
        self.check_inputs(video, question_ids, question_mask)
        return self.qa_head(self.encode_cls(*self.embed_inputs(video, question_ids, question_mask)))

    def pool_unimodal(self, inputs: Tensor, mask: Tensor, modality: int | None = None) -> Tensor:
        return self.proj(self.encode_cls(inputs, mask))

    def encoder_flops(self, m: int) -> int:
        """FLOPs of the ``depth`` layers over ``[CLS; m input tokens]``."""
        c = self.config
        return c.depth * block_flops(m + 1, m + 1, c.dim, c.mlp_ratio, cross=False)

    def analytic_flops(self, frames: int, text_len: int) -> int:
        c = self.config
        f = self.embed_flops(frames) + self.encoder_flops(self.patch_embed.num_tokens(frames) + text_len)
        return f + linear_flops(1, c.dim, 1) + linear_flops(1, c.dim, c.embed_dim)
