"""Per-input policies: which latent count (level) each input stops at."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .confidence import CONFIDENCES


def default_levels(num_latents: int, nested: list[int] | None = None) -> list[int]:
    """The latent counts a cascade tries: those the model was trained on
    (``nested_latents``, with N added when missing), else N/8, N/4, N/2 and
    N (the distinct positive ones)."""
    if nested:
        return sorted(set(nested) | {num_latents})
    return sorted({q for q in (num_latents // 8, num_latents // 4, num_latents // 2, num_latents) if q > 0})


def check_levels(levels: list[int], num_latents: int) -> list[int]:
    """``levels`` if they are distinct ascending counts in 1..num_latents, else a ``ValueError`` naming them."""
    if not levels or any(isinstance(q, bool) or not isinstance(q, int) for q in levels):
        raise ValueError(f"levels={levels!r}: expected a non-empty list of latent counts")
    if list(levels) != sorted(set(levels)):
        raise ValueError(f"levels={list(levels)}: must be ascending without duplicates")
    if not 1 <= levels[0] <= levels[-1] <= num_latents:
        raise ValueError(f"levels={list(levels)}: every count must be in 1..num_latents={num_latents}")
    return list(levels)


@dataclass
class Fixed:
    """Every input runs the first ``q`` latents."""

    q: int

    def __post_init__(self) -> None:
        if isinstance(self.q, bool) or not isinstance(self.q, int) or self.q < 1:
            raise ValueError(f"Fixed(q={self.q!r}): q must be a positive number of latents")

    @property
    def levels(self) -> list[int]:
        return [self.q]


@dataclass
class Cascade:
    """Try the latent counts ``levels`` in order; an input stops at the first
    level ``k`` whose prediction's confidence is at least ``thresholds[k]``
    (one per level but the last, which answers whatever is left).

    Attributes:
        levels: ascending latent counts.
        thresholds: ``len(levels) - 1`` confidence levels in [0, 1]; a
            threshold above 1 sends every input on (``calibrate`` makes them).
        confidence: ``"max_softmax"`` or ``"margin"`` (``slimvl.dynamic.confidence``).
    """

    levels: list[int]
    thresholds: list[float] = field(default_factory=list)
    confidence: str = "max_softmax"

    def __post_init__(self) -> None:
        if not self.levels or list(self.levels) != sorted(set(self.levels)) or self.levels[0] < 1:
            raise ValueError(f"Cascade levels={self.levels!r}: expected ascending distinct positive latent counts")
        if len(self.thresholds) != len(self.levels) - 1:
            raise ValueError(f"Cascade thresholds={self.thresholds!r}: expected {len(self.levels) - 1} "
                             f"(one per level but the last of {self.levels})")
        if any(not isinstance(t, (int, float)) or math.isnan(t) for t in self.thresholds):
            raise ValueError(f"Cascade thresholds={self.thresholds!r}: must be numbers")
        if self.confidence not in CONFIDENCES:
            raise ValueError(f"Cascade confidence={self.confidence!r}: expected one of {list(CONFIDENCES)}")


def skipped(thresholds: list[float]) -> list[bool]:
    """Per level, whether a cascade skips it: a threshold above 1 (no
    confidence reaches it) means no input could stop there, so the level is
    not run at all. The last level is never skipped."""
    return [t > 1 for t in thresholds] + [False]


def cascade_exits(confidences: Tensor, thresholds: list[float]) -> Tensor:
    """The level each input stops at ``[n]`` (long, CPU), given every
    level's confidence ``[L, n]``: the first ``k < L-1`` with
    ``confidences[k] >= thresholds[k]``, else ``L-1``."""
    confidences = confidences.detach().cpu()
    n_levels = confidences.shape[0]
    if len(thresholds) != n_levels - 1:
        raise ValueError(f"{len(thresholds)} thresholds for {n_levels} levels: expected {n_levels - 1}")
    exits = torch.full((confidences.shape[1],), n_levels - 1, dtype=torch.long)
    open_ = torch.ones(confidences.shape[1], dtype=torch.bool)
    for k, t in enumerate(thresholds):
        stop = open_ & (confidences[k] >= t)
        exits[stop] = k
        open_ &= ~stop
    return exits


def paid_costs(costs: list[float], thresholds: list[float]) -> Tensor:
    """What an input stopping at each level has paid ``[L]`` (float64): the
    costs of every level run up to it; skipped levels (``skipped``) are
    neither run nor paid for."""
    run = torch.tensor([0.0 if skip else c for c, skip in zip(costs, skipped(thresholds))], dtype=torch.float64)
    return run.cumsum(0)
