"""Token merging on Hugging Face ``transformers`` CLIP: ``CLIPModel``,
``CLIPVisionModel`` and ``CLIPVisionModelWithProjection``.

Only the vision tower merges (``r``; ``r_text`` stays 0). In each of its
encoder layers the tokens are merged between the attention and the MLP:

    x = x + Attn(LN1(x))   (our SDPA on the layer's own q/k/v/out weights,
                            log(size) added to every key's logits)
    match on the keys (ToMe: averaged over heads; CrossGET: whole, as
                       layers.METRIC says); merge x (order kept)
    x = x + MLP(LN2(x))    (on fewer tokens)

[CLS] (token 0) is protected: it never merges, and since the merge keeps the
tokens' order it stays at index 0, where the pooler reads it. ToMe matches
bipartitely; CrossGET ranks all pairs and weights each merged group by its
importance, the cosine of a token's key with a guiding query. A pretrained
HF CLIP has no cross tokens to guide it, so here the guide is the [CLS]
query: this is CrossGET's matching and ensemble, training-free.

The patch swaps classes, like ``slimvl.merge.patch``: the top model (for
``model.r`` and ``model.merge_report``), the vision ``CLIPEncoder`` (whose
loop carries token sizes from layer to layer) and its ``CLIPEncoderLayer``s
(whose forward merges). The layers are still called as modules, so the
forward hooks transformers uses for ``output_hidden_states`` and gradient
checkpointing keep working; the hidden states then shrink layer by layer.
``unpatch`` puts every class back and removes every attribute it added.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..nn.masks import size_bias
from .layers import METHODS, TokenState, heads_metric, match
from .patch import MergeSettings, _Merging, is_patched
from .schedule import layer_r

SUPPORTED = "CLIPModel, CLIPVisionModel and CLIPVisionModelWithProjection"


class _HFMerging(_Merging):
    """The top model: settings, ``r`` and the report (``_Merging``)."""

    def merge_towers(self) -> dict[str, int]:
        return {"video": len(_vision_encoder(self).layers)}


class _MergingEncoder:
    """The vision ``CLIPEncoder``'s loop, carrying the merged tokens' state."""

    def forward(self, inputs_embeds: Tensor, attention_mask: Tensor | None = None, **kwargs: Any):
        settings: MergeSettings = self.__dict__["_merge_settings"]
        name = self.__dict__["_merge_name"]
        # The same test transformers' output capture makes: attention maps would come back empty.
        if kwargs.get("output_attentions", getattr(self.config, "output_attentions", False)):
            raise ValueError(f"a patched {name} cannot return attentions (its maps would be over merged tokens); "
                             "call slimvl.merge.unpatch(model) first")
        if attention_mask is not None:
            raise ValueError(f"a patched {name} merges vision tokens, which take no attention_mask")
        asked = layer_r(settings.r, len(self.layers), "r")
        x = inputs_embeds
        b, n = x.shape[:2]
        state = TokenState(protected=(torch.arange(n, device=x.device) == 0).expand(b, n))
        done, tokens = [], []
        for layer, r in zip(self.layers, asked):
            # x positional: the hidden-state hook reads args[0], and reentrant checkpointing needs it there.
            x, state, d = layer(x, None, merge_state=state, merge_r=r, merge_method=settings.method,
                                merge_importance_weight=settings.importance_weight, **kwargs)
            done.append(d)
            tokens.append(x.shape[1])
        settings.record(name, "video", asked, done, tokens)
        settings.last_size = state.size  # how many patches each output token stands for (None: unmerged)
        from transformers.modeling_outputs import BaseModelOutput  # what CLIPEncoder returns

        return BaseModelOutput(last_hidden_state=x)


class _MergingLayer:
    """A ``CLIPEncoderLayer`` that merges ``merge_r`` tokens after its attention.
    Returns ``(tokens, state, merges done)``: the hidden-state hook keeps the first."""

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, *, merge_state: TokenState,
                merge_r: int, merge_method: str, merge_importance_weight: float = 1.0, **kwargs: Any):
        attn, x, state = self.self_attn, hidden_states, merge_state
        h = self.layer_norm1(x)
        b, n, _ = h.shape
        q, k, v = (p(h).view(b, n, -1, attn.head_dim).transpose(1, 2) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        # Proportional attention: a key standing for s patches weighs as much as they did. Before any
        # merge (size None) there is no bias, so r = 0 is the unpatched layer.
        bias = None if state.size is None else size_bias(state.size, q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scale,
                                             dropout_p=attn.dropout if self.training else 0.0)
        x = x + attn.out_proj(out.transpose(1, 2).reshape(b, n, -1))
        merge, importance = (match(merge_method, heads_metric(merge_method, k), heads_metric(merge_method, q), merge_r,
                                   state, merge_importance_weight) if merge_r > 0 else (None, None))
        if merge is not None:
            x, size = merge.tokens(x, state.size, importance)
            state = state.after(merge, size)
        x = x + self.mlp(self.layer_norm2(x))
        return x, state, 0 if merge is None else merge.r


def _clip_classes():
    import transformers

    major = int(transformers.__version__.split(".")[0])
    if major < 5:  # version 4 builds hidden states inside the encoder loop and nests its modules otherwise
        raise ValueError(f"token merging on Hugging Face CLIP needs transformers >= 5 (found "
                         f"{transformers.__version__})")
    from transformers import CLIPModel, CLIPPreTrainedModel, CLIPVisionModel, CLIPVisionModelWithProjection

    return CLIPModel, CLIPPreTrainedModel, CLIPVisionModel, CLIPVisionModelWithProjection


def _vision_encoder(model):
    """The ``CLIPEncoder`` of ``model``'s vision tower, or a ``ValueError``."""
    clip, pretrained, vision, vision_proj = _clip_classes()
    if isinstance(model, vision):
        return model.encoder
    if isinstance(model, (clip, vision_proj)):
        return model.vision_model.encoder
    what = "has no vision tower" if isinstance(model, pretrained) else "is not a CLIP model"
    raise ValueError(f"a {type(model).__name__} {what}: token merging supports the Hugging Face {SUPPORTED} "
                     "(and slimvl's own single_stream, dual_encoder and clip models)")


_SWAPPED: dict[type, type] = {}  # original class -> its merging subclass
_ORIGINAL: dict[type, type] = {}  # and back


def _swap(module, mixin: type) -> None:
    cls = type(module)
    if cls not in _SWAPPED:
        # Same name, qualname and module as the original: transformers keys its output-capture registry on
        # the class's name and writes it into saved configs ("architectures"), both of which must still hold.
        sub = type(cls.__name__, (mixin, cls), {"__module__": cls.__module__, "__qualname__": cls.__qualname__,
                                                "__doc__": cls.__doc__})
        _SWAPPED[cls], _ORIGINAL[sub] = sub, cls
    module.__class__ = _SWAPPED[cls]


def _restore(module) -> None:
    module.__class__ = _ORIGINAL.get(type(module), type(module))


def patch_hf(model, method: str = "tome", r: Any = 16, r_text: Any = 0, importance_weight: float = 1.0):
    """Make a Hugging Face CLIP model merge its vision tokens (see the module
    docstring); returns it, patched in place. ``slimvl.merge.patch`` calls it."""
    if method not in METHODS:
        raise ValueError(f"method={method!r}: expected one of {list(METHODS)}")
    if is_patched(model):
        raise ValueError(f"this {type(model).__name__} is already patched; call slimvl.merge.unpatch(model) first")
    encoder = _vision_encoder(model)
    if "_merge_settings" in vars(encoder):
        raise ValueError(f"the vision model inside this {type(model).__name__} is already patched; unpatch it first")
    settings = MergeSettings(method, 0, 0, importance_weight)
    model.__dict__["_merge"] = settings
    encoder.__dict__["_merge_settings"] = settings
    encoder.__dict__["_merge_name"] = model.config.model_type
    _swap(model, _HFMerging)
    _swap(encoder, _MergingEncoder)
    for layer in encoder.layers:
        _swap(layer, _MergingLayer)
    try:
        model.r, model.r_text = r, r_text  # validated by the properties
    except ValueError:
        unpatch_hf(model)
        raise
    return model


def unpatch_hf(model):
    """Undo ``patch_hf``: every class back and nothing left behind. Returns ``model``."""
    if not is_patched(model):
        raise ValueError(f"this {type(model).__name__} is not patched")
    encoder = _vision_encoder(model)
    for layer in encoder.layers:
        _restore(layer)
    _restore(encoder)
    for key in ("_merge_settings", "_merge_name"):
        encoder.__dict__.pop(key, None)
    _restore(model)
    del model.__dict__["_merge"]
    return model


__all__ = ["patch_hf", "unpatch_hf", "SUPPORTED"]
