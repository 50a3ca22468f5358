"""torch.compile: every model's forward traces as one graph (no graph
breaks; token-merged models compile in pieces, see below), LayerDrop's
decisions are drawn per step outside the graph, and
compiled training follows the eager loss curve. Dynamo is checked with the
"eager" backend and training with "aot_eager" (autograd traced, no code
generated), so no C compiler is needed and the tests stay quick."""
from __future__ import annotations

import pytest
import torch
import torch._dynamo
from helpers import tiny_data, tiny_model
from torch.utils._pytree import tree_flatten

import slimvl
from slimvl.bench.flops import call_model, dummy_batch
from slimvl.merge import patch
from slimvl.nn import Block, CrossBlock
from slimvl.nn.fusion import ViewBlock
from slimvl.models import create_model, list_models
from slimvl.train import LossWatch, TrainConfig, TrainingDiverged, train

TINY = [n for n in list_models() if n.endswith("_tiny")]
SMALL = dict(dim=32, heads=2)


def _one_graph(fn):
    """``fn`` compiled with ``fullgraph=True``: a graph break is an error."""
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend="eager")


def _inputs(model, batch: int = 2):
    inputs = dummy_batch(model, 2, 7, batch)
    if "text_mask" in inputs:
        inputs["text_mask"][0, 4:] = False  # padding: the masks must trace too
    return inputs


def _assert_same(got, want) -> None:
    got, want = tree_flatten(got)[0], tree_flatten(want)[0]
    assert len(got) == len(want) and len(want) > 0
    for g, w in zip(got, want):
        if isinstance(w, torch.Tensor):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_the_list_covers_every_family():
    families = {n.rsplit("_", 1)[0] for n in TINY}
    assert {"perceiver_vl", "perceiver_cls", "single_stream", "clip", "fusion_early", "fusion_late", "fusion_mbt",
            "fusion_locomt"} <= families


@pytest.mark.parametrize("name", TINY)
def test_every_model_forward_is_one_graph(name):
    model = create_model(name, **SMALL).eval()
    inputs = _inputs(model)
    with torch.no_grad():
        want = call_model(model, inputs)
        got = _one_graph(lambda x: call_model(model, x))(inputs)
    _assert_same(got, want)


@pytest.mark.parametrize("name", ["perceiver_vl_tiny", "perceiver_cls_tiny"])
def test_layerdrop_training_forward_is_one_graph_with_a_step_plan(name):
    model = create_model(name, cross_attn_drop=0.5, **SMALL).train()
    inputs = _inputs(model)
    torch.manual_seed(3)
    model.draw_step()
    plans = [m.plan for m in model.modules() if hasattr(m, "plan")]
    assert plans and all(p is not None and len(p) == 2 for p in plans)  # "csscss": two cross-attentions
    with torch.no_grad():
        want = call_model(model, inputs)
        got = _one_graph(lambda x: call_model(model, x))(inputs)
    _assert_same(got, want)
    model.end_step()
    assert all(m.plan is None for m in model.modules() if hasattr(m, "plan"))


def test_a_plan_skips_exactly_the_planned_cross_attentions():
    model = create_model("perceiver_vl_tiny", cross_attn_drop=0.5, **SMALL)
    inputs = _inputs(model)
    for m in model.modules():
        if hasattr(m, "plan"):
            m.plan = (True, True)  # the first that runs is never skipped: only the second is
    model.train()
    with torch.no_grad():
        skipped = call_model(model, inputs).logits
        model.eval()
        model.cross_attn_keep = [0]
        first_only = call_model(model, inputs).logits
        model.cross_attn_keep = None
        both = call_model(model, inputs).logits
    torch.testing.assert_close(skipped, first_only)
    assert not torch.allclose(skipped, both)


def test_without_a_plan_the_compiled_forward_draws_on_the_device():
    # A near-certain skip (p = 0.9999, seeded) makes the draw's outcome known: the
    # compiled training forward then equals the model with only the first cross-attention.
    model = create_model("perceiver_vl_tiny", cross_attn_drop=0.9999, **SMALL)
    inputs = _inputs(model)
    torch.manual_seed(0)
    with torch.no_grad():
        model.eval()
        model.cross_attn_keep = [0]
        want = call_model(model, inputs).logits
        model.cross_attn_keep = None
        model.train()
        got = _one_graph(lambda x: call_model(model, x))(inputs).logits
    torch.testing.assert_close(got, want)


def test_nested_latents_model_is_one_graph_at_each_count():
    model = create_model("perceiver_vl_tiny", nested_latents=[4, 8, 16], **SMALL).eval()
    inputs = _inputs(model)
    for q in (4, 16):
        model.active_latents = q
        with torch.no_grad():
            _assert_same(_one_graph(lambda x: call_model(model, x))(inputs), call_model(model, inputs))


@pytest.mark.parametrize("name", ["perceiver_vl_tiny", "single_stream_tiny"])
def test_dual_encoder_encoders_are_one_graph_each(name):
    dual = slimvl.decompose(create_model(name, **SMALL)).eval()
    inputs = _inputs(dual)
    with torch.no_grad():
        v = _one_graph(dual.encode_video)(inputs["video"])
        t = _one_graph(dual.encode_text)(inputs["text"], inputs["text_mask"])
        torch.testing.assert_close(v, dual.encode_video(inputs["video"]))
        torch.testing.assert_close(t, dual.encode_text(inputs["text"], inputs["text_mask"]))


# Token merging decides per row how many tokens each layer may merge (the
# clamp depends on padding and on where protected tokens sit after earlier
# merges), and the merged length is read on the host: one break per merging
# layer at least, so these compile in pieces, not as one graph.
# (Each method once: the two families share the merging layer, and each case compiles for 15-20 s.)
@pytest.mark.parametrize("name,method", [("single_stream_tiny", "tome"), ("clip_tiny", "crossget")])
def test_merged_models_compile_and_match_eager(name, method):
    model = create_model(name, **SMALL).eval()
    patch(model, method, r=2)
    inputs = _inputs(model)
    torch._dynamo.reset()
    with torch.no_grad():
        want = call_model(model, inputs)
        got = torch.compile(lambda x: call_model(model, x), backend="eager")(inputs)
    _assert_same(got, want)


def test_merged_hugging_face_clip_compiles_and_matches_eager():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, image_size=32, patch_size=4)
    model = transformers.CLIPVisionModel._from_config(cfg, attn_implementation="sdpa").eval()
    patch(model, "tome", r=4)
    pixels = torch.randn(2, 3, 32, 32)
    torch._dynamo.reset()
    with torch.no_grad():
        want = model(pixel_values=pixels).pooler_output
        got = torch.compile(lambda x: model(pixel_values=x).pooler_output, backend="eager")(pixels)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


CFG = dict(steps=3, groups_per_step=4, lr=3e-3, warmup_steps=2, log_every=1, seed=1)


@pytest.mark.parametrize("extra", [dict(cross_attn_drop=0.5), dict(nested_latents=[4, 16], cross_attn_drop=0.3)])
def test_compiled_training_follows_the_eager_loss_curve(extra):
    data = tiny_data()
    runs = []
    for compile_ in (False, True):
        model = tiny_model(**extra)
        cfg = TrainConfig(**CFG, compile=compile_, compile_backend="aot_eager")
        torch._dynamo.reset()
        runs.append(train(model, data, cfg, progress=False).history)
    eager, compiled_ = ([h["loss"] for h in run] for run in runs)
    assert len(eager) == CFG["steps"] and eager[0] != eager[-1]
    assert compiled_ == pytest.approx(eager, rel=1e-3, abs=1e-4)
    assert [h.get("latents") for h in runs[0]] == [h.get("latents") for h in runs[1]]  # the same draws


def test_compile_settings_are_validated():
    with pytest.raises(ValueError, match="compile_mode"):
        TrainConfig(compile=True, compile_mode="fastest")
    with pytest.raises(ValueError, match="compile_backend='nope'"):
        TrainConfig(compile=True, compile_backend="nope")


def test_deferred_loss_watch_names_the_first_bad_step():
    watch = LossWatch(None, every_step=False)
    for step, loss in enumerate([1.0, 0.5, float("nan"), float("inf"), 0.3]):
        watch.update(torch.tensor(loss), step)  # no host read here
    with pytest.raises(TrainingDiverged, match="loss is nan at step 2"):
        watch.check()
    fine = LossWatch(None, every_step=False)
    for step in range(3):
        fine.update(torch.tensor(0.1 * step), step)
    fine.check()  # all finite: no error
    with pytest.raises(TrainingDiverged, match="at step 1"):
        eager = LossWatch(None, every_step=True)
        eager.update(torch.tensor(1.0), 0)
        eager.update(torch.tensor(float("inf")), 1)


@pytest.mark.parametrize("name", ["perceiver_vl_tiny", "fusion_locomt_tiny", "clip_tiny"])
def test_compile_layers_compiles_in_place_and_keeps_the_weights(name):
    model = create_model(name, **SMALL).eval()
    inputs = _inputs(model)
    keys = list(model.state_dict())
    with torch.no_grad():
        want = call_model(model, inputs)
        torch._dynamo.reset()
        assert model.compile_layers(backend="eager") is model
        got = call_model(model, inputs)
    blocks = [m for m in model.modules() if isinstance(m, (Block, CrossBlock, ViewBlock))]
    assert blocks and all(getattr(m, "_compiled_call_impl", None) is not None for m in blocks)
    assert list(model.state_dict()) == keys  # no "_orig_mod." prefixes: checkpoints are unchanged
    _assert_same(got, want)


def test_video_to_converts_after_the_copy():
    from slimvl.runtime import host_to, to_float_video, video_to

    frames = torch.randint(0, 256, (2, 3, 3, 4, 4), dtype=torch.uint8)
    got = video_to(frames, "cpu")
    assert got.dtype == torch.float32 and torch.equal(got, to_float_video(frames.clone()))
    assert got.min() >= -1 and got.max() <= 1
    ids = torch.arange(6)
    assert host_to(ids, torch.device("cpu")) is ids  # already there: no copy


class _HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts values read back from tensors (``.item()``, ``bool()``, ``int()``):
    on a GPU each is a wait for the device."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
        return func(*args, **(kwargs or {}))


def _task(kind: str):
    from helpers import qa_model, questions

    from slimvl.tasks import QATask, RetrievalTask

    if kind == "qa":
        return qa_model(), QATask(questions()), TrainConfig(batch_size=4)
    model = tiny_model(cross_attn_drop=0.5, nested_latents=[4, 16] if kind == "nested" else [])
    return model, RetrievalTask(tiny_data()), TrainConfig(groups_per_step=4, hard_negatives="videos")


@pytest.mark.parametrize("kind", ["retrieval", "nested", "qa"])
def test_a_training_step_reads_nothing_back_from_the_device(kind, monkeypatch):
    model, task, cfg = _task(kind)
    # As on a GPU while training: the input-value checks are off (see VLModel.checks_values).
    monkeypatch.setattr(model, "checks_values", lambda t: False)
    model.train()
    net = model.training_objective(task.objective(model, cfg))
    batch = task.batch(cfg, 0, 0, 1, torch.device("cpu"))
    torch.manual_seed(0)
    model.draw_step()  # the step's LayerDrop decisions, drawn before it on the CPU generator
    with _HostReads() as mode:
        loss, parts = net(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    model.end_step()
    assert mode.reads == 0
    assert all(isinstance(v, (torch.Tensor, float)) for v in parts.values()) and torch.isfinite(loss)
