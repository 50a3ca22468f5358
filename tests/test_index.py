"""Tests for slimvl.index: faiss indexes against brute force, and index folders
that refuse damaged files, foreign encoders and other faiss versions."""

import json

import faiss
import numpy as np
import pytest
import torch
from torch import nn

from slimvl.index import (GalleryIndex, GalleryIndexError, IndexParams, VectorIndex, VectorIndexError,
                          weights_checksum)

D = 32


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n, d=D, clusters=50, seed=0):
    """``n`` unit vectors around ``clusters`` centres, like real embeddings."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d))
    return unit(centres[rng.integers(0, clusters, n)] + 0.35 * rng.standard_normal((n, d)))


@pytest.fixture(scope="module")
def corpus():
    x = clustered(5000)
    q = clustered(200, seed=1)
    exact = VectorIndex.build(x, IndexParams(kind="exact"))
    return x, q, exact.search(q, 10)[1]


def recall_at_10(rows, truth):
    return np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, truth)])


def test_exact_matches_brute_force():
    x, q = clustered(300), clustered(20, seed=1)
    scores, rows = VectorIndex.build(torch.from_numpy(x), IndexParams()).search(q, 5)
    sims = q @ x.T
    want = np.argsort(-sims, axis=1)[:, :5]
    assert rows.dtype == np.int64 and scores.dtype == np.float32 and rows.shape == (20, 5)
    np.testing.assert_array_equal(rows, want)
    np.testing.assert_allclose(scores, np.take_along_axis(sims, want, axis=1), atol=1e-5)


@pytest.mark.parametrize("params", [IndexParams(kind="hnsw", ef_search=64),
                                    IndexParams(kind="ivfpq", pq_m=8, refine=8, nprobe=16)],
                         ids=["hnsw", "ivfpq"])
def test_approximate_recall(corpus, params):
    x, q, truth = corpus
    index = VectorIndex.build(x, params)
    assert index.ntotal == 5000 and index.dim == D
    assert recall_at_10(index.search(q, 10)[1], truth) >= 0.9


def test_ivfpq_knobs_change_results(corpus):
    x, q, truth = corpus
    index = VectorIndex.build(x, IndexParams(kind="ivfpq", pq_m=8, nprobe=1))
    low = recall_at_10(index.search(q, 10)[1], truth)
    index.nprobe = 64
    assert index.params.nprobe == 64
    assert recall_at_10(index.search(q, 10)[1], truth) > low
    restored = VectorIndex.from_bytes(index.to_bytes(), index.params)
    assert restored.nprobe == 64 and restored.memory_bytes() == index.memory_bytes()
    # Compressed codes: far smaller than the 5000 * 32 float32 vectors.
    assert index.memory_bytes() < x.nbytes / 2


def test_ivfpq_says_what_it_did_not_find():
    x = clustered(2000)
    index = VectorIndex.build(x, IndexParams(kind="ivfpq", nlist=40, nprobe=1))
    scores, rows = index.search(x[:5], 200)  # one list of ~50 items cannot give 200
    missing = rows < 0
    assert missing.any() and (~missing).any()
    assert np.isneginf(scores[missing]).all() and np.isfinite(scores[~missing]).all()


def test_search_and_build_errors():
    index = VectorIndex.build(clustered(20), IndexParams())
    q = clustered(3)
    with pytest.raises(VectorIndexError, match="k must be a positive"):
        index.search(q, 0)
    with pytest.raises(VectorIndexError, match="holds only 20 items"):
        index.search(q, 21)
    with pytest.raises(VectorIndexError, match=r"expected \[n, 32\]"):
        index.search(clustered(3, d=16), 2)
    bad = clustered(10)
    bad[3, 4] = np.nan
    with pytest.raises(VectorIndexError, match="embeddings hold NaN"):
        VectorIndex.build(bad, IndexParams())
    with pytest.raises(VectorIndexError, match="2-D"):
        VectorIndex.build(clustered(10)[0], IndexParams())
    with pytest.raises(VectorIndexError, match="floating point"):
        VectorIndex.build(np.ones((4, 4), dtype=np.int64), IndexParams())
    with pytest.raises(VectorIndexError, match="use index kind 'exact' or 'hnsw'"):
        VectorIndex.build(clustered(100), IndexParams(kind="ivfpq"))
    with pytest.raises(VectorIndexError, match="pq_m=5 must divide"):
        VectorIndex.build(clustered(400), IndexParams(kind="ivfpq", pq_m=5))


@pytest.mark.parametrize("kw, name", [({"kind": "lsh"}, "kind"), ({"nprobe": 0}, "nprobe"),
                                      ({"hnsw_m": True}, "hnsw_m"), ({"device": "tpu"}, "device"),
                                      ({"kind": "hnsw", "device": "cuda"}, "cuda")])
def test_params_validation(kw, name):
    with pytest.raises(VectorIndexError, match=name):
        IndexParams(**kw)
    with pytest.raises(VectorIndexError, match="unknown options"):
        IndexParams.from_dict({"kind": "exact", "nprob": 3})
    p = IndexParams(kind="hnsw", ef_search=7)
    assert IndexParams.from_dict(json.loads(json.dumps(p.to_dict()))) == p


def test_cuda_without_gpu_faiss_is_refused():
    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        pytest.skip("this faiss has a GPU")
    with pytest.raises(VectorIndexError, match="GPU build of faiss"):
        VectorIndex.build(clustered(10), IndexParams(device="cuda"))


def tiny_encoder(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 3).to(torch.bfloat16))


def test_weights_checksum():
    a, b = tiny_encoder(), tiny_encoder()
    assert weights_checksum(a) == weights_checksum(b)
    assert len(weights_checksum(a)) == 64
    with torch.no_grad():
        b[2].weight[1, 2] += 0.5  # a bf16 weight
    assert weights_checksum(a) != weights_checksum(b)
    assert weights_checksum(a) != weights_checksum(tiny_encoder(seed=1))


CONFIG = {"name": "tiny", "embed_dim": D, "layers": [2, 2]}


def gallery(seed=0, kind="hnsw"):
    videos, caps = clustered(40, seed=seed), clustered(80, seed=seed + 1)
    return GalleryIndex.build(videos, caps, [f"v{i}.mp4" for i in range(40)], [f"caption {j}" for j in range(80)],
                              [j // 2 for j in range(80)], CONFIG, "ab" * 32, IndexParams(kind=kind, ef_search=40))


def same_results(a, b, q):
    for x, y in ((a.search_text(q, 5), b.search_text(q, 5)), (a.search_video(q, 7), b.search_video(q, 7))):
        np.testing.assert_array_equal(x.rows, y.rows)
        np.testing.assert_array_equal(x.scores, y.scores)


def test_save_load_round_trip(tmp_path):
    g = gallery()
    path = g.save(tmp_path / "idx")
    assert sorted(p.name for p in path.iterdir()) == ["captions.faiss", "meta.json", "videos.faiss"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]
    h = GalleryIndex.load(path, expect_checksum="ab" * 32, expect_config=CONFIG)
    assert (h.items, h.captions_text, h.caption_item) == (g.items, g.captions_text, g.caption_item)
    assert h.encoder_config == CONFIG and h.params == g.params and h.dim == D
    same_results(g, h, clustered(6, seed=9))
    assert h.search_text(clustered(2, seed=9), 3).rows.shape == (2, 3)


def test_build_checks_lengths():
    v, c = clustered(4), clustered(6)
    with pytest.raises(GalleryIndexError, match="items has 3 ids"):
        GalleryIndex.build(v, c, ["a", "b", "c"], ["t"] * 6, [0] * 6, {}, "x")
    with pytest.raises(GalleryIndexError, match="caption_item has 5"):
        GalleryIndex.build(v, c, list("abcd"), ["t"] * 6, [0] * 5, {}, "x")
    with pytest.raises(GalleryIndexError, match=r"caption_item must hold item rows in \[0, 4\)"):
        GalleryIndex.build(v, c, list("abcd"), ["t"] * 6, [0, 1, 2, 3, 4, 0], {}, "x")
    with pytest.raises(GalleryIndexError, match="same dimension"):
        GalleryIndex.build(v, clustered(6, d=16), list("abcd"), ["t"] * 6, [0] * 6, {}, "x")


def test_overwrite_rules(tmp_path):
    path = gallery().save(tmp_path / "idx")
    with pytest.raises(GalleryIndexError, match="--overwrite"):
        gallery(seed=5).save(path)
    q = clustered(6, seed=9)
    same_results(gallery(), GalleryIndex.load(path), q)
    newer = gallery(seed=5)
    newer.save(path, overwrite=True)
    same_results(newer, GalleryIndex.load(path), q)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    with pytest.raises(GalleryIndexError, match="not a slimvl index"):
        gallery().save(mine, overwrite=True)
    assert (mine / "notes.txt").read_text() == "precious" and len(list(mine.iterdir())) == 1


@pytest.fixture
def saved(tmp_path):
    return gallery().save(tmp_path / "idx")


def test_truncated_file_is_refused(saved):
    f = saved / "videos.faiss"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(GalleryIndexError, match="videos.faiss: truncated"):
        GalleryIndex.load(saved)


def test_flipped_byte_is_refused(saved):
    f = saved / "captions.faiss"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(GalleryIndexError, match="captions.faiss: damaged"):
        GalleryIndex.load(saved)


def test_missing_file_and_folder(saved, tmp_path):
    (saved / "captions.faiss").unlink()
    with pytest.raises(GalleryIndexError, match="captions.faiss: missing"):
        GalleryIndex.load(saved)
    with pytest.raises(GalleryIndexError, match="no such index folder"):
        GalleryIndex.load(tmp_path / "nope")
    (saved / "meta.json").write_text("{not json")
    with pytest.raises(GalleryIndexError, match="meta.json: unreadable JSON"):
        GalleryIndex.load(saved)


def test_foreign_encoder_is_refused(saved):
    with pytest.raises(GalleryIndexError, match="another encoder.*ababababab.*cdcdcdcdcdcd.*slimvl index build"):
        GalleryIndex.load(saved, expect_checksum="cd" * 32)
    with pytest.raises(GalleryIndexError, match=r"differs in \['embed_dim'\]"):
        GalleryIndex.load(saved, expect_config={**CONFIG, "embed_dim": 64})


@pytest.mark.parametrize("field, value, match", [("faiss_version", "0.9.1", "faiss 0.9.1.*rebuild"),
                                                 ("format", "other", "not a slimvl index"),
                                                 ("version", 99, "version 99 is not supported")])
def test_meta_fields_are_checked(saved, field, value, match):
    meta = json.loads((saved / "meta.json").read_text())
    meta[field] = value
    (saved / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(GalleryIndexError, match=match):
        GalleryIndex.load(saved)


def test_interrupted_overwrite_keeps_previous_index(saved, monkeypatch):
    q = clustered(6, seed=9)
    real = faiss.serialize_index
    calls = []

    def second_write_interrupted(index):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(index)

    monkeypatch.setattr(faiss, "serialize_index", second_write_interrupted)
    with pytest.raises(KeyboardInterrupt):
        gallery(seed=5).save(saved, overwrite=True)
    monkeypatch.setattr(faiss, "serialize_index", real)
    assert sorted(p.name for p in saved.parent.iterdir()) == ["idx"]
    same_results(gallery(), GalleryIndex.load(saved), q)


def test_interrupted_rename_keeps_previous_index(saved, monkeypatch):
    import os

    real = os.replace

    def failing_replace(src, dst):
        if ".tmp-" in str(src) and str(dst) == str(saved):
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(KeyboardInterrupt):
        gallery(seed=5).save(saved, overwrite=True)
    monkeypatch.setattr(os, "replace", real)
    assert sorted(p.name for p in saved.parent.iterdir()) == ["idx"]
    same_results(gallery(), GalleryIndex.load(saved), clustered(6, seed=9))


def test_killed_save_is_recovered(saved):
    # A process killed between its two renames leaves only NAME.old-<pid>.
    dead_pid = 2 ** 22 + 12345
    aside = saved.with_name(f"idx.old-{dead_pid}")
    saved.rename(aside)
    with pytest.raises(GalleryIndexError, match="previous index at .*idx.old-"):
        GalleryIndex.load(saved)
    # The next save puts it back before deciding whether to overwrite.
    with pytest.raises(GalleryIndexError, match="already exists"):
        gallery(seed=5).save(saved)
    assert sorted(p.name for p in saved.parent.iterdir()) == ["idx"]
    same_results(gallery(), GalleryIndex.load(saved), clustered(6, seed=9))
