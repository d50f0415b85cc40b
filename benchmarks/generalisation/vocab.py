"""The words this set shares with the training data, and nothing else.

Only the *names* (colours, shapes, size words, actions, places) and what each action
means are common ground with the training renderer: a caption here must be a
sentence the trained text tower could in principle understand. Every number below
(shades, radii, places, extents) is this renderer's own, chosen apart from the
training renderer's, so that a model which memorised those numbers is caught out.
"""
from __future__ import annotations

import colorsys

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "white")
SIZES: tuple[str, ...] = ("small", "big")
MOVES: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
ACTIONS: tuple[str, ...] = ("left", "right", "up", "down", "grow", "shrink", "stay", "appear", "disappear")
PLACES: tuple[str, ...] = ("top", "bottom", "left", "right", "centre")
# Playing an event backwards turns it into this action (the "direction" twin).
BACKWARDS: dict[str, str] = {"left": "right", "right": "left", "up": "down", "down": "up",
                             "grow": "shrink", "shrink": "grow", "appear": "disappear", "disappear": "appear"}
PLACED_ACTIONS: frozenset[str] = frozenset({"stay", "appear", "disappear"})
SIZE_CHANGES: frozenset[str] = frozenset({"grow", "shrink"})

# Hue (degrees), saturation and value ranges per colour name; each video draws its own
# shade inside them, so no two videos need share an exact RGB value.
_HSV_RANGES: dict[str, tuple[tuple[float, float], tuple[float, float], tuple[float, float]]] = {
    "red": ((352.0, 366.0), (0.72, 0.90), (0.78, 0.93)),
    "green": ((105.0, 138.0), (0.62, 0.85), (0.62, 0.82)),
    "blue": ((212.0, 230.0), (0.68, 0.88), (0.80, 0.95)),
    "yellow": ((48.0, 57.0), (0.78, 0.92), (0.90, 0.98)),
    "purple": ((272.0, 292.0), (0.55, 0.75), (0.62, 0.80)),
    "white": ((0.0, 360.0), (0.00, 0.05), (0.91, 0.98)),
}

# Object "radius" as a fraction of the stage side (the square the events live in),
# per size word. The gap between the ranges keeps "small" and "big" unmistakable.
RADIUS_RANGES: dict[str, tuple[float, float]] = {"small": (0.068, 0.092), "big": (0.148, 0.182)}

# Where a placed event (stay/appear/disappear) happens, in stage coordinates (x, y),
# y pointing down, before a per-event jitter.
PLACE_XY: dict[str, tuple[float, float]] = {
    "top": (0.5, 0.21), "bottom": (0.5, 0.79), "left": (0.21, 0.5), "right": (0.79, 0.5), "centre": (0.5, 0.5),
}
PLACE_JITTER = 0.045


def shade(rng: np.random.Generator, colour: str) -> tuple[int, int, int]:
    """One RGB shade of a colour name."""
    (h0, h1), (s0, s1), (v0, v1) = _HSV_RANGES[colour]
    hue = (rng.uniform(h0, h1) % 360.0) / 360.0
    r, g, b = colorsys.hsv_to_rgb(hue, rng.uniform(s0, s1), rng.uniform(v0, v1))
    return int(round(255 * r)), int(round(255 * g)), int(round(255 * b))


def radius_for(rng: np.random.Generator, size: str) -> float:
    low, high = RADIUS_RANGES[size]
    return round(float(rng.uniform(low, high)), 4)
