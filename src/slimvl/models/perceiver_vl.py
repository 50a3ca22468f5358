"""Perceiver-VL (Tang et al., WACV 2023): a small latent array reads a long
video+text input array through cross-attention, then thinks in latent
self-attention; cost is linear in the input length."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from einops import repeat
from torch import Tensor, nn

from ..nn import TEXT, VIDEO, AnswerHead, CrossBlock, ModalityEmbed, QueryDecoder
from .base import VLModel, VLOutput, block_flops, linear_flops, score_in_fp32, without_autocast
from .config import PerceiverVLConfig
from .latents import InputArray, LatentEncoder, LatentOptions
from .registry import register_model
from .streams import cached_decoder_scores, decoder_kv


# The "tiny" preset matches single_stream_tiny (width, heads, number of
# self-attention layers) so that demo comparisons are fair; "base" is the
# paper's shape (N=128, D=768, k=3 blocks of l=4 self-attention layers).
@register_model(PerceiverVLConfig, presets={
    "perceiver_vl_tiny": dict(dim=64, heads=4, num_latents=16, layers="csscss"),
    "perceiver_vl_small": dict(dim=256, heads=4, num_latents=64, layers="cssss" * 2),
    "perceiver_vl_base": dict(image_size=224, patch_size=32, tubelet=1, max_frames=16, vocab_size=30522,
                              max_text_len=40, dim=768, heads=12, num_latents=128, layers="cssss" * 3, embed_dim=256),
})
class PerceiverVL(LatentOptions, VLModel):
    """Perceiver-VL for retrieval, in the single, multi or mixed stream.

    Encoder: the depth pattern ``config.layers`` (``c`` = latents cross-attend
    to the input array, ``s`` = latent self-attention). Decoder: one [CLS]
    query cross-attends to latents (``decoder_layers`` times) and feeds the
    VTM head. The pooled latents, projected, are the contrastive embedding.

    ``stream="single"`` encodes ``[video; text]`` jointly, so every pair costs
    a whole encoding. ``"multi"`` and ``"mixed"`` encode video and text
    separately: those encodings are computed once per item and cached
    (``cache_videos`` / ``cache_texts``), and ``score_cached`` scores every
    pair from the caches, by dot product (multi) or by the decoder reading
    both latent arrays (mixed).
    """

    config: PerceiverVLConfig

    def __init__(self, config: PerceiverVLConfig):
        super().__init__(config)
        c = config
        self.encoder = LatentEncoder(c)
        self.text_encoder = None if c.share_encoder else LatentEncoder(c)
        self.vtm_query = nn.Parameter(torch.randn(1, c.dim) * 0.02)
        self.decoder = nn.ModuleList(CrossBlock(c.dim, c.heads, mlp_ratio=c.mlp_ratio, dropout=c.dropout)
                                     for _ in range(c.decoder_layers))
        self.vtm_head = nn.Sequential(nn.LayerNorm(c.dim), nn.Linear(c.dim, 1)) if c.decoder_layers else None
        # In the mixed stream the decoder reads video and text latents side by
        # side; a tag per stream tells it which is which.
        self.stream_tag = ModalityEmbed(2, c.dim) if c.stream == "mixed" else None
        self.proj = nn.Linear(c.dim, c.embed_dim)
        # Task heads are created last and only when asked for, so that a
        # retrieval model draws the same initial weights with or without them.
        if c.num_answers:
            self.qa_query = nn.Parameter(torch.randn(1, c.dim) * 0.02)
            self.qa_decoder = QueryDecoder(c.dim, c.heads, c.mlp_ratio, max(1, c.decoder_layers), c.dropout)
            self.qa_head = AnswerHead(c.dim, c.num_answers)
        if c.mlm:
            # The MLM decoder's queries carry no token content: a position
            # embedding plus whether that position is masked. Everything the
            # decoder knows about the words must come through the latents.
            self.mlm_pos = nn.Parameter(torch.randn(c.max_text_len, c.dim) * 0.02)
            self.mlm_state = nn.Parameter(torch.randn(2, c.dim) * 0.02)  # [unmasked, masked]
            self.mlm_decoder = QueryDecoder(c.dim, c.heads, c.mlp_ratio, 1, c.dropout)
            self.mlm_head = nn.Linear(c.dim, c.vocab_size)

    @property
    def capabilities(self) -> frozenset[str]:
        caps = set(super().capabilities) | {"cross_attn_keep", "active_latents", "pretrained_init"}
        caps |= {"mlm"} if self.config.mlm else set()
        caps |= {"cache"} if self.config.stream != "single" else set()  # multi and mixed streams
        return frozenset(caps)

    @property
    def has_pair_scorer(self) -> bool:
        return self.config.stream != "multi"  # multi: the pair score is the embeddings' similarity

    @property
    def pairs_reuse_encodings(self) -> bool:
        return self.config.stream == "mixed"

    def encode_unimodal(self, inputs: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, Any]:
        """The mixed stream keeps the latents: the decoder scores every pair from them."""
        if self.config.stream != "mixed":
            return super().encode_unimodal(inputs)
        video, text_ids, text_mask = self.read_inputs(inputs)
        v_lat, t_lat = self.video_latents(video), self.text_latents(text_ids, text_mask)
        return self.pool(v_lat), self.pool(t_lat), (v_lat, t_lat)

    def score_pairs(self, inputs: Mapping[str, Tensor], item_index: Tensor, query_index: Tensor,
                    reuse: Any = None) -> Tensor:
        if reuse is None:
            return super().score_pairs(inputs, item_index, query_index)
        v_lat, t_lat = reuse
        return self.score_latents(v_lat[item_index], t_lat[query_index])

    def distill_modules(self) -> list[nn.Module]:
        """The VTM decoder's last layer, the QA and MLM decoders and the
        contrastive projection, those the model has (the scoring heads run
        through ``score_in_fp32``, outside module calls: what they read is
        matched instead)."""
        mods = [self.decoder[-1]] if len(self.decoder) else []
        mods += [getattr(self, name) for name in ("qa_decoder", "mlm_decoder") if hasattr(self, name)]
        return mods + [self.proj]

    # -- encoding ---------------------------------------------------------
    def encode(self, inputs: Tensor, mask: Tensor, modality: int | None = None) -> Tensor:
        """Run the encoder: input array ``[B, M, D]`` -> latents ``[B, Q, D]``
        (``Q = active_latents``, else all ``N``). ``modality=TEXT`` picks the
        text encoder when it is separate."""
        enc = self.text_encoder if modality == TEXT and self.text_encoder is not None else self.encoder
        c = self.config
        return enc(inputs, mask, c.kept_cross_layers(), c.cross_attn_drop, c.latents_run())

    def video_latents(self, video: Tensor) -> Tensor:
        """Latents ``[B, N, D]`` of videos encoded alone."""
        (video,) = self.to_device(video)
        self.check_video(video)
        return self.encode(*self.embed_inputs(video), modality=VIDEO)

    def text_latents(self, text_ids: Tensor, text_mask: Tensor) -> Tensor:
        """Latents ``[B, N, D]`` of texts encoded alone."""
        text_ids, text_mask = self.to_device(text_ids, text_mask)
        self.check_text(text_ids, text_mask)
        return self.encode(*self.embed_inputs(None, text_ids, text_mask), modality=TEXT)

    def pool(self, latents: Tensor) -> Tensor:
        """Projected mean of the latents: the contrastive embedding ``[B, E]``."""
        return self.proj(latents.mean(1))

    def pool_unimodal(self, inputs: Tensor, mask: Tensor, modality: int | None = None) -> Tensor:
        return self.pool(self.encode(inputs, mask, modality))

    # -- scoring ----------------------------------------------------------
    def decode(self, context: Tensor) -> Tensor:
        """VTM logits ``[B]``: the [CLS] query reads the latents ``context [B, n, D]``."""
        x = repeat(self.vtm_query, "q d -> b q d", b=context.shape[0])
        for block in self.decoder:
            x = block(x, context)
        return score_in_fp32(self.vtm_head, x[:, 0]).squeeze(-1)

    def pair_context(self, video_latents: Tensor, text_latents: Tensor) -> Tensor:
        """What the mixed stream's decoder reads: ``[video latents; text latents]``, tagged."""
        return torch.cat([self.stream_tag(video_latents, VIDEO), self.stream_tag(text_latents, TEXT)], 1)

    def score_latents(self, video_latents: Tensor, text_latents: Tensor) -> Tensor:
        """Pair logits ``[B]`` from separately encoded latents (multi or mixed stream)."""
        if self.config.stream == "mixed":
            return self.decode(self.pair_context(video_latents, text_latents))
        v, t = self.unit_embedding(video_latents), self.unit_embedding(text_latents)
        return self.logit_scale.float().exp().clamp(max=100) * (v * t).sum(-1)

    def unit_embedding(self, latents: Tensor) -> Tensor:
        """L2-normalised pooled embedding ``[B, E]`` in float32 (the multi
        stream's score is their dot product, compared in fp32)."""
        return F.normalize(self.pool(latents).float(), dim=-1)

    def forward(self, video: Tensor | Mapping[str, Tensor], text_ids: Tensor | None = None,
                text_mask: Tensor | None = None) -> VLOutput:
        """Score pairs: ``video [B, T, 3, H, W]``, ``text_ids``/``text_mask [B, L]``
        (or one inputs mapping with ``video``, ``text``, ``text_mask``)."""
        video, text_ids, text_mask = self.read_inputs(video, text_ids, text_mask)
        self.check_inputs(video, text_ids, text_mask)
        if self.config.stream != "single":
            return VLOutput(logits=self.score_latents(self.video_latents(video),
                                                      self.text_latents(text_ids, text_mask)))
        latents = self.encode(*self.embed_inputs(video, text_ids, text_mask))
        return VLOutput(logits=self.decode(latents), pooled=self.pool(latents))

    # -- task heads: QA and MLM read the joint encoding ----------------------
    def prepare(self, video: Tensor | Mapping[str, Tensor], text_ids: Tensor | None = None,
                text_mask: Tensor | None = None) -> InputArray:
        """The joint input array of ``[video; text]`` (``InputArray``): the
        work that does not depend on the latents, done once for every latent
        count. What QA, MLM and the single stream's VTM read."""
        video, text_ids, text_mask = self.read_inputs(video, text_ids, text_mask)
        video, text_ids, text_mask = self.to_device(video, text_ids, text_mask)
        self.check_inputs(video, text_ids, text_mask)
        return InputArray(*self.embed_inputs(video, text_ids, text_mask))

    def joint_latents(self, video: Tensor, text_ids: Tensor, text_mask: Tensor) -> Tensor:
        """Latents ``[B, N, D]`` of ``[video; text]`` encoded together (what
        QA and MLM read, whatever the retrieval stream)."""
        return self.encode_array(self.prepare(video, text_ids, text_mask))

    def answer_array(self, array: InputArray) -> Tensor:
        """Answer logits ``[B, num_answers]`` of a prepared joint input array (``prepare``)."""
        self._need_head("qa_head", "num_answers")
        lat = self.encode_array(array)
        cls = self.qa_decoder(repeat(self.qa_query, "q d -> b q d", b=lat.shape[0]), lat)
        return self.qa_head(cls[:, 0])

    def vtm_array(self, array: InputArray) -> Tensor:
        """VTM logits ``[B]`` of a prepared joint input array (single stream)."""
        if self.config.stream != "single":
            raise ValueError(f"vtm_array: the {self.config.stream} stream scores separate encodings, not a joint "
                             "input array")
        return self.decode(self.encode_array(array))

    def answer(self, video: Tensor | Mapping[str, Tensor], question_ids: Tensor | None = None,
               question_mask: Tensor | None = None) -> Tensor:
        """Answer logits ``[B, num_answers]``: a [CLS] query reads the joint
        latents of the video and the question (given positionally, or as an
        inputs mapping whose ``text``/``text_mask`` are the question), then
        the answer classifier."""
        self._need_head("qa_head", "num_answers")
        return self.answer_array(self.prepare(video, question_ids, question_mask))

    def probe(self, video: Tensor | Mapping[str, Tensor], text_ids: Tensor | None = None,
              text_mask: Tensor | None = None) -> Tensor:
        """Cheap features ``[B, D]`` of ``[video; text]`` encoded together
        (``probe_inputs``): what a learned latent policy reads."""
        return self.probe_array(self.prepare(video, text_ids, text_mask))

    def mlm_logits(self, video: Tensor | Mapping[str, Tensor], text_ids: Tensor | None = None,
                   text_mask: Tensor | None = None, masked: Tensor | None = None) -> Tensor:
        """Token logits ``[B, L, vocab]`` at every text position.

        ``text_ids`` are the corrupted ids (masked positions already replaced,
        see ``slimvl.tasks.mlm.mask_tokens``), given positionally or in an
        inputs mapping (``mlm_logits(inputs, masked=...)``); ``masked``
        ``[B, L]`` bool says which positions were chosen. Each decoder query
        is the position's embedding plus the masked/unmasked embedding.
        """
        self._need_head("mlm_head", "mlm")
        if masked is None:
            raise TypeError("mlm_logits: masked [B, L] (the chosen positions) is required")
        video, text_ids, text_mask = self.read_inputs(video, text_ids, text_mask)
        (masked,) = self.to_device(masked)
        if masked.shape != text_ids.shape or masked.dtype != torch.bool:
            raise ValueError(f"masked: expected bool of shape {tuple(text_ids.shape)}, "
                             f"got {masked.dtype} {tuple(masked.shape)}")
        lat = self.joint_latents(video, text_ids, text_mask)
        queries = self.mlm_pos[: text_ids.shape[1]] + self.mlm_state[masked.long()]
        return self.mlm_head(self.mlm_decoder(queries, lat))

    def _need_head(self, head: str, option: str) -> None:
        if getattr(self, head, None) is None:
            raise ValueError(f"this {self.config.model_type} has no {head}: build it with {option} set "
                             f"(e.g. create_model(..., {option}={'True' if option == 'mlm' else 'N'}))")

    # -- cached retrieval (multi and mixed streams) -------------------------
    def _need_cache(self) -> None:
        if not self.cacheable:
            raise ValueError("stream='single' encodes each pair jointly: there is nothing to cache; "
                             "score pairs with model(video, text_ids, text_mask)")

    def cache_videos(self, video: Tensor) -> Tensor:
        """What retrieval keeps per video: the normalised embedding ``[B, E]``
        (multi) or the tagged latents ``[B, N, D]`` (mixed)."""
        self._need_cache()
        lat = self.video_latents(video)
        if self.config.stream == "multi":
            return self.unit_embedding(lat)
        return self.stream_tag(lat, VIDEO)

    def cache_texts(self, text_ids: Tensor, text_mask: Tensor) -> Tensor:
        """What retrieval keeps per caption (see ``cache_videos``)."""
        self._need_cache()
        lat = self.text_latents(text_ids, text_mask)
        if self.config.stream == "multi":
            return self.unit_embedding(lat)
        return self.stream_tag(lat, TEXT)

    def score_cached(self, text_cache: Tensor, video_cache: Tensor, max_pairs: int = 8192) -> Tensor:
        """Logits ``[n_texts, n_videos]`` of every pair, from the caches:
        ``score_prepared`` of each side's ``prepare_cached``.

        The mixed stream projects each item's keys and values once, then runs
        only the per-pair part of the decoder (``streams.cached_decoder_scores``);
        ``max_pairs`` bounds the pairs in flight (memory).
        """
        return self.score_prepared(self.prepare_cached(text_cache), self.prepare_cached(video_cache), max_pairs)

    def prepare_cached(self, cache: Tensor):
        """The per-item part of scoring a cache (``cache_videos`` or
        ``cache_texts``), done once per item: the decoder's keys and values
        per layer (mixed), or the embeddings as they are (multi). What a
        cached retrieval pays per item besides encoding."""
        self._need_cache()
        (cache,) = self.to_device(cache)
        if self.config.stream == "multi":
            return cache
        return [decoder_kv(b, cache) for b in self.decoder]

    def score_prepared(self, texts, videos, max_pairs: int = 8192) -> Tensor:
        """Logits ``[n_texts, n_videos]`` from ``prepare_cached`` of both
        sides: only the per-pair work."""
        self._need_cache()
        if self.config.stream == "multi":
            with without_autocast(texts.device):
                return self.logit_scale.float().exp().clamp(max=100) * (texts.float() @ videos.float().T)
        return cached_decoder_scores(self.decoder, self.vtm_query, self.vtm_head, texts, videos, max_pairs)

    # -- cost -------------------------------------------------------------
    def decoder_flops(self, n_context: int) -> int:
        """FLOPs of the VTM decoder and head over ``n_context`` latents."""
        c = self.config
        return c.decoder_layers * block_flops(1, n_context, c.dim, c.mlp_ratio, cross=True) + linear_flops(1, c.dim, 1)

    def retrieval_flops(self, frames: int, text_len: int) -> dict[str, int]:
        """Cost of cached retrieval: per video, per caption and per scored pair.

        For the single stream nothing is cached: every pair costs ``analytic_flops``."""
        c = self.config
        if c.stream == "single":
            return {"video": 0, "text": 0, "pair": self.analytic_flops(frames, text_len)}
        video = self.embed_flops(frames) + self.encoder_flops(self.patch_embed.num_tokens(frames))
        text = self.encoder_flops(text_len)
        if c.stream == "multi":
            pool = linear_flops(1, c.dim, c.embed_dim)
            return {"video": video + pool, "text": text + pool, "pair": 2 * c.embed_dim}
        n = c.latents_run()
        kv = c.decoder_layers * linear_flops(n, c.dim, 2 * c.dim)
        pair = c.decoder_layers * (block_flops(1, 2 * n, c.dim, c.mlp_ratio, cross=True)
                                   - linear_flops(2 * n, c.dim, 2 * c.dim))
        return {"video": video + kv, "text": text + kv, "pair": pair + linear_flops(1, c.dim, 1)}

    def analytic_flops(self, frames: int, text_len: int) -> int:
        c = self.config
        mv = self.patch_embed.num_tokens(frames)
        f = self.embed_flops(frames)
        if c.stream == "single":
            f += self.encoder_flops(mv + text_len) + self.decoder_flops(c.latents_run())
            return f + linear_flops(1, c.dim, c.embed_dim)  # the pooled projection
        f += self.encoder_flops(mv) + self.encoder_flops(text_len)
        if c.stream == "multi":
            return f + 2 * linear_flops(1, c.dim, c.embed_dim)
        return f + self.decoder_flops(2 * c.latents_run())

