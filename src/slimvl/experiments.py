"""Helpers of the experiments behind BENCHMARKS.md (the scripts in
``benchmarks/``): their common options, the demo's world with a larger test
gallery and its splits, gallery subsets, training that resumes an
interrupted run or reuses a finished one, a timed retrieval, counted FLOPs,
the image size a preset reads, and the token-merging recipe (the CLIP-style
model, its fine-tuning, per-item R@1 hits) that ``merging.py`` and
``merging_diagnosis.py`` share."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

from .bench import count_flops, dummy_inputs, model_flops_per_pair
from .checkpoint import latest_checkpoint, load_model, read_meta
from .data import make_dataset
from .merge import is_patched, patch, unpatch
from .merge.finetune import model_for_merging
from .models import create_model, get_config
from .models.pretrained import init_from_checkpoint
from .pipeline import load_split, load_tokenizer
from .recipes import DATA, FRAMES, TEXT_LEN
from .tasks import RetrievalData
from .tasks.retrieval import recall_metrics, score_matrix, t2v_ranks, v2t_ranks
from .train import TrainConfig, train


def parse_options(p: argparse.ArgumentParser, script: str, argv: list[str] | None) -> tuple[argparse.Namespace, str]:
    """``p``'s options from ``argv`` (the command line when None) and the
    command that reproduces the run, as its report records it."""
    argv = sys.argv[1:] if argv is None else argv
    return p.parse_args(argv), " ".join([f"python benchmarks/{script}", *argv])


def preset_image_size(preset: str = "perceiver_vl_tiny", **overrides) -> int:
    """The frame side a preset (with ``overrides``) reads: what a benchmark
    decodes its data at."""
    return get_config(preset, **overrides).image_size


def experiment_parser(doc: str, steps: int | None = None, data: bool = True) -> argparse.ArgumentParser:
    """The options every experiment shares: ``--out`` (reports and runs),
    ``--data`` (an existing dataset folder instead of the generated one),
    ``--steps`` (training steps, when ``steps`` gives the default) and
    ``--quiet`` (no progress bars). ``doc`` is the script's docstring, shown
    by ``--help`` as written."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/out", help="folder of the reports and of the training runs")
    if data:
        p.add_argument("--data", help="dataset folder (default: made under OUT when missing)")
    if steps is not None:
        p.add_argument("--steps", type=int, default=steps, help="training steps of each model")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def gallery_dataset(root: str | Path, n_test: int, progress: bool = True, n_train: int | None = None,
                    **params) -> Path:
    """The demo's synthetic video-text data with a test gallery of ``n_test``
    videos (and ``n_train`` training videos instead of the demo's, if given;
    ``params`` change other ``make_dataset`` parameters, e.g. ``n_val``)."""
    return make_dataset(root, progress=progress,
                        **{**DATA, "n_test": n_test, "n_train": n_train or DATA["n_train"], **params})


def retrieval_splits(root: str | Path, gallery: int | None = None, progress: bool = True,
                     preset: str = "perceiver_vl_tiny"):
    """The tokenizer, training split and test split (its first ``gallery``
    videos when given) of a video-text dataset, read as the demo's recipe
    reads them (``FRAMES`` frames at ``preset``'s image size, ``TEXT_LEN``
    tokens)."""
    tok = load_tokenizer(root)
    size = preset_image_size(preset)
    train = load_split(root, "train", tok, FRAMES, size, TEXT_LEN, progress=progress)
    test = load_split(root, "test", tok, FRAMES, size, TEXT_LEN, progress=progress)
    return tok, train, test if gallery is None else subset(test, gallery)


RECALLS = ("t2v_r1", "t2v_r5", "t2v_r10", "v2t_r1")


def timed_retrieval(model, data: RetrievalData, progress: bool = True) -> dict[str, float]:
    """Every caption of ``data`` retrieved against every video: recalls
    (``RECALLS``) and the seconds spent encoding, scoring and in all."""
    timings: dict = {}
    m = recall_metrics(score_matrix(model, data, progress=progress, timings=timings), data.caption_item)
    return {**{k: m[k] for k in RECALLS}, "seconds_encode": timings["encode_seconds"],
            "seconds_score": timings["score_seconds"],
            "seconds_total": timings["encode_seconds"] + timings["score_seconds"]}


def subset(data: RetrievalData, n_items: int) -> RetrievalData:
    """The first ``n_items`` items (whole near-duplicate groups) of a gallery, with their captions."""
    k = data.group_size
    if n_items % k or n_items > data.videos.shape[0]:
        raise ValueError(f"n_items={n_items}: must be a multiple of the group size {k}, "
                         f"at most {data.videos.shape[0]}")
    groups = data.groups[: n_items // k]
    items = torch.tensor([i for g in groups for i in g])
    new_index = torch.full((data.videos.shape[0],), -1, dtype=torch.long)
    new_index[items] = torch.arange(len(items))
    keep = new_index[data.caption_item] >= 0
    return replace(
        data, videos=data.videos[items], caption_ids=data.caption_ids[keep], caption_mask=data.caption_mask[keep],
        caption_item=new_index[data.caption_item[keep]], groups=[[int(new_index[i]) for i in g] for g in groups],
        heldout=[data.heldout[i] for i in items.tolist()] if data.heldout is not None else None,
        scenes=[data.scenes[i] for i in items.tolist()] if data.scenes is not None else None)


def train_or_load(preset: str, overrides: dict, data, cfg: TrainConfig, run_dir: Path,
                  progress: bool = True, init_from: Path | None = None) -> tuple[torch.nn.Module, float]:
    """Train ``preset`` on ``data`` (``RetrievalData`` or any ``slimvl.tasks``
    task), resuming an interrupted run and starting from the checkpoint
    ``init_from`` when given, or load the run's final checkpoint when it
    already finished; returns the model and its training seconds."""
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None and read_meta(ckpt)["step"] == cfg.steps and "seconds" not in read_meta(ckpt):
        # Runs finished before checkpoints recorded their training time.
        log = run_dir / "train_log.json"
        return load_model(ckpt), json.loads(log.read_text())["seconds"] if log.is_file() else float("nan")
    torch.manual_seed(cfg.seed)  # the seed fixes the initial weights too
    model = create_model(preset, **overrides)
    if init_from is not None and ckpt is None:
        init_from_checkpoint(model, init_from)
    result = train(model, data, cfg, run_dir=run_dir, resume=ckpt is not None, progress=progress)
    return model, result.seconds


# The Perceiver-VL overrides of each retrieval stream (multi needs no decoder).
STREAMS = {"single": {}, "multi": {"stream": "multi", "decoder_layers": 0}, "mixed": {"stream": "mixed"}}


@torch.inference_mode()
def counted_retrieval_flops(model, frames: int, text_len: int) -> dict[str, float]:
    """FLOPs per cached video, per cached caption and per scored pair (torch's counter)."""
    if not model.cacheable:
        return {"video": 0.0, "text": 0.0, "pair": model_flops_per_pair(model, frames, text_len)}
    video, ids, mask = dummy_inputs(model, frames, text_len, 8)
    videos = model.prepare_cached(model.cache_videos(video))
    texts = model.prepare_cached(model.cache_texts(ids, mask))
    return {"video": count_flops(lambda: model.prepare_cached(model.cache_videos(video)), model) / 8,
            "text": count_flops(lambda: model.prepare_cached(model.cache_texts(ids, mask)), model) / 8,
            "pair": count_flops(lambda: model.score_prepared(texts, videos), model) / 64}


def retrieval_gflops(flops: dict[str, float], n_videos: int, n_captions: int) -> dict[str, float]:
    """GFLOPs per cached video, caption and scored pair
    (``counted_retrieval_flops``) and of a whole retrieval of ``n_captions``
    captions over ``n_videos`` videos."""
    total = n_videos * flops["video"] + n_captions * flops["text"] + n_videos * n_captions * flops["pair"]
    return {"gflops_per_video": flops["video"] / 1e9, "gflops_per_caption": flops["text"] / 1e9,
            "gflops_per_pair": flops["pair"] / 1e9, "gflops_total": total / 1e9}


# -- token merging ------------------------------------------------------------
# The CLIP-style model: 64x64 images in 8x8 patches (64 tokens and [CLS]),
# six vision layers of width 128, four text layers.
CLIP = dict(image_size=64, patch_size=8, tubelet=1, max_frames=1, dim=128, heads=4, depth=6, text_depth=4,
            embed_dim=128, max_text_len=TEXT_LEN)
CLIP_TRAIN = TrainConfig(steps=1000, groups_per_step=16, groups_per_unit=16, negatives_per_item=0, lr=1e-3,
                         warmup_steps=50, itc_weight=1.0, checkpoint_every=250)
# A twentieth of the base's learning rate, nearer CrossGET's CLIP recipe (a fiftieth); BENCHMARKS.md keeps the
# figures of the earlier run at 2e-4.
CLIP_TUNE = replace(CLIP_TRAIN, steps=200, lr=5e-5, warmup_steps=20, checkpoint_every=100)


def clip_data(out: Path, gallery: int, image_data: str | Path | None = None, progress: bool = True):
    """The token-merging experiments' image-text data: ``image_data`` or the
    synthetic set made under ``out`` (6,000 training images, ``gallery``
    test images); returns its tokenizer and its train and test splits, read
    at the CLIP-style model's image size."""
    root = _clip_dataset(out, gallery, 200, image_data, progress)
    tok = load_tokenizer(root)
    return root, tok, _clip_split(root, "train", tok, progress), _clip_split(root, "test", tok, progress)


def clip_validation(out: Path, gallery: int, n_val: int, tok, image_data: str | Path | None = None,
                    progress: bool = True):
    """The validation split that goes with ``clip_data``: ``image_data``'s
    own, or ``n_val`` synthetic images with one caption each, read with
    ``tok``. Returns ``(root, split)``.

    Its dataset is ``clip_data``'s with ``n_val`` validation images, in its
    own folder, so that the runs trained on ``clip_data``'s folder keep its
    fingerprint: each split of the synthetic set is drawn from its own random
    stream, so the two sets hold the same training and test images and
    captions, and only their validation splits differ."""
    root = _clip_dataset(out, gallery, n_val, image_data, progress)
    return root, _clip_split(root, "val", tok, progress)


def _clip_dataset(out: Path, gallery: int, n_val: int, image_data: str | Path | None, progress: bool) -> Path:
    if image_data:
        return Path(image_data)
    name = f"data_images{gallery}" + ("" if n_val == 200 else f"_val{n_val}")
    return make_dataset(Path(out) / name, kind="image-text", seed=0, n_train=6000, n_val=n_val, n_test=gallery,
                        group_size=4, frames=1, size=64, progress=progress)


def _clip_split(root: Path, split: str, tok, progress: bool):
    return load_split(root, split, tok, 1, CLIP["image_size"], TEXT_LEN, progress=progress)


def clip_base(out: Path, seed: int, steps: int, tok, train_data, progress: bool = True) -> Path:
    """The checkpoint of the CLIP-style base of ``seed`` (``out/merging/clip_base_s<seed>``), trained with
    ``CLIP_TRAIN`` for ``steps`` when missing, resumed when interrupted."""
    run = Path(out) / "merging" / f"clip_base_s{seed}"
    train_or_load("clip_tiny", {**CLIP, "vocab_size": tok.vocab_size}, train_data,
                  replace(CLIP_TRAIN, steps=steps, seed=seed), run, progress)
    return latest_checkpoint(run)


def r1_hits(scores: torch.Tensor, caption_item: torch.Tensor) -> torch.Tensor:
    """Per item (one caption each), mean of its t2v and v2t R@1 hits ``[n_items]``."""
    if not torch.equal(caption_item.sort().values, torch.arange(scores.shape[1])):
        raise ValueError("the per-item R@1 pairs one caption with each item: the test split needs exactly one "
                         "caption per item")
    t2v = (t2v_ranks(scores, caption_item) <= 1).double()
    order = torch.empty_like(t2v)
    order[caption_item] = t2v
    return (order + (v2t_ranks(scores, caption_item) <= 1).double()) / 2


def fine_tune(base: Path, method: str | None, r: int, data, cfg: TrainConfig, run_dir: Path, progress: bool,
              importance_weight: float = 1.0, **overrides):
    """``base`` fine-tuned with ``method`` merging (None: without; ``importance_weight``: CrossGET's, as
    ``slimvl.merge.patch``; ``overrides``: config changes that add no weights but the cross tokens'); a finished
    run is loaded, an interrupted one resumed."""
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None and read_meta(ckpt)["step"] == cfg.steps:
        return load_model(ckpt)
    torch.manual_seed(cfg.seed)
    model = load_model(base) if method is None else model_for_merging(base, method, r,
                                                                      importance_weight=importance_weight, **overrides)
    train(model, data, cfg, run_dir=run_dir, resume=ckpt is not None, progress=progress)
    return model


def set_merging(model, method: str | None, r: int, importance_weight: float = 1.0):
    """``model`` merging ``r`` tokens per layer with ``method`` (None or r = 0: not patched; ``importance_weight``:
    CrossGET's, as ``slimvl.merge.patch``)."""
    if is_patched(model):
        unpatch(model)
    if method is not None and r > 0:
        patch(model, method, r=r, importance_weight=importance_weight)
    return model.eval()
