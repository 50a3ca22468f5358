"""Sound in the world (av_world), the audio-video dataset writer (AudioSet
layout) and its reader (AudioVideoDataset), including bad input."""
from __future__ import annotations

import json
import logging
import shutil
import wave
from collections import Counter

import numpy as np
import pytest
import torch

from slimvl.data import av_dataset, make_dataset
from slimvl.data.audio import LOG_FLOOR, decode_audio, log_mel, write_clip
from slimvl.data.audioset import read_audioset
from slimvl.data.av_dataset import AudioVideoDataset, read_statements
from slimvl.data.av_world import (ANSWERS, CLASSES, AVScene, av_labels, sample_av_scene, sample_statement_clip,
                                  soundtrack, statement, statement_answer)
from slimvl.data.make import _params, dataset_is_valid, read_done
from slimvl.data.media import MediaError, write_video
from slimvl.data.sound import PITCH, SAMPLE_RATE
from slimvl.data.world import COLOURS, SHAPES, Obj, Scene, render

TINY = dict(n_train=6, n_val=2, n_test=4, frames=4, size=32, seconds=1.0)
READ = dict(frames=4, size=32, seconds=1.0, progress=False)


# ------------------------------------------------------------------ the world


def _named(text: str) -> tuple[str, str]:
    """(shape, colour) of a statement: it ends with "... a <colour> <shape>"."""
    colour, shape = text.split()[-2:]
    return shape, colour


def test_av_scenes_keep_their_invariants():
    for seed in range(300):
        rng = np.random.default_rng(seed)
        av = sample_av_scene(rng, need_offscreen=seed % 3 == 0)
        pairs = [(o.shape, o.colour) for o in av.objects()]
        assert len(pairs) == len(set(pairs)), pairs
        assert 1 <= len(av.scene.objects) <= 3 and len(av.offscreen) <= 1
        assert av.heard(), "a clip always sounds"
        assert seed % 3 or av.offscreen
        expected = {SHAPES.index(s) for s, _ in pairs} | {len(SHAPES) + COLOURS.index(c) for _, c in pairs}
        assert av_labels(av) == sorted(expected)
        for o in av.offscreen:  # what only the audio carries is in the labels
            assert {SHAPES.index(o.shape), len(SHAPES) + COLOURS.index(o.colour)} <= set(av_labels(av))
        assert AVScene.from_dict(json.loads(json.dumps(av.to_dict()))) == av
    with pytest.raises(ValueError, match="2 sounding flags for 1 visible objects"):
        AVScene(Scene([Obj("circle", "red", "large", "still")]), (True, False))


def test_the_mix_is_what_sounds():
    seen = Obj("circle", "red", "large", "still")         # visible and sounding: 220 Hz
    mute = Obj("circle", "blue", "large", "still", 0.2)   # visible, silent: 262 Hz must be absent
    away = Obj("circle", "white", "large", "still")       # off-screen: 370 Hz
    av = AVScene(Scene([seen, mute]), (True, False), (away,))
    x = soundtrack(av, 1.0, np.random.default_rng(0))
    mag = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    freqs = np.fft.rfftfreq(len(x), 1 / SAMPLE_RATE)
    at = {c: mag[np.abs(freqs - PITCH[c]).argmin()] for c in ("red", "blue", "white")}
    assert at["red"] > 50 * at["blue"] and at["white"] > 50 * at["blue"]
    quiet = AVScene(Scene([mute]), (False,))
    assert not soundtrack(quiet, 0.5, np.random.default_rng(0)).any()
    assert [c.mid for c in CLASSES[:1] + CLASSES[-1:]] == ["/slimvl/shape/circle", "/slimvl/colour/white"]
    assert [c.name for c in CLASSES] == list(SHAPES) + list(COLOURS)


def test_statements_agree_with_their_scene_and_are_balanced():
    answers, binding = Counter(), Counter()
    for seed in range(600):
        av, text, answer = sample_statement_clip(np.random.default_rng(seed))
        shape, colour = _named(text)
        assert text == text.lower() and answer in ANSWERS
        assert statement_answer(av, shape, colour) == answer, (text, av)
        answers[answer] += 1
        if answer == "absent":
            binding[any(o.shape == shape or o.colour == colour for o in av.objects())] += 1
    assert all(160 < answers[a] < 240 for a in ANSWERS), answers
    assert 0.35 < binding[True] / sum(binding.values()) < 0.65, binding  # half share a shape or a colour
    av = sample_av_scene(np.random.default_rng(0), p_offscreen=0.0)
    with pytest.raises(ValueError, match="'heard' needs an off-screen object"):
        statement(av, "heard", np.random.default_rng(0))
    with pytest.raises(ValueError, match="answer 'maybe'"):
        statement(av, "maybe", np.random.default_rng(0))


# ------------------------------------------------------------------ writing and reading back


@pytest.fixture(scope="module")
def av_root(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("av") / "ds", kind="audio-video", seed=5, progress=False, **TINY)


def test_dataset_reads_back_as_the_world_made_it(av_root):
    world = json.loads((av_root / "world.json").read_text())["items"]
    assert read_done(av_root) == {"kind": "audio-video", "seed": 5, "n_train": 6, "n_val": 2, "n_test": 4,
                                  "frames": 4, "size": 32, "seconds": 1.0, "version": 1}
    assert "seconds" not in _params("video-text", 0, 4, 1, 1, 1, 2, 32, 1, 1, 0.0)  # older kinds' DONE unchanged
    assert dataset_is_valid(av_root, kind="audio-video", seconds=1.0)
    assert (av_root / "tokenizer.json").is_file()
    for split, n in (("train", 6), ("val", 2), ("test", 4)):
        classes, records = read_audioset(av_root, split)
        assert len(records) == n and [c.mid for c in classes] == [c.mid for c in CLASSES]
        ds = AudioVideoDataset(av_root, split, **READ)
        assert ds.videos.shape == (n, 4, 3, 32, 32) and ds.videos.dtype == torch.uint8
        assert ds.audio.shape == (n, 128, SAMPLE_RATE // 256 + 1) and ds.labels.shape == (n, len(CLASSES))
        assert not ds.silent.any() and ds.skipped == [] and ds.resampled == {}
        statements = read_statements(av_root, split)
        for i, r in enumerate(ds.records):
            item = world[r.ytid]
            assert item["split"] == split
            av = AVScene.from_dict(item["scene"])
            assert torch.nonzero(ds.labels[i]).flatten().tolist() == av_labels(av)
            assert ds.statements[i] == item["statement"] == statements[r.ytid][0]
            assert ANSWERS[int(ds.answers[i])] == item["answer"] == statements[r.ytid][1]
    item = ds[1]
    assert item["item_id"] == ds.records[1].ytid and item["audio"].shape == (128, 63)
    assert item["answer"] in range(3) and isinstance(item["statement"], str)


def test_clips_carry_the_rendered_frames_and_the_soundtrack(av_root):
    world = json.loads((av_root / "world.json").read_text())["items"]
    ytid = "clip000000"
    av = AVScene.from_dict(world[ytid]["scene"])
    ds = AudioVideoDataset(av_root, "train", **READ)
    expected = torch.from_numpy(render(av.scene, 4, 32)).permute(0, 3, 1, 2).float()
    assert (ds.videos[0].float() - expected).abs().mean() < 6  # lossy H.264, same picture
    wave, _ = decode_audio(av_root / "clips" / f"{ytid}.mp4", 1.0)
    clean = soundtrack(av, 1.0, np.random.default_rng(world[ytid]["sound_seed"]))
    assert np.corrcoef(wave, clean)[0, 1] > 0.95  # AAC keeps the waveform, sample-aligned


def test_reuse_and_refusal(av_root, tmp_path):
    mtime = (av_root / "DONE").stat().st_mtime_ns
    make_dataset(av_root, kind="audio-video", seed=5, progress=False, **TINY)  # equal params: reused
    assert (av_root / "DONE").stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match=r"other parameters \(seconds 1.0 -> 2.0\)"):
        make_dataset(av_root, kind="audio-video", seed=5, progress=False, **{**TINY, "seconds": 2.0})
    assert (av_root / "DONE").stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match="size=33: must be even"):
        make_dataset(tmp_path / "odd", kind="audio-video", **{**TINY, "size": 33})
    with pytest.raises(ValueError, match="seconds=0: must be a positive number"):
        make_dataset(tmp_path / "zero", kind="audio-video", **{**TINY, "seconds": 0})
    assert not (tmp_path / "odd").exists() and not (tmp_path / "zero").exists()


def test_the_pool_decodes_as_one_process(av_root, monkeypatch):
    one = AudioVideoDataset(av_root, "train", workers=1, **READ)
    monkeypatch.setattr(av_dataset, "_PARALLEL_MIN_ITEMS", 1)
    monkeypatch.setattr(av_dataset, "_MEL_CHUNK", 4)  # spectrograms in two chunks: 4 clips, then 2
    two = AudioVideoDataset(av_root, "train", workers=2, **READ)
    assert [r.ytid for r in one.records] == [r.ytid for r in two.records]
    assert torch.equal(one.videos, two.videos) and torch.allclose(one.audio, two.audio, atol=1e-4)
    assert len(AudioVideoDataset(av_root, "train", limit=2, **READ)) == 2


# ------------------------------------------------------------------ bad input


def _copy(av_root, dst):
    shutil.copytree(av_root, dst)
    return dst


def _clip_paths(root, split="train") -> list:
    return [r.path for r in read_audioset(root, split)[1]]


def test_resampled_and_silent_clips(av_root, tmp_path, caplog):
    root = _copy(av_root, tmp_path / "ds")
    paths = _clip_paths(root)
    frames = np.zeros((4, 32, 32, 3), np.uint8)
    t = np.arange(44100) / 44100
    write_clip(paths[0], frames, (0.5 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), fps=4, sample_rate=44100)
    write_clip(paths[1], frames, np.zeros(SAMPLE_RATE, np.float32), fps=4)  # a silent sound track
    with caplog.at_level(logging.INFO, logger="slimvl"):
        ds = AudioVideoDataset(root, "train", **READ)
    assert ds.resampled == {44100: 1} and "1 clips at 44100 Hz resampled to 16000 Hz" in caplog.text
    assert len(ds) == 5 and [p for p, _ in ds.skipped] == [paths[1]]
    assert "1 of 6 clips have a silent audio track, skipped" in caplog.text and "silent" in ds.skipped[0][1]
    tone = log_mel(torch.from_numpy((0.5 * np.sin(2 * np.pi * 300 * np.arange(SAMPLE_RATE) / SAMPLE_RATE))
                                    .astype(np.float32)))
    got = ds.audio[[r.path for r in ds.records].index(paths[0])]
    assert abs(int(got.mean(-1).argmax()) - int(tone.mean(-1).argmax())) <= 1  # the pitch survives resampling
    kept = AudioVideoDataset(root, "train", keep_silent=True, **READ)
    i = [r.path for r in kept.records].index(paths[1])
    assert len(kept) == 6 and kept.silent.tolist() == [j == i for j in range(6)]
    assert torch.allclose(kept.audio[i], torch.full_like(kept.audio[i], float(np.log(LOG_FLOOR))))


def test_unreadable_clips_are_named_or_skipped(av_root, tmp_path, caplog):
    root = _copy(av_root, tmp_path / "ds")
    paths = _clip_paths(root)
    write_video(paths[2], np.zeros((4, 32, 32, 3), np.uint8))  # no audio track
    with pytest.raises(MediaError, match=paths[2].name + ": no audio track"):
        AudioVideoDataset(root, "train", **READ)
    paths[3].unlink()
    with pytest.raises(FileNotFoundError, match="no clip for " + paths[3].stem):
        AudioVideoDataset(root, "train", **READ)
    with caplog.at_level(logging.WARNING, logger="slimvl"):
        ds = AudioVideoDataset(root, "train", skip_bad=True, **READ)
    assert len(ds) == 4 and len(ds.labels) == len(ds.statements) == 4
    assert sorted(p.stem for p, _ in ds.skipped) == sorted([paths[2].stem, paths[3].stem])
    assert "skipped 2 clips" in caplog.text


def test_sound_without_pictures_is_an_error(av_root, tmp_path):
    root = _copy(av_root, tmp_path / "ds")
    path = _clip_paths(root)[0]
    path.unlink()
    wav = path.with_suffix(".wav")  # found under the same id, as AudioSet downloads often are
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes((np.full(SAMPLE_RATE, 1000, "<i2")).tobytes())
    with pytest.raises(MediaError, match=wav.name + ": no video stream"):
        AudioVideoDataset(root, "train", **READ)
    assert len(AudioVideoDataset(root, "train", skip_bad=True, **READ)) == 5


def test_bad_statement_files_are_named(av_root, tmp_path):
    root = _copy(av_root, tmp_path / "ds")
    path = root / "train_statements.csv"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]))  # the last clip has no statement
    with pytest.raises(ValueError, match=r"train_statements.csv: no statement for 1 clips .*clip000005"):
        AudioVideoDataset(root, "train", **READ)
    path.write_text("".join(lines[:2]) + lines[2].replace(lines[2].split(", ")[-1], "maybe\n"))
    with pytest.raises(ValueError, match=r"train_statements.csv, line 3 \(clip000001\): answer 'maybe'"):
        read_statements(root, "train")
    path.write_text(lines[0] + "clip000000, only two fields\n")
    with pytest.raises(ValueError, match="train_statements.csv, line 2: expected YTID, statement, answer"):
        read_statements(root, "train")
    path.unlink()
    ds = AudioVideoDataset(root, "train", **READ)  # statements are optional: AudioSet has none
    assert ds.statements is None and ds.answers is None and len(ds) == 6
