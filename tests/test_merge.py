"""Token merging: the pure functions (ToMe's and CrossGET's matchings, the
merge) and the patch on slimvl's single-stream and decomposed models."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE, tiny_model

from slimvl.merge import (Schedule, TokenState, bipartite_soft_matching, complete_graph_matching, guided_importance,
                          is_patched, layer_r, merge_layer, patch, unpatch)
from slimvl.models import decompose
from slimvl.nn import Attention, Block


def _tokens(b=3, n=17, c=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, c, generator=g)


def _merges(method, metric, r, protected=None, valid=None, seed=0):
    if method == "tome":
        return bipartite_soft_matching(metric, r, protected, valid), None
    imp = torch.rand(metric.shape[:2], generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return complete_graph_matching(metric, r, imp, protected, valid), imp


def _sources(m, n):
    """``[B, r]`` source positions and ``[B, r]`` their destinations' positions."""
    b = m.slot.shape[0]
    is_kept = torch.zeros(b, n, dtype=torch.bool).scatter(1, m.keep, True)
    src = torch.stack([(~k).nonzero()[:, 0] for k in is_kept])
    return src, m.keep.gather(1, m.slot.gather(1, src))


@pytest.mark.parametrize("method", ["tome", "crossget"])
def test_sizes_one_and_equal_importance_give_the_plain_mean(method):
    x = _tokens()
    m, _ = _merges(method, x, 5)
    merged, size = m.tokens(x, importance=torch.zeros(x.shape[:2]) if method == "crossget" else None)
    for b in range(x.shape[0]):
        for j in range(merged.shape[1]):
            members = (m.slot[b] == j).nonzero()[:, 0]
            torch.testing.assert_close(merged[b, j], x[b, members].mean(0))
            assert size[b, j] == len(members)
    counts = torch.stack([row.bincount(minlength=merged.shape[1]) for row in m.slot])
    assert counts.min() >= 1 and (counts.sum(1) == x.shape[1]).all()  # no empty slot, every token in one


@pytest.mark.parametrize("method", ["tome", "crossget"])
def test_sizes_add_up_and_weights_follow_sizes_and_importance(method):
    x = _tokens(n=21)
    size = torch.randint(1, 5, x.shape[:2]).float()
    m, imp = _merges(method, x, 6)
    merged, new = m.tokens(x, size, imp)
    torch.testing.assert_close(new.sum(1), size.sum(1))
    w = size * (imp.exp() if imp is not None else 1)
    for b in range(x.shape[0]):
        for j in range(merged.shape[1]):
            members = (m.slot[b] == j).nonzero()[:, 0]
            exp = (x[b, members] * w[b, members, None]).sum(0) / w[b, members].sum()
            torch.testing.assert_close(merged[b, j], exp)


@pytest.mark.parametrize("method", ["tome", "crossget"])
def test_order_is_kept_and_protected_tokens_never_move(method):
    x = _tokens(n=20)
    protected = torch.zeros(20, dtype=torch.bool)
    protected[[0, 7, 19]] = True
    m, imp = _merges(method, x, 8, protected)
    assert m.r == 8
    assert (m.keep[:, 1:] > m.keep[:, :-1]).all()  # ascending: the survivors keep their order
    merged, _ = m.tokens(x, importance=imp)
    for b in range(x.shape[0]):
        kept = m.keep[b].tolist()
        for p in (0, 7, 19):
            j = kept.index(p)  # still there, and alone in its slot
            assert (m.slot[b] == j).sum() == 1
            assert torch.equal(merged[b, j], x[b, p])
    assert (m.keep[:, 0] == 0).all() and (m.keep[:, -1] == 19).all()


@pytest.mark.parametrize("method", ["tome", "crossget"])
def test_padding_never_merges_and_the_mask_follows_the_tokens(method):
    x = _tokens(b=2, n=16)
    valid = torch.ones(2, 16, dtype=torch.bool)
    valid[1, 10:] = False
    m, _ = _merges(method, x, 4, torch.tensor([True] + [False] * 15), valid)
    src, dst = _sources(m, 16)
    assert valid.gather(1, src).all() and valid.gather(1, dst).all()
    kept_valid = m.gather(valid)
    assert kept_valid.shape == (2, 12)
    assert kept_valid[0].all() and kept_valid[1].sum() == 10 - 4  # real tokens stay a prefix
    assert kept_valid[1, :6].all() and not kept_valid[1, 6:].any()


def test_complete_graph_never_points_to_a_higher_ranked_token():
    for seed in range(5):
        x = _tokens(b=4, n=24, seed=seed)
        protected = torch.zeros(24, dtype=torch.bool)
        protected[0] = True
        m, _ = _merges("crossget", x, 10, protected, seed=seed)
        k = F.normalize(x, dim=-1)
        sim = k @ k.transpose(1, 2)
        sim = sim.masked_fill(torch.eye(24, dtype=torch.bool) | protected[:, None] | protected[None, :],
                              float("-inf"))
        # Mutual best pairs tie: the one at the lower position ranks first.
        rank = sim.max(-1).values.sort(dim=-1, descending=True, stable=True).indices.argsort(-1)
        src, dst = _sources(m, 24)
        assert (rank.gather(1, dst) > rank.gather(1, src)).all()
        kept = torch.zeros(4, 24, dtype=torch.bool).scatter(1, m.keep, True)
        assert kept.gather(1, dst).all()  # sources never chain: every destination survives


def test_complete_graph_holds_its_rules_whatever_the_importance_scale():
    """Masked pairs are offsets, not -inf: an importance far larger than any
    cosine still never makes a protected token, or one with no lower-ranked
    target, a source; the r lowest scores are the sources."""
    x = _tokens(b=4, n=24, seed=3)
    protected = torch.zeros(24, dtype=torch.bool)
    protected[[0, 23]] = True
    for scale in (1e-3, 1e5):
        imp = torch.randn(4, 24, generator=torch.Generator().manual_seed(1)) * scale
        m = complete_graph_matching(x, 11, imp, protected)
        src, dst = _sources(m, 24)
        assert m.r == 11 and not protected[src].any() and not protected[dst].any()
        kept = torch.zeros(4, 24, dtype=torch.bool).scatter(1, m.keep, True)
        assert kept.gather(1, dst).all()
        k = F.normalize(x, dim=-1)
        sim = (k @ k.transpose(1, 2)).masked_fill(torch.eye(24, dtype=torch.bool) | protected[:, None]
                                                  | protected[None, :], float("-inf"))
        rank = sim.max(-1).values.sort(dim=-1, descending=True, stable=True).indices.argsort(-1)
        allowed = sim.masked_fill(rank[:, None, :] <= rank[:, :, None], float("-inf"))
        score = (imp - allowed.max(-1).values).masked_fill(protected.expand(4, -1), float("inf"))
        assert torch.equal(src, score.topk(11, largest=False).indices.sort(1).values)


def test_each_source_joins_its_most_similar_allowed_destination():
    """CrossGET: the most similar lower-ranked token that is not itself a
    source; ToMe: the r even tokens with the most similar odd partner join
    that partner."""
    x = _tokens(b=4, n=24, seed=5)
    protected = torch.zeros(24, dtype=torch.bool)
    protected[[0, 23]] = True
    k = F.normalize(x, dim=-1)
    sim = (k @ k.transpose(1, 2)).masked_fill(torch.eye(24, dtype=torch.bool) | protected[:, None]
                                              | protected[None, :], float("-inf"))
    m, _ = _merges("crossget", x, 9, protected, seed=5)
    src, dst = _sources(m, 24)
    rank = sim.max(-1).values.sort(dim=-1, descending=True, stable=True).indices.argsort(-1)
    is_source = torch.zeros(4, 24, dtype=torch.bool).scatter(1, src, True)
    allowed = sim.masked_fill((rank[:, None, :] <= rank[:, :, None]) | is_source[:, None, :], float("-inf"))
    assert torch.equal(dst, allowed.gather(1, src[..., None].expand(-1, -1, 24)).argmax(-1))

    m = bipartite_soft_matching(x, 9, protected)
    src, dst = _sources(m, 24)
    a_to_b = sim[:, ::2, 1::2]
    best, partner = a_to_b.max(-1)
    assert torch.equal(src, (2 * best.topk(9).indices).sort(1).values)
    assert torch.equal(dst, (2 * partner + 1).gather(1, src // 2))


def test_importance_of_unit_keys_is_the_importance_of_the_keys():
    x, q = _tokens(b=2, n=9, seed=6), torch.randn(2, 8)
    expected = (F.normalize(x, dim=-1) @ F.normalize(q, dim=-1)[..., None])[..., 0]
    torch.testing.assert_close(guided_importance(x, q), expected)
    torch.testing.assert_close(guided_importance(F.normalize(x, dim=-1), q, normalized=True), expected)
    assert torch.equal(guided_importance(torch.zeros(2, 9, 8), q), torch.zeros(2, 9))  # no NaN from a zero key


def test_crossget_keeps_important_tokens_and_merges_duplicates():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 8, 16, generator=g)
    x[0, 5] = x[0, 3] + 1e-3 * torch.randn(16, generator=g)  # a near-duplicate pair
    imp = torch.zeros(1, 8)
    m = complete_graph_matching(x, 1, imp)
    src, dst = _sources(m, 8)
    assert {src.item(), dst.item()} == {3, 5}
    imp[0, 3] = imp[0, 5] = 5.0  # both important: another pair goes instead
    src2, _ = _sources(complete_graph_matching(x, 1, imp), 8)
    assert src2.item() not in (3, 5)
    q = x[:, 2]
    torch.testing.assert_close(guided_importance(x, q)[0, 2], torch.tensor(1.0))


def test_the_importance_weight_trades_importance_against_duplicates():
    """Token 0 guides (its query is e1). Tokens 1 and 2 are near-duplicates
    and important (keys near e1); tokens 3-6 have no near-duplicate and are
    unimportant. CrossGET as published (weight 1) merges an unimportant
    token; on similarity alone (weight 0) it merges the duplicates, by a
    plain mean; the weight scales the importance wherever it acts."""
    from slimvl.merge.layers import match

    e = torch.eye(8)
    keys = torch.stack([e[7], e[1] + 0.05 * e[6], e[1] - 0.05 * e[6],
                        *[-0.5 * e[1] + 0.87 * e[k] for k in (2, 3, 4, 5)]])[None]
    queries = torch.zeros(1, 7, 8)
    queries[0, 0] = e[1]
    state = TokenState(protected=(torch.arange(7) == 0)[None])
    x = torch.randn(1, 7, 4)

    def merged(weight):
        m, importance = match("crossget", keys, queries, 1, state, weight)
        src, dst = _sources(m, 7)
        return {src.item(), dst.item()}, m.tokens(x, importance=importance)[0]

    published, _ = merged(1.0)
    assert not published & {1, 2}  # the duplicates are kept for their importance
    pair, out = merged(0.0)
    assert pair == {1, 2}
    torch.testing.assert_close(out[0, 1], x[0, 1:3].mean(0))  # no importance: the plain mean
    m, importance = match("crossget", keys, queries, 1, state, 0.5)
    m1, importance1 = match("crossget", keys, queries, 1, state)
    torch.testing.assert_close(importance, 0.5 * importance1)


def test_tome_matches_even_tokens_to_odd_ones():
    x = _tokens(n=12)
    m = bipartite_soft_matching(x, 4)
    src, dst = _sources(m, 12)
    assert (src % 2 == 0).all() and (dst % 2 == 1).all()


def test_r_is_clamped_to_what_a_layer_can_merge():
    x = _tokens(n=9)
    protected = torch.tensor([True] + [False] * 8)
    assert bipartite_soft_matching(x, 100, protected).r == 4
    assert complete_graph_matching(x, 100, torch.zeros(3, 9), protected).r == 4
    assert bipartite_soft_matching(x, 0) is None
    assert complete_graph_matching(x[:, :2], 5, torch.zeros(3, 2), protected[:2]) is None


def test_each_method_compares_keys_as_its_reference_does():
    """ToMe: keys averaged over heads; CrossGET: whole keys and queries
    (heads side by side), so an importance is a cosine of full vectors."""
    from slimvl.merge.layers import heads_metric

    torch.manual_seed(0)
    attn = Attention(16, heads=4).eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        k, _ = attn.project_kv(x)  # [B, H, N, d]
        q = attn.project_q(x)
        _, k_mean, q_mean = attn(x, return_metric=True, return_query=True)
        _, k_cat, q_cat = attn(x, return_metric=True, return_query=True, metric="concat")
    torch.testing.assert_close(k_mean, k.mean(1))
    torch.testing.assert_close(k_cat, torch.cat(list(k.unbind(1)), -1))
    torch.testing.assert_close(q_cat, torch.cat(list(q.unbind(1)), -1))
    assert torch.equal(heads_metric("crossget", k), k_cat) and torch.equal(heads_metric("tome", k), k_mean)
    assert q_mean.shape == (2, 5, 4) and k_cat.shape == (2, 5, 16)
    with pytest.raises(ValueError, match="metric='sum'"):
        attn(x, return_metric=True, metric="sum")


def test_proportional_attention_equals_attention_over_the_duplicates():
    torch.manual_seed(0)
    attn = Attention(16, heads=2).eval()
    q = torch.randn(2, 3, 16)
    base = torch.randn(2, 4, 16)
    dup = torch.cat([base, base[:, 1:2], base[:, 1:2], base[:, 3:4]], 1)  # token 1 three times, token 3 twice
    size = torch.tensor([[1.0, 3.0, 1.0, 2.0]]).expand(2, -1)
    torch.testing.assert_close(attn(q, base, size=size), attn(q, dup))
    assert not torch.allclose(attn(q, base), attn(q, dup))


def test_schedules():
    assert layer_r(3, 4) == [3, 3, 3, 3]
    assert layer_r([1, 2, 0, 4], 4) == [1, 2, 0, 4]
    assert layer_r(Schedule(8), 3) == [8, 8, 8]
    dec = layer_r(Schedule(8, -1.0), 5)
    assert dec == [16, 12, 8, 4, 0] and sum(dec) == 40
    assert layer_r(Schedule(8, 0.5), 3) == [4, 8, 12]
    for bad in (-1, [1, 2], [1, -1, 1, 1], 1.5, True):
        with pytest.raises(ValueError, match="r="):
            layer_r(bad, 4)
    with pytest.raises(ValueError, match="inflection"):
        Schedule(4, 2.0)


def test_merge_layer_at_r_zero_is_the_block():
    torch.manual_seed(0)
    blk = Block(32, 4).eval()
    x = torch.randn(2, 10, 32)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 8:] = False
    state = TokenState(protected=torch.zeros(2, 10, dtype=torch.bool), mask=mask)
    out, state2, done = merge_layer(blk, x, state, 0, "tome")
    assert torch.equal(out, blk(x, key_padding_mask=mask)) and done == 0 and state2 is state
    out, state3, done = merge_layer(blk, x, state, 3, "crossget")
    assert out.shape == (2, 7, 32) and done == 3 and state3.size.sum(1).tolist() == [10.0, 10.0]
    assert state3.mask[1].sum() == 8 - 3


def _pair(b=2, frames=2):
    g = torch.Generator().manual_seed(0)
    video = torch.randn(b, frames, 3, 32, 32, generator=g)
    ids = torch.randint(5, 50, (b, 12), generator=g)
    mask = torch.ones(b, 12, dtype=torch.bool)
    mask[1, 7:] = False
    return video.to(DEVICE), ids.to(DEVICE), mask.to(DEVICE)


@pytest.mark.parametrize("method", ["tome", "crossget"])
def test_patched_single_stream_merges_video_tokens_only(method):
    model = tiny_model("single_stream_tiny", device=DEVICE, patch_size=4).eval()
    video, ids, mask = _pair()
    with torch.no_grad():
        before = model(video, ids, mask).logits
        patch(model, method, r=0)
        torch.testing.assert_close(model(video, ids, mask).logits, before, rtol=0, atol=0)
        model.r = 8
        after = model(video, ids, mask).logits
    n_video = model.patch_embed.num_tokens(2)  # 64 video tokens, 12 text tokens, [CLS]
    assert model.merge_report["video"] == {"r": [8] * 4, "tokens": [1 + n_video + 12 - 8 * (i + 1) for i in range(4)]}
    assert not torch.allclose(after, before) and torch.isfinite(after).all()
    # Text tokens are protected: a patched model merging everything still leaves them.
    model.r = 1000
    with pytest.warns(UserWarning, match="clamped"), torch.no_grad():
        model(video, ids, mask)
    assert model.merge_report["video"]["tokens"][-1] >= 1 + 12


@pytest.mark.parametrize("kind", ["clip", "single_stream", "dual_encoder"])
def test_the_importance_weight_reaches_every_merging_layer(kind, monkeypatch):
    """With weight 0 a patched model computes exactly what CrossGET with a
    zero importance computes; with weight 1 it does not."""
    from slimvl.merge import layers

    if kind == "clip":
        model = tiny_model("clip_tiny", device=DEVICE, patch_size=4, cross_tokens=True).eval()
    else:
        model = tiny_model("single_stream_tiny", device=DEVICE, patch_size=4).eval()
        model = decompose(model) if kind == "dual_encoder" else model
    video, ids, mask = _pair(frames=1 if kind == "clip" else 2)
    run = (lambda: model(video, ids, mask).logits) if kind == "single_stream" else (lambda: model.encode_video(video))
    patch(model, "crossget", r=6)
    with torch.no_grad():
        published = run()
        model.importance_weight = 0.0
        similarity_only = run()
        if kind == "dual_encoder":
            assert model.backbone.importance_weight == 0.0  # one setting, shared with the backbone
        model.importance_weight = 1.0
        monkeypatch.setattr(layers, "guided_importance", lambda keys, query, **kw: keys.new_zeros(keys.shape[:2]))
        zero_importance = run()
    torch.testing.assert_close(similarity_only, zero_importance, rtol=0, atol=0)
    assert not torch.allclose(published, similarity_only)


def test_unpatch_restores_the_model_exactly():
    model = tiny_model("single_stream_tiny", device=DEVICE)
    cls, keys, state = type(model), set(vars(model)), {k: v.clone() for k, v in model.state_dict().items()}
    patch(model, "crossget", r=4)
    assert is_patched(model) and type(model) is not cls and model.merge_method == "crossget"
    assert model.state_dict().keys() == state.keys()
    unpatch(model)
    assert type(model) is cls and set(vars(model)) == keys and not is_patched(model)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_patched_dual_encoder_pools_by_size():
    model = tiny_model("single_stream_tiny", device=DEVICE, patch_size=4).eval()
    dual = decompose(model)
    video, ids, mask = _pair()
    with torch.no_grad():
        v0, t0 = dual.encode_video(video), dual.encode_text(ids, mask)
        patch(dual, "tome", r=0)
        torch.testing.assert_close(dual.encode_video(video), v0, rtol=0, atol=0)
        dual.r = 6
        v1, t1 = dual.encode_video(video), dual.encode_text(ids, mask)
    assert dual.merge_report["video"]["r"] == [6] * 4
    torch.testing.assert_close(t1, t0)  # captions are not merged
    assert (v1 - v0).norm(dim=-1).max() > 1e-4 and (v1 * v0).sum(-1).min() > 0.5
    # The pooled mean weighs each merged token by its size (what it stands for), not 1.
    with torch.no_grad():
        x, valid = dual.backbone.encode_tokens(*dual.embed_inputs(video))
        w = valid.float() * dual.backbone._merge.last_size
        sized = F.normalize(dual.backbone.proj((x * w[..., None]).sum(1) / w.sum(1, keepdim=True)), dim=-1)
        plain = F.normalize(dual.backbone.proj(x.mean(1)), dim=-1)
    torch.testing.assert_close(v1, sized)
    assert (v1 - plain).norm(dim=-1).max() > 1e-4
    assert is_patched(dual.backbone)
    unpatch(dual)
    assert not is_patched(dual) and not is_patched(dual.backbone)


def test_a_patched_model_trains():
    model = tiny_model("single_stream_tiny", device=DEVICE, patch_size=4).train()
    patch(model, "crossget", r=8)
    video, ids, mask = _pair()
    model(video, ids, mask).logits.sum().backward()
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0


def test_bad_patches_are_refused():
    model = tiny_model("single_stream_tiny")
    with pytest.raises(ValueError, match="method='fast'.*single_stream"):
        patch(model, "fast")
    with pytest.raises(ValueError, match="r=-2"):
        patch(model, r=-2)
    assert not is_patched(model)  # a refused patch leaves nothing behind
    for bad in (-0.5, float("nan"), float("inf"), 51, 10**400, "1", True):
        with pytest.raises(ValueError, match="importance_weight=.*single_stream"):
            patch(model, "crossget", importance_weight=bad)
    with pytest.raises(ValueError, match="only method='crossget'"):
        patch(model, "tome", importance_weight=0.5)
    assert not is_patched(model)
    patch(model, "crossget", r=2, importance_weight=np.float32(0.5))  # any real number
    assert model.importance_weight == 0.5 and model.merge_config()["importance_weight"] == 0.5
    model.importance_weight = 0
    assert model.importance_weight == 0.0
    with pytest.raises(ValueError, match="importance_weight=-1.*single_stream"):
        model.importance_weight = -1
    unpatch(model)
    patch(model, r=2)
    with pytest.raises(ValueError, match="already patched"):
        patch(model, r=2)
    with pytest.raises(ValueError, match="r_text"):
        model.r_text = 3
    with pytest.raises(ValueError, match="perceiver_vl has no layers"):
        patch(tiny_model("perceiver_vl_tiny"))
    with pytest.raises(ValueError, match="no layers token merging supports"):
        patch(decompose(tiny_model("perceiver_vl_tiny")))
    with pytest.raises(ValueError, match="not patched"):
        unpatch(tiny_model("single_stream_tiny"))
    # A patched cross-encoder is not decomposed (its loop would merge captions); nor is a lone backbone patched.
    with pytest.raises(ValueError, match="unpatch"):
        decompose(model)
    dual = decompose(unpatch(model))
    patch(dual.backbone, r=2)
    with pytest.raises(ValueError, match="backbone is patched"):
        patch(dual)


def _clamped(r, free, layers):
    """r per layer as the merges a layer can do: at most half its free tokens."""
    out = []
    for _ in range(layers):
        out.append(min(r, free // 2))
        free -= out[-1]
    return out


def _left(n, merges):
    out = []
    for m in merges:
        n -= m
        out.append(n)
    return out


@pytest.mark.filterwarnings("ignore:.*clamped")
@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("method", ["tome", "crossget"])
def test_patched_clip_merges_both_towers_keeping_cls_cross_and_eot(method, cross):
    model = tiny_model("clip_tiny", device=DEVICE, patch_size=4, cross_tokens=cross).eval()
    video, ids, mask = _pair(frames=1)
    with torch.no_grad():
        v0, t0 = model.encode_video(video), model.encode_text(ids, mask)
        patch(model, method, r=0)
        torch.testing.assert_close(model.encode_video(video), v0, rtol=0, atol=0)
        torch.testing.assert_close(model.encode_text(ids, mask), t0, rtol=0, atol=0)
        model.r, model.r_text = 6, 2
        v1, t1 = model.encode_video(video), model.encode_text(ids, mask)
    n = 1 + 64 + int(cross)  # [CLS], 8 x 8 patches, the cross token
    assert model.merge_report["video"] == {"r": _clamped(6, n - 1 - int(cross), 4),
                                           "tokens": _left(n, _clamped(6, n - 1 - int(cross), 4))}
    # Text: the longer caption (12 real tokens, [CLS] and EOT protected) merges 2 a layer; the shorter one (7)
    # merges 2, 1, 1, 0 of its own and makes up the rest with its padding, so both keep one length.
    assert model.merge_report["text"] == {"r": [2, 2, 2, 2], "tokens": _left(12 + int(cross), [2, 2, 2, 2])}
    assert (v1 - v0).norm(dim=-1).max() > 1e-4 and torch.isfinite(t1).all()
    # Recording the cross tokens (the consistency loss) works under merging.
    if cross:
        model.cross_record = {}
        model.encode_video(video)
        assert model.cross_record["video"].shape == (2, 4, model.config.dim)
        model.cross_record = None
    unpatch(model)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_video(video), v0, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["tome", "crossget"])
def test_a_rows_merges_do_not_depend_on_the_other_rows(method):
    """Rows of one length but different padding: each merges what it alone
    would, the shorter ones filling up with padding merged into padding."""
    x = _tokens(b=3, n=16)
    valid = torch.ones(3, 16, dtype=torch.bool)
    valid[1, 9:] = False  # 9 real tokens
    valid[2, 5:] = False  # 5 real tokens
    protected = torch.tensor([True] + [False] * 15)
    imp = torch.rand(3, 16, generator=torch.Generator().manual_seed(3))
    both = _match(method, x, 6, protected, valid, imp)
    for row in range(3):
        alone = _match(method, x[row:row + 1], 6, protected, valid[row:row + 1], imp[row:row + 1])
        merged, _ = both.tokens(x, importance=imp if method == "crossget" else None)
        own, _ = alone.tokens(x[row:row + 1], importance=imp[row:row + 1] if method == "crossget" else None)
        kept = both.gather(valid)[row]
        n_real = int(kept.sum())
        assert n_real == own.shape[1] - int((~alone.gather(valid[row:row + 1])).sum())
        torch.testing.assert_close(merged[row, :n_real], own[0, :n_real])  # the real tokens: as alone
        assert kept[:n_real].all() and not kept[n_real:].any()  # real tokens stay a prefix
    assert both.r == 6  # the longest row's merges; the others made up with padding
    assert torch.equal(both.gather(valid).sum(1), torch.tensor([16 - 6, 9 - 4, 5 - 2]))


def _match(method, x, r, protected, valid, imp):
    if method == "tome":
        return bipartite_soft_matching(x, r, protected, valid)
    return complete_graph_matching(x, r, imp, protected, valid)


@pytest.mark.filterwarnings("ignore:.*clamped")
def test_a_captions_embedding_does_not_depend_on_its_batch_when_text_merges():
    model = tiny_model("clip_tiny", device=DEVICE, patch_size=4, cross_tokens=True).eval()
    patch(model, "crossget", r=4, r_text=3)
    ids = torch.randint(5, 50, (3, 12), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    mask = torch.ones(3, 12, dtype=torch.bool, device=DEVICE)
    mask[1, 8:] = False
    mask[2, 4:] = False
    with torch.no_grad():
        together = model.encode_text(ids, mask)
        for row in range(3):
            torch.testing.assert_close(together[row], model.encode_text(ids[row:row + 1], mask[row:row + 1])[0],
                                       rtol=1e-4, atol=1e-5)
