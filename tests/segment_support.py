"""Helpers for the segment (moment) tests: long videos that stay cheap, and the
segment settings they are indexed with.

Long here means longer than a deliberately small ``decode.segment_s``: a 13 s video
at 4 fps and 32x32 pixels is 52 frames and cuts into 4 segments of 4 s (1 s
overlap), so every segment path is exercised at a fraction of a real video's cost.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from vidsearch.config import Settings
from vidsearch.segments import segment_windows
from vidsearch.video_writer import write_video

SEGMENT_S = 4.0
OVERLAP_S = 1.0
FPS = 4.0


def segmented(settings: Settings, **decode: Any) -> Settings:
    """``settings`` with small segments (and any other decode fields given)."""
    fields = {"segment_s": SEGMENT_S, "segment_overlap_s": OVERLAP_S, **decode}
    return settings.model_copy(update={"decode": settings.decode.model_copy(update=fields)})


def write_long_clip(path: Path, seconds: float, seed: int, size: int = 32) -> Path:
    """A real mp4 of ``seconds`` at FPS whose picture changes over time (each second
    its own colour field), so segments of one video get different vectors."""
    rng = np.random.default_rng(seed)
    count = int(round(seconds * FPS))
    colours = rng.integers(0, 255, size=(int(np.ceil(seconds)) + 1, 1, 1, 3))
    noise = rng.integers(0, 40, size=(size, size, 3))
    frames = [((colours[int(i // FPS)] + noise + 3 * i) % 256).astype(np.uint8) for i in range(count)]
    return write_video(path, frames, fps=FPS)


def expected_spans(duration_s: float) -> list[tuple[float, float]]:
    return [(w.start_s, w.end_s) for w in segment_windows(duration_s, SEGMENT_S, OVERLAP_S)]


def segments_of(store: Any, collection: str, video_id: str, with_vectors: bool = False) -> list[Any]:
    """Every stored point of ``video_id`` (all segments), in segment order."""
    return store.get_segments(collection, [video_id], with_vectors=with_vectors)


def check_segment_points(parts: list[Any], duration_s: float) -> None:
    """The stored segments of one video are exactly its windows, each with its own
    frames and their timestamps inside its span."""
    spans = expected_spans(duration_s)
    assert [p.payload["segment"] for p in parts] == list(range(len(spans)))
    for part, (start, end) in zip(parts, spans):
        payload = part.payload
        assert payload["segment_count"] == len(spans)
        assert abs(payload["start_s"] - start) < 1e-6 and abs(payload["end_s"] - end) < 1e-6
        stamps = payload["frame_timestamps"]
        assert stamps and stamps == sorted(stamps)
        # A frame sampled for a window lies in it (the frame on screen at a target time).
        assert all(start - 1.0 / FPS - 1e-6 <= t <= end + 1e-6 for t in stamps), (stamps, start, end)
        if part.frames is not None:
            assert len(part.frames) == len(stamps)
    if parts and parts[0].video_vector is not None and len(parts) > 1:
        # Different pictures, different segment vectors.
        assert not np.allclose(parts[0].video_vector, parts[-1].video_vector)
