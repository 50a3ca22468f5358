"""A learned latent policy: a small head reads cheap features of an input
and picks the latent count to run it at, before running it.

A cascade may run an input at several counts before it is sure; the
learned policy runs each input once, at the count it chose, after a probe
that costs a fraction of the smallest level (``model.probe``: the fewest
latents after the first cross-attention, averaged). The head is trained
after the backbone, on half of a held-out split, to predict for every
level whether the model is right there (one sigmoid per level: a level can
be right when a smaller one is not, and the other way round); its
thresholds are calibrated on the other half with the cascade's calibration
(``calibrate(..., cumulative=False)``), so that the half that set them is
not the half the head has seen.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .calibrate import calibrate
from .policies import Level, cascade_exits, check_levels, model_levels

MIN_INPUTS = 8  # per half of the calibration split: fewer can neither train a head nor set a threshold


class LevelPredictor(nn.Module):
    """Features ``[B, D]`` -> logits ``[B, L]``: will the model be right at level ``k``?

    Features are standardised per dimension with the training set's mean and
    spread (``mean``, ``std``; set by ``fit_predictor``), not per input: a
    per-input norm would mix a telling feature with all the others.
    """

    def __init__(self, dim: int, n_levels: int, hidden: int = 64):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, n_levels))

    def forward(self, features: Tensor) -> Tensor:
        return self.net((features.float() - self.mean) / self.std)


def fit_predictor(features: Tensor, correct: Tensor, steps: int = 300, lr: float = 1e-2,
                  weight_decay: float = 1e-2, seed: int = 0) -> LevelPredictor:
    """A ``LevelPredictor`` trained full-batch with binary cross-entropy on
    ``features [n, D]`` against ``correct [L, n]`` (bool: right at level k).
    ``seed`` fixes its initial weights without touching torch's global generator."""
    if features.dim() != 2 or correct.dim() != 2 or correct.shape[1] != features.shape[0]:
        raise ValueError(f"features {tuple(features.shape)} and correct {tuple(correct.shape)}: expected "
                         "[n, D] and [L, n]")
    x, y = features.detach().float().cpu(), correct.detach().float().cpu().T
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = LevelPredictor(x.shape[1], y.shape[1])
    head.mean.copy_(x.mean(0))
    head.std.copy_(x.std(0, unbiased=False).clamp_min(1e-6))
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    with torch.enable_grad():
        for _ in range(steps):
            loss = F.binary_cross_entropy_with_logits(head(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return head.eval()


@torch.no_grad()
def probabilities(head: LevelPredictor, features: Tensor) -> Tensor:
    """``head``'s probability of the model being right at each level ``[L, n]`` (CPU)."""
    return torch.sigmoid(head(features.detach().to(head.mean.device))).T.cpu()


@dataclass
class Learned:
    """Run each input at one latent count, chosen by ``head`` from its probe
    features (``model.probe`` at ``levels[0]``): the first level
    ``k`` whose predicted probability of being right is at least
    ``thresholds[k]``, else the last.

    Attributes:
        levels: ascending latent counts, or ``(Q, K)`` pairs (``check_levels``).
        head: a ``LevelPredictor`` with one output per level.
        thresholds: ``len(levels) - 1`` probabilities (above 1: never chosen).
    """

    levels: list[int]
    head: LevelPredictor
    thresholds: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.levels = check_levels(self.levels)
        if len(self.thresholds) != len(self.levels) - 1:
            raise ValueError(f"Learned thresholds={self.thresholds!r}: expected {len(self.levels) - 1} "
                             f"(one per level but the last of {self.levels})")
        outputs = self.head.net[-1].out_features
        if outputs != len(self.levels):
            raise ValueError(f"Learned head: {outputs} outputs for {len(self.levels)} levels {self.levels}")

    @property
    def probe_level(self) -> Level:
        return self.levels[0]

    def probabilities(self, features: Tensor) -> Tensor:
        """Predicted probability of being right at each level ``[L, n]``."""
        return probabilities(self.head, features)

    def choose(self, features: Tensor) -> Tensor:
        """The level index each input runs at ``[n]`` (long, CPU)."""
        return cascade_exits(self.probabilities(features), self.thresholds)


def fit_learned(model: nn.Module, inputs, levels: list[int], tolerance: float | None = None,
                budget: float | None = None, batch_size: int = 256, device=None, seed: int = 0,
                guard: bool = False) -> tuple[Learned, dict]:
    """A ``Learned`` policy for ``model`` from held-out ``inputs``
    (``ClassInputs``, ``QAInputs``): the head trained on one half (drawn
    with ``seed``), the thresholds calibrated on the other to ``tolerance``
    or ``budget`` (GFLOPs per input, the probe included; ``guard`` as in
    ``calibrate``). Returns the
    policy and the calibration report (on the second half)."""
    from .costs import cost_model
    from .run import level_logits, probe_features  # run imports this module

    levels = model_levels(levels, model)
    if inputs.n < 2 * MIN_INPUTS:
        raise ValueError(f"the calibration split has {inputs.n} inputs: a learned policy needs at least "
                         f"{2 * MIN_INPUTS} (half train its head, half set its thresholds)")
    right = torch.stack([inputs.correct(x) for x in level_logits(model, inputs, levels, batch_size, device)])
    features = probe_features(model, inputs, levels[0], batch_size, device)
    order = torch.randperm(inputs.n, generator=torch.Generator().manual_seed(seed))
    fit, held = order[: inputs.n // 2], order[inputs.n // 2:]
    head = fit_predictor(features[fit], right[:, fit], seed=seed)
    costs = cost_model(model, inputs, levels, levels[0])
    thresholds, report = calibrate(probabilities(head, features[held]), right[:, held], costs, tolerance=tolerance,
                                   budget=budget, labels=inputs.labels[held], cumulative=False, guard=guard)
    return Learned(levels, head, thresholds), {**report, "probe_gflops": costs.probe, "head_inputs": len(fit),
                                                "inputs": len(held)}
