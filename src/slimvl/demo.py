"""``slimvl demo``: Perceiver-VL against a full-attention cross-encoder on
synthetic video-text retrieval, trained and measured side by side."""
from __future__ import annotations

import logging
from dataclasses import asdict, replace
from pathlib import Path

import torch

from .bench import matmul_gflops, profile_model
from .bench.plots import figure
from .bench.report import add_ratios
from .bench.stats import paired_difference, t2v_hits
from .checkpoint import latest_checkpoint
from .data import make_dataset
from .files import atomic_write_json, atomic_write_text, ensure_writable_dir
from .models import create_model
from .pipeline import load_split, load_tokenizer
from .recipes import DATA, FRAMES, MODELS, TEXT_LEN, TRAIN
from .runtime import resolve_device
from .tasks.retrieval import retrieval_metrics, score_matrix
from .train import train

log = logging.getLogger("slimvl")


def run_demo(out: str | Path = "runs/demo", steps: int | None = None, progress: bool = True,
             data_overrides: dict | None = None, seed: int = 0, device: str = "auto") -> dict:
    """Make (or reuse) the default data, train both models for the same steps,
    evaluate on the test gallery, measure cost; write ``results.json``,
    ``report.md`` and ``accuracy_vs_gflops.png`` under ``out``.

    ``seed`` fixes the models' initial weights and the training batches (the
    data is always the demo's). Training, evaluation and timing all run on
    ``device``. Each model's run folder is named after its steps and seed, so
    running the demo again reuses finished runs and resumes interrupted ones.
    ``steps`` and ``data_overrides`` (``make_dataset`` arguments) shrink the
    run for quick checks; the defaults are the demo."""
    out = ensure_writable_dir(out, "demo folder")
    dev = resolve_device(device)
    data_params = {**DATA, **(data_overrides or {})}
    root = make_dataset(out / "data", progress=progress, **data_params)
    tok = load_tokenizer(root)
    train_data = load_split(root, "train", tok, FRAMES, data_params["size"], TEXT_LEN, progress=progress)
    test_data = load_split(root, "test", tok, FRAMES, data_params["size"], TEXT_LEN, progress=progress)
    cfg = replace(TRAIN, steps=TRAIN.steps if steps is None else steps, seed=seed, device=str(dev))
    matmul_ref = matmul_gflops(dev)
    rows, curves, hits = [], {}, {}
    for name in MODELS:
        torch.manual_seed(seed)  # the seed fixes the initial weights too
        model = create_model(name, vocab_size=tok.vocab_size, max_text_len=TEXT_LEN)
        run_dir = out / f"{name}-{cfg.steps}steps-seed{seed}"
        result = train(model, train_data, cfg, run_dir=run_dir, resume=latest_checkpoint(run_dir) is not None,
                       progress=progress)
        timings: dict = {}
        scores = score_matrix(model, test_data, device=dev, progress=progress, timings=timings)
        metrics = {**retrieval_metrics(scores, test_data), **timings}
        hits[model.config.model_type] = t2v_hits(scores, test_data.caption_item)
        cost = profile_model(model, FRAMES, TEXT_LEN, batch=64, device=dev, matmul_ref=matmul_ref)
        curves[model.config.model_type] = result.history
        rows.append({
            "model": model.config.model_type, "preset": name,
            **{k: metrics[k] for k in ("t2v_r1", "t2v_r5", "t2v_r10", "v2t_r1", "v2t_r5", "v2t_r10",
                                       "t2v_medr", "v2t_medr")},
            "heldout_t2v_r1": metrics.get("heldout_t2v_r1"), "seen_t2v_r1": metrics.get("seen_t2v_r1"),
            "gflops_per_pair": cost["gflops_per_pair"], "latency_ms_per_pair": cost["latency_ms_per_pair"],
            "latency_ms_batch1": cost["latency_ms_batch1"], "fraction_of_matmul": cost["fraction_of_matmul"],
            "params": cost["params"], "train_seconds": result.seconds,
            "eval_seconds": metrics["encode_seconds"] + metrics["score_seconds"],
        })
    base = next(r for r in rows if r["model"] == "single_stream")
    add_ratios(rows, base, {"gflops_per_pair": "gflops_ratio_vs_single_stream",
                            "latency_ms_per_pair": "latency_ratio_vs_single_stream"})
    # The two models answer the same captions: the paired interval of the
    # R@1 difference is far tighter than two independent ones.
    diff, half = paired_difference(hits["single_stream"], hits["perceiver_vl"])
    results = {
        "gallery": {"split": "test", "n_videos": test_data.videos.shape[0],
                    "n_captions": int(len(test_data.caption_item)), "group_size": test_data.group_size,
                    "frames_sampled": FRAMES, "text_len": TEXT_LEN, "data": str(root), "data_params": data_params},
        "train": asdict(cfg), "seed": seed, "device": str(dev), "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # AVX2, AVX512...: it changes the sums' order
        "matmul_gflops_per_s": matmul_ref, "rows": rows,
        "t2v_r1_difference": {"perceiver_vl_minus_single_stream": diff, "ci95_half_width": half,
                              "ci95": [diff - half, diff + half], "n_captions": int(len(test_data.caption_item))},
    }
    atomic_write_json(out / "results.json", results)
    atomic_write_json(out / "curves.json", curves)
    atomic_write_text(out / "report.md", render_report(results))
    plot_results(results, curves, out / "accuracy_vs_gflops.png")
    print(render_table(rows))
    print(render_difference(results))
    return results


def render_table(rows: list[dict]) -> str:
    """The demo's comparison as a markdown table."""
    head = ("| model | t2v R@1 | t2v R@5 | t2v R@10 | v2t R@1 | held-out t2v R@1 | GFLOPs/pair | "
            "ms/pair | params | train s |\n|---|---|---|---|---|---|---|---|---|---|\n")
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    return head + "".join(
        f"| {r['model']} | {r['t2v_r1']:.3f} | {r['t2v_r5']:.3f} | {r['t2v_r10']:.3f} | {r['v2t_r1']:.3f} | "
        f"{fmt(r['heldout_t2v_r1'])} | {r['gflops_per_pair']:.4f} | {r['latency_ms_per_pair']:.3f} | "
        f"{r['params']:,} | {r['train_seconds']:.0f} |\n" for r in rows)


def render_difference(results: dict) -> str:
    """The t2v R@1 difference between the models with its paired 95% interval."""
    d = results["t2v_r1_difference"]
    return (f"t2v R@1, Perceiver-VL minus single-stream: {d['perceiver_vl_minus_single_stream']:+.3f} (paired 95% "
            f"interval {d['ci95'][0]:+.3f} to {d['ci95'][1]:+.3f}, over the same {d['n_captions']} captions).")


def render_report(results: dict) -> str:
    """``report.md``: the table, the ratios, and what was measured how."""
    g = results["gallery"]
    lines = [
        "# slimvl demo: Perceiver-VL vs single-stream cross-encoder", "",
        f"Test gallery: {g['n_videos']} videos, {g['n_captions']} captions, near-duplicate groups of "
        f"{g['group_size']} (variants differ in one attribute of one object); {g['frames_sampled']} of "
        f"{g['data_params']['frames']} frames sampled, {g['data_params']['size']}x{g['data_params']['size']}, "
        f"text length {g['text_len']}.",
        f"Both models trained {results['train']['steps']} steps x {results['train']['groups_per_step']} groups, "
        f"seed {results['seed']}, on {results['device']} ({results['threads']} threads, "
        f"{results['cpu_capability']} kernels).", "",
        render_table(results["rows"]), "",
    ]
    lines += [render_difference(results) + " Runs move with the seed and the thread count: BENCHMARKS.md gives "
              "the spread over several.", ""]
    for r in results["rows"]:
        if r["model"] != "single_stream":
            lines.append(f"- {r['model']}: {r['gflops_ratio_vs_single_stream']:.2f}x the baseline's GFLOPs, "
                         f"{r['latency_ratio_vs_single_stream']:.2f}x its latency per pair.")
    lines += ["", "GFLOPs from torch.utils.flop_counter (one pair); latency per pair = median time of a batch "
              f"of 64 pairs / 64 (torch.utils.benchmark), measured in the same process on {results['device']}.",
              ""]
    return "\n".join(lines)


def plot_results(results: dict, curves: dict, path: Path) -> None:
    """Accuracy against GFLOPs per pair, and the training loss curves."""
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = figure(2)
    for r in results["rows"]:
        ax.scatter(r["gflops_per_pair"], r["t2v_r1"], s=60)
        ax.annotate(r["model"], (r["gflops_per_pair"], r["t2v_r1"]), textcoords="offset points", xytext=(5, 5))
    ax.set_xlabel("GFLOPs per scored pair")
    ax.set_ylabel("text->video R@1")
    ax.set_ylim(0, 1)
    ax.set_xlim(0, max(r["gflops_per_pair"] for r in results["rows"]) * 1.3)
    ax.set_title("accuracy vs compute")
    for name, hist in curves.items():
        ax2.plot([h["step"] for h in hist], [h["loss"] for h in hist], label=name)
    ax2.set_xlabel("step")
    ax2.set_ylabel("training loss")
    ax2.legend()
    ax2.set_title("learning curves")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
