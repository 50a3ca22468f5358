"""Question answering as classification over an answer vocabulary.

The model encodes ``[video; question]`` jointly and a [CLS]-query decoder
feeds an answer classifier (``model.answer``); training is cross-entropy
against the annotated answer. Questions whose answer is not in the
vocabulary are never trained on and always count as wrong at evaluation.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..runtime import autocast_for, gather, host_to, video_to
from .base import (InputsBatch, Task, check_scores, for_inference, heldout_split, log_fitting, row_batches,
                   used_width)
from .registry import TaskEntry, TaskSource, register_task

if TYPE_CHECKING:
    from ..data.tokenizer import Tokenizer


@dataclass
class QAData:
    """One split of questions in tensor form.

    Attributes:
        videos: uint8 ``[n_items, T, 3, H, W]`` (images are one-frame videos).
        question_ids / question_mask: ``[n_questions, L]`` token ids and bool mask.
        question_item: ``[n_questions]`` the item each question is about.
        answer: ``[n_questions]`` index of the annotated answer in ``answers``,
            -1 when it is not in the vocabulary (or not annotated).
        answers: the answer vocabulary (the classifier's classes, in order).
        answer_text: the annotated answer of each question (None if none).
        question_type: the type of each question ("" if unknown).
        heldout: per question, whether its scene holds a held-out
            combination (synthetic compositional split), or None.
        skipped: questions dropped because their media was unreadable.
        tokenizer / fingerprint / truncated / padded: as in ``RetrievalData``.
    """

    videos: Tensor
    question_ids: Tensor
    question_mask: Tensor
    question_item: Tensor
    answer: Tensor
    answers: list[str]
    answer_text: list[str | None]
    question_type: list[str]
    heldout: list[bool] | None = None
    skipped: list[str] = field(default_factory=list)
    tokenizer: "Tokenizer | None" = None
    fingerprint: str | None = None
    truncated: int = 0
    padded: int = 0

    def __post_init__(self) -> None:
        n = self.question_ids.shape[0]
        for name in ("question_mask", "question_item", "answer"):
            if getattr(self, name).shape[0] != n:
                raise ValueError(f"QAData.{name}: expected {n} rows (one per question), "
                                 f"got {tuple(getattr(self, name).shape)}")
        if len(self.answer_text) != n or len(self.question_type) != n:
            raise ValueError(f"QAData: answer_text and question_type need {n} entries (one per question)")

    @property
    def n_questions(self) -> int:
        return self.question_ids.shape[0]

    @classmethod
    def from_dataset(cls, dataset, records, tokenizer, max_len: int, answers: list[str]) -> "QAData":
        """Pair VQA-style ``records`` (``slimvl.data.qa.read_vqa``) with a
        split's media (``VideoTextDataset``) and tokenise the questions.

        A question's ``video_id``/``image_id`` matches an item id, or the
        number at the end of one (``image_id`` 42 is ``img42`` or
        ``COCO_val2014_000000000042``). Questions about media left out as
        unreadable (``skip_bad``) are dropped and counted; a question about
        media the split does not have is an error naming it.
        """
        index: dict[str, int] = {}
        for i, r in enumerate(dataset.records):
            index[r.item_id] = i
            m = re.search(r"(\d+)$", r.item_id)
            if m:
                index.setdefault(str(int(m.group(1))), i)
        bad = {Path(p).stem for p, _ in getattr(dataset, "skipped", [])}
        keep, dropped, unknown = [], [], []
        for r in records:
            key = r.media if r.media in index else str(int(r.media)) if r.media.isdigit() else r.media
            if key in index:
                keep.append((r, index[key]))
            elif r.media in bad or key in bad:
                dropped.append(f"question {r.question_id} ({r.media})")
            else:
                unknown.append(r.media)
        if unknown:
            raise ValueError(f"{dataset.root}/{dataset.split}: {len(unknown)} questions are about media the split "
                             f"does not have, e.g. {sorted(set(unknown))[:5]}")
        if not keep:
            raise ValueError(f"{dataset.root}/{dataset.split}: no question has readable media")
        stats: dict = {}
        ids, mask = tokenizer.encode([r.question for r, _ in keep], max_len, stats)
        log_fitting(dataset, len(keep), stats["truncated"], max_len, "questions")
        lookup = {a: i for i, a in enumerate(answers)}
        held = getattr(dataset, "heldout", None)
        heldout = [bool(held[i]) for _, i in keep] if held is not None and None not in held else None
        return cls(dataset.videos, ids, mask, torch.tensor([i for _, i in keep]),
                   torch.tensor([lookup.get(r.answer, -1) if r.answer is not None else -1 for r, _ in keep]),
                   list(answers), [r.answer for r, _ in keep], [r.question_type for r, _ in keep], heldout, dropped,
                   tokenizer, getattr(dataset, "fingerprint", None), stats["truncated"],
                   getattr(dataset, "padded", 0))


@dataclass
class QABatch(InputsBatch):
    """One step's questions: ``inputs`` holds ``video`` float
    ``[B, T, 3, H, W]`` and the questions as ``text``/``text_mask``
    ``[B, L]``; ``answer`` ``[B]``."""

    inputs: dict[str, Tensor]
    answer: Tensor


def qa_batch(data: QAData, rows: np.ndarray | Tensor, device: torch.device, bucket: bool = False) -> QABatch:
    """Gather the tensors of the given questions (``bucket``: text width
    rounded up to a power of two, ``used_width``)."""
    rows = torch.as_tensor(rows)
    width = used_width(data.question_mask[rows], bucket)
    return QABatch({"video": video_to(gather(data.videos, data.question_item[rows]), device),
                    "text": host_to(data.question_ids[rows, :width], device),
                    "text_mask": host_to(data.question_mask[rows, :width], device)}, host_to(data.answer[rows], device))


class QAObjective(nn.Module):
    """Cross-entropy of the answer classifier against the annotated answer."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, b: QABatch) -> tuple[Tensor, dict[str, Tensor | float]]:
        logits = self.model.answer(b.inputs).float()
        loss = F.cross_entropy(logits, b.answer)
        return loss, {"qa": loss.detach(), "acc": (logits.argmax(-1) == b.answer).float().mean()}


class QATask(Task):
    """QA as classification: ``cfg.batch_size`` questions per step, drawn
    from ``(seed, step)`` among those with an in-vocabulary answer.

    ``question_types`` restricts training to questions of those types. It
    is the first stage of a curriculum: on the synthetic world, questions
    about shape stay near chance for thousands of steps when mixed with the
    others, but are learnt alone; a model trained on them first, then on
    every type, ends better on all of them (see BENCHMARKS.md).
    """

    name = "qa"
    headline = "accuracy"

    def __init__(self, data: QAData, question_types: list[str] | tuple[str, ...] | None = None):
        self.data = data
        keep = data.answer >= 0
        if question_types is not None:
            known = sorted(set(data.question_type) - {""})
            unknown = sorted(set(question_types) - set(known))
            if unknown or not question_types:
                raise ValueError(f"QATask question_types={list(question_types)}: unknown types {unknown}; "
                                 f"the data has {known}")
            keep &= torch.tensor([t in question_types for t in data.question_type])
        self.question_types = list(question_types) if question_types is not None else None
        self.trainable = torch.nonzero(keep).flatten().numpy()
        if len(self.trainable) == 0:
            raise ValueError("QATask: no question has an answer in the vocabulary"
                             + (f" among types {self.question_types}" if question_types is not None else ""))

    def check(self, cfg, world: int) -> None:
        if cfg.batch_size % world:
            raise ValueError(f"TrainConfig.batch_size={cfg.batch_size}: not divisible by {world} processes")

    def objective(self, model: nn.Module, cfg) -> nn.Module:
        n = getattr(model.config, "num_answers", 0)
        if n != len(self.data.answers):
            raise ValueError(f"model num_answers={n}, but the data's answer vocabulary has "
                             f"{len(self.data.answers)} answers: build the model with "
                             f"num_answers={len(self.data.answers)}")
        return QAObjective(model)

    def batch(self, cfg, step: int, rank: int, world: int, device: torch.device) -> QABatch:
        rng = np.random.default_rng([cfg.seed, step])
        rows = rng.choice(self.trainable, size=cfg.batch_size, replace=cfg.batch_size > len(self.trainable))
        return qa_batch(self.data, rows[rank::world], device, bucket=cfg.compile)

    def samples(self, batch: QABatch) -> int:
        return batch.size

    def evaluate(self, model: nn.Module, data: QAData, device: torch.device) -> dict[str, float]:
        return evaluate_qa(model, data, device=device)

    def meta(self) -> dict:
        return {"answers": self.data.answers}


@torch.inference_mode()
def answer_logits(model: nn.Module, data: QAData, batch_size: int = 256,
                  device: str | torch.device | None = None, amp: str = "auto") -> Tensor:
    """Answer logits ``[n_questions, n_answers]`` (float32, CPU) of every
    question (on ``device``, default where the model is). Non-finite logits
    stop it with ``NonFiniteScores``: their argmax would be an arbitrary answer."""
    dev = for_inference(model, device)
    out = []
    for rows in row_batches(data.n_questions, batch_size):
        b = qa_batch(data, rows, dev)
        with autocast_for(dev, amp):
            logits = model.answer(b.inputs).float()
        check_scores(logits, f"answer logits of questions {int(rows[0])}..{int(rows[-1])}")
        out.append(logits.cpu())
    return torch.cat(out)


def predict_answers(model: nn.Module, data: QAData, batch_size: int = 256,
                    device: str | torch.device | None = None, amp: str = "auto") -> Tensor:
    """Predicted answer index ``[n_questions]`` for every question (the arg-max of ``answer_logits``)."""
    return answer_logits(model, data, batch_size, device, amp).argmax(-1)


def qa_metrics(pred: Tensor, data: QAData) -> dict[str, float]:
    """Accuracy overall, per question type, and (synthetic data) on scenes
    with and without held-out combinations. An annotated answer outside the
    vocabulary (index -1) never matches a prediction: it counts as wrong."""
    correct = (pred == data.answer) & (data.answer >= 0)
    out = {"accuracy": correct.float().mean().item(), "n_questions": data.n_questions,
           "out_of_vocab": int((data.answer < 0).sum())}
    types = np.array(data.question_type)
    for t in sorted(set(data.question_type) - {""}):
        rows = torch.from_numpy(types == t)
        out[f"accuracy_{t}"] = correct[rows].float().mean().item()
    if data.heldout is not None:
        for name, rows in heldout_split(data.heldout):
            out[f"accuracy_{name}"] = correct[rows].float().mean().item()
            for t in sorted(set(data.question_type) - {""}):
                sel = rows & torch.from_numpy(types == t)
                if sel.any():
                    out[f"accuracy_{name}_{t}"] = correct[sel].float().mean().item()
    return out


def evaluate_qa(model: nn.Module, data: QAData, batch_size: int = 256, device: str | torch.device | None = None
                ) -> dict[str, float]:
    """``qa_metrics`` of ``model``'s predictions over ``data``."""
    n = getattr(model.config, "num_answers", 0)
    if n != len(data.answers):
        raise ValueError(f"model num_answers={n}, but the data's answer vocabulary has {len(data.answers)} answers")
    return qa_metrics(predict_answers(model, data, batch_size, device), data)


def _load(source: TaskSource, split: str, config) -> QAData:
    from ..pipeline import load_qa_split

    return load_qa_split(source.root, split, source.tokenizer, source.frames, config.image_size, config.max_text_len,
                         source.answers, skip_bad=source.skip_bad, progress=source.progress)


def _answers(source: TaskSource) -> dict:
    from ..data.qa import answer_vocab

    return {"num_answers": len(source.answers or answer_vocab(source.root))}


def _evaluate(model, data: QAData, source: TaskSource, device, batch_size: int, progress: bool) -> dict:
    return evaluate_qa(model, data, batch_size, device=device)


def _evaluate_policy(model, data: QAData, calibration, source: TaskSource, device, batch_size: int,
                     queries: dict) -> dict:
    from ..dynamic import evaluate_qa_policy

    return evaluate_qa_policy(model, data, calibration=calibration, batch_size=batch_size, device=device, **queries)


register_task(TaskEntry(
    "qa", "answer classifier over the questions of `slimvl data qa`; accuracy by type", load=_load,
    build=lambda source, data, config: QATask(data, source.options.get("question_types")), evaluate=_evaluate,
    model_overrides=_answers, qa_tokenizer=True, options=("question_types",), evaluate_policy=_evaluate_policy))
