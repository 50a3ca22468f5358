"""VLDeformer's decomposition: a cross-encoder's weights as a dual encoder,
then retrieve + re-rank, then approximate search at scale.

    python benchmarks/decomposition.py --out benchmarks/out

Part 1 (models, on the demo's world with a gallery of ``--gallery`` test
videos, one caption each): the single-stream cross-encoder
(``single_stream_tiny``, the demo's recipe) scores all pairs; its
decomposition (``slimvl.decompose``) is fine-tuned contrastively from it with
each kind of hard negatives (none, captions, videos, both), ``--seeds``
runs each; the dual encoder's top-k is re-ranked by the cross-encoder. Each
reports R@1/5/10 both ways, whole-retrieval wall time (measured, every pair
of the cross-encoder included) and GFLOPs (torch's counter); differences
against the cross-encoder and between ablation arms are paired over the
same test queries (95% interval).

Part 2 (index): ``--index-sizes`` random unit vectors of the dual encoder's
width (the hardest case for approximate search: no structure to exploit),
indexed exactly, by HNSW and by IVF-PQ: build time, median latency of one
query, queries per second at batch 64, index size, and recall@10 of the
approximate indexes against exact search over ``--queries`` random queries.
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from matplotlib.ticker import NullFormatter

from slimvl.bench.plots import figure, plot_lines
from slimvl.bench.report import markdown_table, show, write_report
from slimvl.bench.stats import paired_difference
from slimvl.checkpoint import latest_checkpoint, load_model, read_meta, weights_checksum
from slimvl.experiments import (counted_retrieval_flops, experiment_parser, gallery_dataset, parse_options,
                                retrieval_gflops, retrieval_splits, subset, train_or_load)
from slimvl.index import IndexParams, VectorIndex
from slimvl.models import decompose
from slimvl.recipes import FRAMES, TEXT_LEN, TRAIN
from slimvl.tasks.retrieval import score_matrix, t2v_ranks, v2t_ranks
from slimvl.tasks.retrieval.rerank import reranked_scores
from slimvl.train import TrainConfig, train

# Contrastive fine-tuning of the decomposed cross-encoder: units of 8 groups
# (32 videos and captions), the contrastive term alone.
DUAL = TrainConfig(steps=400, groups_per_step=8, groups_per_unit=8, negatives_per_item=0, lr=5e-4, warmup_steps=30,
                   itc_weight=1.0, checkpoint_every=200)
ARMS = ("none", "captions", "videos", "both")
RECALL_KEYS = [f"{d}_r{k}" for d in ("t2v", "v2t") for k in (1, 5, 10)]
COLUMNS = [("method", "method", ""), ("runs", "runs", ""), ("t2v_r1", "t2v R@1", ".3f"), ("t2v_r5", "R@5", ".3f"),
           ("t2v_r10", "R@10", ".3f"), ("v2t_r1", "v2t R@1", ".3f"), ("v2t_r5", "R@5", ".3f"),
           ("v2t_r10", "R@10", ".3f"), ("mean_recall", "mean R", ".4f"), ("mean_recall_spread", "+- (runs)", ".4f"),
           ("vs_cross", "mean R vs cross (95% CI)", ""), ("gflops_total", "GFLOPs", ".1f"),
           ("seconds", "wall s", ".2f"), ("speedup", "speed-up", ".0f")]
INDEX_COLUMNS = [("n", "stored", ",d"), ("kind", "index", ""), ("knob", "knob", ""), ("build_s", "build s", ".1f"),
                 ("ms_batch1", "median ms (batch 1)", ".3f"), ("qps_batch64", "queries/s (batch 64)", ",.0f"),
                 ("megabytes", "MB", ".1f"), ("recall_at_10", "recall@10 vs exact", ".3f")]


def per_query(t2v: torch.Tensor, v2t: torch.Tensor, caption_item: torch.Tensor) -> torch.Tensor:
    """Each item's mean of its R@1/5/10 hits in both directions ``[n_items]``
    (one caption per item: the caption's t2v hits and the item's v2t hits),
    the quantity whose mean is the headline "mean R"."""
    tr, vr = t2v_ranks(t2v, caption_item), v2t_ranks(v2t, caption_item)
    if len(tr) != len(vr):
        raise ValueError("per-query pairing needs one caption per item")
    order = torch.empty_like(tr)
    order[caption_item] = tr
    return sum(((order <= k).double() + (vr <= k).double()) for k in (1, 5, 10)) / 6


def r1_hits(t2v: torch.Tensor, v2t: torch.Tensor, caption_item: torch.Tensor) -> torch.Tensor:
    """Per item, whether its caption's video ranks first (t2v) and whether
    its own caption ranks first (v2t): ``[2, n_items]`` floats."""
    tr = t2v_ranks(t2v, caption_item)
    order = torch.empty_like(tr)
    order[caption_item] = tr
    return torch.stack([(order <= 1).double(), (v2t_ranks(v2t, caption_item) <= 1).double()])


def recalls(t2v: torch.Tensor, v2t: torch.Tensor, caption_item: torch.Tensor) -> dict:
    tr, vr = t2v_ranks(t2v, caption_item), v2t_ranks(v2t, caption_item)
    out = {f"t2v_r{k}": (tr <= k).double().mean().item() for k in (1, 5, 10)}
    out.update({f"v2t_r{k}": (vr <= k).double().mean().item() for k in (1, 5, 10)})
    out["mean_recall"] = float(np.mean([out[k] for k in RECALL_KEYS]))
    return out


def fine_tune(cross, data, arm: str, seed: int, steps: int, run_dir: Path, progress: bool):
    """The cross-encoder decomposed (its own copy) and fine-tuned with ``arm``
    hard negatives; a finished run is loaded, an interrupted one resumed."""
    cfg = replace(DUAL, steps=steps, seed=seed, hard_negatives=arm)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None and read_meta(ckpt)["step"] == cfg.steps:
        return load_model(ckpt), read_meta(ckpt).get("seconds", float("nan"))
    torch.manual_seed(seed)
    dual = decompose(cross, copy=True)
    result = train(dual, data, cfg, run_dir=run_dir, resume=ckpt is not None, progress=progress)
    return dual, result.seconds


def cross_scores(cross, test, path: Path, progress: bool) -> tuple[torch.Tensor, float]:
    """The cross-encoder's all-pairs score matrix and its measured seconds,
    kept at ``path`` (safetensors) so that a rerun does not pay it again;
    reused only for the same weights and data (checksum and fingerprint)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    key = {"checksum": weights_checksum(cross), "data": str(test.fingerprint)}
    if path.is_file():
        with safe_open(str(path), "pt") as f:
            same = f.metadata() == key
        if same:
            saved = load_file(str(path))
            return saved["scores"], float(saved["seconds"])
    t0 = time.perf_counter()
    scores = score_matrix(cross, test, progress=progress)
    seconds = time.perf_counter() - t0
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({"scores": scores.contiguous(), "seconds": torch.tensor(seconds)}, str(tmp), metadata=key)
    tmp.replace(path)
    return scores, seconds


def dense_run(dual, test, progress: bool, repeats: int = 3) -> tuple[torch.Tensor, float]:
    """A dual encoder's score matrix and the median seconds of ``repeats``
    whole retrievals (a short run is at the mercy of one hiccup)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        s = score_matrix(dual, test, progress=progress)
        times.append(time.perf_counter() - t0)
    return s, float(np.median(times))


def models_part(a, out: Path, prog: bool) -> dict:
    root = Path(a.data) if a.data else gallery_dataset(out / "data_gallery1000", a.gallery, prog)
    tok, train_data, test = retrieval_splits(root, progress=prog, preset="single_stream_tiny")
    test = subset(test, a.gallery)
    if len(test.caption_item) != a.gallery:
        raise ValueError(f"{root}: the benchmark pairs each test video with one caption; the split has "
                         f"{len(test.caption_item)} captions for {a.gallery} videos")
    cross, cross_train_s = train_or_load("single_stream_tiny", {"vocab_size": tok.vocab_size, "max_text_len": TEXT_LEN},
                                         train_data, replace(TRAIN, steps=a.steps), out / "decomposition" / "cross",
                                         prog)
    cross.eval()
    cap = test.caption_item
    c_scores, c_seconds = cross_scores(cross, test, out / "decomposition" / f"cross_scores_{a.gallery}.safetensors",
                                       prog)
    c_flops = retrieval_gflops(counted_retrieval_flops(cross, FRAMES, TEXT_LEN), a.gallery, a.gallery)
    base = per_query(c_scores, c_scores, cap)
    rows = [{"method": "cross-encoder, all pairs", "runs": 1, **recalls(c_scores, c_scores, cap),
             "gflops_total": c_flops["gflops_total"], "seconds": c_seconds, "speedup": 1.0,
             "train_seconds": cross_train_s}]
    show(rows[-1])

    def summarise(method: str, runs: list[dict], queries: list[torch.Tensor]) -> dict:
        row = {"method": method, "runs": len(runs)}
        for k in [*RECALL_KEYS, "mean_recall", "seconds", "gflops_total"]:
            row[k] = float(np.mean([r[k] for r in runs]))
        row["mean_recall_spread"] = float(np.ptp([r["mean_recall"] for r in runs]) / 2) if len(runs) > 1 else None
        d, h = paired_difference(base, torch.stack(queries).mean(0))
        row.update(diff_vs_cross=d, diff_ci=h, vs_cross=f"{100 * d:+.2f} +- {100 * h:.2f} pt",
                   speedup=c_seconds / row["seconds"], per_run=runs)
        show({k: v for k, v in row.items() if k != "per_run"})
        return row

    # Decomposed without fine-tuning: the cross-encoder's weights as they are.
    zero = decompose(cross).eval()
    z_scores, z_seconds = dense_run(zero, test, prog)
    z_flops = retrieval_gflops(counted_retrieval_flops(zero, FRAMES, TEXT_LEN), a.gallery, a.gallery)
    rows.append(summarise("decomposed, not fine-tuned", [{**recalls(z_scores, z_scores, cap), "seconds": z_seconds,
                                                          **z_flops}], [per_query(z_scores, z_scores, cap)]))
    arms: dict[str, dict] = {}
    for arm in a.arms:
        runs, queries, models, r1 = [], [], [], []
        for seed in a.seeds:
            dual, train_s = fine_tune(cross, train_data, arm, seed, a.dual_steps,
                                      out / "decomposition" / f"dual_{arm}_seed{seed}", prog)
            dual.eval()
            s, sec = dense_run(dual, test, prog)
            runs.append({**recalls(s, s, cap), "seconds": sec, "train_seconds": train_s, "seed": seed, **z_flops})
            queries.append(per_query(s, s, cap))
            r1.append(r1_hits(s, s, cap))
            models.append(dual)
        arms[arm] = {"row": summarise(f"dual encoder, hard negatives: {arm}", runs, queries), "queries": queries,
                     "models": models, "r1": torch.stack(r1).mean(0)}
        rows.append(arms[arm]["row"])
    # Retrieve + re-rank, from the arm with the best mean recall.
    best = max(arms, key=lambda k: arms[k]["row"]["mean_recall"])
    for k in a.rerank_k:
        runs, queries = [], []
        for dual in arms[best]["models"]:
            timings: dict = {}
            t0 = time.perf_counter()
            t2v, v2t = reranked_scores(dual, cross, test, k, progress=prog, timings=timings)
            runs.append({**recalls(t2v, v2t, cap), "seconds": time.perf_counter() - t0,
                         "gflops_total": z_flops["gflops_total"] + timings["reranked_pairs"] * c_flops[
                             "gflops_per_pair"], "reranked_pairs": timings["reranked_pairs"]})
            queries.append(per_query(t2v, v2t, cap))
        row = summarise(f"dual ({best}) top-{k}, re-ranked by the cross-encoder", runs, queries)
        rows.append(row)
    ablation = []
    for arm in a.arms:
        if arm == "none" or "none" not in arms:
            continue
        none_q, arm_q = torch.stack(arms["none"]["queries"]).mean(0), torch.stack(arms[arm]["queries"]).mean(0)
        d, h = paired_difference(none_q, arm_q)
        r1 = [r["t2v_r1"] - n["t2v_r1"] for r, n in zip(arms[arm]["row"]["per_run"], arms["none"]["row"]["per_run"])]
        entry = {"arm": arm, "mean_recall_diff": d, "ci": h, "t2v_r1_diff_per_seed": r1}
        for i, direction in enumerate(("t2v", "v2t")):  # R@1 of each direction, paired over the same queries
            entry[f"{direction}_r1_diff"], entry[f"{direction}_r1_ci"] = paired_difference(arms["none"]["r1"][i],
                                                                                           arms[arm]["r1"][i])
        ablation.append(entry)
        show(ablation[-1])
    return {"rows": rows, "ablation": ablation, "best_arm": best, "gallery": a.gallery,
            "cross_seconds_measured": c_seconds, "dual_steps": a.dual_steps, "cross_steps": a.steps,
            "dual_config": {k: v for k, v in DUAL.__dict__.items()}}


def timed_search(index: VectorIndex, queries: np.ndarray, k: int = 10) -> tuple[float, float, np.ndarray]:
    """Median milliseconds of one query (batch 1, over all ``queries``),
    queries per second at batch 64, and the rows found ``[q, k]``."""
    times = []
    for q in queries:
        t0 = time.perf_counter()
        index.search(q[None], k)
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    rows = np.concatenate([index.search(queries[i:i + 64], k)[1] for i in range(0, len(queries), 64)])
    return 1e3 * float(np.median(times)), len(queries) / (time.perf_counter() - t0), rows


def index_part(a, prog: bool) -> list[dict]:
    rows = []
    rng = np.random.default_rng(0)
    for n in a.index_sizes:
        x = rng.standard_normal((n, a.dim), dtype=np.float32)
        q = rng.standard_normal((a.queries, a.dim), dtype=np.float32)
        configs = [("exact", IndexParams(kind="exact"), None, None)]
        configs += [("hnsw", IndexParams(kind="hnsw", hnsw_m=a.hnsw_m, ef_construction=a.ef_construction),
                     "ef_search", a.ef_search)]
        nlist = 1024 if n > 100_000 else 256 if n >= 10_000 else 0  # 0: sized to n
        configs += [("ivfpq", IndexParams(kind="ivfpq", nlist=nlist, refine=a.refine), "nprobe", a.nprobe)]
        truth = None
        for kind, params, knob, values in configs:
            t0 = time.perf_counter()
            index = VectorIndex.build(x, params)
            build = time.perf_counter() - t0
            for v in values or [None]:
                if knob is not None:
                    setattr(index, knob, v)
                ms, qps, found = timed_search(index, q)
                if truth is None:
                    truth = found
                recall = float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)]))
                rows.append({"n": n, "kind": kind, "knob": "" if knob is None else f"{knob}={v}", "build_s": build,
                             "ms_batch1": ms, "qps_batch64": qps, "megabytes": index.memory_bytes() / 2 ** 20,
                             "recall_at_10": recall, "params": params.to_dict()})
                show(rows[-1])
            del index
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = experiment_parser(__doc__, steps=TRAIN.steps)
    p.add_argument("--gallery", type=int, default=1000, help="test videos (one caption each)")
    p.add_argument("--dual-steps", type=int, default=DUAL.steps, help="fine-tuning steps of each dual encoder")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of each dual encoder arm")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS, help="hard-negative arms")
    p.add_argument("--rerank-k", type=int, nargs="+", default=[10, 50], help="candidates re-ranked per query")
    p.add_argument("--index-sizes", type=int, nargs="+", default=[100_000, 1_000_000], help="stored embeddings")
    p.add_argument("--dim", type=int, default=64, help="embedding width of the index part (the dual's embed_dim)")
    p.add_argument("--queries", type=int, default=1000, help="queries of the index part")
    p.add_argument("--ef-search", type=int, nargs="+", default=[64, 128, 256, 512], help="HNSW settings swept")
    p.add_argument("--hnsw-m", type=int, default=32, help="HNSW neighbours per node")
    p.add_argument("--ef-construction", type=int, default=100, help="HNSW candidates while building")
    p.add_argument("--nprobe", type=int, nargs="+", default=[16, 64, 256], help="IVF-PQ settings swept")
    p.add_argument("--refine", type=int, default=10, help="IVF-PQ: exact re-scoring of the top k*R")
    p.add_argument("--parts", nargs="+", default=["models", "index"], choices=["models", "index"],
                   help="what to run: the models on the gallery, the index at scale, or both")
    p.add_argument("--name", default="decomposition", help="file name of the reports (OUT/NAME.json/.md/.png)")
    a, command = parse_options(p, "decomposition.py", argv)
    out, prog = Path(a.out), not a.quiet
    payload: dict = {"command": command}
    md = ""
    fig, axes = figure(len(a.parts), width=6.0)
    if "models" in a.parts:
        res = models_part(a, out, prog)
        payload["models"] = res
        md += (f"Gallery of {a.gallery} videos x {a.gallery} captions; cross-encoder all pairs measured "
               f"({res['cross_seconds_measured']:.0f} s).\n\n" + markdown_table(res["rows"], COLUMNS) + "\n")
        md += "Hard negatives against none (paired over test queries, runs averaged):\n\n"
        md += markdown_table([{**r, "d": f"{100 * r['mean_recall_diff']:+.2f} +- {100 * r['ci']:.2f} pt",
                               "t": f"{100 * r['t2v_r1_diff']:+.2f} +- {100 * r['t2v_r1_ci']:.2f} pt",
                               "v": f"{100 * r['v2t_r1_diff']:+.2f} +- {100 * r['v2t_r1_ci']:.2f} pt",
                               "r1": ", ".join(f"{100 * x:+.1f}" for x in r["t2v_r1_diff_per_seed"])}
                              for r in res["ablation"]],
                             [("arm", "hard negatives", ""), ("d", "mean R vs none (95% CI)", ""),
                              ("t", "t2v R@1 vs none", ""), ("v", "v2t R@1 vs none", ""),
                              ("r1", "t2v R@1 vs none per seed (pt)", "")]) + "\n"
        pts = res["rows"]
        axes[0].scatter([r["seconds"] for r in pts], [r["mean_recall"] for r in pts])
        for r in pts:
            axes[0].annotate(r["method"].split(",")[0][:28], (r["seconds"], r["mean_recall"]), fontsize=6)
        axes[0].set(xscale="log", xlabel="whole retrieval, wall s (log)", ylabel="mean of R@1/5/10 both ways",
                    title=f"{a.gallery}-video gallery")
    if "index" in a.parts:
        rows = index_part(a, prog)
        payload["index"] = rows
        md += f"Random unit vectors of width {a.dim}, {a.queries} queries, k = 10:\n\n"
        md += markdown_table(rows, INDEX_COLUMNS)
        for n in a.index_sizes:
            approx = [r for r in rows if r["n"] == n and r["kind"] != "exact"]
            plot_lines(axes[-1], approx, "ms_batch1", "recall_at_10", by="kind", label=f"{{}} ({n:,})",
                       xscale="log", xlabel="median ms per query (batch 1)", ylabel="recall@10 vs exact")
        axes[-1].xaxis.set_minor_formatter(NullFormatter())  # log-scale minor labels collide
    write_report(out, a.name, payload, md, fig)
    print(md)
    return payload


if __name__ == "__main__":
    main()
