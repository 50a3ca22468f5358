"""Fusing audio and video (and text): early fusion, late fusion, MBT
bottlenecks and LoCoMT's per-head views, at equal width and depth.

    python benchmarks/fusion.py --out benchmarks/out

On the synthetic world's audio-video data (AudioSet layout, made under OUT
when missing: clips of 2 s, a test set of 2,000 clips), each arm is
trained from scratch with every seed of ``--seeds``:

- ``audio-video`` (multi-label: the shapes and colours seen or heard; mAP):
  the four schemes over video + audio, and video alone (no audio: what the
  sound adds); each arm's mean and spread over the seeds, and the paired
  95% interval of its mAP difference from early fusion (a bootstrap over
  test clips, the seeds' mAP differences averaged in every resample);
- ``audio-video-text`` (``--text``; three classes: the statement's object
  is visible, only heard, or absent; accuracy): the four schemes over
  video + audio + text, and video + text;
- cost per clip at the task's input sizes: GFLOPs by torch's counter (and
  the analytic formula), latency at batch 1 and per clip at batch 64, as
  ratios to early fusion measured in the same run;
- LoCoMT view maps (``--view-maps``, first seed): the default map, random
  maps, and self views only (no head reads another modality);
- audio length (``--seconds-sweep``): how each scheme's GFLOPs grow with the
  audio's seconds (no training).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from slimvl.bench import model_flops_per_pair
from slimvl.bench.flops import call_model, dummy_batch
from slimvl.bench.measure import median_seconds
from slimvl.bench.plots import figure
from slimvl.bench.report import markdown_table, write_report
from slimvl.data import make_dataset
from slimvl.experiments import experiment_parser, parse_options, train_or_load
from slimvl.models import create_model, get_config
from slimvl.pipeline import audio_statistics, load_av_split, load_tokenizer
from slimvl.tasks.audio_video import AVTask, av_metrics, predict_av
from slimvl.train import TrainConfig

SCHEMES = ("early", "late", "mbt", "locomt")
TRAIN = TrainConfig(steps=500, batch_size=32, lr=1e-3, warmup_steps=30, checkpoint_every=200)
COLUMNS = [("arm", "arm", ""), ("modalities", "modalities", ""), ("seeds", "seeds", "d"),
           ("score", "score", ".3f"), ("score_range", "range (seeds)", ""),
           ("vs_early", "vs early fusion (95% CI)", ""), ("vs_mbt", "vs MBT (95% CI)", ""), ("gflops", "GFLOPs", ".4f"),
           ("gflops_ratio", "GFLOPs vs early", ".2f"), ("latency_ratio", "latency b=1 vs early", ".2f"),
           ("throughput_ratio", "throughput b=64 vs early (x)", ".2f")]


def arms(text: bool, frames: int) -> dict[str, tuple[str, dict]]:
    """Arm name -> (preset, overrides) of one task: the four schemes, the
    video without audio, and (audio-video) LoCoMT made as deep as it takes
    to cost what MBT costs, for the comparison at equal GFLOPs."""
    av = ["video", "audio", "text"] if text else ["video", "audio"]
    out = {s: (f"fusion_{s}_tiny", {"modalities": av}) for s in SCHEMES}
    out["video only" if not text else "video + text"] = ("fusion_early_tiny",
                                                        {"modalities": ["video", "text"] if text else ["video"]})
    if not text:
        mbt = create_model("fusion_mbt_tiny", modalities=av).analytic_flops(frames)
        depth = min(range(1, 17), key=lambda d: abs(
            create_model("fusion_locomt_tiny", modalities=av, depth=d).analytic_flops(frames) - mbt))
        out["locomt at MBT's GFLOPs"] = ("fusion_locomt_tiny", {"modalities": av, "depth": depth})
    return out


def sorted_ap(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Average precision of every column ``[C]`` of scores ``[n, C]`` (ties
    broken by order; NaN for a column without positives): the fast form the
    bootstrap resamples."""
    order = scores.argsort(0, descending=True)
    pos = positive.gather(0, order).double()
    hits = pos.cumsum(0)
    precision = hits / torch.arange(1, len(pos) + 1, dtype=torch.float64)[:, None]
    return (precision * pos).sum(0) / pos.sum(0)


def paired_map_interval(a: list[torch.Tensor], b: list[torch.Tensor], labels: torch.Tensor, resamples: int = 500,
                        seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval over test clips of mean-over-seeds mAP(a) - mAP(b)
    (``a``, ``b``: logits ``[n, C]`` per seed, paired by seed)."""
    g = torch.Generator().manual_seed(seed)
    n, diffs = labels.shape[0], []
    pos = labels > 0.5
    for _ in range(resamples):
        rows = torch.randint(0, n, (n,), generator=g)
        p = pos[rows]
        keep = p.any(0)
        d = [(sorted_ap(x[rows], p)[keep].mean() - sorted_ap(y[rows], p)[keep].mean()).item() for x, y in zip(a, b)]
        diffs.append(float(np.mean(d)))
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return float(lo), float(hi)


def paired_accuracy_interval(a: list[torch.Tensor], b: list[torch.Tensor], labels: torch.Tensor) -> tuple[float, float]:
    """95% normal interval over test clips of the accuracy difference, each
    clip's correctness averaged over the seeds."""
    ra = torch.stack([(x.argmax(-1) == labels).double() for x in a]).mean(0)
    rb = torch.stack([(x.argmax(-1) == labels).double() for x in b]).mean(0)
    d = ra - rb
    half = 1.96 * float(d.std()) / len(d) ** 0.5
    return float(d.mean()) - half, float(d.mean()) + half


@torch.inference_mode()
def cost(model, frames: int, text_len: int, min_run_time: float) -> dict:
    """GFLOPs per clip (counted and analytic), latency at batch 1 and per clip at batch 64."""
    model.eval()
    out = {"gflops": model_flops_per_pair(model, frames, text_len) / 1e9,
           "gflops_analytic": model.analytic_flops(frames, text_len) / 1e9}
    for b, key in ((1, "latency_ms"), (64, "ms_per_clip_b64")):
        inputs = dummy_batch(model, frames, text_len, b)
        out[key] = median_seconds(lambda: call_model(model, inputs), min_run_time) / b * 1e3
    return out


def run_task(a, root: Path, stats: dict, text: bool, out: Path, prog: bool) -> dict:
    """Train and score every arm of one task over the seeds; cost per arm."""
    target = "statements" if text else "labels"
    task_name = "audio-video-text" if text else "audio-video"
    tok = load_tokenizer(root) if text else None
    base = get_config("fusion_early_tiny", modalities=["video", "audio", "text"] if text else ["video", "audio"],
                      **stats, **({"vocab_size": tok.vocab_size} if tok else {}))
    train_data = load_av_split(root, "train", base, tok, target, frames=a.frames, progress=prog)
    test = load_av_split(root, "test", base, tok, target, frames=a.frames, progress=prog)
    extra = {"num_classes": len(test.classes), "multi_label": not text, **stats,
             **({"vocab_size": tok.vocab_size} if tok else {})}
    cfg = TrainConfig(**{**TRAIN.__dict__, "steps": a.steps})
    rows, logits = [], {}
    for arm, (preset, overrides) in arms(text, a.frames).items():
        logits[arm] = []
        for seed in a.seeds:
            folder = arm.replace(" ", "_").replace("+", "").replace("'", "")
            run_dir = out / "fusion" / task_name / folder / f"seed{seed}"
            cfg_s = TrainConfig(**{**cfg.__dict__, "seed": seed})
            model, seconds = train_or_load(preset, {**overrides, **extra}, AVTask(train_data), cfg_s, run_dir, prog)
            z = predict_av(model, test)
            logits[arm].append(z)
            m = av_metrics(z, test)
            rows.append({"task": task_name, "arm": arm, "scheme": model.config.fusion,
                         "modalities": "+".join(model.config.modalities), "seed": seed,
                         "score": m["mAP"] if not text else m["accuracy"], "train_seconds": seconds, **m})
        model.cpu()  # cost is measured once per arm (it does not depend on the seed)
        c = cost(model, a.frames, test.inputs["text"].shape[1] if text else 0, a.min_run_time)
        for r in rows:
            if r["arm"] == arm:
                r.update(c)
    return {"rows": rows, "logits": logits, "labels": test.labels, "n_test": test.n, "metric":
            "accuracy" if text else "mAP", "classes": test.classes}


def summarise(res: dict) -> list[dict]:
    """One row per arm: mean and spread over seeds, paired interval vs early fusion, cost ratios."""
    rows, logits, labels = res["rows"], res["logits"], res["labels"]
    early = next(r for r in rows if r["arm"] == "early")
    table = []
    for arm in logits:
        rs = [r for r in rows if r["arm"] == arm]
        scores = [r["score"] for r in rs]
        row = {"arm": arm, "modalities": rs[0]["modalities"], "seeds": len(rs), "score": float(np.mean(scores)),
               "score_min": min(scores), "score_max": max(scores),
               "score_range": f"{min(scores):.3f}..{max(scores):.3f}", "gflops": rs[0]["gflops"],
               "gflops_analytic": rs[0]["gflops_analytic"], "gflops_ratio": rs[0]["gflops"] / early["gflops"],
               "latency_ratio": rs[0]["latency_ms"] / early["latency_ms"],
               "throughput_ratio": early["ms_per_clip_b64"] / rs[0]["ms_per_clip_b64"]}
        paired = paired_map_interval if res["metric"] == "mAP" else paired_accuracy_interval
        for base in ("early", "mbt"):
            if arm == base:
                row[f"vs_{base}"] = "(baseline)"
                continue
            lo, hi = paired(logits[arm], logits[base], labels)
            diff = row["score"] - float(np.mean([r["score"] for r in rows if r["arm"] == base]))
            row.update({f"vs_{base}": f"{100 * diff:+.1f} pt [{100 * lo:+.1f}, {100 * hi:+.1f}]",
                        f"diff_{base}": diff, f"ci_{base}": [lo, hi]})
        table.append(row)
    return table


def view_maps(a, root: Path, stats: dict, out: Path, prog: bool) -> list[dict]:
    """LoCoMT with each view map of ``--view-maps`` (first seed): mAP and GFLOPs."""
    base = get_config("fusion_locomt_tiny", **stats)
    train_data = load_av_split(root, "train", base, frames=a.frames, progress=prog)
    test = load_av_split(root, "test", base, frames=a.frames, progress=prog)
    cfg = TrainConfig(**{**TRAIN.__dict__, "steps": a.steps, "seed": a.seeds[0]})
    rows = []
    for spec in a.view_maps:
        views = ["video", "video", "audio", "audio"] if spec == "self" else spec  # every layer alike
        # The default map is the LoCoMT arm of the audio-video task (same config and seed): its run is reused.
        run_dir = out / "fusion" / ("audio-video/locomt" if spec == "default" else "views/" + spec.replace(":", "_"))
        model, _ = train_or_load("fusion_locomt_tiny", {"views": views, "num_classes": len(test.classes), **stats},
                                 AVTask(train_data), cfg, run_dir / f"seed{a.seeds[0]}", prog)
        m = av_metrics(predict_av(model, test), test)
        rows.append({"views": spec, "mAP": m["mAP"], "gflops": model_flops_per_pair(model.cpu(), a.frames, 0) / 1e9,
                     "map": [[str(v) for v in layer] for layer in model.encoder.view_map]})
    return rows


def seconds_sweep(a) -> list[dict]:
    """GFLOPs per clip (counted) of each scheme as the audio grows."""
    rows = []
    for seconds in a.seconds_sweep:
        for scheme in SCHEMES:
            model = create_model(f"fusion_{scheme}_tiny", audio_seconds=float(seconds))
            tokens = model.token_lengths(a.frames, 0)["audio"]
            rows.append({"seconds": seconds, "scheme": scheme, "audio_tokens": tokens,
                         "gflops": model_flops_per_pair(model, a.frames, 0) / 1e9})
    for r in rows:
        early = next(e for e in rows if e["seconds"] == r["seconds"] and e["scheme"] == "early")
        r["gflops_ratio"] = r["gflops"] / early["gflops"]
    return rows


def pareto(ax, rows: list[dict], ylabel: str, title: str) -> None:
    """Score (mean of seeds, bars: their range) against GFLOPs per clip, one point per arm."""
    for r in rows:
        ax.errorbar(r["gflops"], r["score"], yerr=[[r["score"] - r["score_min"]], [r["score_max"] - r["score"]]],
                    fmt="o", capsize=3)
        ax.annotate(r["arm"], (r["gflops"], r["score"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set(xlabel="GFLOPs per clip (torch's counter)", ylabel=ylabel, title=title)


def plot(axes, av: list[dict], avt: list[dict] | None, views: list[dict], sweep: list[dict]) -> None:
    pareto(axes[0], av, "test mAP (mean and range of seeds)", "audio-video, multi-label")
    if avt:
        pareto(axes[1], avt, "test accuracy (mean and range of seeds)", "audio-video-text, 3 classes")
    ax = axes[2]
    for scheme in SCHEMES:
        rs = [r for r in sweep if r["scheme"] == scheme]
        ax.plot([r["seconds"] for r in rs], [r["gflops"] for r in rs], "o-", label=scheme)
    ax.set(xlabel="audio seconds", ylabel="GFLOPs per clip", title="cost as the audio grows")
    ax.legend(fontsize=7)
    ax = axes[3]
    maps = [r["mAP"] for r in views]
    ax.bar(range(len(views)), maps)
    ax.set_xticks(range(len(views)), [r["views"] for r in views], fontsize=7)
    ax.set_ylim(max(0.0, min(maps) - 0.05), min(1.0, max(maps) + 0.02))  # the differences, not the bars' bases
    ax.set(ylabel="test mAP", title="LoCoMT view maps (one seed)")


def main(argv: list[str] | None = None) -> dict:
    p = experiment_parser(__doc__, steps=TRAIN.steps)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds of every arm")
    p.add_argument("--n-train", type=int, default=4000, help="training clips of the generated data")
    p.add_argument("--n-test", type=int, default=2000, help="test clips of the generated data")
    p.add_argument("--frames", type=int, default=8, help="frames sampled per clip (all 8 the data has)")
    p.add_argument("--text", action="store_true", help="also the three-class audio-video-text task")
    p.add_argument("--view-maps", nargs="+", default=["default", "random:0", "random:1", "self"],
                   help="LoCoMT view maps compared ('self': self views only)")
    p.add_argument("--seconds-sweep", type=float, nargs="+", default=[1, 2, 4, 8], help="audio lengths costed")
    p.add_argument("--min-run-time", type=float, default=1.0, help="seconds of timing per measurement")
    a, command = parse_options(p, "fusion.py", argv)
    out, prog = Path(a.out), not a.quiet
    root = Path(a.data) if a.data else make_dataset(out / f"data_audio_video{a.n_test}", kind="audio-video",
                                                    n_train=a.n_train, n_val=200, n_test=a.n_test, frames=8,
                                                    size=64, seconds=2.0, progress=prog)
    mean, std = audio_statistics(root, get_config("fusion_early_tiny"), progress=prog)
    stats = {"audio_mean": mean, "audio_std": std}
    av = run_task(a, root, stats, False, out, prog)
    avt = run_task(a, root, stats, True, out, prog) if a.text else None
    views = view_maps(a, root, stats, out, prog)
    sweep = seconds_sweep(a)
    table = summarise(av)
    payload = {"command": command, "data": str(root), "audio_stats": stats, "n_test": av["n_test"],
               "audio_video": {"summary": table, "runs": av["rows"]}, "view_maps": views, "seconds_sweep": sweep}
    md = (f"audio-video, multi-label ({len(av['classes'])} classes), {av['n_test']} test clips, mAP; "
          f"{a.steps} steps per run:\n\n{markdown_table(table, COLUMNS)}\n")
    avt_table = None
    if avt is not None:
        avt_table = summarise(avt)
        payload["audio_video_text"] = {"summary": avt_table, "runs": avt["rows"]}
        md += (f"audio-video-text, 3 classes (visible / heard / absent), {avt['n_test']} test clips, "
               f"accuracy:\n\n{markdown_table(avt_table, COLUMNS)}\n")
    md += "LoCoMT view maps (seed %d):\n\n%s\n" % (a.seeds[0], markdown_table(
        views, [("views", "view map", ""), ("mAP", "mAP", ".3f"), ("gflops", "GFLOPs", ".4f")]))
    md += "Cost as the audio grows (GFLOPs per clip, torch's counter):\n\n%s\n" % markdown_table(
        sweep, [("seconds", "audio s", "g"), ("scheme", "scheme", ""), ("audio_tokens", "audio tokens", "d"),
                ("gflops", "GFLOPs", ".4f"), ("gflops_ratio", "vs early", ".2f")])
    fig, axes = figure(4, width=4.5)
    plot(axes, table, avt_table, views, sweep)
    write_report(out, "fusion", payload, md, fig)
    print(md)
    return payload


if __name__ == "__main__":
    main()
