"""Retrieval: the in-batch hard-negative VTM objective and Recall@K metrics."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def unit_pairs(group_size: int) -> tuple[Tensor, Tensor]:
    """The (caption, video) pairs scored for one training *unit* of two
    near-duplicate groups A and B, each of ``group_size`` items.

    Items are numbered ``0..k-1`` (group A) and ``k..2k-1`` (group B); caption
    ``i`` belongs to item ``i``. Every caption meets every video of its own
    group (the hard negatives: variants differing in one attribute) and the
    video in the same slot of the other group (an easy negative, so that the
    model also learns to reject unrelated scenes). Returns ``(cap_idx,
    vid_idx)``, each ``[2k*k + 2k]``.
    """
    k = group_size
    caps, vids = [], []
    for g in (0, 1):
        for i in range(k):
            for j in range(k):
                caps.append(g * k + i)
                vids.append(g * k + j)
    for i in range(2 * k):
        caps.append(i)
        vids.append((i + k) % (2 * k))
    return torch.tensor(caps), torch.tensor(vids)


def vtm_unit_loss(logits: Tensor, group_size: int) -> Tensor:
    """Symmetric softmax VTM loss over one unit's scores (see ``unit_pairs``).

    ``logits`` is ``[U, 2k*k + 2k]`` for ``U`` units in the order
    ``unit_pairs`` gives. For text->video each caption's positive competes
    with the k-1 near-duplicate videos of its group and one video of the other
    group; video->text is the same with roles swapped. Ranking by a softmax
    over these candidates trains exactly what retrieval needs: the right
    scene above its near-duplicates.
    """
    k = group_size
    u = logits.shape[0]
    within = logits[:, : 2 * k * k].reshape(u, 2, k, k)  # [unit, group, caption, video]
    cross = logits[:, 2 * k * k:].reshape(u, 2, k)  # caption i (group g) vs video i of the other group
    # text -> video: row i of `within`, plus caption i's cross pair.
    t2v = torch.cat([within, cross[..., None]], -1).reshape(-1, k + 1)
    # video -> text: column j of `within`, plus the cross pair whose video is j
    # (the caption in slot j of the *other* group), hence the flip over groups.
    v2t = torch.cat([within.transpose(-1, -2), cross.flip(1)[..., None]], -1).reshape(-1, k + 1)
    target = torch.arange(k, device=logits.device).repeat(u * 2)
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
