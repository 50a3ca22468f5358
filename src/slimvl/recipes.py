"""The demo's recipe in one place: its data, input sizes, models and
training schedule. ``slimvl demo``, the benchmarks and the shipped
``configs/*.yaml`` (a test keeps them equal) all read it from here."""
from __future__ import annotations

from .train import TrainConfig

DATA = dict(kind="video-text", seed=0, n_train=4000, n_val=200, n_test=100, group_size=4, frames=8, size=64)
FRAMES, TEXT_LEN = 4, 36
MODELS = ("perceiver_vl_tiny", "single_stream_tiny")
# 850 steps of one unit of 8 groups (VTM on 4 of them, the contrastive term
# on all 8): what fits both models in the demo's budget, 15 minutes on 2 CPU
# cores with the install (the single-stream baseline takes ~3/4 of the
# time). ``slimvl demo --steps 2500`` runs a 3x longer schedule, which
# takes Perceiver-VL to t2v R@1 0.5 with some seeds (BENCHMARKS.md).
TRAIN = TrainConfig(steps=850, groups_per_step=8, groups_per_unit=8, vtm_groups_per_unit=4, negatives="random",
                    negatives_per_item=1, lr=1e-3, warmup_steps=50, checkpoint_every=300, itc_weight=1.0)
