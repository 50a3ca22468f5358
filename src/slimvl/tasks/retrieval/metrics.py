"""Retrieval metrics: ranks, Recall@K and median rank in both directions,
the held-out split and which attribute the model got wrong."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..base import check_scores, heldout_split
from .data import RetrievalData


def t2v_ranks(scores: Tensor | np.ndarray, caption_item: Tensor | np.ndarray) -> Tensor:
    """1-based rank of each caption's item among all items: ``[n_captions]``.

    Ties count against the query (strictly greater or equal, minus itself),
    so a constant scorer cannot look good."""
    s = torch.as_tensor(scores, dtype=torch.float64)
    cap_item = torch.as_tensor(caption_item, dtype=torch.long)
    if s.dim() != 2 or cap_item.shape != (s.shape[0],):
        raise ValueError(f"scores: expected [n_captions, n_items] with caption_item [n_captions], "
                         f"got {tuple(s.shape)} and {tuple(cap_item.shape)}")
    pos = s[torch.arange(s.shape[0]), cap_item]
    return (s >= pos[:, None]).sum(1)


def v2t_ranks(scores: Tensor | np.ndarray, caption_item: Tensor | np.ndarray) -> Tensor:
    """1-based rank of each item's best-scored own caption among the
    captions of *other* items (its other captions do not push it down):
    ``[n_items with a caption]``, in item order. Ties count against it."""
    s = torch.as_tensor(scores, dtype=torch.float64)
    cap_item = torch.as_tensor(caption_item, dtype=torch.long)
    n_caps, n_items = s.shape
    pos = s[torch.arange(n_caps), cap_item]
    best = torch.full((n_items,), float("-inf"), dtype=s.dtype).scatter_reduce(0, cap_item, pos, "amax")
    others = cap_item[:, None] != torch.arange(n_items)[None, :]
    rank = 1 + ((s >= best[None, :]) & others).sum(0)
    return rank[torch.bincount(cap_item, minlength=n_items) > 0]


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

    Ties count against the query, in both directions: a negative scored
    exactly as high as the positive ranks above it, so scores that collapse
    (a constant scorer, or values rounded to bf16) cannot look good. Scores
    are compared in float64; NaN scores must be caught before (NaN compares
    false with everything, so every positive would rank first: see
    ``slimvl.evaluate.check_scores``).
    """
    s = torch.as_tensor(scores, dtype=torch.float64)
    cap_item = torch.as_tensor(caption_item, dtype=torch.long)
    n_caps, n_items = s.shape
    if cap_item.shape != (n_caps,):
        raise ValueError(f"caption_item: expected shape [{n_caps}], got {tuple(cap_item.shape)}")
    t2v_rank = t2v_ranks(s, cap_item)
    v2t_rank = v2t_ranks(s, cap_item)
    out: dict[str, float] = {}
    for k in ks:
        out[f"t2v_r{k}"] = (t2v_rank <= k).double().mean().item()
        out[f"v2t_r{k}"] = (v2t_rank <= k).double().mean().item()
    # quantile interpolates between the two middle ranks of an even count,
    # as np.median does (torch.median would take the lower one).
    out["t2v_medr"] = t2v_rank.double().quantile(0.5).item()
    out["v2t_medr"] = v2t_rank.double().quantile(0.5).item()
    return out


def retrieval_metrics(scores: torch.Tensor, data: RetrievalData) -> dict:
    """``recall_metrics`` of a ``[n_captions, n_items]`` score matrix over
    ``data``, with the held-out split and near-duplicate error analysis when
    the data has them. Raises ``NonFiniteScores`` on NaN or infinite scores."""
    check_scores(scores)
    out = recall_metrics(scores, data.caption_item)
    if data.heldout is not None:
        for name, rows in heldout_split(torch.tensor(data.heldout)[data.caption_item]):
            out[f"{name}_t2v_r1"] = recall_metrics(scores[rows], data.caption_item[rows])["t2v_r1"]
    if data.scenes is not None:
        out["near_duplicate_errors"] = near_duplicate_errors(scores, data)
    return out


ATTRIBUTES = ("shape", "colour", "size", "motion")


def near_duplicate_errors(scores: torch.Tensor, data: RetrievalData) -> dict[str, int]:
    """Which attribute the model got wrong, over the t2v top-1 mistakes.

    A caption whose top video is a near-duplicate of its own (same group) is
    counted under the first attribute in which the two scenes differ (a
    variant differs from its group's base in one attribute of one object, so
    two variants may differ in two); a top video from another group counts
    as ``other_scene``.
    """
    counts = {a: 0 for a in ATTRIBUTES} | {"other_scene": 0, "correct": 0}
    group_of = {i: g for g, items in enumerate(data.groups) for i in items}
    for cap, top in enumerate(scores.argmax(1).tolist()):
        item = int(data.caption_item[cap])
        if top == item:
            counts["correct"] += 1
        elif item not in group_of or group_of.get(top) != group_of[item]:
            counts["other_scene"] += 1
        else:
            counts[_differing_attribute(data.scenes[item], data.scenes[top])] += 1
    return counts


def _differing_attribute(a: dict, b: dict) -> str:
    # Variants keep object order and positions, so objects pair up by index.
    for oa, ob in zip(a["objects"], b["objects"]):
        for attr in ATTRIBUTES:
            if oa.get(attr) != ob.get(attr):
                return attr
    return "other_scene"
