"""How many tokens each layer merges: ``r`` as an int, a list or a schedule."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    """``r`` merges per layer on average, tilted by ``inflection`` in [-1, 1]:
    0 is constant, negative merges more in early layers (where tokens are
    many and merging saves the most), positive more in late ones. Layer
    ``i`` of ``L`` merges ``round(r * (1 - inflection * (1 - 2 i / (L - 1))))``
    (at least 0), e.g. ``Schedule(8, -1)`` over 5 layers: 16, 12, 8, 4, 0."""

    r: int
    inflection: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 0:
            raise ValueError(f"Schedule.r={self.r!r}: must be a non-negative integer")
        if not -1.0 <= self.inflection <= 1.0:
            raise ValueError(f"Schedule.inflection={self.inflection!r}: must be in [-1, 1]")

    def per_layer(self, layers: int) -> list[int]:
        if layers == 1:
            return [self.r]
        tilt = [-self.inflection * (1 - 2 * i / (layers - 1)) for i in range(layers)]
        return [max(0, round(self.r * (1 + t))) for t in tilt]


def layer_r(r, layers: int, option: str = "r") -> list[int]:
    """``r`` per layer for ``layers`` layers: an int (every layer), a list
    of ``layers`` ints, or a ``Schedule``. A bad value is a ``ValueError``
    naming ``option``. These are the merges asked for; a layer with too few
    mergeable tokens does fewer (at most half of them)."""
    if isinstance(r, Schedule):
        return r.per_layer(layers)
    if isinstance(r, (list, tuple)):
        if len(r) != layers or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in r):
            raise ValueError(f"{option}={list(r)!r}: a list must hold {layers} non-negative integers, one per layer")
        return list(r)
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise ValueError(f"{option}={r!r}: expected a non-negative integer, a list of {layers} of them, or a "
                         "slimvl.merge.Schedule")
    return [r] * layers


__all__ = ["Schedule", "layer_r"]
