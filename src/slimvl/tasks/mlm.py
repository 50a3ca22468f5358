"""Masked language modelling through Perceiver-VL's decoder queries.

BERT's recipe: ``prob`` (15%) of the caption's word pieces are chosen; of
those, 80% become ``[MASK]``, 10% a random word piece and 10% stay as they
are, and the model predicts the original piece at every chosen position.
The video and the corrupted caption are encoded jointly; the decoder's
queries carry only positions and the masked/unmasked flag
(``PerceiverVL.mlm_logits``), so the words must be recovered from the
latents, with the video's help.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..runtime import autocast_for, gather, host_to, video_to
from .base import InputsBatch, MultiTask, Task, check_scores, for_inference, row_batches, used_width
from .registry import TaskEntry, TaskSource, register_task
from .retrieval.task import RetrievalTask, load_retrieval_split


def mask_tokens(ids: Tensor, mask: Tensor, rng: np.random.Generator, mask_id: int, vocab_size: int,
                special_ids: tuple[int, ...], prob: float = 0.15) -> tuple[Tensor, Tensor]:
    """Corrupt ``ids`` ``[B, L]`` for MLM; returns ``(corrupted ids, chosen [B, L] bool)``.

    Only real, non-special tokens can be chosen, and every caption with one
    gets at least one chosen position (a short caption would otherwise often
    teach nothing). Random replacements never draw a special token.
    """
    if not 0.0 < prob < 1.0:
        raise ValueError(f"prob={prob}: the masking probability must be in (0, 1)")
    ids_np, real = ids.numpy(), mask.numpy().copy()
    real &= ~np.isin(ids_np, np.array(special_ids))
    u = rng.random(ids_np.shape)
    chosen = real & (u < prob)
    for b in np.flatnonzero(real.any(1) & ~chosen.any(1)):
        pos = np.flatnonzero(real[b])
        chosen[b, pos[rng.integers(len(pos))]] = True
    action = rng.random(ids_np.shape)
    normal = np.setdiff1d(np.arange(vocab_size), np.array(special_ids))
    random_ids = normal[rng.integers(len(normal), size=ids_np.shape)]
    out = ids_np.copy()
    out[chosen & (action < 0.8)] = mask_id
    swap = chosen & (action >= 0.8) & (action < 0.9)
    out[swap] = random_ids[swap]
    return torch.from_numpy(out), torch.from_numpy(chosen)


@dataclass
class MLMBatch(InputsBatch):
    """Videos and corrupted captions (``inputs``: ``video``, ``text``,
    ``text_mask``), the chosen positions ``masked`` ``[B, L]`` and their
    original ids ``target`` ``[B, L]``."""

    inputs: dict[str, Tensor]
    masked: Tensor
    target: Tensor


class MLMObjective(nn.Module):
    """Cross-entropy of the original word piece at each chosen position."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, b: MLMBatch) -> tuple[Tensor, dict[str, Tensor | float]]:
        logits = self.model.mlm_logits(b.inputs, masked=b.masked).float()[b.masked]
        target = b.target[b.masked]
        loss = F.cross_entropy(logits, target)
        return loss, {"mlm": loss.detach(), "acc": (logits.argmax(-1) == target).float().mean()}


class MLMTask(Task):
    """MLM over the captions of ``RetrievalData`` (video-text or image-text):
    ``cfg.batch_size`` (video, caption) pairs per step, masks drawn from
    ``(seed, step)``."""

    name = "mlm"
    headline = "mlm_accuracy"

    def __init__(self, data, tokenizer, prob: float = 0.15):
        self.data, self.prob = data, prob
        self.mask_id, self.vocab_size = tokenizer.mask_id, tokenizer.vocab_size
        self.special = (tokenizer.pad_id, tokenizer.unk_id, tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id)

    def check(self, cfg, world: int) -> None:
        if cfg.batch_size % world:
            raise ValueError(f"TrainConfig.batch_size={cfg.batch_size}: not divisible by {world} processes")

    def objective(self, model: nn.Module, cfg) -> nn.Module:
        if "mlm" not in model.capabilities:
            raise ValueError(f"task 'mlm' needs a model built with mlm=True "
                             f"({model.config.model_type} has no MLM head)")
        if model.config.vocab_size != self.vocab_size:
            raise ValueError(f"model vocab_size={model.config.vocab_size}, tokenizer has {self.vocab_size} ids")
        return MLMObjective(model)

    def make_batch(self, rows: np.ndarray, rng: np.random.Generator, device: torch.device, data=None,
                   bucket: bool = False) -> MLMBatch:
        """The given captions (of ``data``, default the task's), masked with
        ``rng`` (``bucket``: text width rounded up, ``used_width``)."""
        d = self.data if data is None else data
        rows = torch.as_tensor(rows)
        width = used_width(d.caption_mask[rows])
        ids, mask = d.caption_ids[rows, :width], d.caption_mask[rows, :width]
        corrupted, masked = mask_tokens(ids, mask, rng, self.mask_id, self.vocab_size, self.special, self.prob)
        if bucket:  # widened after the draws, so that the masks do not depend on it
            wide = used_width(d.caption_mask[rows], bucket=True)
            ids, mask, corrupted, masked = (torch.cat([t, t.new_zeros(len(t), wide - width)], 1)
                                            for t in (ids, mask, corrupted, masked))
        return MLMBatch({"video": video_to(gather(d.videos, d.caption_item[rows]), device),
                         "text": host_to(corrupted, device), "text_mask": host_to(mask, device)},
                        host_to(masked, device), host_to(ids, device))

    def batch(self, cfg, step: int, rank: int, world: int, device: torch.device) -> MLMBatch:
        rng = np.random.default_rng([cfg.seed, step, 2])
        n = len(self.data.caption_item)
        rows = rng.choice(n, size=cfg.batch_size, replace=cfg.batch_size > n)
        # Every rank draws the whole step's masks, then keeps its rows: the
        # global batch is the same whatever the number of processes.
        b = self.make_batch(rows, rng, device, bucket=cfg.compile)
        keep = slice(rank, None, world)
        return MLMBatch({k: t[keep] for k, t in b.inputs.items()}, b.masked[keep], b.target[keep])

    def samples(self, batch: MLMBatch) -> int:
        return batch.size

    def evaluate(self, model: nn.Module, data, device: torch.device) -> dict[str, float]:
        return evaluate_mlm(model, data, self, device)


@torch.inference_mode()
def evaluate_mlm(model: nn.Module, data, task: MLMTask, device: str | torch.device | None = None,
                 batch_size: int = 256, seed: int = 0) -> dict[str, float]:
    """MLM accuracy (top-1 over the chosen positions) on every caption of
    ``data``, with masks drawn from ``seed`` (the same for every model)."""
    dev = for_inference(model, device)
    rng = np.random.default_rng([seed, 17])
    right = total = 0
    for rows in row_batches(len(data.caption_item), batch_size):
        b = task.make_batch(rows.numpy(), rng, dev, data)
        with autocast_for(dev, "auto"):
            logits = model.mlm_logits(b.inputs, masked=b.masked)
        check_scores(logits[b.masked].float(), "MLM logits")
        right += int((logits.argmax(-1)[b.masked] == b.target[b.masked]).sum())
        total += int(b.masked.sum())
    return {"mlm_accuracy": right / max(total, 1), "mlm_positions": total}


def _evaluate(model, data, source: TaskSource, device, batch_size: int, progress: bool) -> dict:
    return evaluate_mlm(model, data, MLMTask(data, source.tokenizer), device=device, batch_size=batch_size)


def _pretraining(source: TaskSource, data, config) -> MultiTask:
    """VTM and MLM summed, over video-text and (with ``image_data``) image-text together."""
    tasks = {"video_vtm": RetrievalTask(data), "video_mlm": MLMTask(data, source.tokenizer)}
    if source.options.get("image_data"):
        images = load_retrieval_split(TaskSource(source.options["image_data"], source.tokenizer, 1, source.skip_bad,
                                                 source.progress), "train", config)
        tasks.update(image_vtm=RetrievalTask(images), image_mlm=MLMTask(images, source.tokenizer))
    return MultiTask(tasks)


register_task(TaskEntry(
    "mlm", "masked language modelling through decoder queries; accuracy over masked pieces",
    load=load_retrieval_split, build=lambda source, data, config: MLMTask(data, source.tokenizer),
    evaluate=_evaluate, model_overrides=lambda source: {"mlm": True}))
register_task(TaskEntry(
    "pretrain", "VTM + MLM summed, over video-text and (with --image-data) image-text",
    load=load_retrieval_split, build=_pretraining, model_overrides=lambda source: {"mlm": True},
    validation=lambda val: {"video_vtm": val}, options=("image_data",)))
