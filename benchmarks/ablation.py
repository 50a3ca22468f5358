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

import matplotlib
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from slimvl import create_model  # noqa: E402
from slimvl.bench.report import markdown_table, write_report  # noqa: E402
from slimvl.cli import parse_value  # noqa: E402
from slimvl.evaluate import evaluate  # noqa: E402
from slimvl.experiments import preset_image_size  # noqa: E402
from slimvl.pipeline import load_split, load_tokenizer  # noqa: E402
from slimvl.train import TrainConfig, train  # noqa: E402


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
    cols = [("variant", "variant", "s"), ("t2v_r1", "t2v R@1", ".3f"), ("t2v_r5", "t2v R@5", ".3f"),
            ("v2t_r1", "v2t R@1", ".2f"), ("heldout_t2v_r1", "held-out t2v R@1", ".2f"),
            ("train_seconds", "train s", ".0f")]
    md = (f"{a.model}, {a.steps} steps x {a.groups_per_step} groups unless the variant says otherwise; "
          f"{a.split} gallery {test_data.videos.shape[0]} videos.\n\n" + markdown_table(rows, cols))
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4))
    for name, hist in curves.items():
        ax1.plot([h["step"] for h in hist], [h["loss"] for h in hist], label=name, alpha=0.8)
        ax2.plot([e["step"] for e in recall_curves[name]], [e["t2v_r1"] for e in recall_curves[name]], "o-",
                 label=name)
    ax1.set_xlabel("step")
    ax1.set_ylabel("training loss")
    ax1.legend(fontsize=8)
    ax2.set_xlabel("step")
    ax2.set_ylabel(f"{a.split} t2v R@1")
    ax2.set_ylim(0, 1)
    ax2.set_title("learning curve")
    ax3.bar([r["variant"] for r in rows], [r["t2v_r1"] for r in rows])
    ax3.set_ylabel(f"final {a.split} t2v R@1")
    ax3.set_ylim(0, 1)
    fig.tight_layout()
    if a.eval_every:
        md += "\nt2v R@1 during training (step: R@1, training seconds):\n\n" + "".join(
            f"- {name}: " + ", ".join(f"{e['step']}: {e['t2v_r1']:.2f} ({e['train_seconds']:.0f} s)" for e in ev)
            + "\n" for name, ev in recall_curves.items())
    payload = {"args": vars(a), "rows": rows, "curves": curves, "recall_curves": recall_curves}
    write_report(a.out, a.name, payload, md, fig)
    print(md)
    return payload


if __name__ == "__main__":
    sys.exit(main() and 0)
