"""Attention masks in one place: key padding, general masks (per-head views
later), and the token-size bias of proportional attention.

SDPA takes one ``attn_mask`` broadcastable to ``[B, H, N, S]``: a boolean
mask (True = may attend) keeps its fused kernels, a float mask is added to
the logits. ``attention_mask`` combines the pieces into the cheapest form
that expresses them.
"""
from __future__ import annotations

import torch
from torch import Tensor


def padding_mask(key_padding_mask: Tensor) -> Tensor:
    """``[B, S]`` bool (True = real key) -> ``[B, 1, 1, S]``."""
    if key_padding_mask.dim() != 2 or key_padding_mask.dtype != torch.bool:
        raise ValueError(f"key_padding_mask: expected bool [B, S], got {key_padding_mask.dtype} "
                         f"{tuple(key_padding_mask.shape)}")
    return key_padding_mask[:, None, None, :]


def size_bias(size: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``log(size)`` as ``[B, 1, 1, S]``: a key that stands for ``size``
    merged tokens weighs as much as they did ("proportional attention")."""
    if size.dim() != 2:
        raise ValueError(f"size: expected [B, S] token sizes, got {tuple(size.shape)}")
    return size.to(dtype).clamp_min(1e-6).log()[:, None, None, :]


def causal_mask(n: int, device: torch.device | str | None = None) -> Tensor:
    """Bool ``[n, n]``, True where query ``i`` may read key ``j <= i`` (a causal text tower)."""
    return torch.ones(n, n, dtype=torch.bool, device=device).tril()


def check_mask(mask: Tensor, b: int, h: int, n: int, s: int) -> None:
    """Raise ``ValueError`` unless ``mask`` broadcasts to ``[B, H, N, S]``."""
    shape = (b, h, n, s)
    ok = (mask.dtype == torch.bool or mask.is_floating_point()) and 2 <= mask.dim() <= 4 \
        and all(m in (1, t) for m, t in zip(reversed(mask.shape), reversed(shape)))
    if not ok:
        raise ValueError(f"mask: expected a bool or float tensor of 2 to 4 dimensions broadcastable to "
                         f"[B, H, N, S] = {list(shape)}, got {mask.dtype} {tuple(mask.shape)}")


def attention_mask(key_padding_mask: Tensor | None = None, mask: Tensor | None = None,
                   size: Tensor | None = None, dtype: torch.dtype = torch.float32) -> Tensor | None:
    """The ``attn_mask`` SDPA takes, or None when nothing is masked.

    Args:
        key_padding_mask: bool ``[B, S]``, True for real keys.
        mask: bool (True = may attend) or additive float, broadcastable to
            ``[B, H, N, S]`` (e.g. which heads may see which keys).
        size: ``[B, S]`` how many original tokens each key stands for.

    Boolean pieces alone stay boolean (SDPA's fused kernels take them); with
    a float piece the result is additive, ``-inf`` where masked.
    """
    pieces = [] if key_padding_mask is None else [padding_mask(key_padding_mask)]
    if mask is not None:
        pieces.append(mask)
    bias = None if size is None else size_bias(size, dtype)
    if bias is None and all(p.dtype == torch.bool for p in pieces):
        if not pieces:
            return None
        out = pieces[0]
        for p in pieces[1:]:
            out = out & p
        return out
    for p in pieces:
        if p.dtype == torch.bool:
            base = torch.zeros((), dtype=dtype, device=p.device) if bias is None else bias
            bias = base.masked_fill(~p, float("-inf"))
        else:
            bias = p.to(dtype) if bias is None else bias + p.to(dtype)
    return bias
