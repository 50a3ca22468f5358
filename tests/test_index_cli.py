"""The decomposition on the command line: `train --decompose`, `eval
--retrieval rerank:K`, `index build` and `search`, with their bad inputs."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from slimvl.checkpoint import latest_checkpoint, load_model
from slimvl.cli import main
from slimvl.data import make_dataset
from slimvl.index import GalleryIndex
from slimvl.pipeline import checkpoint_tokenizer

MODEL = ["--set", "image_size=32", "--set", "dim=32", "--set", "heads=2", "--set", "embed_dim=16"]
SMALL = ["--train-set", "groups_per_step=2", "--train-set", "groups_per_unit=2", "--train-set",
         "negatives_per_item=1", "--frames", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny world, a cross-encoder trained on it and its decomposition fine-tuned with both hard negatives."""
    root = tmp_path_factory.mktemp("decomposed")
    data = make_dataset(root / "data", n_train=16, n_val=4, n_test=8, frames=2, size=32, progress=False)
    main(["-q", "train", "--data", str(data), "--model", "single_stream_tiny", *MODEL, *SMALL, "--steps", "2",
          "--out", str(root / "cross")])
    main(["-q", "train", "--data", str(data), "--decompose", str(root / "cross"), *SMALL, "--steps", "2",
          "--train-set", "hard_negatives=both", "--set", "per_direction=true", "--out", str(root / "dual")])
    return root, data


def run_json(capsys, argv) -> dict | list:
    capsys.readouterr()
    main(argv)
    return json.loads(capsys.readouterr().out)


def fails(capsys, argv, *needles) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    for n in needles:
        assert n in err, err
    return err


def test_train_decompose_makes_a_dual_encoder_of_the_cross_encoder(runs):
    root, _ = runs
    dual = load_model(latest_checkpoint(root / "dual"))
    cross = load_model(latest_checkpoint(root / "cross"))
    assert dual.config.model_type == "dual_encoder" and dual.config.per_direction
    assert dual.config.backbone == cross.config.to_dict()
    log = json.loads((root / "dual" / "train_log.json").read_text())
    assert log["config"]["hard_negatives"] == "both"
    assert all("itc" in h for h in log["history"])


def test_eval_rerank(runs, capsys):
    root, data = runs
    base = ["-q", "eval", "--data", str(data), "--checkpoint", str(root / "dual"), "--frames", "2"]
    fails(capsys, [*base, "--retrieval", "rerank:3"], "fine-tuned", "--cross-encoder")
    m = run_json(capsys, [*base, "--retrieval", "rerank:3", "--cross-encoder", str(root / "cross")])
    assert m["retrieval"] == "rerank" and m["k"] == 3 and 0 <= m["t2v_r1"] <= 1 and m["reranked_pairs"] > 0
    full = run_json(capsys, [*base, "--retrieval", "rerank:8", "--cross-encoder", str(root / "cross")])
    cross = run_json(capsys, ["-q", "eval", "--data", str(data), "--checkpoint", str(root / "cross"), "--frames",
                              "2"])
    assert full["t2v_r1"] == cross["t2v_r1"] and full["t2v_r5"] == cross["t2v_r5"]  # k = gallery: its ranking
    fails(capsys, [*base, "--retrieval", "rerank:9", "--cross-encoder", str(root / "cross")], "only 8 videos")
    fails(capsys, [*base, "--retrieval", "rerank:0"], "--retrieval", "positive")
    fails(capsys, [*base, "--cross-encoder", str(root / "cross")], "only with --retrieval rerank")
    fails(capsys, ["-q", "eval", "--data", str(data), "--checkpoint", str(root / "cross"), "--retrieval",
                   "rerank:3"], "re-ranks a dual encoder")


def test_index_build_and_search(runs, capsys, tmp_path):
    root, data = runs
    index = tmp_path / "index"
    built = run_json(capsys, ["-q", "index", "build", "--data", str(data), "--checkpoint", str(root / "dual"),
                              "--out", str(index), "--frames", "2"])
    assert built["videos"] == 8 and built["captions"] == 8 and built["skipped"] == 0
    loaded = GalleryIndex.load(index)
    assert loaded.encoder_config["model"]["model_type"] == "dual_encoder"
    caption = loaded.captions_text[3]
    hits = run_json(capsys, ["search", "--index", str(index), caption, "-k", "8", "--json"])
    assert [h["rank"] for h in hits] == list(range(1, 9))
    assert sorted(h["video"] for h in hits) == sorted(loaded.items)
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True)
    # The same scores the dual encoder gives: one encode, one search.
    dual = load_model(latest_checkpoint(root / "dual")).eval()
    tok = checkpoint_tokenizer(latest_checkpoint(root / "dual"), dual.config.vocab_size)
    tok_ids = tok.encode([caption], dual.config.max_text_len)
    with torch.no_grad():
        q = dual.encode_text(*tok_ids).numpy()
    want = loaded.search_text(q, 8)
    assert [loaded.items[i] for i in want.rows[0]] == [h["video"] for h in hits]
    capsys.readouterr()
    main(["search", "--index", str(index), caption, "-k", "2"])
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["rank", "score", "video", "caption"] and len(table) == 3
    v2t = run_json(capsys, ["search", "--index", str(index), "--video", loaded.items[5], "-k", "3", "--json"])
    assert len(v2t) == 3 and all(h["caption"] in loaded.captions_text for h in v2t)


def test_search_bad_input(runs, capsys, tmp_path):
    root, data = runs
    index = tmp_path / "index"
    run_json(capsys, ["-q", "index", "build", "--data", str(data), "--checkpoint", str(root / "dual"), "--out",
                      str(index), "--frames", "2", "--kind", "hnsw"])
    s = ["search", "--index", str(index)]
    fails(capsys, [*s, "   "], "query is empty")
    fails(capsys, [*s, "qqqq zzzz"], "no word the model's tokenizer knows")
    fails(capsys, [*s, "a red circle", "-k", "0"], "-k 0")
    fails(capsys, [*s, "a red circle", "-k", "9"], "-k 9", "only 8 videos")
    fails(capsys, [*s, "a red circle", "--video", "x.mp4"], "one of them")
    fails(capsys, [*s, "--video", str(tmp_path / "none.mp4")], "no such file")
    fails(capsys, ["-q", "index", "build", "--data", str(data), "--checkpoint", str(root / "dual"), "--out",
                   str(index), "--frames", "2"], "already exists", "--overwrite")
    fails(capsys, ["-q", "index", "build", "--data", str(data), "--checkpoint", str(root / "cross"), "--out",
                   str(tmp_path / "x"), "--frames", "2"], "cannot index a gallery", "--decompose")
    # Another encoder (the zero-step decomposition of the same cross-encoder) is refused.
    main(["-q", "train", "--data", str(data), "--decompose", str(root / "cross"), *SMALL, "--steps", "1",
          "--out", str(tmp_path / "other")])
    fails(capsys, [*s, "a red circle", "--checkpoint", str(tmp_path / "other")], "another encoder")
    # A truncated index file names itself.
    broken = tmp_path / "broken"
    shutil.copytree(index, broken)
    f = broken / "videos.faiss"
    f.write_bytes(f.read_bytes()[:100])
    fails(capsys, ["search", "--index", str(broken), "a red circle"], "videos.faiss")


def test_index_build_skips_bad_media_only_when_asked(runs, capsys, tmp_path):
    root, data = runs
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    test_ids = (copy / "splits" / "test.txt").read_text().split()
    victim = next(Path(p) for p in sorted((copy / "videos").iterdir()) if p.stem in test_ids)
    victim.write_bytes(b"not a video")
    base = ["-q", "index", "build", "--data", str(copy), "--checkpoint", str(root / "dual"), "--frames", "2"]
    fails(capsys, [*base, "--out", str(tmp_path / "a")], victim.name)
    assert not (tmp_path / "a").exists()  # nothing half-written where an index is expected
    built = run_json(capsys, [*base, "--out", str(tmp_path / "b"), "--skip-bad"])
    assert built["videos"] == 7 and built["skipped"] == 1
    meta = GalleryIndex.load(tmp_path / "b")
    assert meta.encoder_config["skipped"] == [str(victim)] and str(victim) not in meta.items
