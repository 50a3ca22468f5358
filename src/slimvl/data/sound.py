"""The sound of an object in the synthetic world.

Each object that sounds plays notes whose *pitch* is its colour, whose
*timbre* (the loudness of each harmonic) is its shape and whose *rhythm* is
its motion; a large object is louder than a small one. So the audio alone
tells colour, shape and motion apart (as the video does), and a scene's
sound can carry an object the frames do not show, or miss one they do.

- Pitch: one note per colour, a step of one and a half semitones apart,
  from 220 Hz to 370 Hz: all inside one octave, so no colour's fundamental
  is a harmonic of another's.
- Timbre: a fixed harmonic profile per shape (a pure tone, odd harmonics
  only, a bright saw-like series, ...), the first eight harmonics.
- Rhythm: an object moving left, right, up or down plays short notes at 2,
  3, 4 or 5 per second; one that grows (shrinks) plays one long note
  getting louder (quieter); one that stays still, one steady long note.

Waveforms are float32 in [-1, 1] at ``SAMPLE_RATE``; everything is a pure
function of its arguments (the phase of each object's notes comes from the
caller's generator, so two objects of the same kind do not cancel out).
"""
from __future__ import annotations

import numpy as np

from .world import COLOURS, MOTIONS, SHAPES, SIZES

SAMPLE_RATE = 16000
# 1.5 semitones apart from 220 Hz: 220, 240, 262, 285, 311, 339, 370 Hz (under an octave).
PITCH = {c: 220.0 * 2 ** (1.5 * i / 12) for i, c in enumerate(COLOURS)}
# Amplitude of harmonics 1..8 per shape: distinct spectral shapes, each normalised to a peak of 1.
TIMBRE = {
    "circle": [1.0],                                            # a pure tone
    "square": [1.0, 0, 1 / 3, 0, 1 / 5, 0, 1 / 7],              # odd harmonics, 1/k
    "triangle": [0.4, 0, 1.0],                                  # the third harmonic strongest: hollow
    "diamond": [0.3, 1.0, 0.3],                                 # the octave strongest
    "cross": [1 / k for k in range(1, 9)],                      # every harmonic, 1/k: bright, saw-like
    "ring": [0.5, 0, 0, 1.0, 0, 0, 0.5],                        # the fourth harmonic strongest: bell-like
}
BEATS = {"left": 2.0, "right": 3.0, "up": 4.0, "down": 5.0}  # notes per second of a moving object
LOUDNESS = {"small": 0.5, "large": 1.0}


def _tone(freq: float, timbre: list[float], t: np.ndarray, phases: np.ndarray) -> np.ndarray:
    wave = np.zeros_like(t)
    for k, (a, ph) in enumerate(zip(timbre, phases), start=1):
        if a and freq * k < SAMPLE_RATE / 2:  # nothing above Nyquist: it would alias to another pitch
            wave += a * np.sin(2 * np.pi * freq * k * t + ph)
    return wave / max(np.abs(wave).max(), 1e-9)


def envelope(motion: str, seconds: float, sr: int = SAMPLE_RATE) -> np.ndarray:
    """The loudness over time ``[n_samples]`` in [0, 1] of an object with ``motion``."""
    if motion not in MOTIONS:
        raise ValueError(f"motion {motion!r}: expected one of {list(MOTIONS)}")
    n = int(round(seconds * sr))
    t = np.arange(n) / sr
    fade = np.minimum(1.0, np.minimum(t, seconds - t) / 0.01).clip(0)  # 10 ms in and out: no clicks
    if motion in BEATS:
        period = 1.0 / BEATS[motion]
        phase = (t % period) / period
        # A note each beat: a fast attack, a decay, silence for the last 40% of the beat.
        note = np.where(phase < 0.6, np.exp(-4 * phase) * np.minimum(1.0, phase * period / 0.005), 0.0)
        return (note * fade).astype(np.float32)
    if motion == "grows":
        return (np.linspace(0.2, 1.0, n) * fade).astype(np.float32)
    if motion == "shrinks":
        return (np.linspace(1.0, 0.2, n) * fade).astype(np.float32)
    return fade.astype(np.float32)  # still: one steady note


def object_sound(shape: str, colour: str, size: str, motion: str, seconds: float, rng: np.random.Generator,
                 sr: int = SAMPLE_RATE) -> np.ndarray:
    """The waveform ``[round(seconds * sr)]`` (float32) of one object."""
    for value, known, what in ((shape, SHAPES, "shape"), (colour, COLOURS, "colour"), (size, SIZES, "size")):
        if value not in known:
            raise ValueError(f"{what} {value!r}: expected one of {list(known)}")
    if seconds <= 0 or sr <= 0:
        raise ValueError(f"seconds={seconds}, sr={sr}: both must be positive")
    t = np.arange(int(round(seconds * sr))) / sr
    timbre = TIMBRE[shape]
    tone = _tone(PITCH[colour], timbre, t, rng.uniform(0, 2 * np.pi, len(timbre)))
    return (LOUDNESS[size] * tone * envelope(motion, seconds, sr)).astype(np.float32)


def mix(sounds: list[np.ndarray], peak: float = 0.9) -> np.ndarray:
    """The sum of ``sounds`` (equal lengths), scaled down to ``peak`` when it
    would clip; silence when there are none is the caller's to size."""
    if not sounds:
        raise ValueError("mix: no sounds (a silent clip is np.zeros of its length)")
    if len({len(s) for s in sounds}) != 1:
        raise ValueError(f"mix: sounds of different lengths {[len(s) for s in sounds]}")
    out = np.sum(sounds, axis=0)
    top = np.abs(out).max()
    return (out * (peak / top) if top > peak else out).astype(np.float32)


__all__ = ["SAMPLE_RATE", "PITCH", "TIMBRE", "BEATS", "LOUDNESS", "envelope", "object_sound", "mix"]
