"""Retrieval training: the data in tensor form, the batches of a step
(units of near-duplicate groups), and the VTM + contrastive objective.

    data  ->  units of near-duplicate groups  ->  model scores pairs
          ->  VTM hard-negative loss (+ contrastive)

Batches are a pure function of ``(seed, step)``, so a resumed run sees the
same batches as an uninterrupted one, and each DDP rank takes its share of
the same global batch.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..runtime import to_float_video
from .base import Task
from .retrieval import (contrastive_loss, gumbel_noise, mined_negatives, pair_layout, random_negatives,
                        similarity_logits, vtm_group_loss)

if TYPE_CHECKING:
    from ..data.tokenizer import Tokenizer
    from ..train import TrainConfig

log = logging.getLogger("slimvl")


def log_fitting(dataset, n_texts: int, truncated: int, max_len: int, what: str) -> None:
    """One log line per split saying how many texts were cut to ``max_len``
    tokens and how many videos were padded by repeating their last frame
    (nothing is logged when neither happened)."""
    padded = getattr(dataset, "padded", 0)
    parts = []
    if truncated:
        parts.append(f"{truncated} of {n_texts} {what} cut to {max_len} tokens")
    if padded:
        parts.append(f"{padded} of {len(dataset)} videos had fewer than {dataset.frames} frames (last frame "
                     "repeated)")
    if parts:
        log.info("%s/%s: %s", dataset.root, dataset.split, "; ".join(parts))


@dataclass
class RetrievalData:
    """Training/evaluation data in tensor form.

    Attributes:
        videos: uint8 ``[n_items, T, 3, H, W]``.
        caption_ids / caption_mask: ``[n_captions, L]`` token ids and bool mask.
        caption_item: ``[n_captions]`` the item each caption describes.
        groups: list of item-index lists (near-duplicate groups, equal size).
        heldout: optional bool per item (compositional held-out scene).
        scenes: optional synthetic scene description per item (for error analysis).
        skipped: media files left out as unreadable (``skip_bad``), for the run's log.
        tokenizer: the tokenizer of ``caption_ids`` (kept in checkpoints), if known.
        fingerprint: the dataset's fingerprint (``slimvl.data.dataset_fingerprint``), if known.
        truncated / padded: captions cut to fit ``L``, and videos shorter than
            ``T`` frames whose last frame was repeated.
    """

    videos: torch.Tensor
    caption_ids: torch.Tensor
    caption_mask: torch.Tensor
    caption_item: torch.Tensor
    groups: list[list[int]]
    heldout: list[bool] | None = None
    scenes: list[dict] | None = None
    skipped: list[str] = field(default_factory=list)
    tokenizer: "Tokenizer | None" = None
    fingerprint: str | None = None
    truncated: int = 0
    padded: int = 0

    @classmethod
    def from_dataset(cls, dataset, tokenizer, max_len: int, group_size: int = 4) -> "RetrievalData":
        """Tokenise a ``VideoTextDataset``'s captions and index its groups.

        Items without a recorded group (real data) are put in consecutive
        groups of ``group_size``: they are then ordinary in-batch negatives.
        """
        texts, owner = [], []
        for i, rec in enumerate(dataset.records):
            for cap in rec.captions:
                texts.append(cap)
                owner.append(i)
        stats: dict = {}
        ids, mask = tokenizer.encode(texts, max_len, stats)
        log_fitting(dataset, len(texts), stats["truncated"], max_len, "captions")
        by_group: dict[int, list[int]] = {}
        gids = dataset.groups if dataset.groups is not None else [None] * len(dataset.records)
        for i, g in enumerate(gids):
            by_group.setdefault(g if g is not None else -1 - i // group_size, []).append(i)
        sizes = {len(v) for v in by_group.values()}
        k = max(sizes, key=lambda s: sum(len(v) == s for v in by_group.values()))
        groups = [v for v in by_group.values() if len(v) == k]
        heldout = getattr(dataset, "heldout", None)
        scenes = getattr(dataset, "scenes", None)
        return cls(dataset.videos, ids, mask, torch.tensor(owner), groups,
                   list(heldout) if heldout is not None and None not in heldout else None,
                   list(scenes) if scenes is not None and None not in scenes else None,
                   [str(path) for path, _ in getattr(dataset, "skipped", [])], tokenizer,
                   getattr(dataset, "fingerprint", None), stats["truncated"], getattr(dataset, "padded", 0))

    @property
    def group_size(self) -> int:
        return len(self.groups[0])


def sample_units(data: RetrievalData, n_units: int, groups_per_unit: int, seed: int, step: int) -> np.ndarray:
    """Caption indices ``[n_units, groups_per_unit * k]``: distinct groups, one
    caption per item (a caption identifies its item), chosen
    deterministically from ``(seed, step)``."""
    rng = np.random.default_rng([seed, step])
    need = n_units * groups_per_unit
    if need > len(data.groups):
        raise ValueError(f"need {need} near-duplicate groups per step, the data has {len(data.groups)}")
    chosen = rng.choice(len(data.groups), size=need, replace=False)
    items = np.array([data.groups[g] for g in chosen]).reshape(n_units, -1)
    caption_item = data.caption_item.numpy()
    out = np.empty_like(items)
    for idx, item in np.ndenumerate(items):
        own = np.flatnonzero(caption_item == item)
        out[idx] = own[rng.integers(len(own))]
    return out


@dataclass
class UnitBatch:
    """One step's tensors for ``U`` units of ``P`` items (one caption each).

    ``video`` is float ``[U*P, T, 3, H, W]``, ``ids``/``mask`` the items'
    captions ``[U*P, L]``. The other-group negatives are drawn from the
    step's seed, so a resumed or data-parallel run draws the same ones:
    ``negatives`` ``[U, P, E]`` (``"shared"``) or ``noise`` ``[U, 2, P, P]``
    (Gumbel noise that draws random or similarity-mined negatives).
    """

    video: torch.Tensor
    ids: torch.Tensor
    mask: torch.Tensor
    units: int
    negatives: torch.Tensor | None = None
    noise: torch.Tensor | None = None


def unit_batch(data: RetrievalData, captions: np.ndarray, device: torch.device,
               negatives: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> UnitBatch:
    """Gather the tensors of the given units (caption indices ``[U, P]``)."""
    caps = torch.as_tensor(captions).flatten()
    # Trim text padding that no caption of this step uses: masked keys do not
    # change the result, they only cost time.
    width = int(data.caption_mask[caps].any(0).nonzero().max()) + 1
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return UnitBatch(to_float_video(data.videos[data.caption_item[caps]]).to(device),
                     data.caption_ids[caps, :width].to(device), data.caption_mask[caps, :width].to(device),
                     len(captions), move(negatives), move(noise))


def step_batch(data: RetrievalData, cfg: "TrainConfig", step: int, rank: int, world: int,
               device: torch.device) -> UnitBatch:
    """This rank's share (every ``world``-th unit) of step ``step``'s global batch."""
    n_units = cfg.groups_per_step // cfg.groups_per_unit
    captions = sample_units(data, n_units, cfg.groups_per_unit, cfg.seed, step)
    p, e = captions.shape[1], cfg.negatives_per_item
    rng = np.random.default_rng([cfg.seed, step, 1])
    negatives = noise = None
    if cfg.negatives == "shared":
        negatives = random_negatives(rng, n_units, cfg.groups_per_unit, data.group_size, e)[rank::world]
    else:
        noise = gumbel_noise(rng, (n_units, 2, p, p))[rank::world]
    return unit_batch(data, captions[rank::world], device, negatives, noise)


class RetrievalObjective(torch.nn.Module):
    """The training loss as a module (so that DDP sees a single forward):
    VTM over in-batch hard negatives, plus ``itc_weight`` times a contrastive
    term between videos and texts encoded alone by the same network.

    The contrastive term is there because it teaches the shared embeddings
    and layers what each word and patch means from ``P*P`` comparisons per
    unit at the cost of ``2P`` unimodal passes, while VTM alone learns from a
    single logit per pair. With ``negatives="mined"`` its similarities also
    pick the other-group negatives that VTM is trained on.

    Perceiver-VL's streams (``config.stream``) change what runs: ``"multi"``
    scores pairs by the embeddings' dot product, so its loss is the
    contrastive term alone; ``"mixed"`` encodes each video and caption of the
    unit once and decodes every scored pair from those latents.
    """

    def __init__(self, model: torch.nn.Module, group_size: int, cfg: "TrainConfig"):
        super().__init__()
        self.model, self.group_size = model, group_size
        self.stream = getattr(model.config, "stream", "single")
        self.itc_weight, self.n_neg, self.mined = cfg.itc_weight, cfg.negatives_per_item, cfg.negatives == "mined"
        if self.stream == "multi" and not self.itc_weight:
            raise ValueError("TrainConfig.itc_weight=0: stream='multi' is trained by the contrastive term alone")
        self.vtm_items = cfg.vtm_groups_per_unit * group_size  # 0: every item of the unit is a VTM query

    def _embed(self, b: UnitBatch) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.model.config.embed_dim
        v = self.model.embed_video(b.video).float().view(b.units, -1, e)
        t = self.model.embed_text(b.ids, b.mask).float().view(b.units, -1, e)
        return v, t

    def forward(self, b: UnitBatch) -> tuple[torch.Tensor, dict[str, float]]:
        u, p = b.units, b.video.shape[0] // b.units
        parts: dict[str, float] = {}
        itc = v = t = v_lat = t_lat = None
        if self.stream == "mixed":  # one encoding per item serves the contrastive term and every pair
            v_lat, t_lat = self.model.video_latents(b.video), self.model.text_latents(b.ids, b.mask)
            e = self.model.config.embed_dim
            v, t = self.model.pool(v_lat).float().view(u, -1, e), self.model.pool(t_lat).float().view(u, -1, e)
        if self.itc_weight:
            if v is None:
                v, t = self._embed(b)
            itc = contrastive_loss(v, t, self.model.logit_scale)
            parts["itc"] = itc.item()
        if self.stream == "multi":
            return itc, parts
        with torch.no_grad():
            if b.negatives is not None:
                layout = pair_layout(self.group_size, b.negatives)
            else:
                sim = b.noise.new_zeros(u, p, p)  # flat: Gumbel-top-k of noise alone is uniform sampling
                if self.mined:
                    if v is None:
                        v, t = self._embed(b)
                    sim = similarity_logits(v, t, self.model.logit_scale)
                q = self.vtm_items or p
                t2v_neg, v2t_neg = mined_negatives(sim, self.group_size, self.n_neg, b.noise)
                # Only the first q items are VTM queries; their negatives may be any other-group item.
                layout = pair_layout(self.group_size, t2v_neg[:, :q], v2t_neg[:, :q])
            offset = (torch.arange(u, device=b.video.device) * p)[:, None]
            cap, vid = (layout.caption + offset).flatten(), (layout.video + offset).flatten()
        if v_lat is not None:
            logits = self.model.score_latents(v_lat[vid], t_lat[cap]).float()
        else:
            logits = self.model(b.video[vid], b.ids[cap], b.mask[cap]).logits.float()
        vtm = vtm_group_loss(logits.view(u, -1), layout)
        parts["vtm"] = vtm.item()
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
        return batch.video.shape[0]

    def evaluate(self, model: torch.nn.Module, data: RetrievalData, device: torch.device) -> dict[str, float]:
        from ..evaluate import evaluate  # evaluation builds on this module's data types

        m = evaluate(model, data, device=device, progress=False)
        keep = ("t2v_r1", "t2v_r5", "t2v_r10", "v2t_r1", "v2t_r5", "v2t_r10", "heldout_t2v_r1")
        return {k: m[k] for k in keep if k in m}
