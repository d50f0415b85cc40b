"""How a long video is cut into segments (moments), each indexed as its own point.

Windows are fixed-length with a fixed overlap, not shot boundaries: they need no
extra decoding pass, their count is known from the header alone (so the
``max_segments`` limit is checked before a frame is decoded), and the overlap
keeps an event that straddles one boundary whole inside the neighbouring window.
The last window is pulled back to end at the video's end, so every window of a
long video has the same length and its frames the same spacing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

# Float durations like 3 * 0.1 land a hair off; don't add a window for that.
_EPS = 1e-6


@dataclass(frozen=True)
class Window:
    """One segment's span, in seconds from the video's start."""

    index: int
    start_s: float
    end_s: float

    @property
    def length_s(self) -> float:
        return self.end_s - self.start_s


def segment_count(duration_s: float, segment_s: float, overlap_s: float) -> int:
    """How many windows a video of ``duration_s`` is cut into (1 for a short video)."""
    _check_geometry(segment_s, overlap_s)
    if duration_s <= segment_s + _EPS:
        return 1
    stride = segment_s - overlap_s
    return max(2, math.ceil((duration_s - overlap_s) / stride - _EPS))


def segment_windows(duration_s: float, segment_s: float, overlap_s: float) -> list[Window]:
    """The windows covering ``[0, duration_s]``: one whole-video window when the video
    is no longer than ``segment_s``, else ``segment_s``-long windows ``segment_s -
    overlap_s`` apart, the last one ending at ``duration_s``."""
    if not math.isfinite(duration_s) or duration_s < 0:
        raise ValueError(f"duration_s must be a finite number >= 0, got {duration_s!r}")
    count = segment_count(duration_s, segment_s, overlap_s)
    if count == 1:
        return [Window(0, 0.0, float(duration_s))]
    stride = segment_s - overlap_s
    windows = [Window(k, k * stride, k * stride + segment_s) for k in range(count - 1)]
    windows.append(Window(count - 1, duration_s - segment_s, float(duration_s)))
    return windows


def _check_geometry(segment_s: float, overlap_s: float) -> None:
    if not segment_s > 0:
        raise ValueError(f"segment_s must be > 0, got {segment_s!r}")
    if not 0 <= overlap_s < segment_s:
        raise ValueError(f"segment overlap must be >= 0 and below segment_s={segment_s:g}, got {overlap_s!r}")


__all__ = ["Window", "segment_count", "segment_windows"]
