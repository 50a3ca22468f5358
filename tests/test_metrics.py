"""Tests for slimvl.tasks.retrieval: Recall@K, the unit VTM loss and the contrastive loss."""

import math

import numpy as np
import pytest
import torch

from slimvl.tasks import contrastive_loss, recall_metrics, unit_pairs, vtm_unit_loss


# ------------------------------------------------------------------ recall_metrics

def test_perfect_scores():
    n = 7
    s = torch.eye(n) + 0.01 * torch.rand(n, n)  # diagonal always the strict maximum
    r = recall_metrics(s, torch.arange(n))
    for d in ("t2v", "v2t"):
        for k in (1, 5, 10):
            assert r[f"{d}_r{k}"] == 1.0
        assert r[f"{d}_medr"] == 1.0


def test_known_ranks():
    # caption i describes item i.
    s = torch.tensor([
        [0.9, 0.1, 0.2, 0.3, 0.0],   # pos .9, nothing above          -> t2v rank 1
        [0.5, 0.4, 0.1, 0.0, 0.0],   # pos .4, .5 above               -> t2v rank 2
        [0.6, 0.7, 0.3, 0.2, 0.0],   # pos .3, .6 .7 above            -> t2v rank 3
        [0.0, 0.0, 0.0, 0.8, 0.0],   # pos .8                         -> t2v rank 1
        [0.1, 0.2, 0.9, 0.95, 0.5],  # pos .5, .9 .95 above           -> t2v rank 3
    ])
    # t2v ranks [1, 2, 3, 1, 3]: R@1 = 2/5, R@2 = 3/5, R@5 = 1, median 2.
    # v2t: column j, own caption's score s[j, j] ranked among the other rows of the column:
    #   col0 .9 vs (.5 .6 0 .1) -> 1; col1 .4 vs (.1 .7 0 .2) -> 2; col2 .3 vs (.2 .1 0 .9) -> 2;
    #   col3 .8 vs (.3 0 .2 .95) -> 2; col4 .5 vs (0 0 0 0) -> 1.
    # v2t ranks [1, 2, 2, 2, 1]: R@1 = 2/5, R@2 = 1, R@5 = 1, median 2.
    r = recall_metrics(s, torch.arange(5), ks=(1, 2, 5))
    assert r["t2v_r1"] == pytest.approx(2 / 5)
    assert r["t2v_r2"] == pytest.approx(3 / 5)
    assert r["t2v_r5"] == pytest.approx(1.0)
    assert r["t2v_medr"] == 2
    assert r["v2t_r1"] == pytest.approx(2 / 5)
    assert r["v2t_r2"] == pytest.approx(1.0)
    assert r["v2t_r5"] == pytest.approx(1.0)
    assert r["v2t_medr"] == 2
    assert set(r) == {"t2v_r1", "t2v_r2", "t2v_r5", "v2t_r1", "v2t_r2", "v2t_r5", "t2v_medr", "v2t_medr"}


def test_accepts_numpy():
    s = np.eye(3)
    r = recall_metrics(s, np.arange(3), ks=(1,))
    assert r["t2v_r1"] == 1.0 and r["v2t_r1"] == 1.0


def test_transposed_ranks_swap_direction():
    """With one caption per item, v2t on S equals t2v on S^T."""
    g = torch.Generator().manual_seed(0)
    s = torch.rand(9, 9, generator=g)
    a = recall_metrics(s, torch.arange(9), ks=(1, 3))
    b = recall_metrics(s.T, torch.arange(9), ks=(1, 3))
    for k in (1, 3):
        assert a[f"v2t_r{k}"] == pytest.approx(b[f"t2v_r{k}"])
        assert a[f"t2v_r{k}"] == pytest.approx(b[f"v2t_r{k}"])
    assert a["v2t_medr"] == b["t2v_medr"]


def test_several_captions_per_item_best_caption_counts():
    # captions 0,1 -> item 0; captions 2,3 -> item 1.
    s = torch.tensor([
        [0.1, 0.5],  # a poor caption of item 0
        [0.9, 0.2],  # a good caption of item 0
        [0.3, 0.8],
        [0.4, 0.7],
    ])
    r = recall_metrics(s, torch.tensor([0, 0, 1, 1]), ks=(1,))
    # t2v: caption 0 ranks item 0 second, the others first -> 3/4
    assert r["t2v_r1"] == pytest.approx(3 / 4)
    # v2t: item 0's best caption (.9) beats item 1's captions (.3, .4); item 1's best (.8) beats (.5, .2).
    assert r["v2t_r1"] == 1.0
    assert r["v2t_medr"] == 1.0


def test_other_captions_of_same_item_do_not_push_it_down():
    # Both captions of item 0 score equally high on it: the second one is not a competitor.
    s = torch.tensor([
        [0.9, 0.0],
        [0.9, 0.0],
        [0.5, 0.6],
    ])
    r = recall_metrics(s, torch.tensor([0, 0, 1]), ks=(1,))
    assert r["v2t_r1"] == 1.0
    assert r["v2t_medr"] == 1.0


def test_item_without_caption_is_skipped_in_v2t():
    s = torch.tensor([[0.9, 0.1, 0.0], [0.1, 0.9, 0.95]])
    r = recall_metrics(s, torch.tensor([0, 1]), ks=(1,))
    # item 2 has no caption: only items 0 and 1 are v2t queries, both rank 1.
    assert r["v2t_r1"] == 1.0
    # caption 1 prefers item 2 -> t2v rank 2
    assert r["t2v_r1"] == pytest.approx(1 / 2)


def test_constant_scores_count_ties_against():
    n = 6
    r = recall_metrics(torch.zeros(n, n), torch.arange(n), ks=(1, 5))
    assert r["t2v_r1"] == 0.0 and r["v2t_r1"] == 0.0
    # every query ties with all n candidates -> rank n
    assert r["t2v_medr"] == n and r["v2t_medr"] == n
    assert r["t2v_r5"] == 0.0


def test_caption_item_shape_checked():
    with pytest.raises(ValueError, match="caption_item"):
        recall_metrics(torch.zeros(4, 4), torch.arange(3))


# ------------------------------------------------------------------ unit pairs / VTM loss

@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_unit_pairs_cover_each_pair_once(k):
    caps, vids = unit_pairs(k)
    assert caps.shape == vids.shape == (2 * k * k + 2 * k,)
    pairs = list(zip(caps.tolist(), vids.tolist()))
    within = [(c, v) for c, v in pairs if c // k == v // k]
    cross = [(c, v) for c, v in pairs if c // k != v // k]
    expected_within = {(g * k + i, g * k + j) for g in (0, 1) for i in range(k) for j in range(k)}
    assert len(within) == len(set(within)) == 2 * k * k
    assert set(within) == expected_within
    assert len(cross) == 2 * k
    # each caption meets the video in its slot of the other group, once
    assert sorted(cross) == sorted((i, (i + k) % (2 * k)) for i in range(2 * k))
    # the order vtm_unit_loss relies on: within pairs first, then the cross pairs
    assert pairs[: 2 * k * k] == sorted(expected_within)


def _positive_mask(k):
    caps, vids = unit_pairs(k)
    return caps == vids


@pytest.mark.parametrize("k", [2, 4])
def test_vtm_unit_loss_limits(k):
    pos = _positive_mask(k)
    assert int(pos.sum()) == 2 * k
    confident = torch.where(pos, 50.0, -50.0).expand(3, -1)
    assert vtm_unit_loss(confident, k).item() == pytest.approx(0.0, abs=1e-6)
    flat = torch.full((3, pos.numel()), 0.7)
    # each softmax has k + 1 candidates (k in-group videos/captions + 1 cross negative)
    assert vtm_unit_loss(flat, k).item() == pytest.approx(math.log(k + 1), rel=1e-6)
    wrong = torch.where(pos, -50.0, 50.0).expand(3, -1)
    assert vtm_unit_loss(wrong, k).item() > 50


def test_vtm_unit_loss_gradient_signs():
    k = 3
    pos = _positive_mask(k)
    logits = (0.1 * torch.randn(2, pos.numel(), generator=torch.Generator().manual_seed(0))).requires_grad_()
    vtm_unit_loss(logits, k).backward()
    g = logits.grad
    assert (g[:, ~pos] > 0).all()  # raising a negative raises the loss
    assert (g[:, pos] < 0).all()  # raising a positive lowers it


def test_vtm_unit_loss_cross_negative_matters():
    """The cross pairs are candidates too: raising one raises the loss."""
    k = 2
    base = torch.zeros(1, 2 * k * k + 2 * k)
    raised = base.clone()
    raised[0, 2 * k * k] = 5.0
    assert vtm_unit_loss(raised, k) > vtm_unit_loss(base, k)


# ------------------------------------------------------------------ contrastive

def test_contrastive_loss_matched_lower_than_shuffled():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(2, 8, 16, generator=g)
    t = v + 0.05 * torch.randn(2, 8, 16, generator=g)
    scale = torch.tensor(math.log(1 / 0.07))
    matched = contrastive_loss(v, t, scale)
    shuffled = contrastive_loss(v, t[:, torch.roll(torch.arange(8), 1)], scale)
    assert matched < shuffled
    assert matched < math.log(8) < shuffled


def test_contrastive_loss_uniform_is_log_n():
    n = 5
    v = torch.ones(1, n, 4)
    t = torch.ones(1, n, 4)
    assert contrastive_loss(v, t, torch.tensor(0.0)).item() == pytest.approx(math.log(n), rel=1e-6)


def test_contrastive_loss_within_units_only():
    """Rows of different units never compete: the loss is the mean of per-unit losses."""
    g = torch.Generator().manual_seed(1)
    v = torch.randn(3, 4, 8, generator=g)
    t = torch.randn(3, 4, 8, generator=g)
    scale = torch.tensor(1.0)
    whole = contrastive_loss(v, t, scale)
    parts = torch.stack([contrastive_loss(v[i:i + 1], t[i:i + 1], scale) for i in range(3)]).mean()
    torch.testing.assert_close(whole, parts)
