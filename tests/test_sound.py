"""Object sounds: pitch from colour, timbre from shape, rhythm from motion,
loudness from size; each readable from the waveform."""
from __future__ import annotations

import numpy as np
import pytest

from slimvl.data.sound import BEATS, PITCH, SAMPLE_RATE, TIMBRE, envelope, mix, object_sound
from slimvl.data.world import COLOURS, MOTIONS, SHAPES


def _sound(shape="circle", colour="red", size="large", motion="still", seconds=1.0, seed=0):
    return object_sound(shape, colour, size, motion, seconds, np.random.default_rng(seed))


def _spectrum(wave):
    mag = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return np.fft.rfftfreq(len(wave), 1 / SAMPLE_RATE), mag


def test_pitch_is_the_colour():
    assert len(set(PITCH.values())) == len(COLOURS) and max(PITCH.values()) < 2 * min(PITCH.values())
    for colour in COLOURS:
        freqs, mag = _spectrum(_sound(colour=colour))
        assert abs(freqs[mag.argmax()] - PITCH[colour]) < 2  # a pure tone: its peak is the fundamental


def test_timbre_is_the_shape():
    profiles = {}
    for shape in SHAPES:
        freqs, mag = _spectrum(_sound(shape=shape))
        f0 = PITCH["red"]
        amps = np.array([mag[np.abs(freqs - k * f0).argmin()] for k in range(1, 9)])
        profiles[shape] = amps / amps.max()
        expected = np.zeros(8)
        expected[:len(TIMBRE[shape])] = TIMBRE[shape]
        np.testing.assert_allclose(profiles[shape], expected / expected.max(), atol=0.02)
    shapes = list(profiles)
    for i, a in enumerate(shapes):  # every pair of shapes told apart by its harmonics
        for b in shapes[i + 1:]:
            assert np.abs(profiles[a] - profiles[b]).max() > 0.2, (a, b)


def test_rhythm_is_the_motion():
    for motion, rate in BEATS.items():
        env = envelope(motion, 2.0)
        onsets = np.flatnonzero((env[1:] > 0.05) & (env[:-1] <= 0.05))
        assert len(onsets) in (int(2 * rate) - 1, int(2 * rate))  # a note per beat (the first may start at 0)
    grows, shrinks, still = (envelope(m, 2.0) for m in ("grows", "shrinks", "still"))
    n = len(still)
    assert grows[n // 4] < grows[3 * n // 4] and shrinks[n // 4] > shrinks[3 * n // 4]
    assert np.ptp(still[n // 10: -n // 10]) == 0  # steady
    assert {m for m in MOTIONS} == set(BEATS) | {"grows", "shrinks", "still"}


def test_size_is_loudness_and_mixing_never_clips():
    small, large = _sound(size="small"), _sound(size="large")
    assert np.abs(large).max() == pytest.approx(2 * np.abs(small).max(), rel=1e-5)
    loud = mix([_sound(colour=c, seed=i) for i, c in enumerate(COLOURS)])
    assert loud.dtype == np.float32 and np.abs(loud).max() <= 0.9 + 1e-6
    assert len(_sound(seconds=0.5)) == SAMPLE_RATE // 2


def test_bad_attributes_are_named():
    for kwargs, what in ((dict(shape="star"), "shape 'star'"), (dict(colour="pink"), "colour 'pink'"),
                         (dict(size="huge"), "size 'huge'"), (dict(motion="spins"), "motion 'spins'"),
                         (dict(seconds=0), "seconds=0")):
        with pytest.raises(ValueError, match=what):
            _sound(**kwargs)
    with pytest.raises(ValueError, match="different lengths"):
        mix([_sound(seconds=1.0), _sound(seconds=0.5)])
