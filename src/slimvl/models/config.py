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
    num_answers: int = 0  # > 0: a question-answering head over this many answers (slimvl.tasks.qa)

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
        if isinstance(self.num_answers, bool) or not isinstance(self.num_answers, int) or self.num_answers < 0:
            self._fail("num_answers", "must be a non-negative integer (0: no question-answering head)")

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form, tagged with ``model_type`` (tuples as lists, as
        JSON gives them back, so that a saved config compares equal)."""
        fields = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        return {"model_type": self.model_type, **fields}

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


STREAMS = ("single", "multi", "mixed")


@dataclass
class PerceiverVLConfig(VLConfig):
    """Perceiver-VL: ``num_latents`` latents and a depth pattern.

    ``layers`` is the depth pattern as one string: ``c`` is a cross-attention
    from the latents to the input array, ``s`` a latent self-attention layer.
    The paper's base model (k=3 blocks of l=4) is ``"cssss" * 3``.

    Efficiency options:
        cross_attn_drop: LayerDrop on cross-attention, the probability of
            *skipping* each cross-attention but the first while training:
            drawn once per training step by ``slimvl.train`` (every forward
            pass of the step skips the same ones), once per forward pass
            elsewhere. Never random in eval mode.
        cross_attn_keep: which cross-attentions run (indices among the ``c``
            layers, e.g. ``[0]``), or an int ``n`` for the first ``n``; None
            runs all. The inference-time counterpart of ``cross_attn_drop``.
        active_latents: how many latents run, the first ``Q`` of the array
            (None: all ``num_latents``). Everything after the first
            cross-attention costs O(Q^2) or O(Q); a model trained with
            ``nested_latents`` keeps working at every Q it was trained on.
        nested_latents: nested ("first-Q") training: the latent counts
            trained as working models, ascending, e.g. ``[2, 4, 8, 16]``
            (``[]``: off). ``nested_mode="sample"`` draws one count per step
            from torch's generator (a resumed run draws the same);
            ``"all"`` trains every count each step and sums the losses.
        nested_distill: self-distillation weight (>= 0; 0: off): each
            smaller count's decoded outputs (what the task heads read) are
            also pulled (mean squared error) towards those of all
            ``num_latents`` latents on the same batch, computed without
            gradient (``models.nested``).

    Retrieval streams:
        stream: ``"single"`` encodes video and text jointly and scores a pair
            with the VTM decoder; ``"multi"`` encodes each alone and scores by
            the dot product of pooled, projected latents; ``"mixed"`` encodes
            each alone (cacheable) and the decoder reads both latent arrays.
        share_encoder: video and text use the same latent encoder in the
            multi and mixed streams (False: a second one for text).
        decoder_layers: cross-attention layers of the VTM decoder (0: none,
            for the multi stream only).

    Task heads (besides VTM):
        num_answers: QA as classification, a [CLS]-query decoder over the
            jointly encoded latents and an answer classifier.
        mlm: masked language modelling through decoder queries (one per
            text position: position embedding + masked/unmasked embedding).
    """

    model_type: ClassVar[str] = "perceiver_vl"
    num_latents: int = 16
    layers: str = "csscss"
    cross_attn_drop: float = 0.0
    cross_attn_keep: Any = None
    active_latents: Any = None
    nested_latents: Any = dataclasses.field(default_factory=list)
    nested_mode: str = "sample"
    nested_distill: float = 0.0
    stream: str = "single"
    share_encoder: bool = True
    decoder_layers: int = 1
    mlm: bool = False

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.num_latents, int) or self.num_latents <= 0:
            self._fail("num_latents", "must be a positive integer")
        if not isinstance(self.layers, str) or not self.layers or set(self.layers) - {"c", "s"}:
            self._fail("layers", "must be a non-empty string of 'c' (cross-attention) and 's' (self-attention)")
        if self.layers[0] != "c":
            self._fail("layers", "must start with a cross-attention 'c': the latents need to read the input first")
        if not isinstance(self.cross_attn_drop, (int, float)) or not 0.0 <= self.cross_attn_drop < 1.0:
            self._fail("cross_attn_drop", "must be a probability in [0, 1)")
        self.kept_cross_layers()  # validates cross_attn_keep
        self.latents_run()  # validates active_latents
        n, nested = self.num_latents, self.nested_latents
        if not isinstance(nested, (list, tuple)) or any(isinstance(q, bool) or not isinstance(q, int) for q in nested):
            self._fail("nested_latents", "must be a list of latent counts, e.g. [2, 4, 8, 16] ([] turns it off)")
        self.nested_latents = nested = list(nested)  # one form, whichever a user gave: it is compared and saved
        if nested != sorted(set(nested)):
            self._fail("nested_latents", "must be ascending without duplicates")
        if nested and not 1 <= nested[0] <= nested[-1] <= n:
            self._fail("nested_latents", f"every count must be in 1..num_latents={n}")
        if self.nested_mode not in ("sample", "all"):
            self._fail("nested_mode", "must be 'sample' (one count per step) or 'all' (every count, losses summed)")
        if isinstance(self.nested_distill, bool) or not isinstance(self.nested_distill, (int, float)) \
                or not 0 <= self.nested_distill < float("inf"):
            self._fail("nested_distill", "must be a non-negative weight (0 turns self-distillation off)")
        if self.nested_distill and not nested:
            self._fail("nested_distill", "distils the nested counts: set nested_latents too")
        if self.stream not in STREAMS:
            self._fail("stream", f"must be one of {list(STREAMS)}")
        if not isinstance(self.decoder_layers, int) or self.decoder_layers < 0:
            self._fail("decoder_layers", "must be a non-negative integer")
        if self.decoder_layers == 0 and self.stream != "multi":
            self._fail("decoder_layers", f"stream={self.stream!r} scores pairs with the VTM decoder; it needs "
                                         "decoder_layers >= 1 (only stream='multi' works without a decoder)")
        if not isinstance(self.mlm, bool):
            self._fail("mlm", "must be true or false")
        if not isinstance(self.share_encoder, bool):
            self._fail("share_encoder", "must be true or false")
        if not self.share_encoder and self.stream == "single":
            self._fail("share_encoder", "stream='single' encodes video and text jointly with one encoder; "
                                        "a separate text encoder needs stream='multi' or 'mixed'")

    def kept_cross_layers(self) -> tuple[int, ...]:
        """Indices (among the cross-attentions) of those that run."""
        n, keep = self.num_cross_layers, self.cross_attn_keep
        if keep is None:
            return tuple(range(n))
        if isinstance(keep, bool) or not isinstance(keep, (int, list, tuple)):
            self._fail("cross_attn_keep", "must be None, a count or a list of cross-attention indices")
        if isinstance(keep, int):
            if not 1 <= keep <= n:
                self._fail("cross_attn_keep", f"a count must be in 1..{n} (layers={self.layers!r} has {n} "
                                              "cross-attentions)")
            return tuple(range(keep))
        if not keep or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n for i in keep) \
                or len(set(keep)) != len(keep):
            self._fail("cross_attn_keep", f"must list distinct cross-attention indices in 0..{n - 1} "
                                          f"(layers={self.layers!r} has {n} cross-attentions)")
        return tuple(sorted(keep))

    def latents_run(self) -> int:
        """How many latents run: ``active_latents``, or all of them."""
        q = self.active_latents
        if q is None:
            return self.num_latents
        if isinstance(q, bool) or not isinstance(q, int) or not 1 <= q <= self.num_latents:
            self._fail("active_latents", f"must be None (all) or a count in 1..num_latents={self.num_latents}")
        return q

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
