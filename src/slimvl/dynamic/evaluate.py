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
from ..tasks.retrieval.data import RetrievalData
from .calibrate import calibrate
from .confidence import confidence
from .learned import Learned, fit_learned
from .policies import Cascade, Fixed, default_levels, is_full, level_keep, model_levels
from .retrieval import VTMInputs, candidate_lists
from .costs import cost_model
from .inputs import ClassInputs, QAInputs
from .run import level_logits, run_policy

POLICIES = ("fixed:Q", "cascade", "learned")


def parse_queries(spec: str, num_latents: int) -> Fixed | str:
    """``"fixed:Q"`` -> ``Fixed(Q)`` (checked against ``num_latents``);
    ``"fixed:Q/K"`` -> ``Fixed(Q, keep=K)`` (the first K cross-attentions);
    ``"cascade"`` and ``"learned"`` as they are (calibrated by the caller)."""
    kind, _, value = spec.partition(":")
    if kind in ("cascade", "learned") and not value:
        return kind
    if kind == "fixed":
        text, slash, k = value.partition("/")
        try:
            q, keep = int(text), (int(k) if slash else None)
        except ValueError:
            q = keep = None
        if q is None or not 1 <= q <= num_latents or (slash and (keep is None or keep < 1)):
            raise ValueError(f"--queries {spec!r}: fixed:Q needs a latent count Q in 1..{num_latents} "
                             "(fixed:Q/K also keeps the first K cross-attentions)")
        return Fixed(q, keep)
    raise ValueError(f"--queries {spec!r}: expected one of {list(POLICIES)}")


def evaluate_policy(model: nn.Module, inputs, spec: str, calibration: Callable[[], object] | None = None,
                    tolerance: float | None = None, budget_gflops: float | None = None,
                    levels: list[int] | None = None, kind: str = "max_softmax", batch_size: int = 256,
                    device: str | torch.device | None = None, guard: bool = False) -> dict:
    """The task's metrics of ``model`` on ``inputs`` (``ClassInputs``,
    ``QAInputs``) under the policy ``spec`` (``parse_queries``), next to the
    same model with all its latents.

    A cascade's thresholds are calibrated on ``calibration()`` (held-out
    inputs of the same kind, read only then) to ``tolerance`` or
    ``budget_gflops``, over ``levels`` (default: the counts the model was
    trained on, else N/8..N). A learned policy's head is trained on half of
    ``calibration()`` and its thresholds set on the other half
    (``fit_learned``); ``kind`` does not apply to it. ``guard``: the
    tolerance holds for the upper end of the drop's 95% interval on the
    calibration split (``calibrate``).
    """
    c = model.config
    policy = parse_queries(spec, c.num_latents)
    out: dict = {"policy": spec}
    if policy in ("cascade", "learned"):
        if calibration is None:
            raise ValueError(f"--queries {policy} needs a calibration split")
        levels = model_levels(levels or default_levels(c.num_latents, c.nested_latents), model)
        if not is_full(levels[-1], model):  # the tolerance is against the whole model
            raise ValueError(f"--levels {levels}: a calibrated policy's last level must be num_latents={c.num_latents} "
                             f"(with all {c.num_cross_layers} cross-attentions, when it chooses them): the "
                             "tolerance and the drop are measured against all latents")
        calib = calibration()
    if policy == "learned":
        policy, report = fit_learned(model, calib, levels, tolerance, budget_gflops, batch_size, device, guard=guard)
        out.update(levels=levels, thresholds=policy.thresholds, calibration=report)
    elif policy == "cascade":
        every = level_logits(model, calib, levels, batch_size, device)
        conf = torch.stack([confidence(x, kind, calib.multi_label) for x in every])
        right = torch.stack([calib.correct(x) for x in every])
        thresholds, report = calibrate(conf, right, cost_model(model, calib, levels), tolerance=tolerance,
                                       budget=budget_gflops, labels=calib.labels, guard=guard)
        policy = Cascade(levels, thresholds, kind)
        out.update(levels=levels, thresholds=thresholds, confidence=kind, calibration={"inputs": calib.n, **report})
    elif tolerance is not None or budget_gflops is not None:
        raise ValueError("--tolerance and --budget-gflops calibrate a policy: use them with --queries cascade "
                         "or learned")
    # A warm-up pass first (device transfer, kernel choice), then both runs
    # timed alike: the same model with all latents, measured in the same run.
    inputs.subset(torch.arange(min(inputs.n, batch_size))).logits(model, batch_size, device)
    # A calibrated policy's reference is its last level: all latents (and all
    # cross-attentions when its levels choose them); a fixed one's is the
    # model with all latents, as it is set.
    last = policy.levels[-1] if isinstance(policy, (Cascade, Learned)) else None
    reference = Fixed(c.num_latents, None if last is None else level_keep(last))
    full = run_policy(model, inputs, reference, batch_size, device)
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
    if "probe_gflops" in run:
        out["probe_gflops"] = run["probe_gflops"]
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


def evaluate_retrieval_policy(model: nn.Module, data: RetrievalData, spec: str,
                              calibration: Callable[[], RetrievalData] | None = None, candidates: int | None = None,
                              seed: int = 0, **options) -> dict:
    """``evaluate_policy`` over captions, each scored against its candidate
    list (``VTMInputs``): ``candidates`` items per caption from
    ``candidate_lists`` (drawn with ``seed``), the same number on the
    evaluated and the calibration split. When not given: every item of the
    split, or, for a calibrated policy, as many as the smaller of the two
    galleries holds (a confidence over 16 candidates says little about one
    over 8, and the cost per caption grows with them)."""
    k = candidates
    if k is None and calibration is not None and spec in ("cascade", "learned"):
        held = calibration()
        k = min(data.videos.shape[0], held.videos.shape[0])
        calibration = lambda: held  # noqa: E731 (read once)

    def inputs(d: RetrievalData) -> VTMInputs:
        return VTMInputs(d, None if k is None else candidate_lists(d, k, seed))

    calib = None if calibration is None else (lambda: inputs(calibration()))
    return evaluate_policy(model, inputs(data), spec, calib, **options)
