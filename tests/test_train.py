"""Training loop: exact resume, NaN guard, data-parallel equivalence, learning."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import assert_same_weights, tiny_data, tiny_model, weights
from safetensors.torch import load_file

from slimvl.checkpoint import latest_checkpoint, load_model
from slimvl.tasks import RetrievalTask
from slimvl.tasks.retrieval import sample_units
from slimvl.train import TrainConfig, TrainingDiverged, lr_at, train

CFG = dict(steps=6, groups_per_step=4, lr=3e-3, warmup_steps=2, checkpoint_every=3, log_every=1, seed=1)


def _state(model):
    return weights(model)


def test_resume_matches_uninterrupted_run(tmp_path):
    data = tiny_data()
    full = tiny_model()
    train(full, data, TrainConfig(**CFG), run_dir=tmp_path / "a", progress=False)

    first = tiny_model()
    train(first, data, TrainConfig(**CFG), run_dir=tmp_path / "b", progress=False, stop_after=3)
    assert latest_checkpoint(tmp_path / "b").name == "step_0000003"
    # A new process would start from a different random init: resuming must overwrite it all.
    resumed = tiny_model(seed=123)
    result = train(resumed, data, TrainConfig(**CFG), run_dir=tmp_path / "b", resume=True, progress=False)
    assert result.steps == 6
    assert_same_weights(full, resumed)
    # And the weights did move during training (the comparison is not trivial).
    assert not torch.equal(_state(full)["encoder.latents"], _state(tiny_model())["encoder.latents"])


def test_batches_depend_only_on_seed_and_step():
    data = tiny_data()
    assert (sample_units(data, 2, 2, 0, 5) == sample_units(data, 2, 2, 0, 5)).all()
    assert not (sample_units(data, 2, 2, 0, 5) == sample_units(data, 2, 2, 0, 6)).all()
    units = sample_units(data, 3, 2, 0, 5)
    assert units.shape == (3, 2 * data.group_size)
    items = data.caption_item[torch.as_tensor(units)]
    assert len(set(items.flatten().tolist())) == items.numel()  # distinct items (distinct groups)


def test_lr_schedule_warms_up_then_decays():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) < lr_at(20, cfg)
    assert lr_at(100, cfg) == pytest.approx(0.1)


class _NaNAt(RetrievalTask):
    """Retrieval whose step ``at`` has NaN videos."""

    def __init__(self, data, at: int):
        super().__init__(data)
        self.at = at

    def batch(self, cfg, step, rank, world, device):
        b = super().batch(cfg, step, rank, world, device)
        if step == self.at:
            b.video.fill_(float("nan"))
        return b


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    data = tiny_data()
    model = tiny_model()
    train(model, data, TrainConfig(**{**CFG, "steps": 3}), run_dir=tmp_path, progress=False)
    good = latest_checkpoint(tmp_path)
    before = load_file(str(good / "model.safetensors"))
    # The resumed run meets a NaN input at step 4 (index 4): its loss is not finite.
    with pytest.raises(TrainingDiverged, match=r"at step 4; .*step_0000003"):
        train(model, _NaNAt(data, 4), TrainConfig(**{**CFG, "steps": 6}), run_dir=tmp_path, resume=True,
              progress=False)
    assert latest_checkpoint(tmp_path) == good
    after = load_file(str(good / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)
    load_model(good)  # still loads


@pytest.mark.parametrize("negatives", ["random", "mined", "shared"])
def test_training_lowers_the_loss(negatives):
    data = tiny_data(n_groups=4)
    model = tiny_model("single_stream_tiny")
    cfg = TrainConfig(steps=40, groups_per_step=4, negatives=negatives, lr=3e-3, warmup_steps=5, log_every=5,
                      seed=0)
    hist = train(model, data, cfg, progress=False).history
    assert hist[-1]["loss"] < 0.7 * hist[0]["loss"]


def test_bad_train_config_is_refused():
    with pytest.raises(ValueError, match="groups_per_step"):
        TrainConfig(groups_per_step=3)
    with pytest.raises(ValueError, match="negatives"):
        TrainConfig(negatives="easy")
    with pytest.raises(ValueError, match="negatives_per_item"):
        TrainConfig(groups_per_step=4, groups_per_unit=1, negatives_per_item=1)
    with pytest.raises(ValueError, match="amp"):
        TrainConfig(amp="fp8")


WORKER = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    from helpers import assert_same_weights, tiny_data, tiny_model, weights
    from safetensors.torch import save_file
    from slimvl.train import TrainConfig, train
    torch.set_num_threads(1)
    model = tiny_model()
    train(model, tiny_data(), TrainConfig(steps=4, groups_per_step=4, groups_per_unit=2, negatives="mined",
                                          lr=3e-3, warmup_steps=1, seed=2, device="cpu"), progress=False)
    import os
    rank = os.environ.get("RANK", "single")
    save_file({{k: v.contiguous() for k, v in model.state_dict().items()}}, sys.argv[1] + f"/{{rank}}.safetensors")
""")


def test_ddp_two_processes_match_single_process(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(Path(__file__).parent)))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1] / "src"), env.get("PYTHONPATH", "")])
    subprocess.run([sys.executable, str(script), str(tmp_path)], check=True, env=env, timeout=300)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(script), str(tmp_path)], check=True, env=env, timeout=300,
                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    single = load_file(str(tmp_path / "single.safetensors"))
    r0 = load_file(str(tmp_path / "0.safetensors"))
    r1 = load_file(str(tmp_path / "1.safetensors"))
    init = tiny_model().state_dict()
    n_total = n_off = 0
    for k in single:
        assert torch.equal(r0[k], r1[k]), f"ranks disagree on {k}"
        diff = (r0[k] - single[k]).abs()
        n_total += diff.numel()
        n_off += int((diff > 1e-5 + 1e-4 * single[k].abs()).sum())
        # Adam turns a gradient that is zero up to rounding (e.g. keys of a
        # one-query decoder whose keys are still near-identical at init) into
        # a full-size step whose sign is rounding noise; the summation order
        # of the all-reduce differs from one process's, so such entries may
        # differ, but by less than one step of lr=3e-3.
        assert diff.max() < 3e-3, f"DDP != single process for {k}: max diff {diff.max():.2e}"
    assert n_off <= 0.005 * n_total, f"{n_off} of {n_total} weights differ beyond float tolerance"
    assert not torch.equal(single["encoder.latents"], init["encoder.latents"])


def test_validation_during_training_gives_a_learning_curve(tmp_path):
    data = tiny_data()
    model = tiny_model()
    cfg = TrainConfig(**{**CFG, "eval_every": 2})
    result = train(model, data, cfg, run_dir=tmp_path, progress=False, val_data=tiny_data(seed=1))
    assert [e["step"] for e in result.evals] == [2, 4, 6]
    assert all(0.0 <= e["t2v_r1"] <= e["t2v_r5"] <= 1.0 for e in result.evals)
    assert [e["train_seconds"] for e in result.evals] == sorted(e["train_seconds"] for e in result.evals)
    assert result.evals[-1]["train_seconds"] <= result.seconds
    log = json.loads((tmp_path / "train_log.json").read_text())
    assert log["evals"] == result.evals
    # Evaluating leaves the weights alone: the same run without it ends identical.
    plain = tiny_model()
    train(plain, data, TrainConfig(**CFG), progress=False)
    assert_same_weights(model, plain)
