"""Classifying clips of the synthetic world: which shapes a clip shows
(multi-label) or how many objects it holds (multi-class). The labels come
from each item's scene (``world.json``), so any dataset made by
``slimvl data make`` has them; real layouts carry no scenes.

    videos + scene labels  ->  the classifier's logits  ->  (binary) cross-entropy
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..runtime import autocast_for, gather, host_to, video_to
from .base import InputsBatch, Task, check_scores, for_inference, heldout_split, row_batches
from .registry import TaskEntry, TaskSource, register_task

# The synthetic world's shapes (``slimvl.data.world.SHAPES``; kept here, as
# tasks do not import the data room) and its object counts (1 to 3).
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")
COUNTS = ("1", "2", "3")
TARGETS = {"shapes": SHAPES, "count": COUNTS}


@dataclass
class ClassData:
    """Clips and their labels.

    Attributes:
        videos: uint8 ``[n, T, 3, H, W]``.
        labels: float ``[n, C]`` of 0/1 (multi-label) or long ``[n]`` (one class each).
        classes: the class names, in the head's order.
        target: what the labels say (``"shapes"`` or ``"count"``).
        heldout: optional bool per clip (a held-out (shape, colour, motion) combination).
    """

    videos: Tensor
    labels: Tensor
    classes: list[str]
    target: str
    heldout: list[bool] | None = None
    skipped: list[str] = field(default_factory=list)
    fingerprint: str | None = None
    padded: int = 0

    @property
    def multi_label(self) -> bool:
        return self.labels.dim() == 2

    @property
    def n(self) -> int:
        return self.videos.shape[0]

    @classmethod
    def from_dataset(cls, dataset, target: str) -> "ClassData":
        """The labels of a ``VideoTextDataset``'s scenes for ``target``."""
        scenes = getattr(dataset, "scenes", None)
        if not scenes or None in scenes:
            raise ValueError(f"{dataset.root}: classification labels come from the synthetic world's scenes "
                             "(world.json, written by `slimvl data make`); this dataset has none")
        labels = scene_labels(scenes, target)
        heldout = getattr(dataset, "heldout", None)
        return cls(dataset.videos, labels, list(TARGETS[target]), target,
                   list(heldout) if heldout is not None and None not in heldout else None,
                   [str(path) for path, _ in getattr(dataset, "skipped", [])],
                   getattr(dataset, "fingerprint", None), getattr(dataset, "padded", 0))


def scene_labels(scenes: list[dict], target: str) -> Tensor:
    """Labels of scenes (``Scene.to_dict()`` form) for ``target``: the shapes
    present as 0/1 ``[n, 6]``, or the object count's class index ``[n]``."""
    if target not in TARGETS:
        raise ValueError(f"classification target {target!r}: expected one of {list(TARGETS)}")
    if target == "shapes":
        out = torch.zeros(len(scenes), len(SHAPES))
        for i, s in enumerate(scenes):
            for o in s["objects"]:
                out[i, SHAPES.index(o["shape"])] = 1.0
        return out
    counts = [len(s["objects"]) for s in scenes]
    bad = [c for c in counts if str(c) not in COUNTS]
    if bad:
        raise ValueError(f"object counts {sorted(set(bad))} are outside the classes {list(COUNTS)}")
    return torch.tensor([COUNTS.index(str(c)) for c in counts])


@dataclass
class ClassBatch(InputsBatch):
    """One step's clips (``inputs``: ``video`` float ``[B, T, 3, H, W]``) and labels."""

    inputs: dict[str, Tensor]
    labels: Tensor


def class_batch(data: ClassData, rows: np.ndarray | Tensor, device: torch.device) -> ClassBatch:
    """Gather the tensors of the given clips."""
    rows = torch.as_tensor(rows)
    return ClassBatch({"video": video_to(gather(data.videos, rows), device)}, host_to(data.labels[rows], device))


def class_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Binary cross-entropy per class (multi-label ``[B, C]`` labels) or cross-entropy."""
    if labels.dim() == 2:
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float())
    return F.cross_entropy(logits.float(), labels)


def correct(logits: Tensor, labels: Tensor) -> Tensor:
    """Per clip, whether the prediction is right ``[B]`` bool: every label on
    the right side of 0 (multi-label), or the arg-max class."""
    if labels.dim() == 2:
        return ((logits > 0) == (labels > 0.5)).all(-1)
    return logits.argmax(-1) == labels


class ClassObjective(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, b: ClassBatch) -> tuple[Tensor, dict[str, Tensor | float]]:
        logits = self.model(b.inputs)
        loss = class_loss(logits, b.labels)
        return loss, {"cls": loss.detach(), "acc": correct(logits.detach(), b.labels).float().mean()}


class ClassTask(Task):
    """Classification: ``cfg.batch_size`` clips per step drawn from ``(seed, step)``."""

    name = "classify"
    headline = "accuracy"

    def __init__(self, data: ClassData):
        self.data = data

    def check(self, cfg, world: int) -> None:
        if cfg.batch_size % world:
            raise ValueError(f"TrainConfig.batch_size={cfg.batch_size}: not divisible by {world} processes")

    def objective(self, model: nn.Module, cfg) -> nn.Module:
        check_classifier(model, self.data)
        return ClassObjective(model)

    def batch(self, cfg, step: int, rank: int, world: int, device: torch.device) -> ClassBatch:
        rng = np.random.default_rng([cfg.seed, step])
        rows = rng.choice(self.data.n, size=cfg.batch_size, replace=cfg.batch_size > self.data.n)
        return class_batch(self.data, rows[rank::world], device)

    def samples(self, batch: ClassBatch) -> int:
        return batch.size

    def evaluate(self, model: nn.Module, data: ClassData, device: torch.device) -> dict[str, float]:
        return evaluate_classifier(model, data, device=device)

    def meta(self) -> dict:
        return {"classes": self.data.classes, "target": self.data.target}


def check_classifier(model: nn.Module, data: ClassData, presets: str = "perceiver_cls_*") -> None:
    """Raise ``ValueError`` when ``model`` cannot classify ``data`` (no
    classifier head, another number of classes, the other kind of labels);
    ``presets`` names the models that can, for the message."""
    if "classify" not in model.capabilities:
        raise ValueError(f"a {model.config.model_type} has no classification head (use a {presets} preset)")
    c = model.config
    if c.num_classes != len(data.classes) or c.multi_label != data.multi_label:
        raise ValueError(f"model num_classes={c.num_classes}, multi_label={c.multi_label}; the {data.target!r} "
                         f"labels need num_classes={len(data.classes)}, multi_label={data.multi_label}")


@torch.inference_mode()
def predict_logits(model: nn.Module, data: ClassData, batch_size: int = 256,
                   device: str | torch.device | None = None, amp: str = "auto") -> Tensor:
    """Class logits ``[n, C]`` (float32, CPU) of every clip; non-finite ones
    stop it with ``NonFiniteScores``."""
    dev = for_inference(model, device)
    out = []
    for rows in row_batches(data.n, batch_size):
        b = class_batch(data, rows, dev)
        with autocast_for(dev, amp):
            logits = model(b.inputs).float()
        check_scores(logits, f"class logits of clips {int(rows[0])}..{int(rows[-1])}")
        out.append(logits.cpu())
    return torch.cat(out)


def class_metrics(logits: Tensor, data: ClassData) -> dict[str, float]:
    """Accuracy (a multi-label clip counts only when every label is right),
    per-label accuracy for multi-label targets, and accuracy on scenes with
    and without a held-out combination."""
    right = correct(logits, data.labels)
    out = {"accuracy": right.float().mean().item(), "n_clips": data.n}
    if data.multi_label:
        out["label_accuracy"] = ((logits > 0) == (data.labels > 0.5)).float().mean().item()
    if data.heldout is not None:
        for name, rows in heldout_split(data.heldout):
            out[f"accuracy_{name}"] = right[rows].float().mean().item()
    return out


def evaluate_classifier(model: nn.Module, data: ClassData, batch_size: int = 256,
                        device: str | torch.device | None = None) -> dict[str, float]:
    """``class_metrics`` of ``model`` over ``data``."""
    check_classifier(model, data)
    return class_metrics(predict_logits(model, data, batch_size, device), data)


def _entry(target: str) -> TaskEntry:
    classes = TARGETS[target]

    def load(source: TaskSource, split: str, config) -> ClassData:
        from ..pipeline import load_class_split

        return load_class_split(source.root, split, target, source.frames, config.image_size,
                                skip_bad=source.skip_bad, progress=source.progress)

    def evaluate(model, data: ClassData, source: TaskSource, device, batch_size: int, progress: bool) -> dict:
        return evaluate_classifier(model, data, batch_size, device=device)

    def evaluate_policy(model, data: ClassData, calibration, source: TaskSource, device, batch_size: int,
                        queries: dict) -> dict:
        from ..dynamic import evaluate_classifier_policy

        return evaluate_classifier_policy(model, data, calibration=calibration, batch_size=batch_size, device=device,
                                          **queries)

    kind = "which shapes a clip shows (multi-label)" if target == "shapes" else "how many objects a clip holds"
    return TaskEntry(f"classify_{target}", f"classify {kind}, from the synthetic world's scenes; accuracy",
                     load=load, build=lambda source, data, config: ClassTask(data), evaluate=evaluate,
                     model_overrides=lambda source: {"num_classes": len(classes), "multi_label": target == "shapes"},
                     evaluate_policy=evaluate_policy)


for _target in TARGETS:
    register_task(_entry(_target))
