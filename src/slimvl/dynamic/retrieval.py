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

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..bench.flops import dummy_batch
from ..runtime import autocast_for, video_to
from ..tasks.base import check_scores, for_inference, row_batches, used_width
from ..tasks.retrieval.data import RetrievalData
from ..tasks.retrieval.metrics import t2v_ranks
from .inputs import PolicyInputs

if TYPE_CHECKING:  # the models are not imported at run time: a prepared array is whatever model.prepare made
    from ..models.latents import InputArray


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
class VTMInputs(PolicyInputs):
    """Captions with their candidate items (``RetrievalData``) as a policy sees them.

    Attributes:
        data: the split.
        candidates: ``[n_captions, k]`` item indices (None: every item of
            the split); each caption's own item must be among them.
    The model's batch holds every (caption, candidate) pair of its captions;
    the learned policy's probe reads the caption alone.
    """

    data: RetrievalData
    candidates: Tensor | None = None
    probe_shares_array = False

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
        if (c.sort(1).values.diff(dim=1) == 0).any():
            raise ValueError("candidates: an item appears twice in a caption's list (it would tie with itself)")

    @property
    def n(self) -> int:
        return len(self.data.caption_item)

    @property
    def pairs_per_input(self) -> int:
        return self.candidates.shape[1]

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

    def batches(self, batch_size: int) -> Iterator[Tensor]:
        """Captions, as many as make ``batch_size`` pairs (at least one)."""
        return row_batches(self.n, max(1, batch_size // self.pairs_per_input))

    def model_inputs(self, rows: Tensor, device: torch.device) -> dict:
        """Every (caption, candidate) pair of the captions ``rows``, caption by caption."""
        k, d = self.pairs_per_input, self.data
        width = used_width(d.caption_mask[rows])
        return {"video": video_to(d.videos[self.candidates[rows].flatten()], device),
                "text": d.caption_ids[rows, :width].repeat_interleave(k, 0).to(device),
                "text_mask": d.caption_mask[rows, :width].repeat_interleave(k, 0).to(device)}

    def dummy(self, model: nn.Module) -> dict:
        """Two captions' pairs at the longest caption's length."""
        return dummy_batch(model, self.data.videos.shape[1], used_width(self.data.caption_mask),
                           2 * self.pairs_per_input)

    def array_rows(self, array: InputArray, rows: Tensor) -> InputArray:
        k = self.pairs_per_input
        return array.rows((rows[:, None] * k + torch.arange(k)).flatten())

    def logits_array(self, model: nn.Module, array: InputArray) -> Tensor:
        scores = model.vtm_array(array).float()
        check_scores(scores, "VTM scores")
        return scores.view(-1, self.pairs_per_input)

    def probe_array(self, model: nn.Module, array: InputArray | None, inputs: dict) -> Tensor:
        """``model.probe_inputs`` of each caption alone ``[b, D]``: how hard it
        is to match, read before any pair is scored."""
        k = self.pairs_per_input
        ids, mask = inputs["text"][::k], inputs["text_mask"][::k]
        model.check_text(ids, mask)
        return model.probe_inputs(*model.embed_inputs(None, ids, mask))

    @torch.inference_mode()
    def logits(self, model: nn.Module, batch_size: int, device) -> Tensor:
        """VTM scores ``[n, k]`` (float32, CPU) of each caption with its candidates."""
        dev = for_inference(model, device)
        out = []
        for rows in self.batches(batch_size):
            with autocast_for(dev, "auto"):
                out.append(self.logits_array(model, self.prepare(model, self.model_inputs(rows, dev))).cpu())
        return torch.cat(out)

    def correct(self, logits: Tensor) -> Tensor:
        return t2v_ranks(logits, self.target) == 1

    def metrics(self, logits: Tensor) -> dict:
        ranks = t2v_ranks(logits, self.target)
        k = self.pairs_per_input
        out = {f"t2v_r{r}": (ranks <= r).double().mean().item() for r in (1, 5, 10) if r < k}
        # "accuracy" is R@1 over the candidate list: what the policy is right about.
        return {"accuracy": (ranks == 1).double().mean().item(), **out, "n_captions": self.n, "candidates": k}
