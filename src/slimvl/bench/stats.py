"""Uncertainty of accuracy differences measured on the same queries.

Two variants of a model (e.g. all cross-attentions vs one) evaluated on the
same captions give paired outcomes; the standard error of their difference
comes from the per-query differences, which is far tighter than treating
the two recalls as independent when the variants mostly agree.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def t2v_hits(scores: Tensor, caption_item: Tensor, k: int = 1) -> Tensor:
    """Per caption, whether its item ranks in the top ``k`` (ties count
    against it, as in ``recall_metrics``): bool ``[n_captions]``."""
    if scores.dim() != 2 or caption_item.shape != (scores.shape[0],):
        raise ValueError(f"scores: expected [n_captions, n_items] with caption_item [n_captions], "
                         f"got {tuple(scores.shape)} and {tuple(caption_item.shape)}")
    s = scores.double()
    pos = s[torch.arange(s.shape[0]), caption_item.long()]
    return (s >= pos[:, None]).sum(1) <= k


def paired_difference(a: Tensor, b: Tensor, z: float = 1.96) -> tuple[float, float]:
    """Mean of ``b - a`` over paired per-query outcomes and the half-width of
    its normal-approximation confidence interval (``z`` = 1.96: 95%)."""
    if a.shape != b.shape or a.dim() != 1 or a.numel() < 2:
        raise ValueError(f"expected two paired 1-D outcome vectors of the same length >= 2, "
                         f"got {tuple(a.shape)} and {tuple(b.shape)}")
    d = b.double() - a.double()
    return float(d.mean()), z * float(d.std(unbiased=True)) / math.sqrt(d.numel())
