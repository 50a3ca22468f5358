"""Tests for slimvl.models and slimvl.nn: presets, configs, input checks, masking, cost."""

import pytest
import torch

from slimvl import (PerceiverVL, PerceiverVLConfig, SingleStream, SingleStreamConfig, VLOutput, build_model,
                    create_model, get_config, list_models)
from slimvl.models import config_from_dict

TINY = dict(dim=32, heads=2, image_size=32, patch_size=8, vocab_size=50, max_text_len=12, embed_dim=16)
NAMES = ("perceiver_vl_tiny", "single_stream_tiny")


def tiny(name: str, **kw):
    torch.manual_seed(0)
    return create_model(name, **{**TINY, **kw}).eval()


def inputs(model, b=2, t=4, length=6, seed=0):
    c = model.config
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(b, t, 3, c.image_size, c.image_size, generator=g)
    ids = torch.randint(0, c.vocab_size, (b, length), generator=g)
    mask = torch.ones(b, length, dtype=torch.bool)
    return video, ids, mask


@pytest.fixture(scope="module", params=NAMES)
def model(request):
    return tiny(request.param)


# ------------------------------------------------------------------ registry

def test_list_models_contains_both_families():
    names = list_models()
    assert names == sorted(names)
    for n in ("perceiver_vl_tiny", "single_stream_tiny", "perceiver_vl_base", "single_stream_base"):
        assert n in names


@pytest.mark.parametrize("name", NAMES)
def test_presets_build_and_return_vloutput(name):
    m = tiny(name)
    assert isinstance(m, PerceiverVL if name.startswith("perceiver") else SingleStream)
    video, ids, mask = inputs(m, b=3)
    with torch.no_grad():
        out = m(video, ids, mask)
    assert isinstance(out, VLOutput)
    assert out.logits.shape == (3,)
    assert out.pooled.shape == (3, m.config.embed_dim)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.pooled).all()


def test_every_preset_config_is_valid_and_builds_its_class():
    from slimvl.models.registry import MODEL_CLASSES

    for name in list_models():
        cfg = get_config(name)
        assert cfg.model_type in MODEL_CLASSES  # registered with its class (tests may register more)
        assert name.startswith(cfg.model_type)
    kinds = ("perceiver_vl", "single_stream", "clip")
    assert {n for n in list_models() if not n.startswith("test_")} == {
        f"{kind}_{size}" for kind in kinds for size in ("tiny", "small", "base")} | {
        "perceiver_cls_tiny", "perceiver_cls_small"} | {
        f"fusion_{scheme}_{size}" for scheme in ("early", "late", "mbt", "locomt") for size in ("tiny", "base")}
    # Building a small preset as-is (the default tiny sizes) works too.
    m = create_model("perceiver_vl_tiny")
    assert m.config == get_config("perceiver_vl_tiny")


def test_overrides_apply():
    m = create_model("perceiver_vl_tiny", **TINY, num_latents=5, layers="cscs")
    assert m.config.num_latents == 5 and m.config.layers == "cscs" and m.config.dim == 32
    assert m.encoder.latents.shape == (5, 32)
    assert len(m.encoder.layers) == 4
    s = create_model("single_stream_tiny", **TINY, depth=3)
    assert len(s.blocks) == 3 and s.config.depth == 3
    assert s.proj.out_features == TINY["embed_dim"]


def test_unknown_preset_lists_available():
    with pytest.raises(ValueError) as e:
        create_model("no_such_model")
    msg = str(e.value)
    assert "no_such_model" in msg
    for n in list_models():
        assert n in msg


def test_unknown_override_names_the_key():
    with pytest.raises(ValueError, match="depth"):
        create_model("perceiver_vl_tiny", depth=3)  # a SingleStream field, not a Perceiver one


# ------------------------------------------------------------------ configs

@pytest.mark.parametrize("name,overrides,field", [
    ("perceiver_vl_tiny", dict(num_latents=0), "num_latents"),
    ("perceiver_vl_tiny", dict(dim=30, heads=4), "dim"),
    ("single_stream_tiny", dict(dim=30, heads=4), "dim"),
    ("perceiver_vl_tiny", dict(image_size=32, patch_size=6), "patch_size"),
    ("perceiver_vl_tiny", dict(layers="sc"), "layers"),
    ("perceiver_vl_tiny", dict(layers="cx"), "layers"),
    ("perceiver_vl_tiny", dict(layers=""), "layers"),
    ("single_stream_tiny", dict(depth=0), "depth"),
    ("single_stream_tiny", dict(heads=0), "heads"),
    ("single_stream_tiny", dict(dropout=1.0), "dropout"),
])
def test_invalid_config_fails_naming_field(name, overrides, field):
    with pytest.raises(ValueError) as e:
        create_model(name, **overrides)
    assert f".{field}=" in str(e.value)


def test_invalid_config_fails_at_dataclass_construction():
    with pytest.raises(ValueError, match="num_latents"):
        PerceiverVLConfig(num_latents=0)
    with pytest.raises(ValueError, match="depth"):
        SingleStreamConfig(depth=0)


@pytest.mark.parametrize("name", NAMES)
def test_config_dict_round_trip(name):
    cfg = get_config(name, **TINY)
    d = cfg.to_dict()
    assert d["model_type"] == cfg.model_type
    again = config_from_dict(d)
    assert type(again) is type(cfg)
    assert again == cfg
    assert again.to_dict() == d
    # build_model accepts the dict form too
    assert build_model(d).config == cfg


def test_from_dict_rejects_unknown_key():
    d = get_config("perceiver_vl_tiny").to_dict()
    d["num_latentz"] = 3
    with pytest.raises(ValueError, match="num_latentz"):
        config_from_dict(d)
    with pytest.raises(ValueError, match="bogus"):
        PerceiverVLConfig.from_dict({"bogus": 1})


def test_from_dict_rejects_unknown_model_type():
    with pytest.raises(ValueError, match="nope"):
        config_from_dict({"model_type": "nope"})


# ------------------------------------------------------------------ input checks

def _bad_inputs(model):
    c = model.config
    video, ids, mask = inputs(model, b=2, t=2)
    s = c.image_size
    return {
        "video_4d": (video[:, 0], ids, mask),
        "wrong_image_size": (torch.randn(2, 2, 3, s + 8, s + 8), ids, mask),
        "too_many_frames": (torch.randn(2, c.max_frames + 1, 3, s, s), ids, mask),
        "zero_frames": (torch.randn(2, 0, 3, s, s), ids, mask),
        "uint8_video": ((video * 10).clamp(0, 255).to(torch.uint8), ids, mask),
        "float_ids": (video, ids.float(), mask),
        "too_long_text": (video, torch.zeros(2, c.max_text_len + 1, dtype=torch.long),
                          torch.ones(2, c.max_text_len + 1, dtype=torch.bool)),
        "mask_not_bool": (video, ids, mask.long()),
        "mask_wrong_shape": (video, ids, mask[:, :-1]),
        "batch_mismatch": (video, ids[:1], mask[:1]),
    }


EXPECT = {
    "video_4d": "video",
    "wrong_image_size": "video",
    "too_many_frames": "video",
    "zero_frames": "video",
    "uint8_video": "video",
    "float_ids": "text_ids",
    "too_long_text": "text_ids",
    "mask_not_bool": "text_mask",
    "mask_wrong_shape": "text_mask",
    "batch_mismatch": "text_ids",
}


@pytest.mark.parametrize("case", sorted(EXPECT))
def test_bad_inputs_raise_valueerror_naming_expectation(model, case):
    c = model.config
    args = _bad_inputs(model)[case]
    with pytest.raises(ValueError) as e:
        model(*args)
    msg = str(e.value)
    assert msg.startswith(EXPECT[case] + ":")
    if EXPECT[case] == "video":
        # the expected shape is spelled out
        assert f"[B, T<={c.max_frames}, 3, {c.image_size}, {c.image_size}]" in msg
    if case in ("too_long_text", "batch_mismatch"):
        assert f"L<={c.max_text_len}" in msg and "B=2" in msg
    if case == "uint8_video":
        assert "uint8" in msg
    if case.startswith("mask"):
        assert "bool" in msg and "(2, 6)" in msg


def test_int32_ids_accepted(model):
    video, ids, mask = inputs(model)
    with torch.no_grad():
        a = model(video, ids, mask).logits
        b = model(video, ids.int(), mask).logits
    torch.testing.assert_close(a, b)


# ------------------------------------------------------------------ semantics

@pytest.mark.parametrize("name", NAMES)
def test_padding_invariance(name):
    """Extra padded text tokens (mask False) with random ids must not change the output."""
    m = tiny(name)
    video, ids, mask = inputs(m, b=3, t=4, length=5)
    mask[1, 3:] = False  # some padding already present in one row
    extra = 6
    g = torch.Generator().manual_seed(1)
    ids2 = torch.cat([ids, torch.randint(0, m.config.vocab_size, (3, extra), generator=g)], 1)
    mask2 = torch.cat([mask, torch.zeros(3, extra, dtype=torch.bool)], 1)
    with torch.no_grad():
        a = m(video, ids, mask)
        b = m(video, ids2, mask2)
        # Sanity: the same extra tokens *unmasked* do change the result, so the check has teeth.
        c = m(video, ids2, torch.ones_like(mask2))
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.pooled, b.pooled, atol=1e-5, rtol=0)
    assert (a.logits - c.logits).abs().max() > 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_padded_token_ids_do_not_matter(name):
    m = tiny(name)
    video, ids, mask = inputs(m, b=2, t=2, length=8)
    mask[:, 5:] = False
    ids_b = ids.clone()
    ids_b[:, 5:] = (ids_b[:, 5:] + 7) % m.config.vocab_size
    with torch.no_grad():
        torch.testing.assert_close(m(video, ids, mask).logits, m(video, ids_b, mask).logits, atol=1e-5, rtol=0)


def test_image_single_frame_works(model):
    video, ids, mask = inputs(model, b=2, t=1)
    with torch.no_grad():
        out = model(video, ids, mask)
    assert out.logits.shape == (2,)
    assert out.pooled.shape == (2, model.config.embed_dim)
    # An image is a one-frame video whose frame is repeated to fill the tubelet.
    rep = video.expand(2, model.config.tubelet, *video.shape[2:])
    with torch.no_grad():
        torch.testing.assert_close(model(rep, ids, mask).logits, out.logits, atol=1e-5, rtol=0)


def test_batch_independence(model):
    video, ids, mask = inputs(model, b=3)
    with torch.no_grad():
        full = model(video, ids, mask).logits
        one = model(video[1:2], ids[1:2], mask[1:2]).logits
    torch.testing.assert_close(full[1:2], one, atol=1e-5, rtol=1e-4)


def test_embed_video_and_text_shapes(model):
    video, ids, mask = inputs(model, b=3, t=2)
    mask[0, 4:] = False
    with torch.no_grad():
        ve = model.embed_video(video)
        te = model.embed_text(ids, mask)
    assert ve.shape == (3, model.config.embed_dim)
    assert te.shape == (3, model.config.embed_dim)
    assert torch.isfinite(ve).all() and torch.isfinite(te).all()
    # text padding invariance holds for the unimodal path too
    with torch.no_grad():
        te_trim = model.embed_text(ids[:, :4], mask[:, :4])
    torch.testing.assert_close(te[0], te_trim[0], atol=1e-5, rtol=0)


def test_embed_video_and_text_check_inputs(model):
    c = model.config
    with pytest.raises(ValueError, match="video"):
        model.embed_video(torch.randn(2, 3, c.image_size, c.image_size))
    ids = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="text_mask"):
        model.embed_text(ids, torch.ones(2, 4))


def test_logit_scale_init():
    m = tiny("perceiver_vl_tiny")
    assert m.logit_scale.exp().item() == pytest.approx(1 / 0.07)


# ------------------------------------------------------------------ cost

def test_perceiver_flops_linear_in_frames():
    m = tiny("perceiver_vl_tiny")
    tub = m.config.tubelet
    f = [m.analytic_flops(k * tub, 10) for k in (1, 2, 3)]
    assert f[2] - f[1] == f[1] - f[0] > 0
    # and linear in text length
    g = [m.analytic_flops(2, n) for n in (0, 5, 10)]
    assert g[2] - g[1] == g[1] - g[0] > 0


def test_single_stream_flops_superlinear_in_frames():
    m = tiny("single_stream_tiny")
    tub = m.config.tubelet
    f = [m.analytic_flops(k * tub, 10) for k in (1, 2, 3)]
    assert f[2] - f[1] > f[1] - f[0] > 0


def test_perceiver_cheaper_than_single_stream_on_long_inputs():
    p, s = tiny("perceiver_vl_tiny", max_frames=16), tiny("single_stream_tiny", max_frames=16)
    assert p.analytic_flops(16, 12) < s.analytic_flops(16, 12)


def test_num_params_counts_parameters():
    m = tiny("single_stream_tiny")
    assert m.num_params() == sum(p.numel() for p in m.parameters()) > 0
    bigger = tiny("single_stream_tiny", depth=m.config.depth + 1)
    assert bigger.num_params() > m.num_params()


@pytest.mark.parametrize("name", ["single_stream_tiny", "perceiver_vl_tiny"])
def test_named_blocks_reach_every_layer_a_forward_runs(name):
    """A per-layer technique (token merging's hook) reaches each model's
    layers through ``named_blocks``, wherever the model keeps them."""
    from slimvl.bench import dummy_inputs
    from slimvl.nn import Block, CrossBlock

    m = tiny(name).eval()
    blocks = m.named_blocks()
    assert {id(b) for _, b in blocks} == {id(x) for x in m.modules() if isinstance(x, (Block, CrossBlock))}
    assert all(isinstance(b, Block) for _, b in m.named_blocks("self"))
    assert all(isinstance(b, CrossBlock) for _, b in m.named_blocks("cross"))
    assert len(m.named_blocks("self")) + len(m.named_blocks("cross")) == len(blocks)
    video, ids, mask = dummy_inputs(m, 2, 8, 3)
    with torch.no_grad():
        plain = m(video, ids, mask).logits
        calls = []
        for name_, block in m.named_blocks("self"):
            block.between = lambda x, metric, n=name_: (calls.append(n), x)[1]  # identity, recorded
        hooked = m(video, ids, mask).logits
    assert calls == [n for n, _ in m.named_blocks("self")]  # every self-attention layer, once, in order
    torch.testing.assert_close(hooked, plain)
    with pytest.raises(ValueError, match="kind='latent'"):
        m.named_blocks("latent")


def test_qa_mlm_and_pair_scoring_read_an_inputs_mapping_as_the_positional_form():
    from slimvl.bench import dummy_inputs

    m = tiny("perceiver_vl_tiny", num_answers=5, mlm=True).eval()
    video, ids, mask = dummy_inputs(m, 2, 8, 3)
    inputs = {"video": video, "text": ids, "text_mask": mask}
    masked = torch.zeros_like(mask)
    masked[:, 2] = True
    with torch.no_grad():
        torch.testing.assert_close(m.answer(inputs), m.answer(video, ids, mask), rtol=0, atol=0)
        torch.testing.assert_close(m.mlm_logits(inputs, masked=masked), m.mlm_logits(video, ids, mask, masked),
                                   rtol=0, atol=0)
        items, captions = torch.tensor([0, 2, 1]), torch.tensor([1, 1, 0])
        pairs = m.score_pairs(inputs, items, captions)
        torch.testing.assert_close(pairs, m(video[items], ids[captions], mask[captions]).logits, rtol=0, atol=0)
    with pytest.raises(TypeError, match="masked"):
        m.mlm_logits(inputs)
