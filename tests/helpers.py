"""Small shared builders for the tests."""
from __future__ import annotations

import os

import torch

from slimvl.models import create_model
from slimvl.tasks import RetrievalData

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
