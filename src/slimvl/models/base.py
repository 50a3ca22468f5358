"""What all video-language models share: input embedding, boundary checks,
typed outputs, FLOP formulas."""
from __future__ import annotations

import math
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import TEXT, VIDEO, Block, CrossBlock, ModalityEmbed, PatchEmbed, TextEmbed
from ..nn.modalities import MODALITIES, pair_inputs
from .config import VLConfig


@dataclass
class VLOutput:
    """A model's answer for a batch of (video, text) pairs.

    Attributes:
        logits: ``[B]`` vision-text matching logits (higher = better match).
        pooled: ``[B, embed_dim]`` projected pooled representation, or None.
    """

    logits: Tensor
    pooled: Tensor | None = None


def linear_flops(n: int, d_in: int, d_out: int) -> int:
    """FLOPs of ``n`` rows through a ``d_in -> d_out`` matmul (2 per MAC)."""
    return 2 * n * d_in * d_out


def attention_core_flops(n_q: int, n_k: int, dim: int) -> int:
    """FLOPs of ``softmax(QK^T)V`` over all heads: two ``n_q x n_k x dim`` products."""
    return 4 * n_q * n_k * dim


def block_flops(n_q: int, n_k: int, dim: int, mlp_ratio: float, cross: bool) -> int:
    """FLOPs of one pre-norm (self or cross) attention + MLP layer, as torch's
    FLOP counter sees them (matmuls and attention only)."""
    hidden = int(dim * mlp_ratio)
    f = linear_flops(n_q, dim, dim)  # queries
    f += linear_flops(n_k if cross else n_q, dim, 2 * dim)  # keys, values
    f += attention_core_flops(n_q, n_k, dim)
    f += linear_flops(n_q, dim, dim)  # output projection
    f += linear_flops(n_q, dim, hidden) + linear_flops(n_q, hidden, dim)
    return f


def without_autocast(device: torch.device):
    """A context in which ``device``'s autocast (if on) is off: matmuls of
    float32 inputs then stay in float32."""
    on = torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type)
    return torch.autocast(device.type, enabled=False) if on else nullcontext()


def score_in_fp32(head: nn.Module, x: Tensor) -> Tensor:
    """Run a scoring head (``Linear``, ``LayerNorm`` or a ``Sequential`` of
    them) in float32 whatever the autocast or the weights' dtype.

    Scores are what retrieval ranks: in bf16 (8 bits of mantissa) nearby
    scores round to the same value, and a negative that ties with the
    positive is counted against the query; measured on the demo's gallery,
    bf16 left 1,166 distinct values of 9,993. The head is tiny, so fp32 here
    costs nothing.
    """
    with without_autocast(x.device):
        x = x.float()
        for m in (head if isinstance(head, nn.Sequential) else (head,)):
            w = None if m.weight is None else m.weight.float()
            b = None if m.bias is None else m.bias.float()
            if isinstance(m, nn.Linear):
                x = F.linear(x, w, b)
            elif isinstance(m, nn.LayerNorm):
                x = F.layer_norm(x, m.normalized_shape, w, b, m.eps)
            else:
                raise TypeError(f"score_in_fp32: a scoring head is Linear and LayerNorm layers, not {type(m).__name__}")
    return x


class VLModel(nn.Module):
    """Base class: embeds video and text into one input array.

    Subclasses implement ``forward(video, text_ids, text_mask) -> VLOutput``
    and ``analytic_flops(frames, text_len)``.
    """

    config: VLConfig
    # The inputs it reads (slimvl.nn.modalities): an inputs mapping holds their tensors.
    modalities: tuple[str, ...] = ("video", "text")

    def compile_layers(self, mode: str | None = None, backend: str = "inductor", dynamic: bool | None = None):
        """Compile every layer in place (``torch.compile`` of each
        transformer block, cross-attention block, view block and embedding;
        "regional" compilation), and return the model.

        Every entry point then runs compiled code: ``forward``, but also
        ``encode_video``, ``score_cached``, ``answer`` and the rest, which a
        compiled ``forward`` alone would miss; the Python between layers
        (LayerDrop, token merging's bookkeeping) stays eager, and one graph
        serves every layer of a kind, so compiling takes seconds, not
        minutes. Weights and state dict are unchanged. ``mode`` as
        ``torch.compile`` (``"reduce-overhead"``: CUDA graphs per layer).
        """
        from ..nn import SpectrogramEmbed
        from ..nn.fusion import ViewBlock

        kinds = (Block, CrossBlock, ViewBlock, PatchEmbed, SpectrogramEmbed, TextEmbed)
        for m in self.modules():
            if isinstance(m, kinds):
                m.compile(mode=mode, backend=backend, dynamic=dynamic)
        return self

    def __init__(self, config: VLConfig):
        super().__init__()
        self.config = config
        c = config
        self.patch_embed = PatchEmbed(c.image_size, c.patch_size, c.tubelet, c.max_frames, c.dim)
        # A model that reads no text (a video classifier) has no text embedding.
        self.text_embed = TextEmbed(c.vocab_size, c.max_text_len, c.dim) if "text" in self.modalities else None
        self.modality = ModalityEmbed(self.modalities, c.dim)
        # Temperature of contrastive scores between pooled embeddings (CLIP's
        # learnable logit scale, starting at 1/0.07).
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        # Parameters initialised from pretrained weights (slimvl.models.pretrained),
        # which TrainConfig.frozen_pretrained_steps keeps frozen at first.
        self.pretrained_names: set[str] = set()

    # -- boundary -------------------------------------------------------
    def read_inputs(self, video: Tensor | Mapping[str, Tensor], text_ids: Tensor | None = None,
                    text_mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``(video, text_ids, text_mask)`` on the model's device, from an
        inputs mapping (``{"video": ..., "text": ..., "text_mask": ...}``) or
        given positionally (the convenience form)."""
        if isinstance(video, Mapping):
            if tuple(self.modalities) != ("video", "text"):
                raise TypeError(f"read_inputs reads video and text; a model of {self.modalities} reads its own inputs")
            if text_ids is not None or text_mask is not None:
                raise ValueError("give either one inputs mapping or (video, text_ids, text_mask), not both")
            keys = [k for m in self.modalities for k in MODALITIES[m].keys]
            missing = [k for k in keys if k not in video]
            if missing:
                raise ValueError(f"inputs: missing {missing}; a {self.config.model_type} reads {keys} ("
                                 + "; ".join(MODALITIES[m].describe for m in self.modalities) + ")")
            video, text_ids, text_mask = video["video"], video["text"], video["text_mask"]
        elif text_ids is None or text_mask is None:
            raise ValueError("expected model(inputs) with an inputs mapping, or model(video, text_ids, text_mask)")
        return self.to_device(video, text_ids, text_mask)

    def check_inputs(self, video: Tensor, text_ids: Tensor, text_mask: Tensor, check_ids: bool = True) -> None:
        """Raise ``ValueError`` naming the expected shape/dtype of a bad input
        (``check_ids``: also the token ids' range, which costs a device sync)."""
        c = self.config
        exp = f"[B, T<={c.max_frames}, 3, {c.image_size}, {c.image_size}] floating point"
        if video.dim() != 5 or video.shape[2] != 3 or video.shape[3:] != (c.image_size, c.image_size) \
                or not 1 <= video.shape[1] <= c.max_frames:
            raise ValueError(f"video: expected shape {exp}, got {tuple(video.shape)}")
        if not video.is_floating_point():
            raise ValueError(f"video: expected {exp} (normalise uint8 frames first), got dtype {video.dtype}")
        b = video.shape[0]
        if text_ids.dim() != 2 or text_ids.shape[0] != b or text_ids.shape[1] > c.max_text_len:
            raise ValueError(f"text_ids: expected shape [B={b}, L<={c.max_text_len}], got {tuple(text_ids.shape)}")
        if text_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"text_ids: expected an integer tensor, got dtype {text_ids.dtype}")
        if text_mask.shape != text_ids.shape or text_mask.dtype != torch.bool:
            raise ValueError(f"text_mask: expected bool of shape {tuple(text_ids.shape)}, "
                             f"got {text_mask.dtype} {tuple(text_mask.shape)}")
        if check_ids:
            self.check_token_ids(text_ids)
        if video.device != text_ids.device or text_ids.device != text_mask.device:
            raise ValueError(f"inputs on different devices: video {video.device}, text_ids {text_ids.device}, "
                             f"text_mask {text_mask.device}")

    def checks_values(self, t: Tensor) -> bool:
        """Whether to check the values of input ``t`` (not only its shape):
        a check reads a result on the host, which on a GPU waits for the
        device. Skipped while tracing for compilation, for empty or meta
        tensors, and while training on an accelerator: the training loop
        checks its tokenizer against the model before the first step, and a
        wait per step is what keeps a small model from using the GPU."""
        if t.numel() == 0 or t.device.type == "meta" or torch.compiler.is_compiling():
            return False
        return not (self.training and t.device.type != "cpu")

    def check_token_ids(self, text_ids: Tensor) -> None:
        """Raise ``ValueError`` if an id is outside ``0..vocab_size-1`` (text
        tokenised with another tokenizer than the model's): the embedding
        lookup would fail with a bare ``IndexError``, or a device assert."""
        if not self.checks_values(text_ids):
            return
        lo, hi = torch.stack(torch.aminmax(text_ids)).tolist()  # one device sync
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(f"text_ids: token ids must be in 0..{self.config.vocab_size - 1} (the model's "
                             f"vocab_size={self.config.vocab_size}), got ids from {lo} to {hi}; was the text "
                             "tokenised with another tokenizer than the model was trained with?")

    @property
    def device(self) -> torch.device:
        """Where the model's parameters live; inputs given elsewhere are moved here."""
        return self.logit_scale.device

    def to_device(self, *tensors: Tensor | None) -> tuple:
        """``tensors`` moved to the model's device (None stays None), so that
        a caller holding CPU tensors can use a model trained on a GPU."""
        dev = self.device
        return tuple(t if t is None or t.device == dev else t.to(dev) for t in tensors)

    def embed_inputs(self, video: Tensor | None, text_ids: Tensor | None = None,
                     text_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The input array ``[B, M, D]`` (video tokens, then text tokens; either
        part may be None for a unimodal encoding) and its key-padding mask
        ``[B, M]`` (True = real token)."""
        parts, masks = [], []
        if video is not None:
            v = self.modality(self.patch_embed(video), "video")
            parts.append(v)
            masks.append(torch.ones(v.shape[:2], dtype=torch.bool, device=v.device))
        if text_ids is not None:
            parts.append(self.modality(self.text_embed(text_ids), "text"))
            masks.append(text_mask)
        return torch.cat(parts, 1), torch.cat(masks, 1)

    def check_video(self, video: Tensor) -> None:
        """Check a video batch alone (unimodal encoding)."""
        b = video.shape[0] if video.dim() else 1
        ids = torch.zeros(b, 1, dtype=torch.long, device=video.device)
        self.check_inputs(video, ids, ids.bool(), check_ids=False)

    def check_text(self, text_ids: Tensor, text_mask: Tensor) -> None:
        """Check a text batch alone (unimodal encoding)."""
        c = self.config
        if text_ids.dim() != 2 or text_ids.shape[1] > c.max_text_len or text_mask.shape != text_ids.shape \
                or text_mask.dtype != torch.bool or text_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"text_ids/text_mask: expected [B, L<={c.max_text_len}] integer ids and a bool mask "
                             f"of the same shape, got {text_ids.dtype} {tuple(text_ids.shape)} and "
                             f"{text_mask.dtype} {tuple(text_mask.shape)}")
        self.check_token_ids(text_ids)

    def embed_video(self, video: Tensor) -> Tensor:
        """Pooled, projected embedding ``[B, embed_dim]`` of videos alone."""
        (video,) = self.to_device(video)
        self.check_video(video)
        return self.pool_unimodal(*self.embed_inputs(video), modality=VIDEO)

    def embed_text(self, text_ids: Tensor, text_mask: Tensor) -> Tensor:
        """Pooled, projected embedding ``[B, embed_dim]`` of texts alone."""
        text_ids, text_mask = self.to_device(text_ids, text_mask)
        self.check_text(text_ids, text_mask)
        return self.pool_unimodal(*self.embed_inputs(None, text_ids, text_mask), modality=TEXT)

    def pool_unimodal(self, inputs: Tensor, mask: Tensor,
                      modality: int | None = None) -> Tensor:  # pragma: no cover - abstract
        """Encode one modality's input array and return its pooled projection."""
        raise NotImplementedError

    def embed_flops(self, frames: int) -> int:
        """FLOPs of the patch projection for a clip of ``frames`` frames."""
        pe = self.patch_embed
        return linear_flops(pe.num_tokens(frames), pe.proj.in_features, pe.proj.out_features)

    def num_params(self) -> int:
        """Number of parameters."""
        return sum(p.numel() for p in self.parameters())

    # -- what the model can do: objectives, evaluation and the CLI ask here
    # instead of reading config fields or probing attributes.
    @property
    def capabilities(self) -> frozenset[str]:
        """What this model offers besides scoring pairs: ``"answer"`` (QA
        head), ``"mlm"`` (masked language modelling head), ``"cache"``
        (``cache_videos``/``cache_texts``/``score_cached``, which is
        ``score_prepared`` of each side's ``prepare_cached``),
        ``"cross_attn_keep"`` (choosable cross-attentions), ``"pretrained_init"``
        (``slimvl.models.pretrained`` can initialise it)."""
        return frozenset({"answer"} if getattr(self, "qa_head", None) is not None else ())

    @property
    def cacheable(self) -> bool:
        """Whether retrieval can encode items once and cache them (see
        ``PerceiverVL``'s multi and mixed streams); cross-encoders cannot."""
        return "cache" in self.capabilities

    @property
    def has_pair_scorer(self) -> bool:
        """Whether pairs are scored by more than the similarity of their
        unimodal embeddings (False: the contrastive term is the whole loss)."""
        return True

    @property
    def pairs_reuse_encodings(self) -> bool:
        """Whether ``score_pairs`` reuses what ``encode_unimodal`` computed
        (items encoded once per step serve the contrastive term and every pair)."""
        return False

    def encode_unimodal(self, inputs: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, Any]:
        """Embeddings ``[B, E]`` of the items (videos) and of the captions of
        an inputs mapping, each encoded alone, and what ``score_pairs`` may
        reuse of that work (None here)."""
        video, text_ids, text_mask = self.read_inputs(inputs)
        return self.embed_video(video), self.embed_text(text_ids, text_mask), None

    def score_pairs(self, inputs: Mapping[str, Tensor], item_index: Tensor, query_index: Tensor,
                    reuse: Any = None) -> Tensor:
        """Logits ``[P]`` of the pairs (item ``item_index[p]``, caption
        ``query_index[p]``) of an inputs mapping whose row ``i`` holds item
        ``i`` and its own caption (``nn.modalities.pair_inputs``); ``reuse``
        is ``encode_unimodal``'s third result for the same inputs."""
        return self(pair_inputs(inputs, item_index, query_index)).logits

    def training_objective(self, objective: nn.Module) -> nn.Module:
        """The module the training loop optimises, given the task's
        objective: a model that trains in its own way (nested latents)
        wraps it; unchanged here."""
        return objective

    def named_blocks(self, kind: str | None = None) -> list[tuple[str, nn.Module]]:
        """Every transformer layer of the model, as ``(name, layer)`` in the
        order the modules were built: ``Block`` (self-attention, ``kind=
        "self"``) and ``CrossBlock`` (``kind="cross"``); ``kind=None`` gives
        both. What a technique that acts per layer reaches through (token
        merging sets ``Block.between``; per-head masks), without knowing
        where each model keeps its layers."""
        kinds = {"self": (Block,), "cross": (CrossBlock,), None: (Block, CrossBlock)}
        if kind not in kinds:
            raise ValueError(f"kind={kind!r}: expected 'self', 'cross' or None")
        return [(name, m) for name, m in self.named_modules() if isinstance(m, kinds[kind])]

    def prepare_cached(self, cache: Any) -> Any:
        """The per-item part of scoring a cache (for ``"cache"`` models),
        done once per cached video or caption; nothing here."""
        return cache

    def score_prepared(self, texts: Any, videos: Any, max_pairs: int = 8192) -> Tensor:
        """Logits ``[n_texts, n_videos]`` from ``prepare_cached`` of both
        sides: the per-pair work (for ``"cache"`` models)."""
        return self.score_cached(texts, videos, max_pairs)

    def retrieval_flops(self, frames: int, text_len: int) -> dict[str, int]:
        """Retrieval cost split into per-video and per-caption encoding
        (cached) and per-pair scoring; a cross-encoder pays all per pair."""
        return {"video": 0, "text": 0, "pair": self.analytic_flops(frames, text_len)}

    def analytic_flops(self, frames: int, text_len: int) -> int:  # pragma: no cover - abstract
        """FLOPs to score one (video, text) pair, from the architecture's formula."""
        raise NotImplementedError


class DualEncoding:
    """What every dual encoder shares (``DualEncoder``, ``ClipModel``; list
    it before ``VLModel``): each modality encoded alone to a unit-norm
    float32 embedding, a pair's score the cosine of the two, however it is
    asked for (``forward``, the ``"cache"`` protocol, an index search).
    Subclasses give ``embed_video`` / ``embed_text`` and ``retrieval_flops``.
    """

    @property
    def capabilities(self) -> frozenset[str]:
        return frozenset({"cache"})

    @property
    def has_pair_scorer(self) -> bool:
        return False  # a pair's score is its embeddings' similarity: the contrastive term is the loss

    def encode_video(self, video: Tensor) -> Tensor:
        """Unit-norm embeddings ``[B, embed_dim]`` (float32) of videos ``[B, T, 3, H, W]``."""
        return F.normalize(self.embed_video(video).float(), dim=-1)

    def encode_text(self, text_ids: Tensor, text_mask: Tensor) -> Tensor:
        """Unit-norm embeddings ``[B, embed_dim]`` (float32) of captions ``[B, L]``."""
        return F.normalize(self.embed_text(text_ids, text_mask).float(), dim=-1)

    def forward(self, video: Tensor | Mapping[str, Tensor], text_ids: Tensor | None = None,
                text_mask: Tensor | None = None) -> VLOutput:
        """Cosine of each pair's embeddings ``[B]``, and the text embeddings
        ``[B, embed_dim]`` as ``pooled``; the pairs given positionally or as
        one inputs mapping (``video``, ``text``, ``text_mask``)."""
        video, text_ids, text_mask = self.read_inputs(video, text_ids, text_mask)
        self.check_inputs(video, text_ids, text_mask, check_ids=False)  # shapes and batch sizes agree
        v, t = self.encode_video(video), self.encode_text(text_ids, text_mask)
        return VLOutput(logits=(v * t).sum(-1), pooled=t)

    def cache_videos(self, video: Tensor) -> Tensor:
        return self.encode_video(video)

    def cache_texts(self, text_ids: Tensor, text_mask: Tensor) -> Tensor:
        return self.encode_text(text_ids, text_mask)

    def score_cached(self, text_cache: Tensor, video_cache: Tensor, max_pairs: int = 8192) -> Tensor:
        """Cosines ``[n_texts, n_videos]`` of cached unit embeddings, in float32."""
        t, v = self.to_device(text_cache, video_cache)
        with without_autocast(t.device):
            return t.float() @ v.float().T

    def analytic_flops(self, frames: int, text_len: int) -> int:
        return sum(self.retrieval_flops(frames, text_len).values())

