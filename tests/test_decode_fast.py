"""Keyframe sampling (decode.seek_mode = keyframe) on real files written here with PyAV:
frames are the files' own keyframes, reported at their own pts, within the tolerance of
their targets; targets with no keyframe near enough are decoded exactly; VFR, VP9/WebM,
MPEG-TS (no index) and decode_segments work; bad settings are refused."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
from pydantic import ValidationError

from vidsearch.config import DecodeSettings
from vidsearch.video import decode_frame_at, decode_segments, decode_video
from vidsearch.video_camera import CameraSpec, write_camera_video

REPO = Path(__file__).resolve().parents[1]
W, H = 96, 64


def frame_times(path: Path) -> tuple[list[float], list[float]]:
    """(every frame's pts time, the keyframes' pts times), decoded independently."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [(float(f.time), f.key_frame) for f in container.decode(stream)]
    return [t for t, _ in frames], [t for t, key in frames if key]


def targets(duration: float, n: int, start: float = 0.0) -> list[float]:
    return [start + (k + 0.5) * duration / n for k in range(n)]


def settings(tmp_path: Path, **kwargs) -> DecodeSettings:
    return DecodeSettings(allowed_prefixes=[str(tmp_path)], **kwargs)


def check_keyframe_sampling(path: Path, decoded, tolerance: float, n: int) -> None:
    everything, keys = frame_times(path)
    stamps = [float(t) for t in decoded.timestamps]
    assert len(stamps) == n and np.all(np.diff(stamps) > 0)
    # Every timestamp is a frame's own pts (float32 in the result).
    assert all(min(abs(s - t) for t in everything) < 1e-3 for s in stamps)
    spacing = decoded.duration_s / n
    for stamp, target in zip(stamps, targets(decoded.duration_s, n)):
        if any(abs(stamp - k) < 1e-3 for k in keys):
            assert abs(stamp - target) <= min(tolerance, spacing / 2) + 1e-3
        else:
            # Decoded exactly: the frame on screen at the target.
            assert abs(stamp - max(t for t in everything if t <= target + 1e-6)) < 1e-3


@pytest.mark.parametrize("codec", ["h264", "vp9"])
def test_keyframe_mode_returns_keyframes_at_their_own_pts(tmp_path, codec):
    spec = CameraSpec(codec, W, H, 12.0, fps=10.0, gop=10)  # a keyframe every second
    path = write_camera_video(tmp_path / f"clip{spec.suffix}", spec)
    fast = decode_video(str(path), settings(tmp_path, seek_mode="keyframe", keyframe_tolerance_s=0.6),
                        num_frames=6)
    exact = decode_video(str(path), settings(tmp_path, seek_mode="exact"), num_frames=6)
    assert fast.keyframes == 6 and exact.keyframes == 0
    _, keys = frame_times(path)
    assert all(min(abs(float(s) - k) for k in keys) < 1e-3 for s in fast.timestamps)
    check_keyframe_sampling(path, fast, 0.6, 6)
    assert fast.frames.shape == exact.frames.shape
    # The pixels are those of the frame at that pts, decoded the exact way.
    again = decode_frame_at(str(path), settings(tmp_path, seek_mode="exact"), float(fast.timestamps[2]))
    assert float(again.timestamps[0]) == pytest.approx(float(fast.timestamps[2]), abs=1e-3)
    assert np.array_equal(again.frames[0], fast.frames[2])


def test_one_keyframe_file_falls_back_to_exact(tmp_path):
    spec = CameraSpec("h264", W, H, 8.0, fps=10.0, gop=1000)  # only the first frame is a keyframe
    path = write_camera_video(tmp_path / "one-key.mp4", spec)
    assert len(frame_times(path)[1]) == 1
    fast = decode_video(str(path), settings(tmp_path, seek_mode="keyframe", keyframe_tolerance_s=5.0), num_frames=4)
    exact = decode_video(str(path), settings(tmp_path, seek_mode="exact"), num_frames=4)
    assert fast.keyframes == 0
    assert np.array_equal(fast.timestamps, exact.timestamps) and np.array_equal(fast.frames, exact.frames)


def test_sparse_keyframes_mix_keyframes_and_exact_frames(tmp_path):
    spec = CameraSpec("h264", W, H, 12.0, fps=10.0, gop=35)  # keyframes at 0, 3.5, 7 and 10.5 s
    path = write_camera_video(tmp_path / "sparse.mp4", spec)
    # Targets at 1, 3, 5, 7, 9 and 11 s: 7 s has a keyframe on it, 3 and 11 s one 0.5 s away.
    for tolerance, keyframes in ((0.2, 1), (0.6, 3)):
        fast = decode_video(str(path), settings(tmp_path, seek_mode="keyframe", keyframe_tolerance_s=tolerance),
                            num_frames=6)
        assert fast.keyframes == keyframes
        check_keyframe_sampling(path, fast, tolerance, 6)


def test_variable_frame_rate(tmp_path):
    rng = np.random.default_rng(3)
    stamps = np.cumsum(rng.choice([0.04, 0.1, 0.25], size=90))
    stamps = [0.0, *map(float, stamps[:-1])]
    spec = CameraSpec("h264", W, H, stamps[-1], fps=10.0, gop=8)
    path = write_camera_video(tmp_path / "vfr.mp4", spec, timestamps=stamps)
    fast = decode_video(str(path), settings(tmp_path, seek_mode="keyframe", keyframe_tolerance_s=1.0), num_frames=5)
    assert fast.keyframes > 0
    check_keyframe_sampling(path, fast, 1.0, 5)


def test_container_without_index_scans_keyframes(tmp_path):
    spec = CameraSpec("h264", W, H, 10.0, fps=10.0, gop=10)
    mp4 = write_camera_video(tmp_path / "src.mp4", spec)
    ts = tmp_path / "clip.ts"
    with av.open(str(mp4)) as src, av.open(str(ts), "w", format="mpegts") as dst:
        out = dst.add_stream_from_template(src.streams.video[0])
        for packet in src.demux(src.streams.video[0]):
            if packet.dts is not None:
                packet.stream = out
                dst.mux(packet)
    fast = decode_video(str(ts), settings(tmp_path, seek_mode="keyframe", keyframe_tolerance_s=0.6), num_frames=5)
    assert fast.keyframes > 0
    check_keyframe_sampling(ts, fast, 0.6, 5)


def test_decode_segments_in_keyframe_mode(tmp_path):
    spec = CameraSpec("h264", W, H, 70.0, fps=5.0, gop=5)  # a keyframe every second
    path = write_camera_video(tmp_path / "long.mp4", spec)
    _, keys = frame_times(path)
    config = settings(tmp_path, seek_mode="keyframe", keyframe_tolerance_s=1.0, num_frames=6)
    fast = decode_segments(str(path), config)
    exact = decode_segments(str(path), config.model_copy(update={"seek_mode": "exact"}))
    assert len(fast.windows) == len(exact.windows) >= 3
    assert fast.keyframes == fast.frames.shape[0] > 0
    for k, window in enumerate(fast.windows):
        _, stamps = fast.segment(k)
        assert len(stamps) == 6
        spacing = window.length_s / 6
        for stamp, target in zip(stamps, targets(window.length_s, 6, window.start_s)):
            assert min(abs(float(stamp) - key) for key in keys) < 1e-3
            assert abs(float(stamp) - target) <= min(1.0, spacing / 2) + 1e-3
            assert window.start_s - 1.0 <= stamp <= window.end_s + 1.0


@pytest.mark.parametrize("field, value, words", [
    ("seek_mode", "fast", ["seek_mode", "exact", "keyframe"]),
    ("keyframe_tolerance_s", 0, ["keyframe_tolerance_s", "greater than 0"]),
    ("keyframe_tolerance_s", 1e9, ["keyframe_tolerance_s", "less than or equal to 60"]),
])
def test_bad_settings_are_refused_with_a_clear_message(field, value, words):
    with pytest.raises(ValidationError) as info:
        DecodeSettings(**{field: value})
    message = str(info.value)
    assert all(word in message for word in words), message


def test_decode_benchmark_runs_in_its_smallest_configuration(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "decode.py"), "--tiny", "--no-torchcodec",
                           "--cache-dir", str(tmp_path / "videos"), "--out-dir", str(tmp_path / "out")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    text = (tmp_path / "out" / "decode.md").read_text()
    for heading in ("## What is measured", "## Machine", "## Results", "## Targets", "## Segments"):
        assert heading in text
    assert "| h264 144p GOP 30, 4 s |" in text and (tmp_path / "out" / "decode.png").stat().st_size > 0
