"""How cost grows with frames and latents: Perceiver-VL vs the single-stream
cross-encoder at the same width.

    python benchmarks/scaling.py [--out benchmarks/out] [--quick]

Writes scaling.json, scaling.md and scaling.png. GFLOPs come from torch's
FLOP counter (one scored pair); latency is the median of
torch.utils.benchmark at batch 1 and per pair at a throughput batch; every
ratio is against the baseline measured in the same run.
"""
from __future__ import annotations

import argparse
import sys

import torch
from tqdm.auto import tqdm

from slimvl import create_model
from slimvl.bench import matmul_gflops, profile_model
from slimvl.bench.plots import figure, plot_lines
from slimvl.bench.report import add_ratios, markdown_table, write_report

PAIR_RATIOS = {"gflops_per_pair": "gflops_ratio", "latency_ms_per_pair": "latency_ratio"}
is_single = lambda r: r["model"] == "single_stream"  # noqa: E731  (the baseline of every ratio)


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    dtype = getattr(torch, a.dtype)
    ref = matmul_gflops(a.device, dtype, min_run_time=a.min_run_time)
    jobs = [("single_stream", None, t) for t in a.frames] + [("perceiver_vl", n, t) for n in a.latents
                                                             for t in a.frames]
    rows = []
    for kind, n, t in tqdm(jobs, desc="scaling"):
        model = create_model(f"{kind}_tiny", dim=a.dim, max_frames=max(a.frames), max_text_len=a.text_len,
                             **({} if n is None else {"num_latents": n}))
        cost = profile_model(model, t, a.text_len, batch=a.batch, device=a.device, dtype=dtype,
                             min_run_time=a.min_run_time, matmul_ref=ref)
        rows.append({"model": kind, "latents": n, "series": kind if n is None else f"perceiver_vl N={n}",
                     "frames": t, **cost})
    add_ratios(rows, is_single, PAIR_RATIOS, by=["frames"])
    lo, hi = a.growth_from, max(a.frames)
    per_pair = {(r["series"], r["frames"]): r["gflops_per_pair"] for r in rows}
    growth = {s: per_pair[s, hi] / per_pair[s, lo] for s in dict.fromkeys(r["series"] for r in rows)}
    cols = [("model", "model", "s"), ("latents", "N", ""), ("frames", "frames", "d"),
            ("gflops_per_pair", "GFLOPs/pair", ".4f"), ("gflops_ratio", "GFLOPs ratio", ".3f"),
            ("latency_ms_batch1", "ms (batch 1)", ".2f"), ("latency_ms_per_pair", f"ms/pair (batch {a.batch})", ".3f"),
            ("latency_ratio", "latency ratio", ".3f"), ("fraction_of_matmul", "of matmul peak", ".2f")]
    md = (f"Width {a.dim}, text length {a.text_len}, device {a.device}, {a.dtype}; matmul reference "
          f"{ref:.1f} GFLOP/s. Ratios are against single_stream at the same frame count, same run.\n\n"
          + markdown_table(rows, cols) + f"\nGFLOPs growth from {lo} to {hi} frames: "
          + ", ".join(f"{k} x{v:.1f}" for k, v in growth.items()) + "\n")
    fig, axes = figure(2, width=5.5)
    for ax, key, label in zip(axes, ("gflops_per_pair", "latency_ms_per_pair"),
                              ("GFLOPs per pair", f"ms per pair (batch {a.batch})")):
        plot_lines(ax, rows, "frames", key, by="series", yscale="log", xlabel="frames", ylabel=label)
        ax.set_xscale("log", base=2)
    fig.suptitle("cost vs frames: Perceiver-VL (linear) vs single-stream (quadratic)")
    fig.tight_layout()
    res_rows, res_md = resolution_sweep(a, dtype, ref)
    payload = {"args": vars(a), "matmul_gflops_per_s": ref, "rows": rows, "gflops_growth": growth,
               "resolution_rows": res_rows}
    write_report(a.out, "scaling", payload, md + res_md, fig)
    print(md + res_md)
    return payload


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/out")
    p.add_argument("--frames", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    p.add_argument("--latents", type=int, nargs="+", default=[32, 64, 128, 256])
    p.add_argument("--text-len", type=int, default=36)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=16, help="throughput batch (pairs)")
    p.add_argument("--min-run-time", type=float, default=0.5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--growth-from", type=int, default=8,
                   help="report GFLOPs growth from this frame count to the largest")
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 96, 128],
                   help="image sides of the resolution sweep (patch 8)")
    p.add_argument("--size-frames", type=int, default=8, help="frames in the resolution sweep")
    p.add_argument("--size-latents", type=int, default=64, help="Perceiver-VL's N in the resolution sweep")
    p.add_argument("--quick", action="store_true", help="two frame counts, two latent sizes, short timings")
    a = p.parse_args(argv)
    if a.quick:
        a.frames, a.latents, a.min_run_time, a.batch = a.frames[:2], a.latents[:2], 0.1, 4
        a.sizes = a.sizes[:2]
    if a.growth_from not in a.frames:
        a.growth_from = min(a.frames)
    return a


def resolution_sweep(a, dtype, ref: float) -> tuple[list[dict], str]:
    """Both models at ``a.size_frames`` frames over image sides ``a.sizes``
    (the input grows with the square of the side)."""
    rows = []
    for size in tqdm(a.sizes, desc="resolution"):
        for kind, extra in (("single_stream", {}), ("perceiver_vl", {"num_latents": a.size_latents})):
            model = create_model(f"{kind}_tiny", dim=a.dim, max_frames=a.size_frames, max_text_len=a.text_len,
                                 image_size=size, **extra)
            cost = profile_model(model, a.size_frames, a.text_len, batch=a.batch, device=a.device, dtype=dtype,
                                 min_run_time=a.min_run_time, matmul_ref=ref)
            rows.append({"model": kind, "latents": extra.get("num_latents"), "image_size": size,
                         "visual_tokens": model.patch_embed.num_tokens(a.size_frames), **cost})
    add_ratios(rows, is_single, PAIR_RATIOS, by=["image_size"])
    cols = [("model", "model", "s"), ("latents", "N", ""), ("image_size", "side px", "d"),
            ("visual_tokens", "visual tokens", "d"), ("gflops_per_pair", "GFLOPs/pair", ".4f"),
            ("gflops_ratio", "GFLOPs ratio", ".3f"), ("latency_ms_per_pair", f"ms/pair (batch {a.batch})", ".3f"),
            ("latency_ratio", "latency ratio", ".3f")]
    md = (f"\nResolution sweep at {a.size_frames} frames (patch 8, tubelet 2), Perceiver-VL N={a.size_latents}:\n\n"
          + markdown_table(rows, cols))
    return rows, md


if __name__ == "__main__":
    sys.exit(main() and 0)
