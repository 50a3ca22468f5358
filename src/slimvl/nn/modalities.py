"""Modalities as data: a registry of what each input kind is.

A model's inputs are a mapping from names to tensors (``{"video": ...,
"text": ..., "text_mask": ...}``); a model lists the modalities it reads in
``model.modalities``. Each registered ``Modality`` knows the names of its
tensors, their shapes (``describe``) and how to make random inputs of the
right shapes (``dummy``), which is all that FLOP counting, timing and
compile checks need to run any model, whatever its modalities. A new
modality registers here, or from the code that adds it.
"""
from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch import Tensor


@dataclass(frozen=True)
class Modality:
    """One input kind.

    Attributes:
        name: the modality's name (``"video"``, ``"text"``...).
        keys: the names of its tensors in an inputs mapping.
        describe: the expected shapes, in words, for error messages.
        dummy: ``(config, batch, sizes, generator) -> {key: tensor}`` random
            inputs; ``sizes`` holds lengths such as ``frames`` and ``text_len``.
    """

    name: str
    keys: tuple[str, ...]
    describe: str
    dummy: Callable[[Any, int, dict[str, int], torch.Generator], dict[str, Tensor]]


MODALITIES: dict[str, Modality] = {}


def register_modality(modality: Modality) -> Modality:
    """Add ``modality`` to the registry (a name registered twice is an error)."""
    old = MODALITIES.get(modality.name)
    if old is not None and (old.keys, old.describe) != (modality.keys, modality.describe):
        raise ValueError(f"modality {modality.name!r} is already registered")
    MODALITIES[modality.name] = modality
    return modality


def dummy_batch(modalities: tuple[str, ...], config: Any, batch: int, sizes: dict[str, int],
                device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """Random inputs of every listed modality, drawn in order from one
    generator seeded 0 (the same inputs every call); floating tensors in
    ``dtype``, all on ``device``."""
    unknown = [m for m in modalities if m not in MODALITIES]
    if unknown:
        raise ValueError(f"unknown modalities {unknown}; registered: {sorted(MODALITIES)}")
    g = torch.Generator().manual_seed(0)
    out: dict[str, Tensor] = {}
    for name in modalities:
        for key, t in MODALITIES[name].dummy(config, batch, sizes, g).items():
            out[key] = t.to(device, dtype) if t.is_floating_point() else t.to(device)
    return out


def take(inputs: Mapping[str, Tensor], index: Tensor | slice) -> dict[str, Tensor]:
    """The rows ``index`` of every tensor of an inputs mapping."""
    return {k: t[index] for k, t in inputs.items()}


def pair_inputs(inputs: Mapping[str, Tensor], item_index: Tensor, query_index: Tensor,
                query: str = "text") -> dict[str, Tensor]:
    """The inputs of the pairs ``(item item_index[p], query query_index[p])``
    of a batch whose row ``i`` holds item ``i`` and its own query: the
    ``query`` modality's tensors (a caption: ``text``, ``text_mask``) taken
    at ``query_index``, every other modality's at ``item_index``."""
    keys = MODALITIES[query].keys
    return {k: t[query_index] if k in keys else t[item_index] for k, t in inputs.items()}


def rows_of(inputs: Mapping[str, Tensor]) -> int:
    """The batch size of an inputs mapping (its tensors' first dimension)."""
    sizes = {k: t.shape[0] for k, t in inputs.items()}
    if not sizes or len(set(sizes.values())) != 1:
        raise ValueError(f"inputs: expected tensors with one batch size, got {sizes or 'none'}")
    return next(iter(sizes.values()))


def _video(config, batch: int, sizes: dict[str, int], g: torch.Generator) -> dict[str, Tensor]:
    s = config.image_size
    return {"video": torch.randn(batch, sizes["frames"], 3, s, s, generator=g)}


def _text(config, batch: int, sizes: dict[str, int], g: torch.Generator) -> dict[str, Tensor]:
    n = sizes["text_len"]
    return {"text": torch.randint(0, config.vocab_size, (batch, n), generator=g),
            "text_mask": torch.ones(batch, n, dtype=torch.bool)}


def _audio(config, batch: int, sizes: dict[str, int], g: torch.Generator) -> dict[str, Tensor]:
    # A whole clip by default (what the config's audio_seconds give); a caller may ask for fewer frames.
    frames = sizes.get("audio_frames", config.audio_frames)
    return {"audio": torch.randn(batch, config.n_mels, frames, generator=g)}


register_modality(Modality("video", ("video",), "video: float [B, T, 3, H, W] in [-1, 1] (an image is T=1)", _video))
register_modality(Modality("text", ("text", "text_mask"),
                           "text: token ids [B, L] and text_mask: bool [B, L] (True = real token)", _text))
register_modality(Modality("audio", ("audio",), "audio: float [B, n_mels, F] log-mel spectrogram, normalised with the "
                           "training split's statistics", _audio))
