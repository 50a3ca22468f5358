"""Clips with a sound track, decoded audio and log-mel spectrograms: what is
written is read back with its pitch, the world's colours (pitches) and
shapes (timbres) stay apart in the spectrogram, bad files are named."""
from __future__ import annotations

import wave

import numpy as np
import pytest
import torch

from slimvl.data.audio import (LOG_FLOOR, decode_audio, is_silent, log_mel, mel_filters, mel_frames, normalise,
                               spectrogram_stats, write_clip)
from slimvl.data.media import MediaError, decode_video, write_video
from slimvl.data.sound import PITCH, SAMPLE_RATE, object_sound
from slimvl.data.world import COLOURS, SHAPES

SR = SAMPLE_RATE


def _tone(freq: float, seconds: float, sr: int = SR, amp: float = 0.5) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * freq * np.arange(int(round(seconds * sr))) / sr)).astype(np.float32)


def _peak_hz(x: np.ndarray, sr: int = SR) -> float:
    mag = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / sr)[mag.argmax()])


def _frames(t: int = 8, size: int = 32) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (t, size, size, 3), dtype=np.uint8)


# ------------------------------------------------------------------ files


def test_write_clip_round_trip(tmp_path):
    path = tmp_path / "c.mp4"
    audio = _tone(300.0, 2.0)
    audio[:4000] = 0.0  # a silent start: the sound must come back where it was, not a priming delay later
    write_clip(path, _frames(8), audio, fps=4.0)
    video, n = decode_video(path, 8, 32)
    assert n == 8 and video.shape == (8, 32, 32, 3)
    got, rate = decode_audio(path, 2.0)
    assert rate == SR and got.shape == (2 * SR,) and got.dtype == np.float32
    assert abs(_peak_hz(got) - 300.0) < 3
    onset = int(np.flatnonzero(np.abs(got) > 0.05)[0])
    assert abs(onset - 4000) < 16
    # Longer and shorter reads: cut, or padded with silence.
    assert decode_audio(path, 0.5)[0].shape == (SR // 2,)
    longer, _ = decode_audio(path, 3.0)
    assert longer.shape == (3 * SR,) and np.abs(longer[int(2.1 * SR):]).max() == 0


def _write_wav(path, x: np.ndarray, sr: int, channels: int) -> None:
    data = np.repeat((x * 32767).astype("<i2")[:, None], channels, axis=1)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes(data.tobytes())


def test_other_rates_and_layouts_are_resampled_to_mono(tmp_path):
    path = tmp_path / "stereo.wav"
    _write_wav(path, _tone(330.0, 1.0, sr=44100), 44100, channels=2)
    got, rate = decode_audio(path, 1.0)
    assert rate == 44100 and got.shape == (SR,)
    assert abs(_peak_hz(got) - 330.0) < 3  # the pitch survives the resampling
    assert 0.25 < np.abs(got[SR // 4: 3 * SR // 4]).max() < 0.8  # both channels averaged, not summed to clipping
    short = tmp_path / "short.wav"
    _write_wav(short, _tone(250.0, 0.25, sr=8000), 8000, channels=1)
    got, rate = decode_audio(short, 1.0)
    assert rate == 8000 and got.shape == (SR,) and np.abs(got[SR // 3:]).max() == 0


def test_bad_audio_files_are_named(tmp_path):
    silent_film = tmp_path / "film.mp4"
    write_video(silent_film, _frames(4))
    with pytest.raises(MediaError, match="film.mp4: no audio track"):
        decode_audio(silent_film, 1.0)
    with pytest.raises(MediaError, match="gone.wav: file does not exist"):
        decode_audio(tmp_path / "gone.wav", 1.0)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a media file at all\n" * 50)
    with pytest.raises(MediaError, match="junk.mp4"):
        decode_audio(junk, 1.0)
    with pytest.raises(ValueError, match=r"odd.mp4: frame sides 31x31 must be even"):
        write_clip(tmp_path / "odd.mp4", _frames(2, 31), _tone(300, 0.5), fps=4)
    with pytest.raises(ValueError, match=r"loud.mp4: audio must be finite and inside \[-1, 1\]"):
        write_clip(tmp_path / "loud.mp4", _frames(2), 3 * _tone(300, 0.5), fps=4)


def test_is_silent():
    assert is_silent(np.zeros(100)) and is_silent(np.full(10, 5e-5)) and is_silent(np.zeros(0))
    assert not is_silent(_tone(300, 0.1, amp=1e-3))


# ------------------------------------------------------------------ spectrograms


def test_log_mel_shape_floor_and_frames():
    for n in (SR, SR + 100, 777):
        spec = log_mel(torch.zeros(2, 3, n))
        assert spec.shape == (2, 3, 128, n // 256 + 1) == (2, 3, 128, mel_frames(n / SR, SR, 256))
        # Silence (also at the edges: zero padding, not reflection) is the constant floor.
        assert torch.allclose(spec, torch.full_like(spec, float(np.log(LOG_FLOOR))))
    loud = log_mel(torch.from_numpy(_tone(300, 1.0)))
    assert loud.shape == (128, 63) and loud.max() > np.log(LOG_FLOOR) + 10
    bank = mel_filters(SR, 1024, 128, 0.0, 4000.0)
    assert bank.shape == (513, 128) and bank.dtype == torch.float32
    assert (bank.sum(0) > 0).all()  # no empty band at these settings
    centres = bank.argmax(0)
    assert (centres[1:] >= centres[:-1]).all() and centres[-1] * SR / 1024 < 4000


@pytest.mark.parametrize("kwargs,name", [
    (dict(f_max=9000.0), "f_max=9000.0"), (dict(n_mels=0), "n_mels=0"), (dict(hop_length=-1), "hop_length=-1"),
    (dict(n_fft=1.5), "n_fft=1.5"), (dict(f_min=5000.0), "f_min=5000.0"),
])
def test_log_mel_names_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        log_mel(torch.zeros(SR), **kwargs)


def test_normalising_with_dataset_statistics():
    rng = np.random.default_rng(0)
    waves = [object_sound(str(rng.choice(SHAPES)), str(rng.choice(COLOURS)), "large", "left", 0.5, rng)
             for _ in range(6)]
    specs = log_mel(torch.from_numpy(np.stack(waves)))
    mean, std = spectrogram_stats(specs)
    z = normalise(specs, mean, std)
    assert abs(float(z.mean())) < 1e-4 and abs(float(z.std()) - 1) < 1e-4
    with pytest.raises(ValueError, match="std=0.0"):
        normalise(specs, mean, 0.0)


def _features(shape: str, colour: str, seed: int) -> torch.Tensor:
    """The mean log-mel over time of one steady object: its spectrum."""
    x = object_sound(shape, colour, "large", "still", 0.5, np.random.default_rng(seed))
    return log_mel(torch.from_numpy(x)).mean(-1)


def _nearest_centroid_accuracy(classes: list, feature) -> float:
    """Centroids from seed 0; every class classified from fresh phases (seeds 1-3)."""
    centroids = torch.stack([feature(c, 0) for c in classes])
    right = [int((centroids - feature(c, s)).norm(dim=1).argmin()) == i
             for i, c in enumerate(classes) for s in (1, 2, 3)]
    return sum(right) / len(right)


def test_colours_are_told_apart_by_pitch():
    peaks = [int(_features("circle", c, 0).argmax()) for c in COLOURS]  # pure tones, 1.5 semitones apart
    assert peaks == sorted(set(peaks)), peaks  # each colour's own, increasing mel band
    assert _nearest_centroid_accuracy(list(COLOURS), lambda c, s: _features("circle", c, s)) == 1.0
    for shape in ("cross", "ring"):  # rich timbres too
        assert _nearest_centroid_accuracy(list(COLOURS), lambda c, s, sh=shape: _features(sh, c, s)) == 1.0
    assert max(PITCH.values()) < 4000  # inside the default band


def test_shapes_are_told_apart_by_timbre():
    for colour in ("red", "yellow", "white"):
        assert _nearest_centroid_accuracy(list(SHAPES), lambda sh, s, c=colour: _features(sh, c, s)) == 1.0
