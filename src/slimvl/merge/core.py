"""Token merging as pure functions: who merges into whom, and the merge.

Two matchings, each returning a ``Merge`` (or None when nothing merges):

- ``bipartite_soft_matching`` (ToMe, Bolya et al. 2023): tokens at even
  positions may merge into tokens at odd positions; the ``r`` even tokens
  with the most similar odd partner do.
- ``complete_graph_matching`` (CrossGET, Shi et al. 2024): every pair of
  tokens is a candidate. Tokens are ranked by their best similarity and a
  token may only point to a lower-ranked one (so no cycles and no chains);
  a token's score is its importance minus its best allowed similarity, the
  ``r`` lowest scores become sources, and each source joins its most
  similar allowed destination.

A ``Merge`` is two index tensors, so applying it is a scatter and a gather,
with no loop over tokens. Unlike ToMe's reference code, the output keeps
the tokens' order (a destination stays where it was; a source disappears),
so position-dependent code downstream (a causal text mask, "the first
token is [CLS]") keeps working. Protected tokens (CLS, cross tokens, EOT)
and padding are never sources nor destinations, so they survive unchanged.

Shapes: ``B`` batch, ``N`` tokens, ``C`` metric width, ``r`` merges.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class Merge:
    """One layer's merge of ``r`` tokens into others.

    Attributes:
        slot: ``[B, N]`` the output position of every input token; a
            source shares its destination's slot.
        keep: ``[B, N - r]`` the input position of each output slot's
            destination, ascending (the order is kept).
        r: the number of sources (tokens that disappear).
    """

    slot: Tensor
    keep: Tensor
    r: int

    def tokens(self, x: Tensor, size: Tensor | None = None, importance: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Merge ``x [B, N, D]``: each output token is the weighted mean of
        the tokens in its slot, weights ``size * exp(importance)`` (CrossGET's
        ensemble, a softmax over the group's importances; without
        importance, ToMe's size-weighted mean). Returns the merged tokens
        ``[B, N - r, D]`` and their sizes ``[B, N - r]`` (sizes add up).

        The mean is exact when several sources share a destination (the
        CrossGET reference counts the destination once per source)."""
        b, n, d = x.shape
        size = x.new_ones(b, n, dtype=torch.float32) if size is None else size.float()
        w = size if importance is None else size * importance.float().exp()
        m = n - self.r
        total = w.new_zeros(b, m).scatter_add_(1, self.slot, w)
        share = w / total.gather(1, self.slot)  # exactly 1 for a token alone in its slot: it passes unchanged
        # float32 sums: a slot of many bf16 tokens would otherwise round away the small ones.
        out = x.new_zeros(b, m, d, dtype=torch.float32).scatter_add_(
            1, self.slot[..., None].expand(b, n, d), x.float() * share[..., None])
        return out.to(x.dtype), size.new_zeros(b, m).scatter_add_(1, self.slot, size)

    def gather(self, t: Tensor) -> Tensor:
        """What each output token keeps of its destination: ``t [B, N, ...]``
        (a padding mask, protected flags, token ids) -> ``[B, N - r, ...]``."""
        idx = self.keep.view(*self.keep.shape, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:])
        return t.gather(1, idx)


def blocked_tokens(n: int, protected: Tensor | None, valid: Tensor | None, batch: int, device) -> Tensor:
    """``[B, N]`` True for tokens that may not merge: ``protected`` (``[N]``
    or ``[B, N]`` bool) or padding (``valid [B, N]`` False)."""
    out = torch.zeros(batch, n, dtype=torch.bool, device=device)
    if protected is not None:
        out = out | protected.to(device).expand(batch, n)
    if valid is not None:
        out = out | ~valid
    return out


def effective_r(r: int, free: int) -> int:
    """The merges a layer can do: ``r`` clamped to half its ``free``
    (mergeable) tokens, as both references clamp, and never below 0."""
    return max(0, min(int(r), free // 2))


def _from_destinations(dest: Tensor, is_source: Tensor, r: int) -> Merge:
    """A ``Merge`` from each token's destination (itself when kept)."""
    kept = ~is_source
    position = kept.long().cumsum(1) - 1  # output slot of every kept token, in order
    slot = position.gather(1, dest)
    keep = torch.sort(is_source.to(torch.uint8), dim=1, stable=True).indices[:, : dest.shape[1] - r]
    return Merge(slot=slot, keep=keep, r=r)


def _sources_to(dest_of_sources: Tensor, sources: Tensor, n: int) -> tuple[Tensor, Tensor]:
    b = sources.shape[0]
    dest = torch.arange(n, device=sources.device).expand(b, n).scatter(1, sources, dest_of_sources)
    is_source = torch.zeros(b, n, dtype=torch.bool, device=sources.device).scatter(1, sources, True)
    return dest, is_source


@torch.no_grad()
def bipartite_soft_matching(metric: Tensor, r: int, protected: Tensor | None = None,
                            valid: Tensor | None = None) -> Merge | None:
    """ToMe's matching: even-position tokens (set A) each find their most
    similar odd-position token (set B) by cosine of ``metric [B, N, C]``
    (the keys averaged over heads); the ``r`` best-matched A tokens merge
    into their partners. ``protected`` (``[N]`` or ``[B, N]`` bool) and
    padding (``valid [B, N]`` False) never merge. ``r`` is clamped to what
    the layer allows (``effective_r``, and at most the free A tokens);
    returns None when nothing merges."""
    b, n, _ = metric.shape
    blocked = blocked_tokens(n, protected, valid, b, metric.device)
    free_a, free_b = (~blocked[:, ::2]).sum(1), (~blocked[:, 1::2]).sum(1)
    if int(free_b.min()) == 0:
        return None
    r = min(effective_r(r, int((~blocked).sum(1).min())), int(free_a.min()))
    if r == 0:
        return None
    k = F.normalize(metric.float(), dim=-1)
    scores = k[:, ::2] @ k[:, 1::2].transpose(1, 2)
    scores = scores.masked_fill(blocked[:, ::2, None] | blocked[:, None, 1::2], float("-inf"))
    best, partner = scores.max(-1)
    chosen = best.argsort(-1, descending=True)[:, :r]  # indices into A
    dest, is_source = _sources_to(2 * partner.gather(1, chosen) + 1, 2 * chosen, n)
    return _from_destinations(dest, is_source, r)


def guided_importance(metric: Tensor, query: Tensor) -> Tensor:
    """CrossGET's importance of each token: the cosine of its key
    (``metric [B, N, C]``) with the guiding query ``[B, C]`` (a cross
    token's, or the EOT's): ``[B, N]``."""
    return (F.normalize(metric.float(), dim=-1) @ F.normalize(query.float(), dim=-1).unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def complete_graph_matching(metric: Tensor, r: int, importance: Tensor, protected: Tensor | None = None,
                            valid: Tensor | None = None) -> Merge | None:
    """CrossGET's matching over all token pairs.

    Args:
        metric: ``[B, N, C]`` keys averaged over heads (cosine similarity).
        r: merges wanted (clamped by ``effective_r``).
        importance: ``[B, N]`` (``guided_importance``): important tokens
            are kept as destinations rather than merged away.
        protected, valid: as ``bipartite_soft_matching``.

    Every token is ranked by its best similarity to any other, highest
    first, and may point only to tokens ranked after it. Its score is
    ``importance - best allowed similarity``; the ``r`` lowest scores are
    sources, each merged into its most similar allowed non-source (the
    lowest-ranked free token is never a source, so one always exists).
    Sources therefore never chain, and no token points to a higher-ranked
    one. Returns None when nothing merges.
    """
    b, n, _ = metric.shape
    if importance.shape != (b, n):
        raise ValueError(f"importance: expected [B, N] = {[b, n]}, got {tuple(importance.shape)}")
    blocked = blocked_tokens(n, protected, valid, b, metric.device)
    r = effective_r(r, int((~blocked).sum(1).min()))
    if r == 0:
        return None
    k = F.normalize(metric.float(), dim=-1)
    sim = k @ k.transpose(1, 2)
    eye = torch.eye(n, dtype=torch.bool, device=sim.device)
    sim = sim.masked_fill(eye | blocked[:, :, None] | blocked[:, None, :], float("-inf"))
    order = sim.max(-1).values.argsort(-1, descending=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=sim.device).expand(b, n))
    allowed = sim.masked_fill(rank[:, None, :] <= rank[:, :, None], float("-inf"))  # only lower-ranked targets
    score = importance.float() - allowed.max(-1).values  # +inf for blocked and the lowest-ranked: never sources
    sources = score.argsort(-1)[:, :r]
    is_source = torch.zeros(b, n, dtype=torch.bool, device=sim.device).scatter(1, sources, True)
    to = allowed.gather(1, sources[..., None].expand(b, r, n)).masked_fill(is_source[:, None, :], float("-inf"))
    dest, is_source = _sources_to(to.argmax(-1), sources, n)
    return _from_destinations(dest, is_source, r)


__all__ = ["Merge", "bipartite_soft_matching", "complete_graph_matching", "guided_importance", "effective_r",
           "blocked_tokens"]
