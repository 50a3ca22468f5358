"""One training loop for every slimvl model and task, readable top to bottom.

    task batch for (seed, step)  ->  task objective  ->  AdamW step  ->  checkpoint

The task (``slimvl.tasks``: retrieval, QA, MLM, or several at once) says
what a step's examples are and what the loss is; batches are a pure function
of ``(seed, step)``, so a resumed run sees the same batches as an
uninterrupted one, and each DDP rank takes its share of the same global
batch.
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .checkpoint import atomic_write_json, latest_checkpoint, load_training_state, read_meta, save_checkpoint
from .files import ensure_writable_dir, remove_stale_temporaries
from .runtime import autocast_for, resolve_device
from .tasks.base import Task
from .tasks.retrieval import RetrievalData, RetrievalTask

__all__ = ["TrainConfig", "TrainResult", "TrainingDiverged", "TrainingInterrupted", "train", "open_run_dir", "lr_at",
           "LossWatch", "compiled"]

log = logging.getLogger("slimvl")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class TrainingInterrupted(KeyboardInterrupt):
    """Training was stopped by SIGINT (Ctrl-C) or SIGTERM. The step under way
    was finished and, with a run folder, checkpointed: ``checkpoint`` is
    where, ``step`` how far it got; ``train(..., resume=True)`` continues."""

    def __init__(self, step: int, checkpoint: Path | None, signal_name: str):
        super().__init__(f"{signal_name} at step {step}" + (f"; checkpoint {checkpoint}" if checkpoint else ""))
        self.step, self.checkpoint, self.signal_name = step, checkpoint, signal_name


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

    ``hard_negatives`` adds VLDeformer's bi-modal hard negatives to the
    contrastive term, each to the denominator of its own row's query of the
    other modality (``tasks.retrieval.hard_negatives``):
    ``"captions"`` (each caption with ``swap_fraction`` of its colour, shape,
    size and motion words swapped, at least one), ``"videos"`` (each video
    with half of it from another group's, ``compose="space"``: a spatial
    half of every frame, ``"time"``: the later frames), or ``"both"``.
    """

    steps: int = 500
    batch_size: int = 64  # examples per step of the QA and MLM tasks (retrieval counts groups_per_step)
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
    hard_negatives: str = "none"  # "none", "captions", "videos" or "both"
    swap_fraction: float = 0.3
    compose: str = "space"
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
    # torch.compile the task's objective (the model's forward passes and the
    # loss): fewer, fused kernels, which is what a launch-bound GPU step needs.
    # The first steps compile (seconds to minutes); see BENCHMARKS.md.
    compile: bool = False
    compile_mode: str = "default"  # torch.compile's mode: "default", "reduce-overhead", "max-autotune"...
    compile_backend: str = "inductor"  # torch.compile's backend ("aot_eager" traces without generating code)
    # Keep the decoded media (videos, audio) on the device for the whole run,
    # so that a step gathers its batch there instead of copying it from the
    # host: "auto" does on a GPU when they take at most half of its free
    # memory; "on" always, "off" never. Text stays on the host.
    media_on_device: str = "auto"

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
        if self.hard_negatives not in ("none", "captions", "videos", "both"):
            raise ValueError(f"TrainConfig.hard_negatives={self.hard_negatives!r}: must be 'none', 'captions', "
                             "'videos' or 'both'")
        if self.hard_negatives != "none" and not self.itc_weight:
            raise ValueError(f"TrainConfig.hard_negatives={self.hard_negatives!r}: hard negatives join the "
                             "contrastive term, which itc_weight=0 turns off")
        if self.hard_negatives in ("videos", "both") and self.groups_per_unit < 2:
            raise ValueError(f"TrainConfig.hard_negatives={self.hard_negatives!r}: a composed video mixes two "
                             f"groups of a unit; groups_per_unit={self.groups_per_unit} must be >= 2")
        if not 0 < self.swap_fraction <= 1:
            raise ValueError(f"TrainConfig.swap_fraction={self.swap_fraction}: must be in (0, 1]")
        if self.compose not in ("space", "time"):
            raise ValueError(f"TrainConfig.compose={self.compose!r}: must be 'space' or 'time'")
        if self.batch_size < 1:
            raise ValueError(f"TrainConfig.batch_size={self.batch_size}: must be >= 1")
        if self.steps <= 0:
            raise ValueError(f"TrainConfig.steps={self.steps}: must be positive")
        if self.frozen_pretrained_steps < 0:
            raise ValueError(f"TrainConfig.frozen_pretrained_steps={self.frozen_pretrained_steps}: must be >= 0")
        if self.amp not in ("auto", "bf16", "off"):
            raise ValueError(f"TrainConfig.amp={self.amp!r}: must be 'auto', 'bf16' or 'off'")
        if self.media_on_device not in ("auto", "on", "off"):
            raise ValueError(f"TrainConfig.media_on_device={self.media_on_device!r}: must be 'auto', 'on' or 'off'")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"TrainConfig.compile_mode={self.compile_mode!r}: must be one of {list(COMPILE_MODES)}")
        if self.compile and self.compile_backend not in torch._dynamo.list_backends(exclude_tags=()):
            raise ValueError(f"TrainConfig.compile_backend={self.compile_backend!r}: torch.compile knows "
                             f"{sorted(torch._dynamo.list_backends(exclude_tags=()))}")



COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compiled(module: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module:
    """``module`` under ``torch.compile`` as ``cfg`` asks (itself when
    ``cfg.compile`` is off). The module's own parameters and state dict are
    untouched: checkpoints are the same either way."""
    if not cfg.compile:
        return module
    mode = None if cfg.compile_mode == "default" or cfg.compile_backend != "inductor" else cfg.compile_mode
    return torch.compile(module, mode=mode, backend=cfg.compile_backend)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up then cosine decay to ``min_lr_ratio * lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))



@dataclass
class TrainResult:
    """What ``train`` returns: the loss curve and timing (``seconds``: the
    run's training time, the part before a resume included)."""

    steps: int
    seconds: float
    history: list[dict] = field(default_factory=list)
    checkpoint: str | None = None
    evals: list[dict] = field(default_factory=list)
    already_finished: bool = False  # resumed a run that had reached cfg.steps: nothing was trained


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    # No decay on biases, norms, embeddings tables of positions/latents.
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and "pos" not in name and "latents" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train(model: torch.nn.Module, data: "RetrievalData | Task", cfg: TrainConfig,
          run_dir: str | Path | None = None, resume: bool = False, progress: bool = True,
          stop_after: int | None = None, val_data=None) -> TrainResult:
    """Train ``model`` on a task.

    Args:
        data: a ``slimvl.tasks`` task (``QATask``, ``MLMTask``, ``MultiTask``...)
            or ``RetrievalData``, which trains retrieval (the in-batch
            hard-negative VTM objective).
        val_data: held-out data of the task's kind, evaluated (``task.evaluate``)
            every ``cfg.eval_every`` steps and at the end; the learning curve
            goes to ``TrainResult.evals`` and the run's log. Evaluation time is
            not counted in the training seconds.
        run_dir: where checkpoints (``run_dir/checkpoints/step_*``, each with
            the data's tokenizer) and the log (``run_dir/train_log.json``) go;
            None keeps nothing on disk. Checked for writing before the first
            step; a folder that already holds a run is refused unless resuming.
        resume: continue from the newest checkpoint in ``run_dir`` (an error
            if there is none: a mistyped folder must not restart a run from
            step 0). A run that already reached ``cfg.steps`` is loaded and
            returned with ``already_finished=True``.
        stop_after: end after this many steps (for tests of resuming).

    SIGINT (Ctrl-C) and SIGTERM finish the current step, write a checkpoint
    there and raise ``TrainingInterrupted``. Runs data-parallel when
    launched by ``torchrun`` (gloo on CPU, nccl on GPU): each rank takes its
    share of the same global batch.
    """
    task = data if isinstance(data, Task) else RetrievalTask(data)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = resolve_device(cfg.device)
    rank, world, owns_group = 0, 1, False
    if distributed:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            owns_group = True
        rank, world = dist.get_rank(), dist.get_world_size()
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    task.check(cfg, world)
    _check_tokenizer(task, model)
    run_dir = Path(run_dir) if run_dir is not None else None
    ckpt = _agreed(lambda: open_run_dir(run_dir, resume, rank), distributed, device)
    torch.manual_seed(cfg.seed)
    model.to(device).train()
    # The fused kernel updates every parameter in a few launches instead of
    # several per tensor (a launch-bound step spent most of AdamW's time there).
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98),
                                  fused=device.type == "cuda")
    start, history, evals, before = 0, [], [], 0.0
    if ckpt is not None:
        _check_same_run(ckpt, task, cfg, model)
        meta = load_training_state(ckpt, model, optimizer)
        start, history, evals = meta["step"], meta.get("history", []), meta.get("evals", [])
        before = meta.get("seconds", 0.0)  # training time before the interruption
        if start >= cfg.steps:
            if rank == 0:
                log.info("%s already finished at step %d (steps=%d): nothing to train", run_dir, start, cfg.steps)
            return TrainResult(steps=start, seconds=before, history=history, checkpoint=str(ckpt), evals=evals,
                               already_finished=True)
        if rank == 0:
            log.info("resumed from %s at step %d", ckpt, start)
    task = _media_placed(task, cfg, device, rank)
    objective = model.training_objective(compiled(task.objective(model, cfg), cfg))
    frozen = [p for n, p in model.named_parameters() if n in model.pretrained_names]
    if cfg.frozen_pretrained_steps and not frozen:
        raise ValueError(f"TrainConfig.frozen_pretrained_steps={cfg.frozen_pretrained_steps}: nothing was loaded "
                         "from a pretrained checkpoint (slimvl.models.pretrained) to keep frozen")
    net = torch.nn.parallel.DistributedDataParallel(objective, find_unused_parameters=True) if distributed \
        else objective

    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    bar = tqdm(range(start, end), initial=start, total=cfg.steps, disable=not progress or rank != 0,
               desc=f"train {model.config.model_type} ({task.name})", dynamic_ncols=True)
    last_ckpt, t0, seen, eval_seconds = None, time.perf_counter(), 0, 0.0
    # On a GPU the host reads the loss only when it has to (logging, a
    # checkpoint, an evaluation): the device keeps the first non-finite step.
    finite = LossWatch(run_dir, every_step=device.type != "cuda")
    # On CUDA the step's fp32 matmuls (the parts kept out of autocast: scores,
    # norms) run on tensor cores as TF32; evaluations, and the caller's
    # process after the run, keep the precision they had.
    with _stop_requests() as stop, _matmul_precision("high" if device.type == "cuda" else None):
        for step in bar:
            stop.step, stop.checkpoint = step, last_ckpt
            batch = task.batch(cfg, step, rank, world, device)
            for g in optimizer.param_groups:
                g["lr"] = lr_at(step, cfg)
            with autocast_for(device, cfg.amp), _step_draws(model):
                loss, parts = net(batch)
            finite.update(loss, step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if step < cfg.frozen_pretrained_steps:
                for p in frozen:  # no gradient: AdamW leaves the parameter and its moments alone
                    p.grad = None
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()

            seen += task.samples(batch) * world
            logging_step = (step + 1) % cfg.log_every == 0 or step + 1 == end
            evaluating = val_data is not None and cfg.eval_every > 0 and \
                ((step + 1) % cfg.eval_every == 0 or step + 1 == end)
            saving = cfg.checkpoint_every > 0 and (step + 1) % cfg.checkpoint_every == 0
            if logging_step or evaluating or saving:
                finite.check()
            if logging_step:
                rate = seen / (time.perf_counter() - t0 - eval_seconds)
                history.append({"step": step + 1, "loss": round(loss.item(), 5),
                                **{k: round(float(v), 5) for k, v in parts.items()}, "lr": lr_at(step, cfg),
                                "grad_norm": round(gnorm.item(), 4), "samples_per_s": round(rate, 1),
                                "seconds": round(before + time.perf_counter() - t0 - eval_seconds, 3)})
                bar.set_postfix(loss=f"{loss.item():.3f}", samples_s=f"{rate:.0f}")
            if evaluating:
                # Rank 0 evaluates; a failure there (non-finite scores) stops
                # every rank, instead of the others waiting for it forever.
                t_eval = time.perf_counter()
                with _matmul_precision("highest"):  # scores in full fp32, as any evaluation (no TF32 ties)
                    metrics = _agreed(lambda: task.evaluate(model, val_data, device) if rank == 0 else None,
                                      distributed, device, what="evaluate the model", errors=Exception)
                model.train()
                if rank == 0:
                    evals.append({"step": step + 1, "train_seconds": round(t_eval - t0 - eval_seconds, 2), **metrics})
                    if task.headline in metrics and progress:
                        bar.write(f"step {step + 1}: val {task.headline} {metrics[task.headline]:.3f}")
                eval_seconds += time.perf_counter() - t_eval
            # Ctrl-C or SIGTERM (also during an evaluation): keep the step just finished, then stop.
            stopping = stop.requested(distributed, device)
            if stopping:
                finite.check()
            if run_dir is not None and rank == 0 and (saving or step + 1 == end or stopping):
                last_ckpt = _checkpoint(run_dir, model, optimizer, cfg, step + 1, history, evals, task,
                                        before + time.perf_counter() - t0 - eval_seconds)
            if stopping:
                bar.close()
                _write_log(run_dir, rank, cfg, task, history, evals, before + time.perf_counter() - t0 - eval_seconds)
                raise TrainingInterrupted(step + 1, last_ckpt if rank == 0 else None, stop.name)
    seconds = before + time.perf_counter() - t0 - eval_seconds
    _write_log(run_dir, rank, cfg, task, history, evals, seconds)
    if owns_group:
        # Leave together: a rank that exits while another still writes its checkpoint can make gloo's
        # teardown abort the process (seen as a rare SIGABRT under torchrun).
        dist.barrier()
        dist.destroy_process_group()
    return TrainResult(steps=end, seconds=seconds, history=history, checkpoint=str(last_ckpt) if last_ckpt else None,
                       evals=evals)


def _media_placed(task: Task, cfg: TrainConfig, device: torch.device, rank: int) -> Task:
    """The task as ``cfg.media_on_device`` asks: with its decoded media on
    the training device (a copy; the caller's task is left alone) or as it is."""
    media = {id(t): t for t in task.media() if t.device != device}
    size = sum(t.numel() * t.element_size() for t in media.values())
    if not media or cfg.media_on_device == "off":
        return task
    if cfg.media_on_device == "auto":
        if device.type != "cuda" or size > torch.cuda.mem_get_info(device)[0] // 2:
            return task
    if rank == 0:
        log.info("decoded media on %s for the run: %.2f GB", device, size / 1e9)
    return task.with_media_on(device)


@contextmanager
def _matmul_precision(precision: str | None) -> Iterator[None]:
    """``torch.set_float32_matmul_precision(precision)`` inside the block
    (None: unchanged), the process's own setting restored after."""
    before = torch.get_float32_matmul_precision()
    if precision is not None:
        torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


@contextmanager
def _step_draws(model: torch.nn.Module) -> Iterator[None]:
    """The step's random structural choices (LayerDrop's skips, the nested
    latent count) drawn once, before its forward passes, by every module
    with a ``draw_step`` (a Perceiver, or one inside a dual encoder), and
    forgotten after (``end_step``)."""
    owners = [m for m in model.modules() if callable(getattr(m, "draw_step", None))]
    for m in owners:
        m.draw_step()
    try:
        yield
    finally:
        for m in owners:
            m.end_step()


class LossWatch:
    """Stops a run whose loss is not finite, keeping the last good checkpoint.

    ``every_step=True`` checks each loss as it comes (free on a CPU, where
    reading a number costs no wait). Otherwise the device records the first
    non-finite step and its loss, and ``check`` (called before anything is
    logged, evaluated or saved) reads them: the steps in between run
    without the host waiting for the device, and a diverged model is never
    checkpointed.
    """

    def __init__(self, run_dir: Path | None, every_step: bool = True):
        self.run_dir, self.every_step = run_dir, every_step
        self.first: torch.Tensor | None = None  # [step, loss] of the first non-finite loss; step -1: none yet

    def update(self, loss: torch.Tensor, step: int) -> None:
        if self.every_step:
            if not torch.isfinite(loss):
                self._fail(step, loss.item())
            return
        loss = loss.detach().float()
        now = torch.stack([torch.where(torch.isfinite(loss), -1.0, float(step)), loss])
        self.first = now if self.first is None else torch.where(self.first[0] >= 0, self.first, now)

    def check(self) -> None:
        if self.first is not None:
            step, loss = self.first.tolist()  # the one host read
            if step >= 0:
                self._fail(int(step), loss)

    def _fail(self, step: int, loss: float) -> None:
        good = latest_checkpoint(self.run_dir) if self.run_dir is not None else None
        raise TrainingDiverged(f"loss is {loss} at step {step}; stopping. Last good checkpoint: {good or 'none'}")


def _write_log(run_dir: Path | None, rank: int, cfg: TrainConfig, task: Task, history: list, evals: list,
               seconds: float) -> None:
    if run_dir is not None and rank == 0:
        atomic_write_json(run_dir / "train_log.json", {"config": asdict(cfg), "task": task.name, "history": history,
                                                       "evals": evals, "seconds": seconds,
                                                       "skipped_media": task.skipped})


def _checkpoint(run_dir: Path, model, optimizer, cfg: TrainConfig, step: int, history: list, evals: list,
                task: Task, seconds: float) -> Path:
    root = run_dir / "checkpoints"
    path = save_checkpoint(root / f"step_{step:07d}", model, optimizer,
                           {"step": step, "train_config": asdict(cfg), "task": task.name, **task.meta(),
                            "data_fingerprint": task.fingerprint, "seconds": seconds, "history": history,
                            "evals": evals},
                           tokenizer=task.tokenizer)
    for old in sorted(root.glob("step_*"))[: -cfg.keep_checkpoints]:
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    return path


def open_run_dir(run_dir: Path | None, resume: bool, rank: int = 0) -> Path | None:
    """Check a run folder before any work: writable (created if missing), no
    run there unless resuming, a checkpoint there when resuming; temporaries
    of killed writes removed. Returns the checkpoint to resume from (None:
    a fresh run). Raises ``ValueError`` naming the folder."""
    if run_dir is None:
        if resume:
            raise ValueError("resume=True needs the run_dir to resume from")
        return None
    if rank == 0:
        ensure_writable_dir(run_dir, "run folder")
        remove_stale_temporaries(run_dir, "*")
        remove_stale_temporaries(run_dir / "checkpoints", "step_*")
    ckpt = latest_checkpoint(run_dir)
    if resume and ckpt is None:
        raise ValueError(f"--resume: {run_dir} holds no checkpoint to resume from (a mistyped or empty run "
                         "folder?); to start a new run there, leave out --resume")
    if not resume and ckpt is not None:
        raise ValueError(f"{run_dir} already holds a run (newest checkpoint: {ckpt.name}); continue it with "
                         "--resume (resume=True), or choose another run folder")
    return ckpt


def _check_tokenizer(task: Task, model: torch.nn.Module) -> None:
    tok = task.tokenizer
    n = getattr(model.config, "vocab_size", None)
    if tok is not None and n is not None and tok.vocab_size > n:
        raise ValueError(f"the data's tokenizer has {tok.vocab_size} ids but the model's vocab_size={n}: build the "
                         f"model with vocab_size={tok.vocab_size}")


# Settings that may change on resume: how long, where, and what is logged.
# Any other TrainConfig field changes the run itself.
_RESUME_FREE = {"steps", "device", "amp", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints",
                "compile", "compile_mode", "compile_backend", "media_on_device"}


def _merging(config: dict | None) -> dict | None:
    """A token-merging config (``merge_config``) as JSON data, with the
    fields older checkpoints lack at their defaults."""
    return None if config is None else {"importance_weight": 1.0, **json.loads(json.dumps(config))}


def _check_same_run(ckpt: Path, task: Task, cfg: TrainConfig, model: torch.nn.Module | None = None) -> None:
    """A resumed run must see the settings, data and tokenizer it started
    with, or its batches (and token ids) would silently change under it; a
    model must merge tokens as it did (``slimvl.merge``)."""
    meta = read_meta(ckpt)
    if model is not None:
        now = _merging(model.merge_config() if callable(getattr(model, "merge_config", None)) else None)
        if _merging(meta.get("merge")) != now:
            raise ValueError(f"{ckpt}: the run was trained with token merging {meta.get('merge')}, and is resumed "
                             f"with {now}; resume with the same --merge, --r, --r-text and --importance-weight")
    saved_cfg, now_cfg = meta.get("train_config") or {}, asdict(cfg)
    diff = [f"{k} {saved_cfg[k]!r} -> {now_cfg[k]!r}" for k in sorted(set(saved_cfg) & set(now_cfg) - _RESUME_FREE)
            if saved_cfg[k] != now_cfg[k]]
    if diff:
        raise ValueError(f"{ckpt}: the run was trained with other settings ({', '.join(diff)}); resume with the same "
                         "ones, or start a new run from it (--init-from)")
    saved, now = meta.get("data_fingerprint"), task.fingerprint
    if saved is not None and now is not None and saved != now:
        raise ValueError(f"{ckpt}: the run was trained on data with fingerprint {saved}, the data given now has "
                         f"{now}; resume with the same dataset, or start a new run")
    saved_tok = (meta.get("tokenizer") or {}).get("fingerprint")
    if saved_tok is not None and task.tokenizer is not None and saved_tok != task.tokenizer.fingerprint:
        raise ValueError(f"{ckpt}: the run was trained with another tokenizer (fingerprint {saved_tok}) than the "
                         f"one given now ({task.tokenizer.fingerprint})")


def _agreed(fn, distributed: bool, device: torch.device, what: str = "start the run",
            errors: type[BaseException] | tuple = ValueError):
    """``fn()`` on every rank; if it raises ``errors`` on any, all ranks
    raise (instead of the others waiting for the failed one at the next
    collective); the others' error says the process that failed could not
    do ``what``."""
    error = None
    try:
        out = fn()
    except errors as e:
        error = e
    if distributed:
        failed = torch.tensor([float(error is not None)], device=device)
        dist.all_reduce(failed)
        if failed.item() and error is None:
            error = ValueError(f"stopped: another process could not {what} (its error names why)")
    if error is not None:
        raise error
    return out


class _StopFlag:
    """Set by SIGINT/SIGTERM; read between steps. ``step`` and
    ``checkpoint`` say where the run stands, for a second, immediate stop."""

    def __init__(self) -> None:
        self.name: str | None = None
        self.step, self.checkpoint = 0, None

    def requested(self, distributed: bool, device: torch.device) -> bool:
        if not distributed:
            return self.name is not None
        # Every rank must stop after the same step: a stop seen by any rank stops all.
        flag = torch.tensor([float(self.name is not None)], device=device)
        dist.all_reduce(flag)
        if flag.item() and self.name is None:
            self.name = "a stop request on another process"
        return bool(flag.item())


@contextmanager
def _stop_requests() -> Iterator[_StopFlag]:
    """Turn SIGINT and SIGTERM into a flag that the loop checks after each
    step, so that an interrupted run keeps its progress; a second signal
    stops at once. Outside the main thread (no signal handlers) the flag
    never sets."""
    stop = _StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):
        name = signal.Signals(signum).name
        if stop.name is not None:  # asked twice: stop now, at the last checkpoint written
            raise TrainingInterrupted(stop.step, stop.checkpoint, f"{name} (twice)")
        stop.name = name
        # os.write: safe inside a signal handler (no Python-level locks).
        os.write(2, f"\n{name}: finishing step {stop.step + 1}, then saving a checkpoint "
                    "(send it again to stop at once)\n".encode())

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            # getsignal is None for handlers not installed from Python: restore the default.
            signal.signal(s, h if h is not None else signal.SIG_DFL)
