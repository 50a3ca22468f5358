"""Cascade thresholds calibrated on a held-out split: the cheapest cascade
within an accuracy tolerance of the full model, or the most accurate one
within a compute budget. Exact on the calibration split: the thresholds
returned meet the constraint there (the test split is where it is reported).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .costs import CostModel
from .policies import cascade_exits, paid_costs

NEVER = 1.5  # a threshold above every confidence (they lie in [0, 1]): the level is skipped


def paid(costs: list[float] | CostModel, thresholds: list[float], cumulative: bool = True,
         overhead: float = 0.0) -> Tensor:
    """What an input stopping at each level pays ``[L]`` (float64), plus
    ``overhead``. ``costs`` as a list (each level's run alone): in a cascade
    (``cumulative``) every level run up to it (``policies.paid_costs``);
    when the level is chosen up front (a learned policy), that level alone.
    As a ``CostModel``: its ``paid``, which counts the work shared between
    levels once (and a learned policy's probe)."""
    if isinstance(costs, CostModel):
        return costs.paid(thresholds, cumulative) + overhead
    base = paid_costs(costs, thresholds) if cumulative else torch.tensor(costs, dtype=torch.float64)
    return base + overhead


def cascade_outcome(confidences: Tensor, correct: Tensor, costs: list[float] | CostModel, thresholds: list[float],
                    cumulative: bool = True, overhead: float = 0.0) -> dict:
    """Accuracy, mean cost per input and the share stopping at each level of
    a cascade, from every level's confidence and correctness ``[L, n]``;
    ``costs[k]`` is what running level ``k`` costs (an input stopping at
    ``k`` pays ``paid(costs, thresholds, cumulative, overhead)[k]``)."""
    exits = cascade_exits(confidences, thresholds)
    correct = correct.detach().cpu()
    right = correct.gather(0, exits[None]).squeeze(0)
    cost = paid(costs, thresholds, cumulative, overhead)[exits].mean().item()
    return {"accuracy": right.double().mean().item(), "cost": cost,
            "drop_upper95": _drop_upper(correct[-1][None], right[None]).item(),
            "exit_fractions": torch.bincount(exits, minlength=confidences.shape[0]).double().div(len(exits)).tolist()}


def _drop_upper(reference: Tensor, chosen: Tensor, z: float = 1.96) -> Tensor:
    """Upper end ``[m]`` of the 95% interval of the accuracy drop, paired over
    the inputs: ``reference [1, n]`` and ``chosen [m, n]`` correctness."""
    d = reference.double() - chosen.double()
    n = d.shape[1]
    spread = d.std(1, unbiased=True) / n ** 0.5 if n > 1 else torch.zeros(len(d), dtype=torch.float64)
    return d.mean(1) + z * spread


def _outcomes(confidences: Tensor, correct: Tensor, costs: list[float] | CostModel, grid: Tensor, cumulative: bool,
              overhead: float) -> tuple[Tensor, Tensor, Tensor]:
    """Accuracy, mean cost and the drop's upper 95% bound ``[m]`` of the
    cascades with one shared threshold per entry of ``grid [m]``."""
    n_levels, n = confidences.shape
    stop = confidences[None, :-1] >= grid[:, None, None]  # [m, L-1, n]
    stop = torch.cat([stop, torch.ones(len(grid), 1, n, dtype=torch.bool)], 1)
    exits = stop.float().argmax(1)  # [m, n]: the first level that stops each input
    chosen = correct[exits, torch.arange(n)[None]]
    spent = torch.stack([paid(costs, [float(t)] * (n_levels - 1), cumulative, overhead) for t in grid])  # [m, L]
    return chosen.double().mean(1), spent.gather(1, exits).mean(1), _drop_upper(correct[-1][None], chosen)


def calibrate(confidences: Tensor, correct: Tensor, costs: list[float] | CostModel, tolerance: float | None = None,
              budget: float | None = None, labels: Tensor | None = None, grid_size: int = 256,
              passes: int = 2, cumulative: bool = True, overhead: float = 0.0,
              guard: bool = False) -> tuple[list[float], dict]:
    """Thresholds for a cascade over ``L`` levels, from every level's
    confidence and correctness on a calibration split (``[L, n]`` each).

    Exactly one of:
        tolerance: in (0, 1); the cheapest cascade whose accuracy is at least
            the last level's minus ``tolerance``.
        budget: the most accurate cascade whose mean cost per input is at
            most ``budget`` (in the units of ``costs``, e.g. GFLOPs); below
            the cheapest level's cost it is an error.
    ``labels`` (optional) are checked to hold at least two classes: a split
    of one class calibrates nothing. Returns the thresholds and the outcome
    on the calibration split (``cascade_outcome``, plus the reference
    accuracy of the last level and ``last_level_cost``: an input that goes
    through every level pays them all, so a cascade can cost more than the
    last level alone, and the report lets the caller see it).

    A threshold of ``NEVER`` skips its level (it is neither run nor paid
    for), so sending every input to the last level costs the last level
    alone. The search is local, not exhaustive: it starts from the best
    threshold shared by all levels (over a grid of the confidences'
    quantiles, plus ``NEVER``), then moves one level's threshold at a time
    while that improves the objective and keeps the constraint.

    ``guard=True`` holds a tolerance to the upper end of the drop's 95%
    interval (paired over the calibration inputs) instead of its mean: a
    cascade tuned to the edge of a small split tends to lose more on new
    inputs than it did there.

    ``costs`` is each level's cost alone, or a ``CostModel`` (work shared
    between levels counted once: what ``run_policy`` does).
    ``cumulative=False`` calibrates a policy that picks one level per input
    up front from predicted "confidences" (``Learned``): an input pays its
    level (and, with a ``CostModel``, the probe; with a list, ``overhead``).
    """
    if (tolerance is None) == (budget is None):
        raise ValueError("calibrate: give exactly one of tolerance= and budget=")
    n_costs = len(costs.levels) if isinstance(costs, CostModel) else len(costs)
    if confidences.dim() != 2 or confidences.shape != correct.shape or confidences.shape[0] != n_costs:
        raise ValueError(f"confidences {tuple(confidences.shape)} and correct {tuple(correct.shape)}: expected "
                         f"the same [L, n] with L={n_costs} levels (one cost each)")
    n_levels, n = confidences.shape
    if n == 0:
        raise ValueError("calibrate: the calibration split is empty")
    if labels is not None and len(torch.unique(labels.detach().cpu(), dim=0)) < 2:
        raise ValueError("calibrate: the calibration split has one class only; its confidences say nothing "
                         "about mistakes")
    if tolerance is not None and not (isinstance(tolerance, (int, float)) and 0 < tolerance < 1):
        raise ValueError(f"tolerance={tolerance!r}: must be in (0, 1), an accuracy drop such as 0.01")
    # The cheapest policy sends every input to one level, skipping those before it.
    cheapest = min(float(paid(costs, [NEVER] * k + [0.0] * (n_costs - 1 - k), cumulative, overhead)[k])
                   for k in range(n_costs))
    if budget is not None and not (isinstance(budget, (int, float)) and budget >= cheapest):
        raise ValueError(f"budget={budget!r}: below the cheapest level's cost {cheapest:.6g} per input "
                         "(every input pays at least the first level)")
    confidences, correct = confidences.detach().float().cpu(), correct.detach().bool().cpu()
    reference = correct[-1].double().mean().item()

    def better(acc: float, cost: float, best: tuple[float, float] | None, upper: float) -> bool:
        if tolerance is not None:
            drop = upper if guard else reference - acc
            return drop <= tolerance + 1e-12 and (best is None or cost < best[1] - 1e-12)
        return cost <= budget + 1e-12 and (best is None or acc > best[0] + 1e-12
                                           or (abs(acc - best[0]) <= 1e-12 and cost < best[1] - 1e-12))

    def quantiles(x: Tensor) -> Tensor:
        q = torch.quantile(x.flatten(), torch.linspace(0, 1, grid_size))
        return torch.cat([torch.unique(q), torch.tensor([NEVER])])

    last = costs.alone(n_costs - 1) if isinstance(costs, CostModel) else float(costs[-1])
    report = {"reference_accuracy": reference, "last_level_cost": last}
    how = {"cumulative": cumulative, "overhead": overhead}
    if n_levels == 1:
        return [], {**cascade_outcome(confidences, correct, costs, [], **how), **report}
    grid = quantiles(confidences[:-1])
    acc, cost, upper = _outcomes(confidences, correct, costs, grid, **how)
    best, thresholds = None, [NEVER] * (n_levels - 1)  # NEVER everywhere: the last level alone
    for t, a, c, u in zip(grid.tolist(), acc.tolist(), cost.tolist(), upper.tolist()):
        if better(a, c, best, u):
            best, thresholds = (a, c), [t] * (n_levels - 1)
    # The grid holds NEVER (the last level alone: within any tolerance) and the
    # smallest confidence (everything stops at level 0: within any budget the
    # check above allows when level 0 is the cheapest, as levels should be
    # ordered), so some shared threshold qualifies; the search below may
    # still find one when it does not.
    for _ in range(passes):
        for k in range(n_levels - 1):
            for t in quantiles(confidences[k]).tolist():
                trial = thresholds[:k] + [t] + thresholds[k + 1:]
                out = cascade_outcome(confidences, correct, costs, trial, **how)
                if better(out["accuracy"], out["cost"], best, out["drop_upper95"]):
                    best, thresholds = (out["accuracy"], out["cost"]), trial
    if best is None:
        raise ValueError(f"budget={budget!r}: no cascade over these levels found within it; order the levels "
                         "cheapest first")
    return thresholds, {**cascade_outcome(confidences, correct, costs, thresholds, **how), **report}
