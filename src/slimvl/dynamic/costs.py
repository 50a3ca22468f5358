"""What an input costs under a policy when the work that does not depend on
the latents is done once: counted with torch's FLOP counter, in parts.

A level's run splits into the input array (``shared``: the patch and text
embeddings), each cross-attention's keys and values of it (``kv`` per
cross-attention: they read the input array, not the latents), and what the
latents do (``levels[k]``: queries, attention, MLPs, self-attention,
decoder, head). A cascade that goes on to a next level pays only that
level's own work and the keys and values of cross-attentions not read yet;
a learned policy pays its probe and its one level.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..bench.flops import count_flops
from .policies import Level, skipped, using_level


@dataclass
class CostModel:
    """GFLOPs per input, in parts.

    Attributes:
        shared: preparing the input array.
        kv: one cross-attention's keys and values of it.
        levels: each level's own work (keys and values excluded).
        keeps: the cross-attentions each level reads (indices).
        probe: the learned policy's probe, its keys and values excluded
            when it reads the prepared array (``probe_keep``), else all of it.
        probe_keep: the cross-attentions whose keys and values the probe
            shares with the levels (empty when it reads something else).
    """

    shared: float
    kv: float
    levels: list[float]
    keeps: list[tuple[int, ...]]
    probe: float = 0.0
    probe_keep: tuple[int, ...] = ()

    def alone(self, k: int) -> float:
        """One input run at level ``k`` only."""
        return self.shared + self.kv * len(self.keeps[k]) + self.levels[k]

    def paid(self, thresholds: list[float], cumulative: bool = True) -> Tensor:
        """What an input stopping at each level has paid ``[L]`` (float64).

        A cascade (``cumulative``) runs the levels up to it, skipping those
        whose threshold is above 1 (``policies.skipped``): the input array
        once, the keys and values of every cross-attention any of them read
        once, and each level's own work. A learned policy pays its probe and
        the one level it chose."""
        out = []
        if not cumulative:
            for k in range(len(self.levels)):
                read = set(self.keeps[k]) | set(self.probe_keep)
                out.append(self.shared + self.probe + self.kv * len(read) + self.levels[k])
            return torch.tensor(out, dtype=torch.float64)
        read, own = set(), 0.0
        for k, skip in enumerate(skipped(thresholds)):
            if not skip:
                read |= set(self.keeps[k])
                own += self.levels[k]
            out.append(self.shared + self.kv * len(read) + own)
        return torch.tensor(out, dtype=torch.float64)


@torch.inference_mode()
def cost_model(model: nn.Module, inputs, levels: list[Level], probe_level: Level | None = None) -> CostModel:
    """A ``CostModel`` of ``model`` on ``inputs`` (an adapter) at ``levels``
    (and the probe at ``probe_level``), counted on two inputs of the largest
    shape in eval mode (a training model would skip cross-attentions at
    random under LayerDrop)."""
    was_training = model.training
    model.eval()
    try:
        dummy = inputs.dummy(model)
        n = 2  # inputs in ``dummy``

        def per_input(fn) -> float:
            return count_flops(fn, model) / n / 1e9

        shared = per_input(lambda: inputs.prepare(model, dummy))
        array = inputs.prepare(model, dummy)
        cross = [layer for kind, layer in zip(model.encoder.pattern, model.encoder.layers) if kind == "c"]
        kv = per_input(lambda: cross[0].context_kv(array.tokens))
        array.kv.update({i: layer.context_kv(array.tokens) for i, layer in enumerate(cross)})
        own, keeps = [], []
        for level in levels:
            with using_level(model, level):
                own.append(per_input(lambda: inputs.logits_array(model, array)))
                keeps.append(tuple(model.config.kept_cross_layers()))
        probe, probe_keep = 0.0, ()
        if probe_level is not None:
            with using_level(model, probe_level):
                if inputs.probe_shares_array:
                    probe_keep = (min(model.config.kept_cross_layers()),)
                    probe = per_input(lambda: inputs.probe_array(model, array, dummy))
                else:
                    probe = per_input(lambda: inputs.probe_array(model, None, dummy))
        return CostModel(shared, kv, own, keeps, probe, probe_keep)
    finally:
        model.train(was_training)
