"""Question answering on the synthetic world: accuracy by question type,
GFLOPs and latency per question.

    python benchmarks/qa.py --out benchmarks/out

Makes the demo's world with ``--n-train`` training videos (default 24,000:
with the demo's 4,000 both models stay data-starved on shape questions) and
1,000 test videos, adds questions (``slimvl data qa``: four per item, one of
each type: colour, shape, count, motion), trains each model as
an answer classifier (a finished run is reused, an interrupted one resumed)
and answers every test question. "seen" is the in-distribution part of the
test split; "heldout" are scenes with a (shape, colour, motion) combination
never seen in training. GFLOPs per question come from torch's FLOP counter,
latency per question is the median over repeated batches, with the first
model as the baseline of the ratios.

``--first-types shape`` makes it a curriculum: each model first trains
``--first-steps`` steps on shape questions only, then ``--steps`` steps on
every type from there (shape is the type that stays near chance longest
when all are mixed from the start).
"""
from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import torch

from slimvl.bench.flops import count_flops, dummy_inputs
from slimvl.bench.measure import median_seconds
from slimvl.bench.plots import figure
from slimvl.bench.report import add_ratios, machine_info, markdown_table, show, write_report
from slimvl.checkpoint import latest_checkpoint
from slimvl.data import QUESTION_TYPES, make_qa
from slimvl.experiments import experiment_parser, gallery_dataset, preset_image_size, train_or_load
from slimvl.pipeline import load_qa_split, load_tokenizer
from slimvl.recipes import FRAMES
from slimvl.tasks import QATask, evaluate_qa
from slimvl.train import TrainConfig

SIZE = preset_image_size()  # the frame side perceiver_vl_tiny reads: the data is decoded at it
QUESTION_LEN = 20  # the longest synthetic question is 16 word pieces with [CLS] and [SEP]


def main(argv: list[str] | None = None) -> dict:
    p = experiment_parser(__doc__, steps=8000)
    p.add_argument("--n-train", type=int, default=24000, help="training videos of the generated world")
    p.add_argument("--models", nargs="+", default=["perceiver_vl_tiny", "single_stream_tiny"])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--questions-per-item", type=int, default=4)
    p.add_argument("--first-types", nargs="+", metavar="TYPE",
                   help="a curriculum: first train --first-steps steps on these question types only, then "
                        "--steps steps on all types from there")
    p.add_argument("--first-steps", type=int, default=3000)
    a = p.parse_args(argv)
    out, prog = Path(a.out), not a.quiet
    root = Path(a.data) if a.data else gallery_dataset(out / f"data_qa{a.n_train}", 1000, prog, a.n_train)
    make_qa(root, questions_per_item=a.questions_per_item)
    tok = load_tokenizer(root, qa=True)
    train_data = load_qa_split(root, "train", tok, FRAMES, SIZE, QUESTION_LEN, progress=prog)
    test = load_qa_split(root, "test", tok, FRAMES, SIZE, QUESTION_LEN, progress=prog)
    cfg = TrainConfig(steps=a.steps, batch_size=a.batch_size, lr=a.lr, warmup_steps=100, checkpoint_every=500,
                      log_every=50)
    overrides = {"vocab_size": tok.vocab_size, "max_text_len": QUESTION_LEN, "num_answers": len(train_data.answers)}
    rows = []
    for name in a.models:
        model, label, train_s = trained(a, name, overrides, train_data, cfg, out / "qa" / f"{name}-{root.name}", prog)
        rows.append({"model": label, "train_seconds": train_s, **evaluate_qa(model, test, device="cpu"),
                     **cost_per_question(model)})
        show(rows[-1])
    add_ratios(rows, rows[0], {"gflops_per_question": "gflops_ratio", "ms_per_question": "latency_ratio"})
    types = [t for t in QUESTION_TYPES if f"accuracy_{t}" in rows[0]]
    md = describe(a, rows, types, train_data, test, cfg)
    payload = {"rows": rows, "train": asdict(cfg), "data": str(root), "machine": machine_info(),
               "first_stage": {"types": a.first_types, "steps": a.first_steps} if a.first_types else None}
    write_report(out, "qa", payload, md, plot(rows, types))
    print(md)
    return payload


def trained(a, name: str, overrides: dict, train_data, cfg: TrainConfig, run_prefix: Path, prog: bool):
    """``name`` trained as an answer classifier (after the curriculum's first
    stage with ``--first-types``): the model, its row label and its training
    seconds, stages summed. Finished runs are reused."""
    if not a.first_types:
        model, seconds = train_or_load(name, overrides, QATask(train_data), cfg,
                                       run_prefix.with_name(f"{run_prefix.name}-{cfg.steps}steps"), prog)
        return model, name, seconds
    stage = f"{'+'.join(a.first_types)}{a.first_steps}"
    first = run_prefix.with_name(f"{run_prefix.name}-{stage}steps")
    _, first_s = train_or_load(name, overrides, QATask(train_data, a.first_types), replace(cfg, steps=a.first_steps),
                               first, prog)
    run = run_prefix.with_name(f"{run_prefix.name}-{cfg.steps}steps-after-{stage}")
    model, seconds = train_or_load(name, overrides, QATask(train_data), cfg, run, prog,
                                   init_from=latest_checkpoint(first))
    return model, f"{name} ({' + '.join(a.first_types)} first)", first_s + seconds


@torch.inference_mode()
def cost_per_question(model, batch: int = 64) -> dict[str, float]:
    """Counted GFLOPs and measured milliseconds per question (fp32, CPU)."""
    model.eval()
    video, ids, mask = dummy_inputs(model, FRAMES, QUESTION_LEN, batch)
    flops = count_flops(lambda: model.answer(video, ids, mask), model) / batch
    seconds = median_seconds(lambda: model.answer(video, ids, mask), min_run_time=1.0) / batch
    return {"gflops_per_question": flops / 1e9, "ms_per_question": seconds * 1e3}


def describe(a, rows: list[dict], types: list[str], train_data, test, cfg: TrainConfig) -> str:
    """The report's markdown: the set-up, a row per model, accuracy by question type."""
    cols = [("model", "model", ""), ("accuracy", "all", ".3f"), ("accuracy_seen", "in-distribution", ".3f"),
            ("accuracy_heldout", "held-out", ".3f"),
            *[(f"accuracy_seen_{t}", f"{t} (in-dist.)", ".3f") for t in types],
            ("gflops_per_question", "GFLOPs/question", ".4f"), ("gflops_ratio", "GFLOPs x first", ".2f"),
            ("ms_per_question", "ms/question", ".2f"), ("latency_ratio", "latency x first", ".2f"),
            ("train_seconds", "train s", ".0f")]
    by_type = [{"type": t, **{f"{r['model']} {split}": r.get(f"accuracy_{split}_{t}") for r in rows
                              for split in ("seen", "heldout")}} for t in types]
    return (f"QA on the synthetic world: {train_data.n_questions} training questions about "
            f"{train_data.videos.shape[0]} videos, {test.n_questions} test questions ({a.questions_per_item} per "
            f"video), models trained {cfg.steps} steps of {cfg.batch_size} questions"
            + (f" after {a.first_steps} steps on {', '.join(a.first_types)} questions only" if a.first_types else "")
            + ".\n\n" + markdown_table(rows, cols) + "\n\nAccuracy by question type:\n\n"
            + markdown_table(by_type, [("type", "type", "")] + [(k, k, ".3f") for k in by_type[0] if k != "type"]))


def plot(rows: list[dict], types: list[str]):
    """Bars of accuracy per question type: each model in- and out-of-distribution."""
    fig, (ax,) = figure(1, width=8)
    width = 0.8 / (2 * len(rows))
    for i, r in enumerate(rows):
        for j, split in enumerate(("seen", "heldout")):
            x = [k + (2 * i + j) * width for k in range(len(types))]
            ax.bar(x, [r.get(f"accuracy_{split}_{t}", 0) for t in types], width,
                   label=f"{r['model']} ({'in-distribution' if split == 'seen' else 'held-out'})")
    ax.axhline(0.8, color="grey", ls=":", lw=1)
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(types))], types)
    ax.set(ylabel="accuracy", ylim=(0, 1), title="QA accuracy by question type")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
