"""Levels that choose latents and cross-attentions kept together (dynamic
queries composed with LayerDrop)."""
from __future__ import annotations

import helpers
import pytest
import torch
from helpers import check_median_cascade, questions

from slimvl.dynamic import Fixed, QAInputs, evaluate_qa_policy, level_logits, parse_queries
from slimvl.dynamic.policies import check_levels, parse_level

JOINT = [(2, 1), (4, 1), (8, 2)]


def qa_model():
    return helpers.qa_model(cross_attn_drop=0.5)


def test_levels_may_pair_latents_with_cross_attentions_kept():
    assert check_levels([[2, 1], (8, 2)], 8, 2) == [(2, 1), (8, 2)]
    assert parse_level("4/1") == (4, 1) and parse_level("8") == 8
    assert parse_queries("fixed:4/1", 8) == Fixed(4, 1)
    for levels, message in (([(2, 3)], r"cross-attentions kept must be in 1..2"), ([(2, 1), (2, 1)], "duplicates"),
                            ([(9, 1)], "1..num_latents=8"), ([(2, "a")], "pairs")):
        with pytest.raises(ValueError, match=message):
            check_levels(levels, 8, 2)
    with pytest.raises(ValueError, match="Q or Q/K"):
        parse_level("4/x")
    with pytest.raises(ValueError, match="fixed:Q needs"):
        parse_queries("fixed:4/0", 8)


def test_a_joint_cascade_runs_each_level_with_its_latents_and_cross_attentions():
    m, data = qa_model(), questions()
    inputs = QAInputs(data)
    every = level_logits(m, inputs, JOINT)
    with m.using_latents(4):
        m.cross_attn_keep = 1
        direct = QAInputs(data).logits(m, 256, None)
        m.cross_attn_keep = None
    torch.testing.assert_close(every[1], direct)
    out = check_median_cascade(m, inputs, JOINT, every)
    costs = out["level_gflops"]
    assert costs[0] < costs[1] < costs[2]
    assert m.cross_attn_keep is None and m.active_latents is None  # restored
    fixed = evaluate_qa_policy(m, data, "fixed:8/1")
    assert fixed["gflops_ratio"] < 1 and fixed["mean_latents"] == 8
    joint = evaluate_qa_policy(m, data, "cascade", calibration=lambda: questions(40, seed=3), levels=JOINT,
                               tolerance=0.1)
    assert joint["levels"] == JOINT and joint["gflops_all_latents"] == pytest.approx(costs[2])
    with pytest.raises(ValueError, match="last level must be num_latents=8"):
        evaluate_qa_policy(m, data, "cascade", calibration=lambda: questions(40, seed=3), levels=[(2, 1), (8, 1)],
                           tolerance=0.1)


def test_pareto_levels_keep_what_no_cheaper_level_matches_and_end_at_the_whole_model():
    from slimvl.dynamic.policies import pareto_levels

    levels = [(2, 1), (4, 1), (2, 2), (8, 1), (4, 2), (8, 2)]
    acc = [0.50, 0.60, 0.55, 0.58, 0.70, 0.65]
    cost = [1.0, 2.0, 2.5, 3.0, 3.5, 5.0]
    assert pareto_levels(levels, acc, cost) == [(2, 1), (4, 1), (4, 2), (8, 2)]
    with pytest.raises(ValueError, match="as many of each"):
        pareto_levels(levels, acc[:-1], cost)
