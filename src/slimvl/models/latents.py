"""The latent side shared by every Perceiver here: the latent array and
its depth pattern (``LatentEncoder``), and what a model built on it can
choose at inference and how it trains (``LatentOptions``: cross-attentions
kept, latents run, nested training, the probe a learned latent policy
reads)."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from einops import repeat
from torch import Tensor, nn

from ..nn import Block, CrossBlock
from .base import block_flops
from .config import PerceiverVLConfig
from .nested import NestedLatents


@dataclass
class InputArray:
    """An embedded input array and what the cross-attentions have read from it.

    Attributes:
        tokens: ``[B, M, D]``; mask: ``[B, M]`` bool, True for real tokens.
        kv: keys and values ``[B, H, M, d]`` per cross-attention index,
            filled as the encoder runs: they do not depend on the latents, so
            running again at another latent count (a cascade's next level)
            reuses them and pays only for what the latents do.
    """

    tokens: Tensor
    mask: Tensor
    kv: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)

    def rows(self, rows: Tensor) -> "InputArray":
        """The same array for ``rows`` of the batch only (reused keys and values included)."""
        rows = rows.to(self.tokens.device)
        return InputArray(self.tokens[rows], self.mask[rows],
                          {i: (k[rows], v[rows]) for i, (k, v) in self.kv.items()})


class LatentEncoder(nn.Module):
    """The latent array and the depth pattern: input array ``[B, M, D]`` ->
    latents ``[B, N, D]``.

    LayerDrop on cross-attention: while training, each cross-attention but
    the first one that runs (the first of ``keep``) is skipped with
    probability ``cross_attn_drop``. The skipped layer's residual branch
    simply does not run: the latents go on to the next layer unchanged, as
    at inference with ``cross_attn_keep``. The decisions come from torch's
    global generator (so that a resumed run draws the same), in one of three
    ways:

    - ``plan`` set (``draw_plan``; the training loop draws one per step):
      the step's decisions, as Python bools, for every forward pass of the
      step. Nothing is drawn inside the forward, so a compiled forward has
      no graph break and no host synchronisation (one graph per plan).
    - eager, no plan: one draw per cross-attention per forward pass.
    - compiled, no plan: the draw is made on the device and the layer's
      output kept or not by ``torch.where`` (no graph break; the skipped
      layer is computed all the same, so it saves no time).
    """

    def __init__(self, c: PerceiverVLConfig):
        super().__init__()
        self.pattern = c.layers
        self.latents = nn.Parameter(torch.randn(c.num_latents, c.dim) * 0.02)
        self.latent_pos = nn.Parameter(torch.randn(c.num_latents, c.dim) * 0.02)
        self.layers = nn.ModuleList(
            CrossBlock(c.dim, c.heads, mlp_ratio=c.mlp_ratio, dropout=c.dropout) if kind == "c"
            else Block(c.dim, c.heads, c.mlp_ratio, c.dropout)
            for kind in c.layers
        )
        self.norm = nn.LayerNorm(c.dim)
        # LayerDrop's decisions, recorded into or replayed from a list when set
        # (``models.nested``: a self-distillation teacher and its student skip
        # the same cross-attentions; the draw is made either way, so the
        # random stream moves as it would without them).
        self.drop_record: list[bool] | None = None
        self.drop_replay: list[bool] | None = None
        self.plan: tuple[bool, ...] | None = None

    def draw_plan(self, drop: float) -> None:
        """Draw this step's LayerDrop decisions (``plan``: one per
        cross-attention, True = skip) on the CPU: no device work, no sync."""
        n = self.pattern.count("c")
        self.plan = tuple(u < drop for u in torch.rand(n).tolist()) if drop > 0 else None

    def forward(self, inputs: Tensor, mask: Tensor, keep: tuple[int, ...], drop: float = 0.0,
                num: int | None = None, kv: dict | None = None) -> Tensor:
        """``num``: run only the first ``num`` latents (all when None); the
        rest of the array is never touched, so the cost follows ``num``.
        ``kv``: a cache of each cross-attention's keys and values of
        ``inputs`` (``InputArray.kv``), used and filled in place."""
        lat = self.initial(inputs.shape[0], num)
        cross, read = -1, False
        for kind, layer in zip(self.pattern, self.layers):
            if kind == "s":
                lat = layer(lat)
                continue
            cross += 1
            if cross not in keep:
                continue
            # The first cross-attention that runs is never dropped: without
            # it the latents would never read the input at all.
            if self.training and drop and read:
                if self.plan is None and self.drop_replay is None and self.drop_record is None \
                        and torch.compiler.is_compiling():
                    keep_it = torch.rand((), device=lat.device) >= drop
                    lat = torch.where(keep_it, self._cross(layer, cross, lat, inputs, mask, kv), lat)
                    continue
                if self._skip(drop, cross):
                    continue
            lat = self._cross(layer, cross, lat, inputs, mask, kv)
            read = True
        return self.norm(lat)

    def initial(self, batch: int, num: int | None = None) -> Tensor:
        """The first ``num`` latents (all when None) with their positions, per input ``[B, Q, D]``."""
        n = self.latents.shape[0] if num is None else num
        return repeat(self.latents[:n] + self.latent_pos[:n], "n d -> b n d", b=batch)

    def _skip(self, drop: float, cross: int) -> bool:
        if self.plan is not None:
            skip = self.plan[cross]
        else:
            skip = bool(torch.rand(()) < drop)
        if self.drop_replay is not None:
            skip = self.drop_replay.pop(0)
        if self.drop_record is not None:
            self.drop_record.append(skip)
        return skip

    @staticmethod
    def _cross(layer: nn.Module, index: int, lat: Tensor, inputs: Tensor, mask: Tensor, kv: dict | None) -> Tensor:
        if kv is None:
            return layer(lat, inputs, key_padding_mask=mask)
        if index not in kv:
            kv[index] = layer.context_kv(inputs)
        return layer(lat, None, key_padding_mask=mask, kv=kv[index])

    def first_read(self, inputs: Tensor, mask: Tensor, keep: tuple[int, ...], num: int | None = None,
                   kv: dict | None = None) -> Tensor:
        """The mean ``[B, D]`` of the first ``num`` latents right after the
        first cross-attention in ``keep``: what they learn from one look at
        the input, at a fraction of the encoder's cost (what a learned
        latent policy reads to choose how many latents an input needs).
        ``kv`` as in ``forward``: the encoder run afterwards reuses it."""
        lat = self.initial(inputs.shape[0], num)
        layers = [layer for kind, layer in zip(self.pattern, self.layers) if kind == "c"]
        return self._cross(layers[min(keep)], min(keep), lat, inputs, mask, kv).mean(1)


class LatentOptions:
    """What every model built on ``LatentEncoder`` can choose at inference
    and how it trains: which cross-attentions run (LayerDrop's counterpart),
    how many latents run (nested latents), and the training objective that
    nests them. Mixed into ``nn.Module`` models whose ``config`` is a
    ``PerceiverVLConfig``."""

    @property
    def cross_attn_keep(self):
        """Which cross-attentions run (see ``PerceiverVLConfig``); settable:
        ``model.cross_attn_keep = [0]`` (validated, stored in the config)."""
        return self.config.cross_attn_keep

    @cross_attn_keep.setter
    def cross_attn_keep(self, keep) -> None:
        self.config = self.config.replace(cross_attn_keep=list(keep) if isinstance(keep, tuple) else keep)

    @property
    def active_latents(self) -> int | None:
        """How many latents run, the first Q of the array (None: all);
        settable: ``model.active_latents = 4`` (validated, stored in the
        config). Everything the latents feed (self-attention, pooling, the
        decoders) works on those Q."""
        return self.config.active_latents

    @active_latents.setter
    def active_latents(self, q: int | None) -> None:
        self.config = self.config.replace(active_latents=q)

    @contextmanager
    def using_latents(self, q: int | None) -> Iterator[None]:
        """Run the first ``q`` latents inside the block, then restore."""
        before = self.active_latents
        self.active_latents = q
        try:
            yield
        finally:
            self.active_latents = before

    def draw_step(self) -> None:
        """Draw one training step's random choices: the nested latent count
        (``step_latents``, with ``nested_mode="sample"``) and LayerDrop's
        decisions for every latent encoder (``LatentEncoder.plan``). The
        training loop calls it before each step and ``end_step`` after, so
        a step's forward passes draw nothing themselves: they compile to a
        graph without breaks and never wait on a random number."""
        c = self.config
        counts = list(c.nested_latents)
        # Nested training's latent count for the step (``NestedLatents``), drawn first as it always was.
        self.step_latents = counts[int(torch.randint(len(counts), ()))] \
            if self.training and counts and c.nested_mode == "sample" else None
        drop = c.cross_attn_drop if self.training else 0.0
        for m in self.modules():
            if isinstance(m, LatentEncoder):
                m.draw_plan(drop)

    def end_step(self) -> None:
        """Forget the step's draws (later forwards draw their own)."""
        self.step_latents = None
        for m in self.modules():
            if isinstance(m, LatentEncoder):
                m.plan = None

    def distill_modules(self) -> list[nn.Module]:
        """The modules whose outputs self-distillation matches
        (``nested_distill``): what each task head reads (the [CLS]
        decoders' outputs; a model defines them)."""
        raise NotImplementedError

    def training_objective(self, objective: nn.Module) -> nn.Module:
        """With ``nested_latents``, the task's objective trained over the
        nested latent counts (``NestedLatents``); else unchanged."""
        return NestedLatents(objective, self) if self.config.nested_latents else objective

    def probe_inputs(self, inputs: Tensor, mask: Tensor, kv: dict | None = None) -> Tensor:
        """Cheap features ``[B, D]`` of an input array ``[B, M, D]``: the
        active latents after the first cross-attention that runs, averaged
        (``LatentEncoder.first_read``; ``kv``: its cache of keys and values)."""
        c = self.config
        return self.encoder.first_read(inputs, mask, c.kept_cross_layers(), c.latents_run(), kv)

    def encode_array(self, array: InputArray) -> Tensor:
        """Latents ``[B, Q, D]`` of a prepared input array (``prepare``),
        reusing and filling its keys and values."""
        c = self.config
        return self.encoder(array.tokens, array.mask, c.kept_cross_layers(), c.cross_attn_drop, c.latents_run(),
                            array.kv)

    def probe_array(self, array: InputArray) -> Tensor:
        """``probe_inputs`` of a prepared input array, filling its keys and
        values for the encoder run that follows."""
        return self.probe_inputs(array.tokens, array.mask, array.kv)

    def encoder_flops(self, m: int) -> int:
        """FLOPs of the encoder (cross-attentions that run, self-attention
        layers, over the latents that run) over an input array of ``m`` tokens."""
        c, f, cross = self.config, 0, -1
        keep, q = c.kept_cross_layers(), c.latents_run()
        for kind in c.layers:
            if kind == "c":
                cross += 1
                if cross not in keep:
                    continue
            f += block_flops(q, m if kind == "c" else q, c.dim, c.mlp_ratio, cross=kind == "c")
        return f
