"""Retrieval as a training task: the VTM + contrastive objective over a
step's units, and evaluation by Recall@K.

    data  ->  units of near-duplicate groups  ->  model scores pairs
          ->  VTM hard-negative loss (+ contrastive)

Batches are a pure function of ``(seed, step)``, so a resumed run sees the
same batches as an uninterrupted one, and each DDP rank takes its share of
the same global batch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..base import Task
from ..registry import TaskEntry, TaskSource, register_task
from .data import RetrievalData, UnitBatch, step_batch
from .evaluate import evaluate
from .losses import contrastive_loss, mined_negatives, pair_layout, similarity_logits, vtm_group_loss

if TYPE_CHECKING:
    from ...train import TrainConfig


class RetrievalObjective(torch.nn.Module):
    """The training loss as a module (so that DDP sees a single forward):
    VTM over in-batch hard negatives, plus ``itc_weight`` times a contrastive
    term between videos and texts encoded alone by the same network.

    The contrastive term is there because it teaches the shared embeddings
    and layers what each word and patch means from ``P*P`` comparisons per
    unit at the cost of ``2P`` unimodal passes, while VTM alone learns from a
    single logit per pair. With ``negatives="mined"`` its similarities also
    pick the other-group negatives that VTM is trained on.

    What runs is the model's to say (its protocol, ``slimvl.models.base``):
    a model without a pair scorer (Perceiver-VL's multi stream: its pair
    score is the embeddings' similarity) is trained by the contrastive term
    alone; one whose pairs reuse its unimodal encodings (the mixed stream)
    encodes each video and caption of the unit once and scores every pair
    from that.
    """

    def __init__(self, model: torch.nn.Module, group_size: int, cfg: "TrainConfig"):
        super().__init__()
        self.model, self.group_size = model, group_size
        self.itc_weight, self.n_neg, self.mined = cfg.itc_weight, cfg.negatives_per_item, cfg.negatives == "mined"
        if not model.has_pair_scorer and not self.itc_weight:
            raise ValueError(f"TrainConfig.itc_weight=0: this {model.config.model_type} scores pairs by its "
                             "embeddings' similarity (e.g. stream='multi'), so the contrastive term is its only loss")
        self.vtm_items = cfg.vtm_groups_per_unit * group_size  # 0: every item of the unit is a VTM query

    def _unimodal(self, b: UnitBatch) -> tuple[torch.Tensor, torch.Tensor, object]:
        """Unit-shaped embeddings ``[U, P, E]`` of the videos and texts, and what pairs may reuse."""
        e = self.model.config.embed_dim
        v, t, reuse = self.model.encode_unimodal(b.inputs)
        return v.float().view(b.units, -1, e), t.float().view(b.units, -1, e), reuse

    def _hard(self, b: UnitBatch) -> dict[str, torch.Tensor]:
        """The unit-shaped embeddings ``[U, P, E]`` of the batch's hard
        negatives, as ``contrastive_loss`` keywords (none: empty)."""
        if b.hard is None:
            return {}
        out, shape = {}, (b.units, -1, self.model.config.embed_dim)
        if "video" in b.hard:
            out["hard_video"] = self.model.embed_video(b.hard["video"]).float().view(shape)
        if "text" in b.hard:
            out["hard_text"] = self.model.embed_text(b.hard["text"], b.hard["text_mask"]).float().view(shape)
            out["hard_text_valid"] = b.hard["text_valid"].view(b.units, -1)
        return out

    def forward(self, b: UnitBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        u, p = b.units, b.size // b.units
        parts: dict[str, torch.Tensor | float] = {}
        itc = v = t = reuse = None
        if self.itc_weight or self.model.pairs_reuse_encodings:
            v, t, reuse = self._unimodal(b)
        if self.itc_weight:
            itc = contrastive_loss(v, t, self.model.logit_scale, **self._hard(b))
            parts["itc"] = itc.detach()
        if not self.model.has_pair_scorer:
            return itc, parts
        with torch.no_grad():
            if b.negatives is not None:
                layout = pair_layout(self.group_size, b.negatives)
            else:
                sim = b.noise.new_zeros(u, p, p)  # flat: Gumbel-top-k of noise alone is uniform sampling
                if self.mined:
                    if v is None:
                        v, t, _ = self._unimodal(b)
                    sim = similarity_logits(v, t, self.model.logit_scale)
                q = self.vtm_items or p
                t2v_neg, v2t_neg = mined_negatives(sim, self.group_size, self.n_neg, b.noise)
                # Only the first q items are VTM queries; their negatives may be any other-group item.
                layout = pair_layout(self.group_size, t2v_neg[:, :q], v2t_neg[:, :q])
            offset = (torch.arange(u, device=b.device) * p)[:, None]
            cap, vid = (layout.caption + offset).flatten(), (layout.video + offset).flatten()
        logits = self.model.score_pairs(b.inputs, vid, cap, reuse).float()
        vtm = vtm_group_loss(logits.view(u, -1), layout)
        parts["vtm"] = vtm.detach()
        loss = vtm if itc is None else vtm + self.itc_weight * itc
        return loss, parts


class RetrievalTask(Task):
    """Video-text retrieval: VTM over in-batch hard negatives (plus the
    contrastive term), evaluated by Recall@K. The default task of ``train``."""

    name = "retrieval"
    headline = "t2v_r1"

    def __init__(self, data: RetrievalData):
        self.data = data

    def check(self, cfg, world: int) -> None:
        n_units = cfg.groups_per_step // cfg.groups_per_unit
        if n_units % world:
            raise ValueError(f"groups_per_step={cfg.groups_per_step} gives {n_units} units, "
                             f"not divisible by {world} processes")

    def objective(self, model: torch.nn.Module, cfg) -> torch.nn.Module:
        return RetrievalObjective(model, self.data.group_size, cfg)

    def batch(self, cfg, step: int, rank: int, world: int, device: torch.device) -> UnitBatch:
        return step_batch(self.data, cfg, step, rank, world, device)

    def samples(self, batch: UnitBatch) -> int:
        return batch.size

    def evaluate(self, model: torch.nn.Module, data: RetrievalData, device: torch.device) -> dict[str, float]:
        m = evaluate(model, data, device=device, progress=False)
        keep = ("t2v_r1", "t2v_r5", "t2v_r10", "v2t_r1", "v2t_r5", "v2t_r10", "heldout_t2v_r1")
        return {k: m[k] for k in keep if k in m}


def load_retrieval_split(source: TaskSource, split: str, config) -> RetrievalData:
    """One split of ``source``'s dataset as ``RetrievalData`` for a model of ``config``."""
    from ...pipeline import load_split

    return load_split(source.root, split, source.tokenizer, source.frames, config.image_size, config.max_text_len,
                      skip_bad=source.skip_bad, progress=source.progress)


def _evaluate(model, data: RetrievalData, source: TaskSource, device, batch_size: int, progress: bool) -> dict:
    return evaluate(model, data, batch_size=batch_size, device=device, progress=progress)


def _evaluate_policy(model, data: RetrievalData, calibration, source: TaskSource, device, batch_size: int,
                     queries: dict) -> dict:
    from ...dynamic import evaluate_retrieval_policy

    return evaluate_retrieval_policy(model, data, calibration=calibration, batch_size=batch_size, device=device,
                                     **queries)


register_task(TaskEntry(
    "retrieval", "VTM over in-batch hard negatives plus the contrastive term; Recall@K both ways",
    load=load_retrieval_split, build=lambda source, data, config: RetrievalTask(data), evaluate=_evaluate,
    evaluate_policy=_evaluate_policy))
