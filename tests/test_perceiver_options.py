"""Perceiver-VL options: LayerDrop on cross-attention, choosing the
cross-attentions at inference, and the single/multi/mixed retrieval streams."""
from __future__ import annotations

import pytest
import torch
from helpers import TINY, assert_same_weights, tiny_data, tiny_model

from slimvl import PerceiverVLConfig
from slimvl.bench.flops import count_flops, model_flops_per_pair
from slimvl.evaluate import evaluate, score_matrix
from slimvl.nn import CrossBlock
from slimvl.runtime import to_float_video
from slimvl.train import TrainConfig, train


def _inputs(model, n_video=3, n_text=5, frames=2, seed=0):
    c = model.config
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(n_video, frames, 3, c.image_size, c.image_size, generator=g)
    ids = torch.randint(0, c.vocab_size, (n_text, 7), generator=g)
    mask = torch.ones(n_text, 7, dtype=torch.bool)
    mask[1:, 5:] = False
    return video, ids, mask


def _count_cross_calls(model, fn, n):
    calls = []
    hooks = [layer.register_forward_hook(lambda *_, i=i: calls.append(i))
             for i, layer in enumerate(x for x in model.encoder.layers if isinstance(x, CrossBlock))]
    for _ in range(n):
        fn()
    for h in hooks:
        h.remove()
    return [calls.count(i) for i in range(len(hooks))]


# ------------------------------------------------------------------ config

@pytest.mark.parametrize("overrides, field", [
    (dict(cross_attn_drop=1.0), "cross_attn_drop"),
    (dict(cross_attn_drop=-0.1), "cross_attn_drop"),
    (dict(cross_attn_keep=[2]), "cross_attn_keep"),  # "csscss" has cross-attentions 0 and 1
    (dict(cross_attn_keep=[]), "cross_attn_keep"),
    (dict(cross_attn_keep=[0, 0]), "cross_attn_keep"),
    (dict(cross_attn_keep=3), "cross_attn_keep"),
    (dict(cross_attn_keep="first"), "cross_attn_keep"),
    (dict(stream="dual"), "stream"),
    (dict(stream="mixed", decoder_layers=0), "decoder_layers"),
    (dict(stream="single", decoder_layers=0), "decoder_layers"),
    (dict(share_encoder=False), "share_encoder"),
])
def test_contradictory_options_fail_naming_the_option(overrides, field):
    with pytest.raises(ValueError, match=field):
        PerceiverVLConfig(**overrides)


def test_keep_accepts_count_and_indices():
    assert PerceiverVLConfig(layers="cscscs", cross_attn_keep=2).kept_cross_layers() == (0, 1)
    assert PerceiverVLConfig(layers="cscscs", cross_attn_keep=[2, 0]).kept_cross_layers() == (0, 2)
    assert PerceiverVLConfig(layers="cscscs").kept_cross_layers() == (0, 1, 2)


def test_keep_setter_validates_and_round_trips_through_config():
    m = tiny_model(layers="cscscs")
    m.cross_attn_keep = [0]
    assert m.config.kept_cross_layers() == (0,)
    with pytest.raises(ValueError, match="cross_attn_keep"):
        m.cross_attn_keep = [3]
    assert m.config.kept_cross_layers() == (0,)  # a refused value changes nothing
    assert PerceiverVLConfig.from_dict(m.config.to_dict()).kept_cross_layers() == (0,)


# ------------------------------------------------------------------ LayerDrop

def test_layerdrop_skips_only_later_cross_attentions_while_training():
    m = tiny_model(layers="cscscs", cross_attn_drop=0.5).train()
    video, ids, mask = _inputs(m)
    counts = _count_cross_calls(m, lambda: m(video[:1], ids[:1], mask[:1]), 200)
    assert counts[0] == 200  # the first cross-attention always runs
    for c in counts[1:]:
        assert 60 < c < 140  # each later one runs about half the time


def test_layerdrop_is_off_in_eval_mode():
    m = tiny_model(layers="cscscs", cross_attn_drop=0.9).eval()
    video, ids, mask = _inputs(m)
    assert _count_cross_calls(m, lambda: m(video[:1], ids[:1], mask[:1]), 20) == [20, 20, 20]
    with torch.no_grad():
        assert torch.equal(m(video[:1], ids[:1], mask[:1]).logits, m(video[:1], ids[:1], mask[:1]).logits)


def test_cross_attn_keep_runs_only_those_and_costs_less():
    m = tiny_model(layers="cscscs").eval()
    video, ids, mask = _inputs(m, n_video=2, n_text=2)
    with torch.no_grad():
        full = m(video, ids[:2], mask[:2]).logits
        full_flops = model_flops_per_pair(m, 2, 7)
        m.cross_attn_keep = [0, 2]
        assert _count_cross_calls(m, lambda: m(video, ids[:2], mask[:2]), 3) == [3, 0, 3]
        m.cross_attn_keep = 1
        one = m(video, ids[:2], mask[:2]).logits
    assert not torch.allclose(one, full)
    counted = model_flops_per_pair(m, 2, 7)
    assert counted == pytest.approx(m.analytic_flops(2, 7), rel=0.05)
    assert counted < full_flops


def test_layerdrop_training_resumes_exactly(tmp_path):
    data = tiny_data()
    cfg = dict(steps=6, groups_per_step=4, lr=3e-3, warmup_steps=2, checkpoint_every=3, log_every=1, seed=1)
    full = tiny_model(layers="cscscs", cross_attn_drop=0.5)
    train(full, data, TrainConfig(**cfg), run_dir=tmp_path / "a", progress=False)
    part = tiny_model(layers="cscscs", cross_attn_drop=0.5)
    train(part, data, TrainConfig(**cfg), run_dir=tmp_path / "b", progress=False, stop_after=3)
    resumed = tiny_model(seed=9, layers="cscscs", cross_attn_drop=0.5)
    train(resumed, data, TrainConfig(**cfg), run_dir=tmp_path / "b", resume=True, progress=False)
    assert_same_weights(full, resumed)


# ------------------------------------------------------------------ streams

@pytest.mark.parametrize("stream, share, decoder_layers", [
    ("multi", True, 0), ("multi", False, 1), ("mixed", True, 1), ("mixed", False, 2)])
def test_cached_scores_equal_pairwise_forward(stream, share, decoder_layers):
    m = tiny_model(stream=stream, share_encoder=share, decoder_layers=decoder_layers).eval()
    video, ids, mask = _inputs(m)
    with torch.no_grad():
        cached = m.score_cached(m.cache_texts(ids, mask), m.cache_videos(video), max_pairs=4)
        pairwise = torch.stack([m(video, ids[i:i + 1].expand(3, -1), mask[i:i + 1].expand(3, -1)).logits
                                for i in range(ids.shape[0])])
    assert cached.shape == (5, 3)
    torch.testing.assert_close(cached, pairwise, rtol=1e-4, atol=1e-5)


def test_single_stream_has_nothing_to_cache():
    m = tiny_model()
    assert not m.cacheable
    with pytest.raises(ValueError, match="nothing to cache"):
        m.cache_videos(_inputs(m)[0])


def test_separate_text_encoder_is_the_one_texts_use():
    m = tiny_model(stream="multi", share_encoder=False).eval()
    video, ids, mask = _inputs(m)
    with torch.no_grad():
        v0, t0 = m.cache_videos(video), m.cache_texts(ids, mask)
        m.text_encoder.latents.add_(torch.randn_like(m.text_encoder.latents))
        v1, t1 = m.cache_videos(video), m.cache_texts(ids, mask)
    assert torch.equal(v0, v1) and not torch.allclose(t0, t1)


@pytest.mark.parametrize("stream", ["multi", "mixed"])
def test_retrieval_flops_split_matches_counter(stream):
    m = tiny_model(stream=stream, decoder_layers=2 if stream == "mixed" else 0, layers="cscss").eval()
    video, ids, mask = _inputs(m, n_video=4, n_text=6)
    mask[:] = True
    want = m.retrieval_flops(2, 7)
    # prepare_cached is the per-item part of scoring (the mixed stream's key and
    # value projections): counted with the items, the pairs pay only the rest.
    vc, tc = m.prepare_cached(m.cache_videos(video)), m.prepare_cached(m.cache_texts(ids, mask))
    got = {"video": count_flops(lambda: m.prepare_cached(m.cache_videos(video)), m) / 4,
           "text": count_flops(lambda: m.prepare_cached(m.cache_texts(ids, mask)), m) / 6,
           "pair": count_flops(lambda: m.score_prepared(tc, vc), m) / 24}
    assert torch.equal(m.score_prepared(tc, vc), m.score_cached(m.cache_texts(ids, mask), m.cache_videos(video)))
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=0.05), k
    assert model_flops_per_pair(m, 2, 7) == pytest.approx(m.analytic_flops(2, 7), rel=0.05)


@pytest.mark.parametrize("stream", ["multi", "mixed"])
def test_streams_train_and_evaluate_with_caches(stream):
    data = tiny_data()
    m = tiny_model(stream=stream, share_encoder=stream == "mixed")
    result = train(m, data, TrainConfig(steps=30, groups_per_step=4, lr=3e-3, warmup_steps=2, log_every=5),
                   progress=False)
    first, last = result.history[0]["loss"], result.history[-1]["loss"]
    assert last < first
    assert ("vtm" in result.history[-1]) == (stream == "mixed")
    scores = score_matrix(m, data, amp="off", progress=False)
    with torch.no_grad():
        m.eval()
        n_caps = len(data.caption_item)
        brute = torch.stack([m(to_float_video(data.videos), data.caption_ids[i:i + 1].expand(len(data.videos), -1),
                               data.caption_mask[i:i + 1].expand(len(data.videos), -1)).logits
                             for i in range(n_caps)]).cpu()
    torch.testing.assert_close(scores, brute, rtol=1e-4, atol=1e-4)
    metrics = evaluate(m, data, progress=False)
    assert metrics["encode_seconds"] > 0 and metrics["score_seconds"] > 0


def test_multi_stream_needs_the_contrastive_term():
    with pytest.raises(ValueError, match="itc_weight"):
        train(tiny_model(stream="multi"), tiny_data(), TrainConfig(steps=2, groups_per_step=4, itc_weight=0),
              progress=False)


def test_mixed_stream_tags_are_only_built_for_mixed():
    assert tiny_model().stream_tag is None
    assert tiny_model(stream="mixed").stream_tag is not None
    assert tiny_model(stream="multi", decoder_layers=0).vtm_head is None
    assert TINY["dim"] == tiny_model(stream="mixed").config.dim


def test_checkpoint_loads_into_a_model_with_another_keep(tmp_path):
    from slimvl.checkpoint import load_weights, save_checkpoint

    src = tiny_model(layers="cscscs")
    save_checkpoint(tmp_path / "ck", src)
    dst = tiny_model(seed=3, layers="cscscs", cross_attn_keep=1)
    load_weights(tmp_path / "ck", dst)  # which cross-attentions run is not part of the weights
    assert torch.equal(dst.encoder.latents, src.encoder.latents) and dst.config.kept_cross_layers() == (0,)
    with pytest.raises(ValueError, match="stream"):
        load_weights(tmp_path / "ck", tiny_model(layers="cscscs", stream="mixed"))
