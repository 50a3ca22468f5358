"""The ``slimvl`` command: ``data make``, ``data qa``, ``train``, ``eval``, ``index build``, ``search``,
``bench``, ``demo``.

Run ``slimvl COMMAND --help`` for each command's options.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger("slimvl")


def parse_value(text: str) -> Any:
    """A command-line value as YAML, except that numbers YAML 1.1 leaves as
    strings (``2e-3``, ``1e4``) become numbers."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
    return value


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["dim=128", "lr=2e-3"]`` -> ``{"dim": 128, "lr": 0.002}`` (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = parse_value(value)
    return out


def _level(text: str):
    from .dynamic.policies import parse_level

    try:
        return parse_level(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_keep(text: str) -> Any:
    """``--cross-attn-keep``: ``all``, a count (``1``: the first) or listed
    indices (``0,2``)."""
    text = text.strip()
    if text == "all":
        return None
    try:
        if "," in text or text.startswith("["):
            return [int(i) for i in text.strip("[]").split(",") if i.strip()]
        return int(text)
    except ValueError:
        raise ValueError(f"--cross-attn-keep {text!r}: expected 'all', a count like 1, or indices like 0,2") from None


# Items per split written by `data make`, per kind: an audio-video test set of
# 2,000 clips makes one clip 0.05 points of accuracy.
SPLIT_SIZES = {"video-text": dict(n_train=4000, n_val=200, n_test=100),
               "image-text": dict(n_train=4000, n_val=200, n_test=100),
               "audio-video": dict(n_train=4000, n_val=500, n_test=2000)}


def cmd_data_make(a: argparse.Namespace) -> None:
    from .data import make_dataset

    sizes = {k: v if getattr(a, k) is None else getattr(a, k) for k, v in SPLIT_SIZES[a.kind].items()}
    extra = {"seconds": a.seconds} if a.kind == "audio-video" else {}
    root = make_dataset(a.out, kind=a.kind, seed=a.seed, **sizes, group_size=a.group_size, frames=a.frames,
                        size=a.size, captions_per_item=a.captions_per_item, progress=not a.quiet,
                        overwrite=a.overwrite, **extra)
    print(f"dataset ready at {root}")


def cmd_data_qa(a: argparse.Namespace) -> None:
    from .data import make_qa

    out = make_qa(a.data, questions_per_item=a.questions_per_item, seed=a.seed, overwrite=a.overwrite)
    print(f"questions ready at {out}")


def _train_config(a: argparse.Namespace):
    from .train import TrainConfig

    cfg: dict[str, Any] = {}
    if a.config:
        spec = yaml.safe_load(Path(a.config).read_text()) or {}
        cfg.update(spec.get("train", {}))
    cfg.update(parse_overrides(a.train_set))
    for f in fields(TrainConfig):
        v = getattr(a, f.name, None)
        if v is not None:
            cfg[f.name] = v
    unknown = sorted(set(cfg) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise SystemExit(f"unknown train options {unknown}; known: {[f.name for f in fields(TrainConfig)]}")
    return TrainConfig(**cfg)


def _initialise(model, a: argparse.Namespace, init: Path | None) -> None:
    """``--init-from`` / ``--init-vit`` / ``--init-bert``: weights from local checkpoints."""
    from .models import pretrained

    if (a.init_vit or a.init_bert or a.init_from) and "pretrained_init" not in model.capabilities:
        raise ValueError(f"--init-*: only Perceiver-VL models are initialised this way, not "
                         f"{model.config.model_type}")
    if init is not None:
        pretrained.init_from_checkpoint(model, init, a.latent_resize)
    if a.init_vit:
        r = pretrained.load_vision_layers(model, a.init_vit)
        logging.getLogger("slimvl").info("%s: loaded %d tensors (unused layers: %s)", a.init_vit, len(r.loaded),
                                         r.unused or "none")
    if a.init_bert:
        pretrained.load_text_embeddings(model, a.init_bert)


# Options that belong to some tasks only: --option -> the TaskSource.options key.
TASK_OPTIONS = {"--question-types": "question_types", "--image-data": "image_data", "--keep-silent": "keep_silent"}


def _task(a: argparse.Namespace, tok, answers: list[str] | None = None):
    """The ``--task`` entry and what the command line gives it."""
    from .tasks import TASKS, TaskSource

    entry = TASKS[a.task]
    options = {key: getattr(a, key, None) for key in TASK_OPTIONS.values()}
    for flag, key in TASK_OPTIONS.items():
        if options[key] and key not in entry.options:
            takers = sorted(name for name, e in TASKS.items() if key in e.options)
            raise ValueError(f"{flag}: only --task {' or '.join(takers)} takes it (got --task {a.task})")
    return entry, TaskSource(Path(a.data), tok, a.frames, a.skip_bad, not a.quiet, options, answers)


def merge_args(p: argparse.ArgumentParser, help: str, none: bool = False) -> None:
    """``--merge METHOD --r R --r-text R --importance-weight W``: token merging (slimvl.merge)."""
    p.add_argument("--merge", choices=(["none"] if none else []) + ["tome", "crossget"], help=help)
    p.add_argument("--r", type=int, help="tokens merged per layer of the vision tower, clamped to half a layer's "
                   "mergeable tokens (without it: 16 with --merge; eval: the checkpoint's own r)")
    p.add_argument("--r-text", type=int, help="tokens merged per layer of a clip model's text tower (without it: 0; "
                   "eval: the checkpoint's own)")
    p.add_argument("--importance-weight", type=float, help="CrossGET: how much a token's importance counts against "
                   "its best similarity (without it: 1, as published; 0: similarity alone; eval: the checkpoint's "
                   "own)")


_MERGE_OPTIONS = {"r": 16, "r_text": 0, "importance_weight": 1.0}  # patch's keyword arguments and their defaults


def _merge_choice(a: argparse.Namespace, model=None) -> tuple[str | None, dict]:
    """``(method, patch's keyword arguments)`` the command line asks for:
    ``--merge`` with ``--r``/``--r-text``/``--importance-weight`` (defaults
    16, 0 and 1), or, in eval, new values for a checkpoint that merges
    already; those options alone otherwise are an error."""
    own = model.merge_config() if model is not None and hasattr(model, "merge_config") else None
    given = {k: getattr(a, k) for k in _MERGE_OPTIONS if getattr(a, k) is not None}
    if a.merge == "none" and given:
        raise ValueError(f"--merge none merges nothing: drop {', '.join('--' + k.replace('_', '-') for k in given)}")
    if a.merge is None and given:
        if own is None:
            flags = ", ".join("--" + k.replace("_", "-") for k in given)
            raise ValueError(f"{flags}: give --merge tome or --merge crossget too (this model merges nothing)")
        return own["method"], {k: own.get(k, d) for k, d in _MERGE_OPTIONS.items()} | given
    return a.merge, _MERGE_OPTIONS | given


def cmd_train(a: argparse.Namespace) -> None:
    import torch

    from .checkpoint import read_meta, resolve_checkpoint
    from .models import create_model, get_config, list_models
    from .pipeline import checkpoint_tokenizer, load_tokenizer
    from .tasks import TASKS
    from .train import open_run_dir

    # Fail on a bad run folder (unwritable, mistyped --resume, a run already
    # there) before minutes of data loading, not after.
    open_run_dir(Path(a.out), a.resume, int(os.environ.get("RANK", "0")))
    spec = yaml.safe_load(Path(a.config).read_text()) if a.config else {}
    model_name = a.model or spec.get("model", "perceiver_vl_tiny")
    overrides = {**spec.get("model_overrides", {}), **parse_overrides(a.set)}
    if a.decompose and (a.init_from or a.model or a.task != "retrieval" or a.merge):
        raise ValueError("--decompose starts from a cross-encoder checkpoint and trains retrieval: it takes no "
                         "--init-from, --model or --merge, and --task retrieval only (fine-tune the dual encoder "
                         "with merging afterwards: --merge METHOD --init-from RUN)")
    if a.merge and a.init_from and (a.model or a.init_vit or a.init_bert):
        raise ValueError("--merge with --init-from fine-tunes that checkpoint's model: drop --model, --init-vit "
                         "and --init-bert")
    method, merge_kw = _merge_choice(a)
    init = resolve_checkpoint(a.init_from or a.decompose) if a.init_from or a.decompose else None
    qa = TASKS[a.task].qa_tokenizer
    if not TASKS[a.task].text:
        tok = None  # the task reads no text (an AudioSet folder has no tokenizer)
    elif init is not None:  # token ids must mean what they meant to the weights being loaded
        tok = checkpoint_tokenizer(init, read_meta(init)["config"]["vocab_size"], a.data, a.vocab, qa=qa)
    else:
        tok = load_tokenizer(a.data, a.vocab, qa=qa)
    entry, source = _task(a, tok)
    if a.decompose:
        return _train_decomposed(a, init, overrides, entry, source)
    needs = entry.model_overrides(source)
    if a.merge and init is not None:  # the checkpoint's model is the one fine-tuned
        model_name = read_meta(init)["config"]["model_type"]
        fields = read_meta(init)["config"]
    else:
        fields = get_config(model_name).to_dict()
    missing = sorted(set(needs) - set(fields))
    if missing:
        fit = [m for m in list_models() if set(needs) <= set(get_config(m).to_dict())]
        raise ValueError(f"--task {a.task} needs a model with {missing}; {model_name} has none "
                         f"(models that have: {', '.join(fit) or 'none'})")
    for key, value in {**({"vocab_size": tok.vocab_size} if tok is not None else {}), **needs}.items():
        overrides.setdefault(key, value)  # what the user sets wins
    if entry.data_overrides is not None and not (a.merge and init is not None):
        # Measured on the training data with the model's own settings (audio statistics).
        for key, value in entry.data_overrides(source, get_config(model_name, **overrides)).items():
            overrides.setdefault(key, value)
    cfg = _train_config(a)
    torch.manual_seed(cfg.seed)  # the seed fixes the initial weights too
    if a.merge and init is not None:
        from .merge.finetune import model_for_merging

        model = model_for_merging(init, method, **merge_kw, **overrides)
    else:
        if a.merge == "crossget" and "cross_tokens" in fields:
            overrides.setdefault("cross_tokens", True)  # CrossGET's guides, trained with its consistency loss
        model = create_model(model_name, **overrides)
        _initialise(model, a, init)
        if a.merge:
            from .merge import patch

            patch(model, method, **merge_kw)
    _fit(a, model, cfg, entry, source, **({"merge": model.merge_config()} if a.merge else {}))


def _train_decomposed(a: argparse.Namespace, ckpt: Path, overrides: dict, entry, source) -> None:
    """``train --decompose RUN``: the cross-encoder's weights as a dual encoder, fine-tuned contrastively."""
    from .checkpoint import load_model
    from .models import decompose

    cfg = _train_config(a)
    cross = load_model(ckpt)
    if "_merge" in vars(cross):  # trained with token merging: decomposed unmerged (patch the dual encoder after)
        from .merge import unpatch

        unpatch(cross)
    _fit(a, decompose(cross, **overrides), cfg, entry, source, decomposed=str(ckpt))


def _fit(a: argparse.Namespace, model, cfg, entry, source, **report) -> None:
    """Train ``model`` on the task's train split (validated on ``--val-split``
    with ``--eval-every``) and print one JSON result line (with ``report``)."""
    from .train import train

    data = entry.load(source, "train", model.config)
    val = entry.validation(entry.load(source, a.val_split, model.config)) if cfg.eval_every else None
    result = train(model, entry.build(source, data, model.config), cfg, run_dir=a.out, resume=a.resume,
                   progress=not a.quiet, val_data=val)
    if int(os.environ.get("RANK", "0")) == 0:  # one result line, not one per data-parallel process
        print(json.dumps({"steps": result.steps, "seconds": round(result.seconds, 1), **report,
                          "final_loss": result.history[-1]["loss"] if result.history else None,
                          "val": result.evals[-1] if result.evals else None, "checkpoint": result.checkpoint,
                          "already_finished": result.already_finished}))


def cmd_eval(a: argparse.Namespace) -> None:
    from .checkpoint import load_model, read_meta, resolve_checkpoint
    from .evaluate import NonFiniteScores
    from .pipeline import checkpoint_tokenizer
    from .runtime import resolve_device
    from .tasks import TASKS

    ckpt = resolve_checkpoint(a.checkpoint)
    device = resolve_device(a.device)
    model = load_model(ckpt)
    tok = None
    if TASKS[a.task].text:
        tok = checkpoint_tokenizer(ckpt, model.config.vocab_size, a.data, a.vocab, qa=TASKS[a.task].qa_tokenizer)
    if a.cross_attn_keep is not None:
        if "cross_attn_keep" not in model.capabilities:
            raise ValueError(f"--cross-attn-keep: {model.config.model_type} has no cross-attentions to choose")
        model.cross_attn_keep = parse_keep(a.cross_attn_keep)
    method, merge_kw = _merge_choice(a, model)
    if a.merge is not None or any(getattr(a, k) is not None for k in _MERGE_OPTIONS):  # not the checkpoint's own
        from .merge import is_patched, patch, unpatch

        if is_patched(model):
            unpatch(model)
        if method != "none":
            patch(model, method, **merge_kw)
    # A classifier's answers are the ones it was trained with (kept in the
    # checkpoint); the data's answers outside them count as wrong.
    if a.compile:
        model.compile_layers()
    entry, source = _task(a, tok, read_meta(ckpt).get("answers"))
    queries = _queries(a, entry, model)
    rerank = _rerank(a, model)
    data = entry.load(source, a.split, model.config)
    try:
        if rerank is not None:
            from .tasks.retrieval.rerank import evaluate_reranked

            k, cross = rerank
            metrics = evaluate_reranked(model, data, k, cross, a.batch_size, device, not a.quiet)
        elif queries is None:
            metrics = entry.evaluate(model, data, source, device, a.batch_size, not a.quiet)
        else:
            calibration = lambda: entry.load(source, a.calib_split, model.config)  # noqa: E731
            metrics = entry.evaluate_policy(model, data, calibration, source, device, a.batch_size, queries)
    except NonFiniteScores as e:
        raise ValueError(f"{ckpt}: {e}") from None
    print(json.dumps({"checkpoint": str(ckpt), "task": a.task,
                      "cross_attn_keep": getattr(model.config, "cross_attn_keep", None),
                      "active_latents": getattr(model.config, "active_latents", None), "device": str(device),
                      "compiled": bool(a.compile),
                      **({"merge": model.merge_config()} if hasattr(model, "merge_config") else {}),
                      **metrics}, indent=2))


def _rerank(a: argparse.Namespace, model):
    """``--retrieval rerank:K`` (and ``--cross-encoder``) as ``(K, cross-encoder or None)``; None for ``all``,
    checked before any data is read."""
    from .checkpoint import load_model, resolve_checkpoint
    from .tasks.retrieval.rerank import parse_retrieval, reranker_of

    k = parse_retrieval(a.retrieval)
    if k is None:
        if a.cross_encoder:
            raise ValueError("--cross-encoder: only with --retrieval rerank:K")
        return None
    if a.task != "retrieval" or a.queries is not None:
        raise ValueError("--retrieval rerank:K: retrieval only (--task retrieval, no --queries)")
    if model.config.model_type != "dual_encoder":
        raise ValueError(f"--retrieval rerank:K re-ranks a dual encoder's candidates (train one with "
                         f"`slimvl train --decompose RUN`); {a.checkpoint} holds a {model.config.model_type}")
    cross = load_model(resolve_checkpoint(a.cross_encoder)) if a.cross_encoder else None
    if cross is not None and cross.config.vocab_size != model.config.vocab_size:
        raise ValueError(f"--cross-encoder {a.cross_encoder}: its vocabulary ({cross.config.vocab_size}) is not the "
                         f"dual encoder's ({model.config.vocab_size}); give the cross-encoder it was decomposed from")
    return k, reranker_of(model, cross)


def _queries(a: argparse.Namespace, entry, model) -> dict | None:
    """``--queries`` and its options as ``evaluate_policy`` keywords (None:
    no policy), checked before any data is read."""
    calibrated = a.queries in ("cascade", "learned")
    options = [f for f, v in (("--tolerance", a.tolerance), ("--budget-gflops", a.budget_gflops),
                              ("--levels", a.levels), ("--guard", a.guard or None)) if v is not None]
    if not calibrated and options:
        raise ValueError(f"{', '.join(options)}: only with --queries cascade or learned")
    if a.queries != "cascade" and a.confidence is not None:
        raise ValueError("--confidence: only with --queries cascade (a learned policy predicts its own)")
    if a.queries is None:
        return None
    if "active_latents" not in model.capabilities:
        raise ValueError(f"--queries: a {model.config.model_type} has no latents to choose")
    if entry.evaluate_policy is None:
        from .tasks import TASKS

        takers = sorted(n for n, e in TASKS.items() if e.evaluate_policy is not None)
        raise ValueError(f"--queries: --task {entry.name} has no latent policy yet (tasks that have: "
                         f"{', '.join(takers)})")
    if calibrated:
        if (a.tolerance is None) == (a.budget_gflops is None):
            raise ValueError(f"--queries {a.queries}: give one of --tolerance (an accuracy drop) or "
                             "--budget-gflops")
        if a.calib_split == a.split:
            raise ValueError(f"--calib-split {a.calib_split}: the thresholds must be calibrated on another split "
                             f"than the one evaluated (--split {a.split})")
    return {"spec": a.queries, "tolerance": a.tolerance, "budget_gflops": a.budget_gflops, "levels": a.levels,
            "guard": a.guard,
            "kind": a.confidence or "max_softmax"}


def cmd_bench(a: argparse.Namespace) -> None:
    from .bench import matmul_gflops, profile_model
    from .bench.measure import parse_dtype
    from .bench.report import add_ratios
    from .models import create_model
    from .runtime import resolve_device

    device, dtype = resolve_device(a.device), parse_dtype(a.dtype)
    models = [create_model(name, **parse_overrides(a.set)) for name in a.model]
    method, merge_kw = _merge_choice(a)
    if method is not None:  # every model merged alike (the ratios then compare merged models)
        from .merge import patch

        for m in models:
            patch(m, method, **merge_kw)
    # One text length for all, so that the ratios compare like with like.
    text_len = a.text_len or min(m.config.max_text_len for m in models)
    ref = matmul_gflops(device, dtype, min_run_time=a.min_run_time)
    rows = []
    for name, model in zip(a.model, models):
        rows.append({"model": name, "text_len": text_len,
                     **profile_model(model, a.frames, text_len, batch=a.batch, device=device, dtype=dtype,
                                     min_run_time=a.min_run_time, matmul_ref=ref, compile=a.compile)})
    add_ratios(rows, rows[0], {"gflops_per_pair": "gflops_ratio", "latency_ms_per_pair": "latency_ratio"})
    print(json.dumps(rows, indent=2))


def cmd_demo(a: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(a.out, steps=a.steps, progress=not a.quiet, seed=a.seed, device=a.device)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default after its help, except where there is none
    to show (the help then says what happens without the option)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS:
            return action.help or ""
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``slimvl`` command."""
    from .data.make import KINDS
    from .tasks import TASKS
    from .train import TrainConfig

    d = TrainConfig()
    fmt = {"formatter_class": _HelpFormatter}
    p = argparse.ArgumentParser(prog="slimvl", description="Efficient multimodal transformers.", **fmt)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="make datasets", description="Make the synthetic world's datasets.", **fmt)
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    mk = data_sub.add_parser("make", help="write the synthetic shapes world to disk in a standard layout", **fmt)
    mk.add_argument("--kind", choices=KINDS, default="video-text",
                    help="video-text: MSR-VTT layout with MP4s; image-text: Karpathy JSON with PNGs; audio-video: "
                         "AudioSet layout, MP4s with a sound track, multi-label segments and statements")
    mk.add_argument("--out", required=True, help="dataset folder (reused when made with the same parameters)")
    mk.add_argument("--overwrite", action="store_true",
                    help="replace a dataset already at --out that was made with other parameters")
    mk.add_argument("--seed", type=int, default=0, help="seed of the scenes, captions and splits")
    mk.add_argument("--n-train", type=int, help="training items (default: 4000)")
    mk.add_argument("--n-val", type=int, help="validation items (default: 200; audio-video: 500)")
    mk.add_argument("--n-test", type=int, help="test items, the retrieval gallery (default: 100; audio-video: 2000)")
    mk.add_argument("--seconds", type=float, default=2.0, help="audio-video: length of each clip in seconds")
    mk.add_argument("--group-size", type=int, default=4, help="near-duplicate variants per group")
    mk.add_argument("--frames", type=int, default=8, help="frames per video on disk")
    mk.add_argument("--size", type=int, default=64, help="canvas side in pixels (even, >= 16)")
    mk.add_argument("--captions-per-item", type=int, default=2, help="captions per training item")
    mk.set_defaults(func=cmd_data_make)
    qa = data_sub.add_parser("qa", help="add questions and answers (VQA-like layout, DATA/qa/) to a synthetic "
                                        "dataset", **fmt)
    qa.add_argument("--data", required=True, help="dataset folder made by `slimvl data make`")
    qa.add_argument("--questions-per-item", type=int, default=4, help="questions generated per item")
    qa.add_argument("--seed", type=int, default=0, help="seed of the questions")
    qa.add_argument("--overwrite", action="store_true", help="replace questions made with other options")
    qa.set_defaults(func=cmd_data_qa)

    def data_args(sp, device: str | None) -> None:
        sp.add_argument("--data", required=True, help="dataset folder (MSR-VTT or Karpathy layout)")
        sp.add_argument("--vocab", help="tokenizer.json or BERT vocab.txt (default: the checkpoint's own when it "
                                        "has one, else DATA/tokenizer.json)")
        sp.add_argument("--frames", type=int, default=4, help="frames sampled uniformly per video")
        sp.add_argument("--skip-bad", action="store_true", help="skip unreadable media (counted in the log)")
        sp.add_argument("--keep-silent", action="store_true", help="audio-video tasks: keep clips whose audio "
                        "track is silent, with a zero spectrogram (default: skip them, counted in the log)")
        sp.add_argument("--device", default=device, help="auto (CUDA when available), cpu, cuda or cuda:N" +
                        ("" if device else " (default: the --config file's, else auto)"))

    tr = sub.add_parser("train", help="train a model", **fmt)
    data_args(tr, None)
    tr.add_argument("--task", choices=sorted(TASKS), default="retrieval",
                    help="; ".join(f"{name}: {e.help}" for name, e in sorted(TASKS.items())))
    tr.add_argument("--image-data", help="--task pretrain: an image-text dataset trained on together with --data")
    tr.add_argument("--question-types", nargs="+", help="--task qa: train on questions of these types only "
                    "(a curriculum's first stage; continue on all types with --init-from)")
    tr.add_argument("--model", help="preset name, see slimvl.list_models() (default: the --config file's, "
                                    "else perceiver_vl_tiny)")
    tr.add_argument("--config", help="YAML with model, model_overrides and train sections")
    tr.add_argument("--set", action="append", metavar="KEY=VALUE", help="model config override (repeatable)")
    tr.add_argument("--train-set", action="append", metavar="KEY=VALUE",
                    help="train config override, a TrainConfig field (repeatable)")
    tr.add_argument("--out", required=True, help="run folder (checkpoints, train_log.json); must not hold a run "
                                                 "unless --resume")
    tr.add_argument("--steps", type=int, help=f"training steps (default: the --config file's, else {d.steps})")
    tr.add_argument("--lr", type=float, help=f"peak learning rate (default: the --config file's, else {d.lr})")
    tr.add_argument("--seed", type=int, help="seed of the initial weights and of the batches (default: the "
                                             f"--config file's, else {d.seed})")
    tr.add_argument("--eval-every", type=int, help="evaluate on --val-split every N steps (learning curve; "
                                                   "default: never)")
    tr.add_argument("--val-split", default="val", help="split evaluated with --eval-every: train, val, test "
                                                       "(or another split the dataset defines)")
    tr.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    tr.add_argument("--compile", action="store_true", default=None, help="torch.compile the model and loss "
                    "(TrainConfig.compile; the mode: --train-set compile_mode=max-autotune); worth it on a GPU")
    tr.add_argument("--init-from", help="slimvl checkpoint or run folder to start from (num_latents may differ, "
                                        "see --latent-resize)")
    tr.add_argument("--latent-resize", choices=["interpolate", "reinit"], default="interpolate",
                    help="how --init-from fits its latents to another num_latents")
    tr.add_argument("--init-vit", help="HF ViT/CLIP-vision folder or safetensors file: latent self-attention "
                                       "layers (see slimvl.models.pretrained)")
    tr.add_argument("--init-bert", help="HF BERT folder or safetensors file: text embeddings")
    tr.add_argument("--decompose", metavar="RUN", help="a cross-encoder checkpoint (single_stream or "
                    "single-stream perceiver_vl) whose weights become a dual encoder, fine-tuned contrastively "
                    "(--set temperature=0.05 learn_temperature=false per_direction=true; hard negatives: "
                    "--train-set hard_negatives=both)")
    merge_args(tr, "tokens merged while training (ToMe, or CrossGET with its cross tokens and consistency "
                   "loss on clip models); with --init-from RUN, fine-tunes that checkpoint (default: no merging)")
    tr.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="retrieval Recall@K (or QA / MLM accuracy) of a checkpoint", **fmt)
    data_args(ev, "auto")
    scored = {name: e for name, e in TASKS.items() if e.evaluate is not None}
    ev.add_argument("--task", choices=sorted(scored), default="retrieval",
                    help="; ".join(f"{name}: {e.help}" for name, e in sorted(scored.items())))
    ev.add_argument("--checkpoint", required=True, help="checkpoint folder, or a run folder (its newest is used)")
    ev.add_argument("--split", default="test", help="split to evaluate: train, val, test (or another split the "
                                                    "dataset defines)")
    ev.add_argument("--batch-size", type=int, default=256, help="pairs (or questions) per forward pass")
    ev.add_argument("--cross-attn-keep", help="Perceiver-VL: cross-attentions that run: 'all', a count "
                                              "(1 = the first) or indices '0,2' (default: as trained, all)")
    ev.add_argument("--queries", metavar="POLICY", help="latents per input, against the same model with all of "
                    "them: 'fixed:Q' (the first Q), 'cascade' (the smallest count first, more for inputs the "
                    "model is unsure of) or 'learned' (a small head picks each input's count from a cheap "
                    "probe); the last two calibrated on --calib-split to --tolerance or --budget-gflops")
    ev.add_argument("--tolerance", type=float, help="--queries cascade|learned: the accuracy drop allowed, "
                                                    "in (0, 1)")
    ev.add_argument("--budget-gflops", type=float, help="--queries cascade|learned: mean GFLOPs per input allowed")
    ev.add_argument("--calib-split", default="val", help="--queries cascade|learned: the split its thresholds "
                                                         "(and the learned head) are fitted on")
    ev.add_argument("--levels", type=_level, nargs="+", help="--queries cascade|learned: latent counts, ascending "
                    "(default: those the model was trained on, else N/8, N/4, N/2, N); Q/K also keeps only the "
                    "first K cross-attentions (e.g. 4/1 8/1 16/2: latents and LayerDrop chosen jointly, "
                    "cheapest first)")
    ev.add_argument("--guard", action="store_true", help="--queries cascade|learned with --tolerance: hold the "
                    "upper end of the drop's 95%% interval on --calib-split to it, not its mean (safer on new inputs)")
    ev.add_argument("--confidence", choices=["max_softmax", "margin"],
                    help="--queries cascade: how sure a prediction is (default: max_softmax)")
    ev.add_argument("--retrieval", default="all", metavar="HOW", help="retrieval: 'all' (the model scores every "
                    "pair, from cached encodings when it can) or 'rerank:K' (a dual encoder's top K per query "
                    "re-scored by the cross-encoder)")
    ev.add_argument("--cross-encoder", metavar="RUN", help="--retrieval rerank:K: the cross-encoder checkpoint "
                    "(default: the dual encoder's own backbone, while its weights are unchanged)")
    merge_args(ev, "token merging at evaluation: none, tome or crossget (default: as the checkpoint was "
                   "trained)", none=True)
    ev.add_argument("--compile", action="store_true", help="torch.compile every layer first (faster on a GPU "
                    "once compiled; the first batches pay for compiling)")
    ev.set_defaults(func=cmd_eval)

    from .cli_index import add_parsers

    add_parsers(sub, data_args, fmt)

    be = sub.add_parser("bench", help="GFLOPs, latency and memory per scored pair", **fmt)
    be.add_argument("--model", nargs="+", default=["single_stream_tiny", "perceiver_vl_tiny"],
                    help="presets; the first is the baseline of the ratios")
    be.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override for all models")
    be.add_argument("--frames", type=int, default=4, help="frames per clip")
    be.add_argument("--text-len", type=int, help="text tokens per pair (default: the models' smallest "
                                                 "max_text_len)")
    be.add_argument("--batch", type=int, default=64, help="throughput batch (latency is also measured at 1)")
    be.add_argument("--min-run-time", type=float, default=1.0, help="seconds of timing per measurement")
    be.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    merge_args(be, "token merging in every model (its analytic GFLOPs are then not given: counted only; default: "
                   "no merging)")
    be.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                    help="fp32, or bf16/fp16 autocast")
    be.add_argument("--compile", action="store_true",
                    help="time torch.compile'd models (CUDA graphs at batch 1 on a GPU)")
    be.set_defaults(func=cmd_bench)

    de = sub.add_parser("demo", help="Perceiver-VL vs single-stream on synthetic video-text retrieval", **fmt)
    de.add_argument("--out", default="runs/demo", help="folder of the data, runs and report")
    de.add_argument("--steps", type=int, help="training steps per model (default: the demo's 850)")
    de.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the batches")
    de.add_argument("--device", default="auto", help="where to train, evaluate and time: auto, cpu or cuda")
    de.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``slimvl`` command."""
    from .train import TrainingInterrupted

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss").setLevel(logging.WARNING)  # its loader reports each CPU build it tries
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except TrainingInterrupted as e:
        # One line: where the run stands and how to go on (no traceback).
        if int(os.environ.get("RANK", "0")) == 0:
            if e.checkpoint is None:
                print(f"slimvl: {e.signal_name} at step {e.step}; no checkpoint saved", file=sys.stderr)
            else:
                # `train` continues with --resume; the demo resumes its unfinished run by itself.
                again = [w for w in argv if w != "--resume"] + (["--resume"] if args.command == "train" else [])
                print(f"slimvl: {e.signal_name} at step {e.step}; last checkpoint {e.checkpoint}; resume with: "
                      f"slimvl {shlex.join(again)}", file=sys.stderr)
        raise SystemExit(130) from None
    except KeyboardInterrupt:
        # Outside the training loop nothing is half-done that matters: every
        # file is written under a temporary name first.
        print("slimvl: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except (ValueError, OSError) as e:
        # Bad input (and a full disk, a missing file) is reported as one line
        # naming what is wrong, not a traceback.
        print(f"slimvl: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
