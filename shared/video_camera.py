"""Camera-like test videos: a panning, zooming texture with sensor noise, encoded at CRF 23.

The synthetic dataset's flat 64x64 scenes compress to almost nothing and decode in
microseconds, which hides what decoding real footage costs. These files have what
makes real footage expensive: detail at every scale (so I-frames are large), motion
everywhere (so P/B-frames carry real residuals) and noise (so nothing is free). Used
by benchmarks/decode.py and the decode tests.

Frames are made directly in YUV 4:2:0 (no RGB conversion before encoding) from a few
precomputed planes, so writing is bounded by the encoder, not by numpy.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Literal, Sequence

import av
import numpy as np

# Distinct noise fields cycled through; enough that the encoder can't reference them away.
_NOISE_BANK = 7
_NOISE_SIGMA = 4.0  # luma code values: a clean daylight sensor at ISO ~400


@dataclass(frozen=True)
class CameraSpec:
    """What to write. ``gop`` is the keyframe interval in frames (x264 keyint / vpx kf-max-dist)."""

    codec: Literal["h264", "vp9"]
    width: int
    height: int
    seconds: float
    fps: float = 30.0
    gop: int = 60
    crf: int = 23

    @property
    def suffix(self) -> str:
        return ".mp4" if self.codec == "h264" else ".webm"

    @property
    def name(self) -> str:
        return f"{self.codec}-{self.height}p-gop{self.gop}-{self.seconds:g}s{self.suffix}"


def _texture(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Luma detail at several scales (octaves of smoothed noise), 0..255 float32."""
    out = np.zeros((height, width), np.float32)
    for octave, weight in ((64, 0.45), (16, 0.3), (4, 0.17), (1, 0.08)):
        small = rng.random((height // octave + 2, width // octave + 2), dtype=np.float32)
        up = np.repeat(np.repeat(small, octave, axis=0), octave, axis=1)[:height, :width]
        out += weight * up
    out -= out.min()
    return out * (235.0 / max(float(out.max()), 1e-6)) + 10.0


def write_camera_video(path: str | Path, spec: CameraSpec, *, seed: int = 0,
                       timestamps: Sequence[float] | None = None) -> Path:
    """Write ``spec`` to ``path``. ``timestamps`` (seconds, increasing) makes it
    variable-frame-rate; otherwise frames are 1/fps apart for ``spec.seconds``."""
    if spec.width % 2 or spec.height % 2:
        raise ValueError(f"width and height must be even (yuv420p), got {spec.width}x{spec.height}")
    path = Path(path)
    rng = np.random.default_rng(seed)
    w, h = spec.width, spec.height
    # The scene is larger than the frame; the camera pans across it (and drifts back).
    margin_x, margin_y = w // 4 + 2, h // 4 + 2
    scene_y = _texture(h + 2 * margin_y, w + 2 * margin_x, rng)
    scene_u = _texture((h + 2 * margin_y) // 2, (w + 2 * margin_x) // 2, rng) * 0.35 + 83.0
    scene_v = _texture((h + 2 * margin_y) // 2, (w + 2 * margin_x) // 2, rng) * 0.35 + 83.0
    noise = (rng.standard_normal((_NOISE_BANK, h, w), dtype=np.float32) * _NOISE_SIGMA)
    times = list(timestamps) if timestamps is not None else [i / spec.fps for i in range(round(spec.seconds * spec.fps))]
    if not times:
        raise ValueError("a video needs at least one frame")
    time_base = Fraction(1, 1000)
    codec = "libx264" if spec.codec == "h264" else "libvpx-vp9"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(spec.fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.time_base = stream.codec_context.time_base = time_base
        if codec == "libx264":
            # scenecut=0: keyframes exactly every gop frames, so the file classes mean what they say.
            stream.options = {"crf": str(spec.crf), "preset": "veryfast",
                              "x264-params": f"keyint={spec.gop}:min-keyint={spec.gop}:scenecut=0:mbtree=0"}
        else:
            stream.options = {"crf": str(spec.crf + 8), "b:v": "0", "deadline": "realtime", "cpu-used": "8",
                              "g": str(spec.gop), "keyint_min": str(spec.gop)}
        for index, seconds in enumerate(times):
            # Smooth pan plus a slow periodic drift: every block moves every frame.
            phase = seconds * 0.7
            x = int(margin_x + margin_x * 0.9 * np.sin(phase))
            y = int(margin_y + margin_y * 0.9 * np.sin(phase * 0.61 + 1.0))
            luma = scene_y[y:y + h, x:x + w] + noise[index % _NOISE_BANK]
            planes = np.empty((h * 3 // 2, w), np.uint8)
            np.clip(luma, 0, 255, out=luma)
            planes[:h] = luma
            cu = scene_u[y // 2:y // 2 + h // 2, x // 2:x // 2 + w // 2]
            cv = scene_v[y // 2:y // 2 + h // 2, x // 2:x // 2 + w // 2]
            # yuv420p as one array: Y rows, then U and V each h/4 rows of full width.
            planes[h:h + h // 4] = cu.reshape(h // 4, w)
            planes[h + h // 4:] = cv.reshape(h // 4, w)
            frame = av.VideoFrame.from_ndarray(planes, format="yuv420p")
            frame.pts = int(round(seconds / time_base))
            frame.time_base = time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
