"""Helpers shared by the benchmark scripts: the gallery dataset, gallery
subsets, and training that resumes or reuses a finished run."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from slimvl import create_model
from slimvl.checkpoint import latest_checkpoint, load_model, read_meta
from slimvl.data import make_dataset
from slimvl.recipes import DATA
from slimvl.models.pretrained import init_from_checkpoint
from slimvl.tasks import RetrievalData
from slimvl.train import TrainConfig, train


def gallery_dataset(root: str | Path, n_test: int, progress: bool = True, n_train: int | None = None) -> Path:
    """The demo's synthetic video-text data with a test gallery of ``n_test``
    videos (and ``n_train`` training videos instead of the demo's, if given)."""
    return make_dataset(root, progress=progress, **{**DATA, "n_test": n_test, "n_train": n_train or DATA["n_train"]})


def subset(data: RetrievalData, n_items: int) -> RetrievalData:
    """The first ``n_items`` items (whole near-duplicate groups) of a gallery, with their captions."""
    k = data.group_size
    if n_items % k or n_items > data.videos.shape[0]:
        raise ValueError(f"n_items={n_items}: must be a multiple of the group size {k}, "
                         f"at most {data.videos.shape[0]}")
    groups = data.groups[: n_items // k]
    items = torch.tensor([i for g in groups for i in g])
    new_index = torch.full((data.videos.shape[0],), -1, dtype=torch.long)
    new_index[items] = torch.arange(len(items))
    keep = new_index[data.caption_item] >= 0
    return replace(
        data, videos=data.videos[items], caption_ids=data.caption_ids[keep], caption_mask=data.caption_mask[keep],
        caption_item=new_index[data.caption_item[keep]], groups=[[int(new_index[i]) for i in g] for g in groups],
        heldout=[data.heldout[i] for i in items.tolist()] if data.heldout is not None else None,
        scenes=[data.scenes[i] for i in items.tolist()] if data.scenes is not None else None)


def train_or_load(preset: str, overrides: dict, data, cfg: TrainConfig, run_dir: Path,
                  progress: bool = True, init_from: Path | None = None) -> tuple[torch.nn.Module, float]:
    """Train ``preset`` on ``data`` (``RetrievalData`` or any ``slimvl.tasks``
    task), resuming an interrupted run and starting from the checkpoint
    ``init_from`` when given, or load the run's final checkpoint when it
    already finished; returns the model and its training seconds."""
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None and read_meta(ckpt)["step"] == cfg.steps and "seconds" not in read_meta(ckpt):
        # Runs finished before checkpoints recorded their training time.
        log = run_dir / "train_log.json"
        return load_model(ckpt), json.loads(log.read_text())["seconds"] if log.is_file() else float("nan")
    torch.manual_seed(cfg.seed)  # the seed fixes the initial weights too
    model = create_model(preset, **overrides)
    if init_from is not None and ckpt is None:
        init_from_checkpoint(model, init_from)
    result = train(model, data, cfg, run_dir=run_dir, resume=ckpt is not None, progress=progress)
    return model, result.seconds
