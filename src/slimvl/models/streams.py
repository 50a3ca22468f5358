"""Mixed-stream scoring from cached encodings.

In the mixed stream the decoder's [CLS] query cross-attends to the
concatenated latents of a video and a caption, each encoded alone. Scoring
``n_t x n_v`` pairs naively would build ``n_t * n_v`` concatenations and
project every one of them to keys and values, but those projections depend
on one item only: here each item's keys and values are projected once
(``decoder_kv``), and each pair costs only its query's attention over the
``2N`` cached keys plus the MLP and head. Softmax over a concatenation is a
softmax over the union of logits, so the result is exactly the decoder's.
"""
from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from .base import score_in_fp32


def decoder_kv(block: nn.Module, latents: Tensor) -> tuple[Tensor, Tensor]:
    """Keys and values ``[B, H, N, d]`` that a decoder ``CrossBlock`` reads from ``latents [B, N, D]``."""
    return block.context_kv(latents)


def _cached_block(block: nn.Module, x: Tensor, kv_text: tuple[Tensor, Tensor],
                  kv_video: tuple[Tensor, Tensor]) -> Tensor:
    """One decoder ``CrossBlock`` for a grid of pairs: ``x [C, V, D]`` are the
    queries of caption ``c`` with video ``v``; ``kv_text`` holds the ``C``
    captions' keys/values, ``kv_video`` the ``V`` videos'."""
    (kt, vt), (kv, vv) = kv_text, kv_video
    q = rearrange(block.attn.to_q(block.norm_q(x)), "c v (h d) -> c v h d", h=block.attn.heads)
    scale = q.shape[-1] ** -0.5
    logits = torch.cat([torch.einsum("cvhd,vhnd->cvhn", q, kv),
                        torch.einsum("cvhd,chnd->cvhn", q, kt)], -1) * scale
    p = logits.softmax(-1)
    n_v = kv.shape[2]
    out = torch.einsum("cvhn,vhnd->cvhd", p[..., :n_v], vv) + torch.einsum("cvhn,chnd->cvhd", p[..., n_v:], vt)
    x = x + block.attn.proj(rearrange(out, "c v h d -> c v (h d)"))
    return x + block.mlp(block.norm2(x))


def cached_decoder_scores(decoder: nn.ModuleList, query: Tensor, head: nn.Module,
                          kv_text: list[tuple[Tensor, Tensor]], kv_video: list[tuple[Tensor, Tensor]],
                          max_pairs: int = 8192) -> Tensor:
    """VTM logits ``[n_t, n_v]`` of every caption with every video.

    Args:
        decoder: the decoder's ``CrossBlock`` layers.
        query: the [CLS] query ``[1, D]``.
        head: maps the decoded query ``[..., D]`` to a logit ``[..., 1]``
            (run in float32, see ``score_in_fp32``).
        kv_text / kv_video: per decoder layer, ``decoder_kv`` of the captions'
            and the videos' (tagged) latents.
        max_pairs: pairs scored at once (captions are taken in chunks).
    """
    n_t, n_v = kv_text[0][0].shape[0], kv_video[0][0].shape[0]
    chunk = max(1, max_pairs // max(n_v, 1))
    rows = []
    for start in range(0, n_t, chunk):
        stop = min(start + chunk, n_t)
        x = query.expand(stop - start, n_v, -1)
        for block, (kt, vt), kvv in zip(decoder, kv_text, kv_video):
            x = _cached_block(block, x, (kt[start:stop], vt[start:stop]), kvv)
        rows.append(score_in_fp32(head, x).squeeze(-1))
    return torch.cat(rows, 0)
