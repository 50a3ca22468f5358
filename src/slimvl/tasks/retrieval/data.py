"""Retrieval data in tensor form and the batches of a training step (units
of near-duplicate groups, a pure function of ``(seed, step)``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from ...runtime import gather, host_to, video_to
from ..base import InputsBatch, log_fitting, used_width
from .hard_negatives import compose_videos, partners, swap_table
from .losses import gumbel_noise, random_negatives

if TYPE_CHECKING:
    from ...data.tokenizer import Tokenizer
    from ...train import TrainConfig


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
class UnitBatch(InputsBatch):
    """One step's tensors for ``U`` units of ``P`` items (one caption each).

    ``inputs`` holds row ``i``'s item and its own caption: ``video`` float
    ``[U*P, T, 3, H, W]``, ``text``/``text_mask`` ``[U*P, L]``. The
    other-group negatives are drawn from the step's seed, so a resumed or
    data-parallel run draws the same ones: ``negatives`` ``[U, P, E]``
    (``"shared"``) or ``noise`` ``[U, 2, P, P]`` (Gumbel noise that draws
    random or similarity-mined negatives). ``hard`` holds the bi-modal hard
    negatives of each row (``TrainConfig.hard_negatives``): ``text`` /
    ``text_mask`` / ``text_valid`` (``[U*P]``, False where a caption had no
    word to swap) and ``video``, those that were asked for.
    """

    inputs: dict[str, torch.Tensor]
    units: int
    negatives: torch.Tensor | None = None
    noise: torch.Tensor | None = None
    hard: dict[str, torch.Tensor] | None = None


def unit_batch(data: RetrievalData, captions: np.ndarray, device: torch.device,
               negatives: torch.Tensor | None = None, noise: torch.Tensor | None = None,
               hard: dict[str, torch.Tensor] | None = None, bucket: bool = False) -> UnitBatch:
    """Gather the tensors of the given units (caption indices ``[U, P]``);
    ``bucket``: text width rounded up to a power of two (``used_width``)."""
    caps = torch.as_tensor(captions).flatten()
    width = used_width(data.caption_mask[caps], bucket)
    move = lambda t: None if t is None else host_to(t, device)  # noqa: E731
    if hard is not None and "text" in hard:
        hard = {**hard, "text": hard["text"][:, :width], "text_mask": hard["text_mask"][:, :width]}
    inputs = {"video": video_to(gather(data.videos, data.caption_item[caps]), device),
              "text": host_to(data.caption_ids[caps, :width], device),
              "text_mask": host_to(data.caption_mask[caps, :width], device)}
    return UnitBatch(inputs, len(captions), move(negatives), move(noise),
                     None if hard is None else {k: video_to(v, device) if k == "video" else host_to(v, device)
                                                        for k, v in hard.items()})


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
    hard = None
    if cfg.hard_negatives != "none":  # this rank's rows of the global batch
        rows = np.arange(captions.size).reshape(captions.shape)[rank::world].flatten()
        hard = hard_negative_batch(data, cfg, step, captions, rows)
    return unit_batch(data, captions[rank::world], device, negatives, noise, hard, bucket=cfg.compile)


def hard_negative_batch(data: RetrievalData, cfg: "TrainConfig", step: int, captions: np.ndarray,
                        rows: np.ndarray | None = None) -> dict[str, torch.Tensor]:
    """The hard negatives of step ``step``'s units (caption indices
    ``[U, P]``), for the rows ``rows`` of the flattened units (None: all):
    swapped captions (``text``, ``text_mask``, ``text_valid``) and composed
    videos (``video``, uint8 where the data's videos are: the batch
    converts them on the device), as ``cfg.hard_negatives`` asks.

    Every draw is a function of ``(seed, step)`` and the row alone, so a
    data-parallel rank builds only its own rows and gets what one process
    would have given them.
    """
    every = torch.as_tensor(captions).flatten()
    rows = np.arange(every.numel()) if rows is None else np.asarray(rows)
    caps = every[torch.as_tensor(rows)]
    out: dict[str, torch.Tensor] = {}
    if cfg.hard_negatives in ("captions", "both"):
        if data.tokenizer is None:
            raise ValueError("TrainConfig.hard_negatives: negative captions swap words, which needs the data's "
                             "tokenizer (RetrievalData.tokenizer is None)")
        table = swap_table(data.tokenizer)
        if not table.size:
            raise ValueError("TrainConfig.hard_negatives: the tokenizer has none of the world's colour, shape, size "
                             "or motion words as single tokens, so no caption can be swapped; use 'videos'")
        mask = data.caption_mask[caps]
        rngs = [np.random.default_rng([cfg.seed, step, 2, int(r)]) for r in rows]
        ids, valid = table.swap(data.caption_ids[caps], mask, rngs, cfg.swap_fraction)
        out.update(text=ids, text_mask=mask, text_valid=valid)
    if cfg.hard_negatives in ("videos", "both"):
        u, p = captions.shape
        rng = np.random.default_rng([cfg.seed, step, 3])  # cheap draws for the global batch, then this rank's rows
        other = (partners(rng, u, cfg.groups_per_unit, data.group_size) + (np.arange(u) * p)[:, None]).flatten()
        right = torch.from_numpy(rng.integers(2, size=every.numel()).astype(bool))[torch.as_tensor(rows)]
        videos = gather(data.videos, data.caption_item[caps])
        others = gather(data.videos, data.caption_item[every[torch.as_tensor(other[rows])]])
        out["video"] = compose_videos(videos, others, right, cfg.compose)  # uint8: converted on the device
    return out


