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

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from slimvl import create_model  # noqa: E402
from slimvl.bench import matmul_gflops, profile_model  # noqa: E402
from slimvl.bench.report import add_ratios, markdown_table, write_report  # noqa: E402

PAIR_RATIOS = {"gflops_per_pair": "gflops_ratio", "latency_ms_per_pair": "latency_ratio"}


def main(argv: list[str] | None = None) -> dict:
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
    dtype = getattr(torch, a.dtype)
    common = dict(dim=a.dim, max_frames=max(a.frames), max_text_len=a.text_len)
    ref = matmul_gflops(a.device, dtype, min_run_time=a.min_run_time)
    jobs = [("single_stream", None, t) for t in a.frames] + [("perceiver_vl", n, t) for n in a.latents
                                                             for t in a.frames]
    rows = []
    for kind, n, t in tqdm(jobs, desc="scaling"):
        extra = {} if n is None else {"num_latents": n}
        model = create_model(f"{kind}_tiny", **common, **extra)
        cost = profile_model(model, t, a.text_len, batch=a.batch, device=a.device, dtype=dtype,
                             min_run_time=a.min_run_time, matmul_ref=ref)
        rows.append({"model": kind, "latents": n, "frames": t, **cost})
    base = {r["frames"]: r for r in rows if r["model"] == "single_stream"}
    for r in rows:
        add_ratios([r], base[r["frames"]], PAIR_RATIOS)
    growth = {}
    lo, hi = a.growth_from, max(a.frames)
    for key in ["single_stream"] + [f"perceiver_vl N={n}" for n in a.latents]:
        sel = {r["frames"]: r for r in rows if (r["model"] if r["latents"] is None
                                                else f"perceiver_vl N={r['latents']}") == key}
        growth[key] = sel[hi]["gflops_per_pair"] / sel[lo]["gflops_per_pair"]

    cols = [("model", "model", "s"), ("latents", "N", ""), ("frames", "frames", "d"),
            ("gflops_per_pair", "GFLOPs/pair", ".4f"), ("gflops_ratio", "GFLOPs ratio", ".3f"),
            ("latency_ms_batch1", "ms (batch 1)", ".2f"), ("latency_ms_per_pair", f"ms/pair (batch {a.batch})", ".3f"),
            ("latency_ratio", "latency ratio", ".3f"), ("fraction_of_matmul", "of matmul peak", ".2f")]
    md = (f"Width {a.dim}, text length {a.text_len}, device {a.device}, {a.dtype}; matmul reference "
          f"{ref:.1f} GFLOP/s. Ratios are against single_stream at the same frame count, same run.\n\n"
          + markdown_table(rows, cols)
          + f"\nGFLOPs growth from {lo} to {hi} frames: "
          + ", ".join(f"{k} x{v:.1f}" for k, v in growth.items()) + "\n")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key in growth:
        sel = [r for r in rows if (r["model"] if r["latents"] is None else f"perceiver_vl N={r['latents']}") == key]
        axes[0].plot([r["frames"] for r in sel], [r["gflops_per_pair"] for r in sel], "o-", label=key)
        axes[1].plot([r["frames"] for r in sel], [r["latency_ms_per_pair"] for r in sel], "o-", label=key)
    for ax, label in zip(axes, ["GFLOPs per pair", f"ms per pair (batch {a.batch})"]):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("frames")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle("cost vs frames: Perceiver-VL (linear) vs single-stream (quadratic)")
    fig.tight_layout()
    res_rows, res_md = resolution_sweep(a, dtype, ref)
    md += res_md
    payload = {"args": vars(a), "matmul_gflops_per_s": ref, "rows": rows, "gflops_growth": growth,
               "resolution_rows": res_rows}
    write_report(a.out, "scaling", payload, md, fig)
    print(md)
    return payload


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
    for r in rows:
        b = next(x for x in rows if x["model"] == "single_stream" and x["image_size"] == r["image_size"])
        add_ratios([r], b, PAIR_RATIOS)
    cols = [("model", "model", "s"), ("latents", "N", ""), ("image_size", "side px", "d"),
            ("visual_tokens", "visual tokens", "d"), ("gflops_per_pair", "GFLOPs/pair", ".4f"),
            ("gflops_ratio", "GFLOPs ratio", ".3f"), ("latency_ms_per_pair", f"ms/pair (batch {a.batch})", ".3f"),
            ("latency_ratio", "latency ratio", ".3f")]
    md = (f"\nResolution sweep at {a.size_frames} frames (patch 8, tubelet 2), Perceiver-VL N={a.size_latents}:\n\n"
          + markdown_table(rows, cols))
    return rows, md


if __name__ == "__main__":
    sys.exit(main() and 0)
