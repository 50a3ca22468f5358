"""LayerDrop on cross-attention (Perceiver-VL's Table 3 analogue): trained
with and without LayerDrop x inferred with 1, 2 or all 3 cross-attentions.

    python benchmarks/layerdrop.py --out benchmarks/out

Trains Perceiver-VL tiny with three blocks of [cross-attention, 2 latent
self-attention layers] (``layers="csscsscss"``) on the demo's data and
recipe, once with ``cross_attn_drop=0`` and once with ``--drop`` (default
0.5, the paper's), reusing finished runs. Each model is then evaluated with
``cross_attn_keep`` = the first 1, 2 and 3 cross-attentions: t2v R@1 on a
test gallery of ``--gallery`` videos, GFLOPs per pair (torch's FLOP counter)
and latency per pair at batch 64, with its cut against all three measured in
the same run. The R@1 difference against all three carries a 95% interval
paired over the same captions (``slimvl.bench.stats``): a gallery of a few
hundred captions is too small to resolve one point otherwise.

    python benchmarks/layerdrop.py --out benchmarks/out --latency-only --repeats 7

measures only what running fewer cross-attentions saves: GFLOPs and latency
do not depend on the weights, so an untrained model of the same shape is
timed, ``--repeats`` times per configuration, the configurations taking turns
so that they share the machine's noise. Each repeat's cut is taken against
all three cross-attentions timed in the same round; the median and the range
over rounds are reported (one timing of a shared machine can be off by more
than the effect).
"""
from __future__ import annotations

import statistics
from dataclasses import asdict, replace
from pathlib import Path

import torch

from slimvl import create_model
from slimvl.bench import dummy_inputs, matmul_gflops, median_seconds, model_flops_per_pair, profile_model
from slimvl.bench.plots import figure
from slimvl.bench.report import add_ratios, machine_info, markdown_table, show, write_report
from slimvl.bench.stats import paired_difference, t2v_hits
from slimvl.checkpoint import latest_checkpoint
from slimvl.evaluate import score_matrix
from slimvl.experiments import experiment_parser, gallery_dataset, retrieval_splits, train_or_load
from slimvl.recipes import FRAMES, TEXT_LEN, TRAIN
from slimvl.tasks.retrieval import recall_metrics

COLUMNS = [("train_drop", "LayerDrop p (train)", "g"), ("cross_attentions", "cross-attn run", "d"),
           ("t2v_r1", "t2v R@1", ".3f"), ("points_vs_all", "R@1 pts vs all (95% CI)", "s"),
           ("gflops_per_pair", "GFLOPs/pair", ".4f"), ("latency_ms_per_pair", "ms/pair (b64)", ".3f"),
           ("latency_cut", "latency cut", ".1%"), ("latency_ms_batch1", "ms (b1)", ".2f")]


def main(argv: list[str] | None = None) -> dict:
    p = experiment_parser(__doc__, steps=TRAIN.steps)
    p.add_argument("--layers", default="csscsscss")
    p.add_argument("--drop", type=float, default=0.5)
    p.add_argument("--gallery", type=int, default=400, help="test videos retrieved against")
    p.add_argument("--finetune-steps", type=int, default=0,
                   help="instead of training each from scratch, fine-tune the model trained without LayerDrop "
                        "for this many steps, with and without LayerDrop (the paper's pre-train/fine-tune set-up)")
    p.add_argument("--finetune-lr", type=float, default=5e-4)
    p.add_argument("--min-run-time", type=float, default=2.0, help="seconds per latency measurement")
    p.add_argument("--latency-only", action="store_true",
                   help="only GFLOPs and latency cuts, repeated (untrained model; no training or retrieval)")
    p.add_argument("--repeats", type=int, default=7, help="--latency-only: timing rounds per configuration")
    a = p.parse_args(argv)
    out, prog = Path(a.out), not a.quiet
    if a.latency_only:
        return latency_cuts(a.layers, a.repeats, a.min_run_time, out)
    root = Path(a.data) if a.data else gallery_dataset(out / "data_gallery1000", 1000, prog)
    tok, train_data, test = retrieval_splits(root, a.gallery, prog)
    cfg = replace(TRAIN, steps=a.steps)
    matmul_ref = matmul_gflops()
    rows = []
    for drop in (0.0, a.drop):
        model, train_s = trained(a, drop, tok.vocab_size, train_data, cfg, out, prog)
        rows += keep_rows(model, test, matmul_ref, a.min_run_time, prog, train_drop=drop, train_seconds=train_s)
    add_ratios(rows, lambda r: r["cross_attentions"] == r["of"],
               {"latency_ms_per_pair": "latency_ratio", "gflops_per_pair": "gflops_ratio"}, by=["train_drop"])
    for r in rows:
        r.update(latency_cut=1 - r["latency_ratio"], gflops_cut=1 - r["gflops_ratio"],
                 points_vs_all=f"{r['t2v_r1_points_vs_all']:+.1f} ± {r['t2v_r1_points_ci95']:.1f}")
    how = (f"{cfg.steps} steps without LayerDrop, then fine-tuned {a.finetune_steps} steps with and without it"
           if a.finetune_steps else f"{cfg.steps} steps")
    md = (f"Perceiver-VL tiny, `layers={a.layers!r}`, {how}; t2v R@1 over {a.gallery} test videos "
          f"({len(test.caption_item)} captions); the interval of each difference is paired over the "
          f"same captions.\n\n" + markdown_table(rows, COLUMNS))
    payload = {"rows": rows, "train": asdict(cfg), "layers": a.layers, "gallery": a.gallery, "data": str(root),
               "machine": machine_info(), "finetune_steps": a.finetune_steps}
    name = "layerdrop" + (f"_{cfg.steps}steps" if cfg.steps != TRAIN.steps else "")
    write_report(out, name + (f"_finetune{a.finetune_steps}" if a.finetune_steps else ""), payload, md, plot(rows))
    print(md)
    return payload


def trained(a, drop: float, vocab_size: int, train_data, cfg, out: Path, prog: bool):
    """Perceiver-VL tiny trained with LayerDrop ``drop`` (from scratch, or
    with ``--finetune-steps`` fine-tuned from the run without LayerDrop) and
    its training seconds; finished runs are reused."""
    overrides = {"layers": a.layers, "cross_attn_drop": drop, "vocab_size": vocab_size, "max_text_len": TEXT_LEN}
    base_run = out / "layerdrop" / f"drop0-{cfg.steps}steps"
    if not a.finetune_steps:
        return train_or_load("perceiver_vl_tiny", overrides, train_data, cfg,
                             out / "layerdrop" / f"drop{drop:g}-{cfg.steps}steps", prog)
    train_or_load("perceiver_vl_tiny", {**overrides, "cross_attn_drop": 0.0}, train_data, cfg, base_run, prog)
    ft_cfg = replace(cfg, steps=a.finetune_steps, lr=a.finetune_lr, warmup_steps=20, seed=cfg.seed + 1)
    ft_run = out / "layerdrop" / f"{base_run.name}-finetune{a.finetune_steps}_drop{drop:g}"
    return train_or_load("perceiver_vl_tiny", overrides, train_data, ft_cfg, ft_run, prog,
                         init_from=latest_checkpoint(base_run))


def keep_rows(model, test, matmul_ref: float, min_run_time: float, prog: bool, **fields) -> list[dict]:
    """The model with all, then fewer, cross-attentions: recalls, the R@1
    difference against all of them (paired over the captions), GFLOPs and
    latency per pair. ``fields`` are copied into every row."""
    rows, hits_all = [], None  # per-caption hits with every cross-attention: the first keep evaluated
    n_cross = model.config.num_cross_layers
    for keep in range(n_cross, 0, -1):
        model.cross_attn_keep = keep
        scores = score_matrix(model, test, progress=prog)
        m = recall_metrics(scores, test.caption_item)
        hits = t2v_hits(scores, test.caption_item)
        hits_all = hits if hits_all is None else hits_all
        diff, ci = paired_difference(hits_all, hits)
        cost = profile_model(model, FRAMES, TEXT_LEN, batch=64, min_run_time=min_run_time, matmul_ref=matmul_ref)
        rows.append({**fields, "cross_attentions": keep, "of": n_cross, "t2v_r1": m["t2v_r1"],
                     "t2v_r5": m["t2v_r5"], "v2t_r1": m["v2t_r1"],
                     **{k: cost[k] for k in ("gflops_per_pair", "latency_ms_per_pair", "latency_ms_batch1")},
                     "t2v_r1_points_vs_all": 100 * diff, "t2v_r1_points_ci95": 100 * ci})
        show(rows[-1])
    return rows


def plot(rows: list[dict]):
    """t2v R@1 against latency per pair: a line per LayerDrop rate, each
    point labelled by the cross-attentions run."""
    fig, (ax,) = figure(1, width=5.5)
    for drop in sorted({r["train_drop"] for r in rows}):
        rs = [r for r in rows if r["train_drop"] == drop]
        ax.plot([r["latency_ms_per_pair"] for r in rs], [r["t2v_r1"] for r in rs], "o-",
                label=f"trained with LayerDrop p={drop:g}")
        for r in rs:
            ax.annotate(f"{r['cross_attentions']}/{r['of']}", (r["latency_ms_per_pair"], r["t2v_r1"]))
    ax.set(xlabel="latency per pair (ms, batch 64)", ylabel="t2v R@1", title="cross-attentions run at inference")
    ax.legend()
    fig.tight_layout()
    return fig


@torch.inference_mode()
def latency_cuts(layers: str, repeats: int, min_run_time: float, out: Path) -> dict:
    """GFLOPs and latency per pair (batch 64 and batch 1) with the first 1..k
    cross-attentions, timed in ``repeats`` interleaved rounds."""
    torch.manual_seed(0)
    model = create_model("perceiver_vl_tiny", layers=layers, max_text_len=TEXT_LEN).eval()
    n = model.config.num_cross_layers
    inputs = {b: dummy_inputs(model, FRAMES, TEXT_LEN, b) for b in (1, 64)}
    times: dict[tuple[int, int], list[float]] = {(k, b): [] for k in range(1, n + 1) for b in (1, 64)}
    flops = {}
    for k in range(n, 0, -1):
        model.cross_attn_keep = k
        flops[k] = model_flops_per_pair(model, FRAMES, TEXT_LEN)
    for _ in range(repeats):
        for k in range(n, 0, -1):
            model.cross_attn_keep = k
            for b, x in inputs.items():
                times[k, b].append(median_seconds(lambda x=x: model(*x), min_run_time) / b)
    rows = []
    for k in range(n, 0, -1):
        row = {"cross_attentions": k, "of": n, "gflops_per_pair": flops[k] / 1e9,
               "gflops_cut": 1 - flops[k] / flops[n]}
        for b, tag in ((64, "b64"), (1, "b1")):
            cuts = [1 - t / full for t, full in zip(times[k, b], times[n, b])]
            row.update({f"ms_per_pair_{tag}": 1e3 * statistics.median(times[k, b]),
                        f"cut_{tag}": statistics.median(cuts), f"cut_{tag}_min": min(cuts),
                        f"cut_{tag}_max": max(cuts)})
            row[f"cut_{tag}_range"] = f"{row[f'cut_{tag}']:.1%} ({min(cuts):.1%} to {max(cuts):.1%})"
        rows.append(row)
        print(row, flush=True)
    cols = [("cross_attentions", "cross-attn run", "d"), ("gflops_per_pair", "GFLOPs/pair", ".4f"),
            ("gflops_cut", "GFLOPs cut", ".1%"), ("ms_per_pair_b64", "ms/pair (b64)", ".3f"),
            ("cut_b64_range", "latency cut b64: median (range)", "s"), ("ms_per_pair_b1", "ms (b1)", ".2f"),
            ("cut_b1_range", "latency cut b1: median (range)", "s")]
    md = (f"Perceiver-VL tiny, `layers={layers!r}`, {FRAMES} frames, text length {TEXT_LEN}, fp32, "
          f"{torch.get_num_threads()} threads; latency medians over {repeats} interleaved rounds, each cut "
          "against all cross-attentions timed in the same round.\n\n" + markdown_table(rows, cols))
    payload = {"rows": rows, "layers": layers, "repeats": repeats, "min_run_time": min_run_time,
               "times_s": {f"keep{k}_batch{b}": v for (k, b), v in times.items()}, "machine": machine_info()}
    write_report(out, "layerdrop_latency", payload, md)
    print(md)
    return payload


if __name__ == "__main__":
    main()
