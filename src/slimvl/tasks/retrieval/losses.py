"""Retrieval losses: the in-batch hard-negative VTM objective and the contrastive term.

A training *unit* is ``G`` near-duplicate groups of ``k`` items each, with one
caption per item: ``P = G * k`` (caption, video) positives. Items are numbered
``g * k + i``. Every caption is scored against every video of its own group
(the hard negatives: variants that differ in one attribute of one object) and
against ``E`` videos of other groups; every video likewise against ``E``
captions of other groups. The other-group negatives are drawn with
probability ``softmax(similarity)`` of the unimodal embeddings
(``mined_negatives``, as in ALBEF's hard-negative mining: the scenes the
model currently confuses), uniformly (the same with flat similarities), or
as one random pairing shared by both directions (``random_negatives``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def gumbel_noise(rng: np.random.Generator, shape: tuple[int, ...]) -> Tensor:
    """Standard Gumbel noise: ``argmax(logits + noise)`` samples ``softmax(logits)``."""
    u = rng.random(shape).clip(1e-12, 1 - 1e-12)
    return torch.from_numpy(-np.log(-np.log(u))).float()


def random_negatives(rng: np.random.Generator, units: int, groups: int, group_size: int, n_neg: int) -> Tensor:
    """Other-group videos for each caption, ``[U, P, E]``, shared by both directions.

    Negative ``e`` maps group ``order[i]`` to group ``order[i + 1 + e]`` (a
    random cyclic order of the unit's groups) and slot ``i`` to a random slot.
    Each map is a bijection, so every video is the negative of exactly ``E``
    captions: one scored pair then serves as a text->video negative *and* a
    video->text negative, which halves the pairs the cross-encoder must run.
    """
    k, p = group_size, groups * group_size
    if not 0 <= n_neg < groups:
        raise ValueError(f"n_neg={n_neg}: a unit of {groups} groups offers 0..{groups - 1} other groups")
    out = np.empty((units, p, n_neg), dtype=np.int64)
    for u in range(units):
        order = rng.permutation(groups)
        rank = np.argsort(order)  # position of each group in the cyclic order
        for e in range(n_neg):
            slots = rng.permutation(k)
            for item in range(p):
                g, i = divmod(item, k)
                out[u, item, e] = order[(rank[g] + 1 + e) % groups] * k + slots[i]
    return torch.from_numpy(out)


def mined_negatives(sim: Tensor, group_size: int, n_neg: int, noise: Tensor) -> tuple[Tensor, Tensor]:
    """Other-group negatives drawn from ``softmax(sim)`` without replacement.

    ``sim`` is ``[U, P, P]`` caption-by-video similarity logits, ``noise``
    ``[U, 2, P, P]`` Gumbel noise. Returns the videos mined for each caption
    and the captions mined for each video, each ``[U, P, E]``.
    """
    u, p, _ = sim.shape
    if p % group_size or not 0 <= n_neg <= p - group_size:
        raise ValueError(f"n_neg={n_neg} negatives asked from {p - group_size} other-group items "
                         f"(unit of {p} items, groups of {group_size})")
    group = torch.arange(p, device=sim.device) // group_size
    blocked = torch.where(group[:, None] == group[None, :], float("-inf"), 0.0)
    t2v = (sim + noise[:, 0] + blocked).topk(n_neg, dim=-1).indices
    v2t = (sim.transpose(1, 2) + noise[:, 1] + blocked).topk(n_neg, dim=-1).indices
    return t2v, v2t


@dataclass
class PairLayout:
    """Which (caption, video) pairs a step scores, and how they form softmaxes.

    ``caption``/``video``: ``[U, n_pairs]`` unit-local item indices of the
    scored pairs. ``t2v``/``v2t``: ``[U, P, k + E]`` columns of the pair list
    holding each caption's (each video's) candidates: its group's ``k`` first
    (the positive at the query's own slot), then its ``E`` negatives.
    """

    caption: Tensor
    video: Tensor
    t2v: Tensor
    v2t: Tensor
    group_size: int


def pair_layout(group_size: int, t2v_neg: Tensor, v2t_neg: Tensor | None = None) -> PairLayout:
    """Lay out one step's pairs: every caption against every video of its
    group (the near-duplicate hard negatives, ``P*k`` pairs shared by both
    directions), then the other-group negatives.

    Args:
        t2v_neg: ``[U, Q, E]`` negative video of each of the first ``Q``
            captions (the queries; whole groups). The negatives may be any
            item of the unit, so a unit can hold more items than it scores.
        v2t_neg: ``[U, Q, E]`` negative caption of each video, or None when the
            negatives are shared (``random_negatives``): a video's negatives
            are then the captions that have it as theirs.
    """
    u, p, e = t2v_neg.shape
    k = group_size
    dev = t2v_neg.device
    item = torch.arange(p, device=dev)
    slot, first = item % k, item - item % k
    # Within-group pairs in [caption, slot of video] order: pair p*k + j is (p, first(p) + j).
    cap_w = item.repeat_interleave(k)
    vid_w = (first[:, None] + torch.arange(k, device=dev)).flatten()
    t2v_w = (item * k)[:, None] + torch.arange(k, device=dev)  # [P, k]
    v2t_w = (first[:, None] + torch.arange(k, device=dev)) * k + slot[:, None]  # captions of q's group vs q
    n_w = p * k
    neg_cap = item[None, :, None].expand(u, p, e)
    caption = [cap_w.expand(u, -1), neg_cap.reshape(u, -1)]
    video = [vid_w.expand(u, -1), t2v_neg.reshape(u, -1)]
    t2v_n = n_w + (item[:, None] * e + torch.arange(e, device=dev)).expand(u, p, e)
    if v2t_neg is None:
        # Column of pair (caption c, its e-th negative) is n_w + c*e + e'; invert the map video -> captions.
        flat = t2v_neg.reshape(u, -1)
        order = flat.argsort(dim=1, stable=True)  # pairs grouped by video
        if not torch.equal(flat.gather(1, order).view(u, p, e),
                           item[None, :, None].expand(u, p, e)):
            raise ValueError("shared negatives must give every video exactly E captions")
        v2t_n = n_w + order.view(u, p, e)
    else:
        caption.append(v2t_neg.reshape(u, -1))
        video.append(item[None, :, None].expand(u, p, e).reshape(u, -1))
        v2t_n = n_w + p * e + (item[:, None] * e + torch.arange(e, device=dev)).expand(u, p, e)
    return PairLayout(torch.cat(caption, 1), torch.cat(video, 1),
                      torch.cat([t2v_w.expand(u, p, k), t2v_n], -1),
                      torch.cat([v2t_w.expand(u, p, k), v2t_n], -1), k)


def vtm_group_loss(logits: Tensor, layout: PairLayout) -> Tensor:
    """Symmetric softmax VTM loss over one step's scored pairs.

    ``logits`` is ``[U, n_pairs]`` in ``layout`` order. For text->video each
    caption's positive competes with the ``k-1`` near-duplicate videos of its
    group and its negatives from other groups; video->text is the same with
    roles swapped. Ranking by a softmax over these candidates trains exactly
    what retrieval needs: the right scene above its near-duplicates and
    above other scenes.
    """
    u, n = layout.caption.shape
    if logits.shape != (u, n):
        raise ValueError(f"logits: expected [U={u}, n_pairs={n}] in the layout's order, got {tuple(logits.shape)}")
    p = layout.t2v.shape[1]
    target = (torch.arange(p, device=logits.device) % layout.group_size).repeat(u)
    t2v = logits.gather(1, layout.t2v.reshape(u, -1)).view(u * p, -1)
    v2t = logits.gather(1, layout.v2t.reshape(u, -1)).view(u * p, -1)
    return 0.5 * (F.cross_entropy(t2v, target) + F.cross_entropy(v2t, target))


def similarity_logits(video_emb: Tensor, text_emb: Tensor, logit_scale: Tensor) -> Tensor:
    """Scaled cosine similarities ``[U, n(text), n(video)]`` of ``[U, n, E]``
    embeddings (CLIP's learnable temperature, capped at 100)."""
    v = F.normalize(video_emb, dim=-1)
    t = F.normalize(text_emb, dim=-1)
    return logit_scale.exp().clamp(max=100) * torch.einsum("une,ume->unm", t, v)


def contrastive_loss(video_emb: Tensor, text_emb: Tensor, logit_scale: Tensor, hard_video: Tensor | None = None,
                     hard_text: Tensor | None = None, hard_text_valid: Tensor | None = None) -> Tensor:
    """Symmetric InfoNCE between matched rows of ``[U, n, E]`` embeddings,
    computed within each of the ``U`` groups of ``n`` (units), so that a
    data-parallel run splits it exactly across processes.

    ``logit_scale``: the log inverse temperature, one (``[]``) or one per
    direction (``[2]``: text->video, video->text). ``hard_video`` /
    ``hard_text`` ``[U, n, E]``: row ``i``'s hard negatives
    (``hard_negatives``), each added to the denominator of row ``i``'s
    query of the other modality only (text->video, video->text). Not to the
    other rows': a unit holds near-duplicate groups, and a word swapped in a
    variant's caption may well describe this video exactly.
    ``hard_text_valid [U, n]`` leaves out captions that could not be made
    into negatives.
    """
    if logit_scale.dim() == 0 and hard_video is None and hard_text is None:
        logits = similarity_logits(video_emb, text_emb, logit_scale)
        target = torch.arange(logits.shape[-1], device=logits.device).expand(logits.shape[0], -1)
        return 0.5 * (F.cross_entropy(logits.flatten(0, 1), target.flatten())
                      + F.cross_entropy(logits.transpose(1, 2).flatten(0, 1), target.flatten()))
    scale = logit_scale.exp().clamp(max=100).expand(2)
    v, t = F.normalize(video_emb, dim=-1), F.normalize(text_emb, dim=-1)
    sim = torch.einsum("une,ume->unm", t, v)  # [U, text, video]
    t2v, v2t = scale[0] * sim, scale[1] * sim.transpose(1, 2)
    if hard_video is not None:
        t2v = torch.cat([t2v, scale[0] * (t * F.normalize(hard_video, dim=-1)).sum(-1, keepdim=True)], -1)
    if hard_text is not None:
        extra = scale[1] * (v * F.normalize(hard_text, dim=-1)).sum(-1, keepdim=True)
        if hard_text_valid is not None:
            extra = extra.masked_fill(~hard_text_valid[..., None], float("-inf"))
        v2t = torch.cat([v2t, extra], -1)
    target = torch.arange(sim.shape[-1], device=sim.device).expand(sim.shape[0], -1).flatten()
    return 0.5 * (F.cross_entropy(t2v.flatten(0, 1), target) + F.cross_entropy(v2t.flatten(0, 1), target))
