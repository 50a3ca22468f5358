"""The AudioSet layout: segment CSVs, the class list, a folder of clips.

AudioSet (and what ``make_dataset`` writes for sound) describes clips in
CSVs of segments::

    # YTID, start_seconds, end_seconds, positive_labels
    --PJHxphWEs, 30.000, 40.000, "/m/09x0r,/t/dd00088"

and names its classes in ``class_labels_indices.csv`` (``index,mid,
display_name``). A split is ``{root}/{split}_segments.csv`` (AudioSet's own
``balanced_train_segments.csv``, ``eval_segments.csv``... are splits
``balanced_train``, ``eval``); clips live under ``{root}/clips/`` named by
their id, with or without the start time (``{ytid}.mp4``,
``{ytid}_{start}.mp4``, ``Y{ytid}.wav``, as the usual download scripts
write them).

Every problem names the file and the line: a row with too few fields, a
time that is not a number, a label missing from the class list, a clip
that is not there (``skip_missing=True`` skips and counts those instead).
"""
from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("slimvl")
MEDIA_EXTS = (".mp4", ".mkv", ".webm", ".avi", ".wav", ".flac", ".mp3", ".ogg")


@dataclass
class AudioSetClass:
    """One class: its index in the label vector, its machine id, its name."""

    index: int
    mid: str
    name: str


@dataclass
class AudioSetRecord:
    """One segment: ``labels`` are class indices; ``path`` its clip (None
    until found); ``line`` where the CSV gives it."""

    ytid: str
    start: float
    end: float
    labels: list[int]
    line: int
    path: Path | None = None
    mids: list[str] = field(default_factory=list)


def read_class_labels(path) -> list[AudioSetClass]:
    """``class_labels_indices.csv`` (``index,mid,display_name``) in index
    order; indices must be 0..K-1 and mids distinct."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class list not found: {path} (AudioSet's class_labels_indices.csv)")
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    if not rows or [c.strip() for c in rows[0][:3]] != ["index", "mid", "display_name"]:
        raise ValueError(f"{path}: expected the header 'index,mid,display_name', got {rows[0] if rows else 'nothing'}")
    out = []
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) < 3:
            raise ValueError(f"{path}, line {line}: expected index,mid,display_name, got {row}")
        try:
            index = int(row[0])
        except ValueError:
            raise ValueError(f"{path}, line {line}: index {row[0]!r} is not an integer") from None
        out.append(AudioSetClass(index, row[1].strip(), row[2].strip()))
    if [c.index for c in out] != list(range(len(out))):
        raise ValueError(f"{path}: indices must run 0..{len(out) - 1} in order")
    mids = [c.mid for c in out]
    if len(set(mids)) != len(mids):
        dup = sorted({m for m in mids if mids.count(m) > 1})
        raise ValueError(f"{path}: mids listed twice: {dup}")
    return out


def read_segments(path, classes: list[AudioSetClass]) -> list[AudioSetRecord]:
    """The rows of a segments CSV, labels turned into class indices.
    Comment lines (``#``) and blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"segments file not found: {path}")
    index = {c.mid: c.index for c in classes}
    out = []
    with path.open(newline="") as f:
        for line, raw in enumerate(f, start=1):
            if not raw.strip() or raw.lstrip().startswith("#"):
                continue
            row = next(csv.reader([raw], skipinitialspace=True))
            if len(row) < 4:
                raise ValueError(f"{path}, line {line}: expected YTID, start_seconds, end_seconds, positive_labels; "
                                 f"got {len(row)} fields")
            ytid = row[0].strip()
            try:
                start, end = float(row[1]), float(row[2])
            except ValueError:
                raise ValueError(f"{path}, line {line}: start/end {row[1]!r}, {row[2]!r} are not numbers") from None
            if not ytid or end <= start:
                raise ValueError(f"{path}, line {line}: needs a clip id and end_seconds > start_seconds")
            mids = [m.strip() for m in ",".join(row[3:]).split(",") if m.strip()]
            unknown = [m for m in mids if m not in index]
            if unknown:
                raise ValueError(f"{path}, line {line} ({ytid}): labels {unknown} are not in the class list")
            if not mids:
                raise ValueError(f"{path}, line {line} ({ytid}): no positive labels")
            out.append(AudioSetRecord(ytid, start, end, [index[m] for m in mids], line, mids=mids))
    return out


def clip_names(record: AudioSetRecord) -> list[str]:
    """The file stems a clip is stored under by the usual download scripts."""
    s = record.start
    starts = {f"{s:.3f}", f"{s:g}", str(int(s)), f"{int(s):06d}", str(int(round(s * 1000)))}
    return [record.ytid, f"Y{record.ytid}", *(f"{record.ytid}_{t}" for t in sorted(starts))]


def find_clip(folder: Path, record: AudioSetRecord) -> Path | None:
    """The clip of ``record`` under ``folder``, or None."""
    for stem in clip_names(record):
        for ext in MEDIA_EXTS:
            p = folder / f"{stem}{ext}"
            if p.is_file():
                return p
    return None


def read_audioset(root, split: str, clips: str = "clips", skip_missing: bool = False) -> tuple[
        list[AudioSetClass], list[AudioSetRecord]]:
    """The classes and the segments of ``split`` (``{root}/{split}_segments.csv``)
    with their clips found under ``{root}/{clips}``. A missing clip is an
    error naming the row, or with ``skip_missing`` skipped, counted in the
    log."""
    root = Path(root)
    classes = read_class_labels(root / "class_labels_indices.csv")
    records = read_segments(root / f"{split}_segments.csv", classes)
    folder, kept, missing = root / clips, [], []
    for r in records:
        r.path = find_clip(folder, r)
        (kept if r.path is not None else missing).append(r)
    if missing and not skip_missing:
        r = missing[0]
        raise FileNotFoundError(f"{root / f'{split}_segments.csv'}, line {r.line}: no clip for {r.ytid} under "
                                f"{folder} (tried {', '.join(clip_names(r)[:3])}... with {', '.join(MEDIA_EXTS)}); "
                                f"{len(missing)} of {len(records)} clips missing, skip them with skip_missing")
    if missing:
        log.info("%s: %d of %d clips missing, skipped (e.g. %s)", split, len(missing), len(records), missing[0].ytid)
    return classes, kept


__all__ = ["AudioSetClass", "AudioSetRecord", "read_class_labels", "read_segments", "read_audioset", "find_clip",
           "clip_names"]
