"""Glue used by the CLI and the demo: dataset -> tensors -> model."""
from __future__ import annotations

from pathlib import Path

from .data import Tokenizer, VideoTextDataset
from .data.qa import answer_vocab, read_vqa
from .tasks.qa import QAData
from .tasks.vtm import RetrievalData


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


def load_split(root: str | Path, split: str, tokenizer: Tokenizer, frames: int, size: int, max_len: int,
               skip_bad: bool = False, progress: bool = True) -> RetrievalData:
    """Read one split of a dataset (any supported layout) into ``RetrievalData``."""
    ds = VideoTextDataset(root, split, frames=frames, size=size, skip_bad=skip_bad, progress=progress)
    if len(ds) == 0:
        raise ValueError(f"{root}: split {split!r} has no readable items")
    return RetrievalData.from_dataset(ds, tokenizer, max_len)


def load_qa_split(root: str | Path, split: str, tokenizer: Tokenizer, frames: int, size: int, max_len: int,
                  answers: list[str] | None = None, skip_bad: bool = False, progress: bool = True) -> QAData:
    """Read one split of a VQA-style question set (``slimvl.data.qa``) and its
    media into ``QAData``. ``answers`` is the classifier's vocabulary (default:
    the dataset's ``qa/answers.json``, else the most frequent train answers)."""
    records = read_vqa(root, split)
    if answers is None:
        answers = answer_vocab(root)
    ds = VideoTextDataset(root, split, frames=frames, size=size, skip_bad=skip_bad, progress=progress)
    if len(ds) == 0:
        raise ValueError(f"{root}: split {split!r} has no readable items")
    return QAData.from_dataset(ds, records, tokenizer, max_len, answers)
