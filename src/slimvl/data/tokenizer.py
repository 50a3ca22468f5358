"""A small BERT-style WordPiece tokenizer built on Hugging Face ``tokenizers``."""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path
from typing import Iterable

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _bert_pipeline(tok: HFTokenizer) -> HFTokenizer:
    # Lower-casing and accent stripping make our captions and real BERT vocabs agree.
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True, clean_text=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    return tok


def wordpiece_vocab(words: Counter[str], vocab_size: int, prefix: str = "##") -> list[str]:
    """A WordPiece vocabulary from word counts, deterministically: the
    specials, every character (word-initial, and continuing with ``prefix``),
    then merged pieces by byte-pair merging (the most frequent adjacent pair
    first, ties broken by the pair's text), until ``vocab_size`` pieces or
    nothing left to merge. Encoding is WordPiece's greedy longest match."""
    pieces = {w: [w[0], *(prefix + c for c in w[1:])] for w in sorted(words) if w}
    vocab = list(SPECIALS) + sorted({p for ps in pieces.values() for p in ps})
    known = set(vocab)
    while len(vocab) < vocab_size:
        pairs: Counter[tuple[str, str]] = Counter()
        for w, ps in pieces.items():
            for pair in zip(ps, ps[1:]):
                pairs[pair] += words[w]
        if not pairs:
            break
        (a, b), _ = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        merged = a + b[len(prefix):]
        for w, ps in pieces.items():
            i = 0
            while i < len(ps) - 1:
                if ps[i] == a and ps[i + 1] == b:
                    ps[i:i + 2] = [merged]
                i += 1
        if merged not in known:
            vocab.append(merged)
            known.add(merged)
    return vocab[:max(vocab_size, len(SPECIALS))]


class Tokenizer:
    """Turns captions into fixed-length id / mask tensors: ``[CLS] tokens [SEP] [PAD]...``."""

    def __init__(self, hf: HFTokenizer):
        """Wrap a ``tokenizers.Tokenizer`` that has the five BERT special tokens."""
        self.hf = hf
        ids = {t: hf.token_to_id(t) for t in SPECIALS}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"tokenizer lacks special tokens {missing}")
        self.pad_id, self.unk_id = ids["[PAD]"], ids["[UNK]"]
        self.cls_id, self.sep_id, self.mask_id = ids["[CLS]"], ids["[SEP]"], ids["[MASK]"]

    @classmethod
    def train(cls, captions: Iterable[str], vocab_size: int = 1000) -> "Tokenizer":
        """Learn a WordPiece vocabulary of at most ``vocab_size`` pieces from
        ``captions`` (specials first, so ``[PAD]`` is 0).

        The same captions always give the same vocabulary and ids
        (``wordpiece_vocab``): the ``tokenizers`` trainer breaks ties between
        equally frequent merges in hash-map order, so two runs of one
        ``data make`` gave different ids and models trained from one seed
        differed."""
        pipeline = _bert_pipeline(HFTokenizer(models.WordPiece(unk_token="[UNK]")))
        words: Counter[str] = Counter()
        for text in captions:
            normal = pipeline.normalizer.normalize_str(text or "")
            words.update(w for w, _ in pipeline.pre_tokenizer.pre_tokenize_str(normal))
        vocab = wordpiece_vocab(words, vocab_size)
        hf = _bert_pipeline(HFTokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]")))
        hf.add_special_tokens(list(SPECIALS))  # the same ids, now marked special (never split, skipped by decode)
        return cls(hf)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load a ``tokenizer.json`` saved by :meth:`save`, or a BERT ``vocab.txt``."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        if path.suffix == ".json":
            return cls(HFTokenizer.from_file(str(path)))
        model = models.WordPiece.from_file(str(path), unk_token="[UNK]")
        return cls(_bert_pipeline(HFTokenizer(model)))

    def save(self, path: str | os.PathLike) -> None:
        """Save as ``tokenizer.json``; written to a temp file then renamed, so never half-written."""
        path = Path(path)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        self.hf.save(str(tmp))
        os.replace(tmp, path)

    @property
    def vocab_size(self) -> int:
        """The largest id + 1, specials included: the embedding rows a model
        needs (a BERT vocab.txt with a repeated line has a gap in its ids)."""
        return max(self.hf.get_vocab().values()) + 1

    @property
    def fingerprint(self) -> str:
        """A short hash of what turns text into ids (normaliser, pre-tokeniser,
        word pieces and their ids): two tokenizers with the same fingerprint
        give a model the same ids for the same text."""
        spec = json.loads(self.hf.to_str())
        model = {k: v for k, v in spec.get("model", {}).items() if k != "vocab"}
        vocab = sorted(self.hf.get_vocab().items(), key=lambda kv: kv[1])
        key = [spec.get("normalizer"), spec.get("pre_tokenizer"), model, vocab]
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

    def tokens(self, text: str) -> list[str]:
        """Word pieces of one text (no specials), handy for Karpathy ``tokens`` fields."""
        return self.hf.encode(text, add_special_tokens=False).tokens

    def decode(self, ids) -> str:
        """Ids back to text, skipping special tokens."""
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)

    def encode(self, texts: list[str], max_len: int, stats: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Ids ``LongTensor [B, max_len]`` and mask ``BoolTensor [B, max_len]`` (True = real token).

        Overlong texts are cut so that ``[SEP]`` is still the last real token;
        ``stats``, when given, receives ``truncated``: how many were cut.
        """
        if max_len < 2:
            raise ValueError("max_len must leave room for [CLS] and [SEP]")
        if isinstance(texts, str):
            texts = [texts]
        bad = next((i for i, t in enumerate(texts) if t is not None and not isinstance(t, str)), None)
        if bad is not None:
            raise ValueError(f"text {bad}: expected a string, got {type(texts[bad]).__name__} {texts[bad]!r}")
        ids = torch.full((len(texts), max_len), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(texts), max_len), dtype=torch.bool)
        encs = self.hf.encode_batch([t or "" for t in texts], add_special_tokens=False)
        if stats is not None:
            stats["truncated"] = sum(len(enc.ids) > max_len - 2 for enc in encs)
        for b, enc in enumerate(encs):
            seq = [self.cls_id, *enc.ids[: max_len - 2], self.sep_id]
            ids[b, : len(seq)] = torch.tensor(seq)
            mask[b, : len(seq)] = True
        return ids, mask
