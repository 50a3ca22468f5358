"""Bad input, lost work and silent wrong results: one test per case of
docs/robustness.md (the table names the test that checks each row)."""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import DEVICE, assert_same_weights, tiny_data, tiny_model
from safetensors.torch import load_file

from slimvl.checkpoint import CheckpointError, latest_checkpoint, load_model, read_meta, save_checkpoint
from slimvl.cli import main
from slimvl.data import Tokenizer, make_dataset
from slimvl.data.qa import make_qa
from slimvl.evaluate import NonFiniteScores, evaluate, score_matrix
from slimvl.pipeline import load_split, load_tokenizer
from slimvl.tasks import RetrievalTask
from slimvl.tasks.retrieval import recall_metrics
from slimvl.train import TrainConfig, TrainingInterrupted, train

SRC = Path(__file__).parents[1] / "src"
CFG = dict(steps=6, groups_per_step=4, lr=3e-3, warmup_steps=2, checkpoint_every=3, log_every=1, seed=1,
           device=DEVICE)
DATA = dict(n_train=16, n_val=4, n_test=8, frames=4, size=32, progress=False)
MODEL_ARGS = ["--set", "dim=32", "--set", "heads=2", "--set", "image_size=32", "--set", "max_text_len=24"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """A tiny synthetic video-text dataset (do not modify: copy it first)."""
    return make_dataset(tmp_path_factory.mktemp("shapes") / "data", **DATA)


def _train_args(data: Path, out: Path, steps: int = 2, *extra: str) -> list[str]:
    return ["-q", "train", "--data", str(data), "--model", "perceiver_vl_tiny", *MODEL_ARGS, "--out", str(out),
            "--frames", "2", "--steps", str(steps), "--device", DEVICE, "--train-set", "groups_per_step=2",
            "--train-set", "groups_per_unit=2", "--train-set", "warmup_steps=1", *extra]


def _error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("slimvl:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


# ---------------------------------------------------------------- 1. broken models


def test_nan_scores_stop_evaluation_with_a_count():
    model = tiny_model(device=DEVICE)
    with torch.no_grad():
        model.vtm_head[1].weight.fill_(float("nan"))
    with pytest.raises(NonFiniteScores, match=r"^288 of 288 scores are not finite"):
        evaluate(model, tiny_data(), progress=False)


def test_recall_of_nan_scores_would_be_perfect():
    """Why the check exists: NaN compares false with everything, so every
    positive ranks first."""
    scores = torch.full((4, 4), float("nan"))
    assert recall_metrics(scores, torch.arange(4))["t2v_r1"] == 1.0


def test_checkpoint_with_nan_weights_is_refused_at_load(tmp_path):
    model = tiny_model()
    with torch.no_grad():
        model.text_embed.tokens.weight[3, 0] = float("inf")
    save_checkpoint(tmp_path / "ck", model)
    with pytest.raises(CheckpointError, match=r"1 weight tensors hold NaN or infinite values, e.g. "
                                              r"\['text_embed.tokens.weight'\]"):
        load_model(tmp_path / "ck")
    from slimvl.models.pretrained import init_from_checkpoint

    with pytest.raises(CheckpointError, match="NaN or infinite"):
        init_from_checkpoint(tiny_model(), tmp_path / "ck")


def test_random_bytes_under_a_valid_header_are_refused(tmp_path):
    save_checkpoint(tmp_path / "ck", tiny_model())
    path = tmp_path / "ck" / "model.safetensors"
    raw = path.read_bytes()
    header = 8 + int.from_bytes(raw[:8], "little")
    noise = np.random.default_rng(0).integers(0, 256, len(raw) - header, dtype=np.uint8).tobytes()
    path.write_bytes(raw[:header] + noise)  # same size: meta.json's size check passes
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        load_model(tmp_path / "ck")


def test_cli_eval_names_the_checkpoint_and_the_non_finite_count(shapes, tmp_path, capsys):
    torch.manual_seed(0)
    model = tiny_model(max_text_len=24, vocab_size=load_tokenizer(shapes).vocab_size)
    with torch.no_grad():  # finite weights whose scores overflow to infinity
        model.vtm_head[1].weight.fill_(3e38)
        model.vtm_head[0].bias.fill_(1.0)
    ckpt = save_checkpoint(tmp_path / "ck", model)
    with pytest.raises(SystemExit) as e:
        main(["-q", "eval", "--data", str(shapes), "--checkpoint", str(ckpt), "--frames", "2", "--device", DEVICE])
    assert e.value.code == 2
    line = _error(capsys)
    assert str(ckpt) in line and "64 of 64 scores are not finite" in line


# ---------------------------------------------------------------- 2. ties under bf16


@pytest.mark.parametrize("name,stream", [("single_stream_tiny", None), ("perceiver_vl_tiny", "single"),
                                         ("perceiver_vl_tiny", "multi"), ("perceiver_vl_tiny", "mixed")])
def test_scores_stay_fp32_under_bf16_autocast(name, stream):
    """bf16 scores tie: with the head in bf16 a 10x20 gallery kept about a
    third of its distinct values. In fp32 every pair keeps its own, but for
    a rare chance tie."""
    model = tiny_model(name, **({"stream": stream} if stream else {}))
    data = tiny_data(n_groups=10)
    exact = score_matrix(model, data, device="cpu", amp="off", progress=False)
    mixed = score_matrix(model, data, device="cpu", amp="bf16", progress=False)
    assert mixed.dtype == torch.float32
    # fp32 can still tie two unrelated pairs by chance (seen on one CPU: two
    # of the 800 scores, 0.4429 each); bf16 scores would lose two thirds.
    assert min(mixed.unique().numel(), exact.unique().numel()) >= exact.numel() - 2
    # The rest of the network did run in bf16 (the scores moved, a little).
    assert 0 < (mixed - exact).abs().max() < 0.1 * exact.std() + 0.2


def test_ties_count_against_the_query():
    scores = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    m = recall_metrics(scores, torch.tensor([0, 1]))
    assert m["t2v_r1"] == 0.5 and m["v2t_r1"] == 0.5


# ---------------------------------------------------------------- 3. tokenizer and checkpoint


def test_token_ids_beyond_the_vocabulary_name_vocab_size():
    model = tiny_model()  # vocab_size=50
    video = torch.zeros(1, 2, 3, 32, 32)
    for bad in (50, -1):
        ids = torch.tensor([[2, bad, 3]])
        with pytest.raises(ValueError, match=r"vocab_size=50.*another tokenizer"):
            model(video, ids, torch.ones_like(ids, dtype=torch.bool))
        with pytest.raises(ValueError, match=r"vocab_size=50"):
            model.embed_text(ids, torch.ones_like(ids, dtype=torch.bool))


def test_run_keeps_its_tokenizer_and_eval_uses_it(shapes, tmp_path, capsys):
    data, run = tmp_path / "data", tmp_path / "run"
    import shutil

    shutil.copytree(shapes, data)
    main(_train_args(data, run))
    capsys.readouterr()
    ckpt = latest_checkpoint(run)
    meta = read_meta(ckpt)
    tok = load_tokenizer(data)
    assert meta["tokenizer"] == {"vocab_size": tok.vocab_size, "fingerprint": tok.fingerprint}
    assert meta["data_fingerprint"] == load_split(data, "train", tok, 2, 32, 24, progress=False).fingerprint
    eval_args = ["-q", "eval", "--data", str(data), "--checkpoint", str(run), "--frames", "2", "--device", DEVICE]
    main(eval_args)
    before = json.loads(capsys.readouterr().out)
    # The dataset's tokenizer is replaced by a smaller one: eval keeps using the run's own.
    small = Tokenizer.train(["a red circle", "a blue square"], vocab_size=40)
    small.save(data / "tokenizer.json")
    main(eval_args)
    after = json.loads(capsys.readouterr().out)
    assert {k: after[k] for k in ("t2v_r1", "v2t_r1")} == {k: before[k] for k in ("t2v_r1", "v2t_r1")}
    # Naming another tokenizer is an error, not a silent mismatch.
    with pytest.raises(SystemExit) as e:
        main([*eval_args, "--vocab", str(data / "tokenizer.json")])
    assert e.value.code == 2 and "is not the tokenizer" in _error(capsys)


def test_checkpoint_without_tokenizer_checks_the_vocabulary_size(shapes, tmp_path, capsys):
    model = tiny_model(max_text_len=24, vocab_size=load_tokenizer(shapes).vocab_size + 7)
    ckpt = save_checkpoint(tmp_path / "ck", model)  # the Python API, no tokenizer given
    with pytest.raises(SystemExit) as e:
        main(["-q", "eval", "--data", str(shapes), "--checkpoint", str(ckpt), "--frames", "2"])
    line = _error(capsys)
    assert e.value.code == 2 and f"vocab_size={model.config.vocab_size}" in line and "--vocab" in line


def test_resume_refuses_other_data(shapes, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    main(_train_args(shapes, run))
    other = tmp_path / "other"
    shutil.copytree(shapes, other)
    ann = json.loads((other / "annotations.json").read_text())
    ann["sentences"][0]["caption"] = "a small white ring stays still"
    (other / "annotations.json").write_text(json.dumps(ann))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(_train_args(other, run, 4, "--resume"))
    assert e.value.code == 2 and "trained on data with fingerprint" in _error(capsys)


# ---------------------------------------------------------------- 4. data make never replaces silently


def test_data_make_refuses_other_parameters_unless_overwrite(shapes, tmp_path, capsys):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(shapes, root)
    tok_before = (root / "tokenizer.json").read_bytes()
    args = ["-q", "data", "make", "--out", str(root), "--n-train", "20", "--n-val", "4", "--n-test", "8",
            "--frames", "4", "--size", "32"]
    with pytest.raises(SystemExit) as e:
        main(args)
    line = _error(capsys)
    assert e.value.code == 2 and "n_train 16 -> 20" in line and "--overwrite" in line
    assert (root / "tokenizer.json").read_bytes() == tok_before
    main([*args, "--overwrite"])
    assert json.loads((root / "DONE").read_text())["n_train"] == 20


def test_data_make_refuses_a_folder_that_is_not_a_dataset(tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("my notes")
    with pytest.raises(SystemExit):
        main(["-q", "data", "make", "--out", str(tmp_path / "mine"), "--n-train", "4"])
    assert "not a finished slimvl dataset" in _error(capsys)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "my notes"


def test_questions_are_not_replaced_silently(shapes, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(shapes, root)
    make_qa(root, questions_per_item=2)
    with pytest.raises(ValueError, match=r"questions_per_item 2 -> 3.*--overwrite"):
        make_qa(root, questions_per_item=3)
    make_qa(root, questions_per_item=3, overwrite=True)
    assert json.loads((root / "qa" / "DONE").read_text())["questions_per_item"] == 3


# ---------------------------------------------------------------- 5. silent acceptance


def _annotated(shapes: Path, tmp_path: Path, edit) -> Path:
    import shutil

    root = tmp_path / "edited"
    shutil.copytree(shapes, root)
    ann = json.loads((root / "annotations.json").read_text())
    edit(ann)
    (root / "annotations.json").write_text(json.dumps(ann))
    return root


def test_integer_caption_is_an_error_naming_the_entry(shapes, tmp_path):
    root = _annotated(shapes, tmp_path, lambda a: a["sentences"][3].update(caption=42))
    with pytest.raises(ValueError, match=r"sentence entry 3: 'caption' must be a string, got int 42"):
        load_split(root, "train", load_tokenizer(root), 2, 32, 24, progress=False)


def test_videos_as_a_dict_is_an_error_about_its_type(shapes, tmp_path):
    root = _annotated(shapes, tmp_path, lambda a: a.update(videos={v["video_id"]: v for v in a["videos"]}))
    with pytest.raises(ValueError, match=r"'videos' must be a list, got dict"):
        load_split(root, "train", load_tokenizer(root), 2, 32, 24, progress=False)


@pytest.mark.parametrize("flag,value,message", [("--frames", "0", "frames=0"), ("--n-train", "0", "n_train=0"),
                                                ("--size", "7", "size=7"), ("--group-size", "0", "group_size=0"),
                                                ("--size", "33", "must be even")])
def test_data_make_checks_parameters_first(tmp_path, capsys, flag, value, message):
    with pytest.raises(SystemExit) as e:
        main(["-q", "data", "make", "--out", str(tmp_path / "ds"), "--n-train", "8", "--n-val", "0", "--n-test", "0",
              flag, value])
    assert e.value.code == 2 and message in _error(capsys)
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporaries


def test_truncated_captions_and_padded_videos_are_counted_and_logged(tmp_path, caplog):
    root = make_dataset(tmp_path / "ds", n_train=8, n_val=4, n_test=4, frames=3, size=32, progress=False)
    tok = load_tokenizer(root)
    with caplog.at_level("INFO", logger="slimvl"):
        data = load_split(root, "train", tok, frames=4, size=32, max_len=6, progress=False)
    assert data.padded == 8  # 3 frames on disk, 4 asked for
    assert data.truncated == sum(len(tok.tokens(c)) > 4 for c in _captions(root, "train")) > 0
    lines = [r.getMessage() for r in caplog.records if "cut to 6 tokens" in r.getMessage()]
    assert lines == [f"{root}/train: {data.truncated} of 16 captions cut to 6 tokens; 8 of 8 videos had fewer "
                     "than 4 frames (last frame repeated)"]
    m = evaluate(tiny_model(max_text_len=6, vocab_size=tok.vocab_size),
                 load_split(root, "test", tok, frames=4, size=32, max_len=6, progress=False), progress=False)
    assert m["padded_videos"] == 4 and m["truncated_captions"] > 0


def _captions(root: Path, split: str) -> list[str]:
    from slimvl.data import read_msrvtt

    return [c for r in read_msrvtt(root, split) for c in r.captions]


# ---------------------------------------------------------------- 6. Ctrl-C keeps the run


class _SignalAt(RetrievalTask):
    """Retrieval, but the process receives ``sig`` while building step ``at``."""

    def __init__(self, data, at: int, sig: int):
        super().__init__(data)
        self.at, self.sig = at, sig

    def batch(self, cfg, step, rank, world, device):
        if step == self.at:
            signal.raise_signal(self.sig)
        return super().batch(cfg, step, rank, world, device)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_checkpoints_the_step_and_resumes_exactly(tmp_path, sig):
    data = tiny_data()
    full = tiny_model()
    train(full, data, TrainConfig(**CFG), progress=False)
    model = tiny_model()
    handlers = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
    with pytest.raises(TrainingInterrupted) as e:
        train(model, _SignalAt(data, 1, sig), TrainConfig(**CFG), run_dir=tmp_path, progress=False)
    assert e.value.step == 2 and e.value.checkpoint == tmp_path / "checkpoints" / "step_0000002"
    assert latest_checkpoint(tmp_path) == e.value.checkpoint
    assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == handlers  # handlers restored
    resumed = tiny_model(seed=7)
    train(resumed, data, TrainConfig(**CFG), run_dir=tmp_path, resume=True, progress=False)
    assert_same_weights(full, resumed)


def test_cli_sigterm_saves_and_prints_how_to_resume(shapes, tmp_path):
    run = tmp_path / "run"
    args = _train_args(shapes, run, 100000, "--train-set", "checkpoint_every=1")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "slimvl.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while latest_checkpoint(run) is None and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert latest_checkpoint(run) is not None, "training did not start"  # so the handler is installed
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("slimvl:")]
    assert line.startswith("slimvl: SIGTERM at step ") and "resume with: slimvl " in line
    step = int(line.split("at step ")[1].split(";")[0])
    assert f"last checkpoint {run / 'checkpoints' / f'step_{step:07d}'};" in line
    assert latest_checkpoint(run).name == f"step_{step:07d}"
    assert "SIGTERM: finishing step" in err  # said at once, before the step ended
    again = shlex.split(line.split("resume with: ")[1])[1:]
    assert again[-1] == "--resume"
    again[again.index("--steps") + 1] = str(step + 1)
    main(again)
    assert latest_checkpoint(run).name == f"step_{step + 1:07d}"


def test_resume_with_other_settings_is_refused(tmp_path):
    train(tiny_model(), tiny_data(), TrainConfig(**{**CFG, "steps": 3}), run_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"other settings \(lr 0.003 -> 0.01\)"):
        train(tiny_model(), tiny_data(), TrainConfig(**{**CFG, "lr": 0.01}), run_dir=tmp_path, resume=True,
              progress=False)
    # Longer, or on another device, or logged differently, is still the same run.
    train(tiny_model(), tiny_data(), TrainConfig(**{**CFG, "steps": 4, "log_every": 2}), run_dir=tmp_path,
          resume=True, progress=False)
    assert latest_checkpoint(tmp_path).name == "step_0000004"


# ---------------------------------------------------------------- 7. --resume needs a run, a run needs --resume


def test_resume_of_a_missing_or_empty_run_is_an_error(shapes, tmp_path, capsys):
    for run in (tmp_path / "typo", tmp_path / "empty"):
        (tmp_path / "empty").mkdir(exist_ok=True)
        with pytest.raises(SystemExit) as e:
            main(_train_args(shapes, run, 2, "--resume"))
        line = _error(capsys)
        assert e.value.code == 2 and str(run) in line and "no checkpoint to resume" in line
    with pytest.raises(ValueError, match="no checkpoint to resume"):
        train(tiny_model(), tiny_data(), TrainConfig(**CFG), run_dir=tmp_path / "typo", resume=True, progress=False)


def test_a_new_run_never_overwrites_an_old_one(shapes, tmp_path, capsys):
    run = tmp_path / "run"
    main(_train_args(shapes, run))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(_train_args(shapes, run))
    assert e.value.code == 2 and "already holds a run" in _error(capsys)


def test_resuming_a_finished_run_says_so(shapes, tmp_path, capsys, caplog):
    run = tmp_path / "run"
    main(_train_args(shapes, run))
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    with caplog.at_level("INFO", logger="slimvl"):
        main(_train_args(shapes, run, 2, "--resume"))
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["already_finished"] is True and not first["already_finished"]
    assert again["checkpoint"] == first["checkpoint"] and 0 < again["seconds"] <= first["seconds"]
    assert any("already finished at step 2" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------- 8. an unwritable --out fails first


def test_unwritable_run_folder_fails_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit) as e:  # the data does not exist either: the run folder is checked first
        main(_train_args(tmp_path / "no_data", blocker / "run"))
    line = _error(capsys)
    assert e.value.code == 2 and f"cannot write to the run folder {blocker / 'run'}" in line
    with pytest.raises(SystemExit):
        main(["-q", "data", "make", "--out", str(blocker / "ds"), "--n-train", "4"])
    assert "cannot write" in _error(capsys)
    with pytest.raises(ValueError, match="cannot write to the run folder"):
        train(tiny_model(), tiny_data(), TrainConfig(**CFG), run_dir=blocker / "run", progress=False)


# ---------------------------------------------------------------- 9. temporaries of killed runs are removed


def test_stale_temporaries_are_cleaned_on_the_next_run(tmp_path):
    pid = _dead_pid()
    stale_ds = tmp_path / f"ds.tmp-{pid}"
    (stale_ds / "videos").mkdir(parents=True)
    live = subprocess.Popen(["sleep", "60"])  # a writer still at work: its temporary stays
    live_ds = tmp_path / f"ds.tmp-{live.pid}"
    live_ds.mkdir()
    try:
        make_dataset(tmp_path / "ds", n_train=4, n_val=0, n_test=0, frames=2, size=32, progress=False)
        assert not stale_ds.exists() and live_ds.is_dir()
    finally:
        live.kill()
        live.wait()
    run = tmp_path / "run"
    stale_ck = run / "checkpoints" / f".step_0000003.tmp-{pid}"
    stale_ck.mkdir(parents=True)
    (run / f".train_log.json.tmp-{pid}").write_text("{")
    train(tiny_model(), tiny_data(), TrainConfig(**{**CFG, "steps": 1}), run_dir=run, progress=False)
    assert not stale_ck.exists() and not (run / f".train_log.json.tmp-{pid}").exists()
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_0000001"]


def test_failed_dataset_build_leaves_nothing(tmp_path, monkeypatch):
    import slimvl.data.make as make

    def broken(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(make, "_run_jobs", broken)
    with pytest.raises(OSError, match="No space left"):
        make_dataset(tmp_path / "ds", n_train=4, n_val=0, n_test=0, frames=2, size=32, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_failed_checkpoint_write_leaves_the_previous_one(tmp_path, monkeypatch):
    import slimvl.checkpoint as ck

    model = tiny_model()
    first = save_checkpoint(tmp_path / "step_0000001", model)
    monkeypatch.setattr(ck, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "disk full")))
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "step_0000002", model)
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name]


# ---------------------------------------------------------------- 10. the seed fixes the initial weights


def test_two_identical_cli_runs_end_with_identical_weights(shapes, tmp_path, capsys):
    runs = {}
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        main(_train_args(shapes, tmp_path / name, 2, "--seed", seed))
        runs[name] = load_file(str(latest_checkpoint(tmp_path / name) / "model.safetensors"))
    capsys.readouterr()
    assert_same_weights(runs["a"], runs["b"])
    assert not torch.equal(runs["a"]["encoder.latents"], runs["c"]["encoder.latents"])


# ---------------------------------------------------------------- 13. LayerDrop keeps the first cross-attention


@pytest.mark.parametrize("keep", [[1, 2], [2], None])
def test_layerdrop_never_drops_the_first_cross_attention_that_runs(keep):
    torch.manual_seed(0)
    model = tiny_model(layers="cscscs", cross_attn_drop=0.9, cross_attn_keep=keep).train()
    cross = [layer for kind, layer in zip(model.encoder.pattern, model.encoder.layers) if kind == "c"]
    runs = []
    hooks = [layer.register_forward_hook(lambda *a, i=i: runs.append(i)) for i, layer in enumerate(cross)]
    first = (keep or [0])[0]
    for _ in range(40):
        runs.clear()
        model.video_latents(torch.zeros(1, 2, 3, 32, 32))
        assert runs and runs[0] == first
    for h in hooks:
        h.remove()


# ---------------------------------------------------------------- 14. inputs follow the model's device


def test_public_entry_points_move_inputs_to_the_models_device():
    """A model elsewhere than its inputs (the meta device stands in for a GPU
    on a CPU-only machine) takes CPU tensors without a device error."""
    video = torch.zeros(2, 2, 3, 32, 32)
    ids = torch.randint(5, 50, (2, 6))
    mask = torch.ones_like(ids, dtype=torch.bool)
    for name, extra in (("single_stream_tiny", {}), ("perceiver_vl_tiny", {"mlm": True}),
                        ("perceiver_vl_tiny", {"stream": "mixed"}), ("perceiver_vl_tiny", {"stream": "multi"})):
        model = tiny_model(name, num_answers=3, **extra).to("meta")
        assert model(video, ids, mask).logits.device.type == "meta"
        assert model.embed_video(video).device.type == "meta" and model.embed_text(ids, mask).device.type == "meta"
        if name == "perceiver_vl_tiny":
            assert model.answer(video, ids, mask).shape == (2, 3)
            if model.cacheable:
                scores = model.score_cached(model.cache_texts(ids, mask), model.cache_videos(video))
                assert scores.shape == (2, 2)
            if extra.get("mlm"):
                assert model.mlm_logits(video, ids, mask, mask).device.type == "meta"


def test_evaluate_runs_where_the_model_is_by_default(monkeypatch):
    model = tiny_model()
    # Were "auto" the default, a machine that has CUDA would move the model there.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    out = evaluate(model, tiny_data(), progress=False)
    assert out["device"] == "cpu" and next(model.parameters()).device.type == "cpu"


def test_nan_answer_and_mlm_logits_stop_evaluation():
    from test_tasks import _qa_data

    from slimvl.tasks import MLMTask, evaluate_mlm, evaluate_qa

    qa = _qa_data()
    model = tiny_model(num_answers=len(qa.answers), mlm=True)
    with torch.no_grad():
        model.qa_head[-1].bias.fill_(float("nan"))
        model.mlm_head.bias.fill_(float("nan"))
    with pytest.raises(NonFiniteScores, match="answer logits"):
        evaluate_qa(model, qa)
    tok = Tokenizer.train(["a red circle moves left"], vocab_size=50)
    with pytest.raises(NonFiniteScores, match="MLM logits"):
        evaluate_mlm(model, tiny_data(), MLMTask(tiny_data(), tok))


def test_unknown_split_lists_the_splits(shapes):
    with pytest.raises(ValueError, match=r"split 'tset' has no items; the dataset's splits are \['test', 'train', "
                                         r"'val'\]"):
        load_split(shapes, "tset", load_tokenizer(shapes), 2, 32, 24, progress=False)


def test_init_from_uses_the_tokenizer_the_weights_were_trained_with(shapes, tmp_path, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(shapes, data)
    main(_train_args(data, tmp_path / "a"))
    first = read_meta(latest_checkpoint(tmp_path / "a"))["tokenizer"]
    Tokenizer.train(["a red circle", "a blue square"], vocab_size=40).save(data / "tokenizer.json")
    main(_train_args(data, tmp_path / "b", 2, "--init-from", str(tmp_path / "a")))
    assert read_meta(latest_checkpoint(tmp_path / "b"))["tokenizer"] == first
    capsys.readouterr()


_DDP_VALIDATION_FAILS = '''
import torch.distributed as dist
from helpers import tiny_data, tiny_model
from slimvl.evaluate import NonFiniteScores
from slimvl.tasks import RetrievalTask
from slimvl.train import TrainConfig, train


class BrokenValidation(RetrievalTask):
    def evaluate(self, model, data, device):
        raise NonFiniteScores("3 of 8 scores are NaN or infinite")  # as a broken model's would be on rank 0


try:
    train(tiny_model(), BrokenValidation(tiny_data()), TrainConfig(steps=4, groups_per_step=4, groups_per_unit=2,
          vtm_groups_per_unit=1, warmup_steps=1, eval_every=2, device="cpu"), progress=False, val_data=tiny_data())
except ValueError as e:
    print(f"rank {dist.get_rank()} stopped: {e}", flush=True)
    raise SystemExit(3)
'''


def test_validation_failure_on_rank_0_stops_every_rank(tmp_path):
    """Data-parallel, only rank 0 evaluates. When its scores are non-finite,
    every other rank stops by itself, saying why. Before, they waited for rank
    0 at the next collective: torchrun's agent killed them, and a launcher
    without one (``mp.spawn``, one process per ``srun`` task) let them wait
    for the collective's timeout."""
    script = tmp_path / "ddp_val.py"
    script.write_text(_DDP_VALIDATION_FAILS)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), str(Path(__file__).parents[1] / "src"),
                                         env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    try:
        out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                              str(script)], env=env, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("rank 1 waited for rank 0's failed validation")
    assert out.returncode != 0
    assert "rank 0 stopped: 3 of 8 scores are NaN or infinite" in out.stdout
    assert "rank 1 stopped: stopped: another process could not evaluate the model" in out.stdout
