"""Dynamic query selection: confidences, cascades, calibration and
per-sample latent counts."""
from __future__ import annotations

import math

import pytest
import torch
from helpers import qa_model, questions

from slimvl import create_model
from slimvl.dynamic import (Cascade, Fixed, by_level, calibrate, cascade_exits, classifier_levels, confidence,
                            default_levels, run_classifier)
from slimvl.dynamic.calibrate import cascade_outcome
from slimvl.dynamic.policies import check_levels
from slimvl.tasks import ClassData

LEVELS = [2, 4, 8]


def classifier(**kw):
    torch.manual_seed(0)
    kw = {"num_classes": 3, "multi_label": False, **kw}
    return create_model("perceiver_cls_tiny", dim=32, heads=2, image_size=32, num_latents=8, layers="cscs",
                        nested_latents=LEVELS, **kw).eval()


def clips(n: int = 24, multi_label: bool = False) -> ClassData:
    g = torch.Generator().manual_seed(1)
    videos = torch.randint(0, 256, (n, 2, 3, 32, 32), generator=g, dtype=torch.uint8)
    if multi_label:
        return ClassData(videos, (torch.rand(n, 6, generator=g) > 0.5).float(), [str(i) for i in range(6)], "shapes")
    return ClassData(videos, torch.arange(n) % 3, ["1", "2", "3"], "count")


def midpoint(values: torch.Tensor) -> float:
    """A threshold halfway between two neighbouring distinct values near the
    median: no input sits on it, so rounding cannot move an input across."""
    v = torch.unique(values)
    i = len(v) // 2
    return float((v[i - 1] + v[i]) / 2)


def test_confidences():
    logits = torch.tensor([[2.0, 0.0, 0.0], [1.0, 1.0, -8.0]])
    p = torch.softmax(logits, -1)
    assert torch.allclose(confidence(logits), p.max(-1).values)
    assert torch.allclose(confidence(logits, "margin"), torch.tensor([p[0, 0] - p[0, 1], 0.0]), atol=1e-6)
    # multi-label: the least sure label; 0 on a decision boundary
    assert confidence(torch.tensor([[10.0, -10.0], [10.0, 0.0]]), multi_label=True).tolist() == \
        pytest.approx([1.0, 0.0], abs=1e-4)
    with pytest.raises(ValueError, match="confidence 'entropy'"):
        confidence(logits, "entropy")


def test_cascade_exits_follow_the_thresholds():
    conf = torch.tensor([[0.9, 0.2, 0.5, 0.1],
                         [0.1, 0.8, 0.5, 0.1],
                         [0.0, 0.0, 0.0, 0.0]])
    assert cascade_exits(conf, [0.5, 0.6]).tolist() == [0, 1, 0, 2]
    assert cascade_exits(conf, [1.5, 1.5]).tolist() == [2, 2, 2, 2]


@pytest.mark.parametrize("multi_label", [False, True])
def test_a_cascade_stops_exactly_where_its_thresholds_say(multi_label):
    m = classifier(num_classes=6 if multi_label else 3, multi_label=multi_label)
    data = clips(multi_label=multi_label)
    every = classifier_levels(m, data, LEVELS)  # [L, n, C]
    conf = torch.stack([confidence(x, "margin", multi_label) for x in every])
    thresholds = [midpoint(conf[0]), midpoint(conf[1])]  # about half stop at each level
    want = cascade_exits(conf, thresholds)
    assert 0 < (want == 0).sum() < len(want)  # a real cascade: some stop early, some go on
    out = run_classifier(m, data, Cascade(LEVELS, thresholds, "margin"))
    assert torch.equal(out["level"], want)
    torch.testing.assert_close(out["logits"], every[want, torch.arange(data.n)], rtol=1e-5, atol=1e-5)
    small = run_classifier(m, data, Cascade(LEVELS, thresholds, "margin"), batch_size=5)  # batches of 5 clips
    assert torch.equal(small["level"], want)
    torch.testing.assert_close(small["logits"], out["logits"], rtol=1e-5, atol=1e-5)
    costs = out["level_gflops"]
    assert costs[0] < costs[1] < costs[2]
    for k, q in enumerate(LEVELS):  # a level alone is the model's whole forward at that count
        with m.using_latents(q):
            assert costs[k] == pytest.approx(m.analytic_flops(data.videos.shape[1]) / 1e9, rel=1e-6)
    # The input array and its keys and values are made once per clip, however
    # many levels it goes through; each level pays only what its latents do.
    c = out["costs"]
    paid = [c.shared + c.kv * len(c.keeps[0]) + sum(c.levels[: k + 1]) for k in range(3)]
    assert c.shared > 0 and c.kv > 0 and paid[0] == pytest.approx(costs[0]) and paid[2] < sum(costs)
    assert out["gflops_per_input"] == pytest.approx(sum(paid[k] for k in want.tolist()) / data.n)
    assert out["latents"].tolist() == [LEVELS[k] for k in want.tolist()]


def test_a_fixed_policy_is_the_model_at_that_count():
    m, data = classifier(num_classes=3), clips()
    out = run_classifier(m, data, Fixed(4))
    with torch.no_grad(), m.using_latents(4):
        direct = m(data.videos.float() / 127.5 - 1)
    torch.testing.assert_close(out["logits"], direct, rtol=1e-5, atol=1e-5)
    assert out["latents"].tolist() == [4] * data.n and out["gflops_per_input"] == pytest.approx(out["level_gflops"][0])


def test_inputs_grouped_by_count_equal_inputs_run_one_by_one():
    m = classifier(num_classes=3)
    video = torch.randn(6, 2, 3, 32, 32)
    q = torch.tensor([8, 2, 4, 2, 8, 2])
    with torch.no_grad():
        grouped = by_level(m, {"video": video}, q, lambda model, x: model(x))
        for i in range(6):
            with m.using_latents(int(q[i])):
                torch.testing.assert_close(grouped[i], m(video[i:i + 1])[0], rtol=1e-5, atol=1e-5)


def _calibration_set(n: int = 400, seed: int = 0):
    """Three levels; confident predictions are right more often, later levels are better."""
    g = torch.Generator().manual_seed(seed)
    conf = torch.rand(3, n, generator=g)
    skill = torch.tensor([0.55, 0.7, 0.85])[:, None]
    correct = torch.rand(3, n, generator=g) < (skill + 0.4 * (conf - 0.5)).clamp(0, 1)
    return conf, correct, [1.0, 2.0, 4.0]


@pytest.mark.parametrize("tolerance", [0.01, 0.05, 0.2])
def test_calibration_meets_its_tolerance_on_the_calibration_split(tolerance):
    conf, correct, costs = _calibration_set()
    thresholds, report = calibrate(conf, correct, costs, tolerance=tolerance)
    out = cascade_outcome(conf, correct, costs, thresholds)
    assert out == {k: report[k] for k in out}
    assert out["accuracy"] >= report["reference_accuracy"] - tolerance - 1e-9
    assert report["reference_accuracy"] == correct[-1].double().mean().item()
    if tolerance == 0.2:  # a loose tolerance buys savings: most inputs stop before the last level
        assert out["cost"] < sum(costs) and out["exit_fractions"][2] < 0.5


def test_calibration_to_a_budget_stays_within_it_and_spends_it_well():
    conf, correct, costs = _calibration_set()
    for budget in (1.0, 2.5, 7.0):
        thresholds, report = calibrate(conf, correct, costs, budget=budget)
        assert report["cost"] <= budget + 1e-9
    # The whole budget of every level: as accurate as the last level alone or better.
    assert report["accuracy"] >= correct[-1].double().mean().item() - 1e-9
    cheapest = calibrate(conf, correct, costs, budget=1.0)[1]
    assert cheapest["exit_fractions"][0] == 1.0


@pytest.mark.parametrize("kwargs, message", [
    (dict(tolerance=0.0), r"tolerance=0.0: must be in \(0, 1\)"),
    (dict(tolerance=1.0), "tolerance=1.0"),
    (dict(budget=0.5), r"budget=0.5: below the cheapest level's cost 1 per input"),
    (dict(), "exactly one of tolerance= and budget="),
    (dict(tolerance=0.01, budget=3.0), "exactly one of"),
])
def test_bad_calibration_options_are_refused(kwargs, message):
    conf, correct, costs = _calibration_set()
    with pytest.raises(ValueError, match=message):
        calibrate(conf, correct, costs, **kwargs)


def test_an_empty_or_one_class_calibration_split_is_refused():
    conf, correct, costs = _calibration_set()
    with pytest.raises(ValueError, match="calibration split is empty"):
        calibrate(conf[:, :0], correct[:, :0], costs, tolerance=0.01)
    with pytest.raises(ValueError, match="has one class only"):
        calibrate(conf, correct, costs, tolerance=0.01, labels=torch.zeros(conf.shape[1]))


def test_a_level_no_input_can_stop_at_is_skipped_and_not_paid_for():
    m, data = classifier(num_classes=3), clips()
    last = run_classifier(m, data, Fixed(8))
    out = run_classifier(m, data, Cascade(LEVELS, [1.5, 1.5]))  # thresholds above every confidence
    assert out["gflops_per_input"] == pytest.approx(last["gflops_per_input"])  # the last level alone
    torch.testing.assert_close(out["logits"], last["logits"])
    conf, correct, costs = _calibration_set()
    assert cascade_outcome(conf, correct, costs, [1.5, 0.5])["cost"] <= costs[1] + costs[2]  # level 0 not paid
    # A constraint only the last level meets: calibration costs what the last level costs, no more.
    flat = torch.full_like(conf, 0.5)
    thresholds, report = calibrate(flat, correct, costs, tolerance=0.01)
    assert report["cost"] == pytest.approx(costs[-1]) and report["accuracy"] == report["reference_accuracy"]


def test_calibration_works_on_tensors_from_any_device_and_tiny_splits():
    conf, correct, costs = _calibration_set(n=1)
    thresholds, report = calibrate(conf, correct, costs, budget=1.0)
    assert report["cost"] == 1.0 and len(thresholds) == 2
    assert calibrate(conf[-1:], correct[-1:], costs[-1:], tolerance=0.1)[0] == []  # one level: nothing to choose
    if torch.cuda.is_available():
        conf, correct, costs = _calibration_set()
        assert calibrate(conf.cuda(), correct.cuda(), costs, tolerance=0.05)[1] == \
            calibrate(conf, correct, costs, tolerance=0.05)[1]


def test_levels_and_policies_are_checked():
    assert default_levels(16) == [2, 4, 8, 16] and default_levels(4) == [1, 2, 4]
    assert default_levels(16, [4, 16]) == [4, 16] and default_levels(16, [2, 4]) == [2, 4, 16]
    with pytest.raises(ValueError, match=r"levels=\[4, 32\]: every count must be in 1..num_latents=16"):
        check_levels([4, 32], 16)
    with pytest.raises(ValueError, match="ascending without duplicates"):
        check_levels([8, 4, 4], 16)
    with pytest.raises(ValueError, match="non-empty"):
        check_levels([], 16)
    with pytest.raises(ValueError, match="Fixed"):
        Fixed(0)
    with pytest.raises(ValueError, match="expected 2"):
        Cascade([2, 4, 8], [0.5])
    with pytest.raises(ValueError, match="must be numbers"):
        Cascade([2, 4], [math.nan])
    with pytest.raises(ValueError, match=r"levels=\[2, 16\]: every count must be in 1..num_latents=8"):
        run_classifier(classifier(num_classes=3), clips(), Cascade([2, 16], [0.5]))


def test_cli_evaluates_a_classifier_under_fixed_and_calibrated_policies(tmp_path, capsys):
    import json

    from slimvl.cli import main
    from slimvl.data import make_dataset

    root = make_dataset(tmp_path / "d", n_train=16, n_val=16, n_test=8, frames=2, size=32, progress=False)
    common = ["--data", str(root), "--frames", "2", "--task", "classify_count"]
    main(["-q", "train", *common, "--model", "perceiver_cls_tiny", "--set", "dim=32", "--set", "heads=2", "--set",
          "image_size=32", "--set", "num_latents=8", "--set", "nested_latents=[2,4,8]", "--steps", "3",
          "--train-set", "batch_size=4", "--train-set", "warmup_steps=1", "--out", str(tmp_path / "run")])
    capsys.readouterr()
    ev = ["-q", "eval", *common, "--checkpoint", str(tmp_path / "run")]
    main([*ev, "--queries", "fixed:2"])
    fixed = json.loads(capsys.readouterr().out)
    assert fixed["mean_latents"] == 2 and fixed["gflops_ratio"] < 0.6 and fixed["n_clips"] == 8
    main([*ev, "--queries", "cascade", "--tolerance", "0.05", "--confidence", "margin"])
    cascade = json.loads(capsys.readouterr().out)
    calib = cascade["calibration"]
    assert cascade["levels"] == [2, 4, 8] and len(cascade["thresholds"]) == 2 and calib["inputs"] == 16
    assert calib["accuracy"] >= calib["reference_accuracy"] - 0.05 - 1e-9
    assert sum(cascade["exit_fractions"]) == pytest.approx(1.0)
    lo, hi = cascade["accuracy_drop_ci95"]
    assert lo <= cascade["accuracy_drop"] <= hi
    main([*ev, "--queries", "cascade", "--tolerance", "0.05", "--guard"])
    assert json.loads(capsys.readouterr().out)["calibration"]["drop_upper95"] <= 0.05 + 1e-9
    main([*ev, "--queries", "learned", "--budget-gflops", str(fixed["gflops_all_latents"] * 1.5)])
    learned = json.loads(capsys.readouterr().out)
    calib = learned["calibration"]
    assert learned["levels"] == [2, 4, 8] and calib["head_inputs"] == 8 and calib["inputs"] == 8
    assert calib["cost"] <= fixed["gflops_all_latents"] * 1.5 + 1e-12 and learned["probe_gflops"] > 0
    for argv, message in ((["--queries", "fixed:9"], "fixed:Q needs a latent count Q in 1..8"),
                          (["--queries", "learned", "--tolerance", "0.1", "--confidence", "margin"],
                           "--confidence: only with --queries cascade"),
                          (["--queries", "learned"], "--queries learned: give one of --tolerance"),
                          (["--queries", "fixed:2", "--guard"], "--guard: only with --queries cascade or learned"),
                          (["--tolerance", "0.01"], "--tolerance: only with --queries cascade"),
                          (["--queries", "fixed:2", "--levels", "2", "8"], "--levels: only with --queries cascade"),
                          (["--queries", "cascade"], "give one of --tolerance (an accuracy drop) or --budget-gflops"),
                          (["--queries", "cascade", "--tolerance", "0.1", "--levels", "2", "4"],
                           "a calibrated policy's last level must be num_latents=8"),
                          (["--queries", "cascade", "--tolerance", "0.1", "--calib-split", "test"],
                           "calibrated on another split than the one evaluated")):
        with pytest.raises(SystemExit) as e:
            main([*ev, *argv])
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_qa_under_a_cascade_stops_where_its_thresholds_say():
    from slimvl.dynamic import QAInputs, evaluate_qa_policy, level_logits, run_policy

    m, n = qa_model(), 20
    data = questions(n)
    inputs = QAInputs(data)
    every = level_logits(m, inputs, LEVELS)
    conf = torch.stack([confidence(x, "margin") for x in every])
    thresholds = [midpoint(conf[0]), midpoint(conf[1])]
    out = run_policy(m, inputs, Cascade(LEVELS, thresholds, "margin"))
    want = cascade_exits(conf, thresholds)
    assert torch.equal(out["level"], want) and 0 < (want == 0).sum() < n
    torch.testing.assert_close(out["logits"], every[want, torch.arange(n)], rtol=1e-5, atol=1e-5)
    costs = out["level_gflops"]  # counted by torch's counter: they grow with the latent count
    assert costs[0] < costs[1] < costs[2]
    report = evaluate_qa_policy(m, data, "fixed:4")
    assert report["mean_latents"] == 4 and report["n_questions"] == n and report["gflops_ratio"] < 1


def test_costs_are_counted_in_eval_mode_whatever_mode_the_model_is_in():
    from slimvl.dynamic import QAInputs
    from slimvl.dynamic.run import level_costs
    from slimvl.tasks import QAData

    torch.manual_seed(0)
    m = create_model("perceiver_vl_tiny", dim=32, heads=2, image_size=32, num_latents=8, layers="cscscs",
                     cross_attn_drop=0.9, vocab_size=50, max_text_len=12, num_answers=4)
    n = 4
    data = QAData(torch.zeros(2, 2, 3, 32, 32, dtype=torch.uint8), torch.full((n, 6), 7),
                  torch.ones(n, 6, dtype=torch.bool), torch.arange(n) % 2, torch.arange(n) % 4, ["a", "b", "c", "d"],
                  ["a"] * n, ["colour"] * n)
    m.eval()
    want = level_costs(m, QAInputs(data), [2, 8])
    m.train()  # LayerDrop would skip cross-attentions at random here
    assert [level_costs(m, QAInputs(data), [2, 8]) for _ in range(3)] == [want] * 3 and m.training


def test_a_guarded_calibration_holds_the_drops_upper_bound_to_the_tolerance():
    conf, correct, costs = _calibration_set()
    plain, report = calibrate(conf, correct, costs, tolerance=0.05)
    guarded, safe = calibrate(conf, correct, costs, tolerance=0.05, guard=True)
    assert safe["drop_upper95"] <= 0.05 + 1e-9 < report["drop_upper95"]  # the plain one sits at the edge
    assert safe["cost"] >= report["cost"] and safe["accuracy"] >= report["accuracy"]
    out = cascade_outcome(conf, correct, costs, guarded)
    assert out == {k: safe[k] for k in out}
