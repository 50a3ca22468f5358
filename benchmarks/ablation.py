"""Train variants of one preset on the same data and compare their retrieval.

    python benchmarks/ablation.py --data runs/demo/data --model perceiver_vl_tiny \
        --variant "itc=itc_weight=1.0" --variant "no-itc=itc_weight=0.0" --steps 1000

Each ``--variant NAME=key=value[,key=value...]`` overrides TrainConfig fields
(prefix a key with ``model.`` for a model config field). Writes
``ablation.json``, ``ablation.md`` and ``ablation.png`` (learning curves and
t2v R@1 per variant) under ``--out``. One seed per variant: differences
within a few points are noise (100-caption gallery).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict

import torch

from slimvl import create_model
from slimvl.bench.plots import figure, plot_lines
from slimvl.bench.report import markdown_table, write_report
from slimvl.cli import parse_value
from slimvl.evaluate import evaluate
from slimvl.experiments import preset_image_size
from slimvl.pipeline import load_split, load_tokenizer
from slimvl.train import TrainConfig, train

COLUMNS = [("variant", "variant", "s"), ("t2v_r1", "t2v R@1", ".3f"), ("t2v_r5", "t2v R@5", ".3f"),
           ("v2t_r1", "v2t R@1", ".2f"), ("heldout_t2v_r1", "held-out t2v R@1", ".2f"),
           ("train_seconds", "train s", ".0f")]


def parse_variant(text: str) -> tuple[str, dict, dict]:
    """``"name=k=v,k2=v2"`` -> (name, train overrides, model overrides)."""
    name, _, rest = text.partition("=")
    train_over, model_over = {}, {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        target = model_over if key.startswith("model.") else train_over
        target[key.removeprefix("model.")] = parse_value(value)
    return name, train_over, model_over


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--model", default="perceiver_vl_tiny")
    p.add_argument("--variant", action="append", required=True)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--groups-per-step", type=int, default=4)
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--text-len", type=int, default=36)
    p.add_argument("--eval-every", type=int, default=0, help="also evaluate every N steps (learning curve)")
    p.add_argument("--split", default="val", help="split to evaluate on (choose on val, report on test)")
    p.add_argument("--out", default="benchmarks/out")
    p.add_argument("--name", default="ablation")
    a = p.parse_args(argv)

    tok = load_tokenizer(a.data)
    size = preset_image_size(a.model)
    train_data = load_split(a.data, "train", tok, a.frames, size, a.text_len)
    test_data = load_split(a.data, a.split, tok, a.frames, size, a.text_len)
    rows, curves, recall_curves = [], {}, {}
    for spec in a.variant:
        name, train_over, model_over = parse_variant(spec)
        cfg = TrainConfig(**{"steps": a.steps, "groups_per_step": a.groups_per_step, "warmup_steps": 50,
                             "log_every": max(1, a.steps // 40), "eval_every": a.eval_every, **train_over})
        torch.manual_seed(cfg.seed)  # the seed fixes the initial weights too
        model = create_model(a.model, vocab_size=tok.vocab_size, max_text_len=a.text_len, **model_over)
        result = train(model, train_data, cfg, val_data=test_data)
        m = evaluate(model, test_data)
        curves[name] = result.history
        recall_curves[name] = result.evals
        rows.append({"variant": name, "train": asdict(cfg), "model_overrides": model_over,
                     "train_seconds": result.seconds, **{k: v for k, v in m.items() if not isinstance(v, dict)},
                     "near_duplicate_errors": m.get("near_duplicate_errors")})
    md = (f"{a.model}, {a.steps} steps x {a.groups_per_step} groups unless the variant says otherwise; "
          f"{a.split} gallery {test_data.videos.shape[0]} videos.\n\n" + markdown_table(rows, COLUMNS))
    if a.eval_every:
        md += "\nt2v R@1 during training (step: R@1, training seconds):\n\n" + "".join(
            f"- {name}: " + ", ".join(f"{e['step']}: {e['t2v_r1']:.2f} ({e['train_seconds']:.0f} s)" for e in ev)
            + "\n" for name, ev in recall_curves.items())
    payload = {"args": vars(a), "rows": rows, "curves": curves, "recall_curves": recall_curves}
    write_report(a.out, a.name, payload, md, plot(rows, curves, recall_curves, a.split))
    print(md)
    return payload


def plot(rows: list[dict], curves: dict, recall_curves: dict, split: str):
    """Training loss and t2v R@1 against steps, and the final R@1, per variant."""
    fig, (loss, learning, final) = figure(3)
    for name, hist in curves.items():
        loss.plot([h["step"] for h in hist], [h["loss"] for h in hist], label=name, alpha=0.8)
        plot_lines(learning, recall_curves[name], "step", "t2v_r1", label=name)
    loss.set(xlabel="step", ylabel="training loss")
    loss.legend(fontsize=8)
    learning.set(xlabel="step", ylabel=f"{split} t2v R@1", ylim=(0, 1), title="learning curve")
    final.bar([r["variant"] for r in rows], [r["t2v_r1"] for r in rows])
    final.set(ylabel=f"final {split} t2v R@1", ylim=(0, 1))
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    sys.exit(main() and 0)
