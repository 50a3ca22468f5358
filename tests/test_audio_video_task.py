"""The audio-video tasks: mAP as AudioSet computes it, batches that carry
only what a fusion model reads, and the command line end to end on a tiny
synthetic AudioSet-style folder."""
from __future__ import annotations

import json

import pytest
import torch

from slimvl.tasks.audio_video import ANSWERS, AVData, av_batch, av_metrics, average_precision, mean_average_precision


def test_average_precision_by_hand():
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    # Positives ranked 1st and 3rd: precisions 1/1 and 2/3.
    assert average_precision(scores, torch.tensor([1, 0, 1, 0, 0])) == pytest.approx((1 + 2 / 3) / 2)
    # A perfect ranking scores 1, the reversed one (positives last) much less.
    assert average_precision(scores, torch.tensor([1, 1, 0, 0, 0])) == pytest.approx(1.0)
    assert average_precision(scores, torch.tensor([0, 0, 0, 1, 1])) == pytest.approx((1 / 4 + 2 / 5) / 2)


def test_constant_scores_earn_only_the_base_rate():
    # Ties count against the positives: a model that says nothing is not rewarded for the order of the data.
    labels = torch.tensor([1, 0, 0, 1, 0, 0, 0, 0])
    assert average_precision(torch.zeros(8), labels) == pytest.approx(2 / 8)


def test_mean_average_precision_skips_classes_without_positives():
    logits = torch.tensor([[2.0, 0.0, 1.0], [1.0, 0.0, 2.0], [0.0, 0.0, 0.0]])
    labels = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    assert mean_average_precision(logits, labels) == pytest.approx(1.0)  # column 1 has no positive: left out
    with pytest.raises(ValueError, match="no class has a positive"):
        mean_average_precision(logits, torch.zeros(3, 3))


def _data(target: str) -> AVData:
    n = 6
    inputs = {"video": torch.randint(0, 256, (n, 2, 3, 8, 8), dtype=torch.uint8),
              "audio": torch.randn(n, 4, 5).half(), "text": torch.randint(0, 9, (n, 3)),
              "text_mask": torch.ones(n, 3, dtype=torch.bool)}
    if target == "labels":
        return AVData(inputs, (torch.rand(n, 3) > 0.5).float(), ["a", "b", "c"], target)
    return AVData(inputs, torch.tensor([0, 1, 2, 0, 1, 2]), list(ANSWERS), target)


def test_batches_carry_only_the_modalities_the_model_reads():
    data = _data("labels")
    b = av_batch(data, [1, 3], torch.device("cpu"), ("video", "audio"))
    assert set(b.inputs) == {"video", "audio"}
    assert b.inputs["video"].dtype == torch.float32 and b.inputs["video"].min() >= -1
    assert b.inputs["audio"].dtype == torch.float32
    assert torch.equal(b.inputs["audio"], data.inputs["audio"][[1, 3]].float())
    b = av_batch(data, [0], torch.device("cpu"), ("video", "text"))
    assert set(b.inputs) == {"video", "text", "text_mask"}


def test_statement_metrics_give_accuracy_per_answer():
    data = _data("statements")
    logits = torch.nn.functional.one_hot(torch.tensor([0, 1, 0, 0, 1, 1]), 3).float()
    m = av_metrics(logits, data)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["accuracy_visible"] == 1.0 and m["accuracy_heard"] == 1.0 and m["accuracy_absent"] == 0.0


@pytest.fixture(scope="module")
def av_root(tmp_path_factory):
    from slimvl.cli import main

    root = tmp_path_factory.mktemp("av") / "data"
    main(["-q", "data", "make", "--kind", "audio-video", "--out", str(root), "--n-train", "16", "--n-val", "4",
          "--n-test", "12", "--frames", "4", "--size", "32", "--seconds", "1"])
    return root


def _json_after(text: str) -> dict:
    return json.loads(text[text.index("{"):])


def test_cli_trains_evaluates_and_benches_fusion_models(av_root, tmp_path, capsys):
    from slimvl.checkpoint import load_model, resolve_checkpoint
    from slimvl.cli import main

    capsys.readouterr()
    run = tmp_path / "run"
    main(["-q", "train", "--data", str(av_root), "--task", "audio-video", "--model", "fusion_locomt_tiny",
          "--set", "audio_seconds=1.0", "--out", str(run), "--steps", "2", "--train-set", "batch_size=4"])
    assert _json_after(capsys.readouterr().out)["steps"] == 2
    model = load_model(resolve_checkpoint(run))
    # The audio statistics were measured on the training split and recorded with the model.
    assert model.config.audio_mean < -1 and model.config.audio_std > 0.5
    assert model.config.num_classes == 13 and model.config.multi_label
    main(["-q", "eval", "--data", str(av_root), "--task", "audio-video", "--checkpoint", str(run), "--split", "test"])
    metrics = _json_after(capsys.readouterr().out)
    assert metrics["n_clips"] == 12 and 0 < metrics["mAP"] <= 1

    run = tmp_path / "run_text"
    main(["-q", "train", "--data", str(av_root), "--task", "audio-video-text", "--model", "fusion_mbt_tiny",
          "--set", "modalities=[video,audio,text]", "--set", "audio_seconds=1.0", "--out", str(run), "--steps", "2",
          "--train-set", "batch_size=4"])
    capsys.readouterr()
    main(["-q", "eval", "--data", str(av_root), "--task", "audio-video-text", "--checkpoint", str(run),
          "--split", "test"])
    metrics = _json_after(capsys.readouterr().out)
    assert set(metrics) >= {"accuracy", "n_clips"} and metrics["n_clips"] == 12

    main(["bench", "--model", "fusion_early_tiny", "fusion_locomt_tiny", "--frames", "8", "--min-run-time", "0.02"])
    early, locomt = json.loads(capsys.readouterr().out)
    assert locomt["gflops_ratio"] < 0.8  # LoCoMT's views cost less than joint attention
    assert locomt["gflops_per_pair_analytic"] == pytest.approx(locomt["gflops_per_pair"])


def test_cli_refuses_a_model_without_the_task_modalities(av_root, tmp_path, capsys):
    from slimvl.cli import main

    with pytest.raises(SystemExit):
        # The multi-label task gives no text; a model that reads text cannot train on it.
        main(["-q", "train", "--data", str(av_root), "--task", "audio-video", "--model", "fusion_early_tiny",
              "--set", "modalities=[video,audio,text]", "--out", str(tmp_path / "r"), "--steps", "1"])
    assert "the data has no ['text']" in capsys.readouterr().err


def test_silent_clips_are_skipped_unless_kept(tmp_path):
    import numpy as np

    from slimvl.data.audio import write_clip
    from slimvl.models import get_config
    from slimvl.pipeline import load_av_split

    root = tmp_path / "set"
    (root / "clips").mkdir(parents=True)
    (root / "class_labels_indices.csv").write_text("index,mid,display_name\n0,/m/a,a\n1,/m/b,b\n")
    rows = ["# YTID, start_seconds, end_seconds, positive_labels"]
    t = np.arange(16000) / 16000
    for i in range(3):
        wave = np.zeros(16000, np.float32) if i == 1 else (0.5 * np.sin(2 * np.pi * 300 * t)).astype(np.float32)
        write_clip(root / "clips" / f"c{i}.mp4", np.full((4, 32, 32, 3), 60 * i, np.uint8), wave, fps=4)
        rows.append(f'c{i}, 0.000, 1.000, "/m/{"ab"[i % 2]}"')
    (root / "test_segments.csv").write_text("\n".join(rows) + "\n")
    config = get_config("fusion_early_tiny", audio_seconds=1.0, num_classes=2)
    data = load_av_split(root, "test", config, progress=False)
    assert data.n == 2 and data.silent == 0  # the silent clip left out
    kept = load_av_split(root, "test", config, keep_silent=True, progress=False)
    assert kept.n == 3 and kept.silent == 1
    assert torch.count_nonzero(kept.inputs["audio"][1]) == 0  # its spectrogram is zero, the others are not
    assert torch.count_nonzero(kept.inputs["audio"][0]) > 0


def test_a_video_only_perceiver_classifier_trains_on_the_audio_video_labels(av_root, tmp_path, capsys):
    from slimvl.checkpoint import load_model, resolve_checkpoint
    from slimvl.cli import main

    run = tmp_path / "cls"
    main(["-q", "train", "--data", str(av_root), "--task", "audio-video", "--model", "perceiver_cls_tiny",
          "--out", str(run), "--steps", "2", "--train-set", "batch_size=4"])
    capsys.readouterr()
    model = load_model(resolve_checkpoint(run))
    assert model.modalities == ("video",) and model.config.num_classes == 13 and model.config.multi_label
    main(["-q", "eval", "--data", str(av_root), "--task", "audio-video", "--checkpoint", str(run), "--split", "test"])
    metrics = _json_after(capsys.readouterr().out)
    assert metrics["n_clips"] == 12 and 0 < metrics["mAP"] <= 1
