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
are never sources nor destinations, so they survive unchanged; padding
never merges with a real token. ``r`` is clamped per row (half its free
tokens): a row that cannot merge as many as the others merges padding into
padding for the difference, so one row's merges never depend on another's.

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
        # One index_add_ over the flattened batch: on a CPU it adds whole rows, where a scatter_add_ with an index
        # expanded over D goes element by element (twice as slow at CLIP's sizes). float32 sums: a slot of many
        # bf16 tokens would otherwise round away the small ones.
        rows = (self.slot + torch.arange(b, device=x.device)[:, None] * m).view(-1)
        weighted = (x.float() * share[..., None]).view(b * n, d)
        out = x.new_zeros(b * m, d, dtype=torch.float32).index_add_(0, rows, weighted).view(b, m, d)
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


def _positions(flags: Tensor, count: int, order: Tensor | None = None) -> Tensor:
    """``[B, count]`` the positions of the True entries of ``flags [B, N]``,
    ascending, for rows with exactly ``count`` of them (``order``: each
    entry's ``flags.cumsum(1) - 1``, when the caller has it already). A
    cumulative count and one scatter: no sort, which on a CPU costs more than
    the rest of a merge."""
    b, n = flags.shape
    order = flags.long().cumsum(1) - 1 if order is None else order
    slot = torch.where(flags, order, count)  # the False entries all land in a spare column
    out = torch.empty(b, count + 1, dtype=torch.long, device=flags.device)
    return out.scatter_(1, slot, torch.arange(n, device=flags.device).expand(b, n))[:, :count]


def _from_destinations(dest: Tensor, is_source: Tensor, r: int) -> Merge:
    """A ``Merge`` from each token's destination (itself when kept)."""
    kept = ~is_source
    position = kept.long().cumsum(1) - 1  # output slot of every kept token, in order
    return Merge(slot=position.gather(1, dest), keep=_positions(kept, dest.shape[1] - r, position), r=r)


def _plan(can: Tensor, valid: Tensor | None, r: int) -> tuple[Tensor, int, Tensor | None]:
    """How many merges each row makes: ``(real [B], R, padding [B, N] or None)``.

    ``real`` is each row's own clamped r: ``r``, at most what the row
    ``can`` merge (half its free tokens; for ToMe, also its free A
    tokens). The output has one length, so every row must lose ``R``
    tokens: a row with fewer real merges makes up the difference by merging
    padding into padding (masked, never read), so that a caption's merges
    never depend on the captions beside it. ``R`` is the largest count every
    row can reach that way."""
    real = can.clamp(min=0, max=r)
    if valid is None:
        return real.clamp(max=int(real.min())), int(real.min()), None
    pad = ~valid
    spare = (pad.sum(1) - 1).clamp(min=0)  # padding that can merge into the last padding token
    most = int(torch.minimum(real + spare, real.max().expand_as(real)).min())
    return real.clamp(max=most), most, pad


def _choose(priority: Tensor, real: Tensor, total: int, pad: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Sources ``[B, total]`` (ascending positions), the source flags ``[B,
    N]`` and which sources are padding fillers ``[B, total]``: per row, the
    ``real[b]`` tokens of lowest ``priority`` (+inf: never), then fillers,
    the first padding tokens (never the last, their destination)."""
    # The `total` lowest by a partial sort (topk), far cheaper than a full one on a CPU; a row takes its first
    # real[b] of them (real <= total, and every row has at least real[b] finite priorities).
    lowest = priority.topk(total, dim=1, largest=False).indices
    take = torch.arange(total, device=priority.device) < real[:, None]
    is_source = torch.zeros_like(priority, dtype=torch.bool).scatter_(1, lowest, take)
    filler = torch.zeros_like(is_source)
    if pad is not None:
        pad_rank = pad.long().cumsum(1) - 1
        filler = pad & (pad_rank < (total - real)[:, None])
        is_source = is_source | filler
    sources = _positions(is_source, total)
    return sources, is_source, filler.gather(1, sources)


def _last_padding(pad: Tensor) -> Tensor:
    """``[B]`` the position of each row's last padding token (0 if none)."""
    pos = torch.arange(1, pad.shape[1] + 1, device=pad.device)
    return (pad.long() * pos).argmax(1)


def _destinations(sources: Tensor, to: Tensor, is_filler: Tensor, pad: Tensor | None, n: int) -> Tensor:
    """Each token's destination ``[B, N]`` (itself when kept): ``to [B, R]``
    for the sources, the last padding token for the fillers."""
    if pad is not None:
        to = torch.where(is_filler, _last_padding(pad)[:, None].expand_as(to), to)
    b = sources.shape[0]
    return torch.arange(n, device=sources.device).expand(b, n).scatter(1, sources, to)


@torch.no_grad()
def bipartite_soft_matching(metric: Tensor, r: int, protected: Tensor | None = None,
                            valid: Tensor | None = None) -> Merge | None:
    """ToMe's matching: even-position tokens (set A) each find their most
    similar odd-position token (set B) by cosine of ``metric [B, N, C]``
    (the keys averaged over heads); the ``r`` best-matched A tokens merge
    into their partners. ``protected`` (``[N]`` or ``[B, N]`` bool) and
    padding (``valid [B, N]`` False) never merge with real tokens. ``r`` is
    clamped per row to half its free tokens (as both references clamp),
    at most its free A tokens; a row short of them merges padding instead, see
    ``_plan``); returns None when nothing merges."""
    b, n, _ = metric.shape
    blocked = blocked_tokens(n, protected, valid, b, metric.device)
    free_a, free_b = (~blocked[:, ::2]).sum(1), (~blocked[:, 1::2]).sum(1)
    allowed = torch.minimum((~blocked).sum(1) // 2, free_a) * (free_b > 0)
    real, total, pad = _plan(allowed, valid, r)
    if total == 0:
        return None
    k = F.normalize(metric.float(), dim=-1)
    scores = k[:, ::2] @ k[:, 1::2].transpose(1, 2)
    scores = scores.masked_fill(blocked[:, ::2, None] | blocked[:, None, 1::2], float("-inf"))
    best, partner = scores.max(-1)
    # Priority: A tokens by best match (the best first), every other token never.
    priority = torch.full((b, n), float("inf"), device=metric.device)
    priority[:, ::2] = torch.where(torch.isfinite(best), -best, float("inf"))
    sources, is_source, filler = _choose(priority, real, total, pad)
    to = (2 * partner + 1).gather(1, (sources // 2).clamp(max=partner.shape[1] - 1))
    return _from_destinations(_destinations(sources, to, filler, pad, n), is_source, total)


def guided_importance(metric: Tensor, query: Tensor, normalized: bool = False) -> Tensor:
    """CrossGET's importance of each token: the cosine of its key
    (``metric [B, N, C]``; ``normalized``: already of unit norm) with the
    guiding query ``[B, C]`` (a cross token's, or the EOT's): ``[B, N]``."""
    metric = metric.float()
    dots = (metric @ F.normalize(query.float(), dim=-1).unsqueeze(-1)).squeeze(-1)
    # Without unit keys, the dot products over each key's norm (clamped as F.normalize clamps): the same cosines
    # without writing out a normalised copy of every key.
    return dots if normalized else dots / torch.linalg.vector_norm(metric, dim=-1).clamp_min(1e-12)


# What a masked pair's similarity loses: far below any cosine, and exact to add as 0 where nothing is masked.
_FAR = 1e4


@torch.no_grad()
def complete_graph_matching(metric: Tensor, r: int, importance: Tensor, protected: Tensor | None = None,
                            valid: Tensor | None = None, normalized: bool = False) -> Merge | None:
    """CrossGET's matching over all token pairs.

    Args:
        metric: ``[B, N, C]`` keys averaged over heads (cosine similarity).
        r: merges wanted (clamped per row to half its free tokens; a row short
            of free tokens merges padding into padding instead, ``_plan``).
        importance: ``[B, N]`` (``guided_importance``): important tokens
            are kept as destinations rather than merged away.
        protected, valid: as ``bipartite_soft_matching``.
        normalized: ``metric`` already has unit rows (as ``match`` passes
            it, shared with ``guided_importance``): not normalised again.

    Every token is ranked by its best similarity to any other, highest
    first (on a tie, as for a mutually most similar pair, the earlier
    position first), and may point only to tokens ranked after it. Its score is
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
    real, total, pad = _plan((~blocked).sum(1) // 2, valid, r)
    if total == 0:
        return None
    k = metric.float() if normalized else F.normalize(metric.float(), dim=-1)
    sim = k @ k.transpose(1, 2)  # cosines, in [-1, 1]
    # Masks as additive offsets of -_FAR, in place: the matching runs in every layer, and on a CPU boolean
    # [B, N, N] masks and masked_fill cost more than the merge saves. Only the blocked *columns* are masked: a
    # blocked token's own row may rank it anywhere, which changes neither the free tokens' order nor their
    # targets, and its score is set to +inf below.
    sim.add_(blocked.float().mul_(-_FAR)[:, None, :])
    sim.diagonal(dim1=1, dim2=2).fill_(-_FAR)
    order = sim.amax(-1).sort(dim=-1, descending=True, stable=True).indices  # stable: mutual best pairs tie
    rank = torch.empty_like(order, dtype=sim.dtype).scatter_(
        1, order, torch.arange(n, device=sim.device, dtype=sim.dtype).expand(b, n))
    # Only lower-ranked targets: rank(j) - rank(i) is a whole number, >= 1 where allowed.
    sim.add_((rank[:, None, :] - rank[:, :, None]).clamp_(0, 1).sub_(1).mul_(_FAR))
    best = sim.amax(-1)
    # Never sources: the blocked, and a row whose every target is masked (the lowest-ranked free token).
    score = (importance.float() - best).masked_fill_(blocked | (best < -2), float("inf"))  # cosines are >= -1
    sources, is_source, filler = _choose(score, real, total, pad)
    to = sim.gather(1, sources[..., None].expand(b, total, n)).sub_(is_source.float().mul_(_FAR)[:, None, :])
    return _from_destinations(_destinations(sources, to.argmax(-1), filler, pad, n), is_source, total)


__all__ = ["Merge", "bipartite_soft_matching", "complete_graph_matching", "guided_importance", "blocked_tokens"]
