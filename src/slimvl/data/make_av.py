"""Write the audio-video world to disk in the AudioSet layout.

``make_dataset(root, kind="audio-video")`` lands here (``make.py`` keeps the
shared guarantees: the temporary folder, the ``DONE`` marker, reuse and
refusal). The folder holds::

    class_labels_indices.csv       index,mid,display_name (6 shapes, 7 colours)
    {split}_segments.csv           # YTID, start_seconds, end_seconds, positive_labels
    {split}_statements.csv         # YTID, statement, answer
    clips/{ytid}.mp4               H.264 frames + AAC sound track
    world.json                     each clip's scene, split, statement, answer
    tokenizer.json                 trained on the train statements

for the splits train, val and test. Every clip comes from
``av_world.sample_statement_clip``, so the statements' answers are balanced
and every clip can serve both tasks (tagging and statements).
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np

from . import av_world as AV
from .audio import write_clip
from .av_dataset import STATEMENTS_HEADER
from .sound import SAMPLE_RATE
from .tokenizer import Tokenizer
from .world import render

KIND = "audio-video"
SPLITS = ("train", "val", "test")


def av_params(seed, n_train, n_val, n_test, frames, size, seconds, version: int) -> dict:
    """The parameters that fully describe an audio-video dataset (what
    ``DONE`` records): captions and near-duplicate groups do not apply."""
    return {"kind": KIND, "seed": int(seed), "n_train": int(n_train), "n_val": int(n_val), "n_test": int(n_test),
            "frames": int(frames), "size": int(size), "seconds": float(seconds), "version": int(version)}


def check_av_params(params: dict) -> None:
    """Raise ``ValueError`` naming the first parameter that cannot be honoured."""
    def fail(name: str, why: str) -> None:
        raise ValueError(f"{name}={params[name]!r}: {why}")

    for name in ("n_train", "n_val", "n_test", "frames", "size"):
        if isinstance(params[name], bool) or not isinstance(params[name], int):
            fail(name, "must be an integer")
    if params["n_train"] < 1:
        fail("n_train", "must be >= 1 (clips to train on)")
    for name in ("n_val", "n_test"):
        if params[name] < 0:
            fail(name, "must be >= 0")
    if params["frames"] < 1:
        fail("frames", "must be >= 1 (frames per clip on disk)")
    if params["size"] < 16 or params["size"] % 2:
        fail("size", "must be even (H.264 with 4:2:0 chroma) and >= 16 pixels")
    seconds = params["seconds"]
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) \
            or seconds <= 0:
        fail("seconds", "must be a positive number (length of each clip)")


def _sample_items(params: dict) -> list[dict]:
    """Every clip of every split: id, split, scene, statement, answer and the
    seed of its sound's phases. Each split has its own generator, so changing
    ``n_test`` leaves the train clips as they were."""
    items = []
    for s_idx, split in enumerate(SPLITS):
        rng = np.random.default_rng([params["seed"], s_idx, 4321])
        for _ in range(params[f"n_{split}"]):
            av, text, answer = AV.sample_statement_clip(rng)
            items.append({"ytid": f"clip{len(items):06d}", "split": split, "scene": av, "statement": text,
                          "answer": answer, "sound_seed": int(rng.integers(2**31 - 1))})
    return items


def write_av_clip(job: tuple) -> None:
    """Render one clip's frames and sound and write its MP4 (a pool job)."""
    scene_dict, path, frames, size, seconds, sound_seed = job
    av = AV.AVScene.from_dict(scene_dict)
    video = render(av.scene, frames, size)  # the motion spread over `frames` frames, as for video-text
    audio = AV.soundtrack(av, seconds, np.random.default_rng(sound_seed), SAMPLE_RATE)
    write_clip(path, video, audio, fps=frames / seconds, sample_rate=SAMPLE_RATE)


def _csv_line(fields: list, quoting: int = csv.QUOTE_MINIMAL) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n", quoting=quoting).writerow(fields)
    return buf.getvalue()


def _segments_text(items: list[dict], split: str, params: dict) -> str:
    """A segments CSV as AudioSet ships them: comment lines, then
    ``ytid, 0.000, 2.000, "mid,mid"`` rows."""
    rows, mids_used, n_labels = [], set(), 0
    for it in items:
        mids = [AV.CLASSES[k].mid for k in AV.av_labels(it["scene"])]
        mids_used.update(mids)
        n_labels += len(mids)
        rows.append(f'{it["ytid"]}, 0.000, {params["seconds"]:.3f}, "{",".join(mids)}"\n')
    head = (f"# Segments csv created by slimvl.data.make_av: synthetic audio-video world, seed {params['seed']}, "
            f"split {split}\n"
            f"# num_ytids={len(items)}, num_segs={len(items)}, num_unique_labels={len(mids_used)}, "
            f"num_positive_labels={n_labels}\n"
            "# YTID, start_seconds, end_seconds, positive_labels\n")
    return head + "".join(rows)


def _statements_text(items: list[dict]) -> str:
    """``ytid, "statement", answer`` rows under their header (statements quoted, as labels are)."""
    rows = [f'{it["ytid"]}, {_csv_line([it["statement"]], csv.QUOTE_ALL).strip()}, {it["answer"]}\n'
            for it in items]
    return STATEMENTS_HEADER + "\n" + "".join(rows)


def _classes_text() -> str:
    return "index,mid,display_name\n" + "".join(_csv_line([c.index, c.mid, c.name]) for c in AV.CLASSES)


def write_av(tmp: Path, params: dict, progress: bool, workers: int, desc: str, run_jobs) -> None:
    """Generate the whole dataset that ``params`` describe into ``tmp``;
    ``run_jobs(jobs, workers, progress, desc, fn)`` writes the clips."""
    items = _sample_items(params)
    clips = tmp / "clips"
    clips.mkdir(parents=True)
    jobs = [(it["scene"].to_dict(), str(clips / f"{it['ytid']}.mp4"), params["frames"], params["size"],
             params["seconds"], it["sound_seed"]) for it in items]
    run_jobs(jobs, workers, progress, desc, write_av_clip)

    (tmp / "class_labels_indices.csv").write_text(_classes_text())
    for split in SPLITS:
        part = [it for it in items if it["split"] == split]
        (tmp / f"{split}_segments.csv").write_text(_segments_text(part, split, params))
        (tmp / f"{split}_statements.csv").write_text(_statements_text(part))
    world = {"items": {it["ytid"]: {"scene": it["scene"].to_dict(), "split": it["split"],
                                    "statement": it["statement"], "answer": it["answer"],
                                    "sound_seed": it["sound_seed"]} for it in items},
             "classes": [c.mid for c in AV.CLASSES], "answers": list(AV.ANSWERS), "params": params,
             "format": "audioset", "generator": "slimvl.data.av_world", "sample_rate": SAMPLE_RATE}
    (tmp / "world.json").write_text(json.dumps(world))
    train = [it["statement"] for it in items if it["split"] == "train"]
    Tokenizer.train(train or [""]).save(tmp / "tokenizer.json")
    # The marker is written last: its presence means everything else is complete.
    (tmp / "DONE").write_text(json.dumps(params))


__all__ = ["KIND", "SPLITS", "av_params", "check_av_params", "write_av", "write_av_clip"]
