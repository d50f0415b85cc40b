"""Segment windows and the one-pass segment decoder, on real files written with PyAV."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from vidsearch.config import DecodeSettings
from vidsearch.segments import segment_count, segment_windows
from vidsearch.video import TooLarge, decode_segments, decode_video
from vidsearch.video_writer import write_video

FPS = 4.0


def numbered_frames(count: int) -> list[np.ndarray]:
    """Frame i is a flat grey of level (i * 3) % 256, so a decoded frame tells its index."""
    return [np.full((32, 32, 3), (i * 3) % 256, np.uint8) for i in range(count)]


@pytest.fixture(scope="module")
def long_video(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("segments")
    return write_video(root / "long.mp4", numbered_frames(int(70 * FPS)), fps=FPS)


def settings_for(path: Path, **overrides) -> DecodeSettings:
    return DecodeSettings(allowed_prefixes=[str(path.parent)], **overrides)


@pytest.mark.parametrize("duration, expected", [
    (10.0, [(0.0, 10.0)]),
    (30.0, [(0.0, 30.0)]),
    (31.0, [(0.0, 30.0), (1.0, 31.0)]),
    (55.0, [(0.0, 30.0), (25.0, 55.0)]),
    (70.0, [(0.0, 30.0), (25.0, 55.0), (40.0, 70.0)]),
])
def test_windows_overlap_and_end_at_the_video_end(duration, expected):
    windows = segment_windows(duration, 30.0, 5.0)
    assert [(w.start_s, w.end_s) for w in windows] == expected
    assert [w.index for w in windows] == list(range(len(expected)))
    assert segment_count(duration, 30.0, 5.0) == len(expected)


def test_windows_cover_every_moment_of_long_videos():
    for duration in np.linspace(31.0, 3600.0, 97):
        windows = segment_windows(float(duration), 30.0, 5.0)
        assert windows[0].start_s == 0.0 and windows[-1].end_s == pytest.approx(duration)
        for before, after in zip(windows, windows[1:]):
            assert after.start_s <= before.end_s - 5.0 + 1e-9  # consecutive windows overlap by >= 5 s
            assert after.start_s > before.start_s
        assert all(w.length_s == pytest.approx(30.0) for w in windows)


@pytest.mark.parametrize("segment_s, overlap_s", [(0.0, 0.0), (30.0, 30.0), (30.0, -1.0)])
def test_bad_window_geometry_is_refused(segment_s, overlap_s):
    with pytest.raises(ValueError, match="segment"):
        segment_windows(100.0, segment_s, overlap_s)


def test_settings_refuse_an_overlap_as_long_as_the_segment():
    with pytest.raises(ValidationError, match="segment_overlap_s=30 must be below segment_s=30"):
        DecodeSettings(segment_s=30.0, segment_overlap_s=30.0)


def test_one_pass_gives_each_window_its_own_frames(long_video):
    decoded = decode_segments(f"file://{long_video}", settings_for(long_video), num_frames=6, resize_to=16)
    assert [(w.start_s, w.end_s) for w in decoded.windows] == [(0.0, 30.0), (25.0, 55.0), (40.0, 70.0)]
    assert decoded.frames.shape[1:] == (16, 16, 3)
    assert np.all(np.diff(decoded.timestamps) > 0)  # distinct frames, held once, in time order
    for k, window in enumerate(decoded.windows):
        frames, times = decoded.segment(k)
        assert len(times) == 6
        assert np.all((times >= window.start_s - 1 / FPS) & (times <= window.end_s))
        # Each frame is the one on screen at its own timestamp.
        levels = frames[:, 8, 8, 0].astype(int)
        expected = (np.round(times * FPS).astype(int) * 3) % 256
        assert np.all(np.abs(levels - expected) <= 2)


def test_overlapping_windows_share_frames_instead_of_decoding_twice(long_video):
    # With 5 s between targets, windows 25-55 and 40-70 both ask for 42.5, 47.5 and 52.5 s.
    decoded = decode_segments(f"file://{long_video}", settings_for(long_video), num_frames=6, resize_to=16)
    requested = sum(len(i) for i in decoded.frame_index)
    assert len(decoded.timestamps) < requested
    shared = set(decoded.frame_index[1]) & set(decoded.frame_index[2])
    assert sorted(decoded.timestamps[sorted(shared)].tolist()) == [42.5, 47.5, 52.5]


def test_a_short_video_is_one_window_with_decode_videos_frames(long_video):
    settings = settings_for(long_video, segment_s=120.0)
    decoded = decode_segments(f"file://{long_video}", settings, num_frames=8, resize_to=16)
    whole = decode_video(f"file://{long_video}", settings, num_frames=8, resize_to=16)
    assert len(decoded.windows) == 1 and decoded.windows[0].end_s == pytest.approx(whole.duration_s)
    assert np.array_equal(decoded.timestamps, whole.timestamps)
    assert np.array_equal(decoded.frames, whole.frames)


def test_too_many_segments_is_refused_before_decoding(long_video):
    with pytest.raises(TooLarge, match=r"3 segments of 30 s, over the limit max_segments=2"):
        decode_segments(f"file://{long_video}", settings_for(long_video, max_segments=2), num_frames=4)


def test_frame_memory_is_bounded(long_video):
    # 3 windows x 64 frames x 32x32x3 at full size: 0.56 MiB; allow less.
    settings = settings_for(long_video, max_decoded_mb=1)
    decode_segments(f"file://{long_video}", settings, num_frames=64)
    tiny = settings_for(long_video, max_decoded_mb=1, max_frames=64, num_frames=64, segment_s=2.0,
                        segment_overlap_s=1.0)
    with pytest.raises(TooLarge, match="over the limit max_decoded_mb=1"):
        decode_segments(f"file://{long_video}", tiny, num_frames=64)
