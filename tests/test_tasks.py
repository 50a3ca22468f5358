"""Tasks beyond retrieval: synthetic questions, the VQA-style layout and
reader, QA training and metrics, MLM masking and decoding, multi-task
training, and fine-tuning from a pre-trained model."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import assert_same_weights, tiny_data, tiny_model

from slimvl.checkpoint import latest_checkpoint, load_model, read_meta
from slimvl.cli import main
from slimvl.data import ANSWERS, make_dataset, make_qa, read_vqa, sample_scene, scene_questions
from slimvl.data.qa import _REFERRERS, _phrase, answer_vocab
from slimvl.data.tokenizer import Tokenizer
from slimvl.models.pretrained import init_from_checkpoint
from slimvl.tasks import MLMTask, MultiTask, QAData, QATask, RetrievalTask, mask_tokens, qa_metrics
from slimvl.train import TrainConfig, train

SMALL = dict(n_train=16, n_val=8, n_test=8, group_size=4, frames=4, size=32, progress=False)


@pytest.fixture(scope="module")
def qa_root(tmp_path_factory):
    root = make_dataset(tmp_path_factory.mktemp("qa") / "ds", kind="video-text", seed=5, **SMALL)
    make_qa(root, questions_per_item=4)
    return root


# ------------------------------------------------------------------ generation


def _referents(scene, q):
    """Objects that the question's referring expression could name."""
    return [o for o in scene.objects for attrs in _REFERRERS[q.question_type] if _phrase(o, attrs) in q.question]


@pytest.mark.parametrize("with_motion", [True, False])
def test_questions_are_answered_by_their_scene(with_motion):
    rng = np.random.default_rng(0)
    seen_types = set()
    for _ in range(150):
        scene = sample_scene(rng, with_motion=with_motion)
        for q in scene_questions(scene, rng, 4, with_motion):
            seen_types.add(q.question_type)
            assert q.answer in ANSWERS and q.question.endswith("?")
            if q.question_type == "count":
                if q.question.startswith(("how many objects are", "what is the number of objects")):
                    assert q.answer == str(len(scene.objects))
                else:
                    assert 0 <= int(q.answer) <= len(scene.objects)
                continue
            # The expression names one object of the scene, whose attribute is the answer.
            names = {o.key() for o in _referents(scene, q)}
            assert len(names) >= 1
            named = [o for o in scene.objects if o.key() in names]
            assert any(getattr(o, q.question_type) == q.answer for o in named), (q, scene)
            if q.question_type == "motion":
                assert with_motion
    expected = {"colour", "shape", "count"} | ({"motion"} if with_motion else set())
    assert seen_types == expected


def test_count_questions_include_absent_things():
    rng = np.random.default_rng(1)
    answers = [q.answer for _ in range(300) for q in scene_questions(sample_scene(rng), rng, 4)
               if q.question_type == "count"]
    share = {a: answers.count(a) / len(answers) for a in set(answers)}
    assert share.get("0", 0) > 0.1 and share.get("1", 0) > 0.2


# ------------------------------------------------------------------ layout and reader


def test_make_qa_writes_a_vqa_layout(qa_root):
    qa = qa_root / "qa"
    questions = json.loads((qa / "train_questions.json").read_text())["questions"]
    annotations = json.loads((qa / "train_annotations.json").read_text())["annotations"]
    assert len(questions) == 16 * 4 and len(annotations) == len(questions)
    assert {"question_id", "video_id", "question"} <= set(questions[0])
    assert {"question_id", "video_id", "question_type", "answer_type", "multiple_choice_answer",
            "answers"} <= set(annotations[0])
    records = read_vqa(qa_root, "test")
    assert len(records) == 8 * 4 and all(r.answer == r.answers[0] for r in records)
    assert answer_vocab(qa_root) == list(ANSWERS)
    stamp = (qa / "DONE").stat().st_mtime_ns
    make_qa(qa_root, questions_per_item=4)  # complete: reused, not rewritten
    assert (qa / "DONE").stat().st_mtime_ns == stamp


def test_reader_takes_vqa_v2_names_and_reports_bad_files(tmp_path):
    (tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps(
        {"questions": [{"question_id": 7, "image_id": 42, "question": "what is it?"}]}))
    (tmp_path / "v2_mscoco_val2014_annotations.json").write_text(json.dumps(
        {"annotations": [{"question_id": 7, "image_id": 42, "multiple_choice_answer": "cat",
                          "answers": [{"answer": "cat"}, {"answer": "dog"}]}]}))
    (r,) = read_vqa(tmp_path, "val")
    assert (r.question_id, r.media, r.answer, r.answers) == (7, "42", "cat", ["cat", "dog"])
    assert answer_vocab(tmp_path, [r]) == ["cat"]
    with pytest.raises(FileNotFoundError, match="train_questions.json"):
        read_vqa(tmp_path, "train")
    (tmp_path / "test_questions.json").write_text(json.dumps({"questions": [{"question": "no id?"}]}))
    with pytest.raises(ValueError, match="question 0 needs 'question_id'"):
        read_vqa(tmp_path, "test", need_answers=False)


def test_qa_data_pairs_questions_with_media(qa_root):
    from slimvl.pipeline import load_qa_split, load_tokenizer

    tok = load_tokenizer(qa_root, qa=True)
    assert tok.tokens("how many crosses are there?") == ["how", "many", "crosses", "are", "there", "?"]
    answers = [a for a in ANSWERS if a != "red"]  # a vocabulary without one answer
    data = load_qa_split(qa_root, "test", tok, 2, 32, 16, answers=answers, progress=False)
    assert data.n_questions == 32 and data.videos.shape == (8, 2, 3, 32, 32)
    red = [i for i, a in enumerate(data.answer_text) if a == "red"]
    assert all(int(data.answer[i]) == -1 for i in red)
    assert all(answers[int(a)] == t for a, t in zip(data.answer, data.answer_text) if a >= 0)
    # A prediction cannot match an out-of-vocabulary answer: those count as wrong.
    perfect = data.answer.clamp(min=0)
    m = qa_metrics(perfect, data)
    assert m["out_of_vocab"] == len(red)
    assert m["accuracy"] == pytest.approx(1 - len(red) / 32)
    assert set(m) >= {"accuracy_colour", "accuracy_shape", "accuracy_count", "accuracy_motion"}
    records = read_vqa(qa_root, "test")
    records[0].media = "video999999"
    from slimvl.data import VideoTextDataset

    ds = VideoTextDataset(qa_root, "test", frames=2, size=32, progress=False)
    with pytest.raises(ValueError, match="video999999"):
        QAData.from_dataset(ds, records, tok, 16, list(ANSWERS))


# ------------------------------------------------------------------ QA training


def _qa_data(n_questions=24, n_answers=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = tiny_data(n_groups=3, group_size=2, frames=2, seed=seed)
    ids = torch.randint(5, 50, (n_questions, 8), generator=g)
    mask = torch.ones(n_questions, 8, dtype=torch.bool)
    item = torch.randint(0, base.videos.shape[0], (n_questions,), generator=g)
    answer = torch.randint(0, n_answers, (n_questions,), generator=g)
    answer[0] = -1  # one answer outside the vocabulary: never trained on
    return QAData(base.videos, ids, mask, item, answer, [f"a{i}" for i in range(n_answers)],
                  ["zz"] + [f"a{int(a)}" for a in answer[1:]], ["colour", "count"] * (n_questions // 2))


@pytest.mark.parametrize("name", ["perceiver_vl_tiny", "single_stream_tiny"])
def test_qa_training_learns_and_resumes_exactly(tmp_path, name):
    data = _qa_data()
    cfg = dict(steps=40, batch_size=8, lr=3e-3, warmup_steps=2, checkpoint_every=20, log_every=5, seed=2)
    model = tiny_model(name, num_answers=5)
    before = qa_metrics(_predict(model, data), data)["accuracy"]
    result = train(model, QATask(data), TrainConfig(**cfg), run_dir=tmp_path / "a", progress=False)
    after = qa_metrics(_predict(model, data), data)["accuracy"]
    assert after > max(before, 0.6), (before, after)  # memorises its 23 trainable questions
    assert read_meta(latest_checkpoint(tmp_path / "a"))["answers"] == data.answers
    assert result.history[-1]["qa"] < result.history[0]["qa"]
    if name == "perceiver_vl_tiny":
        part = tiny_model(name, num_answers=5)
        train(part, QATask(data), TrainConfig(**cfg), run_dir=tmp_path / "b", progress=False, stop_after=20)
        resumed = tiny_model(name, seed=9, num_answers=5)
        train(resumed, QATask(data), TrainConfig(**cfg), run_dir=tmp_path / "b", resume=True, progress=False)
        assert_same_weights(model, resumed)


def _predict(model, data):
    from slimvl.tasks.qa import predict_answers

    return predict_answers(model, data, device="cpu")


def test_qa_task_trains_on_the_chosen_question_types_only():
    data = _qa_data()
    task = QATask(data, question_types=["count"])
    picked = set(task.trainable.tolist())
    assert picked and all(data.question_type[i] == "count" and data.answer[i] >= 0 for i in picked)
    # Find each sampled question among the data's (random, hence distinct) question rows.
    b = task.batch(TrainConfig(batch_size=64, seed=3), 0, 0, 1, torch.device("cpu"))
    same = (b.ids[:, None, :] == data.question_ids[None, :, : b.ids.shape[1]]).all(-1)
    assert (same.sum(1) == 1).all()
    assert {data.question_type[int(i)] for i in same.float().argmax(1)} == {"count"}
    assert len(QATask(data).trainable) == int((data.answer >= 0).sum())
    with pytest.raises(ValueError, match="unknown types \\['shape'\\]"):
        QATask(data, question_types=["count", "shape"])
    with pytest.raises(ValueError, match="unknown types"):
        QATask(data, question_types=[])


def test_qa_task_checks_the_model():
    data = _qa_data()
    with pytest.raises(ValueError, match="num_answers=5"):
        QATask(data).objective(tiny_model(num_answers=3), TrainConfig())
    with pytest.raises(ValueError, match="no qa_head"):
        tiny_model().answer(torch.zeros(1, 2, 3, 32, 32), torch.ones(1, 4, dtype=torch.long),
                            torch.ones(1, 4, dtype=torch.bool))


# ------------------------------------------------------------------ MLM


def test_mask_tokens_follows_bert():
    tok = Tokenizer.train(["a red circle moves left", "a big blue square"] * 20, vocab_size=60)
    ids, mask = tok.encode(["a red circle moves left and a big blue square grows"] * 400, 16)
    rng = np.random.default_rng(0)
    special = (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id)
    out, chosen = mask_tokens(ids, mask, rng, tok.mask_id, tok.vocab_size, special)
    real = mask & ~torch.isin(ids, torch.tensor(special))
    assert not (chosen & ~real).any()  # never [CLS], [SEP] or padding
    assert chosen.any(1).all()  # at least one position per caption
    assert 0.12 < chosen.sum() / real.sum() < 0.2
    masked_share = (out[chosen] == tok.mask_id).float().mean()
    kept_share = (out[chosen] == ids[chosen]).float().mean()
    assert 0.75 < masked_share < 0.85 and 0.05 < kept_share < 0.2
    assert torch.equal(out[~chosen], ids[~chosen])
    again, chosen2 = mask_tokens(ids, mask, np.random.default_rng(0), tok.mask_id, tok.vocab_size, special)
    assert torch.equal(again, out) and torch.equal(chosen2, chosen)


def test_mlm_decoder_queries_carry_no_token_content():
    model = tiny_model(mlm=True).eval()
    fixed = torch.randn(2, 16, 32)
    model.joint_latents = lambda *a: fixed  # the latents alone reach the decoder
    video = torch.zeros(2, 2, 3, 32, 32)
    mask = torch.ones(2, 6, dtype=torch.bool)
    masked = torch.tensor([[False, True, False, False, True, False]] * 2)
    a = model.mlm_logits(video, torch.randint(5, 50, (2, 6)), mask, masked)
    b = model.mlm_logits(video, torch.randint(5, 50, (2, 6)), mask, masked)
    assert torch.equal(a, b)
    c = model.mlm_logits(video, torch.randint(5, 50, (2, 6)), mask, ~masked)
    assert not torch.allclose(a, c)  # but the masked/unmasked flag does


class _Tok:
    pad_id, unk_id, cls_id, sep_id, mask_id, vocab_size = 0, 1, 2, 3, 4, 50


def test_multitask_pretraining_then_fine_tuning(tmp_path):
    video, image = tiny_data(seed=0), tiny_data(frames=1, seed=1)
    task = MultiTask({"video_vtm": RetrievalTask(video), "video_mlm": MLMTask(video, _Tok()),
                      "image_vtm": RetrievalTask(image), "image_mlm": MLMTask(image, _Tok())},
                     weights={"video_mlm": 0.5})
    cfg = TrainConfig(steps=4, batch_size=4, groups_per_step=4, warmup_steps=1, log_every=1, seed=3, eval_every=4)
    model = tiny_model(mlm=True)
    result = train(model, task, cfg, run_dir=tmp_path / "pre", progress=False,
                   val_data={"video_mlm": video})
    h = result.history[-1]
    assert {"video_vtm", "video_mlm", "image_vtm", "image_mlm", "video_mlm/acc"} <= set(h)
    total = h["video_vtm"] + 0.5 * h["video_mlm"] + h["image_vtm"] + h["image_mlm"]
    assert h["loss"] == pytest.approx(total, rel=1e-4)
    assert 0 <= result.evals[-1]["video_mlm/mlm_accuracy"] <= 1
    # Fine-tuning for retrieval or QA starts from the pre-trained weights; the MLM head stays behind.
    pre = latest_checkpoint(tmp_path / "pre")
    for overrides in ({}, {"num_answers": 7}):
        ft = tiny_model(seed=5, **overrides)
        report = init_from_checkpoint(ft, pre)
        assert "mlm_head.weight" in report.unused
        assert torch.equal(ft.encoder.latents, load_model(pre).encoder.latents)
    with pytest.raises(ValueError, match="unknown tasks"):
        MultiTask({"a": RetrievalTask(video)}, weights={"b": 1.0})


def test_cli_qa_end_to_end(qa_root, tmp_path, capsys):
    model = ["--set", "dim=32", "--set", "heads=2", "--set", "image_size=32"]
    run, first = tmp_path / "run", tmp_path / "shape_first"
    # A curriculum: shape questions first, then every type from that checkpoint.
    main(["-q", "train", "--task", "qa", "--data", str(qa_root), "--frames", "2", *model, "--out", str(first),
          "--steps", "2", "--train-set", "batch_size=4", "--question-types", "shape"])
    capsys.readouterr()
    main(["-q", "train", "--task", "qa", "--data", str(qa_root), "--frames", "2", *model, "--out", str(run),
          "--steps", "2", "--train-set", "batch_size=4", "--eval-every", "2", "--init-from", str(first)])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["steps"] == 2 and 0 <= out["val"]["accuracy"] <= 1
    main(["-q", "eval", "--task", "qa", "--data", str(qa_root), "--frames", "2", "--checkpoint", str(run)])
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["n_questions"] == 32 and "accuracy_motion" in metrics and "accuracy_seen" in metrics
    with pytest.raises(SystemExit) as e:
        main(["-q", "train", "--task", "qa", "--data", str(qa_root), "--image-data", str(qa_root),
              "--out", str(tmp_path / "x"), "--steps", "1"])
    assert e.value.code == 2 and "--image-data" in capsys.readouterr().err
    for wrong, message in ((["--task", "retrieval"], "only --task qa"), (["--task", "qa"], "unknown types")):
        with pytest.raises(SystemExit) as e:
            main(["-q", "train", *wrong, "--data", str(qa_root), "--question-types", "size", "--out",
                  str(tmp_path / "y"), "--steps", "1"])
        assert e.value.code == 2 and message in capsys.readouterr().err
