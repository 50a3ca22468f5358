"""Reading and writing video / image files (PyAV + Pillow)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image


class MediaError(ValueError):
    """A media file is missing, unreadable or empty; the message names the file."""


def _resize(img: Image.Image, size: int) -> np.ndarray:
    """Centre-crop to a square (keeps aspect ratio of real clips), then resize."""
    w, h = img.size
    if w != h:
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        img = img.crop((left, top, left + s, top + s))
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def read_video(path: str | os.PathLike, frames: int, size: int) -> np.ndarray:
    """Decode a clip to uint8 ``[frames, size, size, 3]``.

    ``frames`` indices are spread uniformly over the whole clip; a clip with
    fewer frames repeats its last frame. Raises :class:`MediaError`.
    """
    return decode_video(path, frames, size)[0]


def decode_video(path: str | os.PathLike, frames: int, size: int) -> tuple[np.ndarray, int]:
    """``read_video``, plus how many frames the clip really had (fewer than
    ``frames`` means its last frame was repeated to fill the clip)."""
    import av  # imported lazily: worker processes that only read images skip it

    path = Path(path)
    if not path.is_file():
        raise MediaError(f"cannot read video {path}: file does not exist")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError(f"cannot read video {path}: no video stream")
            # Keep raw frames and convert only the sampled ones: RGB conversion
            # costs more than decoding for small clips.
            stream = container.streams.video[0]
            # Single-threaded decode: clips are tiny and callers parallelise
            # over files; per-call thread pools were 10x slower under load.
            stream.thread_type, stream.codec_context.thread_count = "SLICE", 1
            decoded = list(container.decode(stream))
    except MediaError:
        raise
    except Exception as e:  # PyAV raises many error types for corrupt input
        raise MediaError(f"cannot read video {path}: {type(e).__name__}: {e}") from e
    if not decoded:
        raise MediaError(f"cannot read video {path}: no decodable frames")
    n = len(decoded)
    if n >= frames:
        # Centres of `frames` equal bins over the clip.
        idx = ((np.arange(frames) + 0.5) * n / frames).astype(int)
    else:
        idx = np.minimum(np.arange(frames), n - 1)
    out = []
    for i in idx:
        f = decoded[int(i)]
        # threads=1: swscale's default spins up a thread pool per frame.
        rgb = f.to_ndarray(format="rgb24", threads=1)
        out.append(rgb if rgb.shape[:2] == (size, size) else _resize(Image.fromarray(rgb), size))
    return np.stack(out), n


def read_image(path: str | os.PathLike, size: int) -> np.ndarray:
    """Read an image as uint8 ``[size, size, 3]`` RGB. Raises :class:`MediaError`."""
    path = Path(path)
    if not path.is_file():
        raise MediaError(f"cannot read image {path}: file does not exist")
    try:
        with Image.open(path) as img:
            img.load()
            return _resize(img.convert("RGB"), size)
    except Exception as e:
        raise MediaError(f"cannot read image {path}: {type(e).__name__}: {e}") from e


def add_h264_stream(container, width: int, height: int, fps, crf: int = 10):
    """Add slimvl's H.264 video stream (yuv420p, no B-frames, one thread) to
    an output ``container``; ``fps`` an int or a ``Fraction``."""
    stream = container.add_stream("libx264", rate=fps)
    stream.width, stream.height = width, height
    stream.pix_fmt = "yuv420p"
    # No B-frames / lookahead: tiny clips, and frame count must round-trip.
    stream.options = {"crf": str(crf), "preset": "veryfast", "tune": "zerolatency", "bf": "0",
                      "threads": "1"}
    stream.thread_type = "NONE"
    return stream


def encode_frames(container, stream, frames: np.ndarray) -> None:
    """Encode uint8 ``[T, H, W, 3]`` frames into ``stream`` and flush it."""
    import av

    for i in range(frames.shape[0]):
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frames[i]), format="rgb24")
        frame = frame.reformat(format="yuv420p", threads=1)
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: int = 8, crf: int = 10) -> None:
    """Write uint8 ``[T, H, W, 3]`` frames as H.264 (yuv420p) MP4, all T frames kept."""
    import av

    _, h, w, _ = frames.shape
    with av.open(str(path), mode="w") as container:
        encode_frames(container, add_h264_stream(container, w, h, fps, crf), frames)


def normalize(x):
    """uint8 ``[..., H, W, 3]`` (or already ``[..., 3, H, W]``) -> float ``[..., 3, H, W]`` in [-1, 1].

    Mean/std 0.5, i.e. ``x / 127.5 - 1``. Channels-last input is detected by a
    trailing dimension of 3 and moved first.
    """
    import torch

    x = torch.as_tensor(x)
    if x.ndim >= 3 and x.shape[-1] == 3 and x.shape[-3] != 3:
        x = x.movedim(-1, -3)
    return x.float() / 127.5 - 1.0
