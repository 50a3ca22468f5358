"""Small shared builders for the tests."""
from __future__ import annotations

import os

import torch

from slimvl.models import create_model
from slimvl.tasks import QAData, RetrievalData

# Where training and evaluation tests run: "cpu" (plain `make test`, CI) or
# "cuda" (`SLIMVL_TEST_DEVICE=cuda make test` on a GPU machine).
DEVICE = os.environ.get("SLIMVL_TEST_DEVICE", "cpu")

TINY = dict(dim=32, heads=2, image_size=32, patch_size=8, vocab_size=50, max_text_len=12, embed_dim=16)


def tiny_model(name: str = "perceiver_vl_tiny", seed: int = 0, device: str = "cpu", **overrides):
    """A very small model, initialised from ``seed`` (on the CPU, then moved to ``device``)."""
    torch.manual_seed(seed)
    return create_model(name, **{**TINY, **overrides}).to(device)


def tiny_data(n_groups: int = 6, group_size: int = 2, frames: int = 2, seed: int = 0) -> RetrievalData:
    """Random videos and captions arranged in groups, two captions per item."""
    g = torch.Generator().manual_seed(seed)
    n = n_groups * group_size
    videos = torch.randint(0, 256, (n, frames, 3, 32, 32), generator=g, dtype=torch.uint8)
    ids = torch.randint(5, 50, (2 * n, 12), generator=g)
    mask = torch.ones(2 * n, 12, dtype=torch.bool)
    mask[:, 9:] = False
    owner = torch.arange(n).repeat_interleave(2)
    groups = [list(range(i, i + group_size)) for i in range(0, n, group_size)]
    return RetrievalData(videos, ids, mask, owner, groups)


def weights(model) -> dict:
    """A model's state as CPU copies."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a, b) -> None:
    """Two models (or state dicts) hold the same weights: bitwise on the CPU;
    on a GPU within float tolerance, since its kernels (atomic adds in
    embedding gradients, reduction orders) are not bitwise reproducible."""
    a = weights(a) if hasattr(a, "state_dict") else a
    b = weights(b) if hasattr(b, "state_dict") else b
    assert a.keys() == b.keys()
    for k in a:
        if DEVICE == "cpu":
            assert torch.equal(a[k].cpu(), b[k].cpu()), f"{k} differs"
        else:
            torch.testing.assert_close(a[k].cpu(), b[k].cpu(), rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


def qa_model(**overrides):
    """A tiny Perceiver-VL answer classifier (4 answers) nested over 2, 4 and 8 latents, in eval mode."""
    torch.manual_seed(0)
    kw = dict(dim=32, heads=2, image_size=32, num_latents=8, layers="cscs", vocab_size=50, max_text_len=12,
              num_answers=4, nested_latents=[2, 4, 8])
    return create_model("perceiver_vl_tiny", **{**kw, **overrides}).eval()


def questions(n: int = 20, seed: int = 2, n_videos: int = 5) -> QAData:
    """``n`` random questions of 9 tokens about ``n_videos`` random 2-frame videos, 4 answers."""
    g = torch.Generator().manual_seed(seed)
    return QAData(torch.randint(0, 256, (n_videos, 2, 3, 32, 32), generator=g, dtype=torch.uint8),
                  torch.randint(5, 50, (n, 9), generator=g), torch.ones(n, 9, dtype=torch.bool),
                  torch.arange(n) % n_videos, torch.arange(n) % 4, ["a", "b", "c", "d"], ["a"] * n, ["colour"] * n)


def check_median_cascade(model, inputs, levels, every):
    """Run a margin cascade whose thresholds are each level's median
    confidence over ``every`` (``level_logits``) and check that it stops
    exactly where they say, with those levels' logits; returns its run."""
    from slimvl.dynamic import Cascade, cascade_exits, confidence, run_policy

    conf = torch.stack([confidence(x, "margin") for x in every])
    thresholds = [float(conf[k].median()) for k in range(len(levels) - 1)]
    out = run_policy(model, inputs, Cascade(levels, thresholds, "margin"))
    want = cascade_exits(conf, thresholds)
    assert torch.equal(out["level"], want) and len(torch.unique(want)) >= 2
    torch.testing.assert_close(out["logits"], every[want, torch.arange(inputs.n)], rtol=1e-5, atol=1e-5)
    return out
