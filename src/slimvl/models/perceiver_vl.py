"""Perceiver-VL (Tang et al., WACV 2023): a small latent array reads a long
video+text input array through cross-attention, then thinks in latent
self-attention; cost is linear in the input length."""
from __future__ import annotations

import torch
from einops import repeat
from torch import Tensor, nn

from ..nn import Block, CrossBlock
from .base import VLModel, VLOutput, block_flops, linear_flops
from .config import PerceiverVLConfig


class PerceiverVL(VLModel):
    """Perceiver-VL with joint (single-stream) encoding and a VTM decoder.

    Encoder: the depth pattern ``config.layers`` (``c`` = latents cross-attend
    to the input array, ``s`` = latent self-attention). Decoder: one [CLS]
    query cross-attends to the final latents and feeds the VTM head. The
    pooled latents, projected, are the contrastive embedding.
    """

    def __init__(self, config: PerceiverVLConfig):
        super().__init__(config)
        c = config
        self.latents = nn.Parameter(torch.randn(c.num_latents, c.dim) * 0.02)
        self.latent_pos = nn.Parameter(torch.randn(c.num_latents, c.dim) * 0.02)
        self.layers = nn.ModuleList(
            CrossBlock(c.dim, c.heads, mlp_ratio=c.mlp_ratio, dropout=c.dropout) if kind == "c"
            else Block(c.dim, c.heads, c.mlp_ratio, c.dropout)
            for kind in c.layers
        )
        self.norm = nn.LayerNorm(c.dim)
        self.vtm_query = nn.Parameter(torch.randn(1, c.dim) * 0.02)
        self.decoder = CrossBlock(c.dim, c.heads, mlp_ratio=c.mlp_ratio, dropout=c.dropout)
        self.vtm_head = nn.Sequential(nn.LayerNorm(c.dim), nn.Linear(c.dim, 1))
        self.proj = nn.Linear(c.dim, c.embed_dim)

    def encode(self, inputs: Tensor, mask: Tensor) -> Tensor:
        """Run the encoder: input array ``[B, M, D]`` -> latents ``[B, N, D]``."""
        lat = repeat(self.latents + self.latent_pos, "n d -> b n d", b=inputs.shape[0])
        for kind, layer in zip(self.config.layers, self.layers):
            lat = layer(lat, inputs, key_padding_mask=mask) if kind == "c" else layer(lat)
        return self.norm(lat)

    def forward(self, video: Tensor, text_ids: Tensor, text_mask: Tensor) -> VLOutput:
        """Score pairs: ``video [B, T, 3, H, W]``, ``text_ids``/``text_mask [B, L]``."""
        self.check_inputs(video, text_ids, text_mask)
        latents = self.encode(*self.embed_inputs(video, text_ids, text_mask))
        query = repeat(self.vtm_query, "q d -> b q d", b=latents.shape[0])
        cls = self.decoder(query, latents)[:, 0]
        return VLOutput(logits=self.vtm_head(cls).squeeze(-1), pooled=self.proj(latents.mean(1)))

    def pool_unimodal(self, inputs: Tensor, mask: Tensor) -> Tensor:
        return self.proj(self.encode(inputs, mask).mean(1))

    def analytic_flops(self, frames: int, text_len: int) -> int:
        c = self.config
        m = self.patch_embed.num_tokens(frames) + text_len
        n = c.num_latents
        f = self.embed_flops(frames)
        for kind in c.layers:
            f += block_flops(n, m if kind == "c" else n, c.dim, c.mlp_ratio, cross=kind == "c")
        f += block_flops(1, n, c.dim, c.mlp_ratio, cross=True)  # VTM decoder
        f += linear_flops(1, c.dim, 1) + linear_flops(1, c.dim, c.embed_dim)
        return f
