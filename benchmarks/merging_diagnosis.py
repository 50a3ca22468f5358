"""Why CrossGET loses accuracy on one base: its importance term against its
similarity term, the cross token, and the fine-tuning, taken apart on one
seed of the CLIP-style model of ``benchmarks/merging.py``.

    python benchmarks/merging_diagnosis.py --out benchmarks/out --seed 2

Reuses ``merging.py``'s base for the seed (trained when missing, the same
recipe and data) and measures mean R@1 (t2v, v2t) on its test gallery:

- training-free at ``--r``: no merging, ToMe, CrossGET guided by [CLS], and
  CrossGET with importance weight 0 (``importance_weight=0``: the complete-graph matching
  alone);
- the cross tokens added with zero offsets, seen by every vision token (as
  CrossGET's code) or hidden (``cross_hidden``), unmerged and at ``--r``;
- per layer, across each image, the spread (standard deviation) of
  CrossGET's importance and of each token's best similarity, the two terms
  of the score that picks the merges;
- fine-tuned like merging.py's CrossGET arm but without the consistency
  term (``cross_weight=0``, merging at ``--r``), and with the term but
  without merging (r = 0); each evaluated unmerged and at ``--r``.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from slimvl.bench.plots import figure
from slimvl.bench.report import markdown_table, write_report
from slimvl.checkpoint import load_model
from slimvl.experiments import (CLIP_TRAIN, CLIP_TUNE, clip_base, clip_data, experiment_parser, fine_tune,
                                parse_options, r1_hits, set_merging)
from slimvl.merge import layers, unpatch
from slimvl.merge.finetune import model_for_merging
from slimvl.tasks.retrieval import score_matrix

COLUMNS = [("model", "model", ""), ("method", "merging", ""), ("r", "r", "d"), ("mean_r1", "mean R@1", ".3f")]


def mean_r1(model, test, method: str | None, r: int, importance_weight: float = 1.0) -> float:
    with torch.inference_mode():
        return float(r1_hits(score_matrix(set_merging(model, method, r, importance_weight), test, progress=False),
                             test.caption_item).mean())


def spreads(model, images: torch.Tensor, r: int) -> list[dict]:
    """Per merging layer of CrossGET at ``r``: the mean over images of the
    standard deviation across free tokens of the importance and of the best
    similarity ([CLS] and the cross token left out)."""
    seen, original = [], layers.complete_graph_matching

    def record(metric, r_layer, importance, protected=None, valid=None, normalized=False):
        k = torch.nn.functional.normalize(metric.float(), dim=-1)
        sim = (k @ k.transpose(1, 2)).diagonal_scatter(torch.full(k.shape[:2], -2.0, device=k.device), 0, 1, 2)
        free = ~protected if protected is not None else torch.ones_like(importance, dtype=torch.bool)
        best = sim.masked_fill(~free[:, None, :], -2).amax(-1)
        std = lambda t: torch.stack([t[i][free[i]].std() for i in range(t.shape[0])]).mean()  # noqa: E731
        seen.append({"tokens": metric.shape[1], "importance_std": float(std(importance.float())),
                     "best_similarity_std": float(std(best)), "best_similarity_mean": float(best[free].mean())})
        return original(metric, r_layer, importance, protected, valid, normalized=normalized)

    layers.complete_graph_matching = record
    try:
        with torch.inference_mode():
            set_merging(model, "crossget", r).encode_video(images)
    finally:
        layers.complete_graph_matching = original
    return seen


def main(argv: list[str] | None = None) -> dict:
    p = experiment_parser(__doc__, steps=CLIP_TRAIN.steps, data=False)
    p.add_argument("--image-data", help="image-text dataset folder (default: merging.py's, made under OUT)")
    p.add_argument("--gallery", type=int, default=1000, help="test images (one caption each)")
    p.add_argument("--seed", type=int, default=2, help="the base's seed (merging.py's clip_base_s<SEED>)")
    p.add_argument("--r", type=int, default=12, help="tokens merged per layer")
    p.add_argument("--tune-steps", type=int, default=CLIP_TUNE.steps, help="steps of the two fine-tunings")
    p.add_argument("--name", default="merging_diagnosis", help="file name of the reports")
    a, command = parse_options(p, "merging_diagnosis.py", argv)
    out, prog, r = Path(a.out), not a.quiet, a.r
    _, tok, train_data, test = clip_data(out, a.gallery, a.image_data, prog)
    base = clip_base(out, a.seed, a.steps, tok, train_data, prog)
    plain = load_model(base)
    rows = [{"model": "base", "method": "none", "r": 0, "mean_r1": mean_r1(plain, test, None, 0)},
            {"model": "base", "method": "ToMe", "r": r, "mean_r1": mean_r1(plain, test, "tome", r)},
            {"model": "base", "method": "CrossGET ([CLS] guides)", "r": r,
             "mean_r1": mean_r1(plain, test, "crossget", r)},
            # importance_weight 0: the score is the best similarity alone, the merge a size-weighted mean.
            {"model": "base", "method": "CrossGET, importance 0", "r": r,
             "mean_r1": mean_r1(plain, test, "crossget", r, importance_weight=0.0)}]
    for hidden in (False, True):
        crossed = unpatch(model_for_merging(base, "crossget", 0, cross_hidden=hidden))
        name = f"base + cross tokens ({'hidden' if hidden else 'seen'}), zero offsets"
        rows += [{"model": name, "method": "none", "r": 0, "mean_r1": mean_r1(crossed, test, None, 0)},
                 {"model": name, "method": "CrossGET", "r": r, "mean_r1": mean_r1(crossed, test, "crossget", r)}]
    layer_spread = spreads(plain, test.videos[:64].float() / 127.5 - 1, r)
    cfg = replace(CLIP_TUNE, steps=a.tune_steps, seed=a.seed)
    for name, tune_r, overrides in ((f"CrossGET fine-tuned at r = {r}, no consistency term", r, {"cross_weight": 0.0}),
                                    ("CrossGET fine-tuned at r = 0 (cross tokens and consistency term)", 0, {})):
        run = out / "merging" / f"diag_crossget_r{tune_r}_w{overrides.get('cross_weight', 0.5):g}_s{a.seed}" \
            f"{'' if a.tune_steps == CLIP_TUNE.steps else f'_steps{a.tune_steps}'}"
        tuned = fine_tune(base, "crossget", tune_r, train_data, cfg, run, prog, **overrides)
        rows += [{"model": name, "method": "none", "r": 0, "mean_r1": mean_r1(tuned, test, None, 0)},
                 {"model": name, "method": "CrossGET", "r": r, "mean_r1": mean_r1(tuned, test, "crossget", r)}]
    spread_columns = [("tokens", "tokens in", "d"), ("importance_std", "importance std", ".2f"),
                      ("best_similarity_std", "best similarity std", ".2f"),
                      ("best_similarity_mean", "best similarity mean", ".2f")]
    md = (f"Seed {a.seed}, {len(test.caption_item)} test images, mean R@1 (t2v, v2t):\n\n"
          f"{markdown_table(rows, COLUMNS)}\nCrossGET's two terms per layer (r = {r}, base, 64 test images):\n\n"
          f"{markdown_table(layer_spread, spread_columns)}")
    fig, (ax,) = figure(1, width=9.0, height=4.5)
    ax.barh([f"{x['model']} | {x['method']} r={x['r']}" for x in rows], [x["mean_r1"] for x in rows])
    ax.set(xlabel="mean R@1", title=f"CrossGET taken apart, seed {a.seed}")
    ax.tick_params(axis="y", labelsize=6)
    ax.invert_yaxis()
    fig.tight_layout()
    payload = {"command": command, "rows": rows, "layers": layer_spread, "n_test": len(test.caption_item)}
    write_report(out, a.name, payload, md, fig)
    print(md)
    return payload


if __name__ == "__main__":
    main()
