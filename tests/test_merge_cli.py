"""Token merging from the command line and through checkpoints: train with
merging, fine-tune a checkpoint with it, evaluate with or without it."""
from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_model

from slimvl.checkpoint import CheckpointError, latest_checkpoint, load_model, save_checkpoint
from slimvl.cli import main
from slimvl.data import make_dataset
from slimvl.merge import Schedule, is_patched, patch
from slimvl.merge.finetune import model_for_merging

MODEL = ["--set", "dim=32", "--set", "heads=2", "--set", "image_size=32", "--set", "patch_size=4",
         "--set", "max_text_len=24"]
TRAIN = ["--frames", "1", "--train-set", "groups_per_step=2", "--train-set", "groups_per_unit=2",
         "--train-set", "warmup_steps=1", "--steps", "2"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("merge") / "images", kind="image-text", n_train=16, n_val=4,
                        n_test=8, size=32, progress=False)


def _last_json(capsys) -> dict:
    out = capsys.readouterr().out.strip()
    try:
        return json.loads(out)
    except json.JSONDecodeError:
        return json.loads(out.splitlines()[-1])


def test_train_finetune_and_eval_with_merging(images, tmp_path, capsys):
    base, tuned = tmp_path / "base", tmp_path / "tuned"
    main(["-q", "train", "--data", str(images), "--model", "clip_tiny", *MODEL, *TRAIN, "--out", str(base)])
    assert "merge" not in _last_json(capsys)
    # CrossGET from the base: cross tokens added (their offsets start at zero), the consistency loss logged.
    main(["-q", "train", "--data", str(images), "--merge", "crossget", "--r", "4", "--init-from", str(base), *TRAIN,
          "--set", "cross_hidden=true", "--out", str(tuned)])
    assert _last_json(capsys)["merge"] == {"method": "crossget", "r": 4, "r_text": 0, "importance_weight": 1.0}
    log = json.loads((tuned / "train_log.json").read_text())
    assert "cross" in log["history"][-1]
    model = load_model(latest_checkpoint(tuned))
    assert is_patched(model) and model.merge_method == "crossget" and model.r == 4 and model.config.cross_tokens
    assert model.config.cross_hidden  # a setting that adds no weights passes through to the fine-tuned model
    # Evaluation merges as trained, or as asked.
    evals = {}
    for extra in ([], ["--merge", "none"], ["--merge", "tome", "--r", "8"]):
        main(["-q", "eval", "--data", str(images), "--checkpoint", str(tuned), "--frames", "1", *extra])
        evals[" ".join(extra)] = _last_json(capsys)
    assert evals[""]["merge"] == {"method": "crossget", "r": 4, "r_text": 0, "importance_weight": 1.0}
    assert "merge" not in evals["--merge none"]
    assert evals["--merge tome --r 8"]["merge"] == {"method": "tome", "r": 8, "r_text": 0, "importance_weight": 1.0}
    main(["-q", "eval", "--data", str(images), "--checkpoint", str(tuned), "--frames", "1", "--r", "2"])
    # Its own method, new r.
    assert _last_json(capsys)["merge"] == {"method": "crossget", "r": 2, "r_text": 0, "importance_weight": 1.0}
    main(["-q", "eval", "--data", str(images), "--checkpoint", str(tuned), "--frames", "1", "--importance-weight",
          "0"])
    assert _last_json(capsys)["merge"] == {"method": "crossget", "r": 4, "r_text": 0, "importance_weight": 0.0}
    with pytest.raises(SystemExit) as e:  # ToMe weighs no importance
        main(["-q", "eval", "--data", str(images), "--checkpoint", str(tuned), "--frames", "1", "--merge", "tome",
              "--importance-weight", "0.5"])
    assert e.value.code == 2 and "importance_weight=0.5" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # nothing merges, so no merging option means anything
        main(["-q", "eval", "--data", str(images), "--checkpoint", str(tuned), "--frames", "1", "--merge", "none",
              "--importance-weight", "0"])
    assert e.value.code == 2 and "drop --importance-weight" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # --r alone means nothing for a model that merges nothing
        main(["-q", "eval", "--data", str(images), "--checkpoint", str(base), "--frames", "1", "--r", "2"])
    assert e.value.code == 2 and "--merge" in capsys.readouterr().err
    # A model the checkpoint's weights do not fit is refused, naming the weights.
    with pytest.raises(SystemExit) as e:
        main(["-q", "train", "--data", str(images), "--merge", "tome", "--init-from", str(base), *TRAIN,
              "--set", "depth=5", "--out", str(tmp_path / "bad")])
    assert e.value.code == 2 and "do not fit" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["-q", "train", "--data", str(images), "--merge", "tome", "--init-from", str(base), "--model",
              "clip_tiny", *TRAIN, "--out", str(tmp_path / "bad2")])
    assert e.value.code == 2 and "drop --model" in capsys.readouterr().err


def test_a_checkpoint_keeps_its_merging(tmp_path):
    model = tiny_model("single_stream_tiny", patch_size=4).eval()
    patch(model, "tome", r=Schedule(6, -0.5))
    save_checkpoint(tmp_path / "ckpt", model)
    back = load_model(tmp_path / "ckpt")
    assert is_patched(back) and back.r == Schedule(6, -0.5) and back.merge_method == "tome"
    video = torch.randn(2, 2, 3, 32, 32)
    ids, mask = torch.randint(5, 50, (2, 12)), torch.ones(2, 12, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(back(video, ids, mask).logits, model(video, ids, mask).logits)
    # The same weights fine-tuned with CrossGET instead (a single stream has no cross tokens to add).
    tuned = model_for_merging(tmp_path / "ckpt", "crossget", r=4, importance_weight=0.25)
    assert tuned.merge_method == "crossget" and tuned.r == 4 and tuned.importance_weight == 0.25
    save_checkpoint(tmp_path / "tuned", tuned)
    assert load_model(tmp_path / "tuned").importance_weight == 0.25
    # A checkpoint saved before the weight existed merges as CrossGET was published.
    meta = json.loads((tmp_path / "tuned" / "meta.json").read_text())
    del meta["merge"]["importance_weight"]
    (tmp_path / "tuned" / "meta.json").write_text(json.dumps(meta))
    assert load_model(tmp_path / "tuned").importance_weight == 1.0
    meta = json.loads((tmp_path / "ckpt" / "meta.json").read_text())
    meta["merge"]["method"] = "fast"
    (tmp_path / "ckpt" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="token-merging settings"):
        load_model(tmp_path / "ckpt")


def test_bench_measures_merged_models_by_counting(capsys):
    main(["bench", "--model", "clip_tiny", "--min-run-time", "0.01", "--batch", "2", "--frames", "1",
          "--text-len", "8"])
    (plain,) = json.loads(capsys.readouterr().out)
    main(["bench", "--model", "clip_tiny", "--min-run-time", "0.01", "--batch", "2", "--frames", "1",
          "--text-len", "8", "--merge", "tome", "--r", "8"])
    (merged,) = json.loads(capsys.readouterr().out)
    assert plain["gflops_per_pair"] == pytest.approx(plain["gflops_per_pair_analytic"], rel=0.05)
    # A merged model's cost follows its merges: counted, never a formula that ignores them.
    assert merged["gflops_per_pair_analytic"] is None and merged["retrieval_gflops"] is None
    assert merged["gflops_per_pair"] < 0.8 * plain["gflops_per_pair"]
    model = tiny_model("clip_tiny")
    patch(model, "tome", r=4)
    with pytest.raises(NotImplementedError, match="count_flops"):
        model.analytic_flops(1, 8)
    with pytest.raises(SystemExit) as e:
        main(["bench", "--model", "clip_tiny", "--r", "8", "--min-run-time", "0.01"])
    assert e.value.code == 2 and "--merge" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["bench", "--model", "clip_tiny", "--importance-weight", "0", "--min-run-time", "0.01"])
    assert e.value.code == 2 and "--importance-weight: give --merge" in capsys.readouterr().err


def test_a_run_resumes_only_with_its_own_merging(images, tmp_path, capsys):
    run = tmp_path / "run"
    start = ["-q", "train", "--data", str(images), "--model", "clip_tiny", *MODEL, *TRAIN, "--out", str(run)]
    main([*start, "--merge", "crossget", "--r", "4", "--importance-weight", "0"])
    capsys.readouterr()
    longer = [*start, "--resume", "--steps", "3"]
    for other in (["--merge", "crossget", "--r", "4"], ["--merge", "tome", "--r", "4"], []):
        with pytest.raises(SystemExit) as e:
            main([*longer, *other])
        assert e.value.code == 2 and "resume with the same --merge" in capsys.readouterr().err
    main([*longer, "--merge", "crossget", "--r", "4", "--importance-weight", "0"])
    assert _last_json(capsys)["steps"] == 3
