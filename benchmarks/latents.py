"""Perceiver-VL's latent size N: retrieval accuracy and cost for N in
{16, 32, 64, 128} (the paper's analysis of the latent array).

    python benchmarks/latents.py --out benchmarks/out

Trains Perceiver-VL tiny with the demo's recipe once per N (a finished run is
reused, an interrupted one resumed) and retrieves every caption against every
video of the 1,000-video test gallery. The mixed stream is the default: its
encodings are cached, so the whole gallery is scored in seconds and R@1 is
measured over 1,000 captions rather than a noisy 100. GFLOPs come from
torch's FLOP counter: per cached video, per cached caption, per scored pair,
and per jointly encoded pair (what a single-stream model pays per pair).
"""
from __future__ import annotations

import argparse
from dataclasses import asdict, replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from slimvl.bench.flops import model_flops_per_pair  # noqa: E402
from slimvl.bench.report import add_ratios, machine_info, markdown_table, write_report  # noqa: E402
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
    p.add_argument("--latents", type=int, nargs="+", default=[16, 32, 64, 128])
    p.add_argument("--stream", default="mixed", choices=list(STREAMS))
    p.add_argument("--gallery", type=int, default=1000, help="test videos retrieved over")
    p.add_argument("--steps", type=int, default=TRAIN.steps)
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    out, prog = Path(a.out), not a.quiet
    root = Path(a.data) if a.data else gallery_dataset(out / "data_gallery1000", max(a.gallery, 1000), prog)
    tok = load_tokenizer(root)
    train_data = load_split(root, "train", tok, FRAMES, SIZE, TEXT_LEN, progress=prog)
    test = subset(load_split(root, "test", tok, FRAMES, SIZE, TEXT_LEN, progress=prog), a.gallery)
    cfg = replace(TRAIN, steps=a.steps)
    rows = []
    for n in a.latents:
        overrides = {**STREAMS[a.stream], "num_latents": n, "vocab_size": tok.vocab_size, "max_text_len": TEXT_LEN}
        model, train_s = train_or_load("perceiver_vl_tiny", overrides, train_data, cfg,
                                       out / "latents" / f"{a.stream}_n{n}", prog)
        model.eval()
        fl = counted_retrieval_flops(model, FRAMES, TEXT_LEN)
        joint = model.config.replace(stream="single", decoder_layers=1, share_encoder=True)
        timings: dict = {}
        scores = score_matrix(model, test, progress=prog, timings=timings)
        m = recall_metrics(scores, test.caption_item)
        n_t = len(test.caption_item)
        rows.append({"num_latents": n, "stream": a.stream, "train_seconds": train_s,
                     **{k: m[k] for k in ("t2v_r1", "t2v_r5", "t2v_r10", "v2t_r1")},
                     "gflops_per_video": fl["video"] / 1e9, "gflops_per_caption": fl["text"] / 1e9,
                     "gflops_per_pair": fl["pair"] / 1e9,
                     "gflops_joint_pair": model_flops_per_pair(type(model)(joint), FRAMES, TEXT_LEN) / 1e9,
                     "gflops_total": (a.gallery * fl["video"] + n_t * fl["text"] + a.gallery * n_t * fl["pair"]) / 1e9,
                     "seconds_total": timings["encode_seconds"] + timings["score_seconds"]})
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rows[-1].items()}, flush=True)
    base = rows[0]
    add_ratios(rows, base, {"gflops_total": "gflops_total_ratio", "seconds_total": "seconds_ratio"})
    cols = [("num_latents", "N", ""), ("t2v_r1", "t2v R@1", ".3f"), ("t2v_r5", "R@5", ".3f"),
            ("t2v_r10", "R@10", ".3f"), ("v2t_r1", "v2t R@1", ".3f"), ("gflops_per_video", "GFLOPs/video", ".4f"),
            ("gflops_per_pair", "GFLOPs/pair", ".2e"), ("gflops_joint_pair", "GFLOPs/joint pair", ".4f"),
            ("gflops_total", "GFLOPs total", ".1f"), ("gflops_total_ratio", "x N=first", ".2f"),
            ("seconds_total", "wall s", ".2f"), ("seconds_ratio", "wall x N=first", ".2f"),
            ("train_seconds", "train s", ".0f")]
    md = (f"Perceiver-VL tiny, {a.stream} stream, trained {cfg.steps} steps per N; retrieval over "
          f"{a.gallery} test videos ({len(test.caption_item)} captions). Ratios are against N={base['num_latents']} "
          "in the same run.\n\n" + markdown_table(rows, cols))
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ns = [r["num_latents"] for r in rows]
    ax[0].plot(ns, [r["t2v_r1"] for r in rows], "o-", label="t2v R@1")
    ax[0].plot(ns, [r["t2v_r5"] for r in rows], "s--", label="t2v R@5")
    ax[0].set(xscale="log", xlabel="latents N", ylabel="recall", title=f"{a.gallery}-video gallery")
    ax[0].legend()
    ax[1].plot(ns, [r["gflops_per_video"] for r in rows], "o-", label="per cached video")
    ax[1].plot(ns, [r["gflops_joint_pair"] for r in rows], "s-", label="per joint pair (single stream)")
    ax[1].set(xscale="log", yscale="log", xlabel="latents N", ylabel="GFLOPs")
    ax[1].legend()
    for axis in ax:
        axis.set_xticks(ns, [str(n) for n in ns])
    fig.tight_layout()
    payload = {"rows": rows, "train": asdict(cfg), "data": str(root), "machine": machine_info()}
    write_report(out, "latents", payload, md, fig)
    print(md)
    return payload


if __name__ == "__main__":
    main()
