"""Nested ("first-Q") latent training: every prefix of a Perceiver's latent
array becomes a working model, so that fewer latents can run at inference.

The design follows what works in public code for the same idea (the
Dancette & Cord paper's own method is not public): MQT-LLaVA trains its
resampler with the first ``m`` of its queries, ``m`` drawn each step, and
Matryoshka models train every nested size each step. Only prefixes are
trained, never random subsets: a prefix is what inference truncates to.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class NestedLatents(nn.Module):
    """A task objective run with the first Q latents of ``model``, for the Q
    of ``model.config.nested_latents``.

    ``nested_mode="sample"``: one Q per step, drawn uniformly from torch's
    global generator (saved in checkpoints, so a resumed run draws the same
    Q; every data-parallel rank seeds it alike and draws the same Q). The
    step's parts gain ``latents``, the Q drawn.
    ``"all"``: every Q each step, the losses summed (the gradient of each
    prefix model in one step); parts are reported per Q (``vtm@4``...).
    Nothing changes at inference: ``model.active_latents`` chooses Q there.
    """

    def __init__(self, objective: nn.Module, model: nn.Module):
        super().__init__()
        self.objective, self.model = objective, model

    def forward(self, batch: Any) -> tuple[Tensor, dict[str, float]]:
        counts, mode = list(self.model.config.nested_latents), self.model.config.nested_mode
        if mode == "sample":
            q = counts[int(torch.randint(len(counts), ()))]
            with self.model.using_latents(q):
                loss, parts = self.objective(batch)
            return loss, {**parts, "latents": float(q)}
        total, parts = None, {}
        for q in counts:
            with self.model.using_latents(q):
                loss, p = self.objective(batch)
            total = loss if total is None else total + loss
            parts.update({f"{k}@{q}": v for k, v in p.items()})
        return total, parts
