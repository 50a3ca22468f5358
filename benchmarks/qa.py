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

import argparse
from dataclasses import asdict, replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from slimvl.bench.flops import count_flops, dummy_inputs  # noqa: E402
from slimvl.bench.measure import median_seconds  # noqa: E402
from slimvl.bench.report import add_ratios, machine_info, markdown_table, write_report  # noqa: E402
from slimvl.checkpoint import latest_checkpoint  # noqa: E402
from slimvl.data import QUESTION_TYPES, make_qa  # noqa: E402
from slimvl.experiments import gallery_dataset, preset_image_size, train_or_load  # noqa: E402
from slimvl.pipeline import load_qa_split, load_tokenizer  # noqa: E402
from slimvl.recipes import FRAMES  # noqa: E402
from slimvl.tasks import QATask, evaluate_qa  # noqa: E402
from slimvl.train import TrainConfig  # noqa: E402

SIZE = preset_image_size()  # the frame side perceiver_vl_tiny reads: the data is decoded at it

QUESTION_LEN = 20  # the longest synthetic question is 16 word pieces with [CLS] and [SEP]


@torch.inference_mode()
def cost_per_question(model, batch: int = 64) -> dict[str, float]:
    """Counted GFLOPs and measured milliseconds per question (fp32, CPU)."""
    model.eval()
    video, ids, mask = dummy_inputs(model, FRAMES, QUESTION_LEN, batch)
    flops = count_flops(lambda: model.answer(video, ids, mask), model) / batch
    seconds = median_seconds(lambda: model.answer(video, ids, mask), min_run_time=1.0) / batch
    return {"gflops_per_question": flops / 1e9, "ms_per_question": seconds * 1e3}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/out")
    p.add_argument("--data", help="dataset folder (default: OUT/data_qa<N_TRAIN>, made when missing)")
    p.add_argument("--n-train", type=int, default=24000, help="training videos of the generated world")
    p.add_argument("--models", nargs="+", default=["perceiver_vl_tiny", "single_stream_tiny"])
    p.add_argument("--steps", type=int, default=8000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--questions-per-item", type=int, default=4)
    p.add_argument("--first-types", nargs="+", metavar="TYPE",
                   help="a curriculum: first train --first-steps steps on these question types only, then "
                        "--steps steps on all types from there")
    p.add_argument("--first-steps", type=int, default=3000)
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    out, prog = Path(a.out), not a.quiet
    root = Path(a.data) if a.data else gallery_dataset(out / f"data_qa{a.n_train}", 1000, prog, a.n_train)
    make_qa(root, questions_per_item=a.questions_per_item)
    tok = load_tokenizer(root, qa=True)
    train_data = load_qa_split(root, "train", tok, FRAMES, SIZE, QUESTION_LEN, progress=prog)
    test = load_qa_split(root, "test", tok, FRAMES, SIZE, QUESTION_LEN, progress=prog)
    cfg = TrainConfig(steps=a.steps, batch_size=a.batch_size, lr=a.lr, warmup_steps=100, checkpoint_every=500,
                      log_every=50)
    rows = []
    for name in a.models:
        overrides = {"vocab_size": tok.vocab_size, "max_text_len": QUESTION_LEN, "num_answers": len(train_data.answers)}
        run = out / "qa" / f"{name}-{root.name}-{cfg.steps}steps"
        init, first_s, label = None, 0.0, name  # what the curriculum's first stage changes
        if a.first_types:
            stage = f"{'+'.join(a.first_types)}{a.first_steps}"
            first = out / "qa" / f"{name}-{root.name}-{stage}steps"
            _, first_s = train_or_load(name, overrides, QATask(train_data, a.first_types),
                                       replace(cfg, steps=a.first_steps), first, prog)
            init = latest_checkpoint(first)
            run = run.with_name(f"{run.name}-after-{stage}")
            label = f"{name} ({' + '.join(a.first_types)} first)"
        model, train_s = train_or_load(name, overrides, QATask(train_data), cfg, run, prog, init_from=init)
        m = evaluate_qa(model, test, device="cpu")
        rows.append({"model": label, "train_seconds": first_s + train_s, **m, **cost_per_question(model)})
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rows[-1].items()}, flush=True)
    base = rows[0]
    add_ratios(rows, base, {"gflops_per_question": "gflops_ratio", "ms_per_question": "latency_ratio"})
    types = [t for t in QUESTION_TYPES if f"accuracy_{t}" in base]
    cols = [("model", "model", ""), ("accuracy", "all", ".3f"), ("accuracy_seen", "in-distribution", ".3f"),
            ("accuracy_heldout", "held-out", ".3f"),
            *[(f"accuracy_seen_{t}", f"{t} (in-dist.)", ".3f") for t in types],
            ("gflops_per_question", "GFLOPs/question", ".4f"), ("gflops_ratio", "GFLOPs x first", ".2f"),
            ("ms_per_question", "ms/question", ".2f"), ("latency_ratio", "latency x first", ".2f"),
            ("train_seconds", "train s", ".0f")]
    by_type = [{"type": t, **{f"{r['model']} {split}": r.get(f"accuracy_{split}_{t}") for r in rows
                              for split in ("seen", "heldout")}} for t in types]
    md = (f"QA on the synthetic world: {train_data.n_questions} training questions about "
          f"{train_data.videos.shape[0]} videos, {test.n_questions} test questions ({a.questions_per_item} per "
          f"video), models trained {cfg.steps} steps of {cfg.batch_size} questions"
          + (f" after {a.first_steps} steps on {', '.join(a.first_types)} questions only" if a.first_types else "")
          + ".\n\n" + markdown_table(rows, cols)
          + "\n\nAccuracy by question type:\n\n"
          + markdown_table(by_type, [("type", "type", "")] + [(k, k, ".3f") for k in by_type[0] if k != "type"]))
    fig, ax = plt.subplots(figsize=(8, 4))
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
    payload = {"rows": rows, "train": asdict(cfg), "data": str(root), "machine": machine_info(),
               "first_stage": {"types": a.first_types, "steps": a.first_steps} if a.first_types else None}
    write_report(out, "qa", payload, md, fig)
    print(md)
    return payload


if __name__ == "__main__":
    main()
