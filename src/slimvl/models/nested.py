"""Nested ("first-Q") latent training: every prefix of a Perceiver's latent
array becomes a working model, so that fewer latents can run at inference.

The design follows what works in public code for the same idea (the
Dancette & Cord paper's own method is not public): MQT-LLaVA trains its
resampler with the first ``m`` of its queries, ``m`` drawn each step, and
Matryoshka models train every nested size each step. Only prefixes are
trained, never random subsets: a prefix is what inference truncates to.

Self-distillation (``nested_distill``) adds, for each smaller count, the
mean squared error between its decoded outputs (``model.distill_modules()``:
what the task heads read) and those of all the latents on the same batch
(computed without gradient: the full model teaches, it is not pulled
towards its students). Both passes start from the same random state and
the student replays the teacher's LayerDrop decisions, so they skip the
same cross-attentions and sample alike inside the objective. In
``nested_mode="sample"`` the random stream after the step is where it would
be without the teacher pass; in ``"all"`` every count starts from the
teacher's state (they share their draws).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@contextmanager
def captured(modules: list[nn.Module]) -> Iterator[list[Tensor]]:
    """The outputs of ``modules`` while the block runs, in call order."""
    out: list[Tensor] = []
    handles = [m.register_forward_hook(lambda _m, _i, o: out.append(o)) for m in modules]
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


@contextmanager
def layer_drop(model: nn.Module, record: list[bool] | None = None, replay: list[bool] | None = None) -> Iterator[None]:
    """Record LayerDrop's decisions of every latent encoder of ``model`` into
    ``record``, or replay them from ``replay``, while the block runs."""
    encoders = [m for m in model.modules() if hasattr(m, "drop_replay")]
    for m in encoders:
        m.drop_record, m.drop_replay = record, replay
    try:
        yield
    finally:
        for m in encoders:
            m.drop_record = m.drop_replay = None


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def distill_loss(student: list[Tensor], teacher: list[Tensor]) -> Tensor:
    """Mean over the captured outputs of their mean squared error."""
    if len(student) != len(teacher) or any(s.shape != t.shape for s, t in zip(student, teacher)):
        raise RuntimeError("self-distillation: the student and teacher passes called the decoders differently "
                           f"({[tuple(s.shape) for s in student]} vs {[tuple(t.shape) for t in teacher]})")
    if not student:
        raise RuntimeError("self-distillation: the objective called none of the model's decoders")
    return torch.stack([F.mse_loss(s.float(), t.float()) for s, t in zip(student, teacher)]).mean()


class NestedLatents(nn.Module):
    """A task objective run with the first Q latents of ``model``, for the Q
    of ``model.config.nested_latents``.

    ``nested_mode="sample"``: one Q per step, drawn uniformly from torch's
    global generator (saved in checkpoints, so a resumed run draws the same
    Q; every data-parallel rank seeds it alike and draws the same Q). The
    step's parts gain ``latents``, the Q drawn.
    ``"all"``: every Q each step, the losses summed (the gradient of each
    prefix model in one step); parts are reported per Q (``vtm@4``...).
    With ``nested_distill`` > 0, a Q below ``num_latents`` also pays that
    weight times ``distill_loss`` against all the latents (part ``distill``,
    or ``distill@Q``). Nothing changes at inference: ``model.active_latents``
    chooses Q there.
    """

    def __init__(self, objective: nn.Module, model: nn.Module):
        super().__init__()
        self.objective, self.model = objective, model

    def forward(self, batch: Any) -> tuple[Tensor, dict[str, Tensor | float]]:
        c = self.model.config
        counts, mode, weight = list(c.nested_latents), c.nested_mode, c.nested_distill
        if mode == "sample":
            drawn = getattr(self.model, "step_latents", None)  # the training loop draws it before the step
            counts = [drawn if drawn is not None else counts[int(torch.randint(len(counts), ()))]]
        teacher, rng, drops = None, None, None
        if weight and any(q < c.num_latents for q in counts):
            teacher, rng, drops = self._teacher(batch)
        total, parts = None, {}
        for q in counts:
            if rng is not None:
                _set_rng_state(rng, self.model.device)
            with self.model.using_latents(q), captured(self.model.distill_modules()) as outputs, \
                    layer_drop(self.model, replay=None if drops is None else list(drops)):
                loss, p = self.objective(batch)
            p = dict(p)
            if teacher is not None and q < c.num_latents:
                d = distill_loss(outputs, teacher)
                loss = loss + weight * d
                p["distill"] = d.detach()
            total = loss if total is None else total + loss
            if mode == "sample":
                parts = {**p, "latents": float(q)}
            else:
                parts.update({f"{k}@{q}": v for k, v in p.items()})
        return total, parts

    def _teacher(self, batch: Any) -> tuple[list[Tensor], tuple, list[bool]]:
        """The decoded outputs of all the latents on ``batch`` (no gradient),
        the random state the passes start from and the teacher's LayerDrop
        decisions (the students replay them: dropout may draw from the same
        generator a number of values that depends on Q)."""
        rng, drops = _rng_state(self.model.device), []
        with torch.no_grad(), self.model.using_latents(None), captured(self.model.distill_modules()) as outputs, \
                layer_drop(self.model, record=drops):
            self.objective(batch)
        return [o.detach() for o in outputs], rng, drops
