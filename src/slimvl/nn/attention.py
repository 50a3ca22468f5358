"""Multi-head attention shared by every slimvl model.

One class serves self-attention (``context is None``) and cross-attention
(queries from one array, keys/values from another), so that FLOP accounting,
head-view masks and token merging hook into a single place. SDPA is the
kernel; masks are built in ``slimvl.nn.masks``.
"""
from __future__ import annotations

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .masks import attention_mask, check_mask


def attention_bias(key_padding_mask: Tensor | None, size: Tensor | None = None, dtype=None) -> Tensor | None:
    """The SDPA mask of a key-padding mask and token sizes (``masks.attention_mask``)."""
    kwargs = {} if dtype is None else {"dtype": dtype}
    return attention_mask(key_padding_mask, size=size, **kwargs)


def combine_heads(t: Tensor, metric: str = "mean") -> Tensor:
    """Per-head keys or queries ``[B, H, N, d]`` as one metric per token:
    ``"mean"`` over heads ``[B, N, d]`` or ``"concat"``, heads side by side
    ``[B, N, H * d]``."""
    if metric == "mean":
        return t.mean(1)
    if metric == "concat":
        return rearrange(t, "b h n d -> b n (h d)")
    raise ValueError(f"metric={metric!r}: expected 'mean' or 'concat'")


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

    def project_q(self, x: Tensor) -> Tensor:
        """Queries ``[B, H, N, d]`` of ``x [B, N, D]``."""
        return rearrange(self.to_q(x), "b n (h d) -> b h n d", h=self.heads)

    def project_kv(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values ``[B, H, S, d]`` of ``context [B, S, Dc]``: what a
        cache of an encoded item keeps, and what a pretrained key map fills."""
        k, v = rearrange(self.to_kv(context), "b s (two h d) -> two b h s d", two=2, h=self.heads)
        return k, v

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        size: Tensor | None = None,
        mask: Tensor | None = None,
        return_metric: bool = False,
        kv: tuple[Tensor, Tensor] | None = None,
        return_query: bool = False,
        metric: str = "mean",
    ) -> Tensor | tuple[Tensor, ...]:
        """Attend from ``x`` to ``context`` (``x`` itself when None), or to
        keys and values projected before (``kv``, from ``project_kv``).

        Args:
            x: queries ``[B, N, D]``; context: keys/values ``[B, S, Dc]``.
            key_padding_mask: bool ``[B, S]``, True for real keys.
            size: ``[B, S]`` tokens each key stands for (proportional
                attention: ``log(size)`` is added to its logits).
            mask: bool (True = may attend) or additive, broadcastable to
                ``[B, H, N, S]`` (e.g. per-head views).
            return_metric: also return the keys averaged over heads
                ``[B, S, d]``, the similarity metric of token merging.
            kv: keys and values ``[B, H, S, d]`` already projected (the
                context is then not read): what does not change between two
                calls with the same context is not computed twice.
            return_query: with ``return_metric``, also return the queries
                averaged over heads ``[B, N, d]`` (CrossGET's importance is
                a key's cosine with a guiding token's query).
            metric: how the returned keys (and queries) combine the heads:
                ``"mean"`` (ToMe's metric, ``[B, S, d]``) or ``"concat"``
                (``[B, S, H * d]``, CrossGET's: its cosines are the
                attention logits summed over heads, which averaging the
                vectors first would mix across heads).

        Returns ``[B, N, D]`` (and the metric, and the queries).
        """
        q = self.project_q(x)
        k, v = self.project_kv(x if context is None else context) if kv is None else kv
        if mask is not None:
            check_mask(mask, q.shape[0], self.heads, q.shape[2], k.shape[2])
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attention_mask(key_padding_mask, mask, size, q.dtype),
            dropout_p=self.dropout if self.training else 0.0,
        )
        out = self.proj(rearrange(out, "b h n d -> b n (h d)"))
        if not return_metric:
            return out
        return (out, combine_heads(k, metric), combine_heads(q, metric)) if return_query else \
            (out, combine_heads(k, metric))
