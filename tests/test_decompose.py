"""Decomposition (VLDeformer): a cross-encoder's weights as a dual encoder,
its contrastive loss with bi-modal hard negatives, and retrieve + re-rank."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE, tiny_data, tiny_model

import slimvl
from slimvl.checkpoint import load_model, save_checkpoint, weights_checksum
from slimvl.data import Tokenizer
from slimvl.data.world import MOTION_WORDS, SHAPE_WORDS
from slimvl.models import DualEncoder, DualEncoderConfig
from slimvl.nn import VIDEO
from slimvl.runtime import to_float_video
from slimvl.tasks.retrieval import contrastive_loss, evaluate, score_matrix, step_batch, t2v_ranks, v2t_ranks
from slimvl.tasks.retrieval.hard_negatives import SwapTable, compose_videos, partners, swap_vocabulary
from slimvl.tasks.retrieval.rerank import evaluate_reranked, parse_retrieval, reranked_scores, reranker_of
from slimvl.train import TrainConfig, train

CROSS_ENCODERS = ["single_stream_tiny", "perceiver_vl_tiny"]


def inputs(seed: int = 0, b: int = 3):
    g = torch.Generator().manual_seed(seed)
    video = torch.rand(b, 2, 3, 32, 32, generator=g)
    ids = torch.randint(5, 50, (b, 12), generator=g)
    mask = torch.ones(b, 12, dtype=torch.bool)
    mask[0, 5:] = False
    mask[1, 9:] = False
    return video, ids, mask


@pytest.mark.parametrize("name", CROSS_ENCODERS)
def test_encodings_are_the_cross_encoders_unimodal_pass(name):
    cross = tiny_model(name).eval()
    dual = slimvl.decompose(cross)
    video, ids, mask = inputs()
    with torch.no_grad():
        for x, m, got in ((*cross.embed_inputs(video), dual.encode_video(video)),
                          (*cross.embed_inputs(None, ids, mask), dual.encode_text(ids, mask))):
            if name == "single_stream_tiny":
                tokens, valid = cross.run_blocks(x, m)
                tokens = cross.norm(tokens)
                pooled = torch.stack([tokens[i][valid[i]].mean(0) for i in range(len(tokens))])
            else:  # every latent is an output position
                pooled = cross.encode(x, m, VIDEO).mean(1)
            torch.testing.assert_close(got, F.normalize(cross.proj(pooled), dim=-1))
    assert torch.allclose(got.norm(dim=-1), torch.ones(len(got)))


@pytest.mark.parametrize("name", CROSS_ENCODERS)
def test_padding_does_not_change_an_embedding(name):
    dual = slimvl.decompose(tiny_model(name)).eval()
    _, ids, mask = inputs()
    with torch.no_grad():
        alone = torch.cat([dual.encode_text(ids[i:i + 1, :int(mask[i].sum())], mask[i:i + 1, :int(mask[i].sum())])
                           for i in range(len(ids))])
        junk = ids.masked_fill(~mask, 7)  # what sits under the padding must not matter either
        padded = dual.encode_text(junk, mask)  # captions of 5 and 9 tokens padded to the batch's 12
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)


def test_weights_are_shared_unless_copied():
    cross = tiny_model("single_stream_tiny").eval()
    shared, copied = slimvl.decompose(cross), slimvl.decompose(cross, copy=True)
    video = inputs()[0]
    before = copied.encode_video(video).detach()
    with torch.no_grad():
        shared.backbone.proj.weight.mul_(2).add_(0.1)
    assert cross.proj.weight.data_ptr() == shared.backbone.proj.weight.data_ptr()
    torch.testing.assert_close(copied.encode_video(video).detach(), before)
    assert not torch.allclose(shared.encode_video(video).detach(), before)
    assert reranker_of(copied) is copied.backbone  # untouched: still the cross-encoder
    with pytest.raises(ValueError, match="changed since it was decomposed"):
        reranker_of(shared)


def test_bad_decompositions_are_refused():
    with pytest.raises(ValueError, match="multi-stream Perceiver-VL already encodes"):
        slimvl.decompose(tiny_model(stream="multi", decoder_layers=0))
    dual = slimvl.decompose(tiny_model("single_stream_tiny"))
    with pytest.raises(ValueError, match="already a dual encoder"):
        slimvl.decompose(dual)
    with pytest.raises(ValueError, match="unknown options"):
        slimvl.decompose(tiny_model("single_stream_tiny"), temprature=0.1)
    backbone = tiny_model("single_stream_tiny").config.to_dict()
    with pytest.raises(ValueError, match=r"DualEncoderConfig.dim=128: is the backbone's \(32\)"):
        DualEncoderConfig(backbone=backbone, dim=128)
    with pytest.raises(ValueError, match="DualEncoderConfig.temperature"):
        DualEncoderConfig(backbone=backbone, temperature=0.005)
    with pytest.raises(ValueError, match="DualEncoderConfig.backbone"):
        DualEncoderConfig(backbone={"model_type": "perceiver_cls"})


def test_checkpoint_round_trip(tmp_path):
    dual = slimvl.decompose(tiny_model("perceiver_vl_tiny"), per_direction=True, temperature=0.02).eval()
    assert dual.logit_scale.shape == (2,) and math.isclose(dual.logit_scale[1].item(), math.log(50), rel_tol=1e-6)
    save_checkpoint(tmp_path / "ckpt", dual)
    back = load_model(tmp_path / "ckpt")
    assert isinstance(back, DualEncoder) and back.config == dual.config
    assert weights_checksum(back) == weights_checksum(dual)
    video, ids, mask = inputs()
    torch.testing.assert_close(back.encode_video(video), dual.encode_video(video))
    torch.testing.assert_close(back.encode_text(ids, mask), dual.encode_text(ids, mask))


def test_evaluation_ranks_by_cosine_of_cached_encodings():
    dual = slimvl.decompose(tiny_model("single_stream_tiny")).eval()
    data = tiny_data()
    assert dual.cacheable and not dual.has_pair_scorer
    scores = score_matrix(dual, data, batch_size=5, progress=False)
    with torch.no_grad():
        v = dual.encode_video(to_float_video(data.videos))
        t = dual.encode_text(data.caption_ids, data.caption_mask)
    torch.testing.assert_close(scores, t @ v.T, atol=1e-5, rtol=1e-5)
    pairs = dual(to_float_video(data.videos[data.caption_item]), data.caption_ids, data.caption_mask).logits
    torch.testing.assert_close(pairs, scores[torch.arange(len(pairs)), data.caption_item], atol=1e-5, rtol=1e-5)
    flops = dual.retrieval_flops(2, 12)
    assert flops["pair"] == 2 * dual.config.embed_dim and flops["video"] > flops["text"] > 0


# -- hard negatives ------------------------------------------------------------
@pytest.fixture(scope="module")
def world_tokenizer():
    captions = ["a small red circle moves left", "a big blue square falls", "a tiny green ring grows",
                "a large white plus sign drifts to the left", "a little purple disc stays still"]
    return Tokenizer.train(captions * 4, vocab_size=200)


def test_swapped_captions_change_content_words_for_others_of_their_kind(world_tokenizer):
    tok = world_tokenizer
    table = SwapTable.from_tokenizer(tok)
    kind_of = {w: (kind, value) for kind, values in swap_vocabulary().items()
               for value, words in values.items() for w in words}
    texts = ["a small red circle moves left", "a big blue square falls and a tiny green ring grows", "a a a"]
    ids, mask = tok.encode(texts, 16)
    out, swapped = table.swap(ids, mask, np.random.default_rng(0), fraction=0.3)
    assert swapped.tolist() == [True, True, False]
    assert torch.equal(out[2], ids[2])  # nothing to swap: left as it is, and flagged
    for b in range(2):
        changed = (out[b] != ids[b]).nonzero().flatten().tolist()
        n_content = sum(tok.decode([int(i)]) in kind_of for i in ids[b][mask[b]])
        assert len(changed) == max(1, round(0.3 * n_content))
        for j in changed:
            old, new = tok.decode([int(ids[b, j])]), tok.decode([int(out[b, j])])
            assert kind_of[old][0] == kind_of[new][0] and kind_of[old][1] != kind_of[new][1]
    assert "sign" in swap_vocabulary()["shape"]["cross"] and SHAPE_WORDS["cross"][1] == "plus sign"
    assert swap_vocabulary()["motion"]["left"] == ("left",) and len(MOTION_WORDS["left"]) == 3


def test_composed_videos_mix_the_positive_and_another_group():
    rng = np.random.default_rng(0)
    other = partners(rng, units=3, groups=4, group_size=2)
    assert other.shape == (3, 8)
    assert ((other // 2) != (np.arange(8) // 2)[None]).all()  # always another group
    videos = torch.arange(4, dtype=torch.float).view(4, 1, 1, 1, 1).expand(4, 4, 3, 2, 4).clone()
    partner = torch.tensor([1, 2, 3, 0])
    right = torch.tensor([True, False, True, False])
    space = compose_videos(videos, videos[partner], right, "space")
    for b in range(4):
        kept, replaced = (space[b, ..., :2], space[b, ..., 2:]) if right[b] else (space[b, ..., 2:], space[b, ..., :2])
        assert (kept == b).all() and (replaced == partner[b]).all()
    time_ = compose_videos(videos, videos[partner], right, "time")
    assert (time_[:, :2] == videos[:, :2]).all() and (time_[:, 2:] == videos[partner, 2:]).all()
    with pytest.raises(ValueError, match="groups_per_unit >= 2"):
        partners(rng, 1, 1, 4)
    with pytest.raises(ValueError, match="1 frame"):  # images: no later half to take
        compose_videos(videos[:, :1], videos[partner, :1], right, "time")


def test_contrastive_loss_with_hard_negatives_is_infonce_over_both_pools():
    g = torch.Generator().manual_seed(0)
    v, t, hv, ht = (torch.randn(2, 4, 8, generator=g) for _ in range(4))
    valid = torch.tensor([[True, False, True, True], [False, False, False, False]])
    scale = torch.tensor([math.log(10.0), math.log(20.0)])
    got = contrastive_loss(v, t, scale, hv, ht, valid)
    n = lambda x: F.normalize(x, dim=-1)  # noqa: E731
    want = 0.0
    for u in range(2):  # each query meets its own row's hard negative, not the other rows'
        for i in range(4):
            t2v = 10 * torch.cat([n(t[u, i]) @ n(v[u]).T, (n(t[u, i]) @ n(hv[u, i]))[None]])
            own = (n(v[u, i]) @ n(ht[u, i]))[None] if valid[u, i] else torch.empty(0)
            v2t = 20 * torch.cat([n(v[u, i]) @ n(t[u]).T, own])
            want += -t2v.log_softmax(0)[i] - v2t.log_softmax(0)[i]
    torch.testing.assert_close(got, want / 16)
    # With one temperature and no hard negatives it is the plain symmetric loss.
    s = torch.tensor(math.log(10.0))
    torch.testing.assert_close(contrastive_loss(v, t, s.expand(2)), contrastive_loss(v, t, s))
    assert contrastive_loss(v, t, scale, hard_text=ht, hard_text_valid=torch.zeros(2, 4, dtype=torch.bool)) \
        == pytest.approx(contrastive_loss(v, t, scale).item(), rel=1e-6)


def test_hard_negatives_are_the_same_at_any_world_size(world_tokenizer):
    data = tiny_data(n_groups=8)
    data.tokenizer = world_tokenizer
    ids, mask = world_tokenizer.encode(["a small red circle moves left", "a big blue square falls"] * 16, 12)
    data.caption_ids, data.caption_mask = ids, mask
    cfg = TrainConfig(groups_per_step=4, groups_per_unit=2, negatives_per_item=1, hard_negatives="both")
    whole = step_batch(data, cfg, 3, 0, 1, torch.device("cpu"))
    parts = [step_batch(data, cfg, 3, r, 2, torch.device("cpu")) for r in range(2)]
    assert whole.hard["text_valid"].all()
    assert not torch.equal(whole.hard["text"], whole.inputs["text"])
    for key in ("text", "video", "text_valid"):  # two units: rank 0 takes the first, rank 1 the second
        assert torch.equal(torch.cat([p.hard[key] for p in parts]), whole.hard[key])
    with pytest.raises(ValueError, match="needs the data's tokenizer"):
        step_batch(tiny_data(n_groups=8), cfg, 0, 0, 1, torch.device("cpu"))


def test_training_a_decomposed_model_with_hard_negatives():
    cross = tiny_model("single_stream_tiny")
    dual = slimvl.decompose(cross, copy=True, learn_temperature=False)
    before = {k: v.clone() for k, v in dual.state_dict().items()}
    cfg = TrainConfig(steps=4, groups_per_step=4, groups_per_unit=4, negatives_per_item=0, hard_negatives="videos",
                      lr=1e-3, warmup_steps=1, device=DEVICE, log_every=1)
    result = train(dual, tiny_data(n_groups=6), cfg, progress=False)
    assert all(math.isfinite(h["loss"]) for h in result.history)
    after = dual.state_dict()
    assert torch.equal(after["logit_scale"].cpu(), before["logit_scale"])  # fixed temperature
    assert not torch.equal(after["backbone.proj.weight"].cpu(), before["backbone.proj.weight"])
    assert weights_checksum(cross) == dual.config.source_checksum  # copy: the cross-encoder is untouched


# -- retrieve, then re-rank ---------------------------------------------------------
def test_reranking_the_whole_gallery_is_the_cross_encoders_ranking():
    cross = tiny_model("single_stream_tiny", seed=1).eval()
    dual = slimvl.decompose(cross, copy=True)
    with torch.no_grad():  # another ranking than the cross-encoder's, so that re-ranking has work to do
        dual.backbone.proj.weight.normal_()
    data = tiny_data()
    n_items = data.videos.shape[0]
    full = score_matrix(cross, data, progress=False)
    t2v, v2t = reranked_scores(dual, cross, data, n_items, progress=False)
    assert torch.equal(t2v_ranks(t2v, data.caption_item), t2v_ranks(full, data.caption_item))
    dense = score_matrix(dual, data, progress=False)
    assert not torch.equal(t2v_ranks(dense, data.caption_item), t2v_ranks(full, data.caption_item))
    # Video -> text re-scores each video's top n_items of its 2 * n_items captions; the rest stay below,
    # in the dual encoder's order.
    top = dense.topk(n_items, dim=0).indices
    inside = torch.zeros_like(dense, dtype=torch.bool).scatter_(0, top, True)
    for i in range(n_items):
        assert v2t[inside[:, i], i].min() > v2t[~inside[:, i], i].max()
        assert torch.equal(v2t[~inside[:, i], i].argsort(), dense[~inside[:, i], i].argsort())
    one_each = torch.arange(0, len(data.caption_item), 2)  # one caption per item: v2t re-ranks them all
    sub = type(data)(data.videos, data.caption_ids[one_each], data.caption_mask[one_each],
                     data.caption_item[one_each], data.groups)
    _, v2t = reranked_scores(dual, cross, sub, n_items, progress=False)
    assert torch.equal(v2t_ranks(v2t, sub.caption_item), v2t_ranks(full[one_each], sub.caption_item))


def test_reranking_few_candidates_moves_only_them():
    cross = tiny_model("single_stream_tiny", seed=1).eval()
    dual = slimvl.decompose(tiny_model("single_stream_tiny", seed=2)).eval()
    data = tiny_data()
    dense = score_matrix(dual, data, progress=False)
    timings = {}
    t2v, _ = reranked_scores(dual, cross, data, 3, progress=False, timings=timings)
    top = dense.topk(3, dim=1).indices
    full = score_matrix(cross, data, progress=False)
    for c in range(len(dense)):
        assert set(t2v[c].topk(3).indices.tolist()) == set(top[c].tolist())  # the candidates stay on top
        order = t2v[c, top[c]].argsort(descending=True)
        assert torch.equal(order, full[c, top[c]].argsort(descending=True))  # ordered by the cross-encoder
    assert 0 < timings["reranked_pairs"] <= 2 * 3 * len(dense)
    m = evaluate_reranked(dual, data, 3, cross, progress=False)
    assert m["k"] == 3 and 0 <= m["t2v_r1"] <= 1 and m["rerank_seconds"] > 0


def test_bad_rerank_requests():
    dual = slimvl.decompose(tiny_model("single_stream_tiny")).eval()
    data = tiny_data()
    for k, match in ((0, "positive integer"), (13, "only 12 videos")):
        with pytest.raises(ValueError, match=match):
            reranked_scores(dual, dual.backbone, data, k, progress=False)
    assert parse_retrieval("all") is None and parse_retrieval("rerank:50") == 50
    for bad in ("rerank", "rerank:0", "rerank:-3", "top:5"):
        with pytest.raises(ValueError, match="--retrieval"):
            parse_retrieval(bad)
    assert evaluate(dual, data, progress=False)["n_items"] == 12
