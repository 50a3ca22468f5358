"""Model configs as data: dataclasses that validate at construction and
round-trip through plain dicts (JSON/YAML)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass
class VLConfig:
    """Fields shared by every video-language model.

    Shapes: videos are ``[B, T, 3, image_size, image_size]`` with
    ``T <= max_frames``; text is ``[B, L]`` token ids with ``L <= max_text_len``.
    """

    model_type: ClassVar[str] = "vl"
    image_size: int = 64
    patch_size: int = 8
    tubelet: int = 2
    max_frames: int = 8
    vocab_size: int = 1000
    max_text_len: int = 32
    dim: int = 64
    heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    embed_dim: int = 64

    def __post_init__(self) -> None:
        self.validate()

    def _fail(self, field: str, why: str) -> None:
        raise ValueError(f"{type(self).__name__}.{field}={getattr(self, field)!r}: {why}")

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field."""
        for f in ("image_size", "patch_size", "tubelet", "max_frames", "vocab_size", "max_text_len",
                  "dim", "heads", "embed_dim"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) <= 0:
                self._fail(f, "must be a positive integer")
        if self.image_size % self.patch_size:
            self._fail("patch_size", f"must divide image_size={self.image_size}")
        if self.dim % self.heads:
            self._fail("dim", f"must be divisible by heads={self.heads}")
        if self.mlp_ratio <= 0:
            self._fail("mlp_ratio", "must be positive")
        if not 0.0 <= self.dropout < 1.0:
            self._fail("dropout", "must be in [0, 1)")

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form, tagged with ``model_type``."""
        return {"model_type": self.model_type, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VLConfig":
        """Build from a dict; unknown keys are an error that names them."""
        d = {k: v for k, v in d.items() if k != "model_type"}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown config keys {unknown}; known: {sorted(known)}")
        return cls(**d)

    def replace(self, **overrides: Any) -> "VLConfig":
        """A copy with some fields changed (validated again)."""
        return type(self).from_dict({**dataclasses.asdict(self), **overrides})


@dataclass
class PerceiverVLConfig(VLConfig):
    """Perceiver-VL: ``num_latents`` latents and a depth pattern.

    ``layers`` is the depth pattern as one string: ``c`` is a cross-attention
    from the latents to the input array, ``s`` a latent self-attention layer.
    The paper's base model (k=3 blocks of l=4) is ``"cssss" * 3``.
    """

    model_type: ClassVar[str] = "perceiver_vl"
    num_latents: int = 16
    layers: str = "csscss"

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.num_latents, int) or self.num_latents <= 0:
            self._fail("num_latents", "must be a positive integer")
        if not self.layers or set(self.layers) - {"c", "s"}:
            self._fail("layers", "must be a non-empty string of 'c' (cross-attention) and 's' (self-attention)")
        if self.layers[0] != "c":
            self._fail("layers", "must start with a cross-attention 'c': the latents need to read the input first")

    @property
    def num_self_layers(self) -> int:
        return self.layers.count("s")

    @property
    def num_cross_layers(self) -> int:
        return self.layers.count("c")


@dataclass
class SingleStreamConfig(VLConfig):
    """ViLT-style cross-encoder: ``depth`` self-attention layers over
    ``[CLS; video tokens; text tokens]``."""

    model_type: ClassVar[str] = "single_stream"
    depth: int = 4

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.depth, int) or self.depth <= 0:
            self._fail("depth", "must be a positive integer")


CONFIGS: dict[str, type[VLConfig]] = {c.model_type: c for c in (PerceiverVLConfig, SingleStreamConfig)}


def config_from_dict(d: dict[str, Any]) -> VLConfig:
    """Rebuild any model config from its ``to_dict()`` form."""
    mt = d.get("model_type")
    if mt not in CONFIGS:
        raise ValueError(f"unknown model_type {mt!r}; known: {sorted(CONFIGS)}")
    return CONFIGS[mt].from_dict(d)
