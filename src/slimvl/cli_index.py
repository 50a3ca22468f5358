"""``slimvl index build`` and ``slimvl search``: a gallery encoded once by a
dual encoder, searched by text (text->video) or by a video (video->text).

The index folder (``slimvl.index.GalleryIndex``) records the checkpoint it
was built with and its weights' checksum; ``search`` loads that checkpoint
(or ``--checkpoint``) and refuses one whose weights differ, since its
queries would land in another embedding space.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

log = logging.getLogger("slimvl")


def _encoder(checkpoint: str):
    """The dual encoder of a checkpoint (or run folder), with its tokenizer."""
    from .checkpoint import load_model, resolve_checkpoint
    from .pipeline import checkpoint_tokenizer

    ckpt = resolve_checkpoint(checkpoint)
    model = load_model(ckpt)
    if not hasattr(model, "encode_text") or not hasattr(model, "encode_video"):
        if getattr(model, "cacheable", False):
            raise ValueError(f"{ckpt}: a {model.config.model_type} caches its own encodings but cannot index a "
                             "gallery yet; indexes are built with a dual encoder (`slimvl train --decompose RUN` "
                             "from a single-stream model)")
        raise ValueError(f"{ckpt}: a {model.config.model_type} scores pairs jointly and cannot index a gallery; "
                         "decompose it into a dual encoder first (`slimvl train --decompose RUN`)")
    return ckpt, model, checkpoint_tokenizer(ckpt, model.config.vocab_size)


def _batches(n: int, size: int, what: str, quiet: bool):
    from tqdm.auto import tqdm

    bar = tqdm(total=n, desc=f"encode {what}", unit=what, disable=quiet, dynamic_ncols=True)
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))
        bar.update(min(size, n - start))
    bar.close()


def cmd_index_build(a: argparse.Namespace) -> None:
    import torch

    from .data import VideoTextDataset
    from .index import GalleryIndex, IndexParams, weights_checksum
    from .pipeline import _need_items
    from .runtime import resolve_device, video_to
    from .tasks.retrieval import RetrievalData

    out = Path(a.out)
    if out.exists() and not a.overwrite:  # before minutes of encoding, not after
        raise ValueError(f"{out} already exists; pass --overwrite to replace it")
    params = IndexParams(kind=a.kind, hnsw_m=a.hnsw_m, ef_search=a.ef_search, nlist=a.nlist, nprobe=a.nprobe,
                         refine=a.refine)
    ckpt, model, tok = _encoder(a.checkpoint)
    device = resolve_device(a.device)
    model.to(device).eval()
    ds = VideoTextDataset(a.data, a.split, frames=a.frames, size=model.config.image_size, skip_bad=a.skip_bad,
                          progress=not a.quiet)
    _need_items(ds, a.data, a.split)
    for path, why in ds.skipped:
        log.warning("skipped %s: %s", path, why)
    data = RetrievalData.from_dataset(ds, tok, model.config.max_text_len)
    videos, texts = [], []
    with torch.inference_mode():
        for sl in _batches(len(ds), a.batch_size, "videos", a.quiet):
            videos.append(model.encode_video(video_to(data.videos[sl], device)).cpu())
        for sl in _batches(len(data.caption_item), a.batch_size, "captions", a.quiet):
            texts.append(model.encode_text(data.caption_ids[sl].to(device), data.caption_mask[sl].to(device)).cpu())
    encoder = {"model": model.config.to_dict(), "checkpoint": str(ckpt.resolve()), "frames": a.frames,
               "data": str(Path(a.data).resolve()), "split": a.split, "skipped": [str(p) for p, _ in ds.skipped]}
    index = GalleryIndex.build(torch.cat(videos), torch.cat(texts), [str(r.path) for r in ds.records],
                               [c for r in ds.records for c in r.captions], data.caption_item.tolist(), encoder,
                               weights_checksum(model), params)
    index.save(out, overwrite=a.overwrite)
    print(json.dumps({"index": str(out), "kind": a.kind, "videos": len(index.items),
                      "captions": len(index.captions_text), "skipped": len(ds.skipped), "checkpoint": str(ckpt)}))


def _query_text(text: str, tok) -> None:
    if not text or not text.strip():
        raise ValueError("the query is empty: give a caption to search for, or --video PATH")
    pieces = tok.tokens(text)
    if not pieces or all(p == "[UNK]" for p in pieces):
        raise ValueError(f"the query {text!r} has no word the model's tokenizer knows: nothing to encode")


def cmd_search(a: argparse.Namespace) -> None:
    import torch

    from .data.media import MediaError, decode_video, read_image
    from .data.readers import IMAGE_EXTS
    from .index import GalleryIndex, weights_checksum
    from .index.gallery import read_meta
    from .runtime import to_float_video

    if (a.query is None) == (a.video is None):
        raise ValueError("give a text query or --video PATH (one of them)")
    if a.k <= 0:
        raise ValueError(f"-k {a.k}: the number of results must be positive")
    meta = read_meta(Path(a.index))
    encoder = meta["encoder"]["config"]
    ckpt, model, tok = _encoder(a.checkpoint or encoder["checkpoint"])
    index = GalleryIndex.load(Path(a.index), expect_checksum=weights_checksum(model))
    if a.ef_search is not None:
        for v in (index.videos, index.captions):
            v.ef_search = a.ef_search
    if a.nprobe is not None:
        for v in (index.videos, index.captions):
            v.nprobe = a.nprobe
    model.eval()
    with torch.inference_mode():
        if a.video is None:
            _query_text(a.query, tok)
            ids, mask = tok.encode([a.query], model.config.max_text_len)
            n = len(index.items)
            if a.k > n:
                raise ValueError(f"-k {a.k}: the index holds only {n} videos")
            hits = index.search_text(model.encode_text(ids, mask).numpy(), a.k)
            rows = [{"rank": r + 1, "score": round(float(s), 4), "video": index.items[i],
                     "caption": next((c for c, j in zip(index.captions_text, index.caption_item) if j == i), "")}
                    for r, (s, i) in enumerate(zip(hits.scores[0], hits.rows[0]))]
        else:
            path, size = Path(a.video), model.config.image_size
            if not path.is_file():
                raise ValueError(f"--video {path}: no such file")
            try:
                arr = read_image(path, size)[None] if path.suffix.lower() in IMAGE_EXTS \
                    else decode_video(path, encoder.get("frames", 4), size)[0]
            except MediaError as e:
                raise ValueError(f"--video {path}: unreadable ({e})") from None
            video = to_float_video(torch.from_numpy(arr.transpose(0, 3, 1, 2).copy())[None])
            n = len(index.captions_text)
            if a.k > n:
                raise ValueError(f"-k {a.k}: the index holds only {n} captions")
            hits = index.search_video(model.encode_video(video).numpy(), a.k)
            rows = [{"rank": r + 1, "score": round(float(s), 4), "caption": index.captions_text[i],
                     "video": index.items[index.caption_item[i]]}
                    for r, (s, i) in enumerate(zip(hits.scores[0], hits.rows[0]))]
    found = [r for r, i in zip(rows, hits.rows[0]) if i >= 0]
    if len(found) < len(rows):  # an IVF-PQ search visits only --nprobe lists
        log.warning("found %d of the %d results asked for: the probed lists hold no more (raise --nprobe)",
                    len(found), len(rows))
    rows = found
    if a.json:
        print(json.dumps(rows, indent=2))
        return
    first, second = ("video", "caption") if a.video is None else ("caption", "video")
    print(f"{'rank':>4}  {'score':>7}  {first:<40}  {second}")
    for r in rows:
        print(f"{r['rank']:>4}  {r['score']:>7.4f}  {r[first]:<40}  {r[second]}")


def add_parsers(sub, data_args, fmt: dict) -> None:
    """The ``index`` and ``search`` commands of the ``slimvl`` parser."""
    from .index import INDEX_KINDS, IndexParams

    d = IndexParams()
    ix = sub.add_parser("index", help="build a faiss index of a gallery with a dual encoder", **fmt)
    ix_sub = ix.add_subparsers(dest="index_command", required=True, metavar="SUBCOMMAND")
    b = ix_sub.add_parser("build", help="encode a dataset split's videos and captions once and index them", **fmt)
    data_args(b, "auto")
    b.add_argument("--checkpoint", required=True, help="dual encoder checkpoint or run folder "
                                                       "(`slimvl train --decompose`)")
    b.add_argument("--split", default="test", help="the split whose videos and captions make the gallery")
    b.add_argument("--out", required=True, help="index folder to write (atomically)")
    b.add_argument("--overwrite", action="store_true", help="replace an index already at --out")
    b.add_argument("--kind", choices=INDEX_KINDS, default=d.kind, help="exact inner product, or approximate: "
                   "hnsw (graph) or ivfpq (inverted lists of product-quantised codes, for large galleries)")
    b.add_argument("--hnsw-m", type=int, default=d.hnsw_m, help="hnsw: neighbours per node (memory vs recall)")
    b.add_argument("--ef-search", type=int, default=d.ef_search, help="hnsw: candidates explored per query "
                                                                      "(recall vs speed)")
    b.add_argument("--nlist", type=int, default=d.nlist, help="ivfpq: inverted lists (0: about 4 sqrt(n))")
    b.add_argument("--nprobe", type=int, default=d.nprobe, help="ivfpq: lists visited per query (recall vs speed)")
    b.add_argument("--refine", type=int, default=d.refine, help="ivfpq: re-score the top k*R exactly (0: off)")
    b.add_argument("--batch-size", type=int, default=256, help="videos or captions per forward pass")
    b.set_defaults(func=cmd_index_build)

    s = sub.add_parser("search", help="search an index by text (text->video) or by a video (video->text)", **fmt)
    s.add_argument("query", nargs="?", help="a caption to search the videos with")
    s.add_argument("--index", required=True, help="index folder made by `slimvl index build`")
    s.add_argument("--video", help="a video (or image) file to search the captions with")
    s.add_argument("-k", type=int, default=5, help="results to show")
    s.add_argument("--checkpoint", help="the dual encoder (default: the checkpoint the index was built with; its "
                                        "weights must be the same)")
    s.add_argument("--ef-search", type=int, help="hnsw: candidates explored per query (default: as built)")
    s.add_argument("--nprobe", type=int, help="ivfpq: lists visited per query (default: as built)")
    s.add_argument("--json", action="store_true", help="print the results as JSON")
    s.set_defaults(func=cmd_search)
