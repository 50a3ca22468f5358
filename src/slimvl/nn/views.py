"""LoCoMT's per-head attention views (Park & Choi, ICASSP 2024).

Several modalities share one layer. Instead of every head attending over
the concatenation of all of them (early fusion, ``(sum L_m)^2`` per head),
each head has one fixed *view*: self-attention within one modality
(``"audio"``), or cross-attention from one modality's queries to another's
keys and values (``"audio->video"``). A head's output exists only for the
tokens of its query modality; a token's attention output is the heads
whose query modality is its own, the others' slots being zero, through the
shared output projection.

Each view is computed as an attention over only the tokens it involves,
never as a full attention with a mask (which would cost as much as early
fusion). A head then costs ``L_q * L_k`` per channel with ``L_q, L_k <=
max_m L_m``, so a layer never costs more than modality-wise self-attention
(every head over every modality's own tokens, ``sum_m L_m^2``): LoCoMT's
guarantee, for any lengths and any view map.

Shapes: tokens ``{modality: [B, L_m, D]}``, key-padding masks ``{modality:
[B, L_m]}`` (True = real), ``H`` heads of width ``d = D / H``.
"""
from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


@dataclass(frozen=True)
class View:
    """Queries from ``query``, keys and values from ``key`` (equal: a self view)."""

    query: str
    key: str

    @classmethod
    def parse(cls, text: str) -> "View":
        """``"audio"`` (self) or ``"audio->video"`` (audio's queries read video)."""
        parts = [p.strip() for p in str(text).split("->")]
        if len(parts) == 1 and parts[0]:
            return cls(parts[0], parts[0])
        if len(parts) == 2 and all(parts):
            return cls(parts[0], parts[1])
        raise ValueError(f"view {text!r}: expected a modality ('audio') or 'query->key' ('audio->video')")

    def __str__(self) -> str:
        return self.query if self.query == self.key else f"{self.query}->{self.key}"


def all_views(modalities: Sequence[str]) -> list[View]:
    """The self view of every modality, then the cross view of every ordered pair."""
    return [View(m, m) for m in modalities] + [View(q, k) for q in modalities for k in modalities if q != k]


def view_map(spec, modalities: Sequence[str], heads: int, layers: int) -> list[list[View]]:
    """The views of every head of every layer, ``[layers][heads]``, from a
    config value:

    - ``"default"``: in every layer one self view per modality, the other
      heads dealt the cross views in turn, continuing from layer to layer,
      so that every cross view appears once the layers have enough heads
      between them (with exactly one head per modality, layers alternate
      self views and a cycle of cross views, m_1->m_2, ..., m_M->m_1);
    - ``"random"`` or ``"random:SEED"``: each head a view drawn at random,
      every modality still queried in every layer;
    - a list of per-layer lists of views (``"audio"``, ``"audio->video"``),
      or one such list used by every layer.

    Raises ``ValueError`` naming the layer and head of a bad map: a view
    naming a modality the model does not have, a layer with another number
    of views than heads, or a modality no head of a layer queries (its
    tokens would get no attention at all).
    """
    mods = list(modalities)
    if heads < len(mods):
        raise ValueError(f"views: {heads} heads cannot give each of {len(mods)} modalities {mods} a head")
    views = all_views(mods)
    if isinstance(spec, str) and spec == "default":
        out = _default_map(mods, heads, layers)
    elif isinstance(spec, str) and spec.startswith("random"):
        seed = int(spec.split(":", 1)[1]) if ":" in spec else 0
        rng = random.Random(seed)
        out = []
        for _ in range(layers):
            # Each modality first gets one head that queries it, the rest are drawn freely.
            layer = [rng.choice([v for v in views if v.query == m]) for m in mods]
            layer += [rng.choice(views) for _ in range(heads - len(mods))]
            rng.shuffle(layer)
            out.append(layer)
    elif isinstance(spec, (list, tuple)) and spec:
        layered = spec if all(isinstance(x, (list, tuple)) for x in spec) else [spec] * layers
        if len(layered) != layers:
            raise ValueError(f"views: {len(layered)} layers of views given, the model has {layers}")
        out = [[v if isinstance(v, View) else View.parse(v) for v in layer] for layer in layered]
    else:
        raise ValueError(f"views={spec!r}: expected 'default', 'random', 'random:SEED' or a list of views per "
                         "layer (e.g. [['audio', 'video', 'audio->video', 'video->audio']])")
    for i, layer in enumerate(out):
        if len(layer) != heads:
            raise ValueError(f"views: layer {i} has {len(layer)} views for {heads} heads (one view per head)")
        for h, v in enumerate(layer):
            unknown = [m for m in (v.query, v.key) if m not in mods]
            if unknown:
                raise ValueError(f"views: layer {i}, head {h} ({v}) names {unknown}; the modalities are {mods}")
        missing = [m for m in mods if all(v.query != m for v in layer)]
        if missing:
            raise ValueError(f"views: in layer {i} no head queries {missing}: their tokens would get no attention")
    return out


def _default_map(mods: list[str], heads: int, layers: int) -> list[list[View]]:
    selfs = [View(m, m) for m in mods]
    cross = [v for v in all_views(mods) if v.query != v.key]
    if not cross:  # one modality: self-attention
        return [[selfs[0]] * heads for _ in range(layers)]
    extra = heads - len(mods)
    if extra == 0:
        ring = [View(m, mods[(k + 1) % len(mods)]) for k, m in enumerate(mods)]
        return [selfs if i % 2 == 0 else ring for i in range(layers)]
    return [selfs + [cross[(i * extra + j) % len(cross)] for j in range(extra)] for i in range(layers)]


class ViewAttention(nn.Module):
    """Multi-head attention in which head ``h`` attends within ``views[h]``.

    Args:
        dim: token width ``D`` (shared by the modalities).
        views: one ``View`` per head.
        dropout: attention-probability dropout while training.
    """

    def __init__(self, dim: int, views: Sequence[View], dropout: float = 0.0):
        super().__init__()
        heads = len(views)
        if not heads or dim % heads:
            raise ValueError(f"ViewAttention: width {dim} is not divisible by {heads} heads (one per view)")
        self.views, self.heads, self.dropout = list(views), heads, dropout
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(dim, 2 * dim, bias=False)  # a key bias cancels in the softmax (see Attention)
        self.proj = nn.Linear(dim, dim)
        # Heads grouped by view: one attention call per distinct view, over that view's tokens only.
        groups: dict[View, list[int]] = {}
        for h, v in enumerate(self.views):
            groups.setdefault(v, []).append(h)
        self.groups = list(groups.items())

    def forward(self, x: Mapping[str, Tensor], masks: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Attention outputs ``{modality: [B, L_m, D]}`` of tokens ``x``
        (``masks``: key-padding masks, True = real, for modalities that pad)."""
        h = self.heads
        q = {m: rearrange(self.to_q(t), "b n (h d) -> b h n d", h=h) for m, t in x.items()}
        kv = {m: rearrange(self.to_kv(t), "b n (two h d) -> two b h n d", two=2, h=h) for m, t in x.items()}
        out = {m: torch.zeros_like(q[m]) for m in x}
        for view, idx in self.groups:
            mask = None if masks is None or masks.get(view.key) is None else masks[view.key][:, None, None, :]
            sel = torch.tensor(idx, device=q[view.query].device)
            k, v = kv[view.key][0].index_select(1, sel), kv[view.key][1].index_select(1, sel)
            o = F.scaled_dot_product_attention(q[view.query].index_select(1, sel), k, v, attn_mask=mask,
                                               dropout_p=self.dropout if self.training else 0.0)
            out[view.query] = out[view.query].index_copy(1, sel, o)
        return {m: self.proj(rearrange(o, "b h n d -> b n (h d)")) for m, o in out.items()}


def view_attention_flops(views: Sequence[View], lengths: Mapping[str, int], dim: int) -> int:
    """FLOPs of ``ViewAttention``'s attention products (scores and
    weighted values) for modality lengths ``lengths``: ``4 L_q L_k d`` per head."""
    d = dim // len(views)
    return sum(4 * lengths[v.query] * lengths[v.key] * d for v in views)


def modality_self_attention_flops(lengths: Mapping[str, int], dim: int) -> int:
    """The same products for modality-wise self-attention (every head within
    every modality): ``4 D sum_m L_m^2``, LoCoMT's bound."""
    return sum(4 * n * n * dim for n in lengths.values())


__all__ = ["View", "all_views", "view_map", "ViewAttention", "view_attention_flops", "modality_self_attention_flops"]
