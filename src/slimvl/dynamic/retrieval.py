"""Latent policies for VTM retrieval with a single-stream Perceiver-VL.

An input of a policy here is a caption with its candidate list: the items
it is scored against (the whole gallery, or ``candidate_lists``: the
caption's own item, its near-duplicates, then others drawn at random). The
caption's "logits" are its VTM scores over the candidates, and its
confidence is that of a classifier choosing among them: the softmax of the
scores over the candidate list (``max_softmax``: the top candidate's share;
``margin``: top-1 minus top-2). A caption the model is sure of stops at few
latents; one whose top candidates are close runs its whole list again with
more. It is right when its own item ranks first (a tie counts against it).

Only the single stream: it encodes every (caption, video) pair jointly, so
each caption's cost is its candidates' pair encodings, and a cascade pays
them again only for the captions still open. The multi and mixed streams
encode the gallery once for all captions; their cost is not per caption.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from ..bench.flops import count_flops, dummy_inputs
from ..runtime import autocast_for, to_float_video
from ..tasks.base import check_scores, for_inference, row_batches, used_width
from ..tasks.retrieval.data import RetrievalData
from ..tasks.retrieval.metrics import t2v_ranks


def candidate_lists(data: RetrievalData, k: int, seed: int = 0) -> Tensor:
    """``[n_captions, k]`` item indices per caption: its own item first, then
    the other items of its near-duplicate group (the hard negatives), then
    items drawn at random (without repeats) from the rest."""
    n_items = data.videos.shape[0]
    if not 2 <= k <= n_items:
        raise ValueError(f"candidates={k}: expected 2..{n_items} (the items of the split)")
    group_of = {i: g for g in data.groups for i in g}
    gen = torch.Generator().manual_seed(seed)
    out = torch.empty(len(data.caption_item), k, dtype=torch.long)
    for c, item in enumerate(data.caption_item.tolist()):
        own = [item] + [i for i in group_of.get(item, []) if i != item][: k - 1]
        taken = set(own)
        rest = [int(i) for i in torch.randperm(n_items, generator=gen) if int(i) not in taken]
        out[c] = torch.tensor(own + rest[: k - len(own)])
    return out


@dataclass
class VTMInputs:
    """Captions with their candidate items (``RetrievalData``) as a policy sees them.

    Attributes:
        data: the split.
        candidates: ``[n_captions, k]`` item indices (None: every item of
            the split); each caption's own item must be among them.
    """

    data: RetrievalData
    candidates: Tensor | None = None
    multi_label = False

    def __post_init__(self) -> None:
        n_caps, n_items = len(self.data.caption_item), self.data.videos.shape[0]
        if self.candidates is None:
            self.candidates = torch.arange(n_items).expand(n_caps, n_items)
        c = self.candidates
        if c.dim() != 2 or c.shape[0] != n_caps or c.shape[1] < 2 or c.dtype != torch.long:
            raise ValueError(f"candidates: expected long [n_captions={n_caps}, k >= 2], got {c.dtype} "
                             f"{tuple(c.shape)}")
        if c.min() < 0 or c.max() >= n_items:
            raise ValueError(f"candidates: item indices must be in 0..{n_items - 1}")
        if not (c == self.data.caption_item[:, None]).any(1).all():
            raise ValueError("candidates: every caption's own item must be among its candidates")

    @property
    def n(self) -> int:
        return len(self.data.caption_item)

    @property
    def target(self) -> Tensor:
        """The position of each caption's own item in its candidate list ``[n]``."""
        return (self.candidates == self.data.caption_item[:, None]).long().argmax(1)

    @property
    def labels(self) -> Tensor:
        return self.data.caption_item

    def check(self, model: nn.Module) -> None:
        if getattr(model.config, "stream", None) != "single":
            raise ValueError("latent policies for retrieval need a single-stream Perceiver-VL (stream='single'): "
                             "the multi and mixed streams encode the gallery once for every caption")

    def subset(self, rows: Tensor) -> "VTMInputs":
        d = self.data
        return VTMInputs(replace(d, caption_ids=d.caption_ids[rows], caption_mask=d.caption_mask[rows],
                                 caption_item=d.caption_item[rows]), self.candidates[rows])

    @torch.inference_mode()
    def logits(self, model: nn.Module, batch_size: int, device) -> Tensor:
        """VTM scores ``[n, k]`` (float32, CPU) of each caption with its candidates, ``batch_size`` pairs at a time."""
        dev = for_inference(model, device)
        n, k = self.candidates.shape
        caps = torch.arange(n).repeat_interleave(k)
        items = self.candidates.flatten()
        out = torch.empty(n * k)
        for rows in row_batches(n * k, batch_size):
            c, i = caps[rows], items[rows]
            with autocast_for(dev, "auto"):
                s = model(to_float_video(self.data.videos[i]).to(dev), self.data.caption_ids[c].to(dev),
                          self.data.caption_mask[c].to(dev)).logits.float()
            check_scores(s, f"VTM scores of captions {int(c[0])}..{int(c[-1])}")
            out[rows] = s.cpu()
        return out.view(n, k)

    def correct(self, logits: Tensor) -> Tensor:
        return t2v_ranks(logits, self.target) == 1

    def metrics(self, logits: Tensor) -> dict:
        ranks = t2v_ranks(logits, self.target)
        k = self.candidates.shape[1]
        out = {f"t2v_r{r}": (ranks <= r).double().mean().item() for r in (1, 5, 10) if r < k}
        return {**out, "n_captions": self.n, "candidates": k}

    @torch.inference_mode()
    def gflops(self, model: nn.Module) -> float:
        """One caption with its ``k`` candidates at the model's current latent
        count (torch's counter), at the longest caption's length."""
        video, ids, mask = dummy_inputs(model, self.data.videos.shape[1], used_width(self.data.caption_mask), 2)
        return count_flops(lambda: model(video, ids, mask), model) / 2 * self.candidates.shape[1] / 1e9

    @torch.inference_mode()
    def features(self, model: nn.Module, batch_size: int, device) -> Tensor:
        """``model.probe_inputs`` of each caption alone ``[n, D]``: how hard it
        is to match, read before any pair is scored."""
        dev = for_inference(model, device)
        out = []
        for rows in row_batches(self.n, batch_size):
            ids, mask = self.data.caption_ids[rows].to(dev), self.data.caption_mask[rows].to(dev)
            model.check_text(ids, mask)
            with autocast_for(dev, "auto"):
                out.append(model.probe_inputs(*model.embed_inputs(None, ids, mask)).float().cpu())
        return torch.cat(out)

    @torch.inference_mode()
    def probe_gflops(self, model: nn.Module) -> float:
        """``features`` of one caption (torch's counter)."""
        _, ids, mask = dummy_inputs(model, self.data.videos.shape[1], used_width(self.data.caption_mask), 2)
        return count_flops(lambda: model.probe_inputs(*model.embed_inputs(None, ids, mask)), model) / 2 / 1e9
