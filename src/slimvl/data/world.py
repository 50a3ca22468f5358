"""A tiny synthetic world of coloured shapes that move, plus captions for it.

Everything is a pure function of a seed (``numpy.random.Generator``), so a
dataset can be regenerated bit for bit and results are reproducible.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field, replace

import numpy as np

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white")
SIZES = ("small", "large")
MOTIONS = ("left", "right", "up", "down", "grows", "shrinks", "still")

# Saturated, well separated colours: the background is kept dull (grey-ish,
# 40-110) so every object colour stands out even after lossy video coding.
RGB = {
    "red": (225, 35, 35),
    "green": (40, 205, 60),
    "blue": (45, 85, 240),
    "yellow": (240, 225, 40),
    "purple": (165, 55, 215),
    "orange": (250, 140, 25),
    "white": (245, 245, 245),
}

# Object extent (fraction of the canvas) and motion amplitudes.
DIAMETER = {"small": 0.17, "large": 0.30}
TRAVEL = 0.35
SCALE = 1.8
_DIRECTION = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}

ATTRS = ("shape", "colour", "size", "motion")
_CHOICES = {"shape": SHAPES, "colour": COLOURS, "size": SIZES, "motion": MOTIONS}


@dataclass(frozen=True)
class Obj:
    """One object: its attributes and start centre (x, y as canvas fractions)."""

    shape: str
    colour: str
    size: str
    motion: str
    x: float = 0.5
    y: float = 0.5

    def key(self) -> tuple[str, str, str, str]:
        """The attributes that a caption can describe (positions excluded)."""
        return (self.shape, self.colour, self.size, self.motion)

    def triple(self) -> tuple[str, str, str]:
        """The (shape, colour, motion) triple used by the compositional split."""
        return (self.shape, self.colour, self.motion)

    def to_dict(self) -> dict:
        """Plain dict for JSON."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Obj":
        """Inverse of :meth:`to_dict`."""
        return cls(**{k: d[k] for k in ("shape", "colour", "size", "motion", "x", "y")})


@dataclass(frozen=True)
class Scene:
    """A list of objects plus the seed of the textured background."""

    objects: list[Obj] = field(default_factory=list)
    bg_seed: int = 0

    def key(self) -> tuple:
        """Order-free description: two scenes with the same key get the same captions."""
        return tuple(sorted(o.key() for o in self.objects))

    def to_dict(self) -> dict:
        """Plain dict for JSON."""
        return {"objects": [o.to_dict() for o in self.objects], "bg_seed": int(self.bg_seed)}

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        """Inverse of :meth:`to_dict`."""
        return cls([Obj.from_dict(o) for o in d["objects"]], int(d["bg_seed"]))


# ---------------------------------------------------------------- geometry


def _state(o: Obj, p: float) -> tuple[float, float, float]:
    """Centre x, centre y and half-size at clip progress ``p`` in [0, 1].

    The size label always describes the first frame: "grows" ends 1.8x larger
    and "shrinks" ends 1.8x smaller.
    """
    dx, dy = _DIRECTION.get(o.motion, (0, 0))
    scale = 1.0
    if o.motion == "grows":
        scale = 1.0 + (SCALE - 1.0) * p
    elif o.motion == "shrinks":
        scale = 1.0 + (1.0 / SCALE - 1.0) * p
    return o.x + dx * TRAVEL * p, o.y + dy * TRAVEL * p, DIAMETER[o.size] / 2 * scale


def _max_half(shape_size: str, motion: str) -> float:
    return DIAMETER[shape_size] / 2 * (SCALE if motion == "grows" else 1.0)


def _fits(o: Obj, slack: float = 0.02) -> bool:
    """True if the object stays inside the canvas for the whole clip."""
    for p in (0.0, 1.0):
        x, y, _ = _state(o, p)
        h = _max_half(o.size, o.motion)
        if min(x - h, y - h) < -slack or max(x + h, y + h) > 1 + slack:
            return False
    return True


def _overlap(a: Obj, b: Obj) -> float:
    """Worst relative intrusion between two objects over the clip (0 = apart)."""
    worst = 0.0
    for p in (0.0, 0.25, 0.5, 0.75, 1.0):
        ax, ay, ah = _state(a, p)
        bx, by, bh = _state(b, p)
        d = float(np.hypot(ax - bx, ay - by))
        worst = max(worst, 1.0 - d / (0.9 * (ah + bh)))
    return worst


def _start_range(size: str, motion: str, axis: int) -> tuple[float, float]:
    h = _max_half(size, motion)
    d = _DIRECTION.get(motion, (0, 0))[axis] * TRAVEL
    return h - min(0.0, d), 1 - h - max(0.0, d)


def _place(rng: np.random.Generator, attrs: list[tuple], tries: int = 40) -> list[Obj]:
    """Rejection-sample start positions that keep objects in view and apart."""
    best, best_cost = None, float("inf")
    for _ in range(tries):
        objs = []
        for shape, colour, size, motion in attrs:
            lo_x, hi_x = _start_range(size, motion, 0)
            lo_y, hi_y = _start_range(size, motion, 1)
            objs.append(Obj(shape, colour, size, motion,
                            round(float(rng.uniform(lo_x, max(lo_x, hi_x))), 4),
                            round(float(rng.uniform(lo_y, max(lo_y, hi_y))), 4)))
        cost = sum(max(0.0, _overlap(a, b)) for a, b in itertools.combinations(objs, 2))
        if cost < best_cost:
            best, best_cost = objs, cost
        if cost == 0.0:
            break
    return best


# ---------------------------------------------------------------- sampling


def heldout_combos(seed: int = 0, fraction: float = 0.1) -> set[tuple[str, str, str]]:
    """A fixed ~10% of all (shape, colour, motion) triples, never seen in training.

    Sampled per motion (stratified) so that every motion, including "still"
    which is the only motion images use, has some held-out combinations.
    """
    rng = np.random.default_rng([seed, 7919])
    pairs = list(itertools.product(SHAPES, COLOURS))
    n = max(1, round(fraction * len(pairs)))
    out = set()
    for motion in MOTIONS:
        for i in rng.choice(len(pairs), size=n, replace=False):
            out.add((pairs[i][0], pairs[i][1], motion))
    return out


def _random_attrs(rng: np.random.Generator, with_motion: bool) -> tuple[str, str, str, str]:
    motion = str(rng.choice(MOTIONS)) if with_motion else "still"
    return (str(rng.choice(SHAPES)), str(rng.choice(COLOURS)), str(rng.choice(SIZES)), motion)


def sample_scene(rng: np.random.Generator, n_objects: int | None = None, with_motion: bool = True,
                 heldout: set | frozenset = frozenset(), must_include_heldout: bool = False) -> Scene:
    """Sample a scene of 1-3 objects with distinct descriptions.

    Objects whose (shape, colour, motion) triple is in ``heldout`` are never
    drawn, except that ``must_include_heldout`` forces exactly one such object.
    """
    n = int(n_objects) if n_objects else int(rng.integers(1, 4))
    attrs: list[tuple] = []
    if must_include_heldout:
        pool = sorted(t for t in heldout if with_motion or t[2] == "still")
        if not pool:
            raise ValueError("no held-out combination is usable for this modality")
        s, c, m = pool[int(rng.integers(len(pool)))]
        attrs.append((s, c, str(rng.choice(SIZES)), m))
    while len(attrs) < n:
        a = _random_attrs(rng, with_motion)
        if (a[0], a[1], a[3]) not in heldout and a not in attrs:
            attrs.append(a)
    rng.shuffle(attrs)
    return Scene(_place(rng, attrs), int(rng.integers(2**31 - 1)))


def near_duplicate_group(rng: np.random.Generator, k: int, heldout: set | frozenset = frozenset(),
                         must_include_heldout: bool = False, with_motion: bool = True,
                         n_objects: int | None = None, max_tries: int = 500) -> list[Scene]:
    """A base scene and ``k - 1`` variants that each change ONE attribute of ONE object.

    All scenes keep the base's positions and background and have pairwise
    distinct descriptions, so each caption matches exactly one scene of the
    group. Held-out triples are excluded, or (``must_include_heldout``) every
    scene keeps at least one held-out object. ``with_motion=False`` (images)
    never varies the motion, which stays "still".
    """
    base = sample_scene(rng, n_objects, with_motion, heldout, must_include_heldout)
    group, seen = [base], {base.key()}
    attrs = ATTRS if with_motion else ATTRS[:3]
    for _ in range(max_tries):
        if len(group) >= k:
            break
        j = int(rng.integers(len(base.objects)))
        attr = str(rng.choice(attrs))
        old = getattr(base.objects[j], attr)
        new = str(rng.choice([v for v in _CHOICES[attr] if v != old]))
        obj = replace(base.objects[j], **{attr: new})
        objs = list(base.objects)
        objs[j] = obj
        variant = Scene(objs, base.bg_seed)
        triples = [o.triple() for o in objs]
        if variant.key() in seen or len({o.key() for o in objs}) < len(objs):
            continue
        if must_include_heldout:
            if not any(t in heldout for t in triples):
                continue
        elif any(t in heldout for t in triples):
            continue
        # Size/motion changes with fixed positions may leave the canvas.
        if not _fits(obj) or any(_overlap(obj, o) > 0.35 for i, o in enumerate(objs) if i != j):
            continue
        group.append(variant)
        seen.add(variant.key())
    if len(group) < k:
        # A tiny base (e.g. one object boxed in a corner) can run out of legal
        # variants; a fresh base almost surely works.
        return near_duplicate_group(rng, k, heldout, must_include_heldout, with_motion, n_objects, max_tries)
    return group


# ---------------------------------------------------------------- rendering


def _background(bg_seed: int, size: int) -> np.ndarray:
    """Dull, low-saturation gradient plus static pixel noise (float, HxWx3)."""
    rng = np.random.default_rng(bg_seed)
    theta = rng.uniform(0, 2 * np.pi)
    g = (np.arange(size) + 0.5) / size - 0.5
    t = np.cos(theta) * g[None, :] + np.sin(theta) * g[:, None]
    t = (t - t.min()) / max(1e-6, t.max() - t.min())
    c0 = rng.uniform(50, 80) + rng.uniform(-12, 12, size=3)
    c1 = rng.uniform(75, 100) + rng.uniform(-12, 12, size=3)
    img = c0 + (c1 - c0) * t[..., None]
    img = img + rng.normal(0, 5, size=(size, size, 1)) + rng.normal(0, 2, size=(size, size, 3))
    return np.clip(img, 40, 110)


def _mask(shape: str, xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, h: float) -> np.ndarray:
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx * dx + dy * dy <= h * h
    if shape == "square":
        # Slightly inset so a square's area is comparable to a circle's.
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.85 * h
    if shape == "triangle":
        return (dy >= -h) & (dy <= h) & (np.abs(dx) <= (dy + h) / 2)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= h
    if shape == "cross":
        arm = 0.32 * h
        return ((np.abs(dx) <= h) & (np.abs(dy) <= arm)) | ((np.abs(dy) <= h) & (np.abs(dx) <= arm))
    if shape == "ring":
        r2 = dx * dx + dy * dy
        return (r2 <= h * h) & (r2 >= (0.55 * h) ** 2)
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, frames: int = 8, size: int = 64) -> np.ndarray:
    """Render a scene to uint8 frames ``[frames, size, size, 3]``."""
    bg = _background(scene.bg_seed, size)
    coords = (np.arange(size) + 0.5) / size
    xx, yy = coords[None, :], coords[:, None]
    out = np.empty((frames, size, size, 3), np.uint8)
    for f in range(frames):
        p = f / (frames - 1) if frames > 1 else 0.0
        img = bg.copy()
        for o in scene.objects:
            cx, cy, h = _state(o, p)
            img[_mask(o.shape, xx, yy, cx, cy, h)] = RGB[o.colour]
        out[f] = img.astype(np.uint8)
    return out


# ---------------------------------------------------------------- captions

SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
SHAPE_WORDS = {"circle": ("circle", "disc"), "square": ("square", "box"), "triangle": ("triangle",),
               "diamond": ("diamond", "rhombus"), "cross": ("cross", "plus sign"), "ring": ("ring", "hoop")}
MOTION_WORDS = {
    "left": ("moves left", "slides left", "drifts to the left"),
    "right": ("moves right", "slides right", "drifts to the right"),
    "up": ("moves up", "rises", "floats upward"),
    "down": ("moves down", "falls", "sinks"),
    "grows": ("grows", "gets bigger", "expands"),
    "shrinks": ("shrinks", "gets smaller", "contracts"),
    "still": ("stays still", "does not move", "rests in place"),
}
_VIDEO_JOINERS = (" while ", " and ", ", and ", " as ")
_VIDEO_OPENERS = ("", "in this clip, ", "in this video, ", "here ", "we see that ")
_IMAGE_JOINERS = (" and ", ", and ", " next to ", " with ")
_IMAGE_OPENERS = ("", "there is ", "we see ", "a picture of ", "an image showing ")


def _pick(rng: np.random.Generator, options) -> str:
    return options[int(rng.integers(len(options)))]


def caption(scene: Scene, rng: np.random.Generator, with_motion: bool = True) -> str:
    """A lower-case caption naming every object's size, colour, shape (and motion)."""
    order = rng.permutation(len(scene.objects))
    phrases = []
    for i in order:
        o = scene.objects[int(i)]
        np_ = f"a {_pick(rng, SIZE_WORDS[o.size])} {o.colour} {_pick(rng, SHAPE_WORDS[o.shape])}"
        phrases.append(f"{np_} {_pick(rng, MOTION_WORDS[o.motion])}" if with_motion else np_)
    joiners, openers = (_VIDEO_JOINERS, _VIDEO_OPENERS) if with_motion else (_IMAGE_JOINERS, _IMAGE_OPENERS)
    text = phrases[0]
    for p in phrases[1:]:
        text += _pick(rng, joiners) + p
    return (_pick(rng, openers) + text).lower()
