"""Running a policy: inputs grouped by the latent count they run at.

A task takes part through a small adapter (``ClassInputs``, ``QAInputs``):
how many inputs it has, a subset of them, the model's logits over them,
which predictions are right, what one input costs at the model's current
latent count, and the cheap features a learned policy reads
(``model.probe``) with their cost.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from ..bench.flops import count_flops, dummy_batch, dummy_inputs
from ..runtime import autocast_for
from ..tasks.base import for_inference, row_batches, used_width
from ..tasks.classify import ClassData, check_classifier, class_batch, class_metrics, correct, predict_logits
from ..tasks.qa import QAData, answer_logits, qa_batch, qa_metrics
from .confidence import confidence
from .learned import Learned
from .policies import Cascade, Fixed, Level, level_q, model_levels, paid_costs, skipped, using_level


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


@dataclass
class ClassInputs:
    """Clips to classify (``ClassData``) as a policy sees them."""

    data: ClassData

    @property
    def n(self) -> int:
        return self.data.n

    @property
    def multi_label(self) -> bool:
        return self.data.multi_label

    @property
    def labels(self) -> Tensor:
        return self.data.labels

    def check(self, model: nn.Module) -> None:
        check_classifier(model, self.data)

    def subset(self, rows: Tensor) -> "ClassInputs":
        d = self.data
        return ClassInputs(replace(d, videos=d.videos[rows], labels=d.labels[rows],
                                   heldout=None if d.heldout is None else [d.heldout[i] for i in rows.tolist()]))

    def logits(self, model: nn.Module, batch_size: int, device) -> Tensor:
        return predict_logits(model, self.data, batch_size, device)

    def correct(self, logits: Tensor) -> Tensor:
        return correct(logits, self.data.labels)

    def metrics(self, logits: Tensor) -> dict:
        return class_metrics(logits, self.data)

    def gflops(self, model: nn.Module) -> float:
        """One clip at the model's current latent count (its FLOP formula)."""
        return model.analytic_flops(self.data.videos.shape[1]) / 1e9

    @torch.inference_mode()
    def features(self, model: nn.Module, batch_size: int, device) -> Tensor:
        """``model.probe`` of every clip ``[n, D]`` (float32, CPU)."""
        dev = for_inference(model, device)
        out = []
        for rows in row_batches(self.n, batch_size):
            with autocast_for(dev, "auto"):
                out.append(model.probe(class_batch(self.data, rows, dev).inputs).float().cpu())
        return torch.cat(out)

    @torch.inference_mode()
    def probe_gflops(self, model: nn.Module) -> float:
        """``model.probe`` of one clip at the current latent count (torch's counter)."""
        inputs = dummy_batch(model, self.data.videos.shape[1], 0, 2)
        return count_flops(lambda: model.probe(inputs), model) / 2 / 1e9


@dataclass
class QAInputs:
    """Questions (``QAData``) as a policy sees them; confidence is the
    answer softmax's (its top-1/top-2 margin with ``confidence="margin"``)."""

    data: QAData
    multi_label = False

    @property
    def n(self) -> int:
        return self.data.n_questions

    @property
    def labels(self) -> Tensor:
        return self.data.answer

    def check(self, model: nn.Module) -> None:
        if "answer" not in model.capabilities:
            raise ValueError(f"a {model.config.model_type} without a QA head cannot answer (num_answers=0)")

    def subset(self, rows: Tensor) -> "QAInputs":
        d, keep = self.data, rows.tolist()
        return QAInputs(replace(d, question_ids=d.question_ids[rows], question_mask=d.question_mask[rows],
                                question_item=d.question_item[rows], answer=d.answer[rows],
                                answer_text=[d.answer_text[i] for i in keep],
                                question_type=[d.question_type[i] for i in keep],
                                heldout=None if d.heldout is None else [d.heldout[i] for i in keep]))

    def logits(self, model: nn.Module, batch_size: int, device) -> Tensor:
        return answer_logits(model, self.data, batch_size, device)

    def correct(self, logits: Tensor) -> Tensor:
        return (logits.argmax(-1) == self.data.answer) & (self.data.answer >= 0)

    def metrics(self, logits: Tensor) -> dict:
        return qa_metrics(logits.argmax(-1), self.data)

    @torch.inference_mode()
    def gflops(self, model: nn.Module) -> float:
        """One question at the model's current latent count (torch's counter),
        at the longest question's length: what a batch is trimmed to at most."""
        width = used_width(self.data.question_mask)
        video, ids, mask = dummy_inputs(model, self.data.videos.shape[1], width, 2)
        return count_flops(lambda: model.answer(video, ids, mask), model) / 2 / 1e9

    @torch.inference_mode()
    def features(self, model: nn.Module, batch_size: int, device) -> Tensor:
        """``model.probe`` of every (video, question) ``[n, D]`` (float32, CPU)."""
        dev = for_inference(model, device)
        out = []
        for rows in row_batches(self.n, batch_size):
            with autocast_for(dev, "auto"):
                out.append(model.probe(qa_batch(self.data, rows, dev).inputs).float().cpu())
        return torch.cat(out)

    @torch.inference_mode()
    def probe_gflops(self, model: nn.Module) -> float:
        """``model.probe`` of one question at the current latent count (torch's counter)."""
        video, ids, mask = dummy_inputs(model, self.data.videos.shape[1], used_width(self.data.question_mask), 2)
        return count_flops(lambda: model.probe(video, ids, mask), model) / 2 / 1e9


def level_logits(model: nn.Module, inputs, levels: list[Level], batch_size: int = 256, device=None) -> Tensor:
    """Every input's logits at every level: ``[L, n, C]`` (what calibration
    reads: each level's confidence and correctness)."""
    out = []
    for level in model_levels(levels, model):
        with using_level(model, level):
            out.append(inputs.logits(model, batch_size, device))
    return torch.stack(out)


def level_costs(model: nn.Module, inputs, levels: list[Level]) -> list[float]:
    """GFLOPs of one input at each level, in eval mode (a training model
    would skip cross-attentions at random under LayerDrop)."""
    was_training, costs = model.training, []
    model.eval()
    try:
        for level in levels:
            with using_level(model, level):
                costs.append(inputs.gflops(model))
    finally:
        model.train(was_training)
    return costs


def probe_gflops(model: nn.Module, inputs, level: Level) -> float:
    """GFLOPs of ``model.probe`` of one input at ``level``, in eval mode."""
    was_training = model.training
    model.eval()
    try:
        with using_level(model, level):
            return inputs.probe_gflops(model)
    finally:
        model.train(was_training)


def run_learned(model: nn.Module, inputs, policy: Learned, batch_size: int = 256, device=None) -> dict:
    """``run_policy`` for a ``Learned`` policy: every input probed, then run
    once at the level the head chose, the inputs of one level in batches."""
    inputs.check(model)
    levels = model_levels(policy.levels, model)
    costs = level_costs(model, inputs, levels)
    probe = probe_gflops(model, inputs, policy.probe_level)
    t0 = time.perf_counter()
    with using_level(model, policy.probe_level):
        level = policy.choose(inputs.features(model, batch_size, device))
    logits = None
    for k, setting in enumerate(levels):
        rows = torch.nonzero(level == k).flatten()
        if len(rows) == 0:
            continue
        with using_level(model, setting):
            out = (inputs if len(rows) == inputs.n else inputs.subset(rows)).logits(model, batch_size, device)
        if logits is None:
            logits = torch.empty(inputs.n, out.shape[1])
        logits[rows] = out
    spent = torch.tensor(costs, dtype=torch.float64)[level] + probe
    return {"logits": logits, "level": level, "latents": torch.tensor([level_q(x) for x in levels])[level],
            "gflops_per_input": spent.mean().item(), "seconds": time.perf_counter() - t0, "levels": levels,
            "level_gflops": costs, "probe_gflops": probe}


def run_policy(model: nn.Module, inputs, policy: Fixed | Cascade | Learned, batch_size: int = 256,
               device=None) -> dict:
    """Run every input of ``inputs`` (``ClassInputs``, ``QAInputs``) under ``policy``.

    Returns ``logits`` ``[n, C]`` (each input's at the level it stopped
    at), ``level`` ``[n]`` (index into the policy's levels), ``latents``
    ``[n]``, ``gflops_per_input`` (mean: a cascade's input pays every level
    it tried) and ``seconds`` (the inputs' passes only). A cascade runs each
    level on the inputs still open, in batches (each batch of one latent
    count), and each level runs the model again: latents attend to each
    other, so the work of Q latents is not part of the work of 2Q. A level
    whose threshold is above 1 is skipped. A ``Learned`` policy runs each
    input once (``run_learned``).
    """
    if isinstance(policy, Learned):
        return run_learned(model, inputs, policy, batch_size, device)
    inputs.check(model)
    levels = model_levels(policy.levels, model)
    thresholds = getattr(policy, "thresholds", [])
    costs = level_costs(model, inputs, levels)
    t0 = time.perf_counter()
    logits, level, open_ = None, torch.full((inputs.n,), len(levels) - 1, dtype=torch.long), torch.arange(inputs.n)
    for k, (setting, skip) in enumerate(zip(levels, skipped(thresholds))):
        if skip:  # no input could stop here: the level is not run
            continue
        part = inputs if len(open_) == inputs.n else inputs.subset(open_)
        with using_level(model, setting):
            out = part.logits(model, batch_size, device)
        if logits is None:
            logits = torch.empty(inputs.n, out.shape[1])
        if k < len(levels) - 1:
            stop = confidence(out, policy.confidence, inputs.multi_label) >= thresholds[k]
        else:
            stop = torch.ones(len(open_), dtype=torch.bool)
        logits[open_[stop]] = out[stop]
        level[open_[stop]] = k
        open_ = open_[~stop]
        if len(open_) == 0:
            break
    return {"logits": logits, "level": level, "latents": torch.tensor([level_q(x) for x in levels])[level],
            "gflops_per_input": paid_costs(costs, thresholds)[level].mean().item(),
            "seconds": time.perf_counter() - t0, "levels": levels, "level_gflops": costs}


def classifier_levels(model: nn.Module, data: ClassData, levels: list[Level], batch_size: int = 256,
                      device=None) -> Tensor:
    """``level_logits`` of clips: ``[L, n, C]``."""
    return level_logits(model, ClassInputs(data), levels, batch_size, device)


def run_classifier(model: nn.Module, data: ClassData, policy: Fixed | Cascade, batch_size: int = 256,
                   device=None) -> dict:
    """``run_policy`` over clips."""
    return run_policy(model, ClassInputs(data), policy, batch_size, device)
