"""Drawing of the randomised domain (see :mod:`vidsearch.synth_domain`).

A pure function of a :class:`VideoSpec` with a ``look``: any frame range renders
alone (each event's track is computed over its whole segment, then indexed; sensor
noise is seeded per frame), so chunked and whole renders give the same frames.

Shapes are drawn anti-aliased: coverage is 0.5 minus a signed distance to the
outline, in pixels, clipped to [0, 1]. The shapes' outlines are the classic masks'
(square half-side 0.85 r, diamond 1.2 r, triangle apex -r / base +0.75 r).
"""
from __future__ import annotations

import math
from typing import Any, Iterator

import numpy as np
from PIL import Image

from vidsearch.synth_scenes import Event, VideoSpec

_TRIANGLE_NORM = math.sqrt(1.0 + 1.75 ** 2)


def ease(q: np.ndarray, kind: str) -> np.ndarray:
    """Easing curves on [0, 1]; "in" and "out" are each other played backwards."""
    if kind == "in":
        return q * q
    if kind == "out":
        return 1.0 - (1.0 - q) ** 2
    if kind == "inout":
        return q * q * (3.0 - 2.0 * q)
    return q


def signed_distance(shape: str, dx: np.ndarray, dy: np.ndarray, radius: float) -> np.ndarray:
    """Distance in pixels to the shape's outline, negative inside."""
    if shape == "circle":
        return np.sqrt(dx * dx + dy * dy) - radius
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) - 0.85 * radius
    if shape == "diamond":
        return (np.abs(dx) + np.abs(dy) - 1.2 * radius) / math.sqrt(2.0)
    if shape == "triangle":
        base = dy - 0.75 * radius
        side = (1.75 * np.abs(dx) - (dy + radius)) / _TRIANGLE_NORM
        return np.maximum(base, side)
    raise ValueError(f"unknown shape {shape!r}")


def event_track(event: Event, num_frames: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-frame centre x, y and radius (stage fractions) and opacity of one event's
    object from its start frame to the end of its linger (cut at ``num_frames``)."""
    style = event.style or {}
    length = event.num_frames
    progress = np.linspace(0.0, 1.0, length) if length > 1 else np.zeros(1)
    t0, t1 = style.get("span", (0.0, 1.0))
    q = ease(np.clip((progress - t0) / max(t1 - t0, 1e-6), 0.0, 1.0), style.get("ease", "linear"))
    (x0, y0), (x1, y1) = event.start_xy, event.end_xy
    r0, r1 = style["radius"]
    cx, cy, radius = x0 + (x1 - x0) * q, y0 + (y1 - y0) * q, r0 + (r1 - r0) * q
    alpha = np.ones(length)
    hidden = int(np.ceil(style.get("hidden", 0.4) * length))
    fade = min(int(style.get("fade", 0)), max(length - hidden - 1, 0))
    ramp = np.arange(1, fade + 1) / (fade + 1)
    # appear hides the first frames then fades in; disappear is that played backwards.
    if event.action == "appear":
        alpha[:hidden] = 0.0
        alpha[hidden:hidden + fade] = ramp
    elif event.action == "disappear":
        alpha[length - hidden:] = 0.0
        alpha[length - hidden - fade:length - hidden] = ramp[::-1]
    linger = max(0, min(int(style.get("linger", 0)), num_frames - event.end_frame))
    if linger:  # at rest in its final state while later events act
        cx, cy, radius, alpha = (np.concatenate([a, np.full(linger, a[-1])]) for a in (cx, cy, radius, alpha))
    return cx, cy, radius, alpha


def background_image(look: dict[str, Any]) -> np.ndarray:
    """float32[H, W, 3] background of a look: gradient plus texture (static per video)."""
    bg, width, height = look["background"], int(look["width"]), int(look["height"])
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    xs, ys = (xs + 0.5) / width, (ys + 0.5) / height
    c0, c1 = np.asarray(bg["c0"], np.float32), np.asarray(bg["c1"], np.float32)
    if bg["kind"] == "linear":
        t = (xs - 0.5) * math.cos(bg["angle"]) + (ys - 0.5) * math.sin(bg["angle"])
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    elif bg["kind"] == "radial":
        t = np.hypot(xs - bg["centre"][0], ys - bg["centre"][1])
        t = t / max(float(t.max()), 1e-6)
    else:
        t = np.zeros_like(xs)
    image = c0 + (c1 - c0) * t[..., None]
    amp = float(bg["amp"])
    if bg["texture"] == "noise" and amp > 0:
        # Smooth value noise: a small random grid, bicubically scaled up, in [-1, 1].
        cells = int(bg["cells"])
        grid = np.random.default_rng(int(bg["seed"])).uniform(-1, 1, size=(cells, cells)).astype(np.float32)
        smooth = np.asarray(Image.fromarray(grid, mode="F").resize((width, height), Image.BICUBIC))
        image += amp * np.clip(smooth, -1, 1)[..., None]
    elif bg["texture"] == "stripes" and amp > 0:
        along = xs * width * math.cos(bg["angle"]) + ys * height * math.sin(bg["angle"])
        image += amp * np.sin(along * float(bg["freq"]))[..., None]
    return image


def _draw(canvas: np.ndarray, event: Event, x: float, y: float, r: float, alpha: float,
          stage: tuple[float, float, float]) -> None:
    """Composite one object onto a float frame, in place (only its bounding box)."""
    if alpha <= 0:
        return
    side, ox, oy = stage
    cx, cy, radius = ox + x * side, oy + y * side, r * side
    height, width = canvas.shape[:2]
    reach = 1.25 * radius + 2
    x_lo, x_hi = max(int(cx - reach), 0), min(int(cx + reach) + 1, width)
    y_lo, y_hi = max(int(cy - reach), 0), min(int(cy + reach) + 1, height)
    if x_lo >= x_hi or y_lo >= y_hi:
        return
    dx = np.arange(x_lo, x_hi, dtype=np.float32)[None, :] + 0.5 - cx
    dy = np.arange(y_lo, y_hi, dtype=np.float32)[:, None] + 0.5 - cy
    cover = np.clip(0.5 - signed_distance(event.shape, dx, dy, radius), 0.0, 1.0) * alpha
    style = event.style or {}
    amp, fx, fy, px, py = style.get("texture", (0.0, 1.0, 1.0, 0.0, 0.0))
    # Texture and shading are in object coordinates, so they move and scale with it.
    shade = 1.0 + amp * np.sin(fx * dx / radius + px) * np.sin(fy * dy / radius + py)
    shade = shade - style.get("light", 0.0) * np.clip((dx + dy) / (2 * radius), -1, 1)
    colour = np.asarray(style.get("rgb", (255, 255, 255)), np.float32) * shade[..., None]
    box = canvas[y_lo:y_hi, x_lo:x_hi]
    box += (colour - box) * cover[..., None]


def render_frames(spec: VideoSpec, start: int = 0, stop: int | None = None) -> np.ndarray:
    """uint8[T, H, W, 3] RGB frames ``start``..``stop`` of a randomised-domain spec."""
    look = spec.look
    if look is None:
        raise ValueError("render_frames needs a spec with a look (the randomised domain)")
    stop = spec.num_frames if stop is None else min(stop, spec.num_frames)
    width, height = int(look["width"]), int(look["height"])
    side = float(min(width, height))
    stage = (side, (width - side) / 2, (height - side) / 2)
    background = background_image(look)
    tracks = [(event, event_track(event, spec.num_frames)) for event in spec.events]
    frames = np.empty((max(stop - start, 0), height, width, 3), dtype=np.uint8)
    for row, frame in enumerate(range(start, stop)):
        canvas = background.copy()
        shown = [(e, t) for e, t in tracks if e.start_frame <= frame < e.start_frame + len(t[0])]
        # Lingering objects first, the one acting now on top.
        shown.sort(key=lambda item: item[0].start_frame <= frame < item[0].end_frame)
        for event, (xs, ys, rs, alphas) in shown:
            i = frame - event.start_frame
            _draw(canvas, event, float(xs[i]), float(ys[i]), float(rs[i]), float(alphas[i]), stage)
        if look["noise"] > 0:
            canvas += np.random.default_rng([int(look["noise_seed"]), frame]).normal(
                0.0, float(look["noise"]), size=canvas.shape).astype(np.float32)
        frames[row] = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return frames


def iter_frames(spec: VideoSpec, chunk_frames: int = 256) -> Iterator[np.ndarray]:
    """The frames of :func:`render_frames`, ``chunk_frames`` at a time (long videos)."""
    for start in range(0, spec.num_frames, chunk_frames):
        yield from render_frames(spec, start, start + chunk_frames)


__all__ = ["background_image", "ease", "event_track", "iter_frames", "render_frames", "signed_distance"]
