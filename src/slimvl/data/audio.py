"""Audio: clips with a sound track on disk, decoded waves, log-mel spectrograms.

A clip is one MP4 holding the H.264 video of :func:`media.write_video` and
an AAC mono sound track (:func:`write_clip`). :func:`decode_audio` reads the
first audio track of any file PyAV opens (MP4, WAV, FLAC...), resampled to
mono at one sample rate, cut or zero-padded to a fixed length.

Spectrograms follow AST (the Audio Spectrogram Transformer): a log-mel
spectrogram per clip, normalised with one mean and one standard deviation
measured over a training split (:func:`spectrogram_stats`,
:func:`normalise`). The defaults (``n_fft=1024`` at 16 kHz: 15.6 Hz per
frequency bin; 128 mel bands up to 4 kHz, about 18 Hz apart below 1 kHz)
resolve the synthetic world's pitches, 220-370 Hz and at least 20 Hz apart,
and the harmonics that make its timbres.
"""
from __future__ import annotations

import functools
import os
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from .media import MediaError, add_h264_stream, encode_frames
from .sound import SAMPLE_RATE

LOG_FLOOR = 1e-6  # added to mel energies before the log: silence maps to log(1e-6), not -inf


# ---------------------------------------------------------------- files


def _check_clip(path, frames: np.ndarray, audio: np.ndarray, sample_rate: int) -> None:
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"{path}: frames must be uint8 [T, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"{path}: frame sides {frames.shape[1]}x{frames.shape[2]} must be even (H.264, 4:2:0)")
    if audio.ndim != 1 or audio.size == 0:
        raise ValueError(f"{path}: audio must be a non-empty 1-D wave, got shape {list(audio.shape)}")
    if not np.isfinite(audio).all() or np.abs(audio).max() > 1.0:
        raise ValueError(f"{path}: audio must be finite and inside [-1, 1] (peak {np.abs(audio).max():.3g})")
    if sample_rate <= 0:
        raise ValueError(f"{path}: sample_rate={sample_rate} must be positive")


def _add_aac_stream(container, sample_rate: int):
    """Add an AAC mono track at ``sample_rate`` to an output ``container``."""
    stream = container.add_stream("aac", rate=sample_rate)
    stream.layout, stream.format = "mono", "fltp"
    return stream


def _encode_audio(container, stream, wave: np.ndarray, sample_rate: int) -> None:
    """Encode float ``wave`` ``[n]`` into the AAC ``stream`` in frames of the
    encoder's size, and flush it."""
    import av

    ctx = stream.codec_context
    if not ctx.is_open:
        ctx.open()  # frame_size (1024 for AAC) is only known once the encoder is open
    step = ctx.frame_size or 1024
    for start in range(0, len(wave), step):
        chunk = np.ascontiguousarray(wave[None, start:start + step])
        frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="mono")
        frame.sample_rate, frame.pts = sample_rate, start
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)


def write_clip(path: str | os.PathLike, frames: np.ndarray, audio: np.ndarray, fps: int | float,
               sample_rate: int = SAMPLE_RATE, crf: int = 10) -> None:
    """Write one MP4: uint8 frames ``[T, H, W, 3]`` as H.264 at ``fps`` and
    float ``audio`` ``[n]`` in [-1, 1] as an AAC mono track at ``sample_rate``.

    AAC starts with 1024 samples of encoder delay ("priming"); the MP4 edit
    list written here tells decoders to drop them, so FFmpeg-based readers
    (:func:`decode_audio`) get the wave back sample-aligned. Its last frame is
    zero-padded to 1024 samples, so a decoder may return up to 1023 extra
    silent samples at the end. A player that ignores edit lists hears the
    sound 64 ms late (at 16 kHz).
    """
    import av

    frames, audio = np.asarray(frames), np.asarray(audio, dtype=np.float32)
    _check_clip(path, frames, audio, sample_rate)
    rate = Fraction(fps).limit_denominator(1001)  # e.g. 8 frames over 2 s: 4 fps; PyAV wants an int or Fraction
    if rate <= 0:
        raise ValueError(f"{path}: fps={fps} must be positive")
    _, h, w, _ = frames.shape
    with av.open(str(path), mode="w") as container:
        # Both streams exist before the first packet: the header is written then.
        video = add_h264_stream(container, w, h, rate, crf)
        sound = _add_aac_stream(container, sample_rate)
        encode_frames(container, video, frames)
        _encode_audio(container, sound, audio, sample_rate)


def _fit(wave: np.ndarray, n: int) -> np.ndarray:
    """Crop or zero-pad ``wave`` to exactly ``n`` samples."""
    if len(wave) >= n:
        return wave[:n]
    return np.concatenate([wave, np.zeros(n - len(wave), np.float32)])


def decode_audio(path: str | os.PathLike, seconds: float, sample_rate: int = SAMPLE_RATE) -> tuple[np.ndarray, int]:
    """The first ``seconds`` of a file's first audio track as mono float32
    ``[round(seconds * sample_rate)]`` (zero-padded when the track is shorter),
    and the track's own sample rate.

    Any source rate and channel layout is resampled (FFmpeg's resampler:
    channels averaged down to mono). Raises :class:`MediaError` naming the
    file: missing, no audio track, or undecodable.
    """
    import av

    path = Path(path)
    if seconds <= 0 or sample_rate <= 0:
        raise ValueError(f"seconds={seconds}, sample_rate={sample_rate}: both must be positive")
    if not path.is_file():
        raise MediaError(f"cannot read audio {path}: file does not exist")
    n = int(round(seconds * sample_rate))
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise MediaError(f"cannot read audio {path}: no audio track")
            stream = container.streams.audio[0]
            source_rate = int(stream.codec_context.sample_rate or 0)
            parts = _resampled(container, stream, n, sample_rate)
    except MediaError:
        raise
    except Exception as e:  # PyAV raises many error types for corrupt input
        raise MediaError(f"cannot read audio {path}: {type(e).__name__}: {e}") from e
    if not parts:
        raise MediaError(f"cannot read audio {path}: the audio track has no decodable samples")
    return _fit(np.concatenate(parts), n), source_rate or sample_rate


def _resampled(container, stream, n: int, sample_rate: int) -> list[np.ndarray]:
    """Decode ``stream`` to mono float at ``sample_rate`` until ``n`` samples are there."""
    import av

    resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
    parts, have = [], 0
    for frame in container.decode(stream):
        for out in resampler.resample(frame):
            parts.append(out.to_ndarray().reshape(-1).astype(np.float32, copy=False))
            have += parts[-1].size
        if have >= n:
            return parts  # the rest of a long clip is not needed
    for out in resampler.resample(None):  # the resampler's buffered tail
        parts.append(out.to_ndarray().reshape(-1).astype(np.float32, copy=False))
    return parts


def is_silent(wave: np.ndarray | torch.Tensor, threshold: float = 1e-4) -> bool:
    """True when the wave's peak ``|x|`` is below ``threshold`` (an empty wave is silent)."""
    wave = np.asarray(wave)
    return wave.size == 0 or float(np.abs(wave).max()) < threshold


# ---------------------------------------------------------------- spectrograms


@functools.lru_cache(maxsize=16)
def _mel_matrix(sample_rate: int, n_fft: int, n_mels: int, f_min: float, f_max: float) -> np.ndarray:
    from transformers.audio_utils import mel_filter_bank  # imported on first use: transformers is slow to load

    bank = mel_filter_bank(num_frequency_bins=n_fft // 2 + 1, num_mel_filters=n_mels, min_frequency=f_min,
                           max_frequency=f_max, sampling_rate=sample_rate, norm="slaney", mel_scale="slaney")
    bank = bank.astype(np.float32)
    bank.flags.writeable = False  # shared by every caller through the cache
    return bank


def mel_filters(sample_rate: int, n_fft: int, n_mels: int, f_min: float, f_max: float,
                device: torch.device | str | None = None) -> torch.Tensor:
    """The Slaney-style mel filterbank ``[n_fft // 2 + 1, n_mels]`` (float32):
    triangles on the Slaney mel scale, each of unit area (``norm="slaney"``),
    as librosa and Whisper use; computed once per arguments."""
    _check_positive_ints(sample_rate=sample_rate, n_fft=n_fft, n_mels=n_mels)
    _check_band(sample_rate, f_min, f_max)
    bank = _mel_matrix(int(sample_rate), int(n_fft), int(n_mels), float(f_min), float(f_max))
    return torch.tensor(bank, device=device)


def _check_positive_ints(**values) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"{name}={value!r}: must be a positive integer")


def _check_band(sample_rate: int, f_min: float, f_max: float) -> None:
    if not 0.0 <= f_min < f_max:
        raise ValueError(f"f_min={f_min}, f_max={f_max}: need 0 <= f_min < f_max")
    if f_max > sample_rate / 2:
        raise ValueError(f"f_max={f_max}: must be <= sample_rate / 2 = {sample_rate / 2} (Nyquist)")


def mel_frames(seconds: float, sample_rate: int = SAMPLE_RATE, hop_length: int = 256) -> int:
    """Spectrogram frames of a ``seconds``-long wave: ``n // hop_length + 1``
    with ``n = round(seconds * sample_rate)`` (centred frames, see :func:`log_mel`)."""
    return int(round(seconds * sample_rate)) // hop_length + 1


def log_mel(wave: torch.Tensor, sample_rate: int = SAMPLE_RATE, n_fft: int = 1024, hop_length: int = 256,
            n_mels: int = 128, f_min: float = 0.0, f_max: float = 4000.0) -> torch.Tensor:
    """Log-mel spectrogram of float waves ``[..., n]`` -> ``[..., n_mels, n // hop_length + 1]``.

    Frames are centred on samples ``0, hop_length, 2 * hop_length, ...``,
    with the wave padded by zeros (so silence stays silence at the edges),
    Hann-windowed, ``n_fft`` long. Power spectrum, mel projection
    (:func:`mel_filters`), then ``log(mel + 1e-6)``: silence gives the
    constant ``log(1e-6)``.
    """
    _check_positive_ints(sample_rate=sample_rate, n_fft=n_fft, hop_length=hop_length, n_mels=n_mels)
    _check_band(sample_rate, f_min, f_max)
    wave = torch.as_tensor(wave)
    if not wave.is_floating_point() or wave.ndim < 1 or wave.shape[-1] == 0:
        raise ValueError(f"wave: expected a float tensor [..., n] with n > 0, got {wave.dtype} {list(wave.shape)}")
    lead, n = wave.shape[:-1], wave.shape[-1]
    flat = wave.reshape(-1, n).float()
    window = torch.hann_window(n_fft, device=flat.device)
    spec = torch.stft(flat, n_fft, hop_length=hop_length, window=window, center=True, pad_mode="constant",
                      return_complex=True)
    power = spec.real ** 2 + spec.imag ** 2                                   # [B, n_fft//2+1, F]
    bank = mel_filters(sample_rate, n_fft, n_mels, f_min, f_max, device=flat.device)
    mel = torch.einsum("bkf,km->bmf", power, bank)                            # [B, n_mels, F]
    return torch.log(mel + LOG_FLOOR).reshape(*lead, n_mels, mel.shape[-1])


def spectrogram_stats(spectrograms: torch.Tensor) -> tuple[float, float]:
    """One mean and one standard deviation over every value of
    ``[n, n_mels, F]`` spectrograms: AST normalises with such dataset
    statistics, not per clip or per band."""
    x = torch.as_tensor(spectrograms)
    if x.numel() < 2:
        raise ValueError(f"spectrogram_stats: need at least two values, got shape {list(x.shape)}")
    x = x.double()  # millions of values: float32 sums lose digits
    return float(x.mean()), float(x.std())


def normalise(spec: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """``(spec - mean) / std`` (float), with the statistics of :func:`spectrogram_stats`."""
    if not std > 0:
        raise ValueError(f"normalise: std={std} must be positive (statistics of a silent set?)")
    return (torch.as_tensor(spec).float() - mean) / std


__all__ = ["write_clip", "decode_audio", "is_silent", "mel_filters", "log_mel", "mel_frames", "spectrogram_stats",
           "normalise", "LOG_FLOOR"]
