"""Helpers of the experiments behind BENCHMARKS.md (the scripts in
``benchmarks/``): the demo's world with a larger test gallery, gallery
subsets, training that resumes an interrupted run or reuses a finished one,
and the image size a preset reads."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from .bench import count_flops, dummy_inputs, model_flops_per_pair
from .checkpoint import latest_checkpoint, load_model, read_meta
from .data import make_dataset
from .models import create_model, get_config
from .models.pretrained import init_from_checkpoint
from .models.streams import cached_decoder_scores, decoder_kv
from .recipes import DATA
from .tasks import RetrievalData
from .train import TrainConfig, train


def preset_image_size(preset: str = "perceiver_vl_tiny", **overrides) -> int:
    """The frame side a preset (with ``overrides``) reads: what a benchmark
    decodes its data at."""
    return get_config(preset, **overrides).image_size


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


# The Perceiver-VL overrides of each retrieval stream (multi needs no decoder).
STREAMS = {"single": {}, "multi": {"stream": "multi", "decoder_layers": 0}, "mixed": {"stream": "mixed"}}


@torch.inference_mode()
def counted_retrieval_flops(model, frames: int, text_len: int) -> dict[str, float]:
    """FLOPs per cached video, per cached caption and per scored pair (torch's counter)."""
    if not model.cacheable:
        return {"video": 0.0, "text": 0.0, "pair": model_flops_per_pair(model, frames, text_len)}
    video, ids, mask = dummy_inputs(model, frames, text_len, 8)
    mixed = model.config.stream == "mixed"
    kv = (lambda x: [decoder_kv(b, x) for b in model.decoder]) if mixed else (lambda x: x)
    vc, tc = model.cache_videos(video), model.cache_texts(ids, mask)
    if mixed:
        kv_t, kv_v = kv(tc), kv(vc)
        pair = count_flops(lambda: cached_decoder_scores(model.decoder, model.vtm_query, model.vtm_head, kv_t, kv_v),
                           model)
    else:
        pair = count_flops(lambda: model.score_cached(tc, vc), model)
    return {"video": count_flops(lambda: kv(model.cache_videos(video)), model) / 8,
            "text": count_flops(lambda: kv(model.cache_texts(ids, mask)), model) / 8, "pair": pair / 64}
