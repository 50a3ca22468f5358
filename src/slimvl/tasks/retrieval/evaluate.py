"""Retrieval evaluation: score every (caption, video) pair, then rank.

Scores are computed and compared in float32 whatever the autocast (the
models' scoring heads run in fp32, see ``slimvl.models.base.score_in_fp32``),
and non-finite scores stop the evaluation: NaN compares false with
everything, so a broken model would otherwise rank its positives first.
"""
from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from ...runtime import autocast_for, device_for, video_to
from ..base import for_inference, row_batches
from .data import RetrievalData
from .metrics import retrieval_metrics


@torch.inference_mode()
def score_matrix(model: torch.nn.Module, data: RetrievalData, batch_size: int = 256,
                 device: str | torch.device | None = None, amp: str = "auto", progress: bool = True,
                 timings: dict | None = None) -> torch.Tensor:
    """VTM logits for every caption against every item: ``[n_captions, n_items]``,
    float32 on the CPU.

    ``device``: where to run (``"auto"``, ``"cpu"``, ``"cuda"``...; None:
    where the model is). ``amp``: ``"auto"`` is bf16 autocast on GPUs that
    support it; the scores themselves are fp32 either way.

    A cross-encoder has nothing to cache between pairs, so all
    ``n_captions * n_items`` pairs go through the model, ``batch_size`` at a
    time. A model that can cache (``model.cacheable``: Perceiver-VL's multi
    and mixed streams) encodes each video and each caption once, then scores
    the pairs from the caches. ``timings``, when given, receives
    ``encode_seconds`` (per-item work) and ``score_seconds`` (per-pair work).
    """
    dev = for_inference(model, device)
    if model.cacheable:
        return _cached_score_matrix(model, data, batch_size, dev, amp, progress, timings)
    t0 = time.perf_counter()
    n_caps, n_items = len(data.caption_item), data.videos.shape[0]
    pairs = torch.arange(n_caps * n_items)
    scores = pair_scores(model, data, pairs // n_items, pairs % n_items, batch_size, dev, amp, progress)
    if timings is not None:
        timings.update(encode_seconds=0.0, score_seconds=time.perf_counter() - t0)
    return scores.view(n_caps, n_items)


@torch.inference_mode()
def pair_scores(model: torch.nn.Module, data: RetrievalData, captions: torch.Tensor, items: torch.Tensor,
                batch_size: int, device: torch.device, amp: str = "auto", progress: bool = True) -> torch.Tensor:
    """Logits ``[P]`` (float32, CPU) of the pairs (caption ``captions[p]``,
    item ``items[p]``), each through the whole model, ``batch_size`` at a
    time (the model already on ``device``, in eval mode)."""
    scores = torch.empty(len(captions))
    bar = tqdm(total=len(captions), disable=not progress, desc=f"score {model.config.model_type}", unit="pair",
               dynamic_ncols=True)
    for idx in row_batches(len(captions), batch_size):
        caps, its = captions[idx], items[idx]
        video = video_to(data.videos[its], device)
        with autocast_for(device, amp):
            out = model(video, data.caption_ids[caps].to(device), data.caption_mask[caps].to(device))
        scores[idx] = out.logits.float().cpu()
        bar.update(len(idx))
    bar.close()
    return scores


def _cached_score_matrix(model, data: RetrievalData, batch_size: int, dev: torch.device, amp: str,
                         progress: bool, timings: dict | None) -> torch.Tensor:
    t0 = time.perf_counter()
    n_caps, n_items = len(data.caption_item), data.videos.shape[0]
    bar = tqdm(total=n_caps + n_items, disable=not progress, desc=f"encode {model.config.model_type}",
               unit="item", dynamic_ncols=True)
    videos, texts = [], []
    with autocast_for(dev, amp):
        for start in range(0, n_items, batch_size):
            videos.append(model.cache_videos(video_to(data.videos[start:start + batch_size], dev)))
            bar.update(len(videos[-1]))
        for start in range(0, n_caps, batch_size):
            sl = slice(start, start + batch_size)
            texts.append(model.cache_texts(data.caption_ids[sl].to(dev), data.caption_mask[sl].to(dev)))
            bar.update(len(texts[-1]))
        bar.close()
        t1 = time.perf_counter()
        scores = model.score_cached(torch.cat(texts), torch.cat(videos)).float().cpu()
    if timings is not None:
        timings.update(encode_seconds=t1 - t0, score_seconds=time.perf_counter() - t1)
    return scores


def evaluate(model: torch.nn.Module, data: RetrievalData, batch_size: int = 256,
             device: str | torch.device | None = None, progress: bool = True, amp: str = "auto") -> dict[str, float]:
    """Text->video and video->text Recall@1/5/10 and median rank over ``data``.

    With held-out flags (synthetic compositional split), also
    ``heldout_t2v_r1`` / ``seen_t2v_r1``: t2v R@1 of the captions whose scene
    holds a held-out (shape, colour, motion) combination, and of the others.
    ``device`` as in ``score_matrix`` (None: where the model is). A tie
    between a caption's own item and another counts against it (see
    ``slimvl.tasks.retrieval.t2v_ranks``). Raises ``NonFiniteScores`` when
    any score is NaN or infinite.
    """
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    scores = score_matrix(model, data, batch_size, device, amp=amp, progress=progress, timings=timings)
    out = retrieval_metrics(scores, data)
    out.update(n_items=int(data.videos.shape[0]), n_captions=int(len(data.caption_item)),
               skipped_media=len(data.skipped), truncated_captions=data.truncated, padded_videos=data.padded,
               device=str(device_for(model, device)), **timings, eval_seconds=time.perf_counter() - t0)
    return out


