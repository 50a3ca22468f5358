"""Nested latents: the first Q latents of a Perceiver run as a model of
their own (``active_latents``), nested training makes each such prefix a
working model, and the cost follows Q."""
from __future__ import annotations

import pytest
import torch
from helpers import DEVICE, assert_same_weights, tiny_data, tiny_model

from slimvl.bench import count_flops, dummy_inputs
from slimvl.checkpoint import latest_checkpoint, load_model, load_weights
from slimvl.train import TrainConfig, train

N = 8  # latents of the test models
STREAMS = [dict(), dict(stream="multi", decoder_layers=0), dict(stream="mixed"),
           dict(stream="mixed", share_encoder=False, decoder_layers=2)]


def model(**overrides):
    return tiny_model(num_latents=N, layers="cscs", **overrides).eval()


@pytest.mark.parametrize("stream", STREAMS)
def test_every_prefix_gives_outputs_of_the_right_shape(stream):
    m = model(**stream)
    video, ids, mask = dummy_inputs(m, 2, 7, 3)
    with torch.no_grad():
        for q in range(1, N + 1):
            m.active_latents = q
            assert m.video_latents(video).shape == (3, q, 32)
            out = m(video, ids, mask)
            assert out.logits.shape == (3,) and out.logits.isfinite().all()
            if m.cacheable:
                scores = m.score_cached(m.cache_texts(ids, mask), m.cache_videos(video))
                assert scores.shape == (3, 3) and scores.isfinite().all()


def test_qa_and_mlm_heads_read_any_number_of_latents():
    m = model(num_answers=5, mlm=True)
    video, ids, mask = dummy_inputs(m, 2, 7, 3)
    masked = torch.zeros_like(mask)
    masked[:, 1] = True
    with torch.no_grad(), m.using_latents(2):
        assert m.answer(video, ids, mask).shape == (3, 5)
        assert m.mlm_logits(video, ids, mask, masked).shape == (3, 7, m.config.vocab_size)
    assert m.active_latents is None  # restored after the block


def test_all_latents_is_the_plain_model_and_fewer_is_another():
    m = model()
    video, ids, mask = dummy_inputs(m, 2, 7, 3)
    with torch.no_grad():
        plain = m(video, ids, mask).logits
        m.active_latents = N
        assert torch.equal(m(video, ids, mask).logits, plain)
        m.active_latents = N // 2
        assert not torch.allclose(m(video, ids, mask).logits, plain)


@pytest.mark.parametrize("stream", STREAMS)
def test_counted_flops_follow_q_and_match_the_formula(stream):
    m = model(**stream)
    video, ids, mask = dummy_inputs(m, 2, 7, 4)
    counted = {}
    for q in (1, 3, N):
        m.active_latents = q
        counted[q] = count_flops(lambda: m(video, ids, mask), m) / 4
        assert counted[q] == pytest.approx(m.analytic_flops(2, 7), rel=0.05), q
    assert counted[1] < counted[3] < counted[N]  # no N-sized work left behind at small Q


def test_cached_retrieval_cost_follows_q():
    m = model(stream="mixed")
    video, ids, mask = dummy_inputs(m, 2, 7, 4)
    for q in (2, N):
        m.active_latents = q
        want = m.retrieval_flops(2, 7)
        vc, tc = m.prepare_cached(m.cache_videos(video)), m.prepare_cached(m.cache_texts(ids, mask))
        assert count_flops(lambda: m.prepare_cached(m.cache_videos(video)), m) / 4 == \
            pytest.approx(want["video"], rel=0.05)
        assert count_flops(lambda: m.score_prepared(tc, vc), m) / 16 == pytest.approx(want["pair"], rel=0.05)


@pytest.mark.parametrize("field, value, message", [
    ("active_latents", 0, r"active_latents=0: must be None \(all\) or a count in 1..num_latents=8"),
    ("active_latents", 9, "active_latents=9"),
    ("nested_latents", [4, 2], "nested_latents=\\[4, 2\\]: must be ascending without duplicates"),
    ("nested_latents", [2, 2, 8], "ascending without duplicates"),
    ("nested_latents", [2, 16], "every count must be in 1..num_latents=8"),
    ("nested_latents", "2,4", "must be a list of latent counts"),
    ("nested_mode", "each", "nested_mode='each': must be 'sample'"),
    ("nested_distill", -0.5, "nested_distill=-0.5: must be a non-negative weight"),
    ("nested_distill", 1.0, "nested_distill=1.0: distils the nested counts: set nested_latents too"),
])
def test_bad_latent_counts_are_refused_naming_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        model(**{field: value})
    m = model()
    with pytest.raises(ValueError, match=message):
        setattr(m, field, value) if field == "active_latents" else m.config.replace(**{field: value})


CFG = dict(steps=6, groups_per_step=4, groups_per_unit=2, lr=3e-3, warmup_steps=2, checkpoint_every=3, log_every=1,
           seed=1, device=DEVICE)


def test_sampled_nested_training_draws_its_counts_and_resumes_exactly(tmp_path):
    data, nested = tiny_data(), dict(nested_latents=[2, 4, 8])
    full = tiny_model(num_latents=N, device=DEVICE, **nested)
    result = train(full, data, TrainConfig(**CFG), run_dir=tmp_path / "a", progress=False)
    drawn = [h["latents"] for h in result.history]
    assert set(drawn) <= {2.0, 4.0, 8.0} and len(set(drawn)) > 1
    assert full.active_latents is None  # training leaves inference at every latent

    first = tiny_model(num_latents=N, device=DEVICE, **nested)
    train(first, data, TrainConfig(**CFG), run_dir=tmp_path / "b", progress=False, stop_after=3)
    resumed = tiny_model(num_latents=N, seed=5, device=DEVICE, **nested)
    again = train(resumed, data, TrainConfig(**CFG), run_dir=tmp_path / "b", resume=True, progress=False)
    assert [h["latents"] for h in again.history] == drawn  # the log keeps the first 3 steps; the rest drew alike
    assert_same_weights(full, resumed)


def test_all_counts_mode_sums_a_loss_per_count():
    m = tiny_model(num_latents=N, nested_latents=[2, 8], nested_mode="all", device=DEVICE)
    result = train(m, tiny_data(), TrainConfig(**{**CFG, "steps": 2}), progress=False)
    first = result.history[0]
    assert {"vtm@2", "vtm@8", "itc@2", "itc@8"} <= set(first)
    parts = first["vtm@2"] + first["vtm@8"] + first["itc@2"] + first["itc@8"]  # itc_weight 1: the plain sum
    assert first["loss"] == pytest.approx(parts, abs=1e-3)


def test_checkpoints_keep_the_counts_and_load_at_any_q(tmp_path):
    m = tiny_model(num_latents=N, nested_latents=[2, 8], device=DEVICE)
    train(m, tiny_data(), TrainConfig(**{**CFG, "steps": 3}), run_dir=tmp_path, progress=False)
    loaded = load_model(latest_checkpoint(tmp_path))
    assert loaded.config.nested_latents == [2, 8] and loaded.config == m.config.replace(nested_latents=[2, 8])
    other = tiny_model(num_latents=N, nested_latents=[2, 8], active_latents=2)
    load_weights(latest_checkpoint(tmp_path), other)  # the Q that runs is not part of the weights
    assert other.active_latents == 2


def test_cli_trains_nested_and_refuses_a_bad_count(tmp_path, capsys):
    import json

    from slimvl.cli import main
    from slimvl.data import make_dataset

    data = make_dataset(tmp_path / "data", n_train=16, n_val=4, n_test=4, frames=2, size=32, progress=False)
    args = ["-q", "train", "--data", str(data), "--set", "dim=32", "--set", "heads=2", "--set", "image_size=32",
            "--frames", "2", "--steps", "2", "--train-set", "groups_per_step=2", "--train-set", "groups_per_unit=2",
            "--train-set", "warmup_steps=1"]
    main([*args, "--out", str(tmp_path / "run"), "--set", "nested_latents=[4,16]"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 2
    log = json.loads((tmp_path / "run" / "train_log.json").read_text())
    assert {h["latents"] for h in log["history"]} <= {4.0, 16.0}
    with pytest.raises(SystemExit) as e:
        main([*args, "--out", str(tmp_path / "bad"), "--set", "nested_latents=[4,32]"])
    assert e.value.code == 2 and "nested_latents=[4, 32]: every count must be in 1..num_latents=16" in \
        capsys.readouterr().err


class _Squares(torch.nn.Module):
    """An objective: the mean square of the classifier's logits, recording a
    random draw per call (as LayerDrop or sampled negatives would make)."""

    def __init__(self, m):
        super().__init__()
        self.m, self.draws = m, []

    def forward(self, video):
        self.draws.append(float(torch.rand(())))
        return self.m(video).pow(2).mean(), {"sq": 0.0}


def _classifier(**kw):
    torch.manual_seed(0)
    from slimvl import create_model

    kw = {"layers": "cscs", **kw}
    return create_model("perceiver_cls_tiny", dim=32, heads=2, image_size=32, num_latents=N, num_classes=3,
                        multi_label=False, **kw)


def test_self_distillation_pulls_small_counts_towards_all_latents_without_moving_the_teacher():
    from slimvl.models.nested import NestedLatents

    m = _classifier(nested_latents=[2, N], nested_mode="all", nested_distill=0.5)
    video = torch.randn(3, 2, 3, 32, 32)
    objective = _Squares(m)
    loss, parts = NestedLatents(objective, m)(video)
    def decoded(q):
        with torch.no_grad(), m.using_latents(q):
            lat = m.latents(video)
            return m.decoder(m.cls_query.expand(3, 1, -1), lat), m(video)

    (small_cls, small), (full_cls, full) = decoded(2), decoded(None)
    want = torch.nn.functional.mse_loss(small_cls, full_cls).item()
    assert parts["distill@2"] == pytest.approx(want, rel=1e-5) and f"distill@{N}" not in parts
    assert loss.item() == pytest.approx(small.pow(2).mean().item() + 0.5 * want + full.pow(2).mean().item(), rel=1e-5)
    # The teacher pass and each student pass start from the same random state.
    teacher, *students = objective.draws
    assert students == [teacher, teacher]
    # No gradient reaches the teacher: a step at 2 latents with distillation
    # never moves the latents beyond the first two (the full pass read them).
    m.zero_grad()
    m.config = m.config.replace(nested_latents=[2])
    d_loss, d_parts = NestedLatents(_Squares(m), m)(video)
    d_loss.backward()
    assert d_parts["distill@2"] > 0
    assert m.encoder.latents.grad[2:].abs().sum() == 0 and m.encoder.latents.grad[:2].abs().sum() > 0


def test_sampled_distillation_reports_its_term_and_keeps_the_random_stream():
    from slimvl.models.nested import NestedLatents

    video = torch.randn(2, 2, 3, 32, 32)
    plain, distilled = _classifier(nested_latents=[2]), _classifier(nested_latents=[2], nested_distill=1.0)
    torch.manual_seed(3)
    NestedLatents(_Squares(plain), plain)(video)
    after_plain = torch.rand(())
    torch.manual_seed(3)
    loss, parts = NestedLatents(_Squares(distilled), distilled)(video)
    assert parts["latents"] == 2 and parts["distill"] > 0
    assert torch.rand(()) == after_plain  # the teacher pass does not shift later draws


def test_perceiver_vl_trains_with_self_distillation():
    m = tiny_model(num_latents=N, nested_latents=[2, 4], nested_distill=1.0, num_answers=0, device=DEVICE)
    history = train(m, tiny_data(), TrainConfig(**{**CFG, "steps": 3}), progress=False).history
    assert all(h["distill"] > 0 for h in history)  # every count drawn is below N


def test_the_student_skips_the_cross_attentions_its_teacher_skipped_even_with_dropout():
    from slimvl.models.latents import LatentEncoder
    from slimvl.models.nested import NestedLatents

    m = _classifier(layers="cscscs", cross_attn_drop=0.5, dropout=0.1, nested_latents=[2], nested_distill=1.0)
    m.train()
    decisions, original = [], LatentEncoder._skip

    def logged(self, drop, cross):
        decisions.append(original(self, drop, cross))
        return decisions[-1]

    LatentEncoder._skip = logged
    try:
        torch.manual_seed(0)
        for _ in range(6):
            NestedLatents(_Squares(m), m)(torch.randn(2, 2, 3, 32, 32))
    finally:
        LatentEncoder._skip = original
    per_step = [decisions[i:i + 4] for i in range(0, len(decisions), 4)]  # teacher's 2, then the student's 2
    assert len(per_step) == 6 and all(d[:2] == d[2:] for d in per_step)
    assert {tuple(d[:2]) for d in per_step} != {(False, False)}  # some layers were skipped
