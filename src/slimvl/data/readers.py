"""Readers for standard video-text (MSR-VTT) and image-text (Karpathy) layouts.

They work the same for real datasets and for what ``make_dataset`` writes;
synthetic extras (groups, held-out flags) come from an optional ``world.json``.
"""

from __future__ import annotations

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

from .media import MediaError, read_image, read_video

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


def _need(entry: dict, key: str, what: str, path: Path):
    if not isinstance(entry, dict) or key not in entry:
        raise ValueError(f"{path.name}: {what} has no '{key}' (file {path})")
    return entry[key]


def read_msrvtt(root, split: str) -> list[Record]:
    """Records of one split of an MSR-VTT style ``annotations.json``.

    Split membership comes from ``splits/{split}.txt`` if present, otherwise
    from each video's ``split`` field. Video files are at ``file`` or
    ``videos/{video_id}.mp4``.
    """
    root = Path(root)
    path = root / "annotations.json"
    ann = _load_json(path)
    videos = _need(ann, "videos", "the top level", path)
    sentences = _need(ann, "sentences", "the top level", path)
    caps: dict[str, list[str]] = {}
    for i, s in enumerate(sentences):
        vid = str(_need(s, "video_id", f"sentence entry {i}", path))
        caps.setdefault(vid, []).append(str(_need(s, "caption", f"sentence entry {i}", path)))
    split_file = root / "splits" / f"{split}.txt"
    wanted = None
    if split_file.is_file():
        wanted = {ln.strip() for ln in split_file.read_text().splitlines() if ln.strip()}
    records = []
    for i, v in enumerate(videos):
        vid = str(_need(v, "video_id", f"video entry {i}", path))
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
    for i, im in enumerate(_need(data, "images", "the top level", path)):
        if _need(im, "split", f"image entry {i}", path) not in splits:
            continue
        fname = _need(im, "filename", f"image entry {i}", path)
        caps = []
        for j, s in enumerate(_need(im, "sentences", f"image entry {i}", path)):
            raw = s.get("raw") if isinstance(s, dict) else None
            if raw is None:
                # Some dumps only keep tokens; rebuild the sentence from them.
                raw = " ".join(_need(s, "tokens", f"image entry {i} sentence {j}", path))
            caps.append(str(raw))
        records.append(Record(Path(fname).stem, base / im.get("filepath", "") / fname, caps, split))
    return records


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTS


def _load_media(job: tuple):
    """(index, frames or None, error or None); never raises, so a pool survives bad files."""
    i, path, frames, size = job
    try:
        if _is_image(Path(path)):
            arr = read_image(path, size)[None]
        else:
            arr = read_video(path, frames, size)
        return i, np.ascontiguousarray(arr.transpose(0, 3, 1, 2)), None
    except MediaError as e:
        return i, None, str(e)


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
        self.skipped: list[tuple[Path, str]] = []
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
            i, arr, err = result
            bar.update()
            if err is None:
                arrays[i] = arr
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
        _, arr, err = _load_media((i, str(self.records[i].path), self.frames, self.size))
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
