"""The fusion classifiers (fusion_* presets): audio + video (+ text) inputs,
every scheme; shapes, gradients, FLOPs against torch's counter, padding,
routing, boundary checks and config validation."""
from __future__ import annotations

import pytest
import torch

from slimvl.bench.flops import dummy_batch, model_flops_per_pair
from slimvl.models import FusionConfig, FusionModel, config_from_dict, create_model, get_config
from slimvl.nn import SpectrogramEmbed
from slimvl.nn.fusion import SCHEMES

# 32 video tokens (2 steps of 4 x 4 patches), 16 audio tokens (4 mel rows x 4 time patches of a 32-frame clip).
SMALL = dict(dim=32, heads=4, depth=3, image_size=32, patch_size=8, max_frames=4, vocab_size=50, max_text_len=8,
             num_classes=5, n_mels=32, audio_seconds=0.5, audio_patch=8, audio_patch_time=8)
AV, AVT = ["video", "audio"], ["video", "audio", "text"]


def small(scheme: str, modalities=AV, seed: int = 0, **kw) -> FusionModel:
    torch.manual_seed(seed)
    return create_model(f"fusion_{scheme}_tiny", **{**SMALL, "modalities": modalities, **kw}).eval()


def batch(model: FusionModel, b: int = 3, frames: int = 4, text_len: int = 6, seed: int = 0) -> dict:
    """Random inputs of the model's modalities; the last row's text is half padding."""
    c = model.config
    g = torch.Generator().manual_seed(seed)
    out = {"video": torch.randn(b, frames, 3, c.image_size, c.image_size, generator=g),
           "audio": torch.randn(b, c.n_mels, c.audio_frames, generator=g)}
    if "text" in model.modalities:
        out["text"] = torch.randint(0, c.vocab_size, (b, text_len), generator=g)
        out["text_mask"] = torch.ones(b, text_len, dtype=torch.bool)
        out["text_mask"][-1, text_len // 2:] = False
    return out


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("modalities", [AV, AVT], ids=["av", "avt"])
def test_forward_gives_float32_logits(scheme, modalities):
    m = small(scheme, modalities)
    with torch.no_grad():
        logits = m(batch(m))
    assert logits.shape == (3, 5) and logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert m.capabilities == frozenset({"classify"}) and m.modalities == tuple(modalities)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_one_backward_reaches_every_parameter_that_trains(scheme):
    m = small(scheme, AVT).train()
    m(batch(m)).sum().backward()
    # logit_scale comes with every VLModel; a classifier does not use it.
    dead = [n for n, p in m.named_parameters() if n != "logit_scale" and (p.grad is None or not p.grad.any())]
    assert not dead
    for part in ("patch_embed.proj", "audio_embed.proj", "audio_embed.frequency", "text_embed.tokens", "norm",
                 "class_heads.audio", "class_heads.text", "modality.table", "encoder"):
        assert any(n.startswith(part) for n, _ in m.named_parameters()), part
    assert m.logit_scale.grad is None


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("modalities", [AV, AVT, ["video"], ["audio", "text"]], ids=["av", "avt", "v", "at"])
def test_analytic_flops_are_the_counted_ones(scheme, modalities):
    m = small(scheme, modalities)
    text_len = 6 if "text" in modalities else 0
    assert m.analytic_flops(4, text_len) == model_flops_per_pair(m, 4, text_len)
    assert m.analytic_flops(3, text_len) == model_flops_per_pair(m, 3, text_len)  # a tubelet padded


def test_locomt_costs_less_than_early_fusion_on_the_tiny_preset():
    counted = {}
    for scheme in SCHEMES:
        torch.manual_seed(0)
        m = create_model(f"fusion_{scheme}_tiny").eval()
        assert m.token_lengths(4) == {"video": 128, "audio": 128}
        counted[scheme] = model_flops_per_pair(m, 4, 0)
        assert counted[scheme] == m.analytic_flops(4)
    ratio = counted["locomt"] / counted["early"]
    gflops = {s: round(f / 1e9, 4) for s, f in counted.items()}
    assert ratio < 0.8, f"LoCoMT / early = {ratio:.3f}; GFLOPs per clip {gflops}"


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_video_only_model_works_and_locomt_is_self_attention_there(scheme):
    m = small(scheme, ["video"])
    x = batch(m)
    with torch.no_grad():
        assert m(x).shape == (3, 5)
    assert m.audio_embed is None and m.text_embed is None
    early = small("early", ["video"]).analytic_flops(4)
    # One modality: every scheme is self-attention over its tokens, MBT's with its bottleneck tokens added.
    assert m.analytic_flops(4) > early if scheme == "mbt" else m.analytic_flops(4) == early
    if scheme == "locomt":
        assert model_flops_per_pair(m, 4, 0) == model_flops_per_pair(small("early", ["video"]), 4, 0)


def test_an_audio_text_model_builds_no_video_embedding():
    m = small("early", ["audio", "text"])
    assert m.patch_embed is None
    with torch.no_grad():
        assert m(batch(m)).shape == (3, 5)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_padded_text_positions_do_not_change_the_logits(scheme):
    m = small(scheme, AVT)
    x = batch(m)
    y = {**x, "text": x["text"].clone()}
    y["text"][-1, 3:] = (y["text"][-1, 3:] + 7) % m.config.vocab_size
    with torch.no_grad():
        torch.testing.assert_close(m(x), m(y), rtol=1e-5, atol=1e-6)
        z = {**x, "text": x["text"].clone()}
        z["text"][-1, 0] = (z["text"][-1, 0] + 7) % m.config.vocab_size  # a real token does matter
        assert not torch.allclose(m(x)[-1], m(z)[-1])


def test_an_isolated_modality_reads_nothing_of_the_others():
    # Audio's only head is the audio self view in every layer, and no head reads audio: audio is on its own.
    m = small("locomt", AV, views=["video", "audio", "video", "video"])
    x = batch(m)
    y = {**x, "video": x["video"] + torch.randn_like(x["video"])}
    with torch.no_grad():
        a, b = (m.encoder(*m.embed(m.read(inputs))) for inputs in (x, y))
    torch.testing.assert_close(a["audio"], b["audio"], rtol=0, atol=0)
    # Video's heads do read audio in the default map, which is the point of fusing.
    d = small("locomt", AV)
    z = {**x, "audio": x["audio"] + torch.randn_like(x["audio"])}
    with torch.no_grad():
        a, b = (d.encoder(*d.embed(d.read(inputs))) for inputs in (x, z))
    assert not torch.allclose(a["video"], b["video"])


def test_extra_keys_are_ignored_and_inputs_move_to_the_model():
    m = small("early", AV)
    x = batch(m)
    with torch.no_grad():
        torch.testing.assert_close(m(x), m({**x, "text": torch.zeros(3, 4, dtype=torch.long), "other": x["video"]}))
        assert m({k: t[:, :2] if k == "video" else t for k, t in x.items()}).shape == (3, 5)  # 2 frames
        assert m({k: t[..., :20] if k == "audio" else t for k, t in x.items()}).shape == (3, 5)  # a shorter clip


def test_a_video_text_model_takes_the_positional_form_too():
    m = small("mbt", ["video", "text"])
    x = batch(m)
    with torch.no_grad():
        torch.testing.assert_close(m(x["video"], x["text"], x["text_mask"]), m(x))


@pytest.mark.parametrize("case,match", [
    ("no_audio", r"missing \['audio'\].*n_mels=32, F<=32"),
    ("mels", r"expected audio: float \[B, n_mels=32, F<=32\].*got audio torch.float32 \(3, 16, 32\)"),
    ("audio_long", r"expected audio: .*F<=32"),
    ("frames", r"expected video: float \[B, T<=4, 3, 32, 32\]"),
    ("uint8", r"expected video: float.*got video torch.uint8"),
    ("float_ids", r"expected text: integer ids"),
    ("mask_shape", r"expected text: .*text_mask: bool.*got text torch.int64 \(3, 6\), text_mask torch.bool \(3, 2\)"),
    ("ids_range", r"token ids must be in 0..49"),
    ("batch", r"one batch size"),
])
def test_bad_inputs_name_what_was_expected(case, match):
    m = small("early", AVT)
    x = batch(m)
    bad = {
        "no_audio": lambda: {k: t for k, t in x.items() if k != "audio"},
        "mels": lambda: {**x, "audio": x["audio"][:, :16]},
        "audio_long": lambda: {**x, "audio": torch.randn(3, 32, 33)},
        "frames": lambda: {**x, "video": torch.randn(3, 5, 3, 32, 32)},
        "uint8": lambda: {**x, "video": x["video"].to(torch.uint8)},
        "float_ids": lambda: {**x, "text": x["text"].float()},
        "mask_shape": lambda: {**x, "text_mask": x["text_mask"][:, :2]},
        "ids_range": lambda: {**x, "text": x["text"] + 100},
        "batch": lambda: {**x, "audio": x["audio"][:2]},
    }[case]()
    with pytest.raises(ValueError, match=match):
        m(bad)


@pytest.mark.parametrize("overrides,field,match", [
    (dict(fusion="locomt", views=["video", "audio", "video->text", "audio"]), "views", r"layer 0, head 2"),
    (dict(fusion="early", views=["video", "video", "video", "video"]), "views", r"no head queries \['audio'\]"),
    (dict(fusion="locomt", modalities=AVT, heads=2, dim=32), "views", r"2 heads"),
    (dict(fusion="cross"), "fusion", "one of"),
    (dict(modalities=["video", "depth"]), "modalities", "distinct names"),
    (dict(modalities=["video", "video"]), "modalities", "distinct names"),
    (dict(audio_patch=24), "audio_patch", "divide n_mels=128"),
    (dict(num_answers=3), "num_answers", "leave it at 0"),
    (dict(fusion_layer=5), "fusion_layer", "0..depth=4"),
    (dict(audio_std=0.0), "audio_std", "positive"),
    (dict(f_max=9000.0), "f_max", "sample_rate"),
    (dict(num_classes=0), "num_classes", "positive"),
])
def test_bad_configs_name_the_field(overrides, field, match):
    with pytest.raises(ValueError, match=rf"FusionConfig\.{field}=.*{match}"):
        get_config("fusion_early_tiny", **overrides)


def test_configs_round_trip_and_presets_take_a_scheme():
    layer = ("video", "audio", "audio->video", "video->audio")
    c = get_config("fusion_early_tiny", fusion="locomt", modalities=("video", "audio"), views=(layer,) * 4)
    assert c.modalities == ["video", "audio"] and c.views == [list(layer)] * 4
    assert config_from_dict(c.to_dict()) == c
    assert create_model("fusion_early_tiny", fusion="locomt").encoder.scheme == "locomt"
    assert c.audio_frames == 126 and FusionConfig().fusion == "early"


def test_base_presets_are_ast_like():
    c = get_config("fusion_locomt_base")
    assert (c.audio_frames, c.dim, c.depth, c.heads) == (1001, 768, 12, 12)
    with torch.device("meta"):  # no weights allocated: the sizes are all this needs
        m = create_model("fusion_mbt_base")
    assert m.token_lengths(8) == {"video": 784, "audio": 504}


def test_seeded_construction_is_reproducible():
    a, b = small("mbt", AVT, seed=3), small("mbt", AVT, seed=3)
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n
    assert not torch.equal(a.class_heads["audio"][1].weight, small("mbt", AVT, seed=4).class_heads["audio"][1].weight)


def test_audio_dummies_are_whole_clips():
    m = small("late", AVT)
    x = dummy_batch(m, 4, 5, 2)
    assert x["audio"].shape == (2, 32, m.config.audio_frames) and x["video"].shape[:2] == (2, 4)


def test_spectrogram_patches_are_frequency_major():
    torch.manual_seed(0)
    emb = SpectrogramEmbed(n_mels=8, max_frames=10, patch_mel=4, patch_time=3, dim=5)
    spec = torch.randn(2, 8, 7)  # 7 frames -> 3 time patches (the last zero-padded), 2 mel rows
    out = emb(spec)
    assert out.shape == (2, 2 * 3, 5) and emb.num_tokens(7) == 6 and emb.num_tokens(10) == 8
    padded = torch.cat([spec, torch.zeros(2, 8, 2)], 2)
    for r in range(2):
        for t in range(3):
            patch = padded[:, 4 * r:4 * r + 4, 3 * t:3 * t + 3].reshape(2, 12)
            want = emb.proj(patch) + emb.frequency[r] + emb.time[t]
            torch.testing.assert_close(out[:, r * 3 + t], want)
    with pytest.raises(ValueError, match="patch_mel=3 does not divide n_mels=8"):
        SpectrogramEmbed(8, 10, 3, 3, 5)
