"""Running a policy: inputs grouped by the level they run at, the work
that does not depend on the latents done once per input.

Inputs go in batches. Each batch is prepared once (``model.prepare``: the
input array; each cross-attention's keys and values are kept as the first
level to read them computes them), then a cascade runs each level on the
batch's inputs still open, a learned policy runs each input once at the
level its head chose, the inputs of one level together. Latents attend to
each other, so the work of Q latents is not part of the work of 2Q: that
part is run again at each level. Adapters (``ClassInputs``, ``QAInputs``,
``VTMInputs``) say how a task's inputs become model inputs.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from ..runtime import autocast_for
from ..tasks.base import for_inference
from ..tasks.classify import ClassData
from .confidence import confidence
from .costs import cost_model
from .inputs import ClassInputs, QAInputs
from .learned import Learned
from .policies import Cascade, Fixed, Level, level_q, model_levels, skipped, using_level

__all__ = ["ClassInputs", "QAInputs", "by_level", "level_logits", "level_costs", "probe_features", "run_policy",
           "classifier_levels", "run_classifier"]


def by_level(model: nn.Module, inputs: Mapping[str, Tensor], q: Tensor,
             fn: Callable[[nn.Module, dict[str, Tensor]], Tensor]) -> Tensor:
    """``fn(model, inputs)`` with each input run at its own latent count
    ``q [B]``: the inputs of one count form one batch, so a single input
    that needs many latents never makes the others run with them. Results
    come back in the inputs' order and equal running each input alone."""
    order, parts = [], []
    for count in torch.unique(q).tolist():
        rows = torch.nonzero(q == count).flatten()
        with model.using_latents(int(count)):
            parts.append(fn(model, {k: t[rows.to(t.device)] for k, t in inputs.items()}))
        order.append(rows)
    rows = torch.cat(order)
    out = torch.empty((len(rows), *parts[0].shape[1:]), dtype=parts[0].dtype, device=parts[0].device)
    out[rows.to(out.device)] = torch.cat(parts)
    return out


def _prepared(model: nn.Module, inputs, batch_size: int, device):
    """Each batch's rows, its model inputs and its prepared input array (in
    inference mode), and the device."""
    dev = for_inference(model, device)
    for rows in inputs.batches(batch_size):
        with torch.inference_mode(), autocast_for(dev, "auto"):
            batch = inputs.model_inputs(rows, dev)
            yield rows, batch, inputs.prepare(model, batch), dev


def level_logits(model: nn.Module, inputs, levels: list[Level], batch_size: int = 256, device=None) -> Tensor:
    """Every input's logits at every level: ``[L, n, C]`` (float32, CPU;
    what calibration reads: each level's confidence and correctness)."""
    inputs.check(model)
    levels = model_levels(levels, model)
    out = []
    for _, _, array, dev in _prepared(model, inputs, batch_size, device):
        per_level = []
        for level in levels:
            with torch.inference_mode(), autocast_for(dev, "auto"), using_level(model, level):
                per_level.append(inputs.logits_array(model, array).cpu())
        out.append(torch.stack(per_level))
    return torch.cat(out, 1)


def probe_features(model: nn.Module, inputs, level: Level, batch_size: int = 256, device=None) -> Tensor:
    """The learned policy's features of every input at ``level`` ``[n, D]`` (float32, CPU)."""
    out = []
    for _, batch, array, dev in _prepared(model, inputs, batch_size, device):
        with torch.inference_mode(), autocast_for(dev, "auto"), using_level(model, level):
            out.append(inputs.probe_array(model, array, batch).float().cpu())
    return torch.cat(out)


def level_costs(model: nn.Module, inputs, levels: list[Level]) -> list[float]:
    """GFLOPs of one input run at each level alone (``CostModel.alone``)."""
    costs = cost_model(model, inputs, model_levels(levels, model))
    return [costs.alone(k) for k in range(len(levels))]


def run_policy(model: nn.Module, inputs, policy: Fixed | Cascade | Learned, batch_size: int = 256,
               device=None) -> dict:
    """Run every input of ``inputs`` (an adapter) under ``policy``.

    Returns ``logits`` ``[n, C]`` (each input's at the level it stopped
    at), ``level`` ``[n]`` (index into the policy's levels), ``latents``
    ``[n]``, ``gflops_per_input`` (mean, from ``costs``: a cascade's input
    pays the input array once and each level it tried; a learned policy's
    pays its probe and one level), ``costs`` (the ``CostModel``),
    ``level_gflops`` (each level alone) and ``seconds`` (the inputs'
    passes only). A cascade level whose threshold is above 1 is skipped.
    """
    inputs.check(model)
    levels = model_levels(policy.levels, model)
    learned = isinstance(policy, Learned)
    thresholds = getattr(policy, "thresholds", [])
    costs = cost_model(model, inputs, levels, policy.probe_level if learned else None)
    logits, level = None, torch.full((inputs.n,), len(levels) - 1, dtype=torch.long)
    t0 = time.perf_counter()
    for rows, batch, array, dev in _prepared(model, inputs, batch_size, device):
        with torch.inference_mode(), autocast_for(dev, "auto"):
            if learned:
                with using_level(model, policy.probe_level):
                    chosen = policy.choose(inputs.probe_array(model, array, batch))
                out = _run_chosen(model, inputs, array, levels, chosen)
            else:
                chosen, out = _run_cascade(model, inputs, array, levels, thresholds, getattr(policy, "confidence",
                                                                                             "max_softmax"))
        if logits is None:
            logits = torch.empty(inputs.n, out.shape[1])
        logits[rows], level[rows] = out, chosen
    seconds = time.perf_counter() - t0
    paid = costs.paid(thresholds, cumulative=not learned)
    return {"logits": logits, "level": level, "latents": torch.tensor([level_q(x) for x in levels])[level],
            "gflops_per_input": paid[level].mean().item(), "seconds": seconds, "levels": levels, "costs": costs,
            "level_gflops": [costs.alone(k) for k in range(len(levels))],
            **({"probe_gflops": costs.probe} if learned else {})}


def _run_cascade(model, inputs, array, levels, thresholds, kind) -> tuple[Tensor, Tensor]:
    """One prepared batch through a cascade: the level each input stops at and its logits."""
    b = array.tokens.shape[0] // getattr(inputs, "pairs_per_input", 1)
    level, out, open_ = torch.full((b,), len(levels) - 1, dtype=torch.long), None, torch.arange(b)
    # Each level runs on a subset of the previous level's array (not of the
    # batch's), so keys and values a level computed are there for the next.
    part, part_rows = array, torch.arange(b)
    for k, (setting, skip) in enumerate(zip(levels, skipped(thresholds))):
        if skip:  # no input could stop here: the level is not run
            continue
        if len(open_) < len(part_rows):
            part, part_rows = inputs.array_rows(part, torch.searchsorted(part_rows, open_)), open_
        with using_level(model, setting):
            x = inputs.logits_array(model, part).cpu()
        if out is None:
            out = torch.empty(b, x.shape[1])
        stop = (confidence(x, kind, inputs.multi_label) >= thresholds[k] if k < len(levels) - 1
                else torch.ones(len(open_), dtype=torch.bool))
        out[open_[stop]], level[open_[stop]] = x[stop], k
        open_ = open_[~stop]
        if len(open_) == 0:
            break
    return level, out


def _run_chosen(model, inputs, array, levels, chosen: Tensor) -> Tensor:
    """One prepared batch, each input at the level chosen for it, those of a level together."""
    out = None
    for k, setting in enumerate(levels):
        rows = torch.nonzero(chosen == k).flatten()
        if len(rows) == 0:
            continue
        part = array if len(rows) == len(chosen) else inputs.array_rows(array, rows)
        with using_level(model, setting):
            x = inputs.logits_array(model, part).cpu()
        if out is None:
            out = torch.empty(len(chosen), x.shape[1])
        out[rows] = x
    return out


def classifier_levels(model: nn.Module, data: ClassData, levels: list[Level], batch_size: int = 256,
                      device=None) -> Tensor:
    """``level_logits`` of clips: ``[L, n, C]``."""
    return level_logits(model, ClassInputs(data), levels, batch_size, device)


def run_classifier(model: nn.Module, data: ClassData, policy: Fixed | Cascade, batch_size: int = 256,
                   device=None) -> dict:
    """``run_policy`` over clips."""
    return run_policy(model, ClassInputs(data), policy, batch_size, device)

