"""What the training loop needs from a task, and several tasks trained as one.

A task owns its data and answers four questions for ``slimvl.train.train``:
which examples make step ``s`` (a pure function of ``(seed, s)``, so that a
resumed run and every data-parallel rank see the same global batch), what
the loss over them is (an ``nn.Module``, so that DDP sees one forward), how
to evaluate a model on held-out data of the same kind, and what to store in
checkpoints besides the weights (an answer vocabulary, say).
"""
from __future__ import annotations

import copy
import logging
from dataclasses import replace
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from ..runtime import media_on, media_tensors

log = logging.getLogger("slimvl")


class NonFiniteScores(ValueError):
    """A model gave NaN or infinite scores: its weights or inputs are broken."""


def check_scores(scores: torch.Tensor, what: str = "scores") -> None:
    """Raise ``NonFiniteScores`` saying how many of ``scores`` are NaN or infinite."""
    bad = int((~torch.isfinite(scores)).sum())
    if bad:
        raise NonFiniteScores(f"{bad} of {scores.numel()} {what} are not finite (NaN or inf): the model's weights "
                              "or inputs are broken, so no ranking can be trusted")


def log_fitting(dataset, n_texts: int, truncated: int, max_len: int, what: str) -> None:
    """One log line per split saying how many texts were cut to ``max_len``
    tokens and how many videos were padded by repeating their last frame
    (nothing is logged when neither happened)."""
    padded = getattr(dataset, "padded", 0)
    parts = []
    if truncated:
        parts.append(f"{truncated} of {n_texts} {what} cut to {max_len} tokens")
    if padded:
        parts.append(f"{padded} of {len(dataset)} videos had fewer than {dataset.frames} frames (last frame "
                     "repeated)")
    if parts:
        log.info("%s/%s: %s", dataset.root, dataset.split, "; ".join(parts))


def used_width(mask: Tensor, bucket: bool = False) -> int:
    """Columns of a ``[B, L]`` padding mask that any row uses: a batch is
    trimmed to them (masked keys do not change the result, they only cost
    time). ``bucket`` rounds up to a power of two (at least 8, at most
    ``L``), so that a compiled model sees a handful of text shapes and
    reuses its graphs instead of meeting a new width at every batch."""
    width = int(mask.any(0).nonzero().max()) + 1
    if bucket:
        width = min(mask.shape[1], max(8, 1 << (width - 1).bit_length()))
    return width


def for_inference(model: nn.Module, device: str | torch.device | None) -> torch.device:
    """Put ``model`` in eval mode on ``device`` (None: where it is) and
    return that device: the start of every evaluation loop."""
    from ..runtime import device_for

    dev = device_for(model, device)
    model.to(dev).eval()
    return dev


def row_batches(n: int, batch_size: int) -> Iterator[Tensor]:
    """Row indices ``0..n-1`` in consecutive batches of ``batch_size``."""
    for start in range(0, n, batch_size):
        yield torch.arange(start, min(start + batch_size, n))


def heldout_split(flags) -> list[tuple[str, Tensor]]:
    """``[("seen", rows), ("heldout", rows)]`` for per-example held-out flags
    (a synthetic scene with a held-out combination), keeping the non-empty
    ones: every metric reports both parts the same way."""
    held = torch.as_tensor(flags, dtype=torch.bool)
    return [(name, rows) for name, rows in (("seen", ~held), ("heldout", held)) if rows.any()]


class InputsBatch:
    """A step's batch whose model inputs are one inputs mapping
    (``inputs``: modality tensors by name, ``slimvl.nn.modalities``), of any
    modalities; the task's own fields (answers, masked positions,
    negatives) sit beside it. ``video``, ``ids`` and ``mask`` read a
    video-text mapping's tensors."""

    inputs: dict[str, Tensor]

    @property
    def size(self) -> int:
        """Rows in the batch (its tensors' first dimension)."""
        return next(iter(self.inputs.values())).shape[0]

    @property
    def device(self) -> torch.device:
        return next(iter(self.inputs.values())).device

    @property
    def video(self) -> Tensor:
        return self.inputs["video"]

    @property
    def ids(self) -> Tensor:
        return self.inputs["text"]

    @property
    def mask(self) -> Tensor:
        return self.inputs["text_mask"]


class Task:
    """Base class of training tasks (retrieval, QA, MLM, several at once).

    Subclasses set ``data`` and implement ``objective``, ``batch`` and
    ``samples``; ``evaluate`` is needed for ``TrainConfig.eval_every``.
    """

    name = "task"
    headline = "loss"  # the evaluation metric shown on the progress bar
    data: Any = None

    def check(self, cfg, world: int) -> None:
        """Raise ``ValueError`` when ``cfg`` cannot run on ``world`` processes."""

    def objective(self, model: nn.Module, cfg) -> nn.Module:
        """A module whose ``forward(batch)`` returns ``(loss, {part: value})``:
        the parts (a term of the loss, an accuracy) as detached 0-d tensors
        (or floats), read by the training loop only on logging steps, so that
        a step never waits for the device to report a number."""
        raise NotImplementedError

    def batch(self, cfg, step: int, rank: int, world: int, device: torch.device) -> Any:
        """This rank's share of step ``step``'s global batch, on ``device``."""
        raise NotImplementedError

    def samples(self, batch: Any) -> int:
        """Examples in this rank's share of a batch (for the throughput log)."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, data: Any, device: torch.device) -> dict[str, float]:
        """Metrics of ``model`` on held-out ``data`` of this task's kind."""
        raise NotImplementedError(f"task {self.name!r} has no evaluation")

    def meta(self) -> dict:
        """JSON data stored in every checkpoint (e.g. an answer vocabulary)."""
        return {}

    def media(self) -> list[Tensor]:
        """The decoded media tensors batches gather from (videos, audio)."""
        return list(media_tensors(self.data).values())

    def with_media_on(self, device: torch.device, memo: dict | None = None) -> "Task":
        """A copy of this task whose data's decoded media live on ``device``
        (``slimvl.runtime.media_on``; ``memo`` shares one copy between tasks
        over the same data). This task is left as it is."""
        out = copy.copy(self)
        out.data = media_on(self.data, device, memo)
        return out

    @property
    def skipped(self) -> list[str]:
        """Media files left out as unreadable, for the run's log."""
        return list(getattr(self.data, "skipped", []) or [])

    @property
    def tokenizer(self):
        """The tokenizer of the data's token ids (kept with checkpoints), or None."""
        return getattr(self.data, "tokenizer", None)

    @property
    def fingerprint(self):
        """The fingerprint of the dataset trained on (checked on resume), or None."""
        return getattr(self.data, "fingerprint", None)


class _WeightedSum(nn.Module):
    def __init__(self, objectives: dict[str, nn.Module], weights: dict[str, float]):
        super().__init__()
        self.objectives = nn.ModuleDict(objectives)
        self.weights = weights

    def forward(self, batches: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        total, parts = 0.0, {}
        for name, objective in self.objectives.items():
            loss, sub = objective(batches[name])
            total = total + self.weights[name] * loss
            parts[name] = loss.detach()
            parts.update({f"{name}/{k}": v for k, v in sub.items()})
        return total, parts


class MultiTask(Task):
    """Several tasks trained together: every step takes one batch of each
    and the loss is their weighted sum (multi-task pre-training, e.g. VTM and
    MLM over video-text and image-text at once).

    Each task draws its batches from its own seed (``cfg.seed + 1000 * i``),
    so two tasks over the same data do not see the same examples in lockstep
    unless they are meant to share data. ``evaluate`` takes a dict of
    held-out data per task name (tasks without one are skipped).
    """

    name = "multi"

    def __init__(self, tasks: dict[str, Task], weights: dict[str, float] | None = None):
        if not tasks:
            raise ValueError("MultiTask needs at least one task")
        unknown = sorted(set(weights or {}) - set(tasks))
        if unknown:
            raise ValueError(f"MultiTask weights name unknown tasks {unknown}; tasks: {sorted(tasks)}")
        self.tasks = dict(tasks)
        self.weights = {k: float((weights or {}).get(k, 1.0)) for k in tasks}
        self.headline = f"{next(iter(tasks))}/{next(iter(tasks.values())).headline}"

    def _cfg(self, cfg, i: int):
        return replace(cfg, seed=cfg.seed + 1000 * i)

    def check(self, cfg, world: int) -> None:
        for i, task in enumerate(self.tasks.values()):
            task.check(self._cfg(cfg, i), world)

    def objective(self, model: nn.Module, cfg) -> nn.Module:
        return _WeightedSum({k: t.objective(model, self._cfg(cfg, i)) for i, (k, t) in enumerate(self.tasks.items())},
                            self.weights)

    def batch(self, cfg, step: int, rank: int, world: int, device: torch.device) -> dict[str, Any]:
        return {k: t.batch(self._cfg(cfg, i), step, rank, world, device) for i, (k, t) in enumerate(self.tasks.items())}

    def samples(self, batch: dict[str, Any]) -> int:
        return sum(t.samples(batch[k]) for k, t in self.tasks.items())

    def evaluate(self, model: nn.Module, data: dict[str, Any], device: torch.device) -> dict[str, float]:
        out = {}
        for k, t in self.tasks.items():
            if data.get(k) is not None:
                out.update({f"{k}/{m}": v for m, v in t.evaluate(model, data[k], device).items()})
        return out

    def meta(self) -> dict:
        out: dict = {}
        for t in self.tasks.values():
            out.update(t.meta())
        return out

    def media(self) -> list[Tensor]:
        return [m for t in self.tasks.values() for m in t.media()]

    def with_media_on(self, device: torch.device, memo: dict | None = None) -> "MultiTask":
        memo = {} if memo is None else memo
        out = copy.copy(self)
        out.tasks = {k: t.with_media_on(device, memo) for k, t in self.tasks.items()}
        return out

    @property
    def skipped(self) -> list[str]:
        return [s for t in self.tasks.values() for s in t.skipped]

    @property
    def tokenizer(self):
        return next((t.tokenizer for t in self.tasks.values() if t.tokenizer is not None), None)

    @property
    def fingerprint(self):
        prints = {k: t.fingerprint for k, t in self.tasks.items()}
        return None if all(v is None for v in prints.values()) else prints
