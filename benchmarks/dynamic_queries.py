"""Dynamic query selection on the synthetic world's classification tasks:
accuracy against GFLOPs and latency per clip for a fixed latent count, a
calibrated cascade, a learned policy, and the same model with all its
latents.

    python benchmarks/dynamic_queries.py --out benchmarks/out

For each target (``count``: how many objects, 3 classes; ``shapes``: which
shapes, multi-label) it trains the Perceiver classifier twice with the same
steps and seed, with nested latents (every count of ``--levels`` trained)
and without, then evaluates on a test split of ``--n-test`` clips: every
fixed count of ``--levels``, and, for the nested model, a cascade and a
learned policy calibrated on the validation split to lose at most
``--tolerance`` of accuracy. Each row's drop is against the same model with
all its latents, with a 95% interval paired over the same clips; GFLOPs
come from the model's formula (held to torch's counter in the tests);
latency is measured in the same run. What nesting costs the model with all
its latents is the paired difference of the two models on the test clips.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from slimvl.bench.plots import figure, plot_lines
from slimvl.bench.report import machine_info, markdown_table, show, write_report
from slimvl.bench.stats import paired_difference
from slimvl.dynamic import evaluate_classifier_policy
from slimvl.experiments import experiment_parser, gallery_dataset, preset_image_size, train_or_load
from slimvl.pipeline import load_class_split
from slimvl.recipes import FRAMES
from slimvl.tasks import ClassTask
from slimvl.tasks.classify import correct, predict_logits
from slimvl.train import TrainConfig

COLUMNS = [("target", "target", ""), ("training", "training", ""), ("policy", "policy", ""),
           ("accuracy", "accuracy", ".3f"), ("drop", "drop vs all latents (95% CI)", ""),
           ("mean_latents", "mean latents", ".1f"), ("gflops_per_input", "GFLOPs/clip", ".4f"),
           ("gflops_ratio", "GFLOPs x all", ".2f"), ("ms_per_input", "ms/clip", ".3f"),
           ("latency_ratio", "latency x all", ".2f")]


def main(argv: list[str] | None = None) -> dict:
    p = experiment_parser(__doc__, steps=3000)
    p.add_argument("--targets", nargs="+", default=["count"], choices=["count", "shapes"])
    p.add_argument("--levels", type=int, nargs="+", default=[8, 16, 32, 64], help="latent counts; the last is N")
    p.add_argument("--tolerance", type=float, default=0.01, help="the cascade's accuracy drop allowed")
    p.add_argument("--n-train", type=int, default=8000, help="training clips of the generated world")
    p.add_argument("--n-test", type=int, default=2000, help="test clips (the validation split is half as many)")
    p.add_argument("--batch-size", type=int, default=64)
    a = p.parse_args(argv)
    out, prog = Path(a.out), not a.quiet
    root = Path(a.data) if a.data else gallery_dataset(out / f"data_cls{a.n_train}_{a.n_test}", a.n_test, prog,
                                                       a.n_train, n_val=a.n_test // 2)
    cfg = TrainConfig(steps=a.steps, batch_size=a.batch_size, lr=1e-3, warmup_steps=100, checkpoint_every=500)
    rows, nesting, levels = [], [], "-".join(map(str, a.levels))
    for target in a.targets:
        def split(name: str, target: str = target):
            return load_class_split(root, name, target, FRAMES, preset_image_size("perceiver_cls_tiny"), progress=prog)

        train_data, test = split("train"), split("test")
        right = {}
        for training, nested in (("nested", a.levels), ("plain", [])):
            overrides = {"num_latents": a.levels[-1], "nested_latents": nested, "num_classes": len(test.classes),
                         "multi_label": test.multi_label}
            model, _ = train_or_load("perceiver_cls_tiny", overrides, ClassTask(train_data), cfg,
                                     out / "dynamic_queries" / f"{target}_{training}_q{levels}_{a.steps}", prog)
            model.eval()
            right[training] = correct(predict_logits(model, test, 256), test.labels).double()
            for spec in [f"fixed:{q}" for q in a.levels] + (["cascade", "learned"] if nested else []):
                calibrated = spec in ("cascade", "learned")
                m = evaluate_classifier_policy(model, test, spec, calibration=lambda: split("val"), levels=a.levels,
                                               tolerance=a.tolerance if calibrated else None)
                lo, hi = m["accuracy_drop_ci95"]
                rows.append({"target": target, "training": training, **m,
                             "drop": f"{m['accuracy_drop']:+.3f} ({lo:+.3f} to {hi:+.3f})"})
                show({k: rows[-1][k] for k in ("target", "training", "policy", "accuracy", "gflops_ratio")})
        diff, ci = paired_difference(right["plain"], right["nested"])
        nesting.append({"target": target, "nested": right["nested"].mean().item(),
                        "plain": right["plain"].mean().item(), "difference": diff,
                        "difference_ci95": [diff - ci, diff + ci]})
        show(nesting[-1])
    md = (f"Perceiver classifier (`perceiver_cls_tiny`, N={a.levels[-1]} latents), {a.steps} steps of "
          f"{a.batch_size} clips, nested over {a.levels} or not; test split of {a.n_test} clips; the cascade is "
          f"calibrated on the validation split to a tolerance of {a.tolerance}.\n\n" + markdown_table(rows, COLUMNS)
          + "\n\nWhat nesting costs the model with all its latents (nested minus plain, paired over the test "
          "clips):\n\n" + "\n".join(f"- {n['target']}: {n['nested']:.3f} against {n['plain']:.3f}, "
                                     f"{n['difference']:+.3f} ({n['difference_ci95'][0]:+.3f} to "
                                     f"{n['difference_ci95'][1]:+.3f})" for n in nesting))
    fig, axes = figure(len(a.targets))
    for ax, target in zip(axes, a.targets):
        fixed = [dict(r, line=f"{r['training']}, fixed Q") for r in rows
                 if r["target"] == target and r["policy"].startswith("fixed")]
        plot_lines(ax, fixed, "gflops_per_input", "accuracy", by="line")
        for policy, marker in (("cascade", "k*"), ("learned", "rD")):
            for r in (r for r in rows if r["target"] == target and r["policy"] == policy):
                ax.plot(r["gflops_per_input"], r["accuracy"], marker, markersize=10,
                        label=f"{policy}, tol {a.tolerance}")
        ax.set(xlabel="GFLOPs per clip", ylabel="test accuracy", title=target)
        ax.legend(fontsize=8)
    fig.tight_layout()
    payload = {"rows": rows, "nesting_cost": nesting, "train": asdict(cfg), "data": str(root),
               "machine": machine_info()}
    write_report(out, "dynamic_queries", payload, md, fig)
    print(md)
    return payload


if __name__ == "__main__":
    main()
