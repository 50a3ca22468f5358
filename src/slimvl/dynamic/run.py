"""Running a policy: inputs grouped by the latent count they run at."""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import replace

import torch
from torch import Tensor, nn

from ..tasks.classify import ClassData, check_classifier, predict_logits
from .confidence import confidence
from .policies import Cascade, Fixed, check_levels


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


def classifier_levels(model: nn.Module, data: ClassData, levels: list[int], batch_size: int = 256,
                      device: str | torch.device | None = None) -> Tensor:
    """Every clip's logits at every latent count: ``[L, n, C]`` (what
    calibration reads: each level's confidence and correctness)."""
    check_levels(levels, model.config.num_latents)
    out = []
    for q in levels:
        with model.using_latents(q):
            out.append(predict_logits(model, data, batch_size, device))
    return torch.stack(out)


def level_costs(model: nn.Module, levels: list[int], frames: int) -> list[float]:
    """GFLOPs of one clip at each latent count (the model's formula, which
    the tests hold to torch's counter)."""
    costs = []
    for q in levels:
        with model.using_latents(q):
            costs.append(model.analytic_flops(frames) / 1e9)
    return costs


def run_classifier(model: nn.Module, data: ClassData, policy: Fixed | Cascade, batch_size: int = 256,
                   device: str | torch.device | None = None) -> dict:
    """Classify every clip of ``data`` under ``policy``.

    Returns ``logits`` ``[n, C]`` (each clip's at the level it stopped at),
    ``level`` ``[n]`` (index into the policy's levels), ``latents`` ``[n]``,
    ``gflops_per_clip`` (mean: a cascade's clip pays every level it tried)
    and ``seconds``. A cascade runs each level on the clips still open, in
    batches, and each level runs the model again: latents attend to each
    other, so the work of Q latents is not part of the work of 2Q.
    """
    check_classifier(model, data)
    levels = check_levels(policy.levels, model.config.num_latents)
    costs = level_costs(model, levels, data.videos.shape[1])
    t0 = time.perf_counter()
    n = data.n
    logits = torch.empty(n, len(data.classes))
    level = torch.full((n,), len(levels) - 1, dtype=torch.long)
    open_ = torch.arange(n)
    for k, q in enumerate(levels):
        part = replace(data, videos=data.videos[open_], labels=data.labels[open_],
                       heldout=None if data.heldout is None else [data.heldout[i] for i in open_.tolist()])
        with model.using_latents(q):
            out = predict_logits(model, part, batch_size, device)
        if k < len(levels) - 1:
            stop = confidence(out, policy.confidence, data.multi_label) >= policy.thresholds[k]
        else:
            stop = torch.ones(len(open_), dtype=torch.bool)
        logits[open_[stop]] = out[stop]
        level[open_[stop]] = k
        open_ = open_[~stop]
        if len(open_) == 0:
            break
    paid = torch.tensor(costs, dtype=torch.float64).cumsum(0)
    return {"logits": logits, "level": level, "latents": torch.tensor(levels)[level],
            "gflops_per_clip": paid[level].mean().item(), "seconds": time.perf_counter() - t0,
            "levels": levels, "level_gflops": costs}
