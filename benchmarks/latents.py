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

from dataclasses import asdict, replace
from pathlib import Path

from slimvl.bench.flops import model_flops_per_pair
from slimvl.bench.plots import figure, plot_lines
from slimvl.bench.report import add_ratios, machine_info, markdown_table, show, write_report
from slimvl.experiments import (STREAMS, counted_retrieval_flops, experiment_parser, gallery_dataset,
    retrieval_gflops, retrieval_splits, timed_retrieval, train_or_load)
from slimvl.recipes import FRAMES, TEXT_LEN, TRAIN

COLUMNS = [("num_latents", "N", ""), ("t2v_r1", "t2v R@1", ".3f"), ("t2v_r5", "R@5", ".3f"),
           ("t2v_r10", "R@10", ".3f"), ("v2t_r1", "v2t R@1", ".3f"), ("gflops_per_video", "GFLOPs/video", ".4f"),
           ("gflops_per_pair", "GFLOPs/pair", ".2e"), ("gflops_joint_pair", "GFLOPs/joint pair", ".4f"),
           ("gflops_total", "GFLOPs total", ".1f"), ("gflops_total_ratio", "x N=first", ".2f"),
           ("seconds_total", "wall s", ".2f"), ("seconds_ratio", "wall x N=first", ".2f"),
           ("train_seconds", "train s", ".0f")]


def main(argv: list[str] | None = None) -> dict:
    p = experiment_parser(__doc__, steps=TRAIN.steps)
    p.add_argument("--latents", type=int, nargs="+", default=[16, 32, 64, 128])
    p.add_argument("--stream", default="mixed", choices=list(STREAMS))
    p.add_argument("--gallery", type=int, default=1000, help="test videos retrieved over")
    a = p.parse_args(argv)
    out, prog = Path(a.out), not a.quiet
    root = Path(a.data) if a.data else gallery_dataset(out / "data_gallery1000", max(a.gallery, 1000), prog)
    tok, train_data, test = retrieval_splits(root, a.gallery, prog)
    cfg = replace(TRAIN, steps=a.steps)
    rows = []
    for n in a.latents:
        overrides = {**STREAMS[a.stream], "num_latents": n, "vocab_size": tok.vocab_size, "max_text_len": TEXT_LEN}
        model, train_s = train_or_load("perceiver_vl_tiny", overrides, train_data, cfg,
                                       out / "latents" / f"{a.stream}_n{n}", prog)
        model.eval()
        # What a single-stream Perceiver-VL of this N pays per jointly encoded pair.
        joint = type(model)(model.config.replace(stream="single", decoder_layers=1, share_encoder=True))
        rows.append({"num_latents": n, "stream": a.stream, "train_seconds": train_s,
                     **timed_retrieval(model, test, prog),
                     **retrieval_gflops(counted_retrieval_flops(model, FRAMES, TEXT_LEN), a.gallery,
                                        len(test.caption_item)),
                     "gflops_joint_pair": model_flops_per_pair(joint, FRAMES, TEXT_LEN) / 1e9})
        show(rows[-1])
    add_ratios(rows, rows[0], {"gflops_total": "gflops_total_ratio", "seconds_total": "seconds_ratio"})
    md = (f"Perceiver-VL tiny, {a.stream} stream, trained {cfg.steps} steps per N; retrieval over "
          f"{a.gallery} test videos ({len(test.caption_item)} captions). Ratios are against "
          f"N={rows[0]['num_latents']} in the same run.\n\n" + markdown_table(rows, COLUMNS))
    fig, (acc, cost) = figure(2)
    plot_lines(acc, rows, "num_latents", "t2v_r1", label="t2v R@1")
    plot_lines(acc, rows, "num_latents", "t2v_r5", label="t2v R@5", style="s--", xscale="log", xlabel="latents N",
               ylabel="recall", title=f"{a.gallery}-video gallery")
    plot_lines(cost, rows, "num_latents", "gflops_per_video", label="per cached video")
    plot_lines(cost, rows, "num_latents", "gflops_joint_pair", label="per joint pair (single stream)",
               style="s-", xscale="log", yscale="log", xlabel="latents N", ylabel="GFLOPs")
    for axis in (acc, cost):
        axis.set_xticks(a.latents, [str(n) for n in a.latents])
    fig.tight_layout()
    payload = {"rows": rows, "train": asdict(cfg), "data": str(root), "machine": machine_info()}
    write_report(out, "latents", payload, md, fig)
    print(md)
    return payload


if __name__ == "__main__":
    main()
