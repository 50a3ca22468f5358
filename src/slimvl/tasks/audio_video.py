"""Audio-video tasks of the fusion models, over an AudioSet-style folder.

- ``audio-video``: which classes a clip holds, multi-label, scored by mean
  average precision (mAP, AudioSet's metric). In the synthetic world the
  classes are the shapes and colours of every object seen *or heard*, so
  an off-screen source is in the audio only and a silent object in the
  frames only.
- ``audio-video-text``: a statement about the clip ("a red circle") and
  three answers, MedVidCL-style: the object is *visible*, only *heard*
  (off-screen), or *absent*; accuracy. Telling "heard" from "absent" needs
  the audio, binding colour to shape needs the video, and the text says
  what to look for.

    video + audio (+ text)  ->  fusion model  ->  logits  ->  (binary) cross-entropy
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..runtime import autocast_for, gather, host_to, video_to
from .base import check_scores, for_inference, row_batches
from .classify import ClassBatch, ClassTask, check_classifier, correct
from .registry import TaskEntry, TaskSource, register_task

ANSWERS = ("visible", "heard", "absent")  # the answers of audio-video-text, in the head's order
TARGETS = ("labels", "statements")


@dataclass
class AVData:
    """Clips of one split as model inputs, and their targets.

    Attributes:
        inputs: ``video`` uint8 ``[n, T, 3, H, W]``; ``audio`` float
            ``[n, n_mels, F]`` (normalised log-mel; zeros for a kept silent
            clip); with statements also ``text`` ``[n, L]`` and ``text_mask``.
        labels: float ``[n, C]`` 0/1 (``labels``) or long ``[n]`` answer
            indices (``statements``).
        classes: the class (or answer) names, in the head's order.
        target: ``"labels"`` or ``"statements"``.
    """

    inputs: dict[str, Tensor]
    labels: Tensor
    classes: list[str]
    target: str
    skipped: list[str] = field(default_factory=list)
    fingerprint: str | None = None
    silent: int = 0
    tokenizer: Any = None  # of the statements' ids (kept with checkpoints)

    @property
    def n(self) -> int:
        return self.labels.shape[0]

    @property
    def multi_label(self) -> bool:
        return self.labels.dim() == 2


def av_batch(data: AVData, rows: np.ndarray | Tensor, device: torch.device,
             modalities: tuple[str, ...] | None = None) -> ClassBatch:
    """The model inputs (video as float in [-1, 1]) and labels of some clips;
    ``modalities`` keeps only those modalities' tensors (None: all)."""
    rows = torch.as_tensor(rows)
    inputs = {}
    for key, t in data.inputs.items():
        if modalities is not None and key.removesuffix("_mask") not in modalities:
            continue
        t = gather(t, rows)
        t = video_to(t, device) if key == "video" else host_to(t, device)
        inputs[key] = t.float() if key == "audio" else t
    return ClassBatch(inputs, host_to(data.labels[rows], device))


def average_precision(scores: Tensor, positive: Tensor) -> float:
    """Average precision of one class: the mean, over its positives, of the
    precision among the clips scored at least as high (ties counted
    pessimistically, so a constant score earns only the base rate); NaN
    without positives."""
    pos = positive.bool()
    n_pos = int(pos.sum())
    if n_pos == 0:
        return float("nan")
    s = scores.float()
    # For each positive: how many clips (of any label) score >= it, and how many positives do.
    above = (s[None, :] >= s[pos][:, None]).sum(1).float()
    pos_above = (s[pos][None, :] >= s[pos][:, None]).sum(1).float()
    return float((pos_above / above).mean())


def mean_average_precision(logits: Tensor, labels: Tensor) -> float:
    """mAP: average precision per class, averaged over the classes that have
    a positive clip (AudioSet's metric)."""
    aps = [average_precision(logits[:, c], labels[:, c] > 0.5) for c in range(labels.shape[1])]
    aps = [a for a in aps if a == a]
    if not aps:
        raise ValueError("mean_average_precision: no class has a positive clip")
    return float(np.mean(aps))


def av_metrics(logits: Tensor, data: AVData) -> dict[str, float]:
    """``labels``: mAP, per-label accuracy and exact-match accuracy;
    ``statements``: accuracy overall and per answer."""
    right = correct(logits, data.labels)
    out = {"accuracy": right.float().mean().item(), "n_clips": data.n}
    if data.multi_label:
        out["mAP"] = mean_average_precision(logits, data.labels)
        out["label_accuracy"] = ((logits > 0) == (data.labels > 0.5)).float().mean().item()
    else:
        for i, name in enumerate(data.classes):
            rows = data.labels == i
            if rows.any():
                out[f"accuracy_{name}"] = right[rows].float().mean().item()
    return out


def check_fusion_model(model: nn.Module, data: AVData) -> None:
    """Raise ``ValueError`` when ``model`` cannot be trained or scored on
    ``data``: no classification head, another number or kind of classes, or
    a modality the data does not have."""
    check_classifier(model, data, "fusion_*")
    missing = [m for m in model.modalities if m not in data.inputs]
    if missing:
        raise ValueError(f"the model reads {list(model.modalities)} but the data has no {missing} "
                         f"(text comes with --task audio-video-text's statements)")


@torch.inference_mode()
def predict_av(model: nn.Module, data: AVData, batch_size: int = 128, device: str | torch.device | None = None,
               amp: str = "auto") -> Tensor:
    """Logits ``[n, C]`` (float32, CPU) of every clip."""
    dev = for_inference(model, device)
    out = []
    for rows in row_batches(data.n, batch_size):
        b = av_batch(data, rows, dev, tuple(model.modalities))
        with autocast_for(dev, amp):
            logits = model(b.inputs).float()
        check_scores(logits, f"logits of clips {int(rows[0])}..{int(rows[-1])}")
        out.append(logits.cpu())
    return torch.cat(out)


def evaluate_av(model: nn.Module, data: AVData, batch_size: int = 128,
                device: str | torch.device | None = None) -> dict[str, float]:
    """``av_metrics`` of ``model`` over ``data``."""
    check_fusion_model(model, data)
    return av_metrics(predict_av(model, data, batch_size, device), data)


class AVTask(ClassTask):
    """Audio-video classification: ``cfg.batch_size`` clips per step drawn
    from ``(seed, step)``, only the modalities the model reads gathered."""

    name = "audio-video"

    def __init__(self, data: AVData):
        super().__init__(data)
        self.headline = "mAP" if data.multi_label else "accuracy"
        self.modalities: tuple[str, ...] | None = None

    def objective(self, model: nn.Module, cfg) -> nn.Module:
        from .classify import ClassObjective

        check_fusion_model(model, self.data)
        self.modalities = tuple(model.modalities)
        return ClassObjective(model)

    def batch(self, cfg, step: int, rank: int, world: int, device: torch.device) -> ClassBatch:
        rng = np.random.default_rng([cfg.seed, step])
        rows = rng.choice(self.data.n, size=cfg.batch_size, replace=cfg.batch_size > self.data.n)
        return av_batch(self.data, rows[rank::world], device, self.modalities)

    def evaluate(self, model: nn.Module, data: AVData, device: torch.device) -> dict[str, float]:
        return evaluate_av(model, data, device=device)

    def meta(self) -> dict:
        return {"classes": self.data.classes, "target": self.data.target}


def _entry(target: str) -> TaskEntry:
    def load(source: TaskSource, split: str, config) -> AVData:
        from ..pipeline import load_av_split

        return load_av_split(source.root, split, config, source.tokenizer, target, frames=source.frames,
                             skip_bad=source.skip_bad, keep_silent=bool(source.options.get("keep_silent")),
                             progress=source.progress)

    def evaluate(model, data: AVData, source: TaskSource, device, batch_size: int, progress: bool) -> dict:
        return evaluate_av(model, data, batch_size, device=device)

    def overrides(source: TaskSource) -> dict:
        if target == "statements":
            return {"num_classes": len(ANSWERS), "multi_label": False}
        from ..pipeline import av_class_names

        return {"num_classes": len(av_class_names(source.root)), "multi_label": True}

    def fit(source: TaskSource, config) -> dict:
        from ..pipeline import audio_statistics

        if "audio" not in getattr(config, "modalities", ()):  # a model that does not hear (video only)
            return {}
        mean, std = audio_statistics(source.root, config, progress=source.progress)
        return {"audio_mean": mean, "audio_std": std}

    name, what = (("audio-video", "which shapes and colours a clip shows or sounds (multi-label); mAP")
                  if target == "labels" else
                  ("audio-video-text", "whether a statement's object is visible, only heard or absent; accuracy"))
    return TaskEntry(name, f"{what} (AudioSet layout, fusion_* models)", load=load,
                     build=lambda source, data, config: AVTask(data), evaluate=evaluate, model_overrides=overrides,
                     data_overrides=fit, options=("keep_silent",), text=target == "statements")


for _target in TARGETS:
    register_task(_entry(_target))
