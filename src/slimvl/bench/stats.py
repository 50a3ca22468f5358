"""Uncertainty of accuracy differences measured on the same queries.

Two variants of a model (e.g. all cross-attentions vs one) evaluated on the
same captions give paired outcomes; the standard error of their difference
comes from the per-query differences, which is far tighter than treating
the two recalls as independent when the variants mostly agree.
"""
from __future__ import annotations

import math

from torch import Tensor

from ..tasks.retrieval.metrics import t2v_ranks


def t2v_hits(scores: Tensor, caption_item: Tensor, k: int = 1) -> Tensor:
    """Per caption, whether its item ranks in the top ``k`` (ties count
    against it, as in ``recall_metrics``): bool ``[n_captions]``."""
    return t2v_ranks(scores, caption_item) <= k


def paired_difference(a: Tensor, b: Tensor, z: float = 1.96) -> tuple[float, float]:
    """Mean of ``b - a`` over paired per-query outcomes and the half-width of
    its normal-approximation confidence interval (``z`` = 1.96: 95%)."""
    if a.shape != b.shape or a.dim() != 1 or a.numel() < 2:
        raise ValueError(f"expected two paired 1-D outcome vectors of the same length >= 2, "
                         f"got {tuple(a.shape)} and {tuple(b.shape)}")
    d = b.double() - a.double()
    return float(d.mean()), z * float(d.std(unbiased=True)) / math.sqrt(d.numel())
