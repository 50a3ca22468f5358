"""Pre-norm transformer blocks: self-attention ``Block`` and ``CrossBlock``."""
from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

from .attention import Attention


class MLP(nn.Sequential):
    """Two-layer GELU feed-forward network, ``dim -> ratio*dim -> dim``."""

    def __init__(self, dim: int, ratio: float = 4.0, dropout: float = 0.0):
        hidden = int(dim * ratio)
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))


class Block(nn.Module):
    """Pre-norm self-attention layer: ``x + Attn(LN(x))`` then ``x + MLP(LN(x))``.

    ``between``, when set, runs between the attention's residual and the MLP
    (where token merging acts): it receives the tokens ``[B, N, D]`` and the
    attention's keys averaged over heads ``[B, N, d]`` (the similarity
    metric), and returns the tokens the MLP sees. Unset, nothing changes.
    It sees neither the key-padding mask nor the token sizes: a hook that
    changes the number of tokens suits blocks without padding (latents);
    carrying mask and sizes through a merge belongs to the merging patches.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_ratio, dropout)
        self.between: Callable[[Tensor, Tensor], Tensor] | None = None

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None, size: Tensor | None = None,
                mask: Tensor | None = None) -> Tensor:
        if self.between is None:
            x = x + self.attn(self.norm1(x), key_padding_mask=key_padding_mask, size=size, mask=mask)
        else:
            h, metric = self.attn(self.norm1(x), key_padding_mask=key_padding_mask, size=size, mask=mask,
                                  return_metric=True)
            x = self.between(x + h, metric)
        return x + self.mlp(self.norm2(x))


class CrossBlock(nn.Module):
    """Pre-norm cross-attention layer: queries ``x`` read from ``context``.

    The context is normalised separately: in a Perceiver it is the raw input
    array, whose scale differs from the latents'.
    """

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, mlp_ratio: float = 4.0,
                 dropout: float = 0.0):
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_ctx = nn.LayerNorm(context_dim or dim)
        self.attn = Attention(dim, heads, context_dim=context_dim, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_ratio, dropout)

    def context_kv(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values ``[B, H, S, d]`` this layer reads from ``context``:
        they do not depend on the queries, so callers running the layer
        again on the same context (with other queries) can pass them back."""
        return self.attn.project_kv(self.norm_ctx(context))

    def forward(self, x: Tensor, context: Tensor | None, key_padding_mask: Tensor | None = None,
                size: Tensor | None = None, mask: Tensor | None = None,
                kv: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """``kv``: ``context_kv(context)`` computed before (``context`` is then not read)."""
        ctx = self.norm_ctx(context) if kv is None else None
        x = x + self.attn(self.norm_q(x), ctx, key_padding_mask=key_padding_mask, size=size, mask=mask, kv=kv)
        return x + self.mlp(self.norm2(x))
