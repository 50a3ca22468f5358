"""Initialising Perceiver-VL from local checkpoints; nothing is downloaded.

Key map (``ours <- theirs``; ``i`` is the checkpoint's layer, written into
the ``i``-th latent self-attention layer ``s`` of ``config.layers``):

==============================  ===================================  ===========================
slimvl (``encoder.layers[j]``)  Hugging Face ViT (``encoder.layer.i``)  CLIP vision (``encoder.layers.i``)
==============================  ===================================  ===========================
``norm1``                       ``layernorm_before``                 ``layer_norm1``
``attn.to_q``                   ``attention.attention.query``        ``self_attn.q_proj``
``attn.to_kv`` (rows: k; v)     ``attention.attention.key/value``    ``self_attn.k_proj/v_proj``
``attn.proj``                   ``attention.output.dense``           ``self_attn.out_proj``
``norm2``                       ``layernorm_after``                  ``layer_norm2``
``mlp.0`` / ``mlp.3``           ``intermediate.dense`` / ``output.dense``  ``mlp.fc1`` / ``mlp.fc2``
``encoder.norm``                ``layernorm``                        ``post_layernorm``
==============================  ===================================  ===========================

Our keys/values have no bias (see ``slimvl.nn.attention``). That loses
nothing: the key bias adds the same amount to every logit of a query, which
the softmax cancels, and the value bias comes out of the attention unchanged
(the weights sum to 1), so it is folded into the output projection's bias
(``b_o + W_o b_v``). The mapped layers compute exactly what the checkpoint's
layers compute, up to LayerNorm epsilon and activation (CLIP's quick-GELU
becomes GELU; a warning says so).

BERT (``embeddings.*``): ``word_embeddings`` -> ``text_embed.tokens``, the
first ``max_text_len`` rows of ``position_embeddings`` -> ``text_embed.position``,
``token_type_embeddings[0]`` -> the text row of ``modality.table``.

Cross-attentions, latents, the patch embedding and the decoder keep their
random initialisation. Checkpoints are read from safetensors only (a folder
with ``model*.safetensors`` and optionally ``config.json``, or one file).
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor

from ..nn import TEXT

log = logging.getLogger("slimvl")

# Per-layer names: ours -> (ViT suffix, CLIP suffix).
_LAYER_MAP = {
    "norm1": ("layernorm_before", "layer_norm1"),
    "attn.to_q": ("attention.attention.query", "self_attn.q_proj"),
    "attn.proj": ("attention.output.dense", "self_attn.out_proj"),
    "norm2": ("layernorm_after", "layer_norm2"),
    "mlp.0": ("intermediate.dense", "mlp.fc1"),
    "mlp.3": ("output.dense", "mlp.fc2"),
}
_KV = {"vit": ("attention.attention.key", "attention.attention.value"), "clip": ("self_attn.k_proj", "self_attn.v_proj")}
_LAYER_RE = {"vit": re.compile(r"(?:^|\.)encoder\.layer\.(\d+)\.(.+)$"),
             "clip": re.compile(r"(?:^|\.)encoder\.layers\.(\d+)\.(.+)$")}
_FINAL_NORM = {"vit": "layernorm", "clip": "post_layernorm"}


@dataclass
class InitReport:
    """What an initialisation loaded: our parameter names, and checkpoint keys left unused."""

    loaded: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)


def read_pretrained(path: str | Path) -> tuple[dict[str, Tensor], dict]:
    """Tensors and (when present) ``config.json`` of a local checkpoint."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        cfg_path = path / "config.json"
    else:
        files, cfg_path = [path], path.parent / "config.json"
    if not files or any(f.suffix != ".safetensors" or not f.is_file() for f in files):
        raise FileNotFoundError(f"{path}: no safetensors weights found (pickled .bin/.pt checkpoints are never "
                                "loaded; convert them with safetensors first)")
    tensors: dict[str, Tensor] = {}
    for f in files:
        try:
            tensors.update(load_file(str(f)))
        except Exception as e:  # safetensors raises several types for a bad file
            raise ValueError(f"{f}: cannot read safetensors ({e})") from None
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    return tensors, cfg


def _strip(tensors: dict[str, Tensor], suffix: str) -> Tensor | None:
    # Checkpoints of task models prefix the backbone ("vit.", "vision_model.", "bert.").
    hits = [k for k in tensors if k == suffix or k.endswith("." + suffix)]
    return tensors[min(hits, key=len)] if hits else None


def _assign(model: torch.nn.Module, new: dict[str, Tensor], source: str, report: InitReport) -> None:
    own = model.state_dict()
    bad = [f"{k}: expected {tuple(own[k].shape)}, got {tuple(v.shape)}" for k, v in new.items()
           if own[k].shape != v.shape]
    if bad:
        raise ValueError(f"{source}: shapes do not fit the model; offending keys: {bad}")
    with torch.no_grad():
        for k, v in new.items():
            own[k].copy_(v.to(own[k].dtype))
    report.loaded += list(new)
    model.pretrained_names = model.pretrained_names | set(new)


def load_vision_layers(model: torch.nn.Module, path: str | Path) -> InitReport:
    """Initialise Perceiver-VL's latent self-attention layers (and final
    norm) from a Hugging Face ViT or CLIP-vision checkpoint (see the module
    doc for the key map). The checkpoint's first ``S`` layers fill the
    model's ``S`` self-attention layers, in order. A missing key or a shape
    that does not fit fails with the list of offending keys."""
    tensors, cfg = read_pretrained(path)
    kind = "vit" if any(_LAYER_RE["vit"].search(k) for k in tensors) else \
        "clip" if any(_LAYER_RE["clip"].search(k) for k in tensors) else None
    if kind is None:
        raise ValueError(f"{path}: no ViT ('encoder.layer.N.*') or CLIP ('encoder.layers.N.*') layer keys found")
    c = model.config
    if cfg.get("num_attention_heads") not in (None, c.heads):
        raise ValueError(f"{path}: num_attention_heads={cfg['num_attention_heads']} but the model has "
                         f"heads={c.heads}; attention heads split the width differently")
    if cfg.get("hidden_act") not in (None, "gelu"):
        log.warning("%s: activation %r differs from slimvl's GELU; outputs differ until fine-tuned",
                    path, cfg["hidden_act"])
    layer_ids = sorted({int(m.group(1)) for k in tensors if (m := _LAYER_RE[kind].search(k))})
    targets = [j for j, kind_j in enumerate(c.layers) if kind_j == "s"]
    if len(layer_ids) < len(targets):
        raise ValueError(f"{path}: {len(layer_ids)} layers, but the model has {len(targets)} latent "
                         f"self-attention layers (layers={c.layers!r}) to fill")
    col = 0 if kind == "vit" else 1
    prefix = "encoder.layer" if kind == "vit" else "encoder.layers"
    new, missing = {}, []

    def get(name: str) -> Tensor | None:
        t = _strip(tensors, name)
        if t is None:
            missing.append(name)
        return t

    for i, j in zip(layer_ids, targets):
        ours, theirs = f"encoder.layers.{j}", f"{prefix}.{i}"
        for mine, names in _LAYER_MAP.items():
            for part in ("weight", "bias"):
                t = get(f"{theirs}.{names[col]}.{part}")
                if t is not None:
                    new[f"{ours}.{mine}.{part}"] = t
        k_name, v_name = _KV[kind]
        wk, wv = get(f"{theirs}.{k_name}.weight"), get(f"{theirs}.{v_name}.weight")
        bv = get(f"{theirs}.{v_name}.bias")
        if wk is not None and wv is not None:
            new[f"{ours}.attn.to_kv.weight"] = torch.cat([wk, wv], 0)
        if bv is not None and f"{ours}.attn.proj.bias" in new:
            new[f"{ours}.attn.proj.bias"] = new[f"{ours}.attn.proj.bias"] + new[f"{ours}.attn.proj.weight"] @ bv
    for part in ("weight", "bias"):
        t = _strip(tensors, f"{_FINAL_NORM[kind]}.{part}")
        if t is not None:
            new[f"encoder.norm.{part}"] = t
    if missing:
        raise ValueError(f"{path}: keys missing from the checkpoint: {missing}")
    report = InitReport(unused=[f"{prefix}.{i}" for i in layer_ids[len(targets):]])
    _assign(model, new, str(path), report)
    return report


def load_text_embeddings(model: torch.nn.Module, path: str | Path) -> InitReport:
    """Initialise the text embeddings from a BERT checkpoint (see the module doc)."""
    tensors, _ = read_pretrained(path)
    c = model.config
    names = ("embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
             "embeddings.token_type_embeddings.weight")
    found = {n: _strip(tensors, n) for n in names}
    missing = [n for n, t in found.items() if t is None]
    if missing:
        raise ValueError(f"{path}: keys missing from the checkpoint: {missing}")
    pos = found[names[1]]
    if pos.shape[0] < c.max_text_len:
        raise ValueError(f"{path}: embeddings.position_embeddings.weight has {pos.shape[0]} positions, the model "
                         f"needs max_text_len={c.max_text_len}")
    table = model.modality.table.detach().clone()
    if found[names[2]].shape[-1] == table.shape[-1]:
        table[TEXT] = found[names[2]][0]
    new = {"text_embed.tokens.weight": found[names[0]], "text_embed.position": pos[: c.max_text_len],
           "modality.table": table}
    report = InitReport()
    _assign(model, new, str(path), report)
    # Only one row of the modality table came from BERT: it is not frozen with the rest.
    model.pretrained_names.discard("modality.table")
    return report


def resize_latents(latents: Tensor, n: int, mode: str = "interpolate", generator: torch.Generator | None = None
                   ) -> Tensor:
    """A latent array ``[N, D]`` resized to ``[n, D]``: ``"interpolate"``
    (linear along the latent axis, so neighbours stay neighbours, as a ViT's
    position embeddings are resized) or ``"reinit"`` (fresh, as at init)."""
    if latents.dim() != 2:
        raise ValueError(f"latents: expected [N, D], got {tuple(latents.shape)}")
    if mode == "reinit":
        return torch.randn(n, latents.shape[1], generator=generator, dtype=latents.dtype) * 0.02
    if mode != "interpolate":
        raise ValueError(f"latent_resize={mode!r}: must be 'interpolate' or 'reinit'")
    if n == latents.shape[0]:
        return latents.clone()
    x = latents.T[None]  # [1, D, N]
    return F.interpolate(x, size=n, mode="linear", align_corners=True)[0].T.contiguous()


# Config fields that may differ between a checkpoint and the model it initialises.
_FREE_FIELDS = {"num_latents", "cross_attn_drop", "cross_attn_keep", "active_latents", "nested_latents", "nested_mode",
                "nested_distill", "dropout", "num_answers", "mlm"}
# Task heads: a pre-trained model's MLM head is left behind when fine-tuning
# for retrieval, and a new QA head starts from random weights.
_HEADS = ("qa_", "mlm_")


def init_from_checkpoint(model: torch.nn.Module, folder: str | Path, latent_resize: str = "interpolate"
                         ) -> InitReport:
    """Initialise ``model`` from a slimvl checkpoint of the same architecture
    whose ``num_latents`` may differ (fine-tuning with another N): the latent
    arrays are resized by ``latent_resize`` (see ``resize_latents``), every
    other tensor is copied. Task heads may differ too (fine-tuning a
    pre-trained model): the checkpoint's heads the model lacks are left out
    (``InitReport.unused``), the model's heads the checkpoint lacks keep their
    initial weights. Any other config difference (width, depth,
    vocabulary...) fails naming the fields."""
    from ..checkpoint import _load_tensors, check_finite, read_meta

    folder = Path(folder)
    meta = read_meta(folder)
    theirs, ours = meta["config"], model.config.to_dict()
    diff = sorted(k for k in set(theirs) | set(ours) if k not in _FREE_FIELDS and theirs.get(k) != ours.get(k))
    if diff:
        raise ValueError(f"{folder}: checkpoint config differs in {diff} "
                         f"({', '.join(f'{k}: {theirs.get(k)!r} vs {ours.get(k)!r}' for k in diff)})")
    if latent_resize not in ("interpolate", "reinit"):
        raise ValueError(f"latent_resize={latent_resize!r}: must be 'interpolate' or 'reinit'")
    weights = _load_tensors(folder / "model.safetensors")
    check_finite(weights, folder)
    n = model.config.num_latents
    for k in list(weights):
        if k.endswith(("encoder.latents", "encoder.latent_pos")):
            weights[k] = resize_latents(weights[k], n, latent_resize)
    own = model.state_dict()
    head = lambda k: k.startswith(_HEADS)  # noqa: E731
    bad = sorted(k for k in set(own) | set(weights) if (k not in own or k not in weights) and not head(k))
    if bad:
        raise ValueError(f"{folder}: weights do not fit the model; offending keys: {bad[:20]}")
    if theirs.get("num_answers") != ours.get("num_answers"):  # another answer vocabulary: a new classifier
        weights = {k: v for k, v in weights.items() if not k.startswith("qa_")}
    report = InitReport(unused=sorted(k for k in weights if k not in own))
    _assign(model, {k: v for k, v in weights.items() if k in own}, str(folder), report)
    model.pretrained_names = set()  # a whole-model initialisation is not a frozen stage's business
    return report
