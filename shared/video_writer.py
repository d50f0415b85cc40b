"""Write real video files with PyAV (used by the synthetic dataset and the tests)."""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Iterable, Sequence

import av
import numpy as np

# container suffix -> (codec, pixel format)
CODECS: dict[str, tuple[str, str]] = {
    ".mp4": ("libx264", "yuv420p"),
    ".mkv": ("libx264", "yuv420p"),
    ".webm": ("libvpx-vp9", "yuv420p"),
}


def write_video(
    path: str | Path,
    frames: Iterable[np.ndarray],
    fps: float = 10.0,
    timestamps: Sequence[float] | None = None,
    codec: str | None = None,
    crf: int = 23,
) -> Path:
    """Encode uint8 H×W×3 RGB frames to ``path``; the codec follows the suffix.

    ``timestamps`` (seconds, increasing) gives a variable frame rate; otherwise
    frames are spaced 1/fps apart. Width and height must be even (yuv420p).
    """
    path = Path(path)
    default_codec, pix_fmt = CODECS.get(path.suffix.lower(), CODECS[".mp4"])
    codec = codec or default_codec
    time_base = Fraction(1, 1000)
    with av.open(str(path), mode="w") as container:
        stream = None
        for index, frame in enumerate(frames):
            frame = np.ascontiguousarray(frame, dtype=np.uint8)
            if stream is None:
                height, width = frame.shape[:2]
                stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
                stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
                stream.time_base = time_base
                stream.codec_context.time_base = time_base
                if codec == "libx264":
                    # mbtree makes x264 output vary run to run; without it a seed gives byte-identical files.
                    stream.options = {"crf": str(crf), "preset": "veryfast", "x264-params": "mbtree=0"}
                elif codec == "libvpx-vp9":
                    stream.options = {"crf": str(crf + 8), "b:v": "0", "deadline": "realtime", "cpu-used": "8"}
            video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
            seconds = timestamps[index] if timestamps is not None else index / fps
            video_frame.pts = int(round(seconds / time_base))
            video_frame.time_base = time_base
            for packet in stream.encode(video_frame):
                container.mux(packet)
        if stream is None:
            raise ValueError("write_video needs at least one frame")
        for packet in stream.encode():
            container.mux(packet)
    return path
