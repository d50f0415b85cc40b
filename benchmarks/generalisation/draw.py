"""Pixels of a plan: textured background, anti-aliased shaded shapes, sensor noise.

Shapes are drawn from signed distances (pixels; negative inside), turned into
coverage with a one-pixel ramp, so edges are anti-aliased at any size and sub-pixel
positions move smoothly. Fills are lit by a soft directional gradient and may have
a darker or lighter rim. Noise is drawn per family and frame index, so the members
of a family share it exactly: where twins show the same thing, their frames match.
"""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np

from .scenes import Act, Prop, Style, VideoPlan

_EDGE = 1.0  # width of the anti-aliasing ramp, pixels


def ease(name: str, u: np.ndarray | float) -> np.ndarray:
    """Progress in [0, 1] -> eased progress; every easing here is point-symmetric."""
    u = np.clip(np.asarray(u, dtype=np.float64), 0.0, 1.0)
    if name == "linear":
        return u
    if name == "smoothstep":
        return u * u * (3 - 2 * u)
    if name == "cosine":
        return 0.5 - 0.5 * np.cos(np.pi * u)
    if name == "smootherstep":
        return u * u * u * (u * (6 * u - 15) + 10)
    if name == "pause":  # a still moment at both ends, then a smooth move
        v = np.clip((u - 0.15) / 0.7, 0.0, 1.0)
        return v * v * (3 - 2 * v)
    raise ValueError(f"unknown easing {name!r}")


def act_state(act: Act, frame: int) -> tuple[tuple[float, float], float, float] | None:
    """(centre in stage coordinates, radius as a stage fraction, opacity) at ``frame``,
    or None when the object is off screen."""
    if frame < act.start_frame:
        if act.hold != "before":
            return None
        u = 0.0
    elif frame >= act.end_frame:
        if act.hold != "after":
            return None
        u = 1.0
    else:
        u = (frame - act.start_frame) / max(act.num_frames - 1, 1)
    p = float(ease(act.ease, u))
    x = act.start_xy[0] + (act.end_xy[0] - act.start_xy[0]) * p
    y = act.start_xy[1] + (act.end_xy[1] - act.start_xy[1]) * p
    radius = act.r_start + (act.r_end - act.r_start) * p
    opacity = 1.0
    if act.action in ("appear", "disappear"):
        # appear: absent for the first `hidden` share, then fades in; disappear is that
        # exactly mirrored in time (u -> 1 - u), so one is the other played backwards.
        lit = u if act.action == "appear" else 1.0 - u
        ramp = max(act.fade, 1) / max(act.num_frames - 1, 1)
        opacity = float(np.clip((lit - act.hidden) / ramp + 1.0 / max(act.fade, 1), 0.0, 1.0))
    if opacity <= 0.0:
        return None
    return (x, y), radius, opacity


# ---------------------------------------------------------------- shapes

def _polygon(points: np.ndarray, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Signed distance to a convex polygon (counter-clockwise in image axes): the largest
    distance past any edge line. Exact inside and along edges, a touch short near
    outer corners, which only softens the corner's last pixel."""
    dist = np.full(px.shape, -np.inf)
    for i in range(len(points)):
        (x0, y0), (x1, y1) = points[i], points[(i + 1) % len(points)]
        ex, ey = x1 - x0, y1 - y0
        length = math.hypot(ex, ey)
        nx, ny = ey / length, -ex / length  # outward normal for this winding
        dist = np.maximum(dist, (px - x0) * nx + (py - y0) * ny)
    return dist


def _outline_points(shape: str, r: float) -> np.ndarray:
    if shape == "square":
        h = 0.8 * r  # about the circle's area
        return np.array([(-h, -h), (h, -h), (h, h), (-h, h)])
    if shape == "triangle":
        # Equilateral, pointing up, centred on its centroid; a bit larger to match the others' area.
        c = 1.4 * r
        return np.array([(c * math.cos(a), c * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)])[::-1]
    if shape == "diamond":
        # Taller than wide, so a tilted square is never mistaken for it.
        return np.array([(0.0, -1.2 * r), (0.86 * r, 0.0), (0.0, 1.2 * r), (-0.86 * r, 0.0)])[::-1]
    raise ValueError(f"unknown shape {shape!r}")


def signed_distance(shape: str, dx: np.ndarray, dy: np.ndarray, r: float, tilt_deg: float) -> np.ndarray:
    """Distance (pixels) from the shape's edge at offsets (dx, dy) from its centre."""
    if shape == "circle":
        return np.hypot(dx, dy) - r
    a = math.radians(tilt_deg)
    ca, sa = math.cos(a), math.sin(a)
    # Rotate the sample points the other way instead of the outline.
    px, py = ca * dx + sa * dy, -sa * dx + ca * dy
    points = _outline_points(shape, r)
    if shape == "square":
        # Slightly rounded corners, like a printed sticker.
        round_r = 0.12 * r
        h = 0.8 * r - round_r
        qx, qy = np.abs(px) - h, np.abs(py) - h
        outside = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0))
        return outside + np.minimum(np.maximum(qx, qy), 0) - round_r
    winding = _signed_area(points)
    return _polygon(points if winding > 0 else points[::-1], px, py)


def _signed_area(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return 0.5 * float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))


def paint(canvas: np.ndarray, style: Style, shape: str, colour: str, centre: tuple[float, float],
          radius: float, tilt: float, opacity: float) -> None:
    """Composite one object onto ``canvas`` (float32 H x W x 3), in place. ``centre`` and
    ``radius`` are in stage units."""
    left, top, side = style.stage
    cx, cy, r = left + centre[0] * side, top + centre[1] * side, radius * side
    reach = 1.35 * r + 2.0
    x0, x1 = max(int(cx - reach), 0), min(int(math.ceil(cx + reach)), canvas.shape[1])
    y0, y1 = max(int(cy - reach), 0), min(int(math.ceil(cy + reach)), canvas.shape[0])
    if x0 >= x1 or y0 >= y1:
        return
    # Pixel centres sit at +0.5.
    dx = (np.arange(x0, x1, dtype=np.float64) + 0.5 - cx)[None, :]
    dy = (np.arange(y0, y1, dtype=np.float64) + 0.5 - cy)[:, None]
    dx, dy = np.broadcast_to(dx, (y1 - y0, x1 - x0)), np.broadcast_to(dy, (y1 - y0, x1 - x0))
    dist = signed_distance(shape, dx, dy, r, tilt)
    cover = np.clip(0.5 - dist / _EDGE, 0.0, 1.0) * opacity
    fill = np.asarray(style.palette[colour], dtype=np.float64)
    a = math.radians(style.light_angle)
    light = 1.0 + style.shading * np.clip((dx * math.cos(a) + dy * math.sin(a)) / max(r, 1e-6), -1, 1)
    rgb = fill[None, None, :] * light[..., None]
    if style.outline > 0:
        rim = np.clip(0.5 + (dist + style.outline) / _EDGE, 0.0, 1.0)[..., None]
        rgb = rgb * (1 - rim) + np.clip(fill * style.outline_gain, 0, 255)[None, None, :] * rim
    patch = canvas[y0:y1, x0:x1]
    patch += (rgb - patch) * cover[..., None]


# ---------------------------------------------------------------- background and noise

def background(style: Style) -> np.ndarray:
    """float32 H x W x 3: the family's static backdrop."""
    spec, h, w = style.background, style.height, style.width
    base, other = np.asarray(spec["base"], dtype=np.float64), np.asarray(spec["other"], dtype=np.float64)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    xs, ys = (xs + 0.5) / w - 0.5, (ys + 0.5) / h - 0.5
    if spec["kind"] == "gradient":
        a = math.radians(spec["angle"])
        t = np.clip((xs * math.cos(a) + ys * math.sin(a)) / 0.71 * 0.5 + 0.5, 0, 1)
    elif spec["kind"] == "radial":
        t = np.clip(np.hypot(xs, ys) / 0.71, 0, 1) ** 1.5
    else:
        t = np.zeros((h, w))
    image = base[None, None] * (1 - t[..., None]) + other[None, None] * t[..., None]
    if spec["kind"] == "clouds":
        image = image + spec["texture_amp"] * _clouds(np.random.default_rng(spec["texture_seed"]), h, w)[..., None]
    return image.astype(np.float32)


def _clouds(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Smooth value noise in [-1, 1]: two octaves of a coarse random grid, bilinearly upsampled."""
    out = np.zeros((h, w))
    for cells, weight in ((4, 0.7), (9, 0.3)):
        grid = rng.uniform(-1, 1, size=(cells + 1, cells + 1))
        gy, gx = np.linspace(0, cells, h), np.linspace(0, cells, w)
        iy, ix = np.minimum(gy.astype(int), cells - 1), np.minimum(gx.astype(int), cells - 1)
        fy, fx = (gy - iy)[:, None], (gx - ix)[None, :]
        a, b = grid[iy][:, ix], grid[iy][:, ix + 1]
        c, d = grid[iy + 1][:, ix], grid[iy + 1][:, ix + 1]
        out += weight * ((a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy)
    return out


def _noise(style: Style, family_seed: tuple[int, int], frame: int) -> tuple[np.ndarray, float]:
    rng = np.random.default_rng([*family_seed, frame])
    luma = rng.normal(0.0, style.noise_sigma, size=(style.height, style.width, 1))
    chroma = rng.normal(0.0, style.chroma_noise, size=(style.height, style.width, 3))
    gain = 1.0 + float(rng.uniform(-style.flicker, style.flicker))
    return (luma + chroma).astype(np.float32), gain


# ---------------------------------------------------------------- frames

def render(plan: VideoPlan) -> Iterator[np.ndarray]:
    """uint8 H x W x 3 RGB frames of a plan, one at a time."""
    style = plan.style
    backdrop = background(style)
    for frame in range(style.num_frames):
        canvas = backdrop.copy()
        for prop in style.props:
            _paint_prop(canvas, style, prop)
        for act in plan.acts:
            state = act_state(act, frame)
            if state is not None:
                centre, radius, opacity = state
                paint(canvas, style, act.shape, act.colour, centre, radius, act.tilt, opacity)
        noise, gain = _noise(style, (plan.seed, plan.family), frame)
        yield np.clip(canvas * gain + noise, 0, 255).astype(np.uint8)


def _paint_prop(canvas: np.ndarray, style: Style, prop: Prop) -> None:
    paint(canvas, style, prop.shape, prop.colour, prop.xy, prop.radius, prop.tilt, 1.0)
