"""Four ways to fuse several modalities' tokens in one transformer, at
equal width and depth (the encoder of the fusion models):

- ``early``: joint self-attention over all modalities' tokens, concatenated
  (every head ``(sum L_m)^2``).
- ``late``: one encoder per modality, nothing shared (fusion happens in the
  head, e.g. averaged logits).
- ``mbt`` (Nagrani et al., NeurIPS 2021): one encoder per modality up to
  ``fusion_layer``; from there, each modality's layer reads its tokens and
  ``bottlenecks`` shared tokens, whose updates are averaged over the
  modalities after every layer.
- ``locomt`` (Park & Choi, ICASSP 2024): one shared layer stack whose heads
  each attend within one view (``slimvl.nn.views``), never costing more
  than modality-wise self-attention.

Shapes: tokens ``{modality: [B, L_m, D]}`` and key-padding masks ``{modality:
[B, L_m]}`` (True = real; a modality without padding may be left out);
the output is the final tokens in the same form.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from .blocks import MLP, Block
from .views import ViewAttention, view_attention_flops, view_map

SCHEMES = ("early", "late", "mbt", "locomt")


class ViewBlock(nn.Module):
    """Pre-norm layer over several modalities: ``x + ViewAttention(LN(x))``,
    then ``x + MLP(LN(x))`` per modality; norms and MLP shared (one layer)."""

    def __init__(self, dim: int, views, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ViewAttention(dim, views, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_ratio, dropout)

    def forward(self, x: Mapping[str, Tensor], masks: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        a = self.attn({m: self.norm1(t) for m, t in x.items()}, masks)
        x = {m: t + a[m] for m, t in x.items()}
        return {m: t + self.mlp(self.norm2(t)) for m, t in x.items()}


def layer_flops(n: int, dim: int, mlp_ratio: float, n_keys: int | None = None) -> int:
    """FLOPs (as torch counts them: matmuls and attention) of one pre-norm
    self-attention layer over ``n`` tokens: projections, ``4 n^2 D`` of
    attention products, the MLP."""
    hidden = int(dim * mlp_ratio)
    return 2 * n * dim * (4 * dim + 2 * hidden) + 4 * n * (n if n_keys is None else n_keys) * dim


class FusionEncoder(nn.Module):
    """``depth`` layers over the tokens of ``modalities``, fused by ``scheme``.

    Args:
        scheme: ``"early"``, ``"late"``, ``"mbt"`` or ``"locomt"``.
        modalities: their names, in the order tokens are concatenated.
        dim, heads, depth, mlp_ratio, dropout: as every slimvl layer.
        bottlenecks: MBT's shared tokens (4, as in their AudioSet config).
        fusion_layer: MBT's first fused layer (default: 2/3 of the depth,
            leaving at least two fused layers, so that what crosses over
            is read).
        views: LoCoMT's view map (``slimvl.nn.views.view_map``: "default",
            "random[:SEED]" or lists of views).
    """

    def __init__(self, scheme: str, modalities: Sequence[str], dim: int, heads: int, depth: int,
                 mlp_ratio: float = 4.0, dropout: float = 0.0, bottlenecks: int = 4, fusion_layer: int | None = None,
                 views="default"):
        super().__init__()
        if scheme not in SCHEMES:
            raise ValueError(f"fusion={scheme!r}: expected one of {list(SCHEMES)}")
        mods = list(modalities)
        if len(set(mods)) != len(mods) or not mods:
            raise ValueError(f"FusionEncoder: modalities must be distinct names, got {mods}")
        self.scheme, self.modalities, self.dim, self.mlp_ratio = scheme, mods, dim, mlp_ratio
        self.depth = depth
        if scheme == "early":
            self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, dropout) for _ in range(depth))
        elif scheme in ("late", "mbt"):
            self.towers = nn.ModuleDict({m: nn.ModuleList(Block(dim, heads, mlp_ratio, dropout) for _ in range(depth))
                                         for m in mods})
        else:
            self.view_map = view_map(views, mods, heads, depth)
            self.blocks = nn.ModuleList(ViewBlock(dim, v, mlp_ratio, dropout) for v in self.view_map)
        if scheme == "mbt":
            # 2/3 of the depth as in their AudioSet config (8 of 12), but at least two fused layers: what one
            # modality writes into the bottlenecks at layer i is read by the others only at layer i + 1.
            self.fusion_layer = min(round(2 * depth / 3), max(depth - 2, 0)) if fusion_layer is None else fusion_layer
            if not 0 <= self.fusion_layer <= depth:
                raise ValueError(f"fusion_layer={fusion_layer}: must be in 0..depth={depth}")
            if bottlenecks < 1:
                raise ValueError(f"bottlenecks={bottlenecks}: MBT needs at least one bottleneck token")
            self.bottleneck = nn.Parameter(torch.randn(bottlenecks, dim) * 0.02)

    def _check(self, x: Mapping[str, Tensor]) -> None:
        if list(x) != self.modalities:
            raise ValueError(f"FusionEncoder: expected tokens of {self.modalities} (in that order), got {list(x)}")
        for m, t in x.items():
            if t.dim() != 3 or t.shape[2] != self.dim or t.shape[0] != next(iter(x.values())).shape[0]:
                raise ValueError(f"{m} tokens: expected [B, L, {self.dim}] with one B for all, got {tuple(t.shape)}")

    def forward(self, x: Mapping[str, Tensor], masks: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        self._check(x)
        masks = dict(masks or {})
        if self.scheme == "early":
            lengths = [t.shape[1] for t in x.values()]
            h = torch.cat(list(x.values()), 1)
            pad = None
            if masks:
                pad = torch.cat([masks.get(m, torch.ones(t.shape[:2], dtype=torch.bool, device=t.device))
                                 for m, t in x.items()], 1)
            for blk in self.blocks:
                h = blk(h, key_padding_mask=pad)
            return dict(zip(self.modalities, h.split(lengths, 1)))
        if self.scheme == "locomt":
            out = dict(x)
            for blk in self.blocks:
                out = blk(out, masks or None)
            return out
        out = dict(x)
        first = self.fusion_layer if self.scheme == "mbt" else self.depth
        for m in self.modalities:
            for blk in self.towers[m][:first]:
                out[m] = blk(out[m], key_padding_mask=masks.get(m))
        if self.scheme == "late" or first == self.depth:
            return out
        b = next(iter(x.values())).shape[0]
        shared = self.bottleneck.to(out[self.modalities[0]].dtype).expand(b, -1, -1)
        for i in range(first, self.depth):
            updates = []
            for m in self.modalities:
                n = out[m].shape[1]
                pad = masks.get(m)
                if pad is not None:
                    pad = torch.cat([pad, pad.new_ones(b, shared.shape[1])], 1)
                y = self.towers[m][i](torch.cat([out[m], shared], 1), key_padding_mask=pad)
                out[m], upd = y[:, :n], y[:, n:]
                updates.append(upd)
            shared = torch.stack(updates).mean(0)  # every modality's update, averaged: what crosses over
        return out

    def flops(self, lengths: Mapping[str, int]) -> int:
        """Analytic FLOPs of one sample with modality lengths ``lengths``
        (what torch's counter counts: matmuls and attention products)."""
        d, ratio = self.dim, self.mlp_ratio
        if self.scheme == "early":
            return self.depth * layer_flops(sum(lengths.values()), d, ratio)
        if self.scheme == "late":
            return sum(self.depth * layer_flops(n, d, ratio) for n in lengths.values())
        if self.scheme == "mbt":
            nb, fl = self.bottleneck.shape[0], self.fusion_layer
            return sum(fl * layer_flops(n, d, ratio) + (self.depth - fl) * layer_flops(n + nb, d, ratio)
                       for n in lengths.values())
        per_layer = sum(layer_flops(n, d, ratio, n_keys=0) for n in lengths.values())  # projections and MLP
        return sum(per_layer + view_attention_flops(v, lengths, d) for v in self.view_map)


__all__ = ["FusionEncoder", "ViewBlock", "SCHEMES", "layer_flops"]
