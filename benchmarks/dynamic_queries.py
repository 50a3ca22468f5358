"""Dynamic query selection: accuracy against GFLOPs and latency per input
for a fixed latent count, a calibrated cascade, a learned policy, and the
same model with all its latents, on the synthetic world's classification
tasks, on QA and on VTM retrieval.

    python benchmarks/dynamic_queries.py --out benchmarks/out

Tasks (``--tasks``): ``count`` (how many objects, 3 classes) and ``shapes``
(which shapes, multi-label) train the Perceiver classifier; ``qa`` trains
Perceiver-VL as an answer classifier (``slimvl data qa``: four questions
per video by default), with LayerDrop on its cross-attentions (``--qa-layers``,
``--qa-cross-attn-drop``) so that latents and cross-attentions can be
chosen together; ``vtm`` trains single-stream Perceiver-VL for retrieval
(the demo's recipe) and scores each test caption against ``--candidates``
items, its confidence taken over that list. Each model is trained twice with the same steps and seed,
with nested latents (every count of ``--levels``) and without, then
evaluated on the test split: every fixed count of ``--levels`` and, for the
nested model, a cascade and a learned policy calibrated on the validation
split to lose at most ``--tolerance`` of accuracy. For QA, also every
(latents, cross-attentions kept) pair, and a joint cascade over the pairs
no cheaper pair matches on the validation split. Each row's drop is
against the same model with all its latents, with a 95% interval paired
over the same inputs; GFLOPs come from torch's counter, in parts, so that
the work a cascade's levels share (the input array, the cross-attentions'
keys and values) is counted once (``slimvl.dynamic.costs``); latency is
measured in the same run. What nesting costs the model with all its
latents is the paired difference of the two models on the test split.
"""
from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

from slimvl.bench.plots import figure, plot_lines
from slimvl.bench.report import machine_info, markdown_table, show, write_report
from slimvl.bench.stats import paired_difference
from slimvl.data import make_qa
from slimvl.dynamic import ClassInputs, QAInputs, VTMInputs, candidate_lists, evaluate_policy, level_logits
from slimvl.dynamic.policies import pareto_levels
from slimvl.dynamic.run import level_costs
from slimvl.experiments import experiment_parser, gallery_dataset, preset_image_size, retrieval_splits, train_or_load
from slimvl.pipeline import load_class_split, load_qa_split, load_split, load_tokenizer
from slimvl.recipes import FRAMES, TEXT_LEN, TRAIN
from slimvl.tasks import ClassTask, QATask
from slimvl.train import TrainConfig

COLUMNS = [("task", "task", ""), ("training", "training", ""), ("policy", "policy", ""),
           ("accuracy", "accuracy", ".3f"), ("drop", "drop vs all latents (95% CI)", ""),
           ("mean_latents", "mean latents", ".1f"), ("gflops_per_input", "GFLOPs/input", ".4f"),
           ("gflops_ratio", "GFLOPs x all", ".2f"), ("ms_per_input", "ms/input", ".3f"),
           ("latency_ratio", "latency x all", ".2f")]
QUESTION_LEN = 20  # the longest synthetic question is 16 word pieces with [CLS] and [SEP]


def main(argv: list[str] | None = None) -> dict:
    p = experiment_parser(__doc__, steps=3000)
    p.add_argument("--tasks", nargs="+", default=["count", "qa", "vtm"], choices=["count", "shapes", "qa", "vtm"])
    p.add_argument("--levels", type=int, nargs="+", default=[8, 16, 32, 64], help="latent counts; the last is N")
    p.add_argument("--eval-levels", type=int, nargs="+", help="latent counts the policies use (default: --levels; "
                   "the models are trained on --levels either way, so counts outside them run untrained prefixes)")
    p.add_argument("--name", default="dynamic_queries", help="the report's file name under OUT")
    p.add_argument("--guard", action="store_true", help="calibrate to the upper end of the drop's 95%% interval "
                   "on the validation split, not its mean")
    p.add_argument("--tolerance", type=float, default=0.01, help="the calibrated policies' accuracy drop allowed")
    p.add_argument("--n-train", type=int, default=8000, help="training videos of the generated world")
    p.add_argument("--n-test", type=int, default=2000, help="test videos (the validation split is half as many)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--qa-steps", type=int, default=6000, help="training steps of each QA model")
    p.add_argument("--questions-per-item", type=int, default=4, help="QA: questions per video (slimvl data qa)")
    p.add_argument("--qa-layers", default="cscscs", help="the QA model's depth pattern")
    p.add_argument("--qa-cross-attn-drop", type=float, default=0.5, help="the QA model's LayerDrop")
    p.add_argument("--vtm-steps", type=int, default=1700, help="training steps of each retrieval model")
    p.add_argument("--candidates", type=int, default=16, help="vtm: items each caption is scored against")
    a = p.parse_args(argv)
    if a.eval_levels and a.eval_levels[-1] != a.levels[-1]:
        p.error(f"--eval-levels must end at N = {a.levels[-1]}, the last of --levels")
    a.eval_levels = a.eval_levels or a.levels
    out, prog = Path(a.out), not a.quiet
    root = Path(a.data) if a.data else gallery_dataset(out / f"data_cls{a.n_train}_{a.n_test}", a.n_test, prog,
                                                       a.n_train, n_val=a.n_test // 2)
    rows, nesting = [], []
    for task in a.tasks:
        run = {"qa": qa_task, "vtm": vtm_task}.get(task, classifier_task)
        task_rows, right = run(a, task, root, out, prog)
        rows += task_rows
        diff, ci = paired_difference(right["plain"], right["nested"])
        nesting.append({"task": task, "nested": right["nested"].mean().item(), "plain": right["plain"].mean().item(),
                        "difference": diff, "difference_ci95": [diff - ci, diff + ci]})
        show(nesting[-1])
    md = describe(a, rows, nesting)
    payload = {"rows": rows, "nesting_cost": nesting, "data": str(root), "machine": machine_info(),
               "train": asdict(config(a, a.steps)), "qa_train": asdict(config(a, a.qa_steps)),
               "vtm_train": asdict(replace(TRAIN, steps=a.vtm_steps))}
    write_report(out, a.name, payload, md, plot(a, rows))
    print(md)
    return payload


def config(a, steps: int) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=a.batch_size, lr=1e-3, warmup_steps=100, checkpoint_every=500)


def evaluate_rows(a, task: str, training: str, model, inputs, calibration, specs: list[str],
                  levels: list | None = None) -> list[dict]:
    """One row per policy spec; the calibrated ones over ``levels`` (default ``--levels``)."""
    rows = []
    for spec in specs:
        calibrated = spec in ("cascade", "learned", "cascade (joint)")
        m = evaluate_policy(model, inputs, spec.split(" ")[0], calibration, levels=levels or a.eval_levels,
                            tolerance=a.tolerance if calibrated else None, guard=a.guard and calibrated)
        lo, hi = m["accuracy_drop_ci95"]
        rows.append({"task": task, "training": training, **m, "policy": spec,
                     "drop": f"{m['accuracy_drop']:+.3f} ({lo:+.3f} to {hi:+.3f})"})
        show({k: rows[-1][k] for k in ("task", "training", "policy", "accuracy", "gflops_ratio", "latency_ratio")})
    return rows


def classifier_task(a, target: str, root: Path, out: Path, prog: bool):
    """The Perceiver classifier on ``target``, nested and plain: rows and each model's test correctness."""
    def split(name: str):
        return load_class_split(root, name, target, FRAMES, preset_image_size("perceiver_cls_tiny"), progress=prog)

    train_data, test = split("train"), split("test")
    rows, right, levels = [], {}, "-".join(map(str, a.levels))
    for training, nested in (("nested", a.levels), ("plain", [])):
        overrides = {"num_latents": a.levels[-1], "nested_latents": nested, "num_classes": len(test.classes),
                     "multi_label": test.multi_label}
        model, _ = train_or_load("perceiver_cls_tiny", overrides, ClassTask(train_data), config(a, a.steps),
                                 out / "dynamic_queries" / f"{target}_{training}_q{levels}_{a.steps}", prog)
        model.eval()
        inputs = ClassInputs(test)
        right[training] = inputs.correct(inputs.logits(model, 256, None)).double()
        specs = [f"fixed:{q}" for q in a.eval_levels] + (["cascade", "learned"] if nested else [])
        rows += evaluate_rows(a, target, training, model, inputs, lambda: ClassInputs(split("val")), specs)
    return rows, right


def qa_task(a, task: str, root: Path, out: Path, prog: bool):
    """Perceiver-VL answering questions, nested and plain, with the joint
    (latents, cross-attentions) sweep and cascade for the nested model."""
    make_qa(root, questions_per_item=a.questions_per_item)
    tok = load_tokenizer(root, qa=True)
    size = preset_image_size("perceiver_vl_tiny")

    def split(name: str):
        return load_qa_split(root, name, tok, FRAMES, size, QUESTION_LEN, progress=prog)

    train_data, test = split("train"), split("test")
    calib = {}

    def calibration() -> QAInputs:  # read once, for every policy
        if "val" not in calib:
            calib["val"] = QAInputs(split("val"))
        return calib["val"]

    rows, right, levels = [], {}, "-".join(map(str, a.levels))
    for training, nested in (("nested", a.levels), ("plain", [])):
        overrides = {"num_latents": a.levels[-1], "nested_latents": nested, "layers": a.qa_layers,
                     "cross_attn_drop": a.qa_cross_attn_drop, "vocab_size": tok.vocab_size,
                     "max_text_len": QUESTION_LEN, "num_answers": len(train_data.answers)}
        model, _ = train_or_load("perceiver_vl_tiny", overrides, QATask(train_data), config(a, a.qa_steps),
                                 out / "dynamic_queries" / f"qa_{training}_q{levels}_{a.qa_cross_attn_drop}_"
                                                           f"{a.qa_layers}_{a.qa_steps}", prog)
        model.eval()
        inputs = QAInputs(test)
        right[training] = inputs.correct(inputs.logits(model, 256, None)).double()
        n_cross = model.config.num_cross_layers
        pairs = [(q, k) for k in range(1, n_cross + 1) for q in a.eval_levels]
        specs = [f"fixed:{q}" for q in a.eval_levels] + [f"fixed:{q}/{k}" for q, k in pairs if k < n_cross]
        rows += evaluate_rows(a, task, training, model, inputs, calibration,
                              specs + (["cascade", "learned"] if nested else []))
        if nested and n_cross > 1:
            val = calibration()
            acc = [val.correct(x).double().mean().item() for x in level_logits(model, val, pairs)]
            joint = pareto_levels(pairs, acc, level_costs(model, val, pairs))
            rows += evaluate_rows(a, task, training, model, inputs, calibration, ["cascade (joint)"], joint)
    return rows, right


def vtm_task(a, task: str, root: Path, out: Path, prog: bool):
    """Single-stream Perceiver-VL scoring each caption against ``--candidates``
    items (its own, its near-duplicates, random others), nested and plain."""
    tok, train_data, test = retrieval_splits(root, progress=prog)
    val = load_split(root, "val", tok, FRAMES, preset_image_size("perceiver_vl_tiny"), TEXT_LEN, progress=prog)
    calib = VTMInputs(val, candidate_lists(val, a.candidates))
    rows, right, levels = [], {}, "-".join(map(str, a.levels))
    for training, nested in (("nested", a.levels), ("plain", [])):
        overrides = {"num_latents": a.levels[-1], "nested_latents": nested, "vocab_size": tok.vocab_size,
                     "max_text_len": TEXT_LEN}
        model, _ = train_or_load("perceiver_vl_tiny", overrides, train_data, replace(TRAIN, steps=a.vtm_steps),
                                 out / "dynamic_queries" / f"vtm_{training}_q{levels}_{a.vtm_steps}", prog)
        model.eval()
        inputs = VTMInputs(test, candidate_lists(test, a.candidates))
        right[training] = inputs.correct(inputs.logits(model, 256, None)).double()
        specs = [f"fixed:{q}" for q in a.eval_levels] + (["cascade", "learned"] if nested else [])
        rows += evaluate_rows(a, task, training, model, inputs, lambda: calib, specs)
    return rows, right


def describe(a, rows: list[dict], nesting: list[dict]) -> str:
    md = (f"Trained on levels {a.levels} (N = {a.levels[-1]} latents), policies over {a.eval_levels}, tolerance "
          f"{a.tolerance}; classifier "
          f"(`perceiver_cls_tiny`) trained {a.steps} steps, QA model (`perceiver_vl_tiny`, layers "
          f"{a.qa_layers!r}, cross_attn_drop {a.qa_cross_attn_drop}) {a.qa_steps} steps, {a.batch_size} inputs "
          f"per step; retrieval model (`perceiver_vl_tiny`, single stream) {a.vtm_steps} steps of the demo's "
          f"recipe, each caption scored against {a.candidates} candidates (accuracy: its own item ranks first); "
          "`fixed:Q/K` keeps the first K cross-attentions.\n\n")
    for task in a.tasks:
        md += f"### {task}\n\n" + markdown_table([r for r in rows if r["task"] == task], COLUMNS) + "\n"
    return md + ("What nesting costs the model with all its latents (nested minus plain, paired over the test "
                 "inputs):\n\n" + "\n".join(f"- {n['task']}: {n['nested']:.3f} against {n['plain']:.3f}, "
                                           f"{n['difference']:+.3f} ({n['difference_ci95'][0]:+.3f} to "
                                           f"{n['difference_ci95'][1]:+.3f})" for n in nesting))


def plot(a, rows: list[dict]):
    """Per task, accuracy against GFLOPs: the fixed sweeps (per cross-attentions
    kept, for QA) of both models, and the calibrated policies as markers."""
    fig, axes = figure(len(a.tasks))
    for ax, task in zip(axes, a.tasks):
        fixed = []
        for r in rows:
            if r["task"] == task and r["policy"].startswith("fixed"):
                keep = r["policy"].partition("/")[2]
                fixed.append(dict(r, line=f"{r['training']}, fixed Q" + (f", {keep} cross-attn." if keep else "")))
        plot_lines(ax, fixed, "gflops_per_input", "accuracy", by="line")
        for policy, marker in (("cascade", "k*"), ("learned", "rD"), ("cascade (joint)", "bP")):
            for r in (r for r in rows if r["task"] == task and r["policy"] == policy):
                ax.plot(r["gflops_per_input"], r["accuracy"], marker, markersize=10, label=f"{policy}, nested")
        ax.set(xlabel="GFLOPs per input", ylabel="test accuracy", title=task)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
