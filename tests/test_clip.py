"""The CLIP dual encoder: its towers (causal text, [CLS]-pooled vision), the
retrieval protocol, CrossGET's cross tokens and their consistency term,
training, checkpoints and FLOP accounting."""
import json
import math

import pytest
import torch
from helpers import DEVICE, tiny_data, tiny_model

import slimvl
from slimvl.bench.flops import count_flops
from slimvl.checkpoint import load_model, save_checkpoint
from slimvl.models import ClipConfig, ClipModel, get_config
from slimvl.models.clip import CrossConsistencyObjective, cross_consistency_loss
from slimvl.nn import Block
from slimvl.train import TrainConfig, train

SMALL = dict(depth=2, text_depth=2)


def clip(cross: bool = False, seed: int = 0, **overrides) -> ClipModel:
    return tiny_model("clip_tiny", seed=seed, cross_tokens=cross, **{**SMALL, **overrides}).eval()


def inputs(seed: int = 0, b: int = 3, frames: int = 2):
    g = torch.Generator().manual_seed(seed)
    video = torch.rand(b, frames, 3, 32, 32, generator=g) * 2 - 1
    ids = torch.randint(5, 50, (b, 12), generator=g)
    mask = torch.ones(b, 12, dtype=torch.bool)
    mask[0, 5:] = False
    mask[1, 9:] = False
    return video, ids, mask


def test_presets_build():
    for name, dim, depth, patches in (("clip_tiny", 64, 4, 64), ("clip_small", 128, 6, 256),
                                      ("clip_base", 768, 12, 196)):
        c = get_config(name)
        assert isinstance(c, ClipConfig) and (c.dim, c.depth, c.tubelet) == (dim, depth, 1)
        assert (c.image_size // c.patch_size) ** 2 == patches
    assert get_config("clip_base").embed_dim == 512 and get_config("clip_base").text_depth == 12
    with torch.device("meta"):  # the base model's shapes, without its memory
        base = slimvl.create_model("clip_base")
    assert len(base.vision_blocks) == len(base.text_blocks) == 12 and base.proj.weight.shape == (512, 768)
    small = slimvl.create_model("clip_small")
    assert isinstance(small, slimvl.ClipModel) and small.patch_embed.num_tokens(1) == 256
    assert small.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert len(small.named_blocks("self")) == 6 + 4 and small.vision_cross is None


@pytest.mark.parametrize("cross", [False, True])
def test_encodings_are_unit_norm_and_scores_are_their_cosines(cross):
    model = clip(cross)
    video, ids, mask = inputs()
    with torch.no_grad():
        v, t = model.encode_video(video), model.encode_text(ids, mask)
        out = model({"video": video, "text": ids, "text_mask": mask})
        scores = model.score_cached(model.cache_texts(ids, mask), model.cache_videos(video))
        uni_v, uni_t, reuse = model.encode_unimodal({"video": video, "text": ids, "text_mask": mask})
    assert v.shape == t.shape == (3, 16) and v.dtype == t.dtype == torch.float32
    torch.testing.assert_close(v.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(t.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(out.logits, (v * t).sum(-1))
    torch.testing.assert_close(out.pooled, t)
    torch.testing.assert_close(scores, t @ v.T)
    torch.testing.assert_close(torch.nn.functional.normalize(uni_v, dim=-1), v)
    torch.testing.assert_close(torch.nn.functional.normalize(uni_t, dim=-1), t)
    assert reuse is None and model.cacheable and not model.has_pair_scorer
    image = model.encode_video(video[:, :1])  # an image is a one-frame video
    assert image.shape == (3, 16) and not torch.allclose(image, v)


def test_bad_inputs_are_refused_naming_the_shape():
    model = clip()
    video, ids, mask = inputs()
    with pytest.raises(ValueError, match=r"video: expected shape \[B, T<=8, 3, 32, 32\]"):
        model.encode_video(video[:, :, :, :16])
    with pytest.raises(ValueError, match="text_ids/text_mask"):
        model.encode_text(ids, mask.long())
    with pytest.raises(ValueError, match="text_ids: expected shape"):
        model(video[:2], ids, mask)
    holey = mask.clone()
    holey[2, 3] = False  # a real token after padding: the EOT would be misplaced
    with pytest.raises(ValueError, match="text_mask: expected each row"):
        model.encode_text(ids, holey)
    with pytest.raises(ValueError, match="at least one real token"):
        model.encode_text(ids, torch.zeros_like(mask))


@pytest.mark.parametrize("cross", [False, True])
def test_text_tower_is_causal(cross):
    model = clip(cross)
    _, ids, _ = inputs()
    mask = torch.ones_like(ids, dtype=torch.bool)
    i = 5
    changed = ids.clone()
    changed[:, i + 1:] = (changed[:, i + 1:] + 7) % 50
    with torch.no_grad():
        a = model.run_tower("text", *model.tower_input("text", text_ids=ids, text_mask=mask))[0]
        b = model.run_tower("text", *model.tower_input("text", text_ids=changed, text_mask=mask))[0]
    torch.testing.assert_close(a[:, :i + 1], b[:, :i + 1], rtol=0, atol=0)
    assert not torch.allclose(a[:, i + 1:12], b[:, i + 1:12])


@pytest.mark.parametrize("cross", [False, True])
def test_a_captions_embedding_does_not_depend_on_its_padding(cross):
    model = clip(cross)
    _, ids, mask = inputs()
    with torch.no_grad():
        alone = torch.cat([model.encode_text(ids[k:k + 1, :int(mask[k].sum())], mask[k:k + 1, :int(mask[k].sum())])
                           for k in range(len(ids))])
        padded = model.encode_text(ids.masked_fill(~mask, 7), mask)  # what sits under the padding must not matter
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)
    if cross:  # nor the cross token, the one token placed after the padding
        with torch.no_grad():
            tower = lambda i, m: model.run_tower("text", *model.tower_input("text", text_ids=i, text_mask=m))[0]
            last = torch.cat([tower(ids[k:k + 1, :int(mask[k].sum())], mask[k:k + 1, :int(mask[k].sum())])[:, -1]
                              for k in range(len(ids))])
            torch.testing.assert_close(tower(ids.masked_fill(~mask, 7), mask)[:, -1], last, atol=1e-5, rtol=1e-5)


# -- cross tokens --------------------------------------------------------------
def test_cross_tokens_start_as_copies_of_the_pooled_tokens_and_stay_last():
    model = clip(True)
    assert torch.equal(model.vision_cross, torch.zeros(2, 32)) and torch.equal(model.text_cross, torch.zeros(2, 32))
    assert clip(False).vision_cross is None and "vision_cross" in dict(model.named_parameters())
    video, ids, mask = inputs()
    with torch.no_grad():
        xv, mv = model.tower_input("video", video=video)
        xt, mt = model.tower_input("text", text_ids=ids, text_mask=mask)
        embedded = model.text_embed(ids)
    assert xv.shape == (3, 1 + 32 + 1, 32) and mv.all()
    torch.testing.assert_close(xv[:, -1], xv[:, 0])
    assert xt.shape == (3, 13, 32) and mt[:, -1].all() and torch.equal(mt[:, :12], mask)
    torch.testing.assert_close(xt[:, -1], embedded[torch.arange(3), mask.sum(1) - 1])  # the EOT's embedding
    assert torch.equal(model.causal_mask(3), torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool))


@pytest.mark.parametrize("method", [None, "crossget", "tome"])
def test_hidden_cross_tokens_with_zero_offsets_change_nothing(method):
    """``cross_hidden``: no token reads the cross token, so with zero offsets
    the embeddings are the plain model's (patched at r = 0 too); visible, a
    vision cross token changes them. At r > 0 the hidden token stays last
    and protected, and the cross token still reads the others."""
    from slimvl.merge import patch

    plain = clip(False, seed=3)
    hidden, visible = (clip(True, seed=3, cross_hidden=h) for h in (True, False))
    for m in (hidden, visible):
        m.load_state_dict(plain.state_dict(), strict=False)  # the same weights, zero offsets
        if method:
            patch(m, method, r=0)
    video, ids, mask = inputs(1)
    with torch.no_grad():
        torch.testing.assert_close(hidden.encode_video(video), plain.encode_video(video), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(hidden.encode_text(ids, mask), plain.encode_text(ids, mask), atol=1e-5, rtol=1e-5)
        assert (visible.encode_video(video) - plain.encode_video(video)).abs().max() > 1e-3
        if method:
            hidden.r = 8
            merged = hidden.encode_video(video)
            assert hidden.merge_report["video"]["tokens"] == [1 + 32 + 1 - 8, 1 + 32 + 1 - 16]
            assert merged.shape == (3, 16) and torch.isfinite(merged).all()
            x, m = hidden.tower_input("video", video=video)
            out, keys = hidden.run_tower("video", x, m)
            assert keys.all() and out.shape == (3, 1 + 32 + 1 - 16, 32)


def test_cross_step_stops_the_gradient_of_the_cross_token_only():
    model = clip(True)
    x = torch.randn(2, 5, 32, requires_grad=True)
    offset = torch.randn(32, requires_grad=True)
    y, token = model.cross_step(x, offset)
    torch.testing.assert_close(y[:, -1], x[:, -1] + offset)
    torch.testing.assert_close(token, y[:, -1])
    torch.testing.assert_close(y[:, :-1], x[:, :-1])
    w = torch.randn_like(y)
    (y * w).sum().backward()
    assert torch.equal(x.grad[:, -1], torch.zeros(2, 32)) and torch.equal(x.grad[:, :-1], w[:, :-1])
    torch.testing.assert_close(offset.grad, w[:, -1].sum(0))


def test_the_input_cross_token_gets_no_gradient_and_each_layers_token_only_its_offsets():
    model = clip(True, depth=3, text_depth=3)
    video, ids, mask = inputs()
    # Vision: the [CLS] reads the cross token at every layer, yet its input value gets no gradient.
    x, m = model.tower_input("video", video=video)
    x = x.detach().requires_grad_()
    model.run_tower("video", x, m)[0][:, 0].sum().backward()
    assert torch.equal(x.grad[:, -1], torch.zeros(3, 32)) and x.grad[:, :-1].abs().sum() > 0
    # Text: no other token reads the (last) cross token, so without the stop each layer's cross
    # token would reach every earlier offset; with it, only its own.
    model.cross_record = {}
    model.run_tower("text", *model.tower_input("text", text_ids=ids, text_mask=mask))
    record, model.cross_record = model.cross_record["text"], None
    assert record.shape == (3, 3, 32)
    for i in range(3):
        (grad,) = torch.autograd.grad(record[:, i].sum(), model.text_cross, retain_graph=True)
        assert grad[i].abs().sum() > 0
        assert torch.equal(grad[torch.arange(3) != i], torch.zeros(2, 32)), f"layer {i}"


def test_recording_keeps_the_first_encoding_of_a_step():
    model = clip(True)
    video, ids, mask = inputs()
    model.cross_record = {}
    first = model.embed_video(video)
    model.embed_video(video.flip(0))  # e.g. hard negatives, encoded after the pairs
    record, model.cross_record = model.cross_record, None
    assert set(record) == {"video"} and record["video"].shape == (3, 2, 32)
    x, _ = model.tower_input("video", video=video)
    # The token entering the first block: the [CLS] copy plus the first offset (zero at first).
    torch.testing.assert_close(record["video"][:, 0], x[:, -1])
    assert first.shape == (3, 16)


def _aligned_heads(model):
    """Make the text head the vision head: equal inputs then give equal distributions."""
    with torch.no_grad():
        model.vision_norm.weight.normal_()
        model.text_norm.load_state_dict(model.vision_norm.state_dict())
        model.text_proj.load_state_dict(model.proj.state_dict())


def test_consistency_loss_is_zero_only_for_equal_distributions():
    model = clip(True)
    _aligned_heads(model)
    tokens = torch.randn(4, 2, 32)
    assert cross_consistency_loss(tokens, tokens.clone(), model).item() == pytest.approx(0.0, abs=1e-7)
    other = cross_consistency_loss(tokens, torch.randn(4, 2, 32), model)
    assert other.item() > 1e-4 and other.dtype == torch.float32
    # Depths differ: the layers are paired from the last backwards.
    deep = torch.cat([torch.randn(4, 3, 32), tokens], 1)
    assert cross_consistency_loss(deep, tokens, model).item() == pytest.approx(0.0, abs=1e-7)
    text = torch.randn(4, 2, 32)
    torch.testing.assert_close(cross_consistency_loss(deep, text, model), cross_consistency_loss(tokens, text, model))
    with pytest.raises(ValueError, match=r"video_cross \[B, Lv, D\]"):
        cross_consistency_loss(tokens, tokens[:3], model)


def test_consistency_loss_trains_the_offsets_alone():
    model = clip(True)
    video, ids, mask = inputs()
    model.cross_record = {}
    model.embed_video(video), model.embed_text(ids, mask)
    record, model.cross_record = model.cross_record, None
    loss = cross_consistency_loss(record["video"], record["text"], model)
    loss.backward()
    for head in (model.vision_norm, model.proj, model.text_norm, model.text_proj):
        assert all(p.grad is None for p in head.parameters())
    assert model.vision_cross.grad.abs().sum() > 0 and model.text_cross.grad.abs().sum() > 0
    # As in CrossGET's code, it sees stopped values plus offsets: the layers learn from the task loss only.
    assert all(p.grad is None for blk in (*model.vision_blocks, *model.text_blocks) for p in blk.parameters())


class _Contrastive(torch.nn.Module):
    """A stand-in task objective: InfoNCE over matched rows."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch):
        v, t, _ = self.model.encode_unimodal(batch)
        logits = torch.nn.functional.normalize(v, dim=-1) @ torch.nn.functional.normalize(t, dim=-1).T
        loss = torch.nn.functional.cross_entropy(logits * 10, torch.arange(len(v)))
        return loss, {"itc": loss.item()}


def test_the_objective_mixes_in_the_consistency_term():
    model = clip(True, cross_weight=0.25).train()
    video, ids, mask = inputs()
    batch = {"video": video, "text": ids, "text_mask": mask}
    task = _Contrastive(model)
    objective = model.training_objective(task)
    assert isinstance(objective, CrossConsistencyObjective) and objective.model is model
    torch.manual_seed(0)
    loss, parts = objective(batch)
    assert model.cross_record is None and set(parts) == {"itc", "cross"} and parts["cross"] > 0
    assert loss.item() == pytest.approx(0.75 * float(parts["itc"]) + 0.25 * float(parts["cross"]), rel=1e-5)
    loss.backward()
    assert model.vision_cross.grad.abs().sum() > 0 and model.text_cross.grad.abs().sum() > 0
    assert clip(False).training_objective(task) is task
    assert clip(True, cross_weight=0.0).training_objective(task) is task

    def fails(batch):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        CrossConsistencyObjective(fails, model)(batch)
    assert model.cross_record is None  # never left recording


@pytest.mark.parametrize("cross", [False, True])
def test_training_and_checkpoint_round_trip(cross, tmp_path):
    model = tiny_model("clip_tiny", cross_tokens=cross, **SMALL)
    cfg = TrainConfig(steps=2, groups_per_step=4, groups_per_unit=2, warmup_steps=1, log_every=1, lr=1e-3,
                      device=DEVICE)
    result = train(model, tiny_data(), cfg, run_dir=tmp_path, progress=False)
    assert result.steps == 2 and all(math.isfinite(h["loss"]) for h in result.history)
    assert all(("cross" in h) == cross and "itc" in h for h in result.history)
    if cross:  # the text offsets learn from the consistency term alone: no text token reads them
        assert model.vision_cross.abs().sum() > 0 and model.text_cross.abs().sum() > 0
    model.eval().cpu()
    save_checkpoint(tmp_path / "ckpt", model)
    back = load_model(tmp_path / "ckpt").eval()
    assert isinstance(back, ClipModel) and back.config == model.config
    video, ids, mask = inputs()
    with torch.no_grad():
        torch.testing.assert_close(back.encode_video(video), model.encode_video(video), rtol=0, atol=0)
        torch.testing.assert_close(back.encode_text(ids, mask), model.encode_text(ids, mask), rtol=0, atol=0)


@pytest.mark.parametrize("cross", [False, True])
def test_analytic_flops_are_the_counted_ones(cross):
    model = clip(cross)
    frames, text_len, b = 2, 7, 2
    video, ids, _ = inputs(b=b, frames=frames)
    ids, mask = ids[:, :text_len], torch.ones(b, text_len, dtype=torch.bool)
    flops = model.retrieval_flops(frames, text_len)
    assert count_flops(lambda: model.encode_video(video), model) == b * flops["video"]
    assert count_flops(lambda: model.encode_text(ids, mask), model) == b * flops["text"]
    assert flops["pair"] == 2 * 16 and model.analytic_flops(frames, text_len) == sum(flops.values())
    if cross:  # one more token per tower
        plain = clip(False).retrieval_flops(frames, text_len)
        assert flops["video"] > plain["video"] and flops["text"] > plain["text"]


@pytest.mark.parametrize("field,value", [("depth", 0), ("text_depth", -1), ("text_depth", 1.5),
                                         ("cross_tokens", "yes"), ("cross_hidden", True), ("cross_hidden", 1),
                                         ("cross_weight", 1.0), ("cross_weight", -0.1),
                                         ("temperature", 0.005), ("temperature", float("nan")),
                                         ("num_answers", 3)])
def test_bad_config_fields_are_named(field, value):
    with pytest.raises(ValueError, match=f"ClipConfig.{field}="):
        ClipConfig(**{field: value})


def test_blocks_are_where_per_layer_techniques_find_them():
    model = clip(True)
    names = [n for n, _ in model.named_blocks()]
    assert names == ["vision_blocks.0", "vision_blocks.1", "text_blocks.0", "text_blocks.1"]
    assert all(isinstance(b, Block) for b in model.tower_layers("text")[0])
    with pytest.raises(ValueError, match="tower='audio'"):
        model.tower_layers("audio")


def test_cli_trains_clip_tiny(tmp_path, capsys):
    from slimvl.cli import main
    from slimvl.data import make_dataset

    data = make_dataset(tmp_path / "data", n_train=8, n_val=4, n_test=4, frames=2, size=32, progress=False)
    main(["-q", "train", "--data", str(data), "--model", "clip_tiny", "--set", "dim=32", "--set", "heads=2",
          "--set", "image_size=32", "--set", "max_text_len=24", "--set", "cross_tokens=true", "--frames", "2",
          "--steps", "1", "--out", str(tmp_path / "run"), "--train-set", "groups_per_step=2",
          "--train-set", "groups_per_unit=2", "--train-set", "warmup_steps=1"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["steps"] == 1
    log = json.loads((tmp_path / "run" / "train_log.json").read_text())
    assert "cross" in log["history"][-1]


def test_the_text_cross_token_is_seeded_from_the_eot_before_every_layer():
    model = clip(True, depth=2, text_depth=2)
    with torch.no_grad():
        model.text_cross.normal_()
    _, ids, mask = inputs()
    model.cross_record = {}
    x, m = model.tower_input("text", text_ids=ids, text_mask=mask)
    with torch.no_grad():
        out = model.run_tower("text", x, m)[0]
        eot = mask.sum(1) - 1
        rows = torch.arange(len(ids))
        first = model.text_blocks[0](model.cross_step(x, model.text_cross[0], eot)[0], key_padding_mask=m,
                                     mask=model.causal_mask(x.shape[1]))
    record, model.cross_record = model.cross_record["text"], None
    torch.testing.assert_close(record[:, 0], x[rows, eot] + model.text_cross[0])
    torch.testing.assert_close(record[:, 1], first[rows, eot] + model.text_cross[1])
    assert out.shape == x.shape
