"""Perceiver-VL's three retrieval streams: accuracy, GFLOPs and wall time of a
whole retrieval over galleries of 100 and 1,000 videos.

    python benchmarks/streams.py --out benchmarks/out

Trains Perceiver-VL tiny in the single, multi and mixed stream with the
demo's recipe on the same data (a run that already finished is reused), then
retrieves every caption against every video. The single stream scores every
pair jointly; the multi and mixed streams encode each video and caption once
(cached) and score the pairs from the caches. GFLOPs are counted by torch's
FLOP counter per cached item and per scored pair; wall time is measured (the
single stream's 1,000-video figure is extrapolated from its 100-video
per-pair time with ``--extrapolate-single``, and labelled so).
"""
from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

from slimvl.bench.plots import figure, plot_lines
from slimvl.bench.report import add_differences, add_ratios, machine_info, markdown_table, show, write_report
from slimvl.experiments import (STREAMS, counted_retrieval_flops, experiment_parser, gallery_dataset,
    retrieval_gflops, retrieval_splits, subset, timed_retrieval, train_or_load)
from slimvl.recipes import FRAMES, TEXT_LEN, TRAIN

COLUMNS = [("stream", "stream", ""), ("gallery", "videos", ""), ("t2v_r1", "t2v R@1", ".3f"),
           ("t2v_r5", "R@5", ".3f"), ("t2v_r10", "R@10", ".3f"), ("gflops_per_video", "GFLOPs/video", ".4f"),
           ("gflops_per_caption", "GFLOPs/caption", ".4f"), ("gflops_per_pair", "GFLOPs/pair", ".2e"),
           ("gflops_total", "GFLOPs total", ".1f"), ("seconds_total", "wall s", ".2f"),
           ("extrapolated", "extrapolated", ""), ("speedup_vs_single", "speed-up vs single", ".1f")]


def main(argv: list[str] | None = None) -> dict:
    p = experiment_parser(__doc__, steps=TRAIN.steps)
    p.add_argument("--galleries", type=int, nargs="+", default=[100, 1000])
    p.add_argument("--streams", nargs="+", default=list(STREAMS), choices=list(STREAMS))
    p.add_argument("--extrapolate-single", action="store_true",
                   help="estimate the single stream on galleries above 100 from its per-pair time")
    a = p.parse_args(argv)
    out, prog = Path(a.out), not a.quiet
    root = Path(a.data) if a.data else gallery_dataset(out / "data_gallery1000", max(a.galleries), prog)
    tok, train_data, test = retrieval_splits(root, progress=prog)
    cfg = replace(TRAIN, steps=a.steps)
    rows = []
    for stream in a.streams:
        overrides = {**STREAMS[stream], "vocab_size": tok.vocab_size, "max_text_len": TEXT_LEN}
        model, train_s = train_or_load("perceiver_vl_tiny", overrides, train_data, cfg,
                                       out / "streams" / stream, prog)
        model.eval()
        flops = counted_retrieval_flops(model, FRAMES, TEXT_LEN)
        per_pair_s = None  # the single stream's measured seconds per pair, for --extrapolate-single
        for n in a.galleries:
            g = subset(test, n)
            n_t = len(g.caption_item)
            row = {"stream": stream, "gallery": n, "captions": n_t, "train_seconds": train_s,
                   **retrieval_gflops(flops, n, n_t)}
            if stream == "single" and a.extrapolate_single and n > 100 and per_pair_s is not None:
                row.update({"seconds_total": per_pair_s * n * n_t, "extrapolated": True})
            else:
                row.update(timed_retrieval(model, g, prog), extrapolated=False)
                per_pair_s = row["seconds_score"] / (n * n_t) if stream == "single" else None
            rows.append(row)
            show(row)
    is_single = lambda r: r["stream"] == "single"  # noqa: E731
    add_ratios(rows, is_single, {"gflops_total": "gflops_ratio_vs_single", "seconds_total": "seconds_ratio_vs_single"},
               by=["gallery"])
    for r in filter(lambda r: "seconds_ratio_vs_single" in r, rows):
        r["speedup_vs_single"] = 1 / r["seconds_ratio_vs_single"]
    add_differences(rows, is_single, {"t2v_r1": "t2v_r1_minus_single"}, by=["gallery"])
    md = ("Retrieval over the test gallery (every caption against every video) with Perceiver-VL tiny "
          f"trained {cfg.steps} steps per stream.\n\n" + markdown_table(rows, COLUMNS))
    fig, (time_ax, flops_ax) = figure(2)
    plot_lines(time_ax, rows, "gallery", "seconds_total", by="stream", xscale="log", yscale="log",
               xlabel="gallery videos", ylabel="wall seconds of a whole retrieval")
    plot_lines(flops_ax, rows, "gallery", "gflops_total", by="stream", xscale="log", yscale="log",
               xlabel="gallery videos", ylabel="GFLOPs of a whole retrieval")
    fig.tight_layout()
    payload = {"rows": rows, "train": asdict(cfg), "data": str(root), "machine": machine_info()}
    write_report(out, "streams", payload, md, fig)
    print(md)
    return payload


if __name__ == "__main__":
    main()
