"""Tests for slimvl.checkpoint: safetensors + JSON checkpoints, refusal of foreign/damaged files."""

import json
import pickle

import pytest
import torch

from slimvl import create_model
from slimvl.checkpoint import (FORMAT, CheckpointError, latest_checkpoint, load_model, load_training_state,
                               load_weights, read_meta, save_checkpoint)

TINY = dict(dim=32, heads=2, image_size=32, patch_size=8, vocab_size=50, max_text_len=12, embed_dim=16)


def tiny(name="perceiver_vl_tiny", seed=0, **kw):
    torch.manual_seed(seed)
    return create_model(name, **{**TINY, **kw}).eval()


def inputs(b=2, t=2, length=5):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(b, t, 3, 32, 32, generator=g), torch.randint(0, 50, (b, length), generator=g),
            torch.ones(b, length, dtype=torch.bool))


@pytest.fixture
def ckpt(tmp_path):
    m = tiny()
    return save_checkpoint(tmp_path / "step_0000001", m, extra={"step": 1}), m


@pytest.mark.parametrize("name", ["perceiver_vl_tiny", "single_stream_tiny"])
def test_round_trip_weights_and_outputs(tmp_path, name):
    m = tiny(name)
    folder = save_checkpoint(tmp_path / "ck", m, extra={"step": 7, "note": "x"})
    assert folder == tmp_path / "ck"
    assert {p.name for p in folder.iterdir()} == {"model.safetensors", "meta.json"}
    loaded = load_model(folder).eval()
    assert type(loaded) is type(m)
    assert loaded.config == m.config
    a, b = m.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    with torch.no_grad():
        assert torch.equal(m(*inputs()).logits, loaded(*inputs()).logits)
    meta = read_meta(folder)
    assert meta["format"] == FORMAT and meta["step"] == 7 and meta["note"] == "x"


def test_load_weights_into_fresh_model_of_same_config(ckpt):
    folder, m = ckpt
    other = tiny(seed=123)
    assert not torch.equal(other.encoder.latents, m.encoder.latents)
    meta = load_weights(folder, other)
    assert meta["step"] == 1
    assert torch.equal(other.encoder.latents, m.encoder.latents)


def test_no_leftover_temp_folder_after_save(ckpt, tmp_path):
    folder, _ = ckpt
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]


def test_overwrite_existing_checkpoint(tmp_path):
    save_checkpoint(tmp_path / "ck", tiny(seed=1))
    m2 = tiny(seed=2)
    save_checkpoint(tmp_path / "ck", m2)
    assert torch.equal(load_model(tmp_path / "ck").encoder.latents, m2.encoder.latents)


def test_folder_without_meta_refused(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    with pytest.raises(CheckpointError) as e:
        load_model(folder)
    assert str(folder) in str(e.value) and "meta.json" in str(e.value)


def test_missing_folder_refused(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere"):
        load_model(tmp_path / "nowhere")


def test_other_format_refused(ckpt):
    folder, _ = ckpt
    meta_path = folder / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["format"] = "someone-else"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError) as e:
        load_model(folder)
    assert str(meta_path) in str(e.value) and "someone-else" in str(e.value)


def test_unreadable_meta_refused(ckpt):
    folder, _ = ckpt
    (folder / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="meta.json"):
        load_model(folder)


def test_truncated_weights_refused(ckpt):
    folder, _ = ckpt
    f = folder / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:-100])
    with pytest.raises(CheckpointError) as e:
        load_model(folder)
    assert str(f) in str(e.value)


def test_truncated_weights_refused_even_with_matching_meta_size(ckpt):
    """A damaged file whose size was also recorded is caught by the safetensors reader."""
    folder, _ = ckpt
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    meta = json.loads((folder / "meta.json").read_text())
    meta["files"]["model.safetensors"] = f.stat().st_size
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError) as e:
        load_model(folder)
    assert str(f) in str(e.value)


class _Boom:
    """Unpickling this runs code: the loader must never get that far."""

    def __reduce__(self):
        return (_explode, ())


def _explode():
    raise AssertionError("checkpoint was unpickled")


@pytest.mark.parametrize("fix_size", [False, True])
def test_pickle_instead_of_safetensors_refused_never_unpickled(ckpt, fix_size, monkeypatch):
    folder, m = ckpt
    f = folder / "model.safetensors"
    torch.save({k: v for k, v in m.state_dict().items()}, f)
    if fix_size:
        meta = json.loads((folder / "meta.json").read_text())
        meta["files"]["model.safetensors"] = f.stat().st_size
        (folder / "meta.json").write_text(json.dumps(meta))

    def no_unpickle(*a, **k):
        raise AssertionError("torch.load / pickle.load called on a checkpoint")

    monkeypatch.setattr(torch, "load", no_unpickle)
    monkeypatch.setattr(pickle, "load", no_unpickle)
    monkeypatch.setattr(pickle, "loads", no_unpickle)
    with pytest.raises(CheckpointError) as e:
        load_model(folder)
    assert str(f) in str(e.value)


def test_malicious_pickle_not_executed(ckpt):
    folder, _ = ckpt
    f = folder / "model.safetensors"
    f.write_bytes(pickle.dumps({"w": _Boom()}))
    meta = json.loads((folder / "meta.json").read_text())
    meta["files"]["model.safetensors"] = f.stat().st_size
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(folder)


def test_other_config_refused_naming_field(ckpt):
    folder, _ = ckpt
    other = tiny(num_latents=8)
    before = other.encoder.latents.clone()
    with pytest.raises(CheckpointError) as e:
        load_weights(folder, other)
    assert "num_latents" in str(e.value) and str(folder) in str(e.value)
    assert "dim" not in str(e.value).split("differs in")[1]
    assert torch.equal(other.encoder.latents, before)  # nothing was loaded


def test_other_model_type_refused(ckpt):
    folder, _ = ckpt
    with pytest.raises(CheckpointError, match="model_type"):
        load_weights(folder, tiny("single_stream_tiny"))


def test_training_state_restores_optimizer_and_rng(tmp_path):
    m = tiny().train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    for _ in range(2):
        opt.zero_grad()
        m(*inputs()).logits.sum().backward()
        opt.step()
    torch.manual_seed(42)
    save_checkpoint(tmp_path / "ck", m, opt, extra={"step": 2})
    expected_rand = torch.rand(5)
    saved_state = {i: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
                   for i, s in opt.state_dict()["state"].items()}

    m2 = tiny(seed=9).train()
    opt2 = torch.optim.AdamW(m2.parameters(), lr=5e-2)
    torch.rand(100)  # move the RNG on
    meta = load_training_state(tmp_path / "ck", m2, opt2)
    assert torch.equal(torch.rand(5), expected_rand)
    assert meta["step"] == 2

    state2 = opt2.state_dict()
    assert state2["param_groups"][0]["lr"] == pytest.approx(1e-3)
    assert set(state2["state"]) == set(saved_state)
    for i, s in saved_state.items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state2["state"][i][key], s[key]), (i, key)
        assert float(state2["state"][i]["step"]) == float(s["step"]) == 2.0
    for p, q in zip(m.parameters(), m2.parameters()):
        assert torch.equal(p, q)

    # Both optimisers take the same next step.
    for model, o in ((m, opt), (m2, opt2)):
        o.zero_grad()
        model(*inputs()).logits.sum().backward()
        o.step()
    for p, q in zip(m.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


def test_training_state_requires_optimizer(ckpt):
    folder, _ = ckpt
    m = tiny()
    opt = torch.optim.AdamW(m.parameters())
    with pytest.raises(CheckpointError, match="optimi"):
        load_training_state(folder, m, opt)


def test_latest_checkpoint_picks_highest_step(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    root = tmp_path / "checkpoints"
    m = tiny()
    for step in (9, 120, 10):
        save_checkpoint(root / f"step_{step:07d}", m, extra={"step": step})
    # A half-written leftover from a killed run, and a step folder without meta.json.
    tmp = root / ".step_9999999.tmp-123"
    tmp.mkdir()
    (tmp / "meta.json").write_text("{}")
    (root / "step_9999998").mkdir()
    got = latest_checkpoint(tmp_path)
    assert got == root / "step_0000120"
    assert read_meta(got)["step"] == 120


def test_latest_checkpoint_empty_dir(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / ".step_x.tmp-123").mkdir()
    assert latest_checkpoint(tmp_path) is None


def test_other_version_refused(ckpt):
    folder, _ = ckpt
    meta = json.loads((folder / "meta.json").read_text())
    meta["version"] = 999
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="999"):
        load_model(folder)


@pytest.mark.parametrize("name", ["perceiver_vl", "perceiver_vl_mixed", "single_stream"])
def test_checkpoints_of_the_first_release_still_load_and_give_the_same_outputs(name):
    """Checkpoints written by release 0.1.0 (tests/data) load and give the
    outputs they gave then: pair logits, both embeddings, answers and MLM
    logits, whatever the code has become since."""
    import json
    from pathlib import Path

    data = Path(__file__).parent / "data"
    expected = json.loads((data / "release_0.1.0_outputs.json").read_text())["outputs"][name]
    model = load_model(data / f"release_0.1.0_{name}").eval()
    g = torch.Generator().manual_seed(0)
    video = torch.rand(3, 2, 3, 32, 32, generator=g) * 2 - 1
    ids = torch.randint(5, 30, (3, 8), generator=g)
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[1, 5:] = False
    got = {"logits": lambda: model(video, ids, mask).logits, "video_embedding": lambda: model.embed_video(video),
           "text_embedding": lambda: model.embed_text(ids, mask), "answer": lambda: model.answer(video, ids, mask),
           "mlm": lambda: model.mlm_logits(video, ids, mask, mask & (ids % 3 == 0))}
    with torch.no_grad():
        for key, value in expected.items():
            torch.testing.assert_close(got[key](), torch.tensor(value), rtol=1e-5, atol=1e-6, msg=key)
