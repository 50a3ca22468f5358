"""Bi-modal hard negatives for contrastive training (VLDeformer's, adapted
to our world).

A negative *caption* is a positive caption with content words swapped for
others of their kind: a colour for another colour, a shape word for another
shape's, a size for the other size, a motion word for another motion's (the
reference code replaces 30% of a caption's nouns by random object labels).
The caption then describes a scene one attribute away from the video: the
near-duplicate a dual encoder must learn to tell apart.

A negative *video* is composed from the positive and another sample: one
spatial half of every frame from each (the objects of both scenes, mixed),
or the first half of the frames from one and the rest from the other (the
reference code takes half of the image regions from another image).

Both are pure functions of a numpy generator, which ``step_batch`` seeds
from ``(seed, step)``: a resumed or data-parallel run draws the same ones.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from ...runtime import host_to

if TYPE_CHECKING:
    from ...data.tokenizer import Tokenizer

HARD_NEGATIVES = ("none", "captions", "videos", "both")
COMPOSE_MODES = ("space", "time")


def swap_vocabulary() -> dict[str, dict[str, tuple[str, ...]]]:
    """The swappable words by kind and value: ``{"colour": {"red": ("red",)},
    "shape": {"circle": ("circle", "disc")}, ...}``. A phrase's last word
    carries its meaning ("drifts to the *left*", "plus *sign*")."""
    from ...data.world import COLOURS, MOTION_WORDS, SHAPE_WORDS, SIZE_WORDS  # the world's words (tasks sit below data)

    last = lambda phrases: tuple(dict.fromkeys(p.split()[-1] for p in phrases))  # noqa: E731
    return {"colour": {c: (c,) for c in COLOURS},
            "size": {v: last(w) for v, w in SIZE_WORDS.items()},
            "shape": {v: last(w) for v, w in SHAPE_WORDS.items()},
            "motion": {v: last(w) for v, w in MOTION_WORDS.items()}}


@dataclass
class SwapTable:
    """For each token id that is a swappable word, the ids it may become
    (the words of the other values of its kind).

    ``alternatives[i]`` is empty for ids that are not swappable (words the
    tokenizer splits into several pieces are left out: a swap replaces one
    id by one id, so the caption keeps its length and mask)."""

    alternatives: list[np.ndarray]

    @classmethod
    def from_tokenizer(cls, tokenizer: "Tokenizer") -> "SwapTable":
        ids: dict[str, dict[str, list[int]]] = {}
        for kind, values in swap_vocabulary().items():
            for value, words in values.items():
                for w in words:
                    pieces = tokenizer.hf.encode(w, add_special_tokens=False).ids
                    if len(pieces) == 1 and pieces[0] != tokenizer.unk_id:
                        ids.setdefault(kind, {}).setdefault(value, []).append(pieces[0])
        alternatives = [np.empty(0, dtype=np.int64) for _ in range(tokenizer.vocab_size)]
        for values in ids.values():
            for value, own in values.items():
                others = np.array(sorted({i for v, got in values.items() if v != value for i in got}), dtype=np.int64)
                for i in own:
                    if not set(own) & set(others.tolist()):  # a word shared by two values is ambiguous: skip it
                        alternatives[i] = others
        return cls(alternatives)

    @property
    def size(self) -> int:
        """How many token ids can be swapped."""
        return sum(len(a) > 0 for a in self.alternatives)

    def swap(self, ids: Tensor, mask: Tensor, rng: np.random.Generator | list[np.random.Generator],
             fraction: float = 0.3) -> tuple[Tensor, Tensor]:
        """Negative captions: ``(ids' [B, L], swapped [B] bool)``.

        In each caption, ``max(1, round(fraction * n))`` of its ``n``
        swappable words are replaced; a caption with none stays as it is and
        ``swapped`` is False there (the loss must not count it as a negative).
        ``rng``: one generator, or one per caption (then a caption's swap
        does not depend on which others share its batch).
        """
        out = ids.clone()
        swapped = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        arr, valid = ids.cpu().numpy(), mask.cpu().numpy()
        rngs = rng if isinstance(rng, (list, tuple)) else [rng] * arr.shape[0]
        if len(rngs) != arr.shape[0]:
            raise ValueError(f"swap: {len(rngs)} generators for {arr.shape[0]} captions")
        for b, rng in enumerate(rngs):
            pos = [j for j in np.flatnonzero(valid[b]) if arr[b, j] < len(self.alternatives)
                   and len(self.alternatives[arr[b, j]])]
            if not pos:
                continue
            n = max(1, int(round(fraction * len(pos))))
            for j in rng.choice(pos, size=n, replace=False):
                alt = self.alternatives[arr[b, j]]
                out[b, j] = int(alt[rng.integers(len(alt))])
            swapped[b] = True
        return out, swapped


_TABLES: dict[str, SwapTable] = {}


def swap_table(tokenizer: "Tokenizer") -> SwapTable:
    """``SwapTable.from_tokenizer``, built once per tokenizer (by fingerprint)."""
    key = tokenizer.fingerprint
    if key not in _TABLES:
        _TABLES[key] = SwapTable.from_tokenizer(tokenizer)
    return _TABLES[key]


def partners(rng: np.random.Generator, units: int, groups: int, group_size: int) -> np.ndarray:
    """For each item of each unit, another item of the same unit from
    another group: ``[U, G * k]`` positions within the unit (another group,
    so that the composed video is not a near-duplicate's)."""
    if groups < 2:
        raise ValueError("composed negative videos mix two scenes of a unit: they need groups_per_unit >= 2")
    p = groups * group_size
    g = np.arange(p) // group_size
    other = (g[None, :] + rng.integers(1, groups, size=(units, p))) % groups
    return other * group_size + rng.integers(group_size, size=(units, p))


def compose_videos(videos: Tensor, others: Tensor, right: Tensor, mode: str = "space") -> Tensor:
    """Negative videos ``[B, T, C, H, W]`` (any dtype): each positive
    ``videos[b]`` with half of it replaced by ``others[b]`` (same shape).

    ``mode="space"``: the right half of every frame where ``right[b]`` (bool
    ``[B]``) is True, else the left half; ``"time"``: the later half of the
    frames (clips of one frame, images, have no later half: an error).
    """
    if mode not in COMPOSE_MODES:
        raise ValueError(f"compose mode {mode!r}: expected one of {list(COMPOSE_MODES)}")
    if videos.dim() != 5 or others.shape != videos.shape:
        raise ValueError(f"videos and others: expected two [B, T, C, H, W] of one shape, got {tuple(videos.shape)} "
                         f"and {tuple(others.shape)}")
    if mode == "time":
        if videos.shape[1] < 2:
            raise ValueError(f"compose mode 'time' mixes the frames of two clips; these have {videos.shape[1]} "
                             "frame(s): use compose='space'")
        half = videos.shape[1] // 2
        return torch.cat([videos[:, :half], others[:, half:]], 1)
    # A select, not boolean indexing: on a GPU that would wait for the host to count the rows.
    cols = torch.arange(videos.shape[-1], device=videos.device)
    w = videos.shape[-1] // 2
    take = torch.where(host_to(right, videos.device)[:, None], cols >= w, cols < w)  # [B, W]
    return torch.where(take[:, None, None, None, :], others, videos)
