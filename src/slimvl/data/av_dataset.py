"""Reading an AudioSet-style folder into frames, log-mel spectrograms and labels.

Works for AudioSet itself (``class_labels_indices.csv``, ``{split}_segments.csv``,
``clips/``) and for what ``make_dataset(kind="audio-video")`` writes, which
adds ``{split}_statements.csv``: one statement per clip and its answer
(``visible``, ``heard`` or ``absent``)::

    # YTID, statement, answer
    clip000012, "there is a red circle", heard
"""
from __future__ import annotations

import csv
import hashlib
import logging
import multiprocessing as mp
import os
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from .audio import decode_audio, is_silent, log_mel, mel_frames
from .audioset import AudioSetRecord, read_audioset, read_segments
from .av_world import ANSWERS
from .media import MediaError, decode_video

log = logging.getLogger("slimvl")
_PARALLEL_MIN_ITEMS = 64  # below this a worker pool costs more than it saves
_MEL_CHUNK = 256  # clips per STFT call: [256, 513, 126] complex is ~130 MB at 2 s
STATEMENTS_HEADER = "# YTID, statement, answer"


def read_statements(root, split: str) -> dict[str, tuple[str, str]]:
    """``{ytid: (statement, answer)}`` from ``{root}/{split}_statements.csv``.
    Every bad row (too few fields, an answer not in ``ANSWERS``, a clip listed
    twice) is an error naming the file and the line."""
    path = Path(root) / f"{split}_statements.csv"
    if not path.is_file():
        raise FileNotFoundError(f"statements file not found: {path}")
    out: dict[str, tuple[str, str]] = {}
    with path.open(newline="") as f:
        for line, raw in enumerate(f, start=1):
            if not raw.strip() or raw.lstrip().startswith("#"):
                continue
            row = [x.strip() for x in next(csv.reader([raw], skipinitialspace=True))]
            if len(row) != 3 or not row[0] or not row[1]:
                raise ValueError(f"{path}, line {line}: expected YTID, statement, answer; got {row}")
            ytid, text, answer = row
            if answer not in ANSWERS:
                raise ValueError(f"{path}, line {line} ({ytid}): answer {answer!r} is not one of {list(ANSWERS)}")
            if ytid in out:
                raise ValueError(f"{path}, line {line}: {ytid} has a statement already")
            out[ytid] = (text, answer)
    return out


def av_fingerprint(root) -> str:
    """A short hash of a folder's CSV files (class list, segments,
    statements): what a run records about the data it read (clips are not
    hashed)."""
    root = Path(root)
    h = hashlib.sha256()
    for p in sorted(root.glob("*.csv")):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _load_clip(job: tuple) -> tuple:
    """``(index, frames [T,3,H,W] or None, wave or None, source rate, error
    or None)``; never raises, so a pool survives bad files."""
    i, path, frames, size, seconds, sample_rate = job
    try:
        video, _ = decode_video(path, frames, size)
        wave, rate = decode_audio(path, seconds, sample_rate)
        return i, np.ascontiguousarray(video.transpose(0, 3, 1, 2)), wave, rate, None
    except MediaError as e:
        return i, None, None, 0, str(e)


def _map(fn, jobs: list, workers: int):
    """``fn`` over ``jobs`` in order, in a fork pool when it pays."""
    if workers > 1 and len(jobs) >= _PARALLEL_MIN_ITEMS:
        # fork: workers need no re-imports (spawn would re-import torch per worker).
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
        with ctx.Pool(workers) as pool:
            yield from pool.imap(fn, jobs, chunksize=16)
    else:
        yield from map(fn, jobs)


class AudioVideoDataset(Dataset):
    """Frames, log-mel spectrograms and multi-hot labels of one split of an
    AudioSet-style folder, decoded once into memory.

    Attributes (``n`` readable clips, ``C`` classes):

    - ``records`` (``AudioSetRecord``), ``classes``, ``class_names``;
    - ``videos``: uint8 ``[n, frames, 3, size, size]``;
    - ``audio``: float32 ``[n, n_mels, F]`` log-mel (not normalised),
      ``F = mel_frames(seconds, sample_rate, hop_length)``;
    - ``labels``: float ``[n, C]`` of 0/1;
    - ``silent``: bool ``[n]``, kept silent clips (``keep_silent``), whose
      spectrogram a caller zeroes after normalising;
    - ``statements`` (list of str) and ``answers`` (long ``[n]``, indices
      into ``ANSWERS``) from ``{split}_statements.csv``, or None without it;
    - ``skipped``: ``(path, reason)`` of each clip left out; ``resampled``:
      ``{source rate: clips}`` of clips not at ``sample_rate``;
      ``fingerprint`` of the CSVs.

    A clip without a video stream or an audio track is an error naming it
    (skipped and counted with ``skip_bad``, as missing clips are); a silent
    sound track is skipped and counted unless ``keep_silent``. ``limit``
    reads only the first ``limit`` rows of the split.
    """

    def __init__(self, root, split: str, frames: int = 4, size: int = 64, seconds: float = 2.0,
                 sample_rate: int = 16000, n_fft: int = 1024, hop_length: int = 256, n_mels: int = 128,
                 f_max: float = 4000.0, skip_bad: bool = False, keep_silent: bool = False, progress: bool = True,
                 workers: int | None = None, limit: int | None = None):
        """Read the CSVs, decode every clip (``workers`` processes, default
        ``min(2, cpus)``) and compute all spectrograms."""
        self.root, self.split, self.frames, self.size = Path(root), split, frames, size
        self.seconds, self.sample_rate, self.skip_bad, self.keep_silent = seconds, sample_rate, skip_bad, keep_silent
        self.mel_args = dict(sample_rate=sample_rate, n_fft=n_fft, hop_length=hop_length, n_mels=n_mels,
                             f_max=f_max)
        self.skipped: list[tuple[Path, str]] = []
        self.resampled: dict[int, int] = {}
        self.classes, records = self._read_records(limit)
        self.class_names = [c.name for c in self.classes]
        self.fingerprint = av_fingerprint(self.root)
        workers = workers if workers is not None else min(2, os.cpu_count() or 1)
        videos, spectrograms, silent, self.records = self._decode_all(records, workers, progress)
        self.videos = torch.from_numpy(np.stack(videos)) if videos else \
            torch.zeros(0, frames, 3, size, size, dtype=torch.uint8)
        self.audio = torch.cat(spectrograms) if spectrograms else \
            torch.zeros(0, n_mels, mel_frames(seconds, sample_rate, hop_length))
        self.silent = torch.tensor(silent, dtype=torch.bool)
        self.labels = torch.zeros(len(self.records), len(self.classes))
        for i, r in enumerate(self.records):
            self.labels[i, r.labels] = 1.0
        self.statements, self.answers = self._read_statements()

    # ------------------------------------------------------------ reading

    def _read_records(self, limit: int | None) -> tuple[list, list[AudioSetRecord]]:
        """Classes and rows (with their clips) of the split, the first ``limit``
        rows only if given; with ``skip_bad`` the rows whose clip is missing go
        to ``skipped``."""
        classes, found = read_audioset(self.root, self.split, skip_missing=self.skip_bad)
        if limit is None and not self.skip_bad:
            return classes, found
        rows = read_segments(self.root / f"{self.split}_segments.csv", classes)
        rows = rows[:limit] if limit is not None else rows
        wanted, have = {r.line for r in rows}, {r.line for r in found}
        for r in rows:
            if r.line not in have:
                self.skipped.append((self.root / "clips" / r.ytid,
                                     f"no clip for {r.ytid} ({self.split}_segments.csv line {r.line})"))
        return classes, [r for r in found if r.line in wanted]

    def _decode_all(self, records: list[AudioSetRecord], workers: int, progress: bool) -> tuple:
        """Frames, spectrograms (a tensor per chunk of clips) and silence flags
        of the clips kept, and their records. Spectrograms are computed as
        the waves arrive: only a chunk of waves is held at a time."""
        jobs = [(i, str(r.path), self.frames, self.size, self.seconds, self.sample_rate)
                for i, r in enumerate(records)]
        videos, waves, spectrograms, silent, kept, quiet = [], [], [], [], [], []
        rates: Counter = Counter()
        bar = tqdm(total=len(jobs), desc=f"decoding {self.split}", disable=not progress, unit="clip")
        for i, video, wave, rate, err in _map(_load_clip, jobs, workers):
            bar.update()
            r = records[i]
            if err is not None:
                self._bad(r, err, bar)
                continue
            rates[rate] += 1
            quiet_clip = is_silent(wave)
            if quiet_clip:
                quiet.append(r.path)
                if not self.keep_silent:
                    self.skipped.append((r.path, f"{r.path}: silent audio track ({self.split}_segments.csv "
                                                 f"line {r.line})"))
                    continue
            videos.append(video)
            waves.append(wave)
            silent.append(quiet_clip)
            kept.append(r)
            if len(waves) == _MEL_CHUNK:
                spectrograms.append(log_mel(torch.from_numpy(np.stack(waves)), **self.mel_args))
                waves.clear()
        bar.close()
        if waves:
            spectrograms.append(log_mel(torch.from_numpy(np.stack(waves)), **self.mel_args))
        self._report(len(jobs), quiet, rates)
        return videos, spectrograms, silent, kept

    def _bad(self, record: AudioSetRecord, err: str, bar) -> None:
        if not self.skip_bad:
            bar.close()
            raise MediaError(f"{err} ({self.split}_segments.csv line {record.line}; skip such clips with skip_bad)")
        self.skipped.append((record.path, err))
        log.warning("skipping unreadable clip: %s", err)

    def _report(self, n: int, quiet: list[Path], rates: Counter) -> None:
        if quiet:
            what = "kept, flagged in .silent" if self.keep_silent else "skipped (keep them with keep_silent=True)"
            log.warning("%s/%s: %d of %d clips have a silent audio track, %s; e.g. %s", self.root, self.split,
                        len(quiet), n, what, quiet[0])
        for rate, count in sorted(rates.items()):
            if rate != self.sample_rate:
                self.resampled[rate] = count
                log.info("%s/%s: %d clips at %d Hz resampled to %d Hz", self.root, self.split, count, rate,
                         self.sample_rate)
        if self.skipped:
            log.warning("%s/%s: skipped %d clips", self.root, self.split, len(self.skipped))

    def _read_statements(self) -> tuple[list[str] | None, torch.Tensor | None]:
        """The kept clips' statements and answers, or (None, None) without a statements file."""
        path = self.root / f"{self.split}_statements.csv"
        if not path.is_file():
            return None, None
        table = read_statements(self.root, self.split)
        missing = [r.ytid for r in self.records if r.ytid not in table]
        if missing:
            raise ValueError(f"{path}: no statement for {len(missing)} clips of {self.split}_segments.csv "
                             f"(e.g. {missing[0]})")
        texts = [table[r.ytid][0] for r in self.records]
        answers = torch.tensor([ANSWERS.index(table[r.ytid][1]) for r in self.records], dtype=torch.long)
        return texts, answers

    # ------------------------------------------------------------ items

    def __len__(self) -> int:
        """Number of clips kept."""
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        """``dict(video=uint8 [T,3,H,W], audio=float [n_mels, F], labels=float [C],
        silent=bool, statement=str | None, answer=int | None, item_id=str, index=i)``."""
        return {"video": self.videos[i], "audio": self.audio[i], "labels": self.labels[i],
                "silent": bool(self.silent[i]), "statement": None if self.statements is None else self.statements[i],
                "answer": None if self.answers is None else int(self.answers[i]),
                "item_id": self.records[i].ytid, "index": i}


__all__ = ["AudioVideoDataset", "read_statements", "av_fingerprint", "STATEMENTS_HEADER"]
