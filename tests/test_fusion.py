"""The fusion encoders (early, late, MBT, LoCoMT) and LoCoMT's per-head views:
routing (who reads whom), padding, analytic FLOPs against torch's counter,
and LoCoMT's cost guarantee."""
from __future__ import annotations

import random

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from slimvl.bench import count_flops
from slimvl.bench.flops import _custom_mapping
from slimvl.nn import Attention
from slimvl.nn.fusion import SCHEMES, FusionEncoder
from slimvl.nn.views import View, ViewAttention, all_views, modality_self_attention_flops, view_map

MODS = ["audio", "video", "text"]


def _tokens(lengths=(12, 20, 6), b=2, dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {m: torch.randn(b, n, dim, generator=g) for m, n in zip(MODS, lengths)}


def _attention_flops(fn) -> int:
    """FLOPs of the attention products alone (the SDPA calls)."""
    mode = FlopCounterMode(display=False, custom_mapping=_custom_mapping())
    with mode, torch.no_grad():
        fn()
    return sum(v for op, v in mode.get_flop_counts()["Global"].items() if "scaled_dot_product" in str(op))


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("padded", [False, True])
def test_analytic_flops_are_the_counted_ones(scheme, padded):
    torch.manual_seed(0)
    enc = FusionEncoder(scheme, MODS, 32, 4, 3, fusion_layer=1 if scheme == "mbt" else None).eval()
    x = _tokens()
    masks = {"text": torch.tensor([[True] * 6, [True] * 4 + [False] * 2])} if padded else None
    counted = count_flops(lambda: enc(x, masks), enc) / 2
    assert counted == enc.flops({m: t.shape[1] for m, t in x.items()})


def test_locomt_never_costs_more_attention_than_modality_wise_self_attention():
    rng = random.Random(0)
    dim, heads = 32, 8
    for trial in range(12):
        lengths = [rng.randint(1, 40) for _ in MODS]
        x = _tokens(lengths, b=1, dim=dim, seed=trial)
        if trial < 4:
            views = view_map("random:%d" % trial, MODS, heads, 1)[0]
        elif trial < 8:
            views = view_map("default", MODS, heads, 1)[0]
        else:  # as costly as a map can be: one head per modality, the rest on the longest cross view
            longest = sorted(MODS, key=lambda m: -x[m].shape[1])
            views = [View(m, m) for m in MODS] + [View(longest[0], longest[1])] * (heads - len(MODS))
        attn = ViewAttention(dim, views).eval()
        lo = _attention_flops(lambda: attn(x))
        selfs = [Attention(dim, heads).eval() for _ in MODS]
        bound = _attention_flops(lambda: [a(x[m]) for a, m in zip(selfs, MODS)])
        assert 0 < lo <= bound, (lengths, [str(v) for v in views])
        assert bound == modality_self_attention_flops({m: t.shape[1] for m, t in x.items()}, dim)
    # Early fusion, for scale: far above both on long inputs.
    x = _tokens((40, 40, 40), b=1)
    early = _attention_flops(lambda: Attention(32, 8).eval()(torch.cat(list(x.values()), 1)))
    assert early == 3 * modality_self_attention_flops({m: 40 for m in MODS}, 32)


def test_a_head_reads_only_its_view():
    torch.manual_seed(0)
    attn = ViewAttention(32, [View("audio", "audio"), View("video", "audio"), View("text", "text"),
                              View("video", "video")]).eval()
    x = _tokens()
    with torch.no_grad():
        base = attn(x)
        for changed, same, moved in (("audio", ["text"], ["audio", "video"]),  # video's head 1 reads audio
                                     ("video", ["audio", "text"], ["video"]),
                                     ("text", ["audio", "video"], ["text"])):
            y = dict(x)
            y[changed] = y[changed] + torch.randn_like(y[changed])
            out = attn(y)
            for m in same:
                torch.testing.assert_close(out[m], base[m], rtol=0, atol=0)
            for m in moved:
                assert not torch.allclose(out[m], base[m])


@pytest.mark.parametrize("scheme,exchanges", [("early", True), ("late", False), ("mbt", True), ("locomt", True)])
def test_which_schemes_let_modalities_read_each_other(scheme, exchanges):
    torch.manual_seed(0)
    enc = FusionEncoder(scheme, MODS, 32, 4, 3).eval()
    x = _tokens()
    y = {**x, "audio": x["audio"] + torch.randn_like(x["audio"])}
    with torch.no_grad():
        a, b = enc(x), enc(y)
    assert torch.allclose(a["video"], b["video"]) != exchanges
    if scheme == "mbt":  # fused from layer 2 of 3; fused nowhere, it is late fusion
        late = FusionEncoder("mbt", MODS, 32, 4, 3, fusion_layer=3).eval()
        with torch.no_grad():
            torch.testing.assert_close(late(x)["video"], late(y)["video"], rtol=0, atol=0)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_padding_is_never_read(scheme):
    torch.manual_seed(0)
    enc = FusionEncoder(scheme, MODS, 32, 4, 2, fusion_layer=1 if scheme == "mbt" else None).eval()
    x = _tokens()
    masks = {"text": torch.tensor([[True] * 6, [True] * 3 + [False] * 3])}
    y = {**x, "text": x["text"].clone()}
    y["text"][1, 3:] += 5 * torch.randn(3, 32)
    with torch.no_grad():
        a, b = enc(x, masks), enc(y, masks)
    for m in MODS:
        torch.testing.assert_close(a[m][:, :3], b[m][:, :3], rtol=1e-5, atol=1e-6)


def test_view_maps():
    default = view_map("default", MODS, 6, 3)
    assert [len(layer) for layer in default] == [6, 6, 6]
    assert {str(v) for layer in default for v in layer} == {str(v) for v in all_views(MODS)}  # every view appears
    assert all(layer[:3] == [View(m, m) for m in MODS] for layer in default)  # every modality keeps a self view
    ring = view_map("default", MODS, 3, 2)  # one head per modality: self views, then a ring of cross views
    assert [str(v) for v in ring[1]] == ["audio->video", "video->text", "text->audio"]
    assert view_map("random:1", MODS, 4, 2) == view_map("random:1", MODS, 4, 2)
    given = view_map(["audio", "video", "text", "audio->video"], MODS, 4, 2)
    assert given[0] == given[1] and given[0][3] == View("audio", "video")
    assert View.parse("video -> text") == View("video", "text") and str(View("a", "b")) == "a->b"
    bad = [(["audio", "video", "text", "audio->sound"], 4, "names \\['sound'\\]"),
           (["audio", "video", "text"], 4, "3 views for 4 heads"),
           (["audio", "audio", "text", "audio->video"], 4, "no head queries \\['video'\\]"),
           ("default", 2, "2 heads cannot"),
           ("sometimes", 4, "expected 'default'"),
           (["audio->", "video", "text"], 3, "expected a modality")]
    for spec, heads, msg in bad:
        with pytest.raises(ValueError, match=msg):
            view_map(spec, MODS, heads, 1)


def test_bad_encoders_and_inputs():
    with pytest.raises(ValueError, match="fusion='mid'"):
        FusionEncoder("mid", MODS, 32, 4, 2)
    with pytest.raises(ValueError, match="fusion_layer=5"):
        FusionEncoder("mbt", MODS, 32, 4, 2, fusion_layer=5)
    enc = FusionEncoder("early", MODS, 32, 4, 1)
    with pytest.raises(ValueError, match="expected tokens of"):
        enc({"video": torch.randn(1, 2, 32)})
    with pytest.raises(ValueError, match="text tokens: expected"):
        enc({**_tokens(), "text": torch.randn(2, 6, 16)})
