"""Token merging on Hugging Face CLIP (``slimvl.merge.hf_clip``), on tiny
random-initialised models built here (nothing is downloaded)."""
from __future__ import annotations

import warnings

import pytest
import torch
from helpers import DEVICE

from slimvl.bench.flops import count_flops
from slimvl.merge import Schedule, is_patched, patch, unpatch

T = pytest.importorskip("transformers")

D, MLP, LAYERS, HEADS, IMAGE, PATCH, BATCH = 32, 64, 3, 4, 32, 4, 2
PATCHES = (IMAGE // PATCH) ** 2  # 64, plus [CLS]
VISION = dict(hidden_size=D, intermediate_size=MLP, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
              image_size=IMAGE, patch_size=PATCH)
TEXT = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=16)
IMPLS = ["eager", "sdpa"]


def _build(kind: str = "vision", attn: str = "sdpa", seed: int = 0):
    torch.manual_seed(seed)
    if kind == "clip":
        cfg = T.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=16)
        model = T.CLIPModel._from_config(cfg, attn_implementation=attn)
    else:
        cls = T.CLIPVisionModel if kind == "vision" else T.CLIPVisionModelWithProjection
        model = cls._from_config(T.CLIPVisionConfig(**VISION, projection_dim=16), attn_implementation=attn)
    return model.to(DEVICE).eval()


def _pixels(seed: int = 1) -> torch.Tensor:
    return torch.randn(BATCH, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def _text_ids() -> torch.Tensor:
    return torch.tensor([[0, 5, 9, 63, 1, 1], [0, 7, 63, 1, 1, 1]], device=DEVICE)  # 63 = argmax: the EOT


def _outputs(model, kind: str) -> dict[str, torch.Tensor]:
    x = _pixels()
    with torch.no_grad():
        if kind == "clip":
            return {"features": model.get_image_features(pixel_values=x).pooler_output,
                    "logits": model(input_ids=_text_ids(), pixel_values=x).logits_per_image}
        out = model(pixel_values=x)
        if kind == "vision":
            return {"last": out.last_hidden_state, "pooled": out.pooler_output}
        return {"last": out.last_hidden_state, "embeds": out.image_embeds}


def _expected_tokens(asked: list[int]) -> list[int]:
    # Tokens left after each layer: [CLS] never merges, and a layer merges at most half the others.
    n, out = 1 + PATCHES, []
    for r in asked:
        n -= min(r, (n - 1) // 2)
        out.append(n)
    return out


def _analytic_flops(tokens: list[int], asked: list[int], method: str) -> int:
    """Multiply-adds x 2 of the vision forward: patch embedding; per layer the
    projections and attention over its input tokens, the MLP over its output
    tokens, and the matching's products: ToMe's over keys averaged over
    heads (width D / heads), CrossGET's over whole keys and queries (width D)."""
    d = D // HEADS if method == "tome" else D
    flops, n = 2 * BATCH * PATCHES * D * 3 * PATCH * PATCH, 1 + PATCHES
    for out, r in zip(tokens, asked):
        flops += 4 * 2 * BATCH * n * D * D + 2 * 2 * BATCH * n * n * D + 2 * 2 * BATCH * out * D * MLP
        if r > 0 and method == "crossget":
            flops += 2 * BATCH * n * d  # guided_importance: every key against the [CLS] query
        if out < n:  # a matching that merged computed its similarities
            flops += 2 * BATCH * n * n * d if method == "crossget" else 2 * BATCH * ((n + 1) // 2) * (n // 2) * d
        n = out
    return flops


@pytest.mark.parametrize("attn", IMPLS)
@pytest.mark.parametrize("kind", ["clip", "vision", "vision_proj"])
@pytest.mark.parametrize("method", ["tome", "crossget"])
def test_r0_equals_unpatched(kind, attn, method):
    model = _build(kind, attn)
    ref = _outputs(model, kind)
    patch(model, method, r=0)
    got = _outputs(model, kind)
    for key in ref:
        torch.testing.assert_close(got[key], ref[key])
    assert model.merge_report["video"] == {"r": [0] * LAYERS, "tokens": [1 + PATCHES] * LAYERS}


@pytest.mark.parametrize("method", ["tome", "crossget"])
@pytest.mark.parametrize("r, asked", [(8, [8, 8, 8]), ([0, 3, 30], [0, 3, 30]), (Schedule(8, -0.5), [12, 8, 4])])
def test_token_counts_and_flops_follow_the_schedule(method, r, asked):
    model = _build("vision")
    x = _pixels()
    base = count_flops(lambda: model(pixel_values=x), model)
    assert base == _analytic_flops([1 + PATCHES] * LAYERS, [0] * LAYERS, method)
    patch(model, method, r=r)
    flops = count_flops(lambda: model(pixel_values=x), model)
    tokens = _expected_tokens(asked)
    assert model.merge_report["video"]["tokens"] == tokens
    assert model.merge_report["video"]["r"] == [a - b for a, b in zip([1 + PATCHES] + tokens, tokens)]
    assert flops == _analytic_flops(tokens, asked, method)
    if method == "tome" or min(asked) >= 4:
        # CrossGET's matching compares whole keys (N^2 D per layer): on a model this small, a layer that merges
        # 3 tokens, or merges in the last layer only, costs more than it saves. The count above says so exactly.
        assert flops < base
    with torch.no_grad():
        out = model(pixel_values=x, output_hidden_states=True)
    # The input, then every layer's output: decreasing lengths, [CLS] pooled from index 0.
    assert [h.shape[1] for h in out.hidden_states] == [1 + PATCHES] + tokens
    assert out.last_hidden_state.shape == (BATCH, tokens[-1], D)
    assert torch.isfinite(out.last_hidden_state).all() and torch.isfinite(out.pooler_output).all()
    torch.testing.assert_close(out.pooler_output, model.post_layernorm(out.last_hidden_state[:, 0]))


@pytest.mark.parametrize("method", ["tome", "crossget"])
def test_flops_fall_with_r(method):
    model = _build("vision")
    x = _pixels()
    patch(model, method, r=0)
    counts = []
    # CrossGET's whole-key matching outweighs merging 2 tokens a layer here (see the test above).
    for r in (0, 2, 6, 12) if method == "tome" else (0, 6, 9, 12):
        model.r = r
        counts.append(count_flops(lambda: model(pixel_values=x), model))
    assert counts == sorted(counts, reverse=True) and len(set(counts)) == len(counts)


def test_clamping_warns_once():
    model = patch(_build("vision"), "tome", r=20)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            model(pixel_values=_pixels())
            model(pixel_values=_pixels())
    assert model.merge_report["video"] == {"r": [20, 20, 12], "tokens": _expected_tokens([20, 20, 20])}
    assert len([w for w in caught if "clamped" in str(w.message)]) == 1


def _snapshot(model):
    return ([type(m) for m in model.modules()], [sorted(vars(m)) for m in model.modules()],
            {k: v.clone() for k, v in model.state_dict().items()})


@pytest.mark.parametrize("method", ["tome", "crossget"])
def test_unpatch_restores_exactly(method):
    model = _build("clip")
    classes, keys, state = _snapshot(model)
    ref = _outputs(model, "clip")
    patch(model, method, r=8)
    assert is_patched(model) and model.merge_method == method and model.r == 8
    assert type(model) is not classes[0] and type(model).__name__ == "CLIPModel"
    merged = _outputs(model, "clip")
    assert model.merge_report["video"]["tokens"] == _expected_tokens([8] * LAYERS)
    assert not torch.allclose(merged["features"], ref["features"])
    assert unpatch(model) is model and not is_patched(model)
    new_classes, new_keys, new_state = _snapshot(model)
    assert new_classes == classes and new_keys == keys
    assert new_state.keys() == state.keys() and all(torch.equal(new_state[k], state[k]) for k in state)
    got = _outputs(model, "clip")
    for key in ref:
        torch.testing.assert_close(got[key], ref[key])
    patch(model, "tome", r=4)  # and it patches again
    assert model.merge_report == {} and unpatch(model) is model


def test_saved_config_names_the_original_class(tmp_path):
    model = patch(_build("clip"), "tome", r=4)
    model.save_pretrained(tmp_path)
    assert T.CLIPConfig.from_pretrained(tmp_path).architectures == ["CLIPModel"]


def test_refusals():
    torch.manual_seed(0)
    bert = T.BertModel(T.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=64))
    with pytest.raises(ValueError, match="BertModel is not a CLIP model.*CLIPVisionModel"):
        patch(bert, "tome", r=4)
    assert not is_patched(bert)
    text = T.CLIPTextModel(T.CLIPTextConfig(**TEXT))
    with pytest.raises(ValueError, match="CLIPTextModel has no vision tower"):
        patch(text, "tome", r=4)

    model = _build("clip")
    classes, keys, _ = _snapshot(model)
    for bad in (dict(r=-1), dict(r=[1, 2]), dict(r=4, r_text=2)):
        with pytest.raises(ValueError, match="r"):
            patch(model, "tome", **bad)
        assert not is_patched(model) and _snapshot(model)[:2] == (classes, keys)  # a refused patch leaves nothing
    with pytest.raises(ValueError, match="method"):
        patch(model, "nope", r=4)
    with pytest.raises(ValueError, match="not patched"):
        unpatch(model)
    patch(model, "crossget", r=4)
    with pytest.raises(ValueError, match="already patched"):
        patch(model, "tome", r=4)
    with pytest.raises(ValueError, match="r_text"):
        model.r_text = 1
    with pytest.raises(ValueError, match="r="):
        model.r = -2
    assert model.r == 4 and model.r_text == 0
    with pytest.raises(ValueError, match="attentions"):
        model(input_ids=_text_ids(), pixel_values=_pixels(), output_attentions=True)
    with pytest.raises(ValueError, match="already patched"):  # its vision tower alone
        patch(model.vision_model, "tome", r=4)


@pytest.mark.parametrize("method", ["tome", "crossget"])
def test_training_step(method):
    model = patch(_build("clip"), method, r=6).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.vision_model.encoder.layers[0].self_attn.q_proj.weight.detach().clone()
    loss = model(input_ids=_text_ids(), pixel_values=_pixels(), return_loss=True).loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())
    for name in ("vision_model.encoder.layers.0.self_attn.q_proj.weight",
                 "vision_model.encoder.layers.2.mlp.fc1.weight",
                 "vision_model.embeddings.patch_embedding.weight", "text_model.encoder.layers.0.mlp.fc1.weight"):
        assert grads[name].abs().sum() > 0, name
    opt.step()
    assert not torch.equal(before, model.vision_model.encoder.layers[0].self_attn.q_proj.weight)
    assert model.merge_report["video"]["tokens"] == _expected_tokens([6] * LAYERS)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing(reentrant, monkeypatch):
    import slimvl.merge.hf_clip as hf_clip

    calls = []
    match = hf_clip.match
    monkeypatch.setattr(hf_clip, "match", lambda *a, **k: calls.append(1) or match(*a, **k))
    model = _build("vision")
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    else:  # older transformers
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    patch(model.train(), "crossget", r=6)
    x = _pixels().requires_grad_()
    model(pixel_values=x).pooler_output.square().sum().backward()
    assert len(calls) == 2 * LAYERS  # every layer ran again in the backward, and matched the same way
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert model.encoder.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert model.merge_report["video"]["tokens"] == _expected_tokens([6] * LAYERS)


@pytest.mark.parametrize("method", ["tome", "crossget"])
def test_merging_identical_tokens_changes_nothing(method):
    # With every patch token the same (a flat image, one position embedding for all patches), a merged
    # token is that token and, by proportional attention, weighs as much as the tokens it replaced:
    # [CLS] ends exactly where the unmerged model puts it.
    model = _build("vision")
    with torch.no_grad():
        pos = model.embeddings.position_embedding.weight
        pos[1:] = pos[1]
    x = torch.full((BATCH, 3, IMAGE, IMAGE), 0.3, device=DEVICE)
    with torch.no_grad():
        ref = model(pixel_values=x).pooler_output
        patch(model, method, r=8)
        out = model(pixel_values=x)
    assert out.last_hidden_state.shape[1] == _expected_tokens([8] * LAYERS)[-1]
    torch.testing.assert_close(out.pooler_output, ref)


@pytest.mark.parametrize("method", ["tome", "crossget"])
def test_bf16_autocast(method):
    model = patch(_build("vision"), method, r=8)
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = model(pixel_values=_pixels())
    assert out.last_hidden_state.shape[1] == _expected_tokens([8] * LAYERS)[-1]
    assert torch.isfinite(out.last_hidden_state.float()).all() and torch.isfinite(out.pooler_output.float()).all()


def test_the_importance_weight_reaches_every_layer():
    model = patch(_build("vision"), "crossget", r=8)
    with torch.no_grad():
        published = model(pixel_values=_pixels()).pooler_output
        model.importance_weight = 0.0
        similarity_only = model(pixel_values=_pixels()).pooler_output
    assert model.merge_config()["importance_weight"] == 0.0
    assert not torch.allclose(published, similarity_only)
    with pytest.raises(ValueError, match="only method='crossget'"):
        patch(_build("vision"), "tome", importance_weight=0.0)
