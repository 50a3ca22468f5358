"""Retrieve, then re-rank: a dual encoder's top-k re-scored by a cross-encoder.

The dual encoder (``slimvl.decompose``) ranks the whole gallery at the cost
of one encoding per item and a matrix product; the cross-encoder is the
more accurate judge but costs a forward pass per pair. Re-ranking gives
the cross-encoder only each query's ``k`` best candidates: ``k`` passes per
query instead of one per gallery item. With ``k`` equal to the gallery the
result is the cross-encoder's own ranking.

Both directions are re-ranked: each caption's top-k videos (text->video)
and each video's top-k captions (video->text); a pair proposed by both is
scored once.
"""
from __future__ import annotations

import time

import torch

from ...runtime import device_for
from ..base import for_inference
from .data import RetrievalData
from .evaluate import pair_scores, score_matrix
from .metrics import retrieval_metrics


def parse_retrieval(spec: str) -> int | None:
    """``--retrieval``: ``"all"`` (every pair through the model, or its
    cached embeddings) gives None; ``"rerank:K"`` gives ``K`` (> 0)."""
    if spec == "all":
        return None
    head, _, k = spec.partition(":")
    if head != "rerank" or not k.strip().lstrip("-").isdigit():
        raise ValueError(f"--retrieval {spec!r}: expected 'all' or 'rerank:K' (e.g. rerank:50)")
    if int(k) <= 0:
        raise ValueError(f"--retrieval {spec!r}: K must be positive (the candidates re-ranked per query)")
    return int(k)


def reranker_of(dual: torch.nn.Module, cross: torch.nn.Module | None = None) -> torch.nn.Module:
    """The cross-encoder that re-ranks ``dual``'s candidates: ``cross`` when
    given, else the dual encoder's own backbone, if its weights are still
    those it was decomposed from (``config.source_checksum``). A fine-tuned
    dual encoder's backbone is no longer the cross-encoder: that is an error
    naming what to pass."""
    from ...checkpoint import weights_checksum

    if cross is not None:
        if getattr(cross, "cacheable", False) and not getattr(cross, "has_pair_scorer", True):
            raise ValueError("the re-ranker scores pairs by embedding similarity: give a cross-encoder")
        return cross
    backbone = getattr(dual, "backbone", None)
    source = getattr(dual.config, "source_checksum", "")
    if backbone is None:
        raise ValueError(f"re-ranking a {dual.config.model_type}: give the cross-encoder (cross=..., --cross-encoder)")
    if not source or weights_checksum(backbone) != source:
        raise ValueError("this dual encoder's weights changed since it was decomposed (fine-tuned), so its backbone "
                         "is no longer the cross-encoder: give the original cross-encoder (cross=..., "
                         "--cross-encoder RUN)")
    return backbone


def _above(dense: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """``dense`` (float64) with the cells ``(rows, cols)`` replaced by
    ``scores`` shifted above every dense score, keeping their order: the
    re-ranked candidates first, by the cross-encoder, then the rest as the
    dual encoder ranked them."""
    out = dense.double().clone()
    s = scores.double()
    out[rows, cols] = s - s.min() + out.max() + 1.0
    return out


@torch.inference_mode()
def reranked_scores(dual: torch.nn.Module, cross: torch.nn.Module, data: RetrievalData, k: int,
                    batch_size: int = 256, device: str | torch.device | None = None, amp: str = "auto",
                    progress: bool = True, timings: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Score matrices ``[n_captions, n_items]`` (float64, CPU) for
    text->video and video->text after re-ranking each query's top ``k``.

    ``timings`` receives ``encode_seconds`` and ``dense_seconds`` (the dual
    encoder), ``rerank_seconds`` (the cross-encoder), ``reranked_pairs``.
    """
    n_caps, n_items = len(data.caption_item), data.videos.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise ValueError(f"k={k!r}: the candidates re-ranked per query must be a positive integer")
    if k > n_items:
        raise ValueError(f"k={k}: the gallery has only {n_items} videos")
    dense_t: dict = {}
    t0 = time.perf_counter()
    dense = score_matrix(dual, data, batch_size, device, amp, progress, dense_t)
    t1 = time.perf_counter()
    t2v_cols = dense.topk(k, dim=1).indices  # [n_caps, k] items
    t2v_rows = torch.arange(n_caps).repeat_interleave(k)
    v2t_rows = dense.topk(min(k, n_caps), dim=0).indices  # [k', n_items] captions
    v2t_cols = torch.arange(n_items).repeat(v2t_rows.shape[0])
    flat = torch.cat([t2v_rows * n_items + t2v_cols.flatten(), v2t_rows.flatten() * n_items + v2t_cols])
    pairs, back = flat.unique(return_inverse=True)  # a pair both directions proposed is scored once
    dev = for_inference(cross, device)
    scores = pair_scores(cross, data, pairs // n_items, pairs % n_items, batch_size, dev, amp, progress)[back]
    n_t2v = t2v_rows.numel()
    t2v = _above(dense, t2v_rows, t2v_cols.flatten(), scores[:n_t2v])
    v2t = _above(dense, v2t_rows.flatten(), v2t_cols, scores[n_t2v:])
    if timings is not None:
        timings.update(encode_seconds=dense_t["encode_seconds"], dense_seconds=t1 - t0,
                       rerank_seconds=time.perf_counter() - t1, reranked_pairs=int(len(pairs)))
    return t2v, v2t


def evaluate_reranked(dual: torch.nn.Module, data: RetrievalData, k: int, cross: torch.nn.Module | None = None,
                      batch_size: int = 256, device: str | torch.device | None = None, progress: bool = True,
                      amp: str = "auto") -> dict:
    """Recall@1/5/10 and median rank both ways after re-ranking the dual
    encoder's top ``k`` with the cross-encoder (``reranker_of``), and the
    time each stage took."""
    t0 = time.perf_counter()
    cross = reranker_of(dual, cross)
    timings: dict = {}
    t2v, v2t = reranked_scores(dual, cross, data, k, batch_size, device, amp, progress, timings)
    out = {key: val for key, val in retrieval_metrics(t2v, data).items() if not key.startswith("v2t")}
    out.update({key: val for key, val in retrieval_metrics(v2t, data).items() if key.startswith("v2t")})
    out.update(retrieval="rerank", k=k, n_items=int(data.videos.shape[0]), n_captions=int(len(data.caption_item)),
               skipped_media=len(data.skipped), device=str(device_for(dual, device)), **timings,
               eval_seconds=time.perf_counter() - t0)
    return out
