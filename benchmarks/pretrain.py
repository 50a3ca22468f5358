"""Perceiver-VL pre-training: VTM + MLM over image-text and video-text
together, then fine-tuning for retrieval, against training from scratch.

    python benchmarks/pretrain.py --out benchmarks/out

The pre-training corpus is a second synthetic world (another seed: other
scenes, same kind of world) holding a video-text set and an image-text set
(an image is a one-frame video). Perceiver-VL tiny with an MLM head is
pre-trained on the sum of four losses: VTM (+ contrastive) and MLM on each
set. MLM accuracy is measured on held-out captions of both sets. Then the
pre-trained weights (minus the MLM head) and a fresh initialisation are each
fine-tuned for retrieval on the demo's data with the demo's recipe, for
every ``--finetune-steps`` budget, and scored on a test gallery. Finished
runs are reused, interrupted ones resumed.
"""
from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

from slimvl.bench.plots import figure, plot_lines
from slimvl.bench.report import add_differences, machine_info, markdown_table, show, write_report
from slimvl.checkpoint import latest_checkpoint
from slimvl.data import make_dataset
from slimvl.evaluate import evaluate
from slimvl.experiments import (experiment_parser, gallery_dataset, preset_image_size, retrieval_splits,
    train_or_load)
from slimvl.pipeline import load_split
from slimvl.recipes import DATA, FRAMES, TEXT_LEN, TRAIN
from slimvl.tasks import MLMTask, MultiTask, RetrievalTask, evaluate_mlm

SIZE = preset_image_size()  # the frame side perceiver_vl_tiny reads: the data is decoded at it
COLUMNS = [("init", "initialisation", ""), ("finetune_steps", "fine-tune steps", ""), ("t2v_r1", "t2v R@1", ".3f"),
           ("t2v_r5", "R@5", ".3f"), ("t2v_r10", "R@10", ".3f"), ("v2t_r1", "v2t R@1", ".3f"),
           ("heldout_t2v_r1", "held-out t2v R@1", ".3f"), ("t2v_r1_minus_scratch", "vs scratch", "+.3f"),
           ("finetune_seconds", "fine-tune s", ".0f")]


def main(argv: list[str] | None = None) -> dict:
    p = experiment_parser(__doc__)
    p.add_argument("--pretrain-steps", type=int, default=850)
    p.add_argument("--finetune-steps", type=int, nargs="+", default=[300, 850])
    p.add_argument("--corpus-items", type=int, default=4000, help="training items of each pre-training set")
    p.add_argument("--gallery", type=int, default=400, help="test videos retrieved over")
    p.add_argument("--mlm-batch", type=int, default=64, help="captions per step of each MLM task")
    a = p.parse_args(argv)
    out, prog = Path(a.out), not a.quiet
    target = Path(a.data) if a.data else gallery_dataset(out / "data_gallery1000", 1000, prog)
    # One vocabulary for pre-training and fine-tuning: the target data's (the
    # image captions' few extra words split into word pieces it knows).
    tok, train_data, test = retrieval_splits(target, a.gallery, prog)
    model_args = {"vocab_size": tok.vocab_size, "max_text_len": TEXT_LEN}
    pre_dir, pre_s, mlm = pretrain(a, tok, model_args, out, prog)
    rows = []
    for steps, init in ((s, i) for s in a.finetune_steps for i in ("scratch", "pretrained")):
        model, ft_s = train_or_load("perceiver_vl_tiny", model_args, train_data, replace(TRAIN, steps=steps),
                                    out / "pretrain" / f"{init}_{steps}", prog,
                                    init_from=latest_checkpoint(pre_dir) if init == "pretrained" else None)
        m = evaluate(model, test, progress=prog)
        rows.append({"init": init, "finetune_steps": steps, "finetune_seconds": ft_s,
                     **{k: m[k] for k in ("t2v_r1", "t2v_r5", "t2v_r10", "v2t_r1", "heldout_t2v_r1")}})
        show(rows[-1])
    add_differences(rows, lambda r: r["init"] == "scratch", {"t2v_r1": "t2v_r1_minus_scratch"}, by=["finetune_steps"])
    md = (f"Pre-training: {a.pretrain_steps} steps of VTM + MLM on {a.corpus_items} videos and {a.corpus_items} "
          f"images of another synthetic world ({pre_s:.0f} s). MLM accuracy on held-out captions (15% masked): "
          f"video-text {mlm['video-text']:.3f}, image-text {mlm['image-text']:.3f}.\n\n"
          f"Fine-tuning for retrieval with the demo's recipe; t2v R@1 over {a.gallery} test videos.\n\n"
          + markdown_table(rows, COLUMNS))
    fig, (ax,) = figure(1)
    plot_lines(ax, rows, "finetune_steps", "t2v_r1", by="init", xlabel="fine-tuning steps",
               ylabel=f"t2v R@1 ({a.gallery} videos)", title="retrieval after pre-training")
    fig.tight_layout()
    payload = {"rows": rows, "mlm_accuracy": mlm, "pretrain_seconds": pre_s,
               "pretrain": asdict(replace(TRAIN, steps=a.pretrain_steps, batch_size=a.mlm_batch)),
               "machine": machine_info()}
    write_report(out, "pretrain", payload, md, fig)
    print(md)
    return payload


def pretrain(a, tok, model_args: dict, out: Path, prog: bool) -> tuple[Path, float, dict[str, float]]:
    """Pre-train on VTM + MLM over the corpus's video-text and image-text
    sets (a finished run is reused): the run folder, its training seconds
    and the MLM accuracy on each set's held-out captions."""
    corpus = {kind: make_dataset(out / f"data_pretrain_{kind}", **{**DATA, "kind": kind, "seed": 1,
                                                                    "n_train": a.corpus_items, "n_val": 400},
                                 progress=prog) for kind in ("video-text", "image-text")}
    split = lambda root, s, frames: load_split(root, s, tok, frames, SIZE, TEXT_LEN, progress=prog)  # noqa: E731
    video, image = split(corpus["video-text"], "train", FRAMES), split(corpus["image-text"], "train", 1)
    task = MultiTask({"video_vtm": RetrievalTask(video), "video_mlm": MLMTask(video, tok),
                      "image_vtm": RetrievalTask(image), "image_mlm": MLMTask(image, tok)})
    pre_dir = out / "pretrain" / "pretrained"
    pre, pre_s = train_or_load("perceiver_vl_tiny", {**model_args, "mlm": True}, task,
                               replace(TRAIN, steps=a.pretrain_steps, batch_size=a.mlm_batch), pre_dir, prog)
    mlm = {kind: evaluate_mlm(pre, split(corpus[kind], "val", FRAMES if kind == "video-text" else 1),
                              MLMTask(video, tok), device="cpu")["mlm_accuracy"] for kind in corpus}
    print({"pretrain_seconds": pre_s, "mlm_accuracy": mlm}, flush=True)
    return pre_dir, pre_s, mlm


if __name__ == "__main__":
    main()
