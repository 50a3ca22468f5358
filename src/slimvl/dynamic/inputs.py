"""What a policy needs to know of a task's inputs, one adapter per task.

An adapter says how many inputs there are, takes a subset, gives the
model's logits over all of them (``logits``, the plain evaluation), which
predictions are right and the task's metrics. For running a policy, it
splits the inputs into batches, gathers a batch's model inputs, has the
model ``prepare`` them (the input array: the work that does not depend on
the latents, done once per input whatever levels it runs) and reads
logits and the learned policy's probe off a prepared array. ``dummy``
gives two inputs of the largest shape, for counting FLOPs.

``ClassInputs`` (clips) and ``QAInputs`` (questions) are here; captions
with candidate lists (``VTMInputs``) are in ``dynamic.retrieval``.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..bench.flops import dummy_batch
from ..tasks.base import check_scores, row_batches, used_width
from ..tasks.classify import ClassData, check_classifier, class_batch, class_metrics, correct, predict_logits
from ..tasks.qa import QAData, answer_logits, qa_batch, qa_metrics

if TYPE_CHECKING:  # the models are not imported at run time: a prepared array is whatever model.prepare made
    from ..models.latents import InputArray


class PolicyInputs:
    """The part every adapter shares: one input is one row of the model's batch."""

    multi_label = False
    probe_shares_array = True  # the probe reads the prepared array (its keys and values are reused)

    def batches(self, batch_size: int) -> Iterator[Tensor]:
        """Row indices of the inputs, ``batch_size`` model rows at a time."""
        return row_batches(self.n, batch_size)

    def prepare(self, model: nn.Module, inputs: dict) -> InputArray:
        """The model's input array of a batch's model inputs (``model.prepare``)."""
        return model.prepare(inputs)

    def array_rows(self, array: InputArray, rows: Tensor) -> InputArray:
        """The prepared array of the batch's inputs ``rows`` (indices within the batch)."""
        return array.rows(rows)

    def probe_array(self, model: nn.Module, array: InputArray, inputs: dict) -> Tensor:
        """The learned policy's features ``[b, D]`` of a prepared batch."""
        return model.probe_array(array)


@dataclass
class ClassInputs(PolicyInputs):
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

    def model_inputs(self, rows: Tensor, device: torch.device) -> dict:
        return class_batch(self.data, rows, device).inputs

    def dummy(self, model: nn.Module) -> dict:
        return dummy_batch(model, self.data.videos.shape[1], 0, 2)

    def logits_array(self, model: nn.Module, array: InputArray) -> Tensor:
        logits = model.classify_array(array).float()
        check_scores(logits, "class logits")
        return logits


@dataclass
class QAInputs(PolicyInputs):
    """Questions (``QAData``) as a policy sees them; confidence is the
    answer softmax's (its top-1/top-2 margin with ``confidence="margin"``)."""

    data: QAData

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

    def model_inputs(self, rows: Tensor, device: torch.device) -> dict:
        return qa_batch(self.data, rows, device).inputs

    def dummy(self, model: nn.Module) -> dict:
        """Two questions at the longest question's length: what a batch is trimmed to at most."""
        return dummy_batch(model, self.data.videos.shape[1], used_width(self.data.question_mask), 2)

    def logits_array(self, model: nn.Module, array: InputArray) -> Tensor:
        logits = model.answer_array(array).float()
        check_scores(logits, "answer logits")
        return logits
