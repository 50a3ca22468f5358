"""A gallery index on disk: video and caption embeddings, and which encoder made them.

An index is a folder::

    INDEX/
      videos.faiss     faiss index of the video embeddings (rows = items)
      captions.faiss   faiss index of the caption embeddings (rows = captions)
      meta.json        format tag and version, the faiss version that wrote it,
                       index params, the encoder's config and weights checksum,
                       item ids, caption texts, the item of each caption,
                       the dimension, and each .faiss file's size and sha256

Embeddings are only comparable with queries from the very same encoder, so
an index remembers the encoder's config and a checksum of its weights, and
refuses to load for another one. It is written under a temporary name and
renamed into place, so a save that is interrupted leaves the previous index
as it was.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import torch

from ..checkpoint import weights_checksum  # noqa: F401  (re-exported)
from ..files import atomic_write_json, ensure_writable_dir, pid_alive, remove_stale_temporaries
from .store import IndexParams, VectorIndex, VectorIndexError

FORMAT = "slimvl-index"
VERSION = 1
FILES = ("videos.faiss", "captions.faiss")
REBUILD = "rebuild it with `slimvl index build`"


class GalleryIndexError(ValueError):
    """An index folder that is not ours, is damaged, or belongs to another encoder."""


@dataclass
class Hits:
    """Search results: ``scores`` float32 [q, k] (cosine, best first) and
    ``rows`` int64 [q, k] (row numbers into the searched collection)."""

    scores: np.ndarray
    rows: np.ndarray


def _major_minor(version: str) -> tuple[str, ...]:
    return tuple(str(version).split(".")[:2])


def _is_index_folder(path: Path) -> bool:
    try:
        return json.loads((path / "meta.json").read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


@dataclass
class GalleryIndex:
    """Video and caption indexes of one gallery, with their ids and encoder.

    ``videos`` holds ``len(items)`` rows, ``captions`` ``len(captions_text)``
    rows; caption ``j`` describes item ``caption_item[j]``.
    """

    videos: VectorIndex
    captions: VectorIndex
    items: list[str]
    captions_text: list[str]
    caption_item: list[int]
    encoder_config: dict
    checksum: str
    params: IndexParams

    @property
    def dim(self) -> int:
        """Embedding dimension ``d``."""
        return self.videos.dim

    @classmethod
    def build(cls, video_emb: np.ndarray | torch.Tensor, caption_emb: np.ndarray | torch.Tensor, items: list[str],
              captions_text: list[str], caption_item: list[int], encoder_config: dict, checksum: str,
              params: IndexParams | None = None) -> GalleryIndex:
        """Index ``video_emb`` [n_items, d] and ``caption_emb`` [n_captions, d].

        ``items`` names the rows of ``video_emb``; ``captions_text`` and
        ``caption_item`` (an item row each) describe the rows of ``caption_emb``.
        """
        params = params or IndexParams()
        shapes = {"video_emb": tuple(np.shape(video_emb)), "caption_emb": tuple(np.shape(caption_emb))}
        for name, shape in shapes.items():
            if len(shape) != 2:
                raise GalleryIndexError(f"{name} must be 2-D [n, d], got shape {shape}")
        (n_items, d), (n_caps, d_caps) = shapes["video_emb"], shapes["caption_emb"]
        if d != d_caps:
            raise GalleryIndexError(f"video_emb {shapes['video_emb']} and caption_emb {shapes['caption_emb']} "
                                    "must have the same dimension d")
        if len(items) != n_items:
            raise GalleryIndexError(f"items has {len(items)} ids but video_emb has {n_items} rows")
        if len(captions_text) != n_caps:
            raise GalleryIndexError(f"captions_text has {len(captions_text)} texts but caption_emb has {n_caps} rows")
        if len(caption_item) != n_caps:
            raise GalleryIndexError(f"caption_item has {len(caption_item)} entries but caption_emb has {n_caps} rows")
        bad = [j for j in caption_item if not isinstance(j, (int, np.integer)) or not 0 <= j < n_items]
        if bad:
            raise GalleryIndexError(f"caption_item must hold item rows in [0, {n_items}), got e.g. {bad[:5]}")
        try:
            json.dumps(encoder_config)
        except (TypeError, ValueError) as e:
            raise GalleryIndexError(f"encoder_config must be JSON data: {e}") from None
        built = {}
        for name, emb in (("video_emb", video_emb), ("caption_emb", caption_emb)):
            try:
                built[name] = VectorIndex.build(emb, params)
            except VectorIndexError as e:
                raise GalleryIndexError(f"{name}: {e}") from None
        return cls(built["video_emb"], built["caption_emb"], [str(i) for i in items], [str(c) for c in captions_text],
                   [int(j) for j in caption_item], dict(encoder_config), str(checksum), params)

    def search_text(self, query_emb: np.ndarray | torch.Tensor, k: int) -> Hits:
        """Text-to-video: the ``k`` best items for each text query [q, d]."""
        return Hits(*self.videos.search(query_emb, k))

    def search_video(self, query_emb: np.ndarray | torch.Tensor, k: int) -> Hits:
        """Video-to-text: the ``k`` best captions for each video query [q, d]."""
        return Hits(*self.captions.search(query_emb, k))

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the index folder ``path`` atomically; returns ``path``.

        An existing index is replaced only with ``overwrite``; anything else
        at ``path`` (other than an empty folder) is never replaced.
        """
        path = Path(path)
        parent = ensure_writable_dir(path.parent, "index's parent folder")
        _recover_interrupted(path)
        remove_stale_temporaries(parent, glob.escape(path.name))
        if path.exists() or path.is_symlink():
            empty = path.is_dir() and not path.is_symlink() and not any(path.iterdir())
            if not empty and not _is_index_folder(path):
                raise GalleryIndexError(f"{path} exists and is not a slimvl index; refusing to replace it "
                                        "(remove it or choose another path)")
            if not empty and not overwrite:
                raise GalleryIndexError(f"{path}: an index already exists there; pass overwrite=True "
                                        "(--overwrite) to replace it")
        tmp = parent / f".{path.name}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        old = parent / f"{path.name}.old-{os.getpid()}"
        try:
            files = {}
            for name, index in zip(FILES, (self.videos, self.captions)):
                data = index.to_bytes()
                (tmp / name).write_bytes(data)
                files[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            atomic_write_json(tmp / "meta.json", {
                "format": FORMAT, "version": VERSION, "faiss_version": faiss.__version__,
                "params": self.params.to_dict(), "encoder": {"config": self.encoder_config, "checksum": self.checksum},
                "items": self.items, "captions": self.captions_text, "caption_item": self.caption_item,
                "dim": self.dim, "files": files})
            # A folder cannot be renamed onto a non-empty one: move the old
            # index aside first, so that there is always one whole index.
            if path.exists() or path.is_symlink():
                os.replace(path, old)
            os.replace(tmp, path)
        except BaseException:
            if (old.exists() or old.is_symlink()) and not (path.exists() or path.is_symlink()):
                os.replace(old, path)
            shutil.rmtree(tmp, ignore_errors=True)  # Ctrl-C or a full disk leaves nothing half-written
            raise
        if old.is_symlink() or old.is_file():
            old.unlink()
        elif old.exists():
            shutil.rmtree(old)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, expect_checksum: str | None = None, expect_config: dict | None = None,
             device: str | None = None) -> GalleryIndex:
        """Read and check an index folder written by :meth:`save`.

        ``expect_checksum`` / ``expect_config``: the encoder that will embed
        the queries; an index from another one is refused. ``device``
        overrides the saved ``params.device`` ("cpu" or "cuda").
        """
        path = Path(path)
        meta = read_meta(path)
        enc = meta["encoder"]
        if expect_checksum is not None and enc["checksum"] != expect_checksum:
            raise GalleryIndexError(f"{path}: the index was built by another encoder (weights checksum "
                                    f"{enc['checksum'][:12]}, this encoder's is {expect_checksum[:12]}); {REBUILD}")
        if expect_config is not None:
            ours = json.loads(json.dumps(expect_config))  # tuples -> lists, as stored
            diff = sorted(k for k in set(ours) | set(enc["config"]) if ours.get(k) != enc["config"].get(k))
            if diff:
                raise GalleryIndexError(f"{path}: the index was built by an encoder of another config "
                                        f"(differs in {diff}); {REBUILD}")
        try:
            params = IndexParams.from_dict({**meta["params"], **({"device": device} if device else {})})
        except (VectorIndexError, TypeError) as e:
            raise GalleryIndexError(f"{path / 'meta.json'}: invalid params ({e})") from None
        indexes = []
        for name, rows in zip(FILES, (len(meta["items"]), len(meta["captions"]))):
            f = path / name
            expected = meta["files"][name]
            try:
                data = f.read_bytes()
            except OSError as e:
                raise GalleryIndexError(f"{f}: missing or unreadable ({e.strerror or e}); {REBUILD}") from None
            if len(data) != expected["bytes"]:
                raise GalleryIndexError(f"{f}: truncated or changed ({len(data)} bytes, expected "
                                        f"{expected['bytes']}); {REBUILD}")
            if hashlib.sha256(data).hexdigest() != expected["sha256"]:
                raise GalleryIndexError(f"{f}: damaged (sha256 does not match meta.json); {REBUILD}")
            try:
                index = VectorIndex.from_bytes(data, params)
            except VectorIndexError as e:
                raise GalleryIndexError(f"{f}: {e}") from None
            if index.ntotal != rows or index.dim != meta["dim"]:
                raise GalleryIndexError(f"{f}: holds {index.ntotal} vectors of dim {index.dim}, meta.json "
                                        f"describes {rows} of dim {meta['dim']}")
            indexes.append(index)
        return cls(indexes[0], indexes[1], meta["items"], meta["captions"], meta["caption_item"], enc["config"],
                   enc["checksum"], params)


def read_meta(path: Path) -> dict:
    """Read and check an index folder's meta.json; raise :class:`GalleryIndexError`
    if the folder is not a slimvl index, or was written by another faiss."""
    path = Path(path)
    if not path.is_dir():
        olds = sorted(path.parent.glob(f"{glob.escape(path.name)}.old-*"))
        hint = f" (an interrupted save left the previous index at {olds[0]})" if olds else ""
        raise GalleryIndexError(f"{path}: no such index folder{hint}")
    f = path / "meta.json"
    if not f.is_file():
        raise GalleryIndexError(f"{path}: not a slimvl index (no meta.json)")
    try:
        meta = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise GalleryIndexError(f"{f}: unreadable JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise GalleryIndexError(f"{f}: not a slimvl index (format is {found!r}, expected {FORMAT!r})")
    if meta.get("version") != VERSION:
        raise GalleryIndexError(f"{f}: index version {meta.get('version')!r} is not supported (expected {VERSION}); "
                                f"{REBUILD}")
    written = str(meta.get("faiss_version"))
    if _major_minor(written) != _major_minor(faiss.__version__):
        raise GalleryIndexError(f"{f}: the index was written by faiss {written}, this is faiss {faiss.__version__}; "
                                f"{REBUILD}")
    try:
        enc, files = meta["encoder"], meta["files"]
        ok = (isinstance(enc["config"], dict) and isinstance(enc["checksum"], str) and isinstance(meta["dim"], int)
              and all(isinstance(files[n]["bytes"], int) and isinstance(files[n]["sha256"], str) for n in FILES)
              and all(isinstance(meta[k], list) for k in ("items", "captions", "caption_item"))
              and len(meta["captions"]) == len(meta["caption_item"]))
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise GalleryIndexError(f"{f}: incomplete or inconsistent (missing encoder, files, dim, items, captions "
                                f"or caption_item); {REBUILD}")
    return meta


def _recover_interrupted(path: Path) -> None:
    """Put back an index that a killed save had moved aside (``NAME.old-<pid>``)
    before its replacement was renamed into place."""
    if path.exists() or path.is_symlink():
        return
    for old in sorted(path.parent.glob(f"{glob.escape(path.name)}.old-*")):
        pid = old.name.rsplit("-", 1)[-1]
        # A live writer is between its two renames and will finish the job.
        if pid.isdigit() and not pid_alive(int(pid)) and _is_index_folder(old) and not old.is_symlink():
            os.replace(old, path)
            return
