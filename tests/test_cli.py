"""Tests for slimvl.cli: bench output, --set parsing, error reporting."""

import json
from pathlib import Path

import pytest
import torch

from slimvl import create_model
from slimvl.checkpoint import latest_checkpoint, load_model, save_checkpoint
from slimvl.cli import build_parser, main, parse_keep, parse_overrides

TINY = dict(dim=32, heads=2, image_size=32, patch_size=8, vocab_size=50, max_text_len=12, embed_dim=16)


def test_bench_prints_json_with_ratios(capsys):
    main(["bench", "--model", "single_stream_tiny", "perceiver_vl_tiny", "--min-run-time", "0.05",
          "--batch", "2", "--frames", "2", "--text-len", "8"])
    rows = json.loads(capsys.readouterr().out)
    assert [r["model"] for r in rows] == ["single_stream_tiny", "perceiver_vl_tiny"]
    assert rows[0]["gflops_ratio"] == 1.0 and rows[0]["latency_ratio"] == 1.0
    assert rows[1]["gflops_ratio"] == pytest.approx(rows[1]["gflops_per_pair"] / rows[0]["gflops_per_pair"])
    for r in rows:
        assert r["batch"] == 2
        assert r["gflops_per_pair"] > 0 and r["latency_ms_per_pair"] > 0
        assert r["gflops_per_pair"] == pytest.approx(r["gflops_per_pair_analytic"], rel=0.05)
    # The bench is run with the presets' own shapes.
    ss = create_model("single_stream_tiny")
    assert rows[0]["gflops_per_pair_analytic"] == pytest.approx(ss.analytic_flops(2, 8) / 1e9)
    assert rows[0]["params"] == ss.num_params()


def test_bench_set_applies_to_all_models(capsys):
    main(["bench", "--model", "perceiver_vl_tiny", "--set", "dim=32", "--set", "heads=2", "--set",
          "image_size=32", "--min-run-time", "0.02", "--batch", "2", "--frames", "1", "--text-len", "4"])
    (row,) = json.loads(capsys.readouterr().out)
    m = create_model("perceiver_vl_tiny", dim=32, heads=2, image_size=32)
    assert row["params"] == m.num_params()
    assert row["gflops_per_pair_analytic"] == pytest.approx(m.analytic_flops(1, 4) / 1e9)


def test_parse_overrides():
    assert parse_overrides(["dim=128", "layers=cssss"]) == {"dim": 128, "layers": "cssss"}
    got = parse_overrides(["mlp_ratio=2.5", " heads =4", "name=a=b", "flag=true"])
    assert got == {"mlp_ratio": 2.5, "heads": 4, "name": "a=b", "flag": True}
    assert isinstance(got["heads"], int)
    assert parse_overrides(None) == {} and parse_overrides([]) == {}
    # YAML 1.1 reads "2e-3" as a string; a learning rate must still be a number
    assert parse_overrides(["lr=2e-3", "eps=1e-8", "layers=cs"]) == {"lr": 0.002, "eps": 1e-8, "layers": "cs"}


def test_parse_overrides_without_equals_exits():
    with pytest.raises(SystemExit) as e:
        parse_overrides(["dim"])
    assert "dim" in str(e.value.code) and "key=value" in str(e.value.code)


def test_bench_bad_set_exits():
    with pytest.raises(SystemExit) as e:
        main(["bench", "--model", "perceiver_vl_tiny", "--set", "dim128", "--min-run-time", "0.02"])
    assert e.value.code != 0
    assert "dim128" in str(e.value.code)


def test_bench_invalid_override_reports_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--model", "perceiver_vl_tiny", "--set", "num_latents=0", "--min-run-time", "0.02"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("slimvl: error:") and "num_latents" in err
    assert "Traceback" not in err


def test_bench_unknown_model_reports_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--model", "nonexistent_model", "--min-run-time", "0.02"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "nonexistent_model" in err and "perceiver_vl_tiny" in err


def test_eval_missing_data_folder_exits_2(tmp_path, capsys):
    torch.manual_seed(0)
    run = tmp_path / "run"
    save_checkpoint(run / "checkpoints" / "step_0000001", create_model("perceiver_vl_tiny", **TINY))
    missing = tmp_path / "no_such_data"
    with pytest.raises(SystemExit) as e:
        main(["-q", "eval", "--data", str(missing), "--checkpoint", str(run)])
    assert e.value.code == 2
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.startswith("slimvl: error:")]
    assert len(lines) == 1
    assert str(missing) in lines[0]
    assert "Traceback" not in captured.err
    assert captured.out == ""


def test_eval_missing_checkpoint_exits_2(tmp_path, capsys):
    missing = tmp_path / "no_ckpt"
    with pytest.raises(SystemExit) as e:
        main(["-q", "eval", "--data", str(tmp_path), "--checkpoint", str(missing)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "slimvl: error:" in err and str(missing) in err


def test_parse_keep():
    assert parse_keep("all") is None and parse_keep("2") == 2 and parse_keep("0,2") == [0, 2]
    assert parse_keep("[1]") == [1]
    with pytest.raises(ValueError, match="cross-attn-keep"):
        parse_keep("first")


def test_parser_requires_command():
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([])
    assert e.value.code == 2


def test_parser_bench_defaults():
    a = build_parser().parse_args(["bench"])
    assert a.model == ["single_stream_tiny", "perceiver_vl_tiny"]
    assert a.frames == 4 and a.text_len is None and a.batch == 64 and a.min_run_time == 1.0
    assert (a.device, a.dtype, a.compile) == ("cpu", "fp32", False)


def test_data_make_train_resume_eval_end_to_end(tmp_path, capsys):
    """The commands chain: make a tiny set, train, resume, evaluate, skipping a corrupt video."""
    data, run = tmp_path / "data", tmp_path / "run"
    main(["-q", "data", "make", "--out", str(data), "--n-train", "16", "--n-val", "4", "--n-test", "8",
          "--frames", "4", "--size", "32"])
    assert (data / "annotations.json").is_file() and len(list((data / "videos").glob("*.mp4"))) == 28
    train_ids = (data / "splits" / "train.txt").read_text().split()
    (data / "videos" / f"{train_ids[0]}.mp4").write_bytes(b"")
    model_args = ["--set", "dim=32", "--set", "heads=2", "--set", "image_size=32", "--set", "max_text_len=24"]
    train = ["-q", "train", "--data", str(data), "--model", "perceiver_vl_tiny", *model_args, "--out", str(run),
             "--frames", "2", "--train-set", "groups_per_step=2", "--train-set", "groups_per_unit=2",
             "--train-set", "warmup_steps=1", "--train-set", "checkpoint_every=2", "--skip-bad"]
    main([*train, "--steps", "2", "--eval-every", "1"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["steps"] == 2 and out["val"]["step"] == 2 and 0.0 <= out["val"]["t2v_r1"] <= 1.0
    log = json.loads((run / "train_log.json").read_text())
    assert [e["step"] for e in log["evals"]] == [1, 2]
    assert [Path(p).name for p in log["skipped_media"]] == [f"{train_ids[0]}.mp4"]
    main([*train, "--steps", "3", "--resume"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 3
    # Fine-tune from that run with twice the latents (interpolated); a checkpoint of another width is refused.
    ft = ["-q", "train", "--data", str(data), "--model", "perceiver_vl_tiny", *model_args, "--frames", "2",
          "--train-set", "groups_per_step=2", "--train-set", "groups_per_unit=2", "--train-set", "warmup_steps=1",
          "--skip-bad", "--steps", "1", "--init-from", str(run), "--set", "num_latents=32"]
    main([*ft, "--out", str(tmp_path / "ft"), "--latent-resize", "interpolate"])
    capsys.readouterr()
    assert load_model(latest_checkpoint(tmp_path / "ft")).encoder.latents.shape == (32, 32)
    with pytest.raises(SystemExit) as e:
        main([*ft, "--set", "dim=48", "--out", str(tmp_path / "ft2")])
    assert e.value.code == 2 and "differs in ['dim'" in capsys.readouterr().err
    test_ids = (data / "splits" / "test.txt").read_text().split()
    (data / "videos" / f"{test_ids[0]}.mp4").write_bytes(b"not a video")
    with pytest.raises(SystemExit) as e:
        main(["-q", "eval", "--data", str(data), "--checkpoint", str(run), "--frames", "2"])
    assert e.value.code == 2 and f"{test_ids[0]}.mp4" in capsys.readouterr().err
    main(["-q", "eval", "--data", str(data), "--checkpoint", str(run), "--frames", "2", "--skip-bad"])
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["checkpoint"].endswith("step_0000003")
    assert metrics["n_items"] == 7 and metrics["skipped_media"] == 1 and 0.0 <= metrics["t2v_r1"] <= 1.0
    assert metrics["cross_attn_keep"] is None and metrics["compiled"] is False
    # Compiled layers score the same pairs the same way.
    main(["-q", "eval", "--data", str(data), "--checkpoint", str(run), "--frames", "2", "--skip-bad", "--compile"])
    compiled = json.loads(capsys.readouterr().out)
    assert compiled["compiled"] is True
    assert {k: round(v, 6) for k, v in compiled.items() if k.startswith(("t2v_", "v2t_"))} == \
        {k: round(v, 6) for k, v in metrics.items() if k.startswith(("t2v_", "v2t_"))}
    # Inference with the first cross-attention only, then a cross-attention the model does not have.
    main(["-q", "eval", "--data", str(data), "--checkpoint", str(run), "--frames", "2", "--skip-bad",
          "--cross-attn-keep", "1"])
    assert json.loads(capsys.readouterr().out)["cross_attn_keep"] == 1
    with pytest.raises(SystemExit) as e:
        main(["-q", "eval", "--data", str(data), "--checkpoint", str(run), "--frames", "2", "--skip-bad",
              "--cross-attn-keep", "0,5"])
    assert e.value.code == 2 and "cross_attn_keep" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")))
def test_shipped_configs_are_valid(path):
    """Every YAML preset in configs/ builds, and trains with the demo's recipe (so
    that ``slimvl train --config`` reproduces the demo's runs)."""
    import yaml

    from slimvl.recipes import TEXT_LEN, TRAIN
    from slimvl.train import TrainConfig

    spec = yaml.safe_load(path.read_text())
    model = create_model(spec["model"], **spec.get("model_overrides", {}))
    assert model.config.max_text_len == TEXT_LEN
    cfg = TrainConfig(**spec["train"])
    for key in spec["train"]:
        assert getattr(cfg, key) == getattr(TRAIN, key), f"{path.name}: train.{key} differs from the demo"


def _subparsers(parser, prefix=()):
    import argparse

    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subparsers(sub, (*prefix, name))


def test_help_gives_every_option_a_line_and_its_default():
    import argparse

    seen = set()
    for path, parser in _subparsers(build_parser()):
        text = " ".join(parser.format_help().split())
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            name = "/".join(path) + " " + (action.option_strings[-1] if action.option_strings else action.dest)
            seen.add(name)
            assert action.help, f"{name}: no help line"
            if action.default not in (None, False):
                shown = " ".join(action.default) if isinstance(action.default, list) else action.default
                assert f"(default: {shown})" in text or f"(default: {action.default})" in text, \
                    f"{name}: default {action.default!r} not shown"
    assert {"train --steps", "train --seed", "train --device", "eval --split", "data/make --frames",
            "bench --dtype"} <= seen
    help_text = " ".join(build_parser()._subparsers._group_actions[0].choices["train"].format_help().split())
    assert "(default: the --config file's, else 500)" in help_text


def test_torchrun_prints_one_result_line(tmp_path):
    """Data-parallel training answers once (rank 0), not once per process."""
    import os
    import subprocess
    import sys

    from slimvl.data import make_dataset

    data = make_dataset(tmp_path / "data", n_train=16, n_val=4, n_test=4, frames=2, size=32, progress=False)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1] / "src"), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "slimvl.cli", "-q", "train", "--data", str(data), "--out", str(tmp_path / "run"),
                          "--set", "dim=32", "--set", "heads=2", "--set", "image_size=32", "--frames", "2",
                          "--steps", "2", "--device", "cpu", "--train-set", "groups_per_step=4",
                          "--train-set", "groups_per_unit=2"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [ln for ln in out.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1 and json.loads(lines[0])["steps"] == 2
