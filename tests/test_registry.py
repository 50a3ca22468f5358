"""One registration point for models: a model defined and registered only
here trains, evaluates, checkpoints and is profiled through the public API
and the CLI, without any change to slimvl's own files."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from helpers import tiny_data
from torch import Tensor, nn

import slimvl
from slimvl.bench import profile_model
from slimvl.checkpoint import latest_checkpoint, load_model
from slimvl.cli import main
from slimvl.evaluate import evaluate
from slimvl.models import VLConfig, VLModel, VLOutput, register_model
from slimvl.models.base import block_flops, linear_flops, score_in_fp32
from slimvl.nn import Block
from slimvl.train import TrainConfig, train


@dataclass
class MeanPoolConfig(VLConfig):
    """A deliberately simple cross-encoder: ``depth`` blocks, mean pooling."""

    model_type: ClassVar[str] = "test_mean_pool"
    depth: int = 1

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.depth, int) or self.depth < 1:
            self._fail("depth", "must be a positive integer")


@register_model(MeanPoolConfig, presets={"test_mean_pool_tiny": dict(dim=32, heads=2, image_size=32, patch_size=8,
                                                                       vocab_size=50, max_text_len=12,
                                                                       embed_dim=16)})
class MeanPool(VLModel):
    def __init__(self, config: MeanPoolConfig):
        super().__init__(config)
        c = config
        self.blocks = nn.ModuleList(Block(c.dim, c.heads, c.mlp_ratio) for _ in range(c.depth))
        self.head = nn.Linear(c.dim, 1)
        self.proj = nn.Linear(c.dim, c.embed_dim)

    def _encode(self, x: Tensor, mask: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x, key_padding_mask=mask)
        w = mask.unsqueeze(-1).to(x.dtype)
        return (x * w).sum(1) / w.sum(1)

    def forward(self, video, text_ids: Tensor | None = None, text_mask: Tensor | None = None) -> VLOutput:
        video, text_ids, text_mask = self.read_inputs(video, text_ids, text_mask)  # a mapping, or positional
        self.check_inputs(video, text_ids, text_mask)
        pooled = self._encode(*self.embed_inputs(video, text_ids, text_mask))
        return VLOutput(logits=score_in_fp32(self.head, pooled).squeeze(-1), pooled=self.proj(pooled))

    def pool_unimodal(self, inputs: Tensor, mask: Tensor, modality: int | None = None) -> Tensor:
        return self.proj(self._encode(inputs, mask))

    def analytic_flops(self, frames: int, text_len: int) -> int:
        c = self.config
        m = self.patch_embed.num_tokens(frames) + text_len
        return (self.embed_flops(frames) + c.depth * block_flops(m, m, c.dim, c.mlp_ratio, cross=False)
                + linear_flops(1, c.dim, 1) + linear_flops(1, c.dim, c.embed_dim))


def test_a_model_registered_outside_slimvl_works_everywhere(tmp_path, capsys):
    assert "test_mean_pool_tiny" in slimvl.list_models()
    torch.manual_seed(0)
    model = slimvl.create_model("test_mean_pool_tiny", depth=2)
    assert isinstance(model, MeanPool) and model.config.depth == 2
    result = train(model, tiny_data(), TrainConfig(steps=2, groups_per_step=4, warmup_steps=1), run_dir=tmp_path,
                   progress=False)
    assert result.steps == 2
    metrics = evaluate(model, tiny_data(seed=1), progress=False)
    assert 0.0 <= metrics["t2v_r1"] <= 1.0
    again = load_model(latest_checkpoint(tmp_path))
    assert isinstance(again, MeanPool)
    video, ids, mask = torch.zeros(2, 2, 3, 32, 32), torch.randint(5, 50, (2, 6)), torch.ones(2, 6, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(again(video, ids, mask).logits, model.eval()(video, ids, mask).logits)
    cost = profile_model(model, frames=2, text_len=6, batch=2, min_run_time=0.01, matmul_ref=1.0)
    assert cost["gflops_per_pair"] == pytest.approx(cost["gflops_per_pair_analytic"], rel=0.05)
    main(["bench", "--model", "single_stream_tiny", "test_mean_pool_tiny", "--set", "dim=32", "--set", "heads=2",
          "--set", "image_size=32", "--frames", "2", "--batch", "2", "--min-run-time", "0.01"])
    rows = json.loads(capsys.readouterr().out)
    assert [r["model"] for r in rows] == ["single_stream_tiny", "test_mean_pool_tiny"]


def test_registering_a_taken_name_is_an_error():
    with pytest.raises(ValueError, match="already registered"):
        register_model(MeanPoolConfig)(type("Other", (MeanPool,), {}))
    with pytest.raises(ValueError, match=r"presets \['perceiver_vl_tiny'\]"):
        @dataclass
        class OtherConfig(VLConfig):
            model_type: ClassVar[str] = "test_other"

        register_model(OtherConfig, presets={"perceiver_vl_tiny": {}})(type("Other", (MeanPool,), {}))


def test_a_task_registered_outside_slimvl_is_on_the_command_line(tmp_path, capsys):
    """A task registered here (VTM alone, no contrastive term) trains and
    evaluates through `slimvl train/eval --task` with no change to slimvl."""
    from slimvl.data import make_dataset
    from slimvl.tasks import TASKS, RetrievalTask, TaskEntry, register_task
    from slimvl.tasks.retrieval.task import load_retrieval_split

    class VTMOnly(RetrievalTask):
        name = "test_vtm_only"

        def objective(self, model, cfg):
            from dataclasses import replace

            return super().objective(model, replace(cfg, itc_weight=0.0))

    seen = []

    def evaluate_it(model, data, source, device, batch_size, progress):
        seen.append(len(data.caption_item))
        return {"captions": len(data.caption_item)}

    if "test_vtm_only" not in TASKS:
        register_task(TaskEntry("test_vtm_only", "VTM without the contrastive term", load=load_retrieval_split,
                                build=lambda source, data, config: VTMOnly(data), evaluate=evaluate_it))
    data = make_dataset(tmp_path / "data", n_train=16, n_val=4, n_test=4, frames=2, size=32, progress=False)
    main(["-q", "train", "--task", "test_vtm_only", "--data", str(data), "--out", str(tmp_path / "run"), "--steps",
          "1", "--set", "dim=32", "--set", "heads=2", "--set", "image_size=32", "--frames", "2", "--device", "cpu",
          "--train-set", "groups_per_step=4", "--train-set", "groups_per_unit=4"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["steps"] == 1 and out["final_loss"] is not None
    main(["-q", "eval", "--task", "test_vtm_only", "--data", str(data), "--checkpoint", str(tmp_path / "run"),
          "--frames", "2"])
    assert json.loads(capsys.readouterr().out)["captions"] == 4 and seen == [4]
    with pytest.raises(ValueError, match="already registered"):
        register_task(TaskEntry("test_vtm_only", "again", load=load_retrieval_split, build=lambda *a: None))


# ---------------------------------------------------------------- a third modality, from a test file alone

from slimvl.nn import MODALITIES, Modality, register_modality  # noqa: E402
from slimvl.tasks import InputsBatch, Task  # noqa: E402

AUDIO_FRAMES = 10

if "test_audio" not in MODALITIES:
    register_modality(Modality(
        "test_audio", ("test_audio",), "test_audio: float [B, F, bins] log-mel frames",
        lambda config, batch, sizes, g: {"test_audio": torch.randn(batch, AUDIO_FRAMES, config.audio_bins,
                                                                   generator=g)}))


@dataclass
class TriConfig(VLConfig):
    model_type: ClassVar[str] = "test_tri"
    audio_bins: int = 8


@register_model(TriConfig, presets={"test_tri_tiny": dict(dim=32, heads=2, image_size=32, patch_size=8, vocab_size=50,
                                                          max_text_len=12, embed_dim=16)})
class Tri(VLModel):
    """Video, audio and text in one joint encoder: is this clip's sound the caption's?"""

    modalities = ("video", "test_audio", "text")

    def __init__(self, config: TriConfig):
        super().__init__(config)
        c = config
        self.audio_proj = nn.Linear(c.audio_bins, c.dim)
        self.block = Block(c.dim, c.heads, c.mlp_ratio)
        self.head = nn.Linear(c.dim, 1)
        self.proj = nn.Linear(c.dim, c.embed_dim)

    def forward(self, inputs) -> VLOutput:
        video, audio, ids, mask = self.to_device(inputs["video"], inputs["test_audio"], inputs["text"],
                                                 inputs["text_mask"])
        parts = [self.modality(self.patch_embed(video), "video"), self.modality(self.audio_proj(audio), "test_audio"),
                 self.modality(self.text_embed(ids), "text")]
        keep = torch.cat([torch.ones(p.shape[:2], dtype=torch.bool, device=p.device) for p in parts[:2]] + [mask], 1)
        x = self.block(torch.cat(parts, 1), key_padding_mask=keep)
        w = keep.unsqueeze(-1).to(x.dtype)
        pooled = (x * w).sum(1) / w.sum(1)
        return VLOutput(logits=score_in_fp32(self.head, pooled).squeeze(-1), pooled=self.proj(pooled))

    def analytic_flops(self, frames: int, text_len: int) -> int:
        c = self.config
        m = self.patch_embed.num_tokens(frames) + AUDIO_FRAMES + text_len
        return (self.embed_flops(frames) + linear_flops(AUDIO_FRAMES, c.audio_bins, c.dim)
                + block_flops(m, m, c.dim, c.mlp_ratio, cross=False) + linear_flops(1, c.dim, 1))


@dataclass
class MatchBatch(InputsBatch):
    """Three modalities in one batch (the library's batch base), and the labels."""

    inputs: dict
    label: torch.Tensor


class MatchTask(Task):
    """Random (video, audio, caption) triples; half have their audio swapped: a match is 1."""

    name, headline = "test_match", "accuracy"

    def __init__(self, n: int = 16):
        from slimvl.nn.modalities import dummy_batch

        self.data = dummy_batch(Tri.modalities, slimvl.get_config("test_tri_tiny"), n, {"frames": 2, "text_len": 6})

    def _rows(self, rows, device):
        inputs = {k: v[rows].to(device) for k, v in self.data.items()}
        label = (rows % 2 == 0).float().to(device)
        inputs["test_audio"] = torch.where(label[:, None, None] > 0, inputs["test_audio"],
                                           inputs["test_audio"].roll(1, 0))
        return MatchBatch(inputs, label)

    def objective(self, model, cfg):
        class Loss(nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, batch):
                logits = self.model(batch.inputs).logits.float()
                loss = nn.functional.binary_cross_entropy_with_logits(logits, batch.label)
                return loss, {"bce": loss.item()}

        return Loss()

    def batch(self, cfg, step, rank, world, device):
        rows = torch.from_numpy(np.random.default_rng([cfg.seed, step]).choice(16, 8, replace=False))
        return self._rows(rows[rank::world], device)

    def samples(self, batch):
        return batch.size

    def evaluate(self, model, data, device):
        b = self._rows(torch.arange(16), device)
        with torch.no_grad():
            return {"accuracy": ((model.eval()(b.inputs).logits > 0).float() == b.label).float().mean().item()}


import numpy as np  # noqa: E402


def test_a_three_modality_model_from_a_test_file_trains_evaluates_and_is_profiled(capsys):
    torch.manual_seed(0)
    model = slimvl.create_model("test_tri_tiny")
    assert model.modality.names == ["video", "test_audio", "text"]
    result = train(model, MatchTask(), TrainConfig(steps=2, batch_size=8, warmup_steps=1, eval_every=2),
                   progress=False, val_data="unused")
    assert result.steps == 2 and 0.0 <= result.evals[-1]["accuracy"] <= 1.0
    cost = profile_model(model, frames=2, text_len=6, batch=2, min_run_time=0.01, matmul_ref=1.0)
    assert cost["gflops_per_pair"] == pytest.approx(cost["gflops_per_pair_analytic"], rel=0.05)
    capsys.readouterr()
    main(["bench", "--model", "test_tri_tiny", "--frames", "2", "--text-len", "6", "--batch", "2",
          "--min-run-time", "0.01"])
    (row,) = json.loads(capsys.readouterr().out)
    assert row["model"] == "test_tri_tiny" and row["gflops_per_pair"] == pytest.approx(cost["gflops_per_pair"])
    with pytest.raises(ValueError, match="unknown modalities"):
        from slimvl.nn.modalities import dummy_batch

        dummy_batch(("smell",), model.config, 1, {})
