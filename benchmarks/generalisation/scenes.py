"""What each video of the generalisation set shows: its look (a family-wide Style) and
its described events (Acts), planned from one seeded generator.

A *family* is a base video and up to three twins that differ from it minimally:
``reversed`` (the same events in the opposite temporal order), ``direction`` (one
event played backwards: left<->right, up<->down, grow<->shrink, appear<->disappear)
and ``swap:<colour|shape|size>`` (one attribute of one event changed). Members of a
family share everything else: frame size, frame rate, duration, background,
lighting, sensor noise (frame for frame) and undescribed distractor objects, so a
model can only tell them apart by what the captions say.

Geometry lives in *stage* coordinates: [0, 1]^2 over a square stage that sits
inside the central square of the frame (the part a model's centre crop keeps), so
"on the left" is on the left of what the model sees, whatever the aspect ratio.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np

from .vocab import (ACTIONS, BACKWARDS, COLOURS, MOVES, PLACE_JITTER, PLACE_XY, PLACES,
                    RADIUS_RANGES, SHAPES, SIZE_CHANGES, radius_for, shade)

# (width, height): 4:3, 16:9, 3:2, square and one portrait frame, all even (yuv420p).
FRAME_SIZES: tuple[tuple[int, int], ...] = ((96, 72), (128, 96), (160, 90), (112, 112), (144, 96), (90, 120))
FRAME_RATES: tuple[float, ...] = (10.0, 12.0, 12.5, 15.0, 20.0, 24.0)
SECONDS_RANGE = (2.5, 5.0)
# Symmetric easings only (e(1-u) = 1-e(u)), so an event played backwards is exactly
# the same motion reversed in time: the direction twin's frames are the base's, reversed.
EASINGS: tuple[str, ...] = ("linear", "smoothstep", "cosine", "smootherstep", "pause")
BACKGROUNDS: tuple[str, ...] = ("gradient", "radial", "clouds", "flat")
TWIN_RATE = 0.4
# Smallest RGB distance between any object colour and any part of the background.
MIN_CONTRAST = 80.0
_BIG_MAX = RADIUS_RANGES["big"][1]


@dataclass(frozen=True)
class Act:
    """One described event: one object doing one action during [start_frame, end_frame)."""

    shape: str
    colour: str
    size: str  # grow/shrink: the size it starts at
    action: str
    position: str | None  # named place of stay/appear/disappear
    start_xy: tuple[float, float]  # stage coordinates
    end_xy: tuple[float, float]
    r_start: float  # radius, fraction of the stage side
    r_end: float
    start_frame: int
    end_frame: int
    ease: str
    hidden: float  # appear/disappear: share of the event with the object not yet / no longer there
    fade: int  # frames over which it fades in or out
    hold: str = "none"  # "before"/"after": also on screen, still, before/after its own event
    tilt: float = 0.0  # degrees

    @property
    def num_frames(self) -> int:
        return self.end_frame - self.start_frame


@dataclass(frozen=True)
class Prop:
    """An undescribed distractor: on screen, still, for the whole video."""

    shape: str
    colour: str
    xy: tuple[float, float]
    radius: float
    tilt: float


@dataclass(frozen=True)
class Style:
    """Everything about a family's look that is not an event."""

    width: int
    height: int
    fps: float
    num_frames: int
    stage: tuple[float, float, float]  # left, top, side in pixels
    background: dict
    palette: dict[str, tuple[int, int, int]]
    noise_sigma: float
    chroma_noise: float
    flicker: float
    shading: float
    light_angle: float
    outline: float  # outline width in pixels; 0 = none
    outline_gain: float  # outline colour = fill * gain (darker or lighter rim)
    crf: int
    props: tuple[Prop, ...] = ()


@dataclass(frozen=True)
class VideoPlan:
    index: int
    family: int
    variant: str  # base | reversed | direction | swap:<attribute>
    acts: tuple[Act, ...]
    style: Style
    seed: int
    captions: tuple[str, ...] = field(default=(), compare=False)
    change: dict = field(default_factory=dict, compare=False)  # which event a twin changed, and how


def caption_size(act: Act) -> str | None:
    # A size change names no size: the action already says it.
    return None if act.action in SIZE_CHANGES else act.size


def describe_key(acts: Sequence[Act]) -> tuple:
    """What captions can tell apart: two videos of the set never share it."""
    return tuple((a.shape, a.colour, caption_size(a), a.action, a.position) for a in acts)


# ---------------------------------------------------------------- timing and geometry

def _windows(rng: np.random.Generator, num_frames: int, k: int, fps: float) -> list[tuple[int, int]]:
    """k ordered, non-overlapping windows with a lead-in, a tail and short empty gaps."""
    shortest = max(5, int(round(0.55 * fps)))
    pauses = [int(rng.uniform(0.0, 0.2) * fps)] + [int(rng.uniform(0.0, 0.25) * fps) for _ in range(k - 1)]
    tail = int(rng.uniform(0.0, 0.2) * fps)
    while num_frames - sum(pauses) - tail < k * shortest:
        # Short videos at low frame rates: give the events the pauses' time.
        pauses = [p // 2 for p in pauses]
        tail //= 2
        if not any(pauses) and not tail:
            shortest = max(3, (num_frames // k))
            break
    usable = num_frames - sum(pauses) - tail
    weights = rng.uniform(0.6, 1.4, size=k)
    lengths = np.maximum(shortest, np.floor(usable * weights / weights.sum()).astype(int))
    while lengths.sum() > usable:
        lengths[int(np.argmax(lengths))] -= 1
    lengths[int(rng.integers(k))] += usable - int(lengths.sum())
    windows, cursor = [], 0
    for pause, length in zip(pauses, lengths):
        cursor += pause
        windows.append((cursor, cursor + int(length)))
        cursor += int(length)
    return windows


def _geometry(rng: np.random.Generator, action: str, size: str) -> dict:
    r = radius_for(rng, size)
    margin = _BIG_MAX + 0.03  # room for a big twin of the same event too
    if action in MOVES:
        dx, dy = MOVES[action]
        extent = float(rng.uniform(0.26, min(0.52, 1.0 - 2 * margin)))
        low = margin + (extent if dx + dy < 0 else 0.0)
        start = float(rng.uniform(low, 1.0 - margin - (0.0 if dx + dy < 0 else extent)))
        end = start + (dx + dy) * extent
        across = float(rng.uniform(margin + 0.02, 1.0 - margin - 0.02))
        a, b = ((start, across), (end, across)) if dx else ((across, start), (across, end))
        return {"start_xy": _round2(a), "end_xy": _round2(b), "r_start": r, "r_end": r, "position": None}
    if action in SIZE_CHANGES:
        small, big = radius_for(rng, "small"), radius_for(rng, "big")
        centre = _round2((rng.uniform(0.32, 0.68), rng.uniform(0.32, 0.68)))
        r0, r1 = (small, big) if action == "grow" else (big, small)
        return {"start_xy": centre, "end_xy": centre, "r_start": r0, "r_end": r1, "position": None}
    place = PLACES[int(rng.integers(len(PLACES)))]
    px, py = PLACE_XY[place]
    xy = _round2((px + rng.uniform(-PLACE_JITTER, PLACE_JITTER), py + rng.uniform(-PLACE_JITTER, PLACE_JITTER)))
    return {"start_xy": xy, "end_xy": xy, "r_start": r, "r_end": r, "position": place}


def _round2(xy: Sequence[float]) -> tuple[float, float]:
    # Rounded so the manifest holds exactly the numbers the renderer draws.
    return round(float(xy[0]), 4), round(float(xy[1]), 4)


def _path(act: Act, steps: int = 9) -> np.ndarray:
    t = np.linspace(0.0, 1.0, steps)[:, None]
    return np.asarray(act.start_xy)[None] * (1 - t) + np.asarray(act.end_xy)[None] * t


def _clear_of(point: Sequence[float], radius: float, acts: Sequence[Act], *, own_size: bool = False) -> bool:
    """Whether an object at ``point`` stays off every path of ``acts``: at the biggest
    size any twin could give them, or (``own_size``) at their own largest radius."""
    for act in acts:
        reach = max(act.r_start, act.r_end) if own_size else _BIG_MAX
        gap = np.min(np.linalg.norm(_path(act) - np.asarray(point)[None], axis=1))
        if gap < radius + reach + 0.03:
            return False
    return True


def sample_acts(rng: np.random.Generator, k: int, num_frames: int, fps: float) -> tuple[Act, ...]:
    """k events with distinct colours (so no two objects on screen share one)."""
    colours = [COLOURS[i] for i in rng.choice(len(COLOURS), size=k, replace=False)]
    acts = []
    for colour, (start, stop) in zip(colours, _windows(rng, num_frames, k, fps)):
        action = ACTIONS[int(rng.integers(len(ACTIONS)))]
        size = {"grow": "small", "shrink": "big"}.get(action) or ("small", "big")[int(rng.integers(2))]
        acts.append(Act(shape=SHAPES[int(rng.integers(len(SHAPES)))], colour=colour, size=size, action=action,
                        start_frame=start, end_frame=stop, ease=EASINGS[int(rng.integers(len(EASINGS)))],
                        hidden=round(float(rng.uniform(0.2, 0.45)), 3), fade=int(rng.integers(1, 5)),
                        tilt=round(float(rng.uniform(-7.0, 7.0)), 2), **_geometry(rng, action, size)))
    if rng.random() < 0.35:
        acts = _add_hold(rng, acts)
    return tuple(acts)


def _add_hold(rng: np.random.Generator, acts: list[Act]) -> list[Act]:
    """Let one object stay on screen, still, before or after its own event, where it
    keeps clear of the others (appear/disappear never: that would undo the action)."""
    for index in rng.permutation(len(acts)):
        act = acts[int(index)]
        others = [a for j, a in enumerate(acts) if j != index]
        if act.action in ("appear", "disappear"):
            continue
        # Both ends: a direction twin holds the object at the other one.
        if all(_clear_of(p, max(act.r_start, act.r_end), others, own_size=True) for p in (act.start_xy, act.end_xy)):
            acts[int(index)] = replace(act, hold=("before", "after")[int(rng.integers(2))])
            break
    return acts


# ---------------------------------------------------------------- twins

def reverse_acts(acts: Sequence[Act], num_frames: int) -> tuple[Act, ...]:
    """The same events (each still played forwards) in the opposite order: the timeline's
    windows are mirrored, so lead-in, gaps and tail are mirrored too."""
    flipped = [replace(a, start_frame=num_frames - a.end_frame, end_frame=num_frames - a.start_frame)
               for a in acts]
    return tuple(sorted(flipped, key=lambda a: a.start_frame))


def play_backwards(act: Act) -> Act:
    """The event run backwards in time: ends swapped, the action its opposite."""
    action = BACKWARDS[act.action]
    size = {"grow": "small", "shrink": "big"}.get(action, act.size)
    return replace(act, action=action, size=size, start_xy=act.end_xy, end_xy=act.start_xy,
                   r_start=act.r_end, r_end=act.r_start)


def direction_twin(rng: np.random.Generator, acts: Sequence[Act]) -> tuple[tuple[Act, ...], dict] | None:
    choices = [i for i, a in enumerate(acts) if a.action in BACKWARDS]
    if not choices:
        return None
    index = choices[int(rng.integers(len(choices)))]
    new = play_backwards(acts[index])
    out = tuple(new if j == index else a for j, a in enumerate(acts))
    return out, {"event": index, "from": acts[index].action, "to": new.action}


def swap_twin(rng: np.random.Generator, acts: Sequence[Act]) -> tuple[tuple[Act, ...], str, dict] | None:
    held = [a for a in acts if a.hold != "none"]
    # A bigger object must still keep clear of one held on screen beside it.
    options = [(i, attr) for i in range(len(acts)) for attr in ("colour", "shape", "size")
               if not (attr == "size" and (acts[i].action in SIZE_CHANGES or held))]
    if not options:
        return None
    index, attribute = options[int(rng.integers(len(options)))]
    act = acts[index]
    if attribute == "colour":
        used = {a.colour for a in acts}
        free = [c for c in COLOURS if c not in used]
        new = replace(act, colour=free[int(rng.integers(len(free)))])
    elif attribute == "shape":
        rest = [s for s in SHAPES if s != act.shape]
        new = replace(act, shape=rest[int(rng.integers(len(rest)))])
    else:
        size = "big" if act.size == "small" else "small"
        r = radius_for(rng, size)
        new = replace(act, size=size, r_start=r, r_end=r)
    out = tuple(new if j == index else a for j, a in enumerate(acts))
    return out, attribute, {"event": index, "attribute": attribute, "from": getattr(act, attribute),
                            "to": getattr(new, attribute)}


# ---------------------------------------------------------------- style

def _background(rng: np.random.Generator) -> dict:
    kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    # Anything from near black to near white, faintly tinted: sometimes brighter than the objects.
    level = float(rng.uniform(14, 228))
    tint = rng.uniform(-14, 14, size=3)
    base = np.clip(level + tint, 0, 255)
    other = np.clip(base + rng.uniform(-55, 55) + rng.uniform(-8, 8, size=3), 0, 255)
    return {"kind": kind, "base": [round(float(v), 1) for v in base], "other": [round(float(v), 1) for v in other],
            "angle": round(float(rng.uniform(0, 360)), 1), "texture_seed": int(rng.integers(2**31)),
            "texture_amp": round(float(rng.uniform(4, 18)), 1)}


def _contrast_ok(background: dict, colours: Sequence[tuple[int, int, int]]) -> bool:
    # Both ends of a gradient, plus the texture's reach, must stay far from every fill.
    amp = background["texture_amp"] if background["kind"] == "clouds" else 0.0
    ends = [np.asarray(background["base"]), np.asarray(background["other"])]
    if background["kind"] == "flat":
        ends = ends[:1]
    for rgb in colours:
        for end in ends:
            if np.linalg.norm(np.asarray(rgb, dtype=float) - end) < MIN_CONTRAST + amp:
                return False
    return True


def sample_style(rng: np.random.Generator, frame_size: tuple[int, int], fps: float) -> Style:
    """A family's look before its colours and distractors are known (see finish_style)."""
    width, height = frame_size
    seconds = float(rng.uniform(*SECONDS_RANGE))
    num_frames = int(round(seconds * fps))
    short = min(width, height)
    side = short * float(rng.uniform(0.86, 1.0))
    slack = (short - side) / 2
    left = (width - side) / 2 + float(rng.uniform(-slack, slack))
    top = (height - side) / 2 + float(rng.uniform(-slack, slack))
    outline = float(rng.choice([0.0, 0.0, 0.8, 1.2, 1.6]))
    return Style(width=width, height=height, fps=fps, num_frames=num_frames,
                 stage=(round(left, 3), round(top, 3), round(side, 3)), background={}, palette={},
                 noise_sigma=round(float(rng.uniform(1.0, 6.0)), 2), chroma_noise=round(float(rng.uniform(0.0, 2.5)), 2),
                 flicker=round(float(rng.uniform(0.0, 0.02)), 4), shading=round(float(rng.uniform(0.0, 0.14)), 3),
                 light_angle=round(float(rng.uniform(0, 360)), 1), outline=outline,
                 outline_gain=round(float(rng.choice([rng.uniform(0.45, 0.7), rng.uniform(1.15, 1.35)])), 3),
                 crf=int(rng.choice([18, 21, 23, 26, 28])))


def finish_style(rng: np.random.Generator, style: Style, family_acts: Sequence[Sequence[Act]]) -> Style:
    """Shades for the family's colours, a background far from all of them, and distractors
    in colours no event of the family uses, kept off every event's path."""
    used = sorted({a.colour for acts in family_acts for a in acts})
    spare = [c for c in COLOURS if c not in used]
    n_props = int(rng.choice([0, 0, 0, 1, 1, 2]))
    prop_colours = [spare[i] for i in rng.permutation(len(spare))[:n_props]]
    palette = {c: shade(rng, c) for c in COLOURS}
    background = _background(rng)
    for _ in range(60):
        if _contrast_ok(background, [palette[c] for c in used + prop_colours]):
            break
        background = _background(rng)
    else:  # no tint far from all of them: a dark flat grey is always far from these fills
        background = {**background, "kind": "flat", "base": [30.0, 30.0, 34.0], "other": [30.0, 30.0, 34.0]}
    every_act = [a for acts in family_acts for a in acts]
    props: list[Prop] = []
    for colour in prop_colours:
        for _ in range(40):
            radius = float(rng.uniform(0.06, 0.11))
            xy = _round2(rng.uniform(0.12, 0.88, size=2))
            if _clear_of(xy, radius, every_act) and all(
                    np.hypot(xy[0] - p.xy[0], xy[1] - p.xy[1]) > radius + p.radius + 0.04 for p in props):
                props.append(Prop(shape=SHAPES[int(rng.integers(len(SHAPES)))], colour=colour, xy=xy,
                                  radius=round(radius, 4), tilt=round(float(rng.uniform(-10, 10)), 2)))
                break
    return replace(style, background=background, palette=palette, props=tuple(props))


def family_wants(rng: np.random.Generator, family: int) -> tuple[bool, bool, bool]:
    """(reversed, direction, swap) twins for a family. The first family gets all three so
    even a handful of videos holds every relation."""
    if family == 0:
        return True, True, True
    draws = rng.random(3) < TWIN_RATE
    return bool(draws[0]), bool(draws[1]), bool(draws[2])
