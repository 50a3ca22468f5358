"""The learned latent policy: a head on cheap probe features picks each
input's latent count before it runs."""
from __future__ import annotations

import pytest
import torch
from helpers import check_median_cascade, qa_model, questions

from slimvl.dynamic import ClassInputs, Learned, LevelPredictor, fit_learned, run_policy
from slimvl.dynamic.calibrate import calibrate, cascade_outcome
from slimvl.dynamic.learned import fit_predictor, probabilities
from slimvl.dynamic.policies import cascade_exits
from slimvl.dynamic.run import level_logits, probe_features

from test_dynamic import LEVELS, _calibration_set, classifier, clips


def test_the_probe_reads_only_the_fewest_latents_and_one_cross_attention():
    m = classifier()
    video = torch.randn(3, 2, 3, 32, 32)
    with torch.no_grad(), m.using_latents(2):
        before = m.probe(video)
        m.encoder.latents.data[2:] += 1.0  # latents the probe must not touch
        second = [i for i, kind in enumerate(m.encoder.pattern) if kind == "c"][1]
        m.encoder.layers[second].mlp[0].weight.data += 1.0  # nor the second cross-attention
        after = m.probe(video)
        full = m(video)
    assert before.shape == (3, m.config.dim) and torch.equal(before, after)
    assert torch.isfinite(full).all()
    from slimvl.dynamic.costs import cost_model

    c = cost_model(m, ClassInputs(clips()), [2, 8], probe_level=2)
    # The probe shares the input array and the first cross-attention's keys
    # and values with the level that runs next: it pays only its latents' part.
    assert 0 < c.probe < c.levels[0] and c.probe_keep == (0,)
    assert c.paid([0.5], cumulative=False).tolist() == pytest.approx([c.alone(0) + c.probe, c.alone(1) + c.probe])


def test_the_head_learns_which_level_is_right():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(400, 6, generator=g)
    correct = torch.stack([features[:, 0] > 0, features[:, 0] > -1, torch.ones(400, dtype=torch.bool)])
    head = fit_predictor(features[:200], correct[:, :200])
    p = probabilities(head, features[200:])  # [L, n]
    assert p.shape == (3, 200)
    assert ((p[0] > 0.5) == correct[0, 200:]).double().mean() > 0.85
    # the seed fixes the head and leaves torch's global generator alone
    state = torch.get_rng_state()
    again = fit_predictor(features[:200], correct[:, :200])
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(probabilities(again, features[200:]), p)


@pytest.mark.parametrize("tolerance", [0.01, 0.1])
def test_calibration_of_a_policy_that_picks_up_front_pays_one_level_and_the_probe(tolerance):
    conf, correct, costs = _calibration_set()
    thresholds, report = calibrate(conf, correct, costs, tolerance=tolerance, cumulative=False, overhead=0.5)
    out = cascade_outcome(conf, correct, costs, thresholds, cumulative=False, overhead=0.5)
    assert out == {k: report[k] for k in out}
    assert out["accuracy"] >= report["reference_accuracy"] - tolerance - 1e-9
    exits = cascade_exits(conf, thresholds)
    assert out["cost"] == pytest.approx((torch.tensor(costs, dtype=torch.float64)[exits] + 0.5).mean().item())
    with pytest.raises(ValueError, match=r"below the cheapest level's cost 1.5"):
        calibrate(conf, correct, costs, budget=1.2, cumulative=False, overhead=0.5)


def test_a_learned_policy_runs_each_input_once_at_the_level_its_head_chose():
    m = classifier()
    policy, report = fit_learned(m, ClassInputs(clips(40)), LEVELS, tolerance=0.2)
    assert report["head_inputs"] == 20 and report["inputs"] == 20
    assert report["accuracy"] >= report["reference_accuracy"] - 0.2 - 1e-9
    data = ClassInputs(clips(24))
    # Thresholds that split the inputs across levels, so that grouping is exercised.
    features = probe_features(m, data, LEVELS[0])
    p = policy.probabilities(features)
    mid = [float(p[k].median()) for k in range(2)]
    split = Learned(LEVELS, policy.head, mid)
    want = split.choose(features)
    assert len(torch.unique(want)) >= 2
    out = run_policy(m, data, split)
    every = level_logits(m, data, LEVELS)
    assert torch.equal(out["level"], want)
    torch.testing.assert_close(out["logits"], every[want, torch.arange(data.n)], rtol=1e-5, atol=1e-5)
    paid = out["costs"].paid([], cumulative=False)
    assert out["gflops_per_input"] == pytest.approx(paid[want].mean().item())
    assert out["probe_gflops"] == out["costs"].probe > 0


def test_bad_learned_policies_are_refused():
    m = classifier()
    with pytest.raises(ValueError, match="a learned policy needs at least 16"):
        fit_learned(m, ClassInputs(clips(10)), LEVELS, tolerance=0.1)
    with pytest.raises(ValueError, match="3 outputs for 2 levels"):
        Learned([2, 8], LevelPredictor(32, 3), [0.5])
    with pytest.raises(ValueError, match="expected 2"):
        Learned(LEVELS, LevelPredictor(32, 3), [0.5])


def _vtm_model(**kw):
    from helpers import tiny_model

    return tiny_model(num_latents=8, layers="cscs", nested_latents=LEVELS, **kw).eval()


def test_candidate_lists_put_the_own_item_and_its_near_duplicates_first():
    from helpers import tiny_data

    from slimvl.dynamic import candidate_lists

    data = tiny_data(n_groups=6, group_size=3)
    cands = candidate_lists(data, 5)
    assert cands.shape == (len(data.caption_item), 5)
    for c, item in enumerate(data.caption_item.tolist()):
        group = next(g for g in data.groups if item in g)
        row = cands[c].tolist()
        assert row[0] == item and set(row[:3]) == set(group) and len(set(row)) == 5
    with pytest.raises(ValueError, match="candidates=1: expected 2..18"):
        candidate_lists(data, 1)


def test_vtm_cascade_confidence_is_per_caption_over_its_candidates():
    from helpers import tiny_data

    from slimvl.dynamic import Cascade, VTMInputs, candidate_lists, evaluate_retrieval_policy

    m, data = _vtm_model(), tiny_data(n_groups=5, group_size=2)
    inputs = VTMInputs(data, candidate_lists(data, 4))
    every = level_logits(m, inputs, LEVELS)  # [L, captions, candidates]
    assert every.shape == (3, len(data.caption_item), 4)
    with torch.no_grad(), m.using_latents(4):  # one caption's scores are the model's on its pairs
        c = 3
        items = inputs.candidates[c]
        direct = m(data.videos[items].float() / 127.5 - 1, data.caption_ids[c].expand(4, -1),
                   data.caption_mask[c].expand(4, -1)).logits
    torch.testing.assert_close(every[1, c], direct, rtol=1e-4, atol=1e-4)
    check_median_cascade(m, inputs, LEVELS, every)
    report = evaluate_retrieval_policy(m, data, "learned", calibration=lambda: tiny_data(n_groups=8, seed=1),
                                       candidates=4, tolerance=0.2)
    assert report["n_captions"] == len(data.caption_item) and report["candidates"] == 4
    assert report["calibration"]["head_inputs"] == 16 and 0 <= report["t2v_r1"] <= 1
    with pytest.raises(ValueError, match="single-stream Perceiver-VL"):
        run_policy(_vtm_model(stream="multi", decoder_layers=0), inputs, Cascade(LEVELS, [0.5, 0.5]))
    with pytest.raises(ValueError, match="own item must be among its candidates"):
        VTMInputs(data, torch.zeros(len(data.caption_item), 3, dtype=torch.long) + 9)


def test_a_learned_policy_answers_questions():
    from slimvl.dynamic import QAInputs

    m, n = qa_model(), 24
    data = questions(n, n_videos=6)
    policy, report = fit_learned(m, QAInputs(data), LEVELS, tolerance=0.3)
    out = run_policy(m, QAInputs(data), policy)
    assert out["logits"].shape == (n, 4) and out["probe_gflops"] < out["level_gflops"][0]


def test_cli_evaluates_retrieval_under_a_cascade(tmp_path, capsys):
    import json

    from slimvl.cli import main
    from slimvl.data import make_dataset

    root = make_dataset(tmp_path / "d", n_train=16, n_val=16, n_test=8, frames=2, size=32, progress=False)
    common = ["--data", str(root), "--frames", "2"]
    main(["-q", "train", *common, "--model", "perceiver_vl_tiny", "--set", "dim=32", "--set", "heads=2", "--set",
          "image_size=32", "--set", "num_latents=8", "--set", "nested_latents=[2,4,8]", "--set", "nested_distill=0.5",
          "--steps", "2", "--train-set", "groups_per_step=4", "--train-set", "warmup_steps=1", "--out",
          str(tmp_path / "run")])
    capsys.readouterr()
    main(["-q", "eval", *common, "--checkpoint", str(tmp_path / "run"), "--queries", "cascade", "--tolerance", "0.2"])
    out = json.loads(capsys.readouterr().out)
    assert out["levels"] == [2, 4, 8] and out["n_captions"] > 0 and out["candidates"] == 8
    assert 0 <= out["accuracy"] <= 1 and sum(out["exit_fractions"]) == pytest.approx(1)
