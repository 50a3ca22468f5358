"""Readers for standard video-text (MSR-VTT) and image-text (Karpathy) layouts.

They work the same for real datasets and for what ``make_dataset`` writes;
synthetic extras (groups, held-out flags) come from an optional ``world.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from .media import MediaError, decode_video, read_image

log = logging.getLogger("slimvl")
_PARALLEL_MIN_ITEMS = 64
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


@dataclass
class Record:
    """One media item and all its captions."""

    item_id: str
    path: Path
    captions: list[str] = field(default_factory=list)
    split: str = ""


def _load_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from e


def _need(entry: dict, key: str, what: str, path: Path, kind: type | tuple[type, ...] | None = None):
    if not isinstance(entry, dict):
        raise ValueError(f"{path.name}: {what} must be an object with '{key}', got {type(entry).__name__} "
                         f"(file {path})")
    if key not in entry:
        raise ValueError(f"{path.name}: {what} has no '{key}' (file {path})")
    value = entry[key]
    if kind is not None and (not isinstance(value, kind) or isinstance(value, bool)):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise ValueError(f"{path.name}: {what}: '{key}' must be {_A(names)}, got {type(value).__name__} "
                         f"{_short(value)} (file {path})")
    return value


def _A(name: str) -> str:
    return {"list": "a list", "str": "a string", "int": "an integer", "dict": "an object"}.get(name, name)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def dataset_fingerprint(root, qa: bool = False) -> str:
    """A short hash of a dataset's annotation and split files (with ``qa``,
    also its question files under ``qa/``): what a run records about the data
    it trained on (media files are not hashed)."""
    root = Path(root)
    h = hashlib.sha256()
    splits = sorted(f"splits/{p.name}" for p in (root / "splits").glob("*.txt"))
    questions = sorted(f"qa/{p.name}" for p in (root / "qa").glob("*.json")) if qa else []
    for name in ("annotations.json", "dataset.json", *splits, *questions):
        if (root / name).is_file():
            h.update(name.encode())
            h.update((root / name).read_bytes())
    return h.hexdigest()[:16]


def available_splits(root) -> list[str]:
    """The split names a dataset folder defines (split files, or the splits
    named in its annotations); empty when it has no readable annotations."""
    root = Path(root)
    names = {p.stem for p in (root / "splits").glob("*.txt")}
    for name, key in (("annotations.json", "videos"), ("dataset.json", "images")):
        try:
            entries = json.loads((root / name).read_text()).get(key, [])
            names |= {e["split"] for e in entries if isinstance(e, dict) and isinstance(e.get("split"), str)}
        except (OSError, ValueError, AttributeError):
            pass
    if "restval" in names:
        names.add("train")  # Karpathy's train includes restval
    return sorted(names)


def read_msrvtt(root, split: str) -> list[Record]:
    """Records of one split of an MSR-VTT style ``annotations.json``.

    Split membership comes from ``splits/{split}.txt`` if present, otherwise
    from each video's ``split`` field. Video files are at ``file`` or
    ``videos/{video_id}.mp4``.
    """
    root = Path(root)
    path = root / "annotations.json"
    ann = _load_json(path)
    videos = _need(ann, "videos", "the top level", path, list)
    sentences = _need(ann, "sentences", "the top level", path, list)
    caps: dict[str, list[str]] = {}
    for i, s in enumerate(sentences):
        vid = str(_need(s, "video_id", f"sentence entry {i}", path, (str, int)))
        caps.setdefault(vid, []).append(_need(s, "caption", f"sentence entry {i}", path, str))
    split_file = root / "splits" / f"{split}.txt"
    wanted = None
    if split_file.is_file():
        wanted = {ln.strip() for ln in split_file.read_text().splitlines() if ln.strip()}
    records = []
    for i, v in enumerate(videos):
        vid = str(_need(v, "video_id", f"video entry {i}", path, (str, int)))
        if wanted is not None:
            if vid not in wanted:
                continue
        elif _need(v, "split", f"video entry {i}", path) != split:
            continue
        path_ = root / (v.get("file") or f"videos/{vid}.mp4")
        if "file" not in v and not path_.exists() and (root / "videos" / "all" / f"{vid}.mp4").exists():
            path_ = root / "videos" / "all" / f"{vid}.mp4"  # the usual MSR-VTT download layout
        records.append(Record(vid, path_, caps.get(vid, []), split))
    return records


def read_karpathy(root, split: str, image_dir=None) -> list[Record]:
    """Records of one split of a Karpathy ``dataset.json`` (train includes ``restval``).

    Image path is ``root/filepath/filename`` (or ``image_dir/filepath/filename``).
    """
    root = Path(root)
    path = root / "dataset.json"
    data = _load_json(path)
    base = Path(image_dir) if image_dir is not None else root
    splits = {"train", "restval"} if split == "train" else {split}
    records = []
    for i, im in enumerate(_need(data, "images", "the top level", path, list)):
        if _need(im, "split", f"image entry {i}", path, str) not in splits:
            continue
        fname = _need(im, "filename", f"image entry {i}", path, str)
        caps = []
        for j, s in enumerate(_need(im, "sentences", f"image entry {i}", path, list)):
            where = f"image entry {i} sentence {j}"
            if isinstance(s, dict) and s.get("raw") is not None:
                caps.append(_need(s, "raw", where, path, str))
            else:
                # Some dumps only keep tokens; rebuild the sentence from them.
                tokens = _need(s, "tokens", where, path, list)
                if not all(isinstance(t, str) for t in tokens):
                    raise ValueError(f"{path.name}: {where}: 'tokens' must be a list of strings (file {path})")
                caps.append(" ".join(tokens))
        records.append(Record(Path(fname).stem, base / im.get("filepath", "") / fname, caps, split))
    return records


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTS


def _load_media(job: tuple):
    """(index, frames or None, error or None, frames in the file); never
    raises, so a pool survives bad files."""
    i, path, frames, size = job
    try:
        if _is_image(Path(path)):
            arr, n = read_image(path, size)[None], 1
        else:
            arr, n = decode_video(path, frames, size)
        return i, np.ascontiguousarray(arr.transpose(0, 3, 1, 2)), None, n
    except MediaError as e:
        return i, None, str(e), 0


class VideoTextDataset(Dataset):
    """Media + captions of one split; images are one-frame videos.

    Items are dicts ``video`` (uint8 ``[T, 3, H, W]``; T=1 for images),
    ``captions`` (list of str), ``item_id`` and ``index``.
    """

    def __init__(self, root, split: str, frames: int = 4, size: int = 64, layout: str = "auto",
                 skip_bad: bool = False, cache: bool = True, progress: bool = True,
                 workers: int | None = None):
        """Read the annotations and (``cache=True``) decode every file once into memory."""
        self.root, self.split, self.frames, self.size = Path(root), split, frames, size
        self.skip_bad, self.cache = skip_bad, cache
        if layout == "auto":
            layout = "msrvtt" if (self.root / "annotations.json").is_file() else "karpathy"
        if layout == "msrvtt":
            records = read_msrvtt(self.root, split)
        elif layout == "karpathy":
            records = read_karpathy(self.root, split)
        else:
            raise ValueError(f"layout must be 'auto', 'msrvtt' or 'karpathy', got {layout!r}")
        self.layout = layout
        self.fingerprint = dataset_fingerprint(self.root)
        self.skipped: list[tuple[Path, str]] = []
        self.padded = 0  # videos with fewer than `frames` frames (their last frame repeated)
        self.videos: torch.Tensor | None = None
        workers = workers if workers is not None else min(2, os.cpu_count() or 1)
        if cache or skip_bad:
            # Without cache, skip_bad still needs one decode pass to know what is bad.
            arrays = self._decode_all(records, workers, progress)
            keep = [i for i, a in enumerate(arrays) if a is not None]
            if cache and keep:
                self.videos = torch.from_numpy(self._stack([arrays[i] for i in keep]))
            records = [records[i] for i in keep]
        self.records = records
        self._load_world()

    @staticmethod
    def _stack(arrays: list[np.ndarray]) -> np.ndarray:
        # A split may mix images and videos (T=1 vs T=frames); repeat to the max T.
        t = max(a.shape[0] for a in arrays)
        return np.stack([a if a.shape[0] == t else np.concatenate([a, np.repeat(a[-1:], t - a.shape[0], 0)])
                         for a in arrays])

    def _decode_all(self, records: list[Record], workers: int, progress: bool) -> list:
        jobs = [(i, str(r.path), self.frames, self.size) for i, r in enumerate(records)]
        arrays: list = [None] * len(jobs)
        bar = tqdm(total=len(jobs), desc=f"decoding {self.split}", disable=not progress, unit="item")

        def take(result):
            i, arr, err, n = result
            bar.update()
            if err is None:
                arrays[i] = arr
                self.padded += not _is_image(records[i].path) and n < self.frames
            elif self.skip_bad:
                self.skipped.append((records[i].path, err))
                log.warning("skipping unreadable media: %s", err)
            else:
                bar.close()
                raise MediaError(err)

        if workers > 1 and len(jobs) >= _PARALLEL_MIN_ITEMS:
            ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
            with ctx.Pool(workers) as pool:
                for result in pool.imap(_load_media, jobs, chunksize=16):
                    take(result)
        else:
            for job in jobs:
                take(_load_media(job))
        bar.close()
        if self.skipped:
            log.warning("%s/%s: skipped %d of %d items", self.root, self.split, len(self.skipped), len(jobs))
        return arrays

    def _load_world(self) -> None:
        """Group ids and held-out flags from ``world.json`` (synthetic data only)."""
        path = self.root / "world.json"
        meta = {}
        if path.is_file():
            meta = json.loads(path.read_text()).get("items", {})
        self.groups = [meta.get(r.item_id, {}).get("group") for r in self.records]
        self.heldout = [meta.get(r.item_id, {}).get("heldout") for r in self.records]
        self.scenes = [meta.get(r.item_id, {}).get("scene") for r in self.records]

    def __len__(self) -> int:
        """Number of (readable) items."""
        return len(self.records)

    def load(self, i: int) -> torch.Tensor:
        """uint8 ``[T, 3, H, W]`` of item ``i``, from the cache or decoded now."""
        if self.videos is not None:
            return self.videos[i]
        _, arr, err, _ = _load_media((i, str(self.records[i].path), self.frames, self.size))
        if err is not None:
            raise MediaError(err)
        return torch.from_numpy(arr)

    def __getitem__(self, i: int) -> dict:
        """``dict(video=uint8 [T,3,H,W], captions=list[str], item_id=str, index=i)``."""
        r = self.records[i]
        return {"video": self.load(i), "captions": list(r.captions), "item_id": r.item_id, "index": i}

    def caption_pairs(self) -> list[tuple[int, str]]:
        """Every ``(item_index, caption)`` pair, for text-to-video retrieval."""
        return [(i, c) for i, r in enumerate(self.records) for c in r.captions]
