"""Tests for slimvl.data: the synthetic world, dataset writing, readers, tokenizer."""

import json

import av
import numpy as np
import pytest
import torch

from slimvl.data import (COLOURS, MOTIONS, SHAPES, MediaError, Tokenizer, VideoTextDataset, caption,
                         dataset_is_valid, heldout_combos, make_dataset, near_duplicate_group,
                         normalize, read_msrvtt, read_video, render, sample_scene)
from slimvl.data.media import write_video
from slimvl.data.world import ATTRS, SHAPE_WORDS, Scene

SMALL = dict(n_train=16, n_val=8, n_test=8, group_size=4, frames=8, size=64, progress=False)


@pytest.fixture(scope="module")
def video_root(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("vt") / "ds", kind="video-text", seed=3, **SMALL)


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("it") / "ds", kind="image-text", seed=3, **SMALL)


# ------------------------------------------------------------------ world


def _draw(seed):
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng) for _ in range(5)]
    caps = [caption(s, rng) for s in scenes]
    return scenes, caps, np.stack([render(s, 4, 32) for s in scenes])


def test_world_is_deterministic():
    s1, c1, v1 = _draw(0)
    s2, c2, v2 = _draw(0)
    s3, c3, v3 = _draw(1)
    assert [s.to_dict() for s in s1] == [s.to_dict() for s in s2]
    assert c1 == c2 and np.array_equal(v1, v2)
    assert c1 != c3 and not np.array_equal(v1, v3)
    assert heldout_combos(0) == heldout_combos(0) != heldout_combos(1)
    assert Scene.from_dict(json.loads(json.dumps(s1[0].to_dict()))) == s1[0]


def test_render_shapes_and_colours():
    rng = np.random.default_rng(5)
    v = render(sample_scene(rng, n_objects=2), frames=6, size=48)
    assert v.shape == (6, 48, 48, 3) and v.dtype == np.uint8
    # Dull background sits in 40..110; bright object pixels must exist.
    assert (v.max(axis=-1) > 180).any()


def test_heldout_combos_are_about_ten_percent():
    h = heldout_combos(0)
    assert 20 <= len(h) <= 40
    assert all(s in SHAPES and c in COLOURS and m in MOTIONS for s, c, m in h)
    assert any(m == "still" for _, _, m in h)  # images need some held-out combos too


@pytest.mark.parametrize("with_motion", [True, False])
def test_near_duplicate_group(with_motion):
    rng = np.random.default_rng(11)
    held = heldout_combos(0)
    for _ in range(30):
        group = near_duplicate_group(rng, 4, held, with_motion=with_motion)
        base = group[0]
        assert len(group) == 4 and len({s.key() for s in group}) == 4
        for v in group[1:]:
            assert len(v.objects) == len(base.objects) and v.bg_seed == base.bg_seed
            diffs = [(i, a) for i, (o, p) in enumerate(zip(base.objects, v.objects))
                     for a in ATTRS if getattr(o, a) != getattr(p, a)]
            assert len(diffs) == 1
            assert all((o.x, o.y) == (p.x, p.y) for o, p in zip(base.objects, v.objects))
        for s in group:
            assert not any(o.triple() in held for o in s.objects)
            if not with_motion:
                assert all(o.motion == "still" for o in s.objects)
    forced = near_duplicate_group(rng, 4, held, must_include_heldout=True)
    assert all(any(o.triple() in held for o in s.objects) for s in forced)


def test_captions_mention_every_object():
    rng = np.random.default_rng(2)
    for _ in range(50):
        s = sample_scene(rng)
        for motion in (True, False):
            c = caption(s, rng, with_motion=motion)
            assert c == c.lower()
            for o in s.objects:
                assert o.colour in c
                assert any(w in c for w in SHAPE_WORDS[o.shape])


# ------------------------------------------------------------------ make + read


def test_video_roundtrip(video_root):
    root = video_root
    ann = json.loads((root / "annotations.json").read_text())
    assert ann["info"]["format"] == "msrvtt" and len(ann["videos"]) == 32
    assert (root / "splits" / "test.txt").read_text().split() == [
        v["video_id"] for v in ann["videos"] if v["split"] == "test"]
    ds = VideoTextDataset(root, "train", frames=8, size=64, progress=False)
    assert len(ds) == 16 and ds.videos.shape == (16, 8, 3, 64, 64) and ds.videos.dtype == torch.uint8
    item = ds[3]
    assert set(item) == {"video", "captions", "item_id", "index"}
    assert item["video"].shape == (8, 3, 64, 64) and len(item["captions"]) == 2
    assert len(ds.caption_pairs()) == 32 and ds.groups[0] == ds.groups[3] != ds.groups[4]
    # Encoding keeps the colours: compare against a fresh render of the recorded scene.
    world = json.loads((root / "world.json").read_text())["items"]
    for i in (0, 5):
        scene = Scene.from_dict(world[ds.records[i].item_id]["scene"])
        ref = render(scene, 8, 64).astype(float)
        got = ds[i]["video"].permute(0, 2, 3, 1).numpy().astype(float)
        assert np.abs(ref - got).mean() < 12
    assert len(read_video(ds.records[0].path, 8, 64)) == 8
    with av.open(str(ds.records[0].path)) as c:
        assert sum(1 for _ in c.decode(video=0)) == 8
    x = normalize(item["video"])
    assert x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1


def test_splits_and_heldout(video_root):
    world = json.loads((video_root / "world.json").read_text())
    held = {tuple(t) for t in world["heldout_combos"]}
    train = VideoTextDataset(video_root, "train", frames=2, progress=False)
    test = VideoTextDataset(video_root, "test", frames=2, progress=False)
    for r in train.records:
        scene = Scene.from_dict(world["items"][r.item_id]["scene"])
        assert not any(o.triple() in held for o in scene.objects)
    assert not any(train.heldout) and any(test.heldout)
    assert all(len(r.captions) == 1 for r in test.records)
    tok = Tokenizer.load(video_root / "tokenizer.json")
    ids, mask = tok.encode([train.records[0].captions[0]], 32)
    assert (ids[mask] != tok.unk_id).all()  # train vocab covers train captions


def test_image_roundtrip(image_root):
    data = json.loads((image_root / "dataset.json").read_text())
    assert data["dataset"] == "synthetic" and data["images"][0]["sentences"][0]["tokens"]
    ds = VideoTextDataset(image_root, "val", frames=4, size=32, progress=False)
    assert ds.layout == "karpathy" and len(ds) == 8
    assert ds[0]["video"].shape == (1, 3, 32, 32)
    assert not any(w in c for c in ds.records[0].captions for w in ("moves", "still", "grows"))
    # Karpathy "restval" counts as train.
    data["images"][0]["split"] = "restval"
    (image_root / "dataset.json").write_text(json.dumps(data))
    train = VideoTextDataset(image_root, "train", size=32, cache=False, progress=False)
    assert len(train) == 16 and train[0]["video"].shape == (1, 3, 32, 32)


def test_dataset_cache_validity(tmp_path):
    root = tmp_path / "ds"
    params = dict(SMALL, n_train=4, n_val=4, n_test=4)
    make_dataset(root, seed=1, **params)
    assert dataset_is_valid(root, seed=1, n_train=4)
    assert not dataset_is_valid(root, seed=2) and not dataset_is_valid(root, frames=4)
    mtime = (root / "annotations.json").stat().st_mtime_ns
    make_dataset(root, seed=1, **params)
    assert (root / "annotations.json").stat().st_mtime_ns == mtime
    assert not list(tmp_path.glob("ds.tmp-*"))
    (root / "DONE").unlink()
    assert not dataset_is_valid(root)
    # A folder that is not a finished dataset is never replaced silently...
    with pytest.raises(ValueError, match="not a finished slimvl dataset"):
        make_dataset(root, seed=1, **params)
    assert (root / "annotations.json").stat().st_mtime_ns == mtime
    # ...only when asked to.
    make_dataset(root, seed=1, overwrite=True, **params)
    assert dataset_is_valid(root, seed=1)


# ------------------------------------------------------------------ bad input


def _copy_ann(src, dst, edit=None):
    ann = json.loads((src / "annotations.json").read_text())
    if edit:
        edit(ann)
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "annotations.json").write_text(json.dumps(ann))
    return ann


def test_bad_media(video_root, tmp_path):
    root = tmp_path / "bad"
    ann = _copy_ann(video_root, root)
    (root / "videos").mkdir()
    train = [v for v in ann["videos"] if v["split"] == "train"]
    for v in train[:3]:
        (root / v["file"]).write_bytes((video_root / v["file"]).read_bytes())
    # Fixed bytes: random ones can, rarely, probe as a decodable stream.
    (root / train[3]["file"]).write_bytes(b"this is not a video file\n" * 80)  # corrupt
    # train[4:] missing entirely
    with pytest.raises(MediaError, match=train[4]["video_id"] + ".mp4"):
        read_video(root / train[4]["file"], 4, 32)
    with pytest.raises(MediaError, match=train[3]["video_id"]):
        read_video(root / train[3]["file"], 4, 32)
    with pytest.raises(MediaError):
        VideoTextDataset(root, "train", frames=4, size=32, progress=False)
    ds = VideoTextDataset(root, "train", frames=4, size=32, skip_bad=True, progress=False)
    assert len(ds) == 3 and len(ds.skipped) == 13
    assert [r.item_id for r in ds.records] == [v["video_id"] for v in train[:3]]


def test_bad_annotations(video_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="annotations.json"):
        read_msrvtt(tmp_path / "nothing", "train")
    root = tmp_path / "noid"
    _copy_ann(video_root, root, lambda a: a["videos"][3].pop("video_id"))
    with pytest.raises(ValueError, match=r"annotations\.json.*video entry 3.*'video_id'"):
        read_msrvtt(root, "train")
    root = tmp_path / "nosent"
    _copy_ann(video_root, root, lambda a: a.pop("sentences"))
    with pytest.raises(ValueError, match="'sentences'"):
        read_msrvtt(root, "train")


def test_short_video_repeats_last_frame(tmp_path):
    frames = np.zeros((2, 32, 32, 3), np.uint8)
    frames[0, ..., 0] = 200
    frames[1, ..., 2] = 200
    write_video(tmp_path / "short.mp4", frames)
    v = read_video(tmp_path / "short.mp4", 4, 32)
    assert v.shape == (4, 32, 32, 3)
    assert v[0, ..., 0].mean() > 150 and v[1, ..., 2].mean() > 150
    assert np.array_equal(v[2], v[1]) and np.array_equal(v[3], v[1])


# ------------------------------------------------------------------ tokenizer


def test_tokenizer(tmp_path):
    tok = Tokenizer.train(["a big red circle moves left", "a small blue square stays still"] * 5)
    assert tok.pad_id == 0 and len({tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id}) == 5
    ids, mask = tok.encode(["", "a big red circle moves left " * 10, "A Big red"], 8)
    assert ids.shape == (3, 8) and ids.dtype == torch.long and mask.dtype == torch.bool
    assert ids[0, :2].tolist() == [tok.cls_id, tok.sep_id] and mask[0].sum() == 2
    assert (ids[0, 2:] == tok.pad_id).all()
    assert mask[1].all() and ids[1, 0] == tok.cls_id and ids[1, -1] == tok.sep_id
    assert tok.decode(ids[2]) == "a big red"
    tok.save(tmp_path / "tokenizer.json")
    again = Tokenizer.load(tmp_path / "tokenizer.json")
    assert torch.equal(again.encode(["a big red"], 8)[0], ids[2:3])
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle", "##s", "."]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    bert = Tokenizer.load(tmp_path / "vocab.txt")
    assert bert.vocab_size == 10 and bert.cls_id == 2
    ids, mask = bert.encode(["A red circles, blue."], 10)
    assert ids[0, : int(mask[0].sum())].tolist() == [2, 5, 6, 7, 8, 1, 1, 9, 3]


def test_tokenizer_training_is_deterministic_across_processes():
    """The same captions give the same ids in every process (the `tokenizers`
    trainer did not: it breaks merge ties in hash-map order, which changes
    from process to process, so two runs of one `data make` differed)."""
    import subprocess
    import sys

    script = ("import numpy as np\n"
              "from slimvl.data import Tokenizer, caption, sample_scene\n"
              "rng = np.random.default_rng(0)\n"
              "print(Tokenizer.train([caption(sample_scene(rng), rng) for _ in range(400)]).fingerprint)\n")
    prints = {subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                             timeout=120).stdout.strip() for _ in range(3)}
    assert len(prints) == 1


def test_wordpiece_vocab_merges_the_most_frequent_pairs_first():
    from collections import Counter

    from slimvl.data.tokenizer import SPECIALS, wordpiece_vocab

    vocab = wordpiece_vocab(Counter({"ab": 5, "abc": 2, "ba": 1}), vocab_size=100)
    assert vocab[:5] == list(SPECIALS)
    assert vocab[5:10] == ["##a", "##b", "##c", "a", "b"]  # every character, sorted
    assert vocab[10:] == ["ab", "abc", "ba"]  # (a, ##b) x7 first; then (ab, ##c) x2 before (b, ##a) x1
    assert wordpiece_vocab(Counter({"ab": 5, "abc": 2, "ba": 1}), vocab_size=11)[-1] == "ab"
    tok = Tokenizer.train(["ab abc ba"] * 3)
    assert tok.tokens("abc ba ab") == ["abc", "ba", "ab"] and tok.tokens("bab") == ["ba", "##b"]
