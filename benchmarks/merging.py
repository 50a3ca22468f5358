"""Token merging (ToMe, CrossGET) on a CLIP-style dual encoder (image-text)
and on the single-stream cross-encoder (video-text).

    python benchmarks/merging.py --out benchmarks/out

For each part a base model is trained (or reused), then fine-tuned three
ways from it for the same steps: without merging (the fine-tuned baseline,
also the model ToMe is applied to training-free), with ToMe at ``r`` and
with CrossGET at ``r`` (cross tokens and the consistency loss on the CLIP
model; guided by the text on the cross-encoder). ``--importance-weights``
adds one CLIP CrossGET arm per weight (``importance_weight`` of
``slimvl.merge.patch``: 1 is CrossGET as published, 0 its matching on
similarity alone; other values are our extension). Every model is then
evaluated over an r sweep:

- R@1 both ways on the test gallery (``--gallery`` images with one caption
  each for CLIP; ``--pairs-gallery`` videos, all pairs scored, for the
  cross-encoder), and the paired 95% interval of the mean R@1's difference
  from no merging (same seed, same queries);
- GFLOPs by torch's counter (CLIP: one image + one caption, as the paper's
  fvcore count; cross-encoder: one pair);
- latency at batch 1 and throughput at batch 64 (CLIP: images encoded;
  cross-encoder: pairs scored), as speed-ups over no merging measured in
  the same run (> 1: faster).

CLIP: each merging arm's r is also chosen on a validation split
(``--val-gallery`` images, not the test gallery's), as the largest r of
the sweep whose mean R@1 there stays within ``--val-drop`` points of no
merging's, and reported with its test figures: a figure at a chosen r is
not one picked for looking good on the gallery that scores it.

``--speed-only`` measures the CLIP model's image encoding alone (GFLOPs,
batch 1, batch 64) on untrained weights, in interleaved rounds: what
merging costs depends on the token counts, not on what the weights learned.
``--speed-model cross`` times the cross-encoder's pair scoring instead.
On a CPU it also reports the time spent matching and merging at batch 64.
Timings run with freed memory kept by the process (``--allocator keep``,
``slimvl.bench.measure.keep_freed_memory``): otherwise glibc's page faults,
which vary with tensor sizes, land on some arms and not others.

``--seeds`` repeats the fine-tuning (CLIP: the base too) with each seed;
tables give the mean and the spread (min..max) over seeds. The 95%
interval is over test items (each item's hits averaged over the seeds), so
it shows how sure one gallery makes the difference, not the seeds' spread.
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from slimvl.bench import count_flops, model_flops_per_pair
from slimvl.bench.measure import keep_freed_memory, median_seconds
from slimvl.bench.plots import figure, plot_lines
from slimvl.bench.report import markdown_table, write_report
from slimvl.bench.stats import paired_difference
from slimvl.checkpoint import latest_checkpoint
from slimvl.experiments import (CLIP, CLIP_TRAIN, CLIP_TUNE, clip_base, clip_data, clip_validation,
                                experiment_parser, fine_tune, gallery_dataset, parse_options, r1_hits,
                                retrieval_splits, set_merging, train_or_load)
from slimvl.merge import Merge, is_patched, layers
from slimvl.merge.layers import check_importance_weight
from slimvl.models import create_model
from slimvl.recipes import FRAMES, TEXT_LEN, TRAIN
from slimvl.tasks.retrieval import recall_metrics, score_matrix
from slimvl.train import TrainConfig

PAIR_TUNE = replace(TRAIN, steps=200, lr=2e-4, warmup_steps=20, checkpoint_every=100)
LABELS = {"none": "no merging", "free": "ToMe, training-free", "tome": "ToMe, fine-tuned",
          "crossget": "CrossGET, fine-tuned"}
SPEED_LABELS = {"none": "no merging", "tome": "ToMe", "crossget": "CrossGET (with its cross token)"}
COLUMNS = [("method", "method", ""), ("r", "r", "d"), ("seeds", "seeds", "d"), ("t2v_r1", "t2v R@1", ".3f"),
           ("v2t_r1", "v2t R@1", ".3f"), ("mean_r1", "mean R@1", ".3f"), ("mean_r1_range", "range (seeds)", ""),
           ("vs_none", "mean R@1 vs no merging (95% CI)", ""), ("gflops", "GFLOPs", ".4f"),
           ("latency_ratio", "speed-up b=1 (x)", ".2f"), ("throughput_ratio", "throughput b=64 (x)", ".2f")]


def crossget_arm(weight: float) -> str:
    """The arm of CrossGET with ``importance_weight``: "crossget" as published (1), else "crossget-w<weight>"."""
    return "crossget" if weight == 1 else f"crossget-w{weight:g}"


def arm_settings(weights: list[float]) -> dict[str, tuple[str | None, float]]:
    """Every fine-tuned arm: its merging method and CrossGET importance weight."""
    return {"none": (None, 1.0), "tome": ("tome", 1.0), **{crossget_arm(w): ("crossget", w) for w in weights}}


def label(arm: str) -> str:
    if arm in LABELS:
        return LABELS[arm]
    return f"CrossGET, importance weight {arm.removeprefix('crossget-w')} (ours), fine-tuned"


def fine_tuned_arms(base: Path, r: int, data, cfg: TrainConfig, folder: Path, name: str, progress: bool,
                    cross_hidden: bool = False, weights: tuple[float, ...] = (1.0,)) -> dict:
    """``base`` fine-tuned without merging ("none"), with ToMe and with
    CrossGET at ``r``, once per importance weight in ``weights`` (its vision
    cross token hidden with ``cross_hidden``); each run in ``folder /
    name.format(arm)`` (``crossget_arm``; "-hidden" added for a hidden cross
    token)."""
    hidden = {"cross_hidden": True} if cross_hidden else {}
    models = {}
    for arm, (method, weight) in arm_settings(weights).items():
        crossget = method == "crossget"
        models[arm] = fine_tune(base, method, r, data, cfg, folder / name.format(arm + ("-hidden" if crossget and
                                                                                          hidden else "")),
                                progress, importance_weight=weight, **(hidden if crossget else {}))
    return models


def clip_measure(model, test, min_run_time: float) -> dict:
    """R@1 hits, GFLOPs of one image + one caption, and image-encoding times at batch 1 and 64."""
    with torch.inference_mode():
        scores = score_matrix(model, test, progress=False)
        images = test.videos[:64].float() / 127.5 - 1
        ids, mask = test.caption_ids[:8], test.caption_mask[:8]
        gflops = (count_flops(lambda: model.encode_video(images[:8]), model)
                  + count_flops(lambda: model.encode_text(ids, mask), model)) / 8 / 1e9
        one = median_seconds(lambda: model.encode_video(images[:1]), min_run_time)
        many = median_seconds(lambda: model.encode_video(images), min_run_time)
    return {"hits": r1_hits(scores, test.caption_item), "scores": scores, "gflops": gflops, "latency_s": one,
            "throughput": 64 / many, "tokens": model.merge_report.get("video", {}).get("tokens")
            if is_patched(model) else None}


def pair_measure(model, test, min_run_time: float) -> dict:
    """R@1 hits over all pairs, GFLOPs of one pair, and pair-scoring times at batch 1 and 64."""
    with torch.inference_mode():
        scores = score_matrix(model, test, progress=False)
        videos = test.videos[:64].float() / 127.5 - 1
        ids, mask = test.caption_ids[:64], test.caption_mask[:64]
        gflops = model_flops_per_pair(model, FRAMES, TEXT_LEN) / 1e9
        one = median_seconds(lambda: model(videos[:1], ids[:1], mask[:1]), min_run_time)
        many = median_seconds(lambda: model(videos, ids, mask), min_run_time)
    return {"hits": r1_hits(scores, test.caption_item), "scores": scores, "gflops": gflops, "latency_s": one,
            "throughput": 64 / many, "tokens": model.merge_report.get("video", {}).get("tokens")
            if is_patched(model) else None}


def val_r1(model, val) -> float:
    """Mean R@1 (text-to-image and image-to-text) of ``model`` on the validation split ``val`` (any number of
    captions per image)."""
    with torch.inference_mode():
        m = recall_metrics(score_matrix(model, val, progress=False), val.caption_item, ks=(1,))
    return (m["t2v_r1"] + m["v2t_r1"]) / 2


def sweep(models: dict, rs: list[int], measure, test, min_run_time: float, seed: int,
          weights: tuple[float, ...] = (1.0,), val=None) -> list[dict]:
    """Every arm over ``rs``; ratios and paired differences against the arm ``none`` at r = 0. With a validation
    split ``val``, each row also has its mean R@1 there (``val_mean_r1``), for ``choose_on_validation``."""
    rows = []
    settings = arm_settings(weights)
    # The fine-tuned arms at r = 0 too: what their fine-tuning changed, apart from merging.
    plan = [("none", "none", None, 0)] + [("free", "none", "tome", r) for r in rs if r] + \
        [(arm, arm, settings[arm][0] if r else None, r) for arm in list(settings)[1:] for r in rs]
    for name, arm, method, r in plan:
        m = measure(set_merging(models[arm], method, r, settings[arm][1]), test, min_run_time)
        if val is not None:
            m["val_mean_r1"] = val_r1(models[arm], val)
        rows.append({"arm": name, "method": label(name), "r": r, "seed": seed, **m})
    base = rows[0]
    for row in rows:
        row.update(recall_metrics(row["scores"], test.caption_item, ks=(1,)))
        row["mean_r1"] = float(row["hits"].mean())
        row["latency_ratio"] = base["latency_s"] / row["latency_s"]
        row["throughput_ratio"] = row["throughput"] / base["throughput"]
        print(f"seed {seed} {row['method']:22s} r={row['r']} mean R@1 {row['mean_r1']:.3f} GFLOPs "
              f"{row['gflops']:.4f} throughput x{row['throughput_ratio']:.2f}", flush=True)
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Rows of the same (method, r) over seeds: means, the spread, and the
    paired difference from no merging (per-item hits averaged over seeds)."""
    out = []
    keys = list(dict.fromkeys((r["arm"], r["r"]) for r in rows))
    base = [r for r in rows if r["arm"] == "none"]
    base_hits = torch.stack([r["hits"] for r in base]).mean(0)
    for arm, rr in keys:
        rs = [r for r in rows if (r["arm"], r["r"]) == (arm, rr)]
        hits = torch.stack([r["hits"] for r in rs]).mean(0)
        means = [r["mean_r1"] for r in rs]
        row = {"arm": arm, "method": rs[0]["method"], "r": rr, "seeds": len(rs),
               "mean_r1_range": f"{min(means):.3f}..{max(means):.3f}", "tokens": rs[0]["tokens"]}
        for k in ("t2v_r1", "v2t_r1", "mean_r1", "gflops", "latency_ratio", "throughput_ratio", "throughput",
                  "latency_s", "val_mean_r1"):
            if k in rs[0]:
                row[k] = float(np.mean([r[k] for r in rs]))
        if arm != "none":
            d, ci = paired_difference(base_hits, hits)
            row.update(diff=d, ci=ci, vs_none=f"{100 * d:+.1f} +- {100 * ci:.1f} pt")
        else:
            row["vs_none"] = ""
        out.append(row)
    return out


CHOSEN_COLUMNS = [("method", "method", ""), ("r", "r chosen", ""), ("val_vs_none", "val mean R@1 vs no merging", ""),
                  ("vs_none", "test mean R@1 vs no merging (95% CI)", ""), ("gflops", "GFLOPs", ".4f"),
                  ("throughput_ratio", "throughput b=64 (x)", ".2f")]


def choose_on_validation(summary: list[dict], max_drop: float) -> list[dict]:
    """Per merging arm of ``summary`` (``summarise``'s rows, with
    ``val_mean_r1``), the largest r whose validation mean R@1 (averaged over
    seeds) is at most ``max_drop`` (a fraction: 0.005 is half a point) below
    no merging's, and that r's test figures: the test gallery never picks
    the r it is then scored at. An arm with no such r gets a row with r
    "none" and no test figures."""
    base = next((row for row in summary if row["arm"] == "none"), None)
    if base is None or "val_mean_r1" not in base:
        raise ValueError("choose_on_validation: the summary needs the no-merging row, with val_mean_r1 (run the "
                         "sweep with a validation split)")
    out = []
    for arm in dict.fromkeys(row["arm"] for row in summary if row["arm"] != "none"):
        rows = [row for row in summary if row["arm"] == arm]
        ok = [row for row in rows if base["val_mean_r1"] - row["val_mean_r1"] <= max_drop + 1e-12]
        if not ok:
            best = max(rows, key=lambda row: row["val_mean_r1"])
            out.append({"arm": arm, "method": best["method"], "r": "none",
                        "val_vs_none": f"{100 * (best['val_mean_r1'] - base['val_mean_r1']):+.1f} pt at best "
                                       f"(r = {best['r']})", "vs_none": "", "gflops": None, "throughput_ratio": None})
            continue
        row = max(ok, key=lambda row: row["r"])
        out.append({**{k: row.get(k) for k in ("arm", "method", "r", "vs_none", "diff", "ci", "gflops",
                                               "throughput_ratio", "val_mean_r1")},
                    "val_vs_none": f"{100 * (row['val_mean_r1'] - base['val_mean_r1']):+.1f} pt"})
    return out


def tune_tag(a, default: TrainConfig) -> str:
    """What a fine-tuning run's folder name adds when its recipe is not the
    default, so that a finished run of another recipe is never reused."""
    return (f"_steps{a.tune_steps}" if a.tune_steps != default.steps else "") + \
        (f"_lr{a.tune_lr:g}" if a.tune_lr and a.tune_lr != default.lr else "")


def clip_part(a, out: Path, prog: bool) -> dict:
    root, tok, train_data, test = clip_data(out, a.gallery, a.image_data, prog)
    val_root, val = clip_validation(out, a.gallery, a.val_gallery, tok, a.image_data, prog) if a.val_gallery else \
        (None, None)
    rows = []
    for seed in a.seeds:
        base = clip_base(out, seed, a.steps, tok, train_data, prog)
        models = fine_tuned_arms(base, a.r, train_data, replace(CLIP_TUNE, steps=a.tune_steps,
                                                                lr=a.tune_lr or CLIP_TUNE.lr, seed=seed),
                                 out / "merging", f"clip_{{}}_r{a.r}{tune_tag(a, CLIP_TUNE)}_s{seed}", prog,
                                 cross_hidden=a.cross_hidden, weights=a.importance_weights)
        rows += sweep(models, a.r_sweep, clip_measure, test, a.min_run_time, seed, a.importance_weights, val)
    return {"rows": rows, "n_test": len(test.caption_item), "data": str(root),
            "n_val": None if val is None else len(val.caption_item), "val_data": val_root and str(val_root)}


def pair_part(a, out: Path, prog: bool) -> dict:
    root = Path(a.data) if a.data else gallery_dataset(out / "data_gallery1000", 1000, prog)
    tok, train_data, test = retrieval_splits(root, a.pairs_gallery, prog, preset="single_stream_tiny")
    # The demo's cross-encoder, as benchmarks/decomposition.py trains it (reused when already there).
    train_or_load("single_stream_tiny", {"vocab_size": tok.vocab_size, "max_text_len": TEXT_LEN}, train_data,
                  replace(TRAIN, steps=a.pair_steps), out / "decomposition" / "cross", prog)
    base = latest_checkpoint(out / "decomposition" / "cross")
    rows = []
    for seed in a.pair_seeds:
        models = fine_tuned_arms(base, a.pair_r, train_data, replace(PAIR_TUNE, steps=a.tune_steps,
                                                                     lr=a.tune_lr or PAIR_TUNE.lr, seed=seed),
                                 out / "merging", f"pairs_{{}}_r{a.pair_r}{tune_tag(a, PAIR_TUNE)}_s{seed}", prog)
        rows += sweep(models, a.pair_r_sweep, pair_measure, test, a.min_run_time, seed)
    return {"rows": rows, "n_test": len(test.caption_item), "data": str(root)}


SPEED_COLUMNS = [("method", "method", ""), ("r", "r", "d"), ("tokens_left", "tokens after each layer", ""),
                 ("gflops", "image GFLOPs", ".4f"), ("latency_ratio", "speed-up b=1 (x)", ".2f"),
                 ("latency_spread", "range (rounds)", ""), ("throughput_ratio", "throughput b=64 (x)", ".2f"),
                 ("throughput_spread", "range (rounds)", ""),
                 ("merging_ms", "matching + merge, ms per batch of 64", ".1f"),
                 ("merging_share", "share of the batch's time", ".0%")]


def speed_columns(speed_model: str) -> list[tuple[str, str, str]]:
    """``SPEED_COLUMNS``, its GFLOPs named per image (CLIP) or per pair (cross-encoder)."""
    per = "image GFLOPs" if speed_model == "clip" else "GFLOPs per pair"
    return [(k, per if k == "gflops" else name, f) for k, name, f in SPEED_COLUMNS]


def merging_seconds(forward, forwards: int = 7) -> tuple[float, float]:
    """Median seconds of ``forward()`` and of the merging inside it: every
    call of the matching (``slimvl.merge.layers.match``) and of the merge
    (``Merge.tokens``), timed by wrapping both for these forwards only. CPU:
    a CUDA call returns before its work is done."""
    spent = [0.0]
    match, tokens = layers.match, Merge.tokens

    def timed(f):
        def call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return f(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - start
        return call

    layers.match, Merge.tokens = timed(match), timed(tokens)
    try:
        totals, merging = [], []
        for _ in range(forwards):
            spent[0], start = 0.0, time.perf_counter()
            forward()
            totals.append(time.perf_counter() - start)
            merging.append(spent[0])
    finally:
        layers.match, Merge.tokens = match, tokens
    return float(np.median(totals)), float(np.median(merging))


def speed_models(a, device: torch.device):
    """The untrained models ``--speed-only`` times: ``(plain, crossget,
    forward, what, rs)``, where ``forward(model, n)`` runs ``model`` on the
    first ``n`` of 64 random inputs and ``crossget`` is the model CrossGET's
    arms merge (CLIP: with its cross tokens; the cross-encoder has none, so
    it is ``plain``)."""
    torch.manual_seed(0)
    if a.speed_model == "clip":
        arch = {**CLIP, "patch_size": a.patch_size}
        plain, cross = (create_model("clip_tiny", **arch, vocab_size=64, cross_tokens=c,
                                     cross_hidden=c and a.cross_hidden).to(device).eval() for c in (False, True))
        images = torch.rand(64, 1, 3, CLIP["image_size"], CLIP["image_size"], device=device) * 2 - 1
        tokens = (CLIP["image_size"] // a.patch_size) ** 2
        return (plain, cross, lambda m, n: m.encode_video(images[:n]),
                f"CLIP-style model, image encoding ({tokens} patch tokens)", a.r_sweep)
    # The cross-encoder of the pairs part: the demo's single_stream_tiny scoring video-caption pairs, whose
    # captions (8 to 16 of the 36 positions real, as the synthetic world's) are protected and guide CrossGET.
    model = create_model("single_stream_tiny", vocab_size=64, max_text_len=TEXT_LEN).to(device).eval()
    size = model.config.image_size
    videos = torch.rand(64, FRAMES, 3, size, size, device=device) * 2 - 1
    ids = torch.randint(1, 64, (64, TEXT_LEN), device=device)
    mask = torch.arange(TEXT_LEN, device=device) < torch.randint(8, 17, (64, 1), device=device)
    return (model, model, lambda m, n: m(videos[:n], ids[:n].masked_fill(~mask[:n], 0), mask[:n]),
            f"single-stream cross-encoder, pair scoring ({model.patch_embed.num_tokens(FRAMES)} video tokens and "
            "a caption)", a.pair_r_sweep)


def speed_part(a) -> tuple[list[dict], str]:
    """``--speed-model``'s forward, untrained (``speed_models``): no
    merging, ToMe and CrossGET over its r sweep. In each of ``--rounds``
    rounds every arm is timed right after no merging, and its ratios are
    against that measurement (this machine's speed drifts); the table gives
    the median ratio and its range over rounds. On a CPU, the time each
    merging arm spends matching and merging at batch 64 is measured after
    the rounds (``merging_seconds``). Returns the rows and what was timed."""
    device = torch.device(a.device)
    plain, cross, forward, what, rs = speed_models(a, device)
    labels = {**SPEED_LABELS, **({} if cross is not plain else {"crossget": "CrossGET (guided by the caption)"})}
    arms = [("none", plain, None, 0)] + [("tome", plain, "tome", r) for r in rs if r] + \
        [("crossget", cross, "crossget", r) for r in rs if r or cross is not plain]
    rows = [{"arm": arm, "method": labels[arm], "r": r, "latency": [], "throughput": []} for arm, _, _, r in arms]

    def times(model, method, r) -> tuple[float, float]:
        set_merging(model, method, r)
        return (median_seconds(lambda: forward(model, 1), a.min_run_time),
                64 / median_seconds(lambda: forward(model, 64), a.min_run_time))

    with torch.inference_mode():
        for (_, model, method, r), row in zip(arms, rows):
            set_merging(model, method, r)
            row["gflops"] = count_flops(lambda: forward(model, 8), model) / 8 / 1e9
            row["tokens"] = model.merge_report.get("video", {}).get("tokens") if is_patched(model) else None
        for i in range(a.rounds):
            for (_, model, method, r), row in zip(arms[1:], rows[1:]):
                one, many = times(plain, None, 0)
                rows[0]["latency"].append(one)
                rows[0]["throughput"].append(many)
                one, many = times(model, method, r)
                row["latency"].append(rows[0]["latency"][-1] / one)
                row["throughput"].append(many / rows[0]["throughput"][-1])
            print(f"round {i + 1}/{a.rounds}: " + ", ".join(
                f"{row['arm']} r={row['r']} x{row['throughput'][-1]:.2f}" for row in rows[1:]), flush=True)
        if device.type == "cpu":  # where time spent inside a call is the call's
            for (_, model, method, r), row in zip(arms, rows):
                if method is not None and r > 0:
                    set_merging(model, method, r)
                    total, merging = merging_seconds(lambda: forward(model, 64))
                    row.update(merging_ms=merging * 1e3, merging_share=merging / total)
    for model in (plain, cross):
        set_merging(model, None, 0)
    none = rows[0]
    none.update(latency_s=float(np.median(none.pop("latency"))), items_per_s=float(np.median(none.pop("throughput"))),
                latency=[1.0], throughput=[1.0])
    for row in rows:
        lat, thr = row.pop("latency"), row.pop("throughput")
        row.update(latency_ratio=float(np.median(lat)), latency_spread=f"{min(lat):.2f}..{max(lat):.2f}",
                   throughput_ratio=float(np.median(thr)), throughput_spread=f"{min(thr):.2f}..{max(thr):.2f}",
                   latency_ratios=lat, throughput_ratios=thr,
                   tokens_left=", ".join(map(str, row["tokens"])) if row["tokens"] else "all (no merging)")
    return rows, what


def plot(axes, rows: list[dict], title: str) -> None:
    pts = [r for r in rows if r["arm"] != "none"]
    none = [r for r in rows if r["arm"] == "none"]
    for ax, x, xlabel in ((axes[0], "gflops", "GFLOPs"), (axes[1], "throughput_ratio", "throughput (x no merging)")):
        plot_lines(ax, pts, x, "mean_r1", by="method", xlabel=xlabel, ylabel="mean R@1 (t2v, v2t)", title=title)
        ax.plot([r[x] for r in none], [r["mean_r1"] for r in none], "k*", markersize=10, label="no merging")
        for r in pts:
            ax.annotate(f"r={r['r']}", (r[x], r["mean_r1"]), fontsize=6)
        ax.legend(fontsize=7)


def speed_report(a, out: Path, payload: dict) -> dict:
    """``--speed-only``: the table, the JSON (every round's times) and a plot of throughput against GFLOPs."""
    if a.rounds < 1:
        raise SystemExit(f"--rounds {a.rounds}: at least one round is needed")
    if a.patch_size < 1 or CLIP["image_size"] % a.patch_size:
        raise SystemExit(f"--patch-size {a.patch_size}: expected a divisor of the image size, {CLIP['image_size']}")
    if a.speed_model != "clip" and a.patch_size != CLIP["patch_size"]:
        raise SystemExit(f"--patch-size {a.patch_size}: only the CLIP model's patches can be changed "
                         f"(--speed-model {a.speed_model})")
    rows, what = speed_part(a)
    payload.update(speed=rows, speed_model=a.speed_model)
    md = (f"{what} on {a.device}, untrained weights, {a.rounds} rounds (median ratio against no merging in the "
          f"same round; allocator: {payload['allocator']}):\n\n{markdown_table(rows, speed_columns(a.speed_model))}\n")
    fig, axes = figure(2, width=5.0)
    for ax, y, ylabel in ((axes[0], "throughput_ratio", "throughput at batch 64 (x no merging)"),
                          (axes[1], "latency_ratio", "speed-up at batch 1 (x no merging)")):
        plot_lines(ax, rows[1:], "gflops", y, by="method", xlabel=speed_columns(a.speed_model)[3][1], ylabel=ylabel,
                   title=f"merging speed ({a.device})")
        ax.plot([rows[0]["gflops"]], [1.0], "k*", markersize=10, label="no merging")
        ax.legend(fontsize=7)
    write_report(out, a.name or "merging_speed", payload, md, fig)
    print(md)
    return payload


def strip(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("hits", "scores")} for r in rows]


def main(argv: list[str] | None = None) -> dict:
    p = experiment_parser(__doc__, steps=CLIP_TRAIN.steps)
    p.add_argument("--image-data", help="image-text dataset folder (default: made under OUT when missing)")
    p.add_argument("--gallery", type=int, default=1000, help="test images of the CLIP part (one caption each)")
    p.add_argument("--val-gallery", type=int, default=1000, help="CLIP: validation images (one caption each) "
                   "on which each arm's r is chosen (--val-drop), so that the test gallery does not choose it; "
                   "with --image-data, its own validation split is used; 0: no choice")
    p.add_argument("--val-drop", type=float, default=0.5, help="CLIP: the largest drop in mean R@1, in points, "
                   "from no merging on the validation split at which an arm's r is chosen")
    p.add_argument("--tune-steps", type=int, default=CLIP_TUNE.steps, help="fine-tuning steps of every arm")
    p.add_argument("--cross-hidden", action="store_true", help="CLIP: CrossGET's vision cross token read by no "
                   "other token (ClipConfig.cross_hidden), so that adding it changes nothing before fine-tuning")
    p.add_argument("--tune-lr", type=float, help=f"fine-tuning peak learning rate of every arm (default: CLIP "
                   f"{CLIP_TUNE.lr:g}, cross-encoder {PAIR_TUNE.lr:g})")
    p.add_argument("--r", type=int, default=12, help="CLIP: tokens merged per layer while fine-tuning")
    p.add_argument("--importance-weights", type=float, nargs="+", default=[1.0], help="CLIP: one CrossGET arm "
                   "per importance weight (slimvl.merge.patch's importance_weight; 1: as published)")
    p.add_argument("--r-sweep", type=int, nargs="+", default=[0, 4, 8, 12, 16], help="CLIP: r evaluated")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="CLIP: seeds (base and fine-tuning)")
    p.add_argument("--pairs-gallery", type=int, default=100, help="cross-encoder: test videos, all pairs scored")
    p.add_argument("--pair-r", type=int, default=16, help="cross-encoder: tokens merged per layer in fine-tuning")
    p.add_argument("--pair-r-sweep", type=int, nargs="+", default=[0, 8, 16, 24], help="cross-encoder: r evaluated")
    p.add_argument("--pair-steps", type=int, default=TRAIN.steps, help="cross-encoder: training steps of the base "
                   "(the demo's recipe; benchmarks/decomposition.py's run is reused)")
    p.add_argument("--pair-seeds", type=int, nargs="+", default=[0], help="cross-encoder: fine-tuning seeds")
    p.add_argument("--min-run-time", type=float, default=1.0, help="seconds of timing per measurement")
    p.add_argument("--allocator", choices=["keep", "default"], default="keep", help="keep: the process keeps the "
                   "CPU memory it frees (slimvl.bench.measure.keep_freed_memory), so that timings do not include "
                   "page faults that vary with tensor sizes; default: the C library's own behaviour")
    p.add_argument("--parts", nargs="+", default=["clip", "pairs"], choices=["clip", "pairs"],
                   help="the CLIP-style model (image-text), the cross-encoder (video-text), or both")
    p.add_argument("--speed-only", action="store_true", help="only the CLIP model's image-encoding speed, on "
                   "untrained weights (no data, no training): report OUT/merging_speed.*")
    p.add_argument("--speed-model", choices=["clip", "cross"], default="clip", help="--speed-only: the CLIP-style "
                   "model's image encoding (over --r-sweep) or the single-stream cross-encoder's pair scoring (over "
                   "--pair-r-sweep)")
    p.add_argument("--rounds", type=int, default=5, help="--speed-only: interleaved timing rounds")
    p.add_argument("--device", default="cpu", help="--speed-only: device of the timed models")
    p.add_argument("--patch-size", type=int, default=CLIP["patch_size"], help="--speed-only: patch size of the "
                   f"timed models, on {CLIP['image_size']}-pixel images (4: 256 patch tokens, as clip_small)")
    p.add_argument("--name", help="file name of the reports (OUT/NAME.json/.md/.png; default merging, or "
                   "merging_speed with --speed-only)")
    a, command = parse_options(p, "merging.py", argv)
    for w in a.importance_weights:  # before hours of training, not after
        try:
            check_importance_weight(w, "crossget")
        except ValueError as e:
            p.error(f"--importance-weights: {e}")
    if len({crossget_arm(w) for w in a.importance_weights}) < len(a.importance_weights):
        p.error(f"--importance-weights {a.importance_weights}: give distinct weights (to 6 significant digits)")
    if a.val_gallery < 0:
        p.error(f"--val-gallery {a.val_gallery}: expected a number of images >= 0 (0: no validation split)")
    if not 0 <= a.val_drop <= 100:
        p.error(f"--val-drop {a.val_drop}: expected points of mean R@1 in [0, 100]")
    out, prog = Path(a.out), not a.quiet
    kept = a.allocator == "keep" and keep_freed_memory()
    payload: dict = {"command": command, "allocator": "freed memory kept" if kept else "default"}
    if a.speed_only:
        return speed_report(a, out, payload)
    md = ""
    fig, axes = figure(2 * len(a.parts), width=5.0)
    for i, part in enumerate(a.parts):
        res = clip_part(a, out, prog) if part == "clip" else pair_part(a, out, prog)
        table = summarise(res["rows"])
        payload[part] = {"summary": table, "runs": strip(res["rows"]), "n_test": res["n_test"], "data": res["data"]}
        what = (f"CLIP-style dual encoder, image-text, {res['n_test']} test images x {res['n_test']} captions "
                f"(fine-tuned at r = {a.r})" if part == "clip" else
                f"Single-stream cross-encoder, video-text, {res['n_test']} videos x {res['n_test']} captions, "
                f"all pairs (fine-tuned at r = {a.pair_r})")
        md += f"{what}:\n\n{markdown_table(table, COLUMNS)}\n"
        if res.get("n_val"):
            chosen = choose_on_validation(table, a.val_drop / 100)
            payload[part].update(chosen=chosen, n_val=res["n_val"], val_data=res["val_data"],
                                 val_drop_points=a.val_drop)
            md += (f"\nr chosen on {res['n_val']} validation images (the largest r of the sweep within "
                   f"{a.val_drop:g} pt of no merging's mean R@1 there, averaged over seeds), scored on the test "
                   f"gallery:\n\n{markdown_table(chosen, CHOSEN_COLUMNS)}\n")
        plot(axes[2 * i: 2 * i + 2], table, "CLIP-style, image-text" if part == "clip" else "cross-encoder, video-text")
    write_report(out, a.name or "merging", payload, md, fig)
    print(md)
    return payload


if __name__ == "__main__":
    main()
