"""The randomised domain of the synthetic benchmark (``vidsearch synth --domain randomized``).

The classic domain (:mod:`vidsearch.synth_scenes`) fixes almost every visual choice:
one flat grey background darker than every object, six exact colours, two exact
radii, aliased masks, one object on screen at a time, moves from 0.25 to 0.75 of the
frame, 3-s clips and a handful of caption templates. A model trained only there learns
those constants. This domain keeps the *vocabulary* (colour names, shapes, size words,
actions) and the scene model (ordered events, twins, caption keys) and randomises the
rest, so that what stays constant is exactly what the captions name:

- per family, a *look* (:func:`sample_look`): frame size and aspect ratio, fps, length,
  x264 crf, sensor noise, and a background (flat, linear or radial gradient, tinted,
  optionally textured) whose brightness may exceed the objects' but which always keeps
  a minimum colour distance from every object shade of the family;
- per event, a *style* (:func:`sample_event`): a shade of its colour name (hue,
  saturation and value jittered within a nameable range), a radius anywhere in its size
  word's range, a surface texture, easing, a motion that covers only part of the
  segment and of the frame, a variable hidden share and fade for appear/disappear, and
  a *linger*: frames the object stays visible (at rest) after its event, while the
  next one acts;
- twins: reversed and one-attribute swaps as in the classic domain (swaps here change
  colour, shape or size only) plus *direction* twins, one event played backwards;
- captions (:mod:`vidsearch.synth_grammar`): a wider grammar with events named out of
  temporal order behind explicit markers, and partial captions (train split only).

Coordinates in an event are fractions of the *stage*, the centred square of side
min(width, height): the trainer and ingest scale the shorter side and centre-crop, so
the stage is what a model sees; wider frames only add background around it.

Rendering lives in :mod:`vidsearch.synth_domain_render`. Everything here is a pure
function of its seeded ``numpy.random.Generator``.
"""
from __future__ import annotations

import colorsys
import math
from dataclasses import replace
from typing import Any, Sequence

import numpy as np

from vidsearch.synth_grammar import full_captions, partial_caption
from vidsearch.synth_scenes import (ACTIONS, COLOURS, MIN_EVENT_FRAMES, MOVES, POSITIONS, SHAPES, SIZES, Event,
                                    VideoSpec, _flag, _objects_distinct, caption_key, flip_direction, reverse_events,
                                    swap_attribute)

DOMAINS: tuple[str, ...] = ("classic", "randomized")
# Swaps change what a caption names about an object; a flipped action is its own twin kind here.
RANDOM_SWAP_ATTRIBUTES: tuple[str, ...] = ("colour", "shape", "size")
# Radius ranges (fraction of the stage side) per size word: disjoint, with a gap, so a
# radius still says which word applies; the classic radii (0.10, 0.17) lie inside.
RADIUS_RANGES: dict[str, tuple[float, float]] = {"small": (0.075, 0.115), "big": (0.155, 0.2)}
# Per colour name: hue jitter (fraction of the circle), saturation and value ranges that
# keep the shade nameable. Yellow's hue range is narrow: it turns orange or lime fast.
SHADE_RANGES: dict[str, tuple[float, tuple[float, float], tuple[float, float]]] = {
    "red": (0.02, (0.65, 0.95), (0.72, 1.0)),
    "green": (0.04, (0.6, 0.95), (0.55, 0.9)),
    "blue": (0.03, (0.6, 0.9), (0.75, 1.0)),
    "yellow": (0.012, (0.7, 0.95), (0.85, 1.0)),
    "purple": (0.025, (0.55, 0.8), (0.65, 0.9)),
    "white": (0.0, (0.0, 0.06), (0.88, 1.0)),
}
EASES: tuple[str, ...] = ("linear", "in", "out", "inout")
_REVERSED_EASE = {"linear": "linear", "in": "out", "out": "in", "inout": "inout"}
# Smallest RGB distance between an object shade and any background colour, plus the
# texture amplitude: what keeps an object from getting lost in the background.
MIN_CONTRAST = 70.0
# Frame-size, aspect and fps multipliers around the --size / --fps the user gave.
SIZE_SCALES: tuple[float, ...] = (0.75, 1.0, 1.25, 1.5)
ASPECTS: tuple[float, ...] = (1.0, 1.0, 4 / 3, 3 / 4, 16 / 9, 3 / 2)
FPS_SCALES: tuple[float, ...] = (0.75, 1.0, 1.25, 1.5)
SECONDS_RANGE: tuple[float, float] = (0.67, 1.67)
CRF_RANGE: tuple[int, int] = (18, 36)
MAX_NOISE = 6.0


def _r(value: float, digits: int = 4) -> float:
    # Rounded so the manifest holds exactly the numbers the renderer uses.
    return round(float(value), digits)


def _even(value: float) -> int:
    return max(16, int(round(value / 2)) * 2)


# ---------------------------------------------------------------- styles

def sample_shade(rng: np.random.Generator, colour: str) -> list[int]:
    """An RGB shade of a colour name: its palette hue, jittered within a nameable range."""
    hue, _, _ = colorsys.rgb_to_hsv(*(c / 255 for c in COLOURS[colour]))
    jitter, (s_lo, s_hi), (v_lo, v_hi) = SHADE_RANGES[colour]
    h = (hue + rng.uniform(-jitter, jitter)) % 1.0
    rgb = colorsys.hsv_to_rgb(h, rng.uniform(s_lo, s_hi), rng.uniform(v_lo, v_hi))
    return [int(round(255 * c)) for c in rgb]


def sample_radius(rng: np.random.Generator, size: str) -> float:
    return _r(rng.uniform(*RADIUS_RANGES[size]))


def _sample_style(rng: np.random.Generator, colour: str, radii: tuple[float, float], linger_max: int) -> dict[str, Any]:
    t0, t1 = rng.uniform(0.0, 0.25), rng.uniform(0.75, 1.0)
    lingers = rng.random() < 0.5
    return {
        "rgb": sample_shade(rng, colour),
        "radius": [radii[0], radii[1]],
        "ease": EASES[int(rng.integers(len(EASES)))],
        "span": [_r(t0, 3), _r(t1, 3)],  # the share of the segment the motion takes
        "hidden": _r(rng.uniform(0.3, 0.5), 3),  # appear/disappear: hidden share of the segment
        "fade": int(rng.integers(0, 4)),  # frames of alpha ramp next to the hidden part
        # Frames the object stays at rest after its event (cut at the video's end): drawn
        # without regard to the event's place, so a reversed twin has the same statistics.
        "linger": int(rng.integers(1, linger_max + 1)) if lingers else 0,
        "texture": [_r(rng.uniform(0.0, 0.08), 3), _r(rng.uniform(1.0, 4.0), 3), _r(rng.uniform(1.0, 4.0), 3),
                    _r(rng.uniform(0, 2 * math.pi), 3), _r(rng.uniform(0, 2 * math.pi), 3)],
        "light": _r(rng.uniform(0.0, 0.1), 3),  # a soft lit-from-top-left shading
    }


def reverse_style(style: dict[str, Any]) -> dict[str, Any]:
    """The style of the same event played backwards: radii swapped, easing and the motion
    span mirrored (so the segment's frames are its original frames in reverse order)."""
    t0, t1 = style["span"]
    return {**style, "radius": list(reversed(style["radius"])), "ease": _REVERSED_EASE[style["ease"]],
            "span": [_r(1 - t1, 3), _r(1 - t0, 3)]}


def sample_event(rng: np.random.Generator, shape: str, colour: str, start: int, stop: int,
                 linger_max: int | None = None) -> Event:
    """One event with a randomised style; its linger is at most ``linger_max`` frames
    (default: its own length). Same signature as the classic sampler, so
    :mod:`vidsearch.synth_long` can plan with either."""
    action = ACTIONS[int(rng.integers(len(ACTIONS)))]
    size = list(SIZES)[int(rng.integers(len(SIZES)))]
    position = None
    if action in MOVES:
        dx, dy = MOVES[action]
        # A move covers 25-55% of the stage, starting anywhere that keeps a big object inside.
        extent = rng.uniform(0.25, 0.55)
        begin = rng.uniform(0.2, 0.8 - extent)
        end = begin + extent
        if dx + dy < 0:
            begin, end = 1 - begin, 1 - end
        across = rng.uniform(0.28, 0.72)
        start_xy, end_xy = ((_r(begin, 3), _r(across, 3)), (_r(end, 3), _r(across, 3))) if dx else \
            ((_r(across, 3), _r(begin, 3)), (_r(across, 3), _r(end, 3)))
        radii = (sample_radius(rng, size),) * 2
    elif action in ("grow", "shrink"):
        size = "small" if action == "grow" else "big"
        small, big = sample_radius(rng, "small"), sample_radius(rng, "big")
        radii = (small, big) if action == "grow" else (big, small)
        start_xy = end_xy = (_r(rng.uniform(0.35, 0.65), 3), _r(rng.uniform(0.35, 0.65), 3))
    else:
        position = list(POSITIONS)[int(rng.integers(len(POSITIONS)))]
        px, py = POSITIONS[position]
        start_xy = end_xy = (_r(px + rng.uniform(-0.05, 0.05), 3), _r(py + rng.uniform(-0.05, 0.05), 3))
        radii = (sample_radius(rng, size),) * 2
    style = _sample_style(rng, colour, radii, max(1, linger_max or stop - start))
    return Event(shape, colour, size, action, start_xy, end_xy, start, stop, position, style=style)


def restyle(rng: np.random.Generator, old: Event, new: Event) -> Event:
    """A swapped event's style fitted to what changed: a new shade for a new colour name,
    a new radius for a new size word."""
    style = dict(new.style or {})
    if new.colour != old.colour:
        style["rgb"] = sample_shade(rng, new.colour)
    if new.size != old.size and new.action not in ("grow", "shrink"):
        style["radius"] = [sample_radius(rng, new.size)] * 2
    return replace(new, style=style)


# ---------------------------------------------------------------- looks

def sample_frame_size(rng: np.random.Generator, size: int) -> dict[str, int]:
    """Width and height (even) around a short side of ``size``, in one of ASPECTS."""
    short = _even(size * SIZE_SCALES[int(rng.integers(len(SIZE_SCALES)))])
    aspect = ASPECTS[int(rng.integers(len(ASPECTS)))]
    long_side = _even(short * max(aspect, 1 / aspect))
    width, height = (long_side, short) if aspect >= 1 else (short, long_side)
    return {"width": min(width, 1024), "height": min(height, 1024)}


def sample_timing(rng: np.random.Generator, size: int, fps: float, seconds: float,
                  min_frames: int) -> dict[str, Any]:
    """Frame size, aspect ratio, fps and length of one family's videos."""
    frame = sample_frame_size(rng, size)
    video_fps = _r(fps * FPS_SCALES[int(rng.integers(len(FPS_SCALES)))], 3)
    frames = max(min_frames, int(round(video_fps * seconds * rng.uniform(*SECONDS_RANGE))))
    return {**frame, "fps": video_fps, "num_frames": frames}


def _segment_distance(point: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    ab = b - a
    t = 0.0 if not ab.any() else float(np.clip(np.dot(point - a, ab) / np.dot(ab, ab), 0.0, 1.0))
    return float(np.linalg.norm(point - (a + t * ab)))


def _hsv255(h: float, s: float, v: float) -> list[int]:
    return [int(round(255 * c)) for c in colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))]


def sample_background(rng: np.random.Generator, shades: Sequence[Sequence[int]], attempts: int = 60) -> dict[str, Any]:
    """A background whose every colour (the gradient's segment, +- texture) keeps
    MIN_CONTRAST from every shade; brightness is uniform, so it often exceeds the objects'."""
    points = [np.asarray(s, dtype=float) for s in shades]
    for _ in range(attempts):
        hue, level = rng.uniform(0, 1), rng.uniform(0.03, 0.97)
        sat = rng.uniform(0.0, 0.15) if rng.random() < 0.6 else rng.uniform(0.15, 0.45)
        c0 = _hsv255(hue, sat, level)
        kind = ("flat", "linear", "radial")[int(rng.choice(3, p=(0.25, 0.45, 0.3)))]
        c1 = c0 if kind == "flat" else _hsv255(hue + rng.uniform(-0.08, 0.08), sat * rng.uniform(0.5, 1.5),
                                              level + rng.choice((-1, 1)) * rng.uniform(0.1, 0.35))
        texture = ("none", "noise", "stripes")[int(rng.integers(3))]
        amp = 0.0 if texture == "none" else _r(rng.uniform(3.0, 14.0), 2)
        a, b = np.asarray(c0, dtype=float), np.asarray(c1, dtype=float)
        # The texture moves a pixel up to amp per channel: sqrt(3) * amp in RGB distance.
        if all(_segment_distance(p, a, b) >= MIN_CONTRAST + math.sqrt(3) * amp for p in points):
            return {"kind": kind, "c0": c0, "c1": c1, "angle": _r(rng.uniform(0, 2 * math.pi), 3),
                    "centre": [_r(rng.uniform(0.2, 0.8), 3), _r(rng.uniform(0.2, 0.8), 3)],
                    "texture": texture, "amp": amp, "cells": int(rng.integers(3, 11)),
                    "freq": _r(rng.uniform(0.15, 0.6), 3), "seed": int(rng.integers(2**31))}
    # Far from every palette shade: a dark, near-neutral flat background.
    return {"kind": "flat", "c0": [28, 28, 32], "c1": [28, 28, 32], "angle": 0.0, "centre": [0.5, 0.5],
            "texture": "none", "amp": 0.0, "cells": 4, "freq": 0.3, "seed": 0}


def sample_look(rng: np.random.Generator, timing: dict[str, Any], shades: Sequence[Sequence[int]]) -> dict[str, Any]:
    """Everything a family's videos share besides their events."""
    background = sample_background(rng, shades)
    return {**timing, "crf": int(rng.integers(CRF_RANGE[0], CRF_RANGE[1] + 1)),
            "noise": _r(rng.uniform(0.0, MAX_NOISE), 2), "noise_seed": int(rng.integers(2**31)),
            "background": background}


def background_level(look: dict[str, Any]) -> int:
    """A grey level summarising the background (the manifest's ``background`` field)."""
    bg = look["background"]
    return int(round((sum(bg["c0"]) + sum(bg["c1"])) / 6))


# ---------------------------------------------------------------- planning

def sample_events(rng: np.random.Generator, num_frames: int, k: int) -> tuple[Event, ...]:
    """k ordered events over num_frames frames, each with its own (shape, colour) and style."""
    picks = rng.choice(len(SHAPES) * len(COLOURS), size=k, replace=False)
    colours = list(COLOURS)
    # Uneven segments (weights 0.5-1.5): with variable lengths a segment is no clock.
    weights = rng.uniform(0.5, 1.5, size=k)
    extra = num_frames - k * MIN_EVENT_FRAMES
    lengths = [MIN_EVENT_FRAMES + int(s) for s in np.floor(extra * weights / weights.sum())]
    lengths[-1] += num_frames - sum(lengths)
    start, events = 0, []
    for pick, length in zip(picks, lengths):
        shape, colour = SHAPES[pick // len(COLOURS)], colours[pick % len(COLOURS)]
        events.append(sample_event(rng, shape, colour, start, start + length, num_frames))
        start += length
    return tuple(events)


def _sample_family(rng: np.random.Generator, num_frames: int, min_events: int, max_events: int,
                   wants: tuple[bool, bool, bool], seen: set[tuple]) -> list[tuple[tuple[Event, ...], str]]:
    want_reversed, want_swap, want_direction = wants
    while True:  # resampling is rare: the key space is ~10^6 for two events
        k = int(rng.integers(min_events, max_events + 1))
        events = sample_events(rng, num_frames, k)
        members = [(events, "base")]
        if want_reversed:
            members.append((reverse_events(events), "reversed"))
        if want_swap:
            swapped = swap_attribute(rng, events, RANDOM_SWAP_ATTRIBUTES)
            if swapped is None:
                continue
            changed = tuple(restyle(rng, old, new) for old, new in zip(events, swapped[0]))
            members.append((changed, f"swap:{swapped[1]}"))
        if want_direction:
            flipped = flip_direction(rng, events)
            if flipped is None:
                continue
            members.append((flipped[0], "direction"))
        keys = [caption_key(m) for m, _ in members]
        if len(set(keys)) == len(keys) and not seen.intersection(keys) and all(_objects_distinct(m) for m, _ in members):
            return members


def plan_randomized(n: int, seed: int, size: int, fps: float, seconds: float, *, reverse_rate: float = 0.4,
                    swap_rate: float = 0.4, direction_rate: float = 0.3, min_events: int = 2,
                    max_events: int = 3) -> list[VideoSpec]:
    """The n video specs of a randomised dataset, in families (base + twins) sharing a look.

    ``size``/``fps``/``seconds`` are the centres the per-family frame size, fps and
    length vary around. Deterministic in every argument; its own random stream, so it
    never reproduces a classic dataset's videos.
    """
    rng = np.random.default_rng([seed, 11])
    seen: set[tuple] = set()
    specs: list[VideoSpec] = []
    family = 0
    while len(specs) < n:
        # Different phases, so that the twin kinds do not always come together.
        wants = (_flag(family, reverse_rate, 1.0 - reverse_rate), _flag(family, swap_rate, 1.0 - swap_rate / 2),
                 _flag(family, direction_rate, 1.0 - direction_rate / 3))
        timing = sample_timing(rng, size, fps, seconds, max(9, 4 * max_events))
        members = _sample_family(rng, timing["num_frames"], min_events, max_events, wants, seen)
        seen.update(caption_key(events) for events, _ in members)
        look = sample_look(rng, timing, [e.style["rgb"] for events, _ in members for e in events])
        for events, variant in members[: n - len(specs)]:
            specs.append(VideoSpec(events, timing["num_frames"], background_level(look), family, variant,
                                   captions=full_captions(rng, events), look=look))
        family += 1
    return specs


def add_partial_captions(specs: Sequence[VideoSpec], splits: Sequence[str], seed: int,
                         rate: float = 0.7) -> tuple[list[VideoSpec], list[list[int]]]:
    """Append a partial caption (only some events, with a first/last anchor) to about
    ``rate`` of the *train* videos; return the specs and, per video, the indices of its
    partial captions (for the manifest's ``partial_captions``).

    Train only, so that evaluation (which reads every caption of val/test videos) keeps
    measuring full captions. A partial caption is kept only when no other video of the
    whole dataset matches its anchors, so it still identifies its video exactly and is
    never a false negative for another video in a batch.
    """
    rng = np.random.default_rng([seed, 12])
    keys = [caption_key(s.events) for s in specs]
    counts: dict[tuple, int] = {}
    for key in keys:
        for anchor in (("first", key[0]), ("last", key[-1]), ("ends", key[0], key[-1])):
            counts[anchor] = counts.get(anchor, 0) + 1
    out, marks = [], []
    for spec, split, key in zip(specs, splits, keys):
        kinds = ["first", "last"] + (["ends"] if len(key) > 2 else [])
        if split != "train" or rng.random() >= rate:
            out.append(spec)
            marks.append([])
            continue
        kind = kinds[int(rng.integers(len(kinds)))]
        anchor = {"first": ("first", key[0]), "last": ("last", key[-1]), "ends": ("ends", key[0], key[-1])}[kind]
        if counts[anchor] != 1:
            out.append(spec)
            marks.append([])
            continue
        text = partial_caption(rng, spec.events, kind)
        out.append(replace(spec, captions=spec.captions + (text,)))
        marks.append([len(spec.captions)])
    return out, marks


__all__ = ["ASPECTS", "DOMAINS", "EASES", "MIN_CONTRAST", "RADIUS_RANGES", "SHADE_RANGES", "add_partial_captions",
           "background_level", "plan_randomized", "restyle", "reverse_style", "sample_background", "sample_event",
           "sample_events", "sample_frame_size", "sample_look", "sample_shade", "sample_timing"]
