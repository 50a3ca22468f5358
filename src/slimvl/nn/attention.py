"""Multi-head attention shared by every slimvl model.

One class serves self-attention (``context is None``) and cross-attention
(queries from one array, keys/values from another), so that FLOP accounting,
head-view masks and token merging later hook into a single place.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


def attention_bias(
    key_padding_mask: Tensor | None,
    size: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor | None:
    """Build the additive mask that SDPA takes, shape ``[B, 1, 1, S]``.

    ``key_padding_mask`` is bool ``[B, S]``, True for real keys. ``size`` is an
    optional ``[B, S]`` count of how many original tokens a key stands for
    (token merging); its log is added to the logits ("proportional
    attention"), so a merged token weighs as much as the tokens it replaced.
    """
    if key_padding_mask is None and size is None:
        return None
    if size is None:
        # A bool mask lets SDPA pick its fused kernels.
        return key_padding_mask[:, None, None, :]
    bias = size.to(dtype).clamp_min(1e-6).log()[:, None, None, :]
    if key_padding_mask is not None:
        bias = bias.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    return bias


class Attention(nn.Module):
    """Multi-head scaled dot-product attention via ``F.scaled_dot_product_attention``.

    Args:
        dim: width of the queries (and of the output).
        heads: number of heads; ``dim`` must be divisible by it.
        context_dim: width of keys/values' source; defaults to ``dim``.
        dropout: attention-probability dropout during training.
    """

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by heads={heads}")
        context_dim = context_dim or dim
        self.heads = heads
        self.dropout = dropout
        self.to_q = nn.Linear(dim, dim)
        # No bias on keys/values: a key bias cancels in the softmax and a value
        # bias passes straight through to the output projection's bias, so
        # both are redundant; worse, the key bias gets a zero-in-theory
        # gradient that Adam would inflate from rounding noise.
        self.to_kv = nn.Linear(context_dim, 2 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        size: Tensor | None = None,
    ) -> Tensor:
        """``x``: queries ``[B, N, D]``; ``context``: keys/values ``[B, S, Dc]``
        (``x`` itself when None); ``key_padding_mask``: bool ``[B, S]``."""
        context = x if context is None else context
        q = rearrange(self.to_q(x), "b n (h d) -> b h n d", h=self.heads)
        k, v = rearrange(self.to_kv(context), "b s (two h d) -> two b h s d", two=2, h=self.heads)
        mask = attention_bias(key_padding_mask, size, q.dtype)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))
