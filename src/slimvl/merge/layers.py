"""One transformer layer with token merging between its attention and its
MLP, where ToMe and CrossGET both merge:

    x = x + Attn(LN(x))   (proportional: log(size) added to every logit)
    match on the attention's keys; merge x, carry mask/sizes/flags along
    x = x + MLP(LN(x))    (on fewer tokens: where the saving is)

The layer is any ``slimvl.nn.Block`` (``norm1``, ``attn``, ``norm2``,
``mlp``); the patches in ``slimvl.merge.patch`` run their models' layer
loops through ``merge_layer``.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, replace

import numpy as np

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.attention import combine_heads
from ..nn.masks import causal_mask

from .core import Merge, bipartite_soft_matching, complete_graph_matching, guided_importance

METHODS = ("tome", "crossget")
# How each method's metric combines the attention heads (``Attention``'s ``metric``): ToMe averages the keys
# over heads; CrossGET's code compares whole keys and queries, heads side by side.
METRIC = {"tome": "mean", "crossget": "concat"}


# The largest importance weight: exp(w * importance) of a cosine must stay finite in float32 (exp(88) is near
# its limit), and the merged mean's weights must not underflow.
MAX_IMPORTANCE_WEIGHT = 50.0


def check_importance_weight(value, method: str) -> float:
    """``value`` as CrossGET's importance weight (``match``), or a
    ``ValueError`` naming what is wrong: a real number in [0,
    ``MAX_IMPORTANCE_WEIGHT``], and 1 for ToMe, which weighs no importance."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
    if not ok or not 0 <= value <= MAX_IMPORTANCE_WEIGHT:  # NaN fails both comparisons
        raise ValueError(f"importance_weight={value!r}: expected a number in [0, {MAX_IMPORTANCE_WEIGHT:g}] (1: "
                         "CrossGET as published)")
    if method != "crossget" and value != 1:
        raise ValueError(f"importance_weight={value!r}: only method='crossget' weighs token importance "
                         f"(method={method!r})")
    return float(value)


@dataclass
class TokenState:
    """What travels with the tokens ``[B, N, D]`` through merging layers.

    Attributes:
        protected: ``[B, N]`` bool, tokens never merged (CLS, cross tokens,
            EOT, tokens of a modality not being merged).
        mask: ``[B, N]`` key-padding mask (True = real), or None.
        size: ``[B, N]`` how many input tokens each token stands for, or
            None (all 1: nothing merged yet).
        guide: ``[B, N]`` bool, the tokens whose mean query guides
            CrossGET's importance (a cross token, the EOT, the text), or
            None (then the first token, [CLS]).
    """

    protected: Tensor
    mask: Tensor | None = None
    size: Tensor | None = None
    guide: Tensor | None = None

    def after(self, merge: Merge, size: Tensor) -> "TokenState":
        """The state of the merged tokens (sizes from ``Merge.tokens``)."""
        keep = merge.gather
        return replace(self, protected=keep(self.protected), size=size,
                       mask=None if self.mask is None else keep(self.mask),
                       guide=None if self.guide is None else keep(self.guide))


def guide_query(queries: Tensor, guide: Tensor | None) -> Tensor:
    """The mean query ``[B, d]`` of the guiding tokens (``queries [B, N, d]``)."""
    if guide is None:
        return queries[:, 0]
    w = guide.to(queries.dtype)
    # A weighted sum as one batched product: on a CPU, multiplying [B, N, d] by a [B, N, 1] broadcast costs more.
    return torch.bmm(w.unsqueeze(1), queries).squeeze(1) / w.sum(1, keepdim=True).clamp_min(1)


def match(method: str, keys: Tensor, queries: Tensor, r: int, state: TokenState,
          importance_weight: float = 1.0) -> tuple[Merge | None, Tensor | None]:
    """The merge ``method`` picks for this layer and the importance that
    weights its ensemble (None for ToMe's plain size-weighted mean).
    ``keys``/``queries`` ``[B, N, C]``: the heads combined as ``METRIC[method]``
    says (``heads_metric``).

    ``importance_weight`` (CrossGET only) scales the importance wherever it
    acts: a token's score is ``w * importance - best similarity`` and a
    merged group's weights are ``size * exp(w * importance)``. ``w = 1`` is
    CrossGET as published; any other value is our extension, not the
    paper's (``w = 0``: its complete-graph matching on similarity alone,
    with a size-weighted mean). Where the importance varies across an image
    more than the best similarities do, ``w = 1`` merges tokens for being
    unimportant rather than for having a near-duplicate (BENCHMARKS.md,
    "Token merging")."""
    if method == "tome":
        return bipartite_soft_matching(keys, r, state.protected, state.mask), None
    if method == "crossget":
        with torch.no_grad():  # the matching and its weights are decisions, not functions to differentiate
            keys = F.normalize(keys.float(), dim=-1)  # once, for both the importance and the similarities
            importance = guided_importance(keys, guide_query(queries, state.guide), normalized=True)
            importance.mul_(importance_weight)
        return complete_graph_matching(keys, r, importance, state.protected, state.mask, normalized=True), importance
    raise ValueError(f"method={method!r}: expected one of {list(METHODS)}")


def merge_layer(block: nn.Module, x: Tensor, state: TokenState, r: int, method: str,
                causal: bool = False, importance_weight: float = 1.0) -> tuple[Tensor, TokenState, int]:
    """Run ``block`` on ``x [B, N, D]``, merging up to ``r`` tokens between
    its attention and its MLP (``importance_weight``: as ``match``).
    Returns the new tokens ``[B, N - r', D]``, their state and ``r'`` (the
    merges done: ``r`` clamped to what the layer allows). With ``r = 0``
    this is exactly ``block``'s own forward."""
    mask = causal_mask(x.shape[1], x.device) if causal else None
    h, keys, queries = block.attn(block.norm1(x), key_padding_mask=state.mask, size=state.size, mask=mask,
                                  return_metric=True, return_query=True, metric=METRIC.get(method, "mean"))
    x = x + h
    merge, importance = match(method, keys, queries, r, state, importance_weight) if r > 0 else (None, None)
    if merge is not None:
        x, size = merge.tokens(x, state.size, importance)
        state = state.after(merge, size)
    return x + block.mlp(block.norm2(x)), state, 0 if merge is None else merge.r


def heads_metric(method: str, t: Tensor) -> Tensor:
    """Per-head keys or queries ``[B, H, N, d]`` combined as ``method``'s
    matching compares them (``METRIC``): ``[B, N, d]`` or ``[B, N, H * d]``."""
    return combine_heads(t, METRIC.get(method, "mean"))


__all__ = ["TokenState", "merge_layer", "match", "check_importance_weight", "guide_query", "heads_metric", "METHODS",
           "METRIC"]
