"""The demo end to end, shrunk: data -> both models -> results, report, plot."""
from __future__ import annotations

import json

import pytest

from slimvl.demo import run_demo


def test_demo_writes_results_report_and_plot(tmp_path):
    out = tmp_path / "demo"
    results = run_demo(out, steps=3, progress=False,
                       data_overrides=dict(n_train=32, n_val=8, n_test=16))
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    rows = {r["model"]: r for r in on_disk["rows"]}
    assert set(rows) == {"perceiver_vl", "single_stream"}
    for r in rows.values():
        for k in ("t2v_r1", "t2v_r5", "t2v_r10", "v2t_r1", "v2t_r5", "v2t_r10", "heldout_t2v_r1"):
            assert 0.0 <= r[k] <= 1.0, k
        assert r["t2v_r1"] <= r["t2v_r5"] <= r["t2v_r10"]
        assert r["gflops_per_pair"] > 0 and r["latency_ms_per_pair"] > 0 and r["params"] > 0
        assert r["train_seconds"] > 0
    # The cost claim the demo exists to show holds by construction of the presets.
    assert rows["perceiver_vl"]["gflops_per_pair"] < rows["single_stream"]["gflops_per_pair"] / 3
    assert on_disk["gallery"]["n_videos"] == 16 and on_disk["gallery"]["n_captions"] == 16
    report = (out / "report.md").read_text()
    assert "perceiver_vl" in report and "4 of 8 frames sampled" in report
    # The comparison comes with its paired interval over the same captions.
    d = on_disk["t2v_r1_difference"]
    diff = rows["perceiver_vl"]["t2v_r1"] - rows["single_stream"]["t2v_r1"]
    assert d["perceiver_vl_minus_single_stream"] == pytest.approx(diff)
    assert d["ci95"][0] <= diff <= d["ci95"][1] and d["n_captions"] == 16
    assert "paired 95% interval" in report
    assert on_disk["seed"] == 0 and on_disk["device"] == "cpu" and on_disk["train"]["seed"] == 0
    assert (out / "accuracy_vs_gflops.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Running again reuses the cached dataset and the finished runs instead of redoing them.
    stamp = (out / "data" / "DONE").stat().st_mtime_ns
    again = run_demo(out, steps=3, progress=False, data_overrides=dict(n_train=32, n_val=8, n_test=16))
    assert (out / "data" / "DONE").stat().st_mtime_ns == stamp
    assert [r["t2v_r1"] for r in again["rows"]] == [r["t2v_r1"] for r in results["rows"]]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [
        "data", "perceiver_vl_tiny-3steps-seed0", "single_stream_tiny-3steps-seed0"]
