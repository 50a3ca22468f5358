"""Retrieval: the in-batch hard-negative VTM objective and Recall@K metrics.

A training *unit* is ``G`` near-duplicate groups of ``k`` items each, with one
caption per item: ``P = G * k`` (caption, video) positives. Items are numbered
``g * k + i``. Every caption is scored against every video of its own group
(the hard negatives: variants that differ in one attribute of one object) and
against ``E`` videos of other groups; every video likewise against ``E``
captions of other groups. The other-group negatives are drawn with
probability ``softmax(similarity)`` from the unimodal embeddings (as in
ALBEF's hard-negative mining), so they are the scenes the model currently
confuses, not random easy ones.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def gumbel_noise(rng: np.random.Generator, shape: tuple[int, ...]) -> Tensor:
    """Standard Gumbel noise: ``argmax(logits + noise)`` samples ``softmax(logits)``."""
    u = rng.random(shape).clip(1e-12, 1 - 1e-12)
    return torch.from_numpy(-np.log(-np.log(u))).float()


def group_pairs(sim: Tensor, group_size: int, n_mined: int, noise: Tensor) -> tuple[Tensor, Tensor]:
    """The (caption, video) pairs that one step scores with the cross-encoder.

    Args:
        sim: ``[U, P, P]`` caption-by-video similarity logits (unimodal
            embeddings; zeros for uniformly random negatives).
        group_size: ``k``, items per near-duplicate group (``P`` is a multiple).
        n_mined: ``E``, other-group negatives per caption and per video.
        noise: ``[U, 2, P, P]`` Gumbel noise; ``noise[:, 0]`` samples videos for
            captions, ``noise[:, 1]`` captions for videos (transposed layout).

    Returns ``(cap_idx, vid_idx)``, each ``[U, P*k + 2*P*E]`` local indices in
    this order: the within-group pairs ``[G, k(caption), k(video)]``, then
    ``[P, E]`` mined videos per caption, then ``[P, E]`` mined captions per
    video. ``vtm_group_loss`` reads the logits in that order.
    """
    u, p, _ = sim.shape
    k = group_size
    if p % k:
        raise ValueError(f"unit of {p} items is not a whole number of groups of {k}")
    dev = sim.device
    item = torch.arange(p, device=dev)
    group = item // k
    same = group[:, None] == group[None, :]
    within_cap = (group[:, None] * k + torch.arange(k, device=dev)[None, :])  # [P, k]: videos of p's group
    cap_w = item[:, None].expand(p, k)  # caption p against each video of its group
    vid_w = within_cap
    parts_c, parts_v = [cap_w.reshape(1, -1).expand(u, -1)], [vid_w.reshape(1, -1).expand(u, -1)]
    if n_mined:
        if n_mined > p - k:
            raise ValueError(f"n_mined={n_mined} negatives asked from {p - k} other-group items")
        blocked = torch.where(same, float("-inf"), 0.0)
        t2v = (sim + noise[:, 0] + blocked).topk(n_mined, dim=-1).indices  # [U, P(caption), E] videos
        v2t = (sim.transpose(1, 2) + noise[:, 1] + blocked).topk(n_mined, dim=-1).indices  # [U, P(video), E]
        parts_c += [item[None, :, None].expand(u, p, n_mined).reshape(u, -1), v2t.reshape(u, -1)]
        parts_v += [t2v.reshape(u, -1), item[None, :, None].expand(u, p, n_mined).reshape(u, -1)]
    return torch.cat(parts_c, 1), torch.cat(parts_v, 1)


def vtm_group_loss(logits: Tensor, group_size: int, n_mined: int) -> Tensor:
    """Symmetric softmax VTM loss over one step's scores (see ``group_pairs``).

    ``logits`` is ``[U, P*k + 2*P*E]`` in ``group_pairs`` order. For
    text->video each caption's positive competes with the ``k-1``
    near-duplicate videos of its group and its ``E`` mined videos;
    video->text is the same with roles swapped. Ranking by a softmax over
    these candidates trains exactly what retrieval needs: the right scene
    above its near-duplicates and above the other scenes most like it.
    """
    k, e = group_size, n_mined
    u, n = logits.shape
    p = n // (k + 2 * e)
    if p * (k + 2 * e) != n or p % k:
        raise ValueError(f"logits: expected [U, P*{k} + 2*P*{e}] with P a multiple of {k}, got {tuple(logits.shape)}")
    within = logits[:, : p * k].reshape(u, p // k, k, k)  # [unit, group, caption, video]
    t2v_neg = logits[:, p * k: p * (k + e)].reshape(u, p // k, k, e)
    v2t_neg = logits[:, p * (k + e):].reshape(u, p // k, k, e)
    t2v = torch.cat([within, t2v_neg], -1).reshape(-1, k + e)
    v2t = torch.cat([within.transpose(-1, -2), v2t_neg], -1).reshape(-1, k + e)
    target = torch.arange(k, device=logits.device).repeat(u * p // k)
    return 0.5 * (F.cross_entropy(t2v, target) + F.cross_entropy(v2t, target))


def recall_metrics(scores: Tensor | np.ndarray, caption_item: Tensor | np.ndarray,
                   ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """Recall@K and median rank in both directions from a score matrix.

    Args:
        scores: ``[n_captions, n_items]``, higher = better match.
        caption_item: ``[n_captions]``, the item each caption describes
            (several captions per item allowed).

    Text->video ranks every caption's item among all items. Video->text takes,
    for each item, the best rank of any of its captions among all captions.
    Ranks are 1-based; recalls are fractions in [0, 1].
    """
    s = torch.as_tensor(scores, dtype=torch.float64)
    cap_item = torch.as_tensor(caption_item, dtype=torch.long)
    n_caps, n_items = s.shape
    if cap_item.shape != (n_caps,):
        raise ValueError(f"caption_item: expected shape [{n_caps}], got {tuple(cap_item.shape)}")
    pos = s[torch.arange(n_caps), cap_item]
    # Ties count against the query (strictly greater or equal, minus itself),
    # so a constant scorer cannot look good.
    t2v_rank = (s >= pos[:, None]).sum(1)
    # Video -> text: an item's best-scored own caption, ranked among the
    # captions of *other* items (its other captions do not push it down).
    best = torch.full((n_items,), float("-inf"), dtype=s.dtype).scatter_reduce(0, cap_item, pos, "amax")
    others = cap_item[:, None] != torch.arange(n_items)[None, :]
    v2t_rank = 1 + ((s >= best[None, :]) & others).sum(0)
    has_caption = torch.bincount(cap_item, minlength=n_items) > 0
    v2t_rank = v2t_rank[has_caption]
    out: dict[str, float] = {}
    for k in ks:
        out[f"t2v_r{k}"] = (t2v_rank <= k).double().mean().item()
        out[f"v2t_r{k}"] = (v2t_rank <= k).double().mean().item()
    # quantile interpolates between the two middle ranks of an even count,
    # as np.median does (torch.median would take the lower one).
    out["t2v_medr"] = t2v_rank.double().quantile(0.5).item()
    out["v2t_medr"] = v2t_rank.double().quantile(0.5).item()
    return out


def contrastive_loss(video_emb: Tensor, text_emb: Tensor, logit_scale: Tensor) -> Tensor:
    """Symmetric InfoNCE between matched rows of ``[U, n, E]`` embeddings,
    computed within each of the ``U`` groups of ``n`` (units), so that a
    data-parallel run splits it exactly across processes."""
    v = F.normalize(video_emb, dim=-1)
    t = F.normalize(text_emb, dim=-1)
    logits = logit_scale.exp().clamp(max=100) * torch.einsum("une,ume->unm", t, v)
    target = torch.arange(logits.shape[-1], device=logits.device).expand(logits.shape[0], -1)
    return 0.5 * (F.cross_entropy(logits.flatten(0, 1), target.flatten())
                  + F.cross_entropy(logits.transpose(1, 2).flatten(0, 1), target.flatten()))
