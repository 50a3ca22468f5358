"""Glue used by the CLI and the demo: dataset -> tensors -> model."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .data import Tokenizer, VideoTextDataset
from .data.readers import available_splits, dataset_fingerprint
from .data.qa import answer_vocab, read_vqa
from .tasks.classify import ClassData
from .tasks.qa import QAData
from .tasks.retrieval import RetrievalData


def load_tokenizer(root: str | Path, vocab: str | Path | None = None, qa: bool = False) -> Tokenizer:
    """The dataset's ``tokenizer.json`` (with ``qa``: ``qa/tokenizer.json``,
    which also knows the questions' words, when present), or a given
    ``tokenizer.json``/BERT ``vocab.txt``."""
    path = Path(vocab) if vocab else Path(root) / "tokenizer.json"
    if not vocab and qa and (Path(root) / "qa" / "tokenizer.json").is_file():
        path = Path(root) / "qa" / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer at {path}: pass a tokenizer.json or a BERT vocab.txt")
    return Tokenizer.load(path)


def checkpoint_tokenizer(checkpoint: str | Path, vocab_size: int, root: str | Path | None = None,
                         vocab: str | Path | None = None, qa: bool = False) -> Tokenizer:
    """The tokenizer to use with a checkpoint's model: the one it was trained
    with (kept in the checkpoint) unless ``vocab`` names another, which must
    then be the same; for a checkpoint that kept none, the dataset's
    (``load_tokenizer``), which must at least have the model's
    ``vocab_size``. A mismatch is a ``ValueError``: ids from another
    tokenizer would be silently wrong, or out of range."""
    from .checkpoint import load_tokenizer_of

    ckpt = Path(checkpoint)
    own = load_tokenizer_of(ckpt)
    if vocab is not None:
        tok = Tokenizer.load(vocab)
        if own is not None and own.fingerprint != tok.fingerprint:
            raise ValueError(f"{vocab} is not the tokenizer {ckpt} was trained with (fingerprints {tok.fingerprint} "
                             f"and {own.fingerprint}); leave out --vocab to use the checkpoint's own")
    elif own is not None:
        return own
    else:
        if root is None:
            raise ValueError(f"{ckpt} keeps no tokenizer: name the one it was trained with (--vocab)")
        tok = load_tokenizer(root, qa=qa)
    if tok.vocab_size != vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} ids but {ckpt} was trained with vocab_size={vocab_size}: "
                         "pass the tokenizer it was trained with (--vocab)")
    return tok


def load_split(root: str | Path, split: str, tokenizer: Tokenizer, frames: int, size: int, max_len: int,
               skip_bad: bool = False, progress: bool = True) -> RetrievalData:
    """Read one split of a dataset (any supported layout) into ``RetrievalData``."""
    ds = VideoTextDataset(root, split, frames=frames, size=size, skip_bad=skip_bad, progress=progress)
    _need_items(ds, root, split)
    return RetrievalData.from_dataset(ds, tokenizer, max_len)


def _need_items(ds: VideoTextDataset, root, split: str) -> None:
    if len(ds) == 0:
        known = available_splits(root)
        why = "no readable items" if split in known else f"no items; the dataset's splits are {known}"
        raise ValueError(f"{root}: split {split!r} has {why}")


def load_qa_split(root: str | Path, split: str, tokenizer: Tokenizer, frames: int, size: int, max_len: int,
                  answers: list[str] | None = None, skip_bad: bool = False, progress: bool = True) -> QAData:
    """Read one split of a VQA-style question set (``slimvl.data.qa``) and its
    media into ``QAData``. ``answers`` is the classifier's vocabulary (default:
    the dataset's ``qa/answers.json``, else the most frequent train answers)."""
    records = read_vqa(root, split)
    if answers is None:
        answers = answer_vocab(root)
    ds = VideoTextDataset(root, split, frames=frames, size=size, skip_bad=skip_bad, progress=progress)
    _need_items(ds, root, split)
    ds.fingerprint = dataset_fingerprint(root, qa=True)  # the questions are part of what QA trains on
    return QAData.from_dataset(ds, records, tokenizer, max_len, answers)


def load_class_split(root: str | Path, split: str, target: str, frames: int, size: int, skip_bad: bool = False,
                     progress: bool = True) -> ClassData:
    """Read one split of a synthetic dataset into ``ClassData``: its clips and
    the ``target`` labels of their scenes (``"shapes"`` or ``"count"``)."""
    ds = VideoTextDataset(root, split, frames=frames, size=size, skip_bad=skip_bad, progress=progress)
    _need_items(ds, root, split)
    return ClassData.from_dataset(ds, target)


def _audio_args(config) -> dict:
    """The spectrogram settings a fusion model's config fixes (``FusionConfig``);
    none for a model that does not hear (the reader's defaults: its audio is
    decoded but never read)."""
    if not hasattr(config, "audio_seconds"):
        return {}
    return dict(seconds=config.audio_seconds, sample_rate=config.sample_rate, n_fft=config.n_fft,
                hop_length=config.hop_length, n_mels=config.n_mels, f_max=config.f_max)


def av_class_names(root: str | Path) -> list[str]:
    """The display names of an AudioSet-style folder's classes
    (``class_labels_indices.csv``), in label order."""
    from .data.audioset import read_class_labels

    return [c.name for c in read_class_labels(Path(root) / "class_labels_indices.csv")]


def audio_statistics(root: str | Path, config, split: str = "train", limit: int = 512,
                     progress: bool = True) -> tuple[float, float]:
    """Mean and standard deviation of the log-mel spectrograms of (up to
    ``limit`` clips of) a split, with ``config``'s spectrogram settings: what
    the fusion models normalise audio with (AST's dataset statistics).
    Silent clips are left out (they would pull the mean to the floor)."""
    from .data.audio import spectrogram_stats
    from .data.av_dataset import AudioVideoDataset

    ds = AudioVideoDataset(root, split, frames=1, size=config.image_size, skip_bad=True, progress=progress,
                           limit=limit, **_audio_args(config))
    if len(ds) == 0:
        raise ValueError(f"{root}: split {split!r} has no readable clip with sound to take audio statistics from")
    return spectrogram_stats(ds.audio)


def load_av_split(root: str | Path, split: str, config, tokenizer: Tokenizer | None = None, target: str = "labels",
                  frames: int = 4, skip_bad: bool = False, keep_silent: bool = False,
                  progress: bool = True):
    """Read one split of an AudioSet-style folder into ``AVData`` for a fusion
    model: frames and log-mel spectrograms with ``config``'s settings, the
    audio normalised with ``config.audio_mean`` / ``audio_std`` (a kept
    silent clip's spectrogram is zero), and the targets: the multi-label
    classes (``target="labels"``) or the statements, tokenised, and their
    answers (``"statements"``)."""
    from .data.audio import normalise
    from .data.av_dataset import AudioVideoDataset
    from .tasks.audio_video import ANSWERS, AVData

    if target not in ("labels", "statements"):
        raise ValueError(f"target={target!r}: expected 'labels' or 'statements'")
    ds = AudioVideoDataset(root, split, frames=frames, size=config.image_size, skip_bad=skip_bad,
                           keep_silent=keep_silent, progress=progress, **_audio_args(config))
    if len(ds) == 0:
        raise ValueError(f"{root}: split {split!r} has no readable clips")
    audio = normalise(ds.audio, getattr(config, "audio_mean", 0.0), getattr(config, "audio_std", 1.0))
    audio[torch.as_tensor(ds.silent, dtype=torch.bool)] = 0.0
    inputs = {"video": ds.videos, "audio": audio.half()}  # half: 2x less memory; batches go back to float
    if target == "statements":
        if ds.statements is None:
            raise ValueError(f"{root}: no {split}_statements.csv, which --task audio-video-text reads")
        if tokenizer is None:
            raise ValueError("statements need a tokenizer (the dataset's tokenizer.json or --vocab)")
        ids, mask = tokenizer.encode(list(ds.statements), config.max_text_len)
        inputs.update(text=ids, text_mask=mask)
        labels, classes = torch.as_tensor(ds.answers, dtype=torch.long), list(ANSWERS)
    else:
        labels, classes = torch.as_tensor(ds.labels, dtype=torch.float32), list(ds.class_names)
    return AVData(inputs, labels, classes, target, [str(p) for p, _ in ds.skipped], ds.fingerprint,
                  int(np.asarray(ds.silent).sum()), tokenizer if target == "statements" else None)
