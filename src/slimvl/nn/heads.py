"""Task heads shared by the models: a query decoder and an answer classifier."""
from __future__ import annotations

from torch import Tensor, nn

from .blocks import CrossBlock


class QueryDecoder(nn.Module):
    """Queries ``[B, Q, D]`` read a context ``[B, n, D]`` through ``layers``
    cross-attention layers; returns the updated queries ``[B, Q, D]``.

    Perceiver-VL's decoder: a [CLS] query for VTM and QA, one query per text
    position for masked language modelling.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, layers: int = 1, dropout: float = 0.0):
        super().__init__()
        self.blocks = nn.ModuleList(CrossBlock(dim, heads, mlp_ratio=mlp_ratio, dropout=dropout)
                                    for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, queries: Tensor, context: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        x = queries
        for block in self.blocks:
            x = block(x, context, key_padding_mask=key_padding_mask)
        return self.norm(x)


class AnswerHead(nn.Sequential):
    """Answer classifier ``[B, D] -> [B, n_answers]``: a two-layer MLP, as
    VQA heads usually are (the hidden layer is twice the width)."""

    def __init__(self, dim: int, n_answers: int):
        super().__init__(nn.Linear(dim, 2 * dim), nn.LayerNorm(2 * dim), nn.GELU(), nn.Linear(2 * dim, n_answers))
