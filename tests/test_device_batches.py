"""Batches for a device-bound training step: decoded media kept on the
device for the whole run (``TrainConfig.media_on_device``), batches gathered
there, and text widths rounded to a few shapes when compiling.

The media go to the "meta" device here: a tensor there has a shape but no
values, so reading one back on the host, or mixing it with a host tensor in
one operation, fails as it would on a GPU, and the CPU can check both."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import DEVICE, questions, tiny_data, tiny_model

from slimvl.data import Tokenizer
from slimvl.tasks import MLMTask, MultiTask, QATask, RetrievalTask
from slimvl.tasks.base import used_width
from slimvl.train import TrainConfig, train

META = torch.device("meta")


def test_bucketed_widths_are_powers_of_two_that_hold_the_text():
    for length in (5, 9, 16, 40):
        for used in range(1, length + 1):
            mask = torch.zeros(3, length, dtype=torch.bool)
            mask[1, :used] = True
            assert used_width(mask) == used
            wide = used_width(mask, bucket=True)
            assert used <= wide <= length
            assert wide == length or (wide >= 8 and wide & (wide - 1) == 0)
    # A compiled model meets at most a handful of widths over a run.
    widths = {used_width(torch.arange(64)[None] < n, bucket=True) for n in range(1, 65)}
    assert widths == {8, 16, 32, 64}


def test_a_bucketed_mlm_batch_masks_the_same_tokens():
    data = tiny_data()
    task = MLMTask(data, Tokenizer.train(["a red circle moves left"], vocab_size=50))
    rows = np.arange(6)
    exact = task.make_batch(rows, np.random.default_rng(0), torch.device("cpu"))
    wide = task.make_batch(rows, np.random.default_rng(0), torch.device("cpu"), bucket=True)
    w = exact.inputs["text"].shape[1]
    assert wide.inputs["text"].shape[1] == used_width(data.caption_mask[torch.as_tensor(rows)], bucket=True) > w
    for a, b in ((exact.inputs["text"], wide.inputs["text"]), (exact.inputs["text_mask"], wide.inputs["text_mask"]),
                 (exact.masked, wide.masked), (exact.target, wide.target)):
        assert torch.equal(b[:, :w], a) and not b[:, w:].any()  # same draws; the extra columns are padding


class _MixedDevices(torch.utils._python_dispatch.TorchDispatchMode):
    """Records operations that take tensors on the host and on the device at
    once (a 0-d host tensor, a scalar, is allowed, as PyTorch does)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.utils._pytree import tree_flatten

        tensors = [t for t in tree_flatten((args, kwargs or {}))[0] if isinstance(t, torch.Tensor) and t.dim()]
        if len({t.device.type for t in tensors}) > 1:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_the_mixed_device_check_sees_host_indices_into_device_media():
    media = torch.zeros(4, 3, device=META)
    with _MixedDevices() as mixed:
        media[torch.tensor([0, 2])]
    assert mixed.ops  # the check can fail: this is what gather avoids
    from slimvl.runtime import gather

    with _MixedDevices() as mixed:
        assert gather(media, [0, 2]).shape == (2, 3)
    assert mixed.ops == []


def _tasks():
    data = tiny_data()
    return [("retrieval", RetrievalTask(data), TrainConfig(groups_per_step=4, hard_negatives="videos")),
            ("qa", QATask(questions()), TrainConfig(batch_size=4)),
            ("mlm", MLMTask(data, Tokenizer.train(["a red circle moves left"], vocab_size=50)),
             TrainConfig(batch_size=4))]


@pytest.mark.parametrize("kind", ["retrieval", "qa", "mlm"])
def test_batches_are_gathered_where_the_media_are(kind):
    _, task, cfg = next(t for t in _tasks() if t[0] == kind)
    on_meta = task.with_media_on(META)
    assert task.data.videos.device.type == "cpu"  # the caller's task is left alone
    assert on_meta.data.videos.device == META and on_meta.data.videos.shape == task.data.videos.shape
    assert on_meta.data is not task.data
    for name in ("caption_ids", "question_ids"):  # text stays on the host, shared
        if hasattr(task.data, name):
            assert getattr(on_meta.data, name) is getattr(task.data, name)
    # Gathering a batch from the device's copy reads no media value on the host
    # (it would fail on "meta") and mixes no host tensor into a device operation
    # (indexing device media with host indices would make the host wait).
    with _MixedDevices() as mixed:
        batch = on_meta.batch(cfg, 0, 0, 1, META)
    assert mixed.ops == []
    want = task.batch(cfg, 0, 0, 1, torch.device("cpu"))
    for key, t in want.inputs.items():
        assert batch.inputs[key].device == META and batch.inputs[key].shape == t.shape
    if kind == "retrieval":
        assert batch.hard["video"].device == META and batch.hard["video"].shape == want.hard["video"].shape


def test_tasks_over_the_same_data_share_one_device_copy():
    data = tiny_data()
    multi = MultiTask({"vtm": RetrievalTask(data),
                       "mlm": MLMTask(data, Tokenizer.train(["a red circle moves left"], vocab_size=50))})
    moved = multi.with_media_on(META)
    assert len(multi.media()) == 2 and multi.media()[0] is multi.media()[1] is data.videos
    a, b = moved.media()
    assert a is b and a.device == META
    assert multi.tasks["vtm"].data.videos is data.videos  # the original task is unchanged


def test_media_on_device_is_validated():
    with pytest.raises(ValueError, match="media_on_device='gpu'"):
        TrainConfig(media_on_device="gpu")


def test_training_with_the_media_on_the_device_matches_training_from_the_host():
    data = tiny_data()
    curves = []
    for where in ("off", "on"):
        cfg = TrainConfig(steps=4, groups_per_step=4, log_every=1, device=DEVICE, media_on_device=where,
                          hard_negatives="videos")
        curves.append([h["loss"] for h in train(tiny_model(device=DEVICE), data, cfg, progress=False).history])
    assert curves[0] == pytest.approx(curves[1], rel=1e-5, abs=1e-6)
    assert data.videos.device.type == "cpu"  # the caller's data stays where it was


def test_checkpoint_every_zero_trains_without_a_run_folder():
    cfg = TrainConfig(steps=2, groups_per_step=4, checkpoint_every=0, log_every=10)
    assert train(tiny_model(), tiny_data(), cfg, progress=False).steps == 2


def test_evaluation_inside_a_run_uses_full_fp32_and_the_callers_precision_is_restored(monkeypatch):
    seen = []
    task = RetrievalTask(tiny_data())
    monkeypatch.setattr(task, "evaluate", lambda *a: seen.append(torch.get_float32_matmul_precision()) or {})
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        cfg = TrainConfig(steps=2, groups_per_step=4, eval_every=1, log_every=1, device=DEVICE)
        train(tiny_model(device=DEVICE), task, cfg, progress=False, val_data=tiny_data())
        assert seen == ["highest", "highest"]
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(before)


def test_a_dual_encoders_layerdrop_is_drawn_per_step():
    import slimvl
    from slimvl.models.latents import LatentEncoder
    from slimvl.train import _step_draws

    dual = slimvl.decompose(tiny_model(cross_attn_drop=0.5)).train()
    encoders = [m for m in dual.modules() if isinstance(m, LatentEncoder)]
    assert encoders
    with _step_draws(dual):
        assert all(e.plan is not None for e in encoders)
    assert all(e.plan is None for e in encoders)
