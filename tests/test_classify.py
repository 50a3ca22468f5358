"""The Perceiver classifier and the synthetic world's classification tasks."""
from __future__ import annotations

import json

import pytest
import torch
from helpers import DEVICE

from slimvl import create_model
from slimvl.bench import count_flops, dummy_batch
from slimvl.cli import main
from slimvl.data import make_dataset
from slimvl.pipeline import load_class_split
from slimvl.tasks import ClassData, ClassTask, evaluate_classifier
from slimvl.tasks.classify import SHAPES, scene_labels
from slimvl.train import TrainConfig, train

TINY = dict(dim=32, heads=2, image_size=32, num_latents=8, layers="cscs")


def classifier(**kw):
    torch.manual_seed(0)
    return create_model("perceiver_cls_tiny", **{**TINY, **kw})


def test_scene_labels():
    scenes = [{"objects": [{"shape": "ring"}, {"shape": "circle"}]}, {"objects": [{"shape": "ring"}]}]
    shapes = scene_labels(scenes, "shapes")
    assert shapes.tolist() == [[1, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 1]] and SHAPES[-1] == "ring"
    assert scene_labels(scenes, "count").tolist() == [1, 0]  # classes "1", "2", "3"
    with pytest.raises(ValueError, match="target 'colour': expected one of"):
        scene_labels(scenes, "colour")
    with pytest.raises(ValueError, match=r"object counts \[4\] are outside"):
        scene_labels([{"objects": [{"shape": "ring"}] * 4}], "count")


def test_labels_are_read_from_the_datasets_scenes(tmp_path):
    root = make_dataset(tmp_path / "d", n_train=8, n_val=4, n_test=4, frames=2, size=32, progress=False)
    world = json.loads((root / "world.json").read_text())["items"]
    ids = (root / "splits" / "train.txt").read_text().split()
    data = load_class_split(root, "train", "count", 2, 32, progress=False)
    assert data.videos.shape == (8, 2, 3, 32, 32) and not data.multi_label
    assert data.labels.tolist() == [len(world[i]["scene"]["objects"]) - 1 for i in ids]
    shapes = load_class_split(root, "train", "shapes", 2, 32, progress=False)
    assert shapes.multi_label and shapes.classes == list(SHAPES)
    assert shapes.labels.sum(1).tolist() == [len({o["shape"] for o in world[i]["scene"]["objects"]}) for i in ids]


@pytest.mark.parametrize("q", [1, 3, 8])
def test_outputs_and_counted_flops_at_every_q(q):
    m = classifier().eval()
    m.active_latents = q
    x = dummy_batch(m, 2, 0, 3)
    assert m(x).shape == (3, 6) and m(x["video"]).shape == (3, 6)
    assert count_flops(lambda: m(x), m) / 3 == pytest.approx(m.analytic_flops(2), rel=0.05)


@pytest.mark.parametrize("field, value, message", [
    ("num_classes", 0, "num_classes=0: must be a positive integer"),
    ("stream", "mixed", "stream='mixed': a classifier reads no text"),
    ("decoder_layers", 0, "decoder_layers=0"),
])
def test_bad_classifier_configs(field, value, message):
    with pytest.raises(ValueError, match=message):
        classifier(**{field: value})


def _brightness_data(n: int = 48) -> ClassData:
    """Clips whose class is their brightness (dark, grey, bright): learnable in a few steps."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 3
    videos = (labels.view(-1, 1, 1, 1, 1) * 100 + torch.randint(0, 40, (n, 2, 3, 32, 32), generator=g)).to(torch.uint8)
    return ClassData(videos, labels, ["1", "2", "3"], "count")


def test_training_learns_a_learnable_class_and_evaluation_says_so():
    data = _brightness_data()
    m = classifier(num_classes=3, multi_label=False).to(DEVICE)
    before = evaluate_classifier(m, data)["accuracy"]
    train(m, ClassTask(data), TrainConfig(steps=60, batch_size=16, lr=3e-3, warmup_steps=5, device=DEVICE),
          progress=False)
    after = evaluate_classifier(m, data)
    assert after["accuracy"] >= 0.9 > before and after["n_clips"] == 48


def test_a_classifier_of_other_classes_is_refused():
    data = _brightness_data()
    with pytest.raises(ValueError, match="num_classes=6, multi_label=True; the 'count' labels need num_classes=3"):
        train(classifier(), ClassTask(data), TrainConfig(steps=1, batch_size=4), progress=False)
    with pytest.raises(ValueError, match="has no classification head"):
        evaluate_classifier(create_model("perceiver_vl_tiny"), data)


def test_cli_trains_and_evaluates_both_targets(tmp_path, capsys):
    root = make_dataset(tmp_path / "d", n_train=16, n_val=4, n_test=4, frames=2, size=32, progress=False)
    common = ["--data", str(root), "--frames", "2"]
    for target in ("shapes", "count"):
        main(["-q", "train", *common, "--model", "perceiver_cls_tiny", "--task", f"classify_{target}", "--set",
              "dim=32", "--set", "heads=2", "--set", "image_size=32", "--steps", "2", "--train-set", "batch_size=4",
              "--train-set", "warmup_steps=1", "--out", str(tmp_path / target)])
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 2
        main(["-q", "eval", *common, "--task", f"classify_{target}", "--checkpoint", str(tmp_path / target)])
        metrics = json.loads(capsys.readouterr().out)
        assert 0 <= metrics["accuracy"] <= 1 and metrics["n_clips"] == 4
        assert ("label_accuracy" in metrics) == (target == "shapes")
    with pytest.raises(SystemExit) as e:
        main(["-q", "train", *common, "--task", "classify_count", "--out", str(tmp_path / "x"), "--steps", "1"])
    assert e.value.code == 2
    assert "--task classify_count needs a model with ['multi_label', 'num_classes']; perceiver_vl_tiny has none" \
        in capsys.readouterr().err
