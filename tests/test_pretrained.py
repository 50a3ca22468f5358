"""Initialising Perceiver-VL from local ViT / CLIP-vision / BERT checkpoints,
the two-stage schedule, and latent resizing."""
from __future__ import annotations

import pytest
import torch
from helpers import TINY, tiny_data, tiny_model
from safetensors.torch import load_file, save_file

from slimvl.checkpoint import save_checkpoint
from slimvl.models.pretrained import (init_from_checkpoint, load_text_embeddings, load_vision_layers,
                                      resize_latents)
from slimvl.train import TrainConfig, train

transformers = pytest.importorskip("transformers")

SELF_LAYERS = [1, 2, 4, 5]  # the 's' layers of "csscss"


def _vit(tmp_path, layers=4, hidden=32, heads=2, name="vit"):
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                 intermediate_size=4 * hidden, image_size=32, patch_size=8, layer_norm_eps=1e-5)
    m = transformers.ViTModel(cfg).eval()
    with torch.no_grad():  # non-zero biases, so that the bias folding is tested
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    m.save_pretrained(tmp_path / name)
    return m, tmp_path / name


def _run_layer(layer, x):
    out = layer(x, None)
    return out[0] if isinstance(out, tuple) else out


def _layers(hf_model):
    # The module tree differs between transformers versions; the saved key layout does not.
    for path in ("layers", "encoder.layer", "encoder.layers", "vision_model.encoder.layers"):
        obj = hf_model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
            return obj
        except AttributeError:
            continue
    raise AssertionError("no layer list found")


def test_vit_layers_map_exactly(tmp_path):
    vit, path = _vit(tmp_path)
    saved = load_file(str(path / "model.safetensors"))
    model = tiny_model().eval()
    report = load_vision_layers(model, path)
    assert report.unused == [] and "encoder.layers.1.attn.to_kv.weight" in report.loaded
    ours = model.encoder.layers[SELF_LAYERS[0]]
    pre = "encoder.layer.0."
    assert torch.equal(ours.attn.to_q.weight, saved[pre + "attention.attention.query.weight"])
    assert torch.equal(ours.attn.to_kv.weight, torch.cat([saved[pre + "attention.attention.key.weight"],
                                                          saved[pre + "attention.attention.value.weight"]]))
    assert torch.equal(ours.mlp[3].weight, saved[pre + "output.dense.weight"])
    assert torch.equal(ours.norm2.bias, saved[pre + "layernorm_after.bias"])
    assert torch.equal(model.encoder.norm.weight, saved["layernorm.weight"])
    # The layers compute the same function (key bias dropped, value bias folded into the output bias).
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        for i, j in enumerate(SELF_LAYERS):
            torch.testing.assert_close(model.encoder.layers[j](x), _run_layer(_layers(vit)[i], x),
                                       rtol=1e-4, atol=1e-5)


def test_clip_vision_layers_map_and_extra_layers_are_reported(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.CLIPVisionConfig(hidden_size=32, num_hidden_layers=5, num_attention_heads=2,
                                        intermediate_size=128, image_size=32, patch_size=8, hidden_act="gelu",
                                        layer_norm_eps=1e-5)
    clip = transformers.CLIPVisionModel(cfg).eval()
    clip.save_pretrained(tmp_path / "clip")
    saved = load_file(str(tmp_path / "clip" / "model.safetensors"))
    layer3 = next(k for k in saved if k.endswith("encoder.layers.3.mlp.fc1.weight"))
    model = tiny_model().eval()
    report = load_vision_layers(model, tmp_path / "clip")
    assert report.unused == ["encoder.layers.4"]
    assert torch.equal(model.encoder.layers[5].mlp[0].weight, saved[layer3])
    assert torch.equal(model.encoder.norm.bias, saved[next(k for k in saved if k.endswith("post_layernorm.bias"))])
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.encoder.layers[2](x), _run_layer(_layers(clip)[1], x), rtol=1e-4, atol=1e-5)


def test_vision_mismatches_fail_with_the_offending_keys(tmp_path):
    model = tiny_model()
    before = model.encoder.layers[1].attn.to_q.weight.clone()
    _, wide = _vit(tmp_path, hidden=48, heads=2, name="wide")
    with pytest.raises(ValueError, match=r"offending keys: \['encoder\.layers\.1\.norm1\.weight: expected \(32,\)"):
        load_vision_layers(model, wide)
    _, short = _vit(tmp_path, layers=3, name="short")
    with pytest.raises(ValueError, match="3 layers, but the model has 4"):
        load_vision_layers(model, short)
    _, heads = _vit(tmp_path, heads=4, name="heads")
    with pytest.raises(ValueError, match="num_attention_heads=4"):
        load_vision_layers(model, heads)
    _, path = _vit(tmp_path, name="cut")
    weights = load_file(str(path / "model.safetensors"))
    del weights["encoder.layer.2.attention.attention.value.bias"]
    save_file(weights, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing.*encoder\.layer\.2\.attention\.attention\.value\.bias"):
        load_vision_layers(model, path)
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_vision_layers(model, tmp_path / "pickled")
    assert torch.equal(model.encoder.layers[1].attn.to_q.weight, before)  # nothing half-loaded


def test_bert_text_embeddings(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64)
    bert = transformers.BertModel(cfg)
    bert.save_pretrained(tmp_path / "bert")
    model = tiny_model()
    video_row = model.modality.table[0].clone()
    load_text_embeddings(model, tmp_path / "bert")
    saved = load_file(str(tmp_path / "bert" / "model.safetensors"))
    emb = lambda name: saved[next(k for k in saved if k.endswith(f"embeddings.{name}.weight"))]  # noqa: E731
    assert torch.equal(model.text_embed.tokens.weight, emb("word_embeddings"))
    assert torch.equal(model.text_embed.position, emb("position_embeddings")[: TINY["max_text_len"]])
    assert torch.equal(model.modality.table[1], emb("token_type_embeddings")[0])
    assert torch.equal(model.modality.table[0], video_row)
    assert "modality.table" not in model.pretrained_names and "text_embed.tokens.weight" in model.pretrained_names
    with pytest.raises(ValueError, match=r"text_embed\.tokens\.weight: expected \(60, 32\), got \(50, 32\)"):
        load_text_embeddings(tiny_model(vocab_size=60), tmp_path / "bert")


def test_two_stage_schedule_freezes_the_loaded_parameters_first(tmp_path):
    _, path = _vit(tmp_path)
    base = dict(groups_per_step=4, lr=3e-3, warmup_steps=1, frozen_pretrained_steps=3)
    model = tiny_model()
    load_vision_layers(model, path)
    loaded = {n: p.detach().clone() for n, p in model.named_parameters() if n in model.pretrained_names}
    cross = model.encoder.layers[0].attn.to_q.weight.detach().clone()
    train(model, tiny_data(), TrainConfig(steps=3, **base), progress=False)
    for n, p in model.named_parameters():
        if n in loaded:
            assert torch.equal(p.cpu(), loaded[n]), n
    assert not torch.equal(model.encoder.layers[0].attn.to_q.weight.cpu(), cross)
    train(model, tiny_data(), TrainConfig(steps=2, **{**base, "frozen_pretrained_steps": 1}), progress=False)
    assert not torch.equal(model.encoder.layers[1].attn.to_q.weight.cpu(), loaded["encoder.layers.1.attn.to_q.weight"])
    with pytest.raises(ValueError, match="nothing was loaded"):
        train(tiny_model(), tiny_data(), TrainConfig(steps=2, **base), progress=False)


def test_resize_latents():
    lat = torch.randn(16, 8)
    up = resize_latents(lat, 31)
    assert up.shape == (31, 8)
    torch.testing.assert_close(up[::2], lat)  # 31 = 2*16 - 1: every other row is an original one
    torch.testing.assert_close(up[1], (lat[0] + lat[1]) / 2)
    down = resize_latents(lat, 4)
    assert down.shape == (4, 8) and torch.equal(down[0], lat[0]) and torch.allclose(down[-1], lat[-1])
    assert resize_latents(lat, 4, "reinit").std() < 0.1
    with pytest.raises(ValueError, match="latent_resize"):
        resize_latents(lat, 4, "crop")


@pytest.mark.parametrize("mode", ["interpolate", "reinit"])
def test_init_from_checkpoint_with_other_num_latents(tmp_path, mode):
    src = tiny_model(num_latents=16)
    save_checkpoint(tmp_path / "ck", src)
    dst = tiny_model(seed=5, num_latents=8)
    init_from_checkpoint(dst, tmp_path / "ck", latent_resize=mode)
    theirs = src.state_dict()
    for k, v in dst.state_dict().items():
        if k.endswith(("latents", "latent_pos")):
            assert v.shape == (8, TINY["dim"])
            assert torch.equal(v[0], theirs[k][0]) == (mode == "interpolate")
        else:
            assert torch.equal(v, theirs[k]), k
    with pytest.raises(ValueError, match=r"differs in \['dim'"):
        init_from_checkpoint(tiny_model(dim=64, num_latents=8), tmp_path / "ck")
