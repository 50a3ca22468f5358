"""A classifier evaluated under a latent policy, against the same model at
every latent in the same run: accuracy (the drop with a paired 95%
interval), GFLOPs and seconds per clip, and where the clips stopped."""
from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn

from ..bench.stats import paired_difference
from ..tasks.classify import ClassData, class_metrics, correct
from .calibrate import calibrate
from .confidence import confidence
from .policies import Cascade, Fixed, check_levels, default_levels
from .run import classifier_levels, level_costs, run_classifier

POLICIES = ("fixed:Q", "cascade")


def parse_queries(spec: str, num_latents: int) -> Fixed | str:
    """``"fixed:Q"`` -> ``Fixed(Q)`` (checked against ``num_latents``);
    ``"cascade"`` -> ``"cascade"`` (calibrated by the caller)."""
    kind, _, value = spec.partition(":")
    if kind == "cascade" and not value:
        return "cascade"
    if kind == "fixed":
        try:
            q = int(value)
        except ValueError:
            q = None
        if q is None or not 1 <= q <= num_latents:
            raise ValueError(f"--queries {spec!r}: fixed:Q needs a latent count Q in 1..{num_latents}")
        return Fixed(q)
    raise ValueError(f"--queries {spec!r}: expected one of {list(POLICIES)}")


def evaluate_classifier_policy(model: nn.Module, data: ClassData, spec: str,
                               calibration: Callable[[], ClassData] | None = None, tolerance: float | None = None,
                               budget_gflops: float | None = None, levels: list[int] | None = None,
                               kind: str = "max_softmax", batch_size: int = 256,
                               device: str | torch.device | None = None) -> dict:
    """``class_metrics`` of ``model`` on ``data`` under the policy ``spec``
    (``parse_queries``), next to the same model with all its latents.

    A cascade's thresholds are calibrated on ``calibration()`` (a held-out
    split, read only then) to ``tolerance`` or ``budget_gflops``, over
    ``levels`` (default: the counts the model was trained on, else N/8..N).
    """
    c = model.config
    policy = parse_queries(spec, c.num_latents)
    out: dict = {"policy": spec}
    if policy == "cascade":
        if calibration is None:
            raise ValueError("--queries cascade needs a calibration split")
        levels = check_levels(levels or default_levels(c.num_latents, c.nested_latents), c.num_latents)
        calib = calibration()
        every = classifier_levels(model, calib, levels, batch_size, device)
        conf = torch.stack([confidence(x, kind, calib.multi_label) for x in every])
        right = torch.stack([correct(x, calib.labels) for x in every])
        thresholds, report = calibrate(conf, right, level_costs(model, levels, calib.videos.shape[1]),
                                       tolerance=tolerance, budget=budget_gflops, labels=calib.labels)
        policy = Cascade(levels, thresholds, kind)
        out.update(levels=levels, thresholds=thresholds, confidence=kind,
                   calibration={"split_clips": calib.n, **report})
    elif tolerance is not None or budget_gflops is not None:
        raise ValueError("--tolerance and --budget-gflops calibrate a cascade: use them with --queries cascade")
    with model.using_latents(None):  # the same model at every latent, measured in the same run
        full = run_classifier(model, data, Fixed(c.num_latents), batch_size, device)
    t0 = time.perf_counter()
    run = run_classifier(model, data, policy, batch_size, device)
    seconds = time.perf_counter() - t0
    drop, ci = paired_difference(correct(run["logits"], data.labels).double(),
                                 correct(full["logits"], data.labels).double())
    out.update(class_metrics(run["logits"], data))
    out.update(accuracy_all_latents=class_metrics(full["logits"], data)["accuracy"], accuracy_drop=drop,
               accuracy_drop_ci95=[drop - ci, drop + ci], gflops_per_clip=run["gflops_per_clip"],
               gflops_all_latents=full["gflops_per_clip"],
               gflops_ratio=run["gflops_per_clip"] / full["gflops_per_clip"],
               ms_per_clip=1e3 * seconds / data.n, ms_per_clip_all_latents=1e3 * full["seconds"] / data.n,
               latency_ratio=seconds / full["seconds"], mean_latents=run["latents"].double().mean().item(),
               exit_fractions=torch.bincount(run["level"], minlength=len(policy.levels)).double()
               .div(data.n).tolist())
    return out
