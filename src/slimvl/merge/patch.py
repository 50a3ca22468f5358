"""The two-line API: ``patch(model, method="crossget", r=16)``, then
``model.r = 8`` to change it and ``unpatch(model)`` to undo it.

A patch swaps the model's class for a subclass whose layer loop merges
tokens (``merge_layer``); parameters, buffers and the config are untouched,
so a patched model saves, loads and trains like the original, and
``unpatch`` gives back exactly the original object. What each model
merges:

- ``single_stream``: the video tokens; [CLS] and the text are protected,
  and the text's mean query guides CrossGET's importance.
- ``dual_encoder`` (a decomposed single stream): the video tokens of the
  video tower ([CLS] guides); captions are encoded unmerged. Pooling
  weights each token by its size, so that at r = 0 nothing changes and
  merged tokens count for what they stand for.
- ``clip``: the vision tower (``r``) and the text tower (``r_text``,
  default 0). Padding never merges with real tokens; a caption too short
  for a layer's r merges what it can and makes up the rest by merging its
  padding into padding, so every row keeps one length and a caption's
  embedding does not depend on the captions batched with it. Protected: [CLS], the cross tokens, the text's first token
  and its EOT; CrossGET's guide is the cross token (vision; [CLS] without
  cross tokens) and the EOT (text). Order is kept, so the causal mask and
  the EOT lookup still hold.
- Hugging Face ``CLIPModel`` / ``CLIPVisionModel`` (``slimvl.merge.hf_clip``).
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from ..models import DualEncoder, SingleStream
from .layers import METHODS, TokenState, check_importance_weight, merge_layer
from .schedule import Schedule, layer_r


class MergeSettings:
    """What a patched model merges: ``method``, ``r`` (vision) and ``r_text``
    as given (an int, a list or a ``Schedule``), CrossGET's
    ``importance_weight``, and ``report``: per tower, from the last forward
    through it, the merges each layer did (``r``, after clamping) and the
    tokens it left (``tokens``)."""

    def __init__(self, method: str, r: Any, r_text: Any, importance_weight: float = 1.0):
        self.method, self.r, self.r_text = method, r, r_text
        self.importance_weight = check_importance_weight(importance_weight, method)
        self.report: dict[str, dict[str, list[int]]] = {}
        self.n_video: int | None = None
        self.last_size: Tensor | None = None
        self.warned = False

    def record(self, model_name: str, tower: str, asked: list[int], done: list[int], tokens: list[int]) -> None:
        self.report[tower] = {"r": done, "tokens": tokens}
        clamped = [i for i, (a, d) in enumerate(zip(asked, done)) if d < a]
        if clamped and not self.warned:
            self.warned = True
            i = clamped[0]
            warnings.warn(f"{model_name}: layer {i} of the {tower} tower merged {done[i]} tokens, not r={asked[i]} "
                          f"(r is clamped to half a layer's mergeable tokens); model.merge_report has the merges "
                          "every layer did", stacklevel=3)


class _Merging:
    """What every patched model has: ``r``, ``r_text``, ``importance_weight``,
    ``merge_method``, ``merge_report``. Subclasses say which towers they merge."""

    _merge: MergeSettings

    def merge_towers(self) -> dict[str, int]:  # pragma: no cover - abstract
        """Tower name -> its number of layers."""
        raise NotImplementedError

    @property
    def merge_method(self) -> str:
        return self._settings().method

    @property
    def r(self) -> Any:
        """Merges per layer of the vision tower (int, list or ``Schedule``)."""
        return self._settings().r

    @r.setter
    def r(self, value: Any) -> None:
        layer_r(value, self.merge_towers()["video"], "r")
        self._settings().r = value

    @property
    def r_text(self) -> Any:
        """Merges per layer of the text tower (models that merge text)."""
        return self._settings().r_text

    @r_text.setter
    def r_text(self, value: Any) -> None:
        towers = self.merge_towers()
        if "text" not in towers:
            nothing = (isinstance(value, (list, tuple)) and not any(value)) or \
                (isinstance(value, Schedule) and value.r == 0)
            if value != 0 and not nothing:
                raise ValueError(f"r_text={value!r}: a patched {self.config.model_type} merges no text tokens")
            value = 0  # whatever merges nothing, as one value that fits any depth
        else:
            layer_r(value, towers["text"], "r_text")
        self._settings().r_text = value

    @property
    def importance_weight(self) -> float:
        """CrossGET's importance weight (``slimvl.merge.layers.match``): 1 as
        published, 0 for similarity alone."""
        return self._settings().importance_weight

    @importance_weight.setter
    def importance_weight(self, value: float) -> None:
        s = self._settings()
        try:
            s.importance_weight = check_importance_weight(value, s.method)
        except ValueError as e:
            raise ValueError(f"{e} (a patched {self.config.model_type})") from None

    def merge_config(self) -> dict[str, Any]:
        """``patch``'s arguments as JSON data (a checkpoint keeps them, so
        that a model fine-tuned with merging is evaluated with it)."""
        s = self._settings()
        as_data = lambda v: {"r": v.r, "inflection": v.inflection} if isinstance(v, Schedule) else v  # noqa: E731
        return {"method": s.method, "r": as_data(s.r), "r_text": as_data(s.r_text),
                "importance_weight": s.importance_weight}

    def analytic_flops(self, frames: int, text_len: int) -> int:
        """Not given for a patched model: its cost follows the merges each
        layer makes (``merge_report``), which depend on the input; count it
        with ``slimvl.bench.count_flops``."""
        raise NotImplementedError(f"a patched {self.config.model_type} has no analytic FLOP formula (its merges "
                                  "depend on the input): count them with slimvl.bench.count_flops")

    def retrieval_flops(self, frames: int, text_len: int) -> dict[str, int]:
        return self.analytic_flops(frames, text_len)

    @property
    def merge_report(self) -> dict[str, dict[str, list[int]]]:
        """Per tower, the merges each layer did and the tokens left after it,
        from the last forward through that tower."""
        return self._settings().report

    def _settings(self) -> MergeSettings:
        return self._merge

    def _run_merging(self, tower: str, blocks, x: Tensor, state: TokenState, causal: bool = False,
                     before=None) -> tuple[Tensor, TokenState]:
        """The tower's layers with merging; ``before(i, x, state)``, when
        given, runs before layer ``i`` (a cross token's update)."""
        s = self._settings()
        asked = layer_r(s.r if tower == "video" else s.r_text, len(blocks), "r" if tower == "video" else "r_text")
        done, tokens = [], []
        for i, blk in enumerate(blocks):
            if before is not None:
                x = before(i, x, state)
            x, state, d = merge_layer(blk, x, state, asked[i], s.method, causal, s.importance_weight)
            done.append(d)
            tokens.append(x.shape[1])
        s.record(self.config.model_type, tower, asked, done, tokens)
        return x, state


class _SingleStreamMerging(_Merging):
    def merge_towers(self) -> dict[str, int]:
        return {"video": len(self.blocks)}

    def embed_inputs(self, video, text_ids=None, text_mask=None):
        x, mask = super().embed_inputs(video, text_ids, text_mask)
        self._merge.n_video = 0 if video is None else self.patch_embed.num_tokens(video.shape[1])
        return x, mask

    def run_blocks(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        b, m = x.shape[:2]
        x = torch.cat([self.cls.expand(b, 1, -1), x], 1)
        mask = torch.cat([mask.new_ones(b, 1), mask], 1)
        # The video tokens come first (embed_inputs); called without it, every token but [CLS] may merge.
        n_video, self._merge.n_video = self._merge.n_video, None
        n_video = m if n_video is None else n_video
        pos = torch.arange(1 + m, device=x.device)[None]
        text = (pos > n_video) & mask
        guide = text if n_video < m else (pos == 0).expand(b, -1)
        state = TokenState(protected=((pos == 0) | (pos > n_video)).expand(b, -1), mask=mask, guide=guide)
        # A caption encoded alone (a dual encoder's text tower) is reported apart and never merged.
        x, state = self._run_merging("video" if n_video else "text", self.blocks, x, state)
        self._merge.last_size = state.size
        return x, state.mask


class _DualMerging(_Merging):
    """The dual encoder's settings are its backbone's."""

    def merge_towers(self) -> dict[str, int]:
        return self.backbone.merge_towers()

    def _settings(self) -> MergeSettings:
        return self.backbone._merge

    def embed_inputs(self, video, text_ids=None, text_mask=None):
        x, mask = super().embed_inputs(video, text_ids, text_mask)
        self.backbone._merge.n_video = 0 if video is None else self.patch_embed.num_tokens(video.shape[1])
        return x, mask

    def pool_weights(self, valid: Tensor) -> Tensor:
        size = self.backbone._merge.last_size
        # A merged token stands for `size` tokens of the unmerged mean.
        return valid.float() if size is None else valid.float() * size


class _ClipMerging(_Merging):
    def merge_towers(self) -> dict[str, int]:
        return {"video": len(self.vision_blocks), "text": len(self.text_blocks)}

    def run_tower(self, tower: str, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        blocks, offsets = self.tower_layers(tower)
        b, n = x.shape[:2]
        cross = offsets is not None
        pos = torch.arange(n, device=x.device)[None]
        last = (pos == n - 1) if cross else torch.zeros_like(pos, dtype=torch.bool)
        if tower == "video":
            protected = (pos == 0) | last
            guide = last if cross else pos == 0
        else:
            eot = (mask.sum(1) - 1 - int(cross))[:, None]
            protected = (pos == 0) | (pos == eot) | last
            guide = pos == eot
        # The unpatched tower's key mask: padding (text), none (video: SDPA's fused kernels) or the hidden cross
        # token. A key nobody reads counts as padding for the matching: it is protected anyway.
        state = TokenState(protected=protected.expand(b, -1), mask=self.key_mask(tower, mask),
                           guide=guide.expand(b, -1))
        states: list[Tensor] = []
        record = cross and self.cross_record is not None

        def before(i: int, x: Tensor, now: TokenState) -> Tensor:
            if not cross:
                return x
            # The text's cross token is seeded from the EOT, which merging may have moved.
            x, token = self.cross_step(x, offsets[i], self.cross_source(tower, mask if now.mask is None else now.mask))
            if record:
                states.append(token)
            return x

        x, state = self._run_merging(tower, blocks, x, state, causal=tower == "text", before=before)
        if record:
            self.cross_record.setdefault(tower, torch.stack(states, 1))
        return x, state.mask if tower == "text" else mask.new_ones(x.shape[:2])


_MIXINS: dict[str, type] = {"single_stream": _SingleStreamMerging, "dual_encoder": _DualMerging,
                            "clip": _ClipMerging}
_CLASSES: dict[type, type] = {}


def _merging_class(cls: type, mixin: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Merging{cls.__name__}", (mixin, cls), {"__module__": cls.__module__,
                                                                      "__doc__": cls.__doc__})
    return _CLASSES[cls]


def _is_hf(model) -> bool:
    return type(model).__module__.startswith("transformers.")


def is_patched(model) -> bool:
    """Whether ``patch`` has been applied to ``model``."""
    return "_merge" in vars(model)


def patch(model, method: str = "tome", r: Any = 16, r_text: Any = 0, importance_weight: float = 1.0):
    """Make ``model`` merge tokens; returns it (patched in place).

    Args:
        model: a slimvl ``single_stream``, ``dual_encoder`` (of a single
            stream) or ``clip`` model, or a Hugging Face ``CLIPModel`` /
            ``CLIPVisionModel``.
        method: ``"tome"`` (bipartite matching, training-free) or
            ``"crossget"`` (complete-graph matching guided by a cross
            token, CLS, EOT or text; best after brief fine-tuning).
        r: merges per layer of the vision tower: an int, a list (one per
            layer) or a ``Schedule`` (or its fields as a dict); change it
            later with ``model.r = 8``.
        r_text: the same for the text tower (``clip`` models only).
        importance_weight: CrossGET only: how much a token's importance
            counts against its best similarity when choosing what merges,
            and in the merged mean (``slimvl.merge.layers.match``), in [0,
            50]. 1 is the paper's; any other value is our extension (0:
            similarity alone). Change it later with
            ``model.importance_weight = 0.5``.

    Each layer merges at most half its mergeable tokens; what every layer
    did is in ``model.merge_report`` after a forward. With ``r = 0`` the
    outputs equal the unpatched model's.
    """
    name = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
    r, r_text = (Schedule(**v) if isinstance(v, dict) else v for v in (r, r_text))
    if method not in METHODS:
        raise ValueError(f"method={method!r}: expected one of {list(METHODS)} (patching {name})")
    try:
        importance_weight = check_importance_weight(importance_weight, method)
    except ValueError as e:
        raise ValueError(f"{e} (patching {name})") from None
    if is_patched(model):
        raise ValueError(f"this {name} is already patched (method={model.merge_method!r}); call "
                         "slimvl.merge.unpatch(model) first, or change model.r")
    if _is_hf(model):
        from .hf_clip import patch_hf

        return patch_hf(model, method, r, r_text, importance_weight)
    if name == "dual_encoder" and isinstance(model, DualEncoder):
        if is_patched(model.backbone):
            raise ValueError("this dual_encoder's backbone is patched on its own; slimvl.merge.unpatch("
                             "model.backbone) first, then patch the dual encoder")
        if not isinstance(model.backbone, SingleStream):
            raise ValueError(f"a dual_encoder of a {model.config.backbone['model_type']} has no layers token "
                             "merging supports (its encoder runs latents); decompose a single_stream model")
        patch(model.backbone, method, r, r_text, importance_weight)
    elif name not in _MIXINS:
        raise ValueError(f"a {name} has no layers token merging supports; supported: {sorted(_MIXINS)} and "
                         "Hugging Face CLIPModel / CLIPVisionModel")
    settings = model.backbone._merge if name == "dual_encoder" else MergeSettings(method, 0, 0, importance_weight)
    model.__dict__["_merge"] = settings
    model.__class__ = _merging_class(type(model), _MIXINS[name])
    try:
        model.r, model.r_text = r, r_text  # validated by the properties
    except ValueError as e:
        unpatch(model)
        raise ValueError(f"{e} (patching {name})") from None
    return model


def unpatch(model):
    """Undo ``patch``: the model's own class and nothing left behind. Returns it."""
    if _is_hf(model):
        from .hf_clip import unpatch_hf

        return unpatch_hf(model)
    if not is_patched(model):
        raise ValueError(f"this {type(model).__name__} is not patched")
    model.__class__ = type(model).__bases__[1]  # Merging<X>(mixin, X)
    del model.__dict__["_merge"]
    if isinstance(model, DualEncoder) and is_patched(model.backbone):
        unpatch(model.backbone)
    return model


__all__ = ["patch", "unpatch", "is_patched", "MergeSettings"]
