"""Every script of ``benchmarks/`` runs end to end on tiny data: two training
steps, a gallery of a few videos, short timings. What they measure is in
BENCHMARKS.md; here they must run, write their three reports and put the
numbers they compute in them."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from slimvl.checkpoint import latest_checkpoint, load_model
from slimvl.data import make_dataset

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def load(script: str):
    """``benchmarks/<script>.py`` as a module (benchmarks are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{script}", BENCHMARKS / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(script: str, *argv: str) -> dict:
    return load(script).main(list(argv))


def reports(out: Path, name: str) -> dict:
    for ext in ("md", "png"):
        assert (out / f"{name}.{ext}").stat().st_size > 0, f"{name}.{ext} missing or empty"
    return json.loads((out / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench") / "data"
    return make_dataset(root, kind="video-text", seed=0, n_train=40, n_val=16, n_test=8, group_size=4, frames=4,
                        size=64, progress=False)


def test_streams(data, tmp_path):
    out = run("streams", "--out", str(tmp_path), "--data", str(data), "--steps", "2", "--galleries", "4", "8",
              "--quiet")
    rows = reports(tmp_path, "streams")["rows"]
    assert [(r["stream"], r["gallery"]) for r in rows] == [(s, g) for s in ("single", "multi", "mixed")
                                                           for g in (4, 8)]
    for r in rows:
        base = next(b for b in rows if b["stream"] == "single" and b["gallery"] == r["gallery"])
        assert math.isclose(r["speedup_vs_single"], base["seconds_total"] / r["seconds_total"])
        assert math.isclose(r["t2v_r1_minus_single"], r["t2v_r1"] - base["t2v_r1"])
        assert 0 <= r["t2v_r1"] <= 1 and r["gflops_total"] > 0
    assert out["rows"] == rows


def test_latents(data, tmp_path):
    run("latents", "--out", str(tmp_path), "--data", str(data), "--steps", "2", "--latents", "8", "16",
        "--gallery", "8", "--quiet")
    rows = reports(tmp_path, "latents")["rows"]
    assert [r["num_latents"] for r in rows] == [8, 16]
    assert rows[0]["gflops_total_ratio"] == 1.0
    assert rows[1]["gflops_per_video"] > rows[0]["gflops_per_video"]  # more latents, more work per video
    # A cached video costs far less than a jointly encoded pair times the gallery.
    assert rows[1]["gflops_joint_pair"] > rows[1]["gflops_per_pair"]


def test_layerdrop(data, tmp_path):
    run("layerdrop", "--out", str(tmp_path), "--data", str(data), "--steps", "2", "--gallery", "8",
        "--min-run-time", "0.01", "--quiet")
    rows = reports(tmp_path, "layerdrop_2steps")["rows"]
    assert [(r["train_drop"], r["cross_attentions"]) for r in rows] == [(d, k) for d in (0.0, 0.5)
                                                                       for k in (3, 2, 1)]
    for r in rows:
        assert (r["gflops_cut"] == 0) == (r["cross_attentions"] == 3)
        assert (r["t2v_r1_points_vs_all"] == 0) or r["cross_attentions"] < 3
    assert rows[2]["gflops_cut"] > rows[1]["gflops_cut"] > 0


def test_layerdrop_latency_only(tmp_path):
    run("layerdrop", "--out", str(tmp_path), "--latency-only", "--repeats", "2", "--min-run-time", "0.01")
    rows = json.loads((tmp_path / "layerdrop_latency.json").read_text())["rows"]
    assert [r["cross_attentions"] for r in rows] == [3, 2, 1]
    assert rows[0]["gflops_cut"] == 0 < rows[1]["gflops_cut"] < rows[2]["gflops_cut"]


def test_scaling(tmp_path):
    run("scaling", "--out", str(tmp_path), "--quick", "--frames", "2", "4", "--latents", "8", "--sizes", "32",
        "--min-run-time", "0.01")
    report = reports(tmp_path, "scaling")
    assert {r["model"] for r in report["rows"]} == {"single_stream", "perceiver_vl"}
    for r in report["rows"] + report["resolution_rows"]:
        assert (r["gflops_ratio"] == 1.0) == (r["model"] == "single_stream")
    assert set(report["gflops_growth"]) == {"single_stream", "perceiver_vl N=8"}
    # Joint attention over every token grows faster with frames than the latent bottleneck.
    assert report["gflops_growth"]["single_stream"] > report["gflops_growth"]["perceiver_vl N=8"]


def test_qa(data, tmp_path):
    run("qa", "--out", str(tmp_path), "--data", str(data), "--steps", "2", "--batch-size", "8",
        "--questions-per-item", "2", "--quiet")
    rows = reports(tmp_path, "qa")["rows"]
    assert [r["model"] for r in rows] == ["perceiver_vl_tiny", "single_stream_tiny"]
    assert rows[0]["gflops_ratio"] == 1.0 and rows[1]["gflops_ratio"] > 1
    assert all(0 <= r["accuracy"] <= 1 for r in rows)


def test_pretrain(data, tmp_path):
    run("pretrain", "--out", str(tmp_path), "--data", str(data), "--pretrain-steps", "2", "--finetune-steps", "2",
        "--corpus-items", "40", "--gallery", "8", "--mlm-batch", "8", "--quiet")
    report = reports(tmp_path, "pretrain")
    assert [r["init"] for r in report["rows"]] == ["scratch", "pretrained"]
    assert report["rows"][0]["t2v_r1_minus_scratch"] == 0
    assert set(report["mlm_accuracy"]) == {"video-text", "image-text"}


def test_ablation(data, tmp_path):
    run("ablation", "--out", str(tmp_path), "--data", str(data), "--steps", "2", "--groups-per-step", "4",
        "--variant", "a=lr=0.001", "--variant", "b=model.num_latents=8", "--eval-every", "1")
    rows = reports(tmp_path, "ablation")["rows"]
    assert [r["variant"] for r in rows] == ["a", "b"]
    assert rows[1]["model_overrides"] == {"num_latents": 8}


def test_dynamic_queries(data, tmp_path):
    run("dynamic_queries", "--out", str(tmp_path), "--data", str(data), "--steps", "2", "--qa-steps", "2",
        "--levels", "2", "4", "--tasks", "count", "qa", "vtm", "--qa-layers", "cscs", "--batch-size", "8",
        "--questions-per-item", "2", "--vtm-steps", "2", "--candidates", "4",
        "--tolerance", "0.2", "--quiet")
    report = reports(tmp_path, "dynamic_queries")
    rows = report["rows"]
    count = [(r["training"], r["policy"]) for r in rows if r["task"] == "count"]
    assert count == [("nested", "fixed:2"), ("nested", "fixed:4"), ("nested", "cascade"), ("nested", "learned"),
                     ("plain", "fixed:2"), ("plain", "fixed:4")]
    full = [r for r in rows if r["policy"] == "fixed:4"]
    assert len(full) == 6 and all(r["accuracy_drop"] == 0 and r["gflops_ratio"] == 1 for r in full)
    assert rows[0]["gflops_ratio"] < 1 and rows[0]["mean_latents"] == 2
    learned = rows[3]
    assert learned["probe_gflops"] > 0 and sum(learned["exit_fractions"]) == pytest.approx(1)
    qa = {r["policy"]: r for r in rows if r["task"] == "qa" and r["training"] == "nested"}
    assert set(qa) == {"fixed:2", "fixed:4", "fixed:2/1", "fixed:4/1", "cascade", "learned", "cascade (joint)"}
    assert qa["fixed:4/1"]["gflops_ratio"] < 1 and qa["cascade (joint)"]["levels"][-1] == [4, 2]
    vtm = {r["policy"]: r for r in rows if r["task"] == "vtm" and r["training"] == "nested"}
    assert set(vtm) == {"fixed:2", "fixed:4", "cascade", "learned"} and vtm["fixed:2"]["candidates"] == 4
    assert [n["task"] for n in report["nesting_cost"]] == ["count", "qa", "vtm"]
    for n in report["nesting_cost"]:
        lo, hi = n["difference_ci95"]
        assert lo <= n["difference"] <= hi


def test_dynamic_queries_policies_may_use_counts_the_models_were_not_trained_on(data, tmp_path):
    run("dynamic_queries", "--out", str(tmp_path), "--data", str(data), "--steps", "2", "--levels", "2", "4",
        "--eval-levels", "1", "4", "--tasks", "count", "--batch-size", "8", "--tolerance", "0.2",
        "--name", "routing", "--quiet")
    report = reports(tmp_path, "routing")
    nested = [r for r in report["rows"] if r["training"] == "nested"]
    assert [r["policy"] for r in nested] == ["fixed:1", "fixed:4", "cascade", "learned"]
    assert nested[2]["levels"] == [1, 4]
    assert (tmp_path / "dynamic_queries" / "count_nested_q2-4_2").is_dir()  # trained on --levels


def test_decomposition(data, tmp_path):
    out = run("decomposition", "--out", str(tmp_path), "--data", str(data), "--gallery", "8", "--steps", "2",
              "--dual-steps", "2", "--seeds", "0", "1", "--arms", "none", "videos", "--rerank-k", "2", "8",
              "--index-sizes", "600", "--dim", "8", "--queries", "20", "--ef-search", "8", "64", "--nprobe", "2",
              "--quiet")
    res = reports(tmp_path, "decomposition")
    rows = {r["method"]: r for r in res["models"]["rows"]}
    cross = rows["cross-encoder, all pairs"]
    assert cross["speedup"] == 1.0 and 0 <= cross["mean_recall"] <= 1
    for name in ("decomposed, not fine-tuned", "dual encoder, hard negatives: none",
                 "dual encoder, hard negatives: videos"):
        assert rows[name]["gflops_total"] < cross["gflops_total"]
        assert math.isclose(rows[name]["speedup"], cross["seconds"] / rows[name]["seconds"])
    assert rows["dual encoder, hard negatives: none"]["runs"] == 2
    best = res["models"]["best_arm"]
    whole = rows[f"dual ({best}) top-8, re-ranked by the cross-encoder"]  # k = the gallery: the cross-encoder's ranks
    assert whole["mean_recall"] == cross["mean_recall"] and whole["diff_vs_cross"] == 0
    (ablation,) = res["models"]["ablation"]
    assert ablation["arm"] == "videos" and -1 <= ablation["t2v_r1_diff"] <= 1 and ablation["v2t_r1_ci"] >= 0
    index = res["index"]
    assert [(r["kind"], r["knob"]) for r in index] == [("exact", ""), ("hnsw", "ef_search=8"),
                                                       ("hnsw", "ef_search=64"), ("ivfpq", "nprobe=2")]
    assert index[0]["recall_at_10"] == 1.0 and all(0 < r["recall_at_10"] <= 1 for r in index)
    assert index[2]["recall_at_10"] >= index[1]["recall_at_10"]
    assert out["command"].startswith("python benchmarks/decomposition.py")


def test_merging(data, tmp_path):
    images = make_dataset(tmp_path / "images", kind="image-text", seed=0, n_train=64, n_val=4, n_test=8,
                          group_size=4, frames=1, size=64, progress=False)
    out = run("merging", "--out", str(tmp_path), "--data", str(data), "--image-data", str(images), "--steps", "2",
              "--tune-steps", "2", "--seeds", "0", "--r", "8", "--r-sweep", "0", "8", "--pairs-gallery", "8",
              "--pair-steps", "2", "--pair-r", "8", "--pair-r-sweep", "0", "8", "--min-run-time", "0.01", "--quiet",
              "--importance-weights", "1", "0", "--allocator", "default")  # the suite's process keeps glibc's own
    res = reports(tmp_path, "merging")
    for part in ("clip", "pairs"):
        rows = {(r["arm"], r["r"]): r for r in res[part]["summary"]}
        # The importance weights are the CLIP part's: one CrossGET arm each.
        assert list(rows) == [("none", 0), ("free", 8), ("tome", 0), ("tome", 8), ("crossget", 0), ("crossget", 8)] \
            + ([("crossget-w0", 0), ("crossget-w0", 8)] if part == "clip" else [])
        none = rows[("none", 0)]
        assert none["throughput_ratio"] == 1.0 and none["tokens"] is None
        assert rows[("tome", 0)]["gflops"] == none["gflops"] and rows[("tome", 0)]["tokens"] is None
        for key in [k for k in rows if k[1] == 8]:
            row = rows[key]
            unmerged = rows[(key[0] if key[0] != "free" else "none", 0)]["gflops"]
            if part == "pairs" and key[0].startswith("crossget"):
                # Whole keys (width 64) compared over ~150 tokens a layer cost more than 8 merges save: counted.
                assert row["gflops"] != unmerged
            else:
                assert row["gflops"] < unmerged
            assert row["tokens"][-1] < row["tokens"][0]
            assert -1 <= row["diff"] <= 1 and row["ci"] >= 0 and 0 <= row["mean_r1"] <= 1
    # The CrossGET arm of the CLIP model was fine-tuned with cross tokens.
    assert load_model(latest_checkpoint(tmp_path / "merging" / "clip_crossget_r8_steps2_s0")).config.cross_tokens
    tuned = load_model(latest_checkpoint(tmp_path / "merging" / "clip_crossget-w0_r8_steps2_s0"))
    assert tuned.config.cross_tokens and tuned.importance_weight == 0.0
    clip = {(r["arm"], r["r"]): r for r in res["clip"]["summary"]}
    assert clip[("crossget-w0", 8)]["method"] == "CrossGET, importance weight 0 (ours), fine-tuned"
    # r is chosen on the dataset's own validation split (4 images), one row per merging arm, scored on the test.
    assert res["clip"]["n_val"] == 4 and "val_mean_r1" not in res["pairs"]["summary"][0]
    assert all(0 <= r["val_mean_r1"] <= 1 for r in clip.values())
    chosen = {r["arm"]: r for r in res["clip"]["chosen"]}
    assert list(chosen) == ["free", "tome", "crossget", "crossget-w0"]
    for arm, row in chosen.items():
        if row["r"] != "none":
            assert row["vs_none"] == clip[(arm, row["r"])]["vs_none"]
            assert clip[("none", 0)]["val_mean_r1"] - clip[(arm, row["r"])]["val_mean_r1"] <= 0.005 + 1e-12
    assert "r chosen on 4 validation images" in (tmp_path / "merging.md").read_text()
    assert out["command"].startswith("python benchmarks/merging.py")


def test_r_is_chosen_on_validation_as_the_largest_within_the_drop():
    choose = load("merging").choose_on_validation

    def row(arm, r, val, test_diff=0.0):
        return {"arm": arm, "method": arm, "r": r, "val_mean_r1": val, "diff": test_diff, "ci": 0.01,
                "vs_none": f"{100 * test_diff:+.1f}", "gflops": 1.0 - r / 100, "throughput_ratio": 1 + r / 10}

    summary = [row("none", 0, 0.500),
               # Within half a point at r = 8 and again at r = 16, not at 12: the largest within wins.
               row("tome", 0, 0.501), row("tome", 8, 0.497), row("tome", 12, 0.490), row("tome", 16, 0.4952, -0.02),
               # Never within: no r, and where it came closest.
               row("crossget", 8, 0.480), row("crossget", 16, 0.470)]
    chosen = {r["arm"]: r for r in choose(summary, 0.005)}
    assert chosen["tome"]["r"] == 16 and chosen["tome"]["vs_none"] == "-2.0"  # the test's drop is reported as is
    assert chosen["tome"]["val_vs_none"] == "-0.5 pt"
    assert chosen["crossget"]["r"] == "none" and "at best (r = 8)" in chosen["crossget"]["val_vs_none"]
    assert {r["arm"]: r["r"] for r in choose(summary, 0.0)} == {"tome": 0, "crossget": "none"}
    with pytest.raises(ValueError, match="val_mean_r1"):
        choose([{k: v for k, v in r.items() if k != "val_mean_r1"} for r in summary], 0.005)


def test_merging_refuses_a_negative_validation_gallery(tmp_path):
    for flag, value in (("--val-gallery", "-1"), ("--val-drop", "-0.5")):
        with pytest.raises(SystemExit):
            run("merging", "--out", str(tmp_path), "--parts", "clip", flag, value)
    assert not list(tmp_path.iterdir())  # refused before anything is made


def test_merging_speed_only(tmp_path):
    out = run("merging", "--out", str(tmp_path), "--speed-only", "--r-sweep", "0", "8", "--rounds", "2",
              "--min-run-time", "0.01", "--quiet", "--allocator", "default")
    res = reports(tmp_path, "merging_speed")
    rows = {(r["arm"], r["r"]): r for r in res["speed"]}
    assert list(rows) == [("none", 0), ("tome", 8), ("crossget", 0), ("crossget", 8)]
    none = rows[("none", 0)]
    assert none["throughput_ratio"] == 1.0 and none["items_per_s"] > 0 and none["tokens"] is None
    # The cross token costs a little; merging removes 8 tokens a layer (7 in the last: half of the 15 left).
    assert none["gflops"] < rows[("crossget", 0)]["gflops"]
    assert rows[("tome", 8)]["tokens"] == [57, 49, 41, 33, 25, 17]
    assert rows[("crossget", 8)]["tokens"] == [58, 50, 42, 34, 26, 18]  # its cross token is kept
    for key in (("tome", 8), ("crossget", 8)):
        assert rows[key]["gflops"] < 0.7 * rows[(key[0] if key[0] == "crossget" else "none", 0)]["gflops"]
        assert len(rows[key]["throughput_ratios"]) == 2 and all(x > 0 for x in rows[key]["throughput_ratios"])
        assert 0 < rows[key]["merging_share"] < 1 and rows[key]["merging_ms"] > 0  # timed inside the forward
    assert "merging_ms" not in none and "merging_share" not in rows[("crossget", 0)]  # nothing merged, nothing timed
    assert out["command"].startswith("python benchmarks/merging.py --out") and out["allocator"] == "default"
    assert (tmp_path / "merging_speed.png").exists() and "| ToMe | 8 |" in (tmp_path / "merging_speed.md").read_text()


def test_merging_speed_only_at_another_patch_size(tmp_path):
    out = run("merging", "--out", str(tmp_path), "--speed-only", "--r-sweep", "4", "--rounds", "1", "--patch-size",
              "16", "--min-run-time", "0.01", "--quiet", "--allocator", "default", "--name", "p16")
    rows = {(r["arm"], r["r"]): r for r in out["speed"]}
    # 16 patch tokens and [CLS]: 4 merged a layer while half the mergeable tokens allow it.
    assert rows[("tome", 4)]["tokens"] == [13, 9, 5, 3, 2, 2]
    assert rows[("crossget", 4)]["tokens"] == [14, 10, 6, 4, 3, 3]  # and its cross token
    assert "(16 patch tokens)" in (tmp_path / "p16.md").read_text()
    with pytest.raises(SystemExit, match="--patch-size 5"):
        run("merging", "--out", str(tmp_path), "--speed-only", "--patch-size", "5", "--allocator", "default")


def test_merging_speed_only_of_the_cross_encoder(tmp_path):
    out = run("merging", "--out", str(tmp_path), "--speed-only", "--speed-model", "cross", "--pair-r-sweep", "0", "8",
              "--rounds", "1", "--min-run-time", "0.01", "--allocator", "default", "--name", "pairs_speed")
    rows = {(r["arm"], r["r"]): r for r in reports(tmp_path, "pairs_speed")["speed"]}
    # No cross token on this model: CrossGET at r = 0 would be the baseline again, so it is not timed.
    assert list(rows) == [("none", 0), ("tome", 8), ("crossget", 8)] and out["speed_model"] == "cross"
    # [CLS], 128 video tokens (4 frames in tubelets of 2, 64 patches each), 36 caption positions; only video merges.
    assert rows[("tome", 8)]["tokens"] == [157, 149, 141, 133] == rows[("crossget", 8)]["tokens"]
    assert rows[("tome", 8)]["gflops"] < rows[("none", 0)]["gflops"] and rows[("crossget", 8)]["merging_ms"] > 0
    md = (tmp_path / "pairs_speed.md").read_text()
    assert "single-stream cross-encoder, pair scoring (128 video tokens" in md and "GFLOPs per pair" in md
    with pytest.raises(SystemExit, match="only the CLIP model's patches"):
        run("merging", "--out", str(tmp_path), "--speed-only", "--speed-model", "cross", "--patch-size", "4",
            "--allocator", "default")


def test_merging_diagnosis(tmp_path):
    images = make_dataset(tmp_path / "images", kind="image-text", seed=0, n_train=64, n_val=4, n_test=8,
                          group_size=4, frames=1, size=64, progress=False)
    out = run("merging_diagnosis", "--out", str(tmp_path), "--image-data", str(images), "--steps", "2",
              "--tune-steps", "2", "--seed", "0", "--r", "8", "--quiet")
    res = reports(tmp_path, "merging_diagnosis")
    rows = {(x["model"], x["method"], x["r"]): x["mean_r1"] for x in res["rows"]}
    assert len(rows) == 12 and all(0 <= v <= 1 for v in rows.values())
    # Hidden cross tokens with zero offsets change nothing: the same scores as the base.
    assert rows[("base + cross tokens (hidden), zero offsets", "none", 0)] == rows[("base", "none", 0)]
    assert [x["tokens"] for x in res["layers"]] == [65, 57, 49, 41, 33, 25]  # [CLS] and 64 patches, 8 merged a layer
    assert all(x["importance_std"] >= 0 and -1 <= x["best_similarity_mean"] <= 1 for x in res["layers"])
    assert (tmp_path / "merging" / "diag_crossget_r8_w0_s0_steps2").is_dir()
    assert out["command"].startswith("python benchmarks/merging_diagnosis.py")


def test_fusion(tmp_path):
    av = make_dataset(tmp_path / "av", kind="audio-video", n_train=12, n_val=4, n_test=16, frames=4, size=32,
                      seconds=2.0, progress=False)
    out = run("fusion", "--out", str(tmp_path), "--data", str(av), "--steps", "2", "--seeds", "0", "1", "--text",
              "--view-maps", "default", "self", "--seconds-sweep", "1", "4", "--min-run-time", "0.01", "--quiet")
    report = reports(tmp_path, "fusion")
    summary = report["audio_video"]["summary"]
    assert [r["arm"] for r in summary] == ["early", "late", "mbt", "locomt", "video only", "locomt at MBT's GFLOPs"]
    runs = report["audio_video"]["runs"]
    for r in summary:
        scores = [x["score"] for x in runs if x["arm"] == r["arm"]]
        assert len(scores) == 2 and r["score"] == pytest.approx(sum(scores) / 2)
        assert r["gflops"] == pytest.approx(r["gflops_analytic"])
        if r["arm"] != "early":
            lo, hi = r["ci_early"]
            assert lo <= hi
    early = summary[0]["gflops"]
    assert next(r for r in summary if r["arm"] == "locomt")["gflops"] < 0.8 * early
    mbt, deep = (next(r for r in summary if r["arm"] == a) for a in ("mbt", "locomt at MBT's GFLOPs"))
    assert abs(deep["gflops"] - mbt["gflops"]) < 0.15 * mbt["gflops"]
    assert [r["arm"] for r in report["audio_video_text"]["summary"]][-1] == "video + text"
    # The default view map is the LoCoMT arm's own run (seed 0): the same model, the same mAP.
    default = next(v for v in report["view_maps"] if v["views"] == "default")
    assert default["mAP"] == pytest.approx(next(x["mAP"] for x in runs if x["arm"] == "locomt" and x["seed"] == 0))
    sweep = report["seconds_sweep"]
    for scheme in ("early", "locomt"):
        short, long = (next(r for r in sweep if r["scheme"] == scheme and r["seconds"] == s) for s in (1, 4))
        assert long["gflops"] > short["gflops"] and long["audio_tokens"] == 4 * short["audio_tokens"]
    assert out["n_test"] == 16


def test_fusion_bootstrap_measures_the_headline_map():
    import torch

    from slimvl.tasks.audio_video import mean_average_precision

    module = load("fusion")
    g = torch.Generator().manual_seed(0)
    labels = (torch.rand(200, 5, generator=g) > 0.6).float()
    good = labels * 2 + torch.rand(200, 5, generator=g) * 1.5  # tie-free, informative
    bad = torch.rand(200, 5, generator=g)
    # The fast AP the bootstrap resamples is the metric the tables report.
    assert module.sorted_ap(good, labels > 0.5).mean().item() == pytest.approx(mean_average_precision(good, labels))
    lo, hi = module.paired_map_interval([good], [bad], labels, resamples=200)
    diff = mean_average_precision(good, labels) - mean_average_precision(bad, labels)
    assert 0 < lo <= diff <= hi


def test_gpu(tmp_path):
    out = run("gpu", "--out", str(tmp_path), "--device", "cpu", "--dtype", "fp32", "--quick", "--modes", "eager",
              "--quiet")
    rows = reports(tmp_path, "gpu")["rows"]
    assert {r["input"] for r in rows} == {"video", "image", "audio+video"}
    assert {"perceiver_vl", "single_stream", "dual encoder", "clip ToMe r=8", "clip CrossGET r=8", "fusion locomt",
            "perceiver_vl LayerDrop keep 1", "perceiver_vl N/4 latents"} <= {r["model"] for r in rows}
    for r in rows:
        base = next(b for b in rows if (b["model"], b["input"], b["frames"], b["mode"]) ==
                    (r["baseline"], r["input"], r["frames"], r["mode"]))
        assert math.isclose(r["train_vs_baseline"], r["train_step_ms"] / base["train_step_ms"])
        assert math.isclose(r["batch1_vs_baseline"], r["serve_ms_batch1"] / base["serve_ms_batch1"])
        assert r["train_tflops_per_s"] > 0 and 0 < r["serve_fraction_of_matmul"]
    # Fewer latents and fewer cross-attentions cost fewer FLOPs than the full Perceiver.
    video = {r["model"]: r for r in rows if r["input"] == "video"}
    assert video["perceiver_vl N/4 latents"]["gflops"] < video["perceiver_vl"]["gflops"]
    assert video["perceiver_vl LayerDrop keep 1"]["gflops"] < video["perceiver_vl"]["gflops"]
    demo = out["demo"]
    assert math.isclose(demo["speedup"], demo["cpu2_ms_per_step"] / demo["device_ms_per_step"])
