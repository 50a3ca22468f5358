"""How sure a prediction is, in [0, 1]: what a cascade compares with its thresholds."""
from __future__ import annotations

import torch
from torch import Tensor

CONFIDENCES = ("max_softmax", "margin")


def confidence(logits: Tensor, kind: str = "max_softmax", multi_label: bool = False) -> Tensor:
    """Confidence ``[B]`` of logits ``[B, C]``.

    One class per input: ``"max_softmax"``, the top class's probability, or
    ``"margin"``, the top-1 minus the top-2 probability. Multi-label: the
    least sure label decides, ``min_c |2 sigmoid(x_c) - 1|`` (0 on a
    decision boundary, 1 when every label is certain), whatever ``kind``.
    """
    if kind not in CONFIDENCES:
        raise ValueError(f"confidence {kind!r}: expected one of {list(CONFIDENCES)}")
    if logits.dim() != 2:
        raise ValueError(f"logits: expected [B, C], got {tuple(logits.shape)}")
    x = logits.float()
    if multi_label:
        return (2 * torch.sigmoid(x) - 1).abs().min(-1).values
    p = torch.softmax(x, -1)
    if kind == "max_softmax" or p.shape[1] < 2:
        return p.max(-1).values
    top = p.topk(2, -1).values
    return top[:, 0] - top[:, 1]
