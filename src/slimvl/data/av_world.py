"""Sound in the synthetic world: clips whose frames and sound track disagree.

An :class:`AVScene` is a :class:`world.Scene` (what the frames show) plus,
per visible object, whether it sounds, plus objects that sound but are not
in the frames ("off-screen"). So the audio carries what the video lacks
(off-screen sources) and the video what the audio lacks (silent objects):
only both together tell everything that is in a clip.

Two tasks come with it:

- multi-label tagging (AudioSet-style): :data:`CLASSES` are the 6 shapes
  then the 7 colours; a clip is labelled with the shape and colour of every
  object that is visible or heard (:func:`av_labels`);
- statements (three classes, video + text + audio): "there is a red
  circle" is ``visible`` (on screen, sounding or not), ``heard`` (only
  heard, off-screen) or ``absent`` (:func:`statement`,
  :func:`sample_statement_clip`).

Every object of a clip has its own (shape, colour), so a statement names at
most one object.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from . import sound as S
from .audioset import AudioSetClass
from .world import COLOURS, MOTIONS, SHAPES, SIZES, Obj, Scene, sample_scene

CLASSES = tuple([AudioSetClass(i, f"/slimvl/shape/{s}", s) for i, s in enumerate(SHAPES)] +
                [AudioSetClass(len(SHAPES) + i, f"/slimvl/colour/{c}", c) for i, c in enumerate(COLOURS)])
ANSWERS = ("visible", "heard", "absent")
_OPENERS = ("", "there is ", "this clip has ", "the clip contains ", "somewhere in this clip there is ",
            "we can find ")


@dataclass(frozen=True)
class AVScene:
    """What a clip shows (``scene``), which of those objects sound
    (``sounding``, one flag per visible object) and the sounding objects
    the frames do not show (``offscreen``)."""

    scene: Scene
    sounding: tuple[bool, ...]
    offscreen: tuple[Obj, ...] = field(default_factory=tuple)

    def __post_init__(self):
        if len(self.sounding) != len(self.scene.objects):
            raise ValueError(f"AVScene: {len(self.sounding)} sounding flags for {len(self.scene.objects)} "
                             "visible objects")

    def heard(self) -> list[Obj]:
        """The objects that sound: the sounding visible ones, then the off-screen ones."""
        return [o for o, s in zip(self.scene.objects, self.sounding) if s] + list(self.offscreen)

    def objects(self) -> list[Obj]:
        """Every object of the clip: the visible ones (sounding or not), then the off-screen ones."""
        return list(self.scene.objects) + list(self.offscreen)

    def to_dict(self) -> dict:
        """Plain dict for JSON."""
        return {"scene": self.scene.to_dict(), "sounding": [bool(s) for s in self.sounding],
                "offscreen": [o.to_dict() for o in self.offscreen]}

    @classmethod
    def from_dict(cls, d: dict) -> "AVScene":
        """Inverse of :meth:`to_dict`."""
        return cls(Scene.from_dict(d["scene"]), tuple(bool(s) for s in d["sounding"]),
                   tuple(Obj.from_dict(o) for o in d["offscreen"]))


def _pairs(objects) -> set[tuple[str, str]]:
    return {(o.shape, o.colour) for o in objects}


def _visible_scene(rng: np.random.Generator) -> Scene:
    """``world.sample_scene`` redrawn until its objects' (shape, colour) pairs are distinct."""
    while True:
        scene = sample_scene(rng)
        if len(_pairs(scene.objects)) == len(scene.objects):
            return scene


def _offscreen_object(rng: np.random.Generator, taken: set[tuple[str, str]]) -> Obj:
    free = [p for p in itertools.product(SHAPES, COLOURS) if p not in taken]
    shape, colour = free[int(rng.integers(len(free)))]
    # Its size and motion are heard (loudness, rhythm); its position never matters.
    return Obj(shape, colour, str(rng.choice(SIZES)), str(rng.choice(MOTIONS)))


def sample_av_scene(rng: np.random.Generator, p_sound: float = 0.6, p_offscreen: float = 0.5,
                    need_offscreen: bool = False) -> AVScene:
    """1-3 visible objects, each sounding with probability ``p_sound``, and
    with probability ``p_offscreen`` (always with ``need_offscreen``) one
    off-screen sounding object. All (shape, colour) pairs of the clip are
    distinct, and something always sounds: when the draw leaves the clip
    silent, one visible object is made to sound."""
    if not (0.0 <= p_sound <= 1.0 and 0.0 <= p_offscreen <= 1.0):
        raise ValueError(f"p_sound={p_sound}, p_offscreen={p_offscreen}: probabilities must be in [0, 1]")
    scene = _visible_scene(rng)
    sounding = [bool(x) for x in rng.random(len(scene.objects)) < p_sound]
    offscreen = ()
    if need_offscreen or rng.random() < p_offscreen:
        offscreen = (_offscreen_object(rng, _pairs(scene.objects)),)
    if not offscreen and not any(sounding):
        sounding[int(rng.integers(len(sounding)))] = True  # no silent clips: silence is a reader's edge case
    return AVScene(scene, tuple(sounding), offscreen)


def av_labels(av: AVScene) -> list[int]:
    """Sorted distinct indices into :data:`CLASSES` of the shape and colour
    of every object that is visible or heard."""
    out = set()
    for o in av.objects():
        out.add(SHAPES.index(o.shape))
        out.add(len(SHAPES) + COLOURS.index(o.colour))
    return sorted(out)


def soundtrack(av: AVScene, seconds: float, rng: np.random.Generator, sample_rate: int = S.SAMPLE_RATE) -> np.ndarray:
    """The clip's sound, float32 ``[round(seconds * sample_rate)]``: the mix of
    every sounding object (silence if none sounds)."""
    sounds = [S.object_sound(o.shape, o.colour, o.size, o.motion, seconds, rng, sample_rate) for o in av.heard()]
    if not sounds:
        return np.zeros(int(round(seconds * sample_rate)), np.float32)
    return S.mix(sounds)


def _pick(rng: np.random.Generator, options: list):
    return options[int(rng.integers(len(options)))]


def _absent_pair(av: AVScene, rng: np.random.Generator) -> tuple[str, str]:
    """A (shape, colour) no object of the clip has; half of the time it
    shares its shape or its colour with one that it has, so that a model
    must bind colour to shape rather than spot either alone."""
    taken = _pairs(av.objects())
    shapes, colours = {s for s, _ in taken}, {c for _, c in taken}
    free = [p for p in itertools.product(SHAPES, COLOURS) if p not in taken]
    near = [p for p in free if p[0] in shapes or p[1] in colours]
    far = [p for p in free if p not in near]
    # Both lists are non-empty: a clip has at most 4 objects, of 6 shapes and 7 colours.
    return _pick(rng, near if rng.random() < 0.5 else far)


def statement(av: AVScene, answer: str, rng: np.random.Generator) -> str:
    """A short lower-case text naming one (colour, shape), e.g. "there is a
    red circle", for which ``answer`` is right: an on-screen object for
    ``visible``, the off-screen one for ``heard``, none of the clip's for
    ``absent``. The wording never depends on the answer."""
    if answer == "visible":
        o = _pick(rng, list(av.scene.objects))
        shape, colour = o.shape, o.colour
    elif answer == "heard":
        if not av.offscreen:
            raise ValueError("statement: answer 'heard' needs an off-screen object, the clip has none")
        o = _pick(rng, list(av.offscreen))
        shape, colour = o.shape, o.colour
    elif answer == "absent":
        shape, colour = _absent_pair(av, rng)
    else:
        raise ValueError(f"answer {answer!r}: expected one of {list(ANSWERS)}")
    article = "an" if colour[0] in "aeiou" else "a"  # "an orange circle"
    return f"{_pick(rng, _OPENERS)}{article} {colour} {shape}"


def statement_answer(av: AVScene, shape: str, colour: str) -> str:
    """The answer of a statement naming (shape, colour) about ``av``."""
    if (shape, colour) in _pairs(av.scene.objects):
        return "visible"
    return "heard" if (shape, colour) in _pairs(av.offscreen) else "absent"


def sample_statement_clip(rng: np.random.Generator) -> tuple[AVScene, str, str]:
    """``(scene, statement, answer)`` with the answer drawn uniformly from
    :data:`ANSWERS` and a scene for which it is possible (an off-screen
    object for ``heard``)."""
    answer = ANSWERS[int(rng.integers(len(ANSWERS)))]
    av = sample_av_scene(rng, need_offscreen=answer == "heard")
    return av, statement(av, answer, rng), answer


__all__ = ["AVScene", "CLASSES", "ANSWERS", "sample_av_scene", "av_labels", "soundtrack", "statement",
           "statement_answer", "sample_statement_clip"]
