"""A model evaluated under a latent policy, against the same model with all
its latents in the same run: the task's metrics, the accuracy drop with a
paired 95% interval, GFLOPs and milliseconds per input, and where the
inputs stopped."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..bench.stats import paired_difference
from ..tasks.classify import ClassData
from ..tasks.qa import QAData
from .calibrate import calibrate
from .confidence import confidence
from .policies import Cascade, Fixed, check_levels, default_levels
from .run import ClassInputs, QAInputs, level_costs, level_logits, run_policy

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


def evaluate_policy(model: nn.Module, inputs, spec: str, calibration: Callable[[], object] | None = None,
                    tolerance: float | None = None, budget_gflops: float | None = None,
                    levels: list[int] | None = None, kind: str = "max_softmax", batch_size: int = 256,
                    device: str | torch.device | None = None) -> dict:
    """The task's metrics of ``model`` on ``inputs`` (``ClassInputs``,
    ``QAInputs``) under the policy ``spec`` (``parse_queries``), next to the
    same model with all its latents.

    A cascade's thresholds are calibrated on ``calibration()`` (held-out
    inputs of the same kind, read only then) to ``tolerance`` or
    ``budget_gflops``, over ``levels`` (default: the counts the model was
    trained on, else N/8..N).
    """
    c = model.config
    policy = parse_queries(spec, c.num_latents)
    out: dict = {"policy": spec}
    if policy == "cascade":
        if calibration is None:
            raise ValueError("--queries cascade needs a calibration split")
        levels = check_levels(levels or default_levels(c.num_latents, c.nested_latents), c.num_latents)
        if levels[-1] != c.num_latents:  # the tolerance is against the model with all its latents
            raise ValueError(f"--levels {levels}: a cascade's last level must be num_latents={c.num_latents} "
                             "(the tolerance and the drop are measured against all latents)")
        calib = calibration()
        every = level_logits(model, calib, levels, batch_size, device)
        conf = torch.stack([confidence(x, kind, calib.multi_label) for x in every])
        right = torch.stack([calib.correct(x) for x in every])
        thresholds, report = calibrate(conf, right, level_costs(model, calib, levels), tolerance=tolerance,
                                       budget=budget_gflops, labels=calib.labels)
        policy = Cascade(levels, thresholds, kind)
        out.update(levels=levels, thresholds=thresholds, confidence=kind, calibration={"inputs": calib.n, **report})
    elif tolerance is not None or budget_gflops is not None:
        raise ValueError("--tolerance and --budget-gflops calibrate a cascade: use them with --queries cascade")
    # A warm-up pass first (device transfer, kernel choice), then both runs
    # timed alike: the same model with all latents, measured in the same run.
    inputs.subset(torch.arange(min(inputs.n, batch_size))).logits(model, batch_size, device)
    full = run_policy(model, inputs, Fixed(c.num_latents), batch_size, device)
    run = run_policy(model, inputs, policy, batch_size, device)
    seconds = run["seconds"]
    drop, ci = paired_difference(inputs.correct(run["logits"]).double(), inputs.correct(full["logits"]).double())
    out.update(inputs.metrics(run["logits"]))
    out.update(accuracy_all_latents=inputs.correct(full["logits"]).double().mean().item(), accuracy_drop=drop,
               accuracy_drop_ci95=[drop - ci, drop + ci], gflops_per_input=run["gflops_per_input"],
               gflops_all_latents=full["gflops_per_input"],
               gflops_ratio=run["gflops_per_input"] / full["gflops_per_input"],
               ms_per_input=1e3 * seconds / inputs.n, ms_per_input_all_latents=1e3 * full["seconds"] / inputs.n,
               latency_ratio=seconds / full["seconds"], mean_latents=run["latents"].double().mean().item(),
               exit_fractions=torch.bincount(run["level"], minlength=len(policy.levels)).double()
               .div(inputs.n).tolist())
    return out


def evaluate_classifier_policy(model: nn.Module, data: ClassData, spec: str,
                               calibration: Callable[[], ClassData] | None = None, **options) -> dict:
    """``evaluate_policy`` over clips (``calibration()`` gives held-out clips)."""
    calib = None if calibration is None else (lambda: ClassInputs(calibration()))
    return evaluate_policy(model, ClassInputs(data), spec, calib, **options)


def evaluate_qa_policy(model: nn.Module, data: QAData, spec: str, calibration: Callable[[], QAData] | None = None,
                       **options) -> dict:
    """``evaluate_policy`` over questions (``calibration()`` gives held-out questions)."""
    calib = None if calibration is None else (lambda: QAInputs(calibration()))
    return evaluate_policy(model, QAInputs(data), spec, calib, **options)
