"""One training loop for every slimvl model, readable top to bottom.

    data  ->  units of near-duplicate groups  ->  model scores pairs
          ->  VTM hard-negative loss  ->  AdamW step  ->  checkpoint

Batches are a pure function of ``(seed, step)``, so a resumed run sees the
same batches as an uninterrupted one, and each DDP rank takes its share of
the same global batch.
"""
from __future__ import annotations

import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .checkpoint import atomic_write_json, latest_checkpoint, load_training_state, save_checkpoint
from .tasks.retrieval import (contrastive_loss, gumbel_noise, mined_negatives, pair_layout, random_negatives,
                             similarity_logits, vtm_group_loss)

log = logging.getLogger("slimvl")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainConfig:
    """Hyper-parameters of ``train``.

    ``groups_per_step`` is the global batch in near-duplicate groups, split
    into units of ``groups_per_unit`` groups (negatives and the contrastive
    term stay within a unit, so a data-parallel run splits a step exactly by
    units). Each caption and each video meets its group's near-duplicates and
    ``negatives_per_item`` items of the unit's other groups: ``"random"``
    (drawn independently for captions and videos), ``"mined"`` (drawn by
    unimodal similarity, the most similar most likely) or ``"shared"``
    (random, one scored pair serving as a negative in both directions: fewer
    pairs per step). ``vtm_groups_per_unit`` lets the contrastive term see
    more groups than VTM scores: unimodal passes are cheaper than pairs, and
    on the synthetic world a larger contrastive pool was the biggest gain
    (the demo: units of 8 groups, VTM on 4; see BENCHMARKS.md).
    """

    steps: int = 500
    groups_per_step: int = 8
    groups_per_unit: int = 4
    vtm_groups_per_unit: int = 0  # groups of a unit scored by VTM (0: all); the rest serve ITC and as negatives
    negatives_per_item: int = 1
    negatives: str = "random"
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 30
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    itc_weight: float = 1.0
    seed: int = 0
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    eval_every: int = 0  # evaluate on ``train(val_data=...)`` every this many steps (0: never)
    # Two-stage schedule after a pretrained initialisation (``slimvl.models.pretrained``):
    # the loaded parameters stay frozen for this many steps while the new parts
    # (cross-attentions, latents, decoder) learn to use them; then all train.
    frozen_pretrained_steps: int = 0
    amp: str = "auto"  # "auto" (bf16 on GPUs that support it), "bf16" or "off"
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.groups_per_unit < 1:
            raise ValueError(f"TrainConfig.groups_per_unit={self.groups_per_unit}: must be >= 1")
        if self.groups_per_step < self.groups_per_unit or self.groups_per_step % self.groups_per_unit:
            raise ValueError(f"TrainConfig.groups_per_step={self.groups_per_step}: must be a positive multiple "
                             f"of groups_per_unit={self.groups_per_unit}")
        if not 0 <= self.vtm_groups_per_unit <= self.groups_per_unit or \
                (self.negatives == "shared" and self.vtm_groups_per_unit not in (0, self.groups_per_unit)):
            raise ValueError(f"TrainConfig.vtm_groups_per_unit={self.vtm_groups_per_unit}: must be in "
                             f"0..groups_per_unit={self.groups_per_unit} (0 = all), and all with shared negatives")
        if self.negatives not in ("random", "mined", "shared"):
            raise ValueError(f"TrainConfig.negatives={self.negatives!r}: must be 'random', 'mined' or 'shared'")
        if not 0 <= self.negatives_per_item < self.groups_per_unit and self.negatives == "shared":
            raise ValueError(f"TrainConfig.negatives_per_item={self.negatives_per_item}: shared negatives come "
                             f"one from each other group, so 0..{self.groups_per_unit - 1} with "
                             f"groups_per_unit={self.groups_per_unit}")
        if self.negatives_per_item < 0 or (self.negatives_per_item and self.groups_per_unit < 2):
            raise ValueError(f"TrainConfig.negatives_per_item={self.negatives_per_item}: must be >= 0, and 0 "
                             f"when a unit has a single group (groups_per_unit=1)")
        if self.steps <= 0:
            raise ValueError(f"TrainConfig.steps={self.steps}: must be positive")
        if self.frozen_pretrained_steps < 0:
            raise ValueError(f"TrainConfig.frozen_pretrained_steps={self.frozen_pretrained_steps}: must be >= 0")
        if self.amp not in ("auto", "bf16", "off"):
            raise ValueError(f"TrainConfig.amp={self.amp!r}: must be 'auto', 'bf16' or 'off'")


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
    """

    videos: torch.Tensor
    caption_ids: torch.Tensor
    caption_mask: torch.Tensor
    caption_item: torch.Tensor
    groups: list[list[int]]
    heldout: list[bool] | None = None
    scenes: list[dict] | None = None
    skipped: list[str] = field(default_factory=list)

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
        ids, mask = tokenizer.encode(texts, max_len)
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
                   [str(path) for path, _ in getattr(dataset, "skipped", [])])

    @property
    def group_size(self) -> int:
        return len(self.groups[0])


def to_float_video(video_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 frames ``[..., 3, H, W]`` -> float in [-1, 1]."""
    return video_uint8.float().div_(127.5).sub_(1.0)


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


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up then cosine decay to ``min_lr_ratio * lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_for(device: torch.device, amp: str):
    """bf16 autocast where asked for (``"bf16"``) or, with ``"auto"``, on GPUs
    that support it; on CPU ``"auto"`` stays fp32 (bf16 matmuls are slower on
    most CPUs without AMX)."""
    use = amp == "bf16" or (amp == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    return torch.autocast(device.type, dtype=torch.bfloat16) if use else nullcontext()


@dataclass
class TrainResult:
    """What ``train`` returns: the loss curve and timing."""

    steps: int
    seconds: float
    history: list[dict] = field(default_factory=list)
    checkpoint: str | None = None
    evals: list[dict] = field(default_factory=list)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    # No decay on biases, norms, embeddings tables of positions/latents.
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and "pos" not in name and "latents" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train(model: torch.nn.Module, data: RetrievalData, cfg: TrainConfig, run_dir: str | Path | None = None,
          resume: bool = False, progress: bool = True, stop_after: int | None = None,
          val_data: RetrievalData | None = None) -> TrainResult:
    """Train ``model`` on ``data`` with the in-batch hard-negative VTM objective.

    Args:
        val_data: evaluated (Recall@K, see ``slimvl.evaluate``) every
            ``cfg.eval_every`` steps and at the end; the learning curve goes
            to ``TrainResult.evals`` and the run's log. Evaluation time is not
            counted in the training seconds.
        run_dir: where checkpoints (``run_dir/checkpoints/step_*``) and the log
            (``run_dir/train_log.json``) go; None keeps nothing on disk.
        resume: continue from the newest checkpoint in ``run_dir``.
        stop_after: end after this many steps (for tests of resuming).

    Runs data-parallel when launched by ``torchrun`` (gloo on CPU, nccl on
    GPU): each rank scores its share of the units of the same global batch.
    """
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = resolve_device(cfg.device)
    rank, world = 0, 1
    if distributed:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    n_units = cfg.groups_per_step // cfg.groups_per_unit
    if n_units % world:
        raise ValueError(f"groups_per_step={cfg.groups_per_step} gives {n_units} units, "
                         f"not divisible by {world} processes")
    torch.manual_seed(cfg.seed)
    model.to(device).train()
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98))
    run_dir = Path(run_dir) if run_dir is not None else None
    start, history, evals = 0, [], []
    if resume and run_dir is not None and (ckpt := latest_checkpoint(run_dir)) is not None:
        meta = load_training_state(ckpt, model, optimizer)
        start, history, evals = meta["step"], meta.get("history", []), meta.get("evals", [])
        if rank == 0:
            log.info("resumed from %s at step %d", ckpt, start)
    objective = RetrievalObjective(model, data.group_size, cfg)
    frozen = [p for n, p in model.named_parameters() if n in getattr(model, "pretrained_names", ())]
    if cfg.frozen_pretrained_steps and not frozen:
        raise ValueError(f"TrainConfig.frozen_pretrained_steps={cfg.frozen_pretrained_steps}: nothing was loaded "
                         "from a pretrained checkpoint (slimvl.models.pretrained) to keep frozen")
    net = torch.nn.parallel.DistributedDataParallel(objective, find_unused_parameters=True) if distributed \
        else objective

    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    bar = tqdm(range(start, end), initial=start, total=cfg.steps, disable=not progress or rank != 0,
               desc=f"train {model.config.model_type}", dynamic_ncols=True)
    last_ckpt, t0, seen, eval_seconds = None, time.perf_counter(), 0, 0.0
    for step in bar:
        batch = step_batch(data, cfg, step, rank, world, device)
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, cfg)
        with autocast_for(device, cfg.amp):
            loss, parts = net(batch)
        if not torch.isfinite(loss):
            good = latest_checkpoint(run_dir) if run_dir is not None else None
            raise TrainingDiverged(f"loss is {loss.item()} at step {step}; stopping. "
                                   f"Last good checkpoint: {good or 'none'}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if step < cfg.frozen_pretrained_steps:
            for p in frozen:  # no gradient: AdamW leaves the parameter and its moments alone
                p.grad = None
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()

        seen += batch.video.shape[0] * world
        if (step + 1) % cfg.log_every == 0 or step + 1 == end:
            rate = seen / (time.perf_counter() - t0 - eval_seconds)
            history.append({"step": step + 1, "loss": round(loss.item(), 5),
                            **{k: round(v, 5) for k, v in parts.items()}, "lr": lr_at(step, cfg),
                            "grad_norm": round(gnorm.item(), 4), "samples_per_s": round(rate, 1)})
            bar.set_postfix(loss=f"{loss.item():.3f}", samples_s=f"{rate:.0f}")
        if val_data is not None and cfg.eval_every and rank == 0 and \
                ((step + 1) % cfg.eval_every == 0 or step + 1 == end):
            t_eval = time.perf_counter()
            evals.append(_validate(model, val_data, device, step + 1, t_eval - t0 - eval_seconds))
            model.train()
            eval_seconds += time.perf_counter() - t_eval
            bar.write(f"step {step + 1}: val t2v R@1 {evals[-1]['t2v_r1']:.3f}")
        if run_dir is not None and rank == 0 and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == end):
            last_ckpt = _checkpoint(run_dir, model, optimizer, cfg, step + 1, history, evals)
    seconds = time.perf_counter() - t0 - eval_seconds
    if run_dir is not None and rank == 0:
        atomic_write_json(run_dir / "train_log.json", {"config": asdict(cfg), "history": history, "evals": evals,
                                                       "seconds": seconds, "skipped_media": data.skipped})
    return TrainResult(steps=end, seconds=seconds, history=history, checkpoint=str(last_ckpt) if last_ckpt else None,
                       evals=evals)


def _validate(model: torch.nn.Module, val_data: RetrievalData, device: torch.device, step: int,
              train_seconds: float) -> dict:
    from .evaluate import evaluate  # evaluate builds on this module's data types

    m = evaluate(model, val_data, device=str(device), progress=False)
    keep = ("t2v_r1", "t2v_r5", "t2v_r10", "v2t_r1", "v2t_r5", "v2t_r10", "heldout_t2v_r1")
    return {"step": step, "train_seconds": round(train_seconds, 2), **{k: m[k] for k in keep if k in m}}


def _checkpoint(run_dir: Path, model, optimizer, cfg: TrainConfig, step: int, history: list, evals: list) -> Path:
    root = run_dir / "checkpoints"
    path = save_checkpoint(root / f"step_{step:07d}", model, optimizer,
                           {"step": step, "train_config": asdict(cfg), "history": history, "evals": evals})
    for old in sorted(root.glob("step_*"))[: -cfg.keep_checkpoints]:
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    return path

