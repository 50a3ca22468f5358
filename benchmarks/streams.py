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

import argparse
from dataclasses import asdict, replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from slimvl.bench.report import machine_info, markdown_table, write_report  # noqa: E402
from slimvl.evaluate import score_matrix  # noqa: E402
from slimvl.experiments import STREAMS, counted_retrieval_flops, gallery_dataset, subset, train_or_load  # noqa: E402
from slimvl.experiments import preset_image_size  # noqa: E402
from slimvl.pipeline import load_split, load_tokenizer  # noqa: E402
from slimvl.recipes import FRAMES, TEXT_LEN, TRAIN  # noqa: E402
from slimvl.tasks.retrieval import recall_metrics  # noqa: E402

SIZE = preset_image_size()  # the frame side perceiver_vl_tiny reads: the data is decoded at it

def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/out")
    p.add_argument("--data", help="dataset folder (default: OUT/data_gallery1000, made when missing)")
    p.add_argument("--steps", type=int, default=TRAIN.steps)
    p.add_argument("--galleries", type=int, nargs="+", default=[100, 1000])
    p.add_argument("--streams", nargs="+", default=list(STREAMS), choices=list(STREAMS))
    p.add_argument("--extrapolate-single", action="store_true",
                   help="estimate the single stream on galleries above 100 from its per-pair time")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    out = Path(a.out)
    prog = not a.quiet
    root = Path(a.data) if a.data else gallery_dataset(out / "data_gallery1000", max(a.galleries), prog)
    tok = load_tokenizer(root)
    train_data = load_split(root, "train", tok, FRAMES, SIZE, TEXT_LEN, progress=prog)
    test = load_split(root, "test", tok, FRAMES, SIZE, TEXT_LEN, progress=prog)
    cfg = replace(TRAIN, steps=a.steps)
    rows = []
    for stream in a.streams:
        overrides = {**STREAMS[stream], "vocab_size": tok.vocab_size, "max_text_len": TEXT_LEN}
        model, train_s = train_or_load("perceiver_vl_tiny", overrides, train_data, cfg,
                                       out / "streams" / stream, prog)
        model.eval()
        fl = counted_retrieval_flops(model, FRAMES, TEXT_LEN)
        per_pair_s = None
        for n in a.galleries:
            g = subset(test, n)
            n_t = len(g.caption_item)
            row = {"stream": stream, "gallery": n, "captions": n_t, "train_seconds": train_s,
                   "gflops_per_video": fl["video"] / 1e9, "gflops_per_caption": fl["text"] / 1e9,
                   "gflops_per_pair": fl["pair"] / 1e9,
                   "gflops_total": (n * fl["video"] + n_t * fl["text"] + n * n_t * fl["pair"]) / 1e9}
            if stream == "single" and a.extrapolate_single and n > 100 and per_pair_s is not None:
                row.update({"seconds_total": per_pair_s * n * n_t, "extrapolated": True})
            else:
                timings: dict = {}
                scores = score_matrix(model, g, progress=prog, timings=timings)
                m = recall_metrics(scores, g.caption_item)
                row.update({k: m[k] for k in ("t2v_r1", "t2v_r5", "t2v_r10", "v2t_r1")})
                row.update(seconds_encode=timings["encode_seconds"], seconds_score=timings["score_seconds"],
                           seconds_total=timings["encode_seconds"] + timings["score_seconds"], extrapolated=False)
                if stream == "single":
                    per_pair_s = timings["score_seconds"] / (n * n_t)
            rows.append(row)
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    for r in rows:
        base = next((b for b in rows if b["stream"] == "single" and b["gallery"] == r["gallery"]), None)
        if base is not None:
            r["speedup_vs_single"] = base["seconds_total"] / r["seconds_total"]
            r["gflops_ratio_vs_single"] = r["gflops_total"] / base["gflops_total"]
            if "t2v_r1" in r and "t2v_r1" in base:
                r["t2v_r1_minus_single"] = r["t2v_r1"] - base["t2v_r1"]

    cols = [("stream", "stream", ""), ("gallery", "videos", ""), ("t2v_r1", "t2v R@1", ".3f"),
            ("t2v_r5", "R@5", ".3f"), ("t2v_r10", "R@10", ".3f"), ("gflops_per_video", "GFLOPs/video", ".4f"),
            ("gflops_per_caption", "GFLOPs/caption", ".4f"), ("gflops_per_pair", "GFLOPs/pair", ".2e"),
            ("gflops_total", "GFLOPs total", ".1f"), ("seconds_total", "wall s", ".2f"),
            ("extrapolated", "extrapolated", ""), ("speedup_vs_single", "speed-up vs single", ".1f")]
    md = ("Retrieval over the test gallery (every caption against every video) with Perceiver-VL tiny "
          f"trained {cfg.steps} steps per stream.\n\n" + markdown_table(rows, cols))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for stream in a.streams:
        rs = [r for r in rows if r["stream"] == stream]
        axes[0].plot([r["gallery"] for r in rs], [r["seconds_total"] for r in rs], "o-", label=stream)
        axes[1].plot([r["gallery"] for r in rs], [r["gflops_total"] for r in rs], "o-", label=stream)
    for ax, lab in zip(axes, ("wall seconds of a whole retrieval", "GFLOPs of a whole retrieval")):
        ax.set(xscale="log", yscale="log", xlabel="gallery videos", ylabel=lab)
        ax.legend()
    fig.tight_layout()
    payload = {"rows": rows, "train": asdict(cfg), "data": str(root), "machine": machine_info()}
    write_report(out, "streams", payload, md, fig)
    print(md)
    return payload


if __name__ == "__main__":
    main()
