"""Tests for slimvl.tasks.retrieval: Recall@K, the group VTM loss and the contrastive loss."""

import math

import numpy as np
import pytest
import torch

from slimvl.tasks import (contrastive_loss, gumbel_noise, mined_negatives, pair_layout, random_negatives,
                          recall_metrics, vtm_group_loss)


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


# ------------------------------------------------------------------ pair layout / VTM loss

def _random_layout(u=2, g=3, k=4, e=2, seed=0):
    return pair_layout(k, random_negatives(np.random.default_rng(seed), u, g, k, e))


def _mined_layout(u=2, g=3, k=4, e=2, sim=None, seed=0):
    p = g * k
    sim = torch.zeros(u, p, p) if sim is None else sim
    noise = gumbel_noise(np.random.default_rng(seed), (u, 2, p, p))
    return pair_layout(k, *mined_negatives(sim, k, e, noise))


def _check_layout(lay, g, k, e):
    u, p = lay.caption.shape[0], g * k
    for unit in range(u):
        pairs = list(zip(lay.caption[unit].tolist(), lay.video[unit].tolist()))
        # every caption meets every video of its own group, first, in [caption, video slot] order
        assert pairs[: p * k] == [(c, (c // k) * k + j) for c in range(p) for j in range(k)]
        for q in range(p):
            t2v = [pairs[col] for col in lay.t2v[unit, q].tolist()]
            v2t = [pairs[col] for col in lay.v2t[unit, q].tolist()]
            assert len(t2v) == len(v2t) == k + e
            # the candidates: the query's group first, positive at the query's slot, then other groups
            assert all(c == q for c, _ in t2v) and all(v == q for _, v in v2t)
            assert [v for _, v in t2v[:k]] == [(q // k) * k + j for j in range(k)]
            assert [c for c, _ in v2t[:k]] == [(q // k) * k + j for j in range(k)]
            assert t2v[q % k] == (q, q) and v2t[q % k] == (q, q)
            assert all(v // k != q // k for _, v in t2v[k:]) and all(c // k != q // k for c, _ in v2t[k:])
            assert len(set(t2v)) == len(t2v) and len(set(v2t)) == len(v2t)


@pytest.mark.parametrize("g,k,e", [(2, 1, 1), (2, 4, 1), (4, 4, 3), (3, 2, 0)])
def test_random_negatives_are_shared_by_both_directions(g, k, e):
    lay = _random_layout(2, g, k, e)
    p = g * k
    # one scored pair per caption and negative: no separate video->text pairs
    assert lay.caption.shape == (2, p * k + p * e)
    _check_layout(lay, g, k, e)
    # every video is the negative of exactly e captions
    negs = lay.video[:, p * k:]
    assert (torch.stack([torch.bincount(n, minlength=p) for n in negs]) == e).all()


@pytest.mark.parametrize("g,k,e", [(2, 4, 1), (3, 4, 2), (4, 2, 3)])
def test_mined_layout(g, k, e):
    lay = _mined_layout(2, g, k, e)
    p = g * k
    assert lay.caption.shape == (2, p * k + 2 * p * e)
    _check_layout(lay, g, k, e)


def test_random_negatives_vary_with_the_rng():
    draws = {tuple(random_negatives(np.random.default_rng(s), 1, 4, 2, 1).flatten().tolist()) for s in range(6)}
    assert len(draws) > 1


def test_mined_negatives_pick_the_most_similar_other_group_item():
    g, k = 3, 2
    p = g * k
    sim = torch.zeros(1, p, p)
    sim[0, 0, 5] = 50.0  # caption 0 looks like video 5 (group 2)
    sim[0, 3, 0] = 50.0  # video 0 looks like caption 3 (group 1)
    sim[0, 1, 1] = 80.0  # a same-group similarity must never be picked
    t2v, v2t = mined_negatives(sim, k, 1, gumbel_noise(np.random.default_rng(0), (1, 2, p, p)))
    assert t2v[0, 0, 0] == 5 and v2t[0, 0, 0] == 3
    assert t2v[0, 1, 0] // k != 0


def test_too_many_negatives_refused():
    with pytest.raises(ValueError, match="n_neg"):
        _mined_layout(1, 2, 4, 5)
    with pytest.raises(ValueError, match="n_neg"):
        random_negatives(np.random.default_rng(0), 1, 2, 4, 2)


def _positive_mask(lay):
    return (lay.caption == lay.video)[:1]


@pytest.mark.parametrize("make", [_random_layout, _mined_layout])
def test_vtm_group_loss_limits(make):
    k, e = 4, 2
    lay = make(1, 3, k, e)
    pos = _positive_mask(lay)
    assert int(pos.sum()) == 3 * k
    confident = torch.where(pos, 50.0, -50.0)
    assert vtm_group_loss(confident, lay).item() == pytest.approx(0.0, abs=1e-6)
    flat = torch.full(pos.shape, 0.7)
    # each softmax has k + e candidates (k in-group items + e other-group negatives)
    assert vtm_group_loss(flat, lay).item() == pytest.approx(math.log(k + e), rel=1e-6)
    wrong = torch.where(pos, -50.0, 50.0)
    assert vtm_group_loss(wrong, lay).item() > 50


@pytest.mark.parametrize("make", [_random_layout, _mined_layout])
def test_vtm_group_loss_gradient_signs(make):
    lay = make(1, 2, 3, 1)
    pos = _positive_mask(lay)
    logits = (0.1 * torch.randn(pos.shape, generator=torch.Generator().manual_seed(0))).requires_grad_()
    vtm_group_loss(logits, lay).backward()
    g = logits.grad
    assert (g[~pos] > 0).all()  # raising a negative raises the loss (every pair is some query's candidate)
    assert (g[pos] < 0).all()  # raising a positive lowers it


def test_vtm_group_loss_shared_negative_counts_in_both_directions():
    """Raising one shared other-group pair raises both its caption's and its video's loss."""
    k = 2
    lay = _random_layout(1, 2, k, 1)
    p = 2 * k
    col = p * k  # caption 0's negative pair
    cap, vid = int(lay.caption[0, col]), int(lay.video[0, col])
    assert col in lay.t2v[0, cap].tolist() and col in lay.v2t[0, vid].tolist()
    base = torch.zeros(1, lay.caption.shape[1])
    raised = base.clone()
    raised[0, col] = 5.0
    assert vtm_group_loss(raised, lay) > vtm_group_loss(base, lay)


def test_vtm_group_loss_checks_shape():
    with pytest.raises(ValueError, match="logits"):
        vtm_group_loss(torch.zeros(1, 7), _random_layout(1, 2, 2, 1))


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


def test_layout_of_a_subset_of_queries():
    """Only the first Q items are scored; their negatives may come from any other group of the unit."""
    g, k, e, q = 4, 2, 1, 4
    p = g * k
    sim = torch.zeros(1, p, p)
    sim[0, 0, 7] = 50.0  # caption 0 looks like video 7, which is not a query
    t2v, v2t = mined_negatives(sim, k, e, gumbel_noise(np.random.default_rng(0), (1, 2, p, p)))
    lay = pair_layout(k, t2v[:, :q], v2t[:, :q])
    assert lay.t2v.shape == (1, q, k + e) and lay.caption.shape == (1, q * k + 2 * q * e)
    assert int(lay.caption.max()) < p and int(lay.video.max()) < p
    assert lay.video[0, q * k] == 7
    _check_layout(lay, q // k, k, e)


def test_t2v_hits_and_paired_difference():
    from slimvl.bench.stats import paired_difference, t2v_hits
    from slimvl.tasks.retrieval import recall_metrics

    torch.manual_seed(0)
    scores, cap_item = torch.randn(50, 20), torch.randint(0, 20, (50,))
    hits = t2v_hits(scores, cap_item)
    assert float(hits.double().mean()) == pytest.approx(recall_metrics(scores, cap_item)["t2v_r1"])
    assert paired_difference(hits, hits) == (0.0, 0.0)
    a = torch.tensor([1, 1, 0, 0, 1, 0, 1, 1], dtype=torch.bool)
    b = torch.tensor([1, 0, 0, 0, 1, 0, 1, 0], dtype=torch.bool)
    mean, half = paired_difference(a, b)
    d = torch.tensor([0, -1, 0, 0, 0, 0, 0, -1], dtype=torch.float64)
    assert mean == pytest.approx(-0.25)
    assert half == pytest.approx(1.96 * d.std().item() / 8 ** 0.5)
    with pytest.raises(ValueError, match="paired"):
        paired_difference(a, b[:4])
