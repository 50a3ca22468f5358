"""Write the synthetic world to disk in standard layouts (MSR-VTT, Karpathy, AudioSet).

Downstream code only ever sees the standard layout, so the same readers work
for synthetic and real data. ``world.json`` carries the extra synthetic
metadata (near-duplicate groups, held-out flags) that evaluation can use.
"""

from __future__ import annotations

import glob
import json
import multiprocessing as mp
import os
import re
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..files import ensure_writable_dir, remove_stale_temporaries
from . import make_av
from . import world as W
from .media import write_video
from .tokenizer import Tokenizer

FORMAT_VERSION = 1
KINDS = ("video-text", "image-text", "audio-video")
# The file that makes a folder a dataset of each kind (with world.json and DONE).
MAIN_FILE = {"video-text": "annotations.json", "image-text": "dataset.json",
             "audio-video": "class_labels_indices.csv"}
_PARALLEL_MIN_ITEMS = 64  # below this a worker pool costs more than it saves


def _params(kind, seed, n_train, n_val, n_test, group_size, frames, size, captions_per_item,
            test_captions, heldout_fraction_test) -> dict:
    return {"kind": kind, "seed": int(seed), "n_train": int(n_train), "n_val": int(n_val),
            "n_test": int(n_test), "group_size": int(group_size), "frames": int(frames),
            "size": int(size), "captions_per_item": int(captions_per_item),
            "test_captions": int(test_captions), "heldout_fraction_test": float(heldout_fraction_test),
            "version": FORMAT_VERSION}


def check_params(params: dict) -> None:
    """Raise ``ValueError`` naming the first parameter ``make_dataset`` cannot
    honour, before anything is written."""
    if params["kind"] == make_av.KIND:
        return make_av.check_av_params(params)

    def fail(name: str, why: str) -> None:
        raise ValueError(f"{name}={params[name]!r}: {why}")

    for name in ("n_train", "n_val", "n_test", "group_size", "frames", "size", "captions_per_item",
                 "test_captions"):
        if isinstance(params[name], bool) or not isinstance(params[name], int):
            fail(name, "must be an integer")
    if params["group_size"] < 1:
        fail("group_size", "must be >= 1 (items per near-duplicate group)")
    if params["n_train"] < params["group_size"]:
        fail("n_train", f"must be at least one near-duplicate group (group_size={params['group_size']}) "
                        "to train on")
    for name in ("n_val", "n_test"):
        if params[name] < 0:
            fail(name, "must be >= 0")
    if params["frames"] < 1:
        fail("frames", "must be >= 1 (frames per video on disk)")
    if params["size"] < 16:
        fail("size", "must be >= 16 pixels (objects are drawn at 17% and 30% of the canvas)")
    if params["kind"] == "video-text" and params["size"] % 2:
        fail("size", "must be even for video (H.264 with 4:2:0 chroma needs even sides)")
    for name in ("captions_per_item", "test_captions"):
        if params[name] < 1:
            fail(name, "must be >= 1")
    if not 0.0 <= params["heldout_fraction_test"] <= 1.0:
        fail("heldout_fraction_test", "must be in [0, 1]")


def read_done(folder) -> dict | None:
    """The parameters recorded in ``folder/DONE`` (written last by the
    writers of datasets and question sets), or None if there is none."""
    try:
        recorded = json.loads((Path(folder) / "DONE").read_text())
    except (OSError, ValueError):
        return None
    return recorded if isinstance(recorded, dict) else None


def param_changes(recorded: dict, wanted: dict) -> str:
    """``"n_train 16 -> 20, seed 0 -> 1"``: the wanted parameters that differ
    from the recorded ones."""
    return ", ".join(f"{k} {recorded.get(k)!r} -> {v!r}" for k, v in wanted.items() if recorded.get(k) != v)


def dataset_is_valid(root, **params) -> bool:
    """True if ``root`` is a completely written dataset made with these params.

    Only the params passed are compared, so ``dataset_is_valid(root)`` just
    checks that a finished dataset is there.
    """
    root = Path(root)
    recorded = read_done(root)
    if recorded is None:
        return False
    main = MAIN_FILE.get(recorded.get("kind"), "dataset.json")
    if not (root / main).is_file() or not (root / "world.json").is_file():
        return False
    for k, v in params.items():
        if k not in recorded:
            return False
        if isinstance(v, float) or isinstance(recorded[k], float):
            if abs(float(recorded[k]) - float(v)) > 1e-9:
                return False
        elif recorded[k] != v:
            return False
    return True


def _split_scenes(rng, n_items: int, group_size: int, heldout: set, heldout_fraction: float,
                  with_motion: bool) -> list[tuple[W.Scene, int, bool]]:
    """(scene, group index within split, forced-heldout group) for ``n_items`` items."""
    n_groups = -(-n_items // group_size) if n_items else 0
    n_held = int(round(heldout_fraction * n_groups))
    held_groups = set(rng.choice(n_groups, size=n_held, replace=False).tolist()) if n_held else set()
    out = []
    for g in range(n_groups):
        group = W.near_duplicate_group(rng, group_size, heldout, must_include_heldout=g in held_groups,
                                       with_motion=with_motion)
        out.extend((s, g, g in held_groups) for s in group)
    return out[:n_items]


def _captions(scene: W.Scene, rng, n: int, with_motion: bool) -> list[str]:
    """``n`` captions, distinct where the template space allows."""
    caps: list[str] = []
    for _ in range(20 * n):
        c = W.caption(scene, rng, with_motion)
        if c not in caps:
            caps.append(c)
        if len(caps) == n:
            break
    while len(caps) < n:
        caps.append(W.caption(scene, rng, with_motion))
    return caps


def _write_item(job: tuple) -> None:
    scene_dict, path, frames, size, kind = job
    scene = W.Scene.from_dict(scene_dict)
    if kind == "video-text":
        write_video(path, W.render(scene, frames, size))
    else:
        Image.fromarray(W.render(scene, 1, size)[0]).save(path, compress_level=1)


def _run_jobs(jobs: list[tuple], workers: int, progress: bool, desc: str, fn=_write_item) -> None:
    """``fn(job)`` for every job, in a fork pool of ``workers`` when it pays."""
    bar = tqdm(total=len(jobs), desc=desc, disable=not progress, unit="item")
    if workers > 1 and len(jobs) >= _PARALLEL_MIN_ITEMS:
        # fork: workers need no re-imports (spawn would re-import torch per worker).
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
        with ctx.Pool(workers) as pool:
            for _ in pool.imap_unordered(fn, jobs, chunksize=16):
                bar.update()
    else:
        for job in jobs:
            fn(job)
            bar.update()
    bar.close()


def _word_tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def make_dataset(root, kind: str = "video-text", seed: int = 0, n_train: int = 4000, n_val: int = 200,
                 n_test: int = 100, group_size: int = 4, frames: int = 8, size: int = 64,
                 captions_per_item: int = 2, heldout_fraction_test: float = 0.4, test_captions: int = 1,
                 progress: bool = True, workers: int | None = None, fps: int = 8, overwrite: bool = False,
                 seconds: float = 2.0) -> Path:
    """Generate (or reuse) a synthetic dataset at ``root`` and return ``root``.

    ``kind="video-text"`` writes the MSR-VTT layout (``annotations.json``,
    ``splits/*.txt``, ``videos/*.mp4``); ``"image-text"`` writes the Karpathy
    layout (``dataset.json``, ``images/*.png``); ``"audio-video"`` the
    AudioSet layout (``slimvl.data.make_av``: ``seconds``-long MP4s with a
    sound track, multi-label segments, statements; groups, captions and
    ``fps`` do not apply). All add ``world.json`` and a ``tokenizer.json``
    trained on the train captions (statements). Video and image splits are
    made of near-duplicate groups of ``group_size``; train never contains held-out
    (shape, colour, motion) triples, about ``heldout_fraction_test`` of
    val/test groups do. A valid existing dataset with equal params is reused.
    Anything else already at ``root`` is refused, naming the parameters that
    differ, unless ``overwrite``: a dataset (and its tokenizer) is never
    replaced silently. The new one is built in ``root.tmp-<pid>`` and renamed
    into place; temporaries that a killed run left are removed first.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    root = Path(root)
    if kind == make_av.KIND:
        check_params(dict(kind=kind, n_train=n_train, n_val=n_val, n_test=n_test, frames=frames, size=size,
                          seconds=seconds))
        params = make_av.av_params(seed, n_train, n_val, n_test, frames, size, seconds, FORMAT_VERSION)
    else:
        check_params(dict(kind=kind, n_train=n_train, n_val=n_val, n_test=n_test, group_size=group_size,
                          frames=frames, size=size, captions_per_item=captions_per_item, test_captions=test_captions,
                          heldout_fraction_test=heldout_fraction_test))
        params = _params(kind, seed, n_train, n_val, n_test, group_size, frames, size, captions_per_item,
                         test_captions, heldout_fraction_test)
    if dataset_is_valid(root, **params):
        return root
    if root.exists() and not overwrite:
        _refuse_to_replace(root, params)
    ensure_writable_dir(root.parent, "folder of the dataset")
    remove_stale_temporaries(root.parent, glob.escape(root.name))
    workers = workers if workers is not None else min(2, os.cpu_count() or 1)
    tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        _write(tmp, params, progress, workers, fps, root.name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed or interrupted build leaves nothing behind
        raise
    try:
        if root.exists():
            old = root.with_name(f"{root.name}.old-{os.getpid()}")
            root.rename(old)
            tmp.rename(root)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(root)
    except OSError:
        # Another process finished the same dataset first: use theirs.
        if not dataset_is_valid(root, **params):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _refuse_to_replace(root: Path, params: dict) -> None:
    if root.is_dir() and not any(root.iterdir()):
        return  # an empty folder holds nothing to lose
    recorded = read_done(root)
    if recorded is None:
        raise ValueError(f"{root} exists and is not a finished slimvl dataset; refusing to replace it (remove it, "
                         "choose another folder, or pass --overwrite / overwrite=True)")
    changes = param_changes(recorded, params)
    what = f"a dataset made with other parameters ({changes})" if changes else \
        "an incomplete dataset (its annotations or world.json are missing)"
    raise ValueError(f"{root} holds {what}; refusing to replace it and its tokenizer: pass --overwrite "
                     "(overwrite=True) to rebuild it, or choose another folder")


def _write(tmp: Path, params: dict, progress: bool, workers: int, fps: int, name: str) -> None:
    """Generate the whole dataset that ``params`` describe into the folder ``tmp``."""
    if params["kind"] == make_av.KIND:
        return make_av.write_av(tmp, params, progress, workers, f"writing {make_av.KIND} to {name}", _run_jobs)
    kind, seed, group_size, frames, size = (params[k] for k in ("kind", "seed", "group_size", "frames", "size"))
    video = kind == "video-text"
    media_dir = tmp / ("videos" if video else "images")
    media_dir.mkdir(parents=True)

    heldout = W.heldout_combos(seed)
    items = []  # (item_id, index, split, scene, global group, heldout, captions)
    group_offset = 0
    for s_idx, (split, n, frac, n_caps) in enumerate((
            ("train", params["n_train"], 0.0, params["captions_per_item"]),
            ("val", params["n_val"], params["heldout_fraction_test"], params["test_captions"]),
            ("test", params["n_test"], params["heldout_fraction_test"], params["test_captions"]))):
        rng = np.random.default_rng([seed, s_idx, 1234])
        scenes = _split_scenes(rng, n, group_size, heldout, frac, video)
        for scene, g, _ in scenes:
            i = len(items)
            is_held = any(o.triple() in heldout for o in scene.objects)
            caps = _captions(scene, rng, n_caps, video)
            items.append(((f"video{i}" if video else f"img{i}"), i, split, scene, group_offset + g,
                          is_held, caps))
        group_offset += max((g for _, g, _ in scenes), default=-1) + 1

    ext = "mp4" if video else "png"
    jobs = [(it[3].to_dict(), str(media_dir / f"{it[0]}.{ext}"), frames, size, kind) for it in items]
    _run_jobs(jobs, workers, progress, f"writing {kind} to {name}")

    info = {**params, "format": "msrvtt" if video else "karpathy", "generator": "slimvl.data.world",
            "fps": fps}
    if video:
        ann = {"info": info,
               "videos": [{"video_id": it[0], "id": it[1], "split": it[2], "file": f"videos/{it[0]}.mp4"}
                          for it in items],
               "sentences": [{"video_id": it[0], "caption": c, "sen_id": 0} for it in items for c in it[6]]}
        for j, s in enumerate(ann["sentences"]):
            s["sen_id"] = j
        (tmp / "annotations.json").write_text(json.dumps(ann))
        (tmp / "splits").mkdir()
        for split in ("train", "val", "test"):
            ids = [it[0] for it in items if it[2] == split]
            (tmp / "splits" / f"{split}.txt").write_text("".join(f"{v}\n" for v in ids))
    else:
        images, sentid = [], 0
        for it in items:
            sents = []
            for c in it[6]:
                sents.append({"raw": c, "tokens": _word_tokens(c), "sentid": sentid, "imgid": it[1]})
                sentid += 1
            images.append({"imgid": it[1], "filepath": "images", "filename": f"{it[0]}.png",
                           "split": it[2], "sentences": sents, "sentids": [s["sentid"] for s in sents]})
        (tmp / "dataset.json").write_text(json.dumps({"dataset": "synthetic", "info": info, "images": images}))

    world_meta = {"items": {it[0]: {"scene": it[3].to_dict(), "group": it[4], "heldout": it[5],
                                    "split": it[2]} for it in items},
                  "heldout_combos": sorted(list(t) for t in heldout), "params": params}
    (tmp / "world.json").write_text(json.dumps(world_meta))
    train_caps = [c for it in items if it[2] == "train" for c in it[6]]
    Tokenizer.train(train_caps or [""]).save(tmp / "tokenizer.json")
    # The marker is written last: its presence means everything else is complete.
    (tmp / "DONE").write_text(json.dumps(params))
