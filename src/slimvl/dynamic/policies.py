"""Per-input policies: which latent count (level) each input stops at."""
from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Union

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


Level = Union[int, tuple[int, int]]  # Q latents, or (Q, the first k cross-attentions kept)


def level_q(level: Level) -> int:
    """The latent count of a level."""
    return level if isinstance(level, int) else level[0]


def level_keep(level: Level) -> int | None:
    """The cross-attentions a level keeps (the first k; None: as the model is set)."""
    return None if isinstance(level, int) else level[1]


def parse_level(text: str) -> Level:
    """``"8"`` -> 8 latents; ``"8/1"`` -> (8, 1): 8 latents and the first cross-attention only."""
    q, slash, k = text.partition("/")
    try:
        return (int(q), int(k)) if slash else int(q)
    except ValueError:
        raise ValueError(f"level {text!r}: expected a latent count Q or Q/K (K: cross-attentions kept)") from None


@contextmanager
def using_level(model, level: Level) -> Iterator[None]:
    """Run ``model`` at ``level`` (its latent count and, for a pair, its
    cross-attentions kept) inside the block, then restore both."""
    keep, before = level_keep(level), model.cross_attn_keep
    with model.using_latents(level_q(level)):
        if keep is not None:
            model.cross_attn_keep = keep
        try:
            yield
        finally:
            if keep is not None:
                model.cross_attn_keep = before


def check_levels(levels: list, num_latents: int | None = None, num_cross: int | None = None) -> list[Level]:
    """``levels`` as a list of ``Level`` if valid, else a ``ValueError`` naming them.

    Latent counts alone must be ascending without duplicates, in
    1..num_latents. Levels that also choose the cross-attentions kept,
    ``(Q, K)`` with K in 1..num_cross, are a joint choice with no natural
    order: they must be distinct, tried in the order given (cheapest first
    is what a cascade wants).
    """
    out: list[Level] = []
    for level in levels or []:
        if isinstance(level, (list, tuple)) and len(level) == 2:
            level = tuple(level)
        parts = level if isinstance(level, tuple) else (level,)
        if any(isinstance(x, bool) or not isinstance(x, int) for x in parts):
            raise ValueError(f"levels={levels!r}: expected latent counts Q or pairs (Q, cross-attentions kept)")
        out.append(level)
    if not out:
        raise ValueError(f"levels={levels!r}: expected a non-empty list of latent counts")
    if len(set(out)) != len(out) or (all(isinstance(x, int) for x in out) and out != sorted(out)):
        raise ValueError(f"levels={list(levels)}: must be ascending without duplicates")
    top = num_latents if num_latents is not None else max(map(level_q, out))
    if any(not 1 <= level_q(x) <= top for x in out):
        raise ValueError(f"levels={list(levels)}: every count must be in 1..num_latents={num_latents}")
    top = num_cross if num_cross is not None else max(level_keep(x) or 1 for x in out)
    if any(level_keep(x) is not None and not 1 <= level_keep(x) <= top for x in out):
        raise ValueError(f"levels={list(levels)}: cross-attentions kept must be in 1..{num_cross}")
    return out


def model_levels(levels: list, model) -> list[Level]:
    """``check_levels`` against ``model``'s latent and cross-attention counts."""
    c = model.config
    return check_levels(levels, c.num_latents, c.num_cross_layers)


def is_full(level: Level, model) -> bool:
    """Whether ``level`` runs every latent (and every cross-attention, when it chooses them)."""
    keep = level_keep(level)
    return level_q(level) == model.config.num_latents and keep in (None, model.config.num_cross_layers)


def pareto_levels(levels: list[Level], accuracy: list[float], cost: list[float]) -> list[Level]:
    """The levels worth trying in a cascade, cheapest first: those that no
    cheaper level matches in accuracy (measured on a held-out split), then
    the last of ``levels`` (the whole model: what a tolerance is against),
    whatever its accuracy. For joint (Q, K) levels, which have no order of
    their own."""
    if not len(levels) == len(accuracy) == len(cost) or not levels:
        raise ValueError(f"{len(levels)} levels, {len(accuracy)} accuracies and {len(cost)} costs: expected as "
                         "many of each, at least one")
    out, best = [], float("-inf")
    for i in sorted(range(len(levels) - 1), key=lambda i: (cost[i], -accuracy[i])):
        if accuracy[i] > best and cost[i] < cost[-1]:
            out.append(levels[i])
            best = accuracy[i]
    return out + [levels[-1]]


@dataclass
class Fixed:
    """Every input runs the first ``q`` latents (and the first ``keep``
    cross-attentions, when given)."""

    q: int
    keep: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.q, bool) or not isinstance(self.q, int) or self.q < 1:
            raise ValueError(f"Fixed(q={self.q!r}): q must be a positive number of latents")
        if self.keep is not None and (isinstance(self.keep, bool) or not isinstance(self.keep, int) or self.keep < 1):
            raise ValueError(f"Fixed(keep={self.keep!r}): keep must be a positive number of cross-attentions")

    @property
    def levels(self) -> list[Level]:
        return [self.q if self.keep is None else (self.q, self.keep)]


@dataclass
class Cascade:
    """Try the latent counts ``levels`` in order; an input stops at the first
    level ``k`` whose prediction's confidence is at least ``thresholds[k]``
    (one per level but the last, which answers whatever is left).

    Attributes:
        levels: ascending latent counts, or ``(Q, K)`` pairs (``check_levels``).
        thresholds: ``len(levels) - 1`` confidence levels in [0, 1]; a
            threshold above 1 sends every input on (``calibrate`` makes them).
        confidence: ``"max_softmax"`` or ``"margin"`` (``slimvl.dynamic.confidence``).
    """

    levels: list[int]
    thresholds: list[float] = field(default_factory=list)
    confidence: str = "max_softmax"

    def __post_init__(self) -> None:
        self.levels = check_levels(self.levels)
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
