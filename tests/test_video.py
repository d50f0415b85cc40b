"""vidsearch.uris + vidsearch.video on real files written here with PyAV.

Frames are flat colours that spell out their own index (three base-10 digits, one
per RGB channel), so a decoded frame says which source frame it is: that is how
these tests prove a seek landed on the frame that is on screen at the target time.
"""
from __future__ import annotations

import functools
import http.server
import importlib.util
import io
import math
import os
import pickle
import threading
from pathlib import Path

import av
import numpy as np
import pytest
from av.stream import Disposition

from vidsearch.config import DecodeSettings
from vidsearch.uris import ResolvedURI, redact_uri, resolve_uri
from vidsearch.video import (
    DecodedVideo,
    NotAllowed,
    NoVideoStream,
    TooLarge,
    Undecodable,
    UnsupportedURI,
    VideoError,
    VideoNotFound,
    decode_video,
)
from vidsearch.video_writer import write_video

W, H = 64, 48
STEP = 25  # colour levels per digit; codec error on flat frames is a few levels


def colour_frame(index: int, width: int = W, height: int = H) -> np.ndarray:
    frame = np.empty((height, width, 3), np.uint8)
    frame[...] = [(index % 10) * STEP, (index // 10 % 10) * STEP, (index // 100 % 10) * STEP]
    return frame


def frame_index(frame: np.ndarray) -> int:
    digits = np.rint(frame.reshape(-1, 3).mean(axis=0) / STEP).astype(int)
    return int(digits[0] + 10 * digits[1] + 100 * digits[2])


def make_video(path: Path, count: int, fps: float = 10.0, width: int = W, height: int = H, **kwargs) -> Path:
    return write_video(path, (colour_frame(i, width, height) for i in range(count)), fps=fps, **kwargs)


def remux(src: Path, dst: Path, fmt: str, seekable: bool = True) -> Path:
    """Copy the packets of ``src`` into another container. Written through a
    non-seekable file object, a muxer can't go back to fill in the duration or
    the keyframe index, which is how files without that metadata come about."""

    class Pipe(io.RawIOBase):
        def __init__(self, target):
            self.target = target

        def writable(self):
            return True

        def write(self, data):
            return self.target.write(data)

        def seekable(self):
            return False

    with open(dst, "wb") as out, av.open(str(src)) as source:
        with av.open(out if seekable else Pipe(out), "w", format=fmt) as sink:
            stream_in = source.streams.video[0]
            stream_out = sink.add_stream_from_template(stream_in)
            for packet in source.demux(stream_in):
                if packet.dts is None:
                    continue
                packet.stream = stream_out
                sink.mux(packet)
    return dst


def write_audio_only(path: Path, cover_art: bool = False) -> Path:
    """AAC audio, optionally with a cover picture (an attached-pic "video" stream)."""
    with av.open(str(path), "w") as container:
        audio = container.add_stream("aac", rate=8000)
        audio.layout = "mono"
        cover_packets = []
        if cover_art:
            cover = container.add_stream("mjpeg")
            cover.width, cover.height, cover.pix_fmt = 16, 16, "yuvj420p"
            cover.disposition = Disposition.attached_pic
            picture = av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")
            cover_packets = [*cover.encode(picture), *cover.encode()]
        for i in range(8):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 8000, i * 1024
            for packet in audio.encode(frame):
                container.mux(packet)
        for packet in audio.encode():
            container.mux(packet)
        for packet in cover_packets:
            container.mux(packet)
    return path


@pytest.fixture
def settings(tmp_path: Path) -> DecodeSettings:
    # These tests check exact sampling (the frame on screen at each target); keyframe
    # sampling, the default, is tested in test_decode_fast.py.
    return DecodeSettings(allowed_prefixes=[str(tmp_path)], seek_mode="exact")


def expect_error(cls: type[VideoError], uri: str, settings: DecodeSettings, **kwargs) -> VideoError:
    with pytest.raises(cls) as info:
        decode_video(uri, settings, **kwargs)
    err = info.value
    assert err.error_class == cls.error_class
    assert err.reason and "\n" not in str(err)
    assert str(err).startswith(f"{cls.error_class}: ")
    return err


# ---------------------------------------------------------------- decoding


@pytest.mark.parametrize("suffix, codec", [(".mp4", "h264"), (".webm", "vp9")])
def test_decodes_uniform_frames(tmp_path, settings, suffix, codec):
    path = make_video(tmp_path / f"clip{suffix}", 30)
    video = decode_video(str(path), settings)
    assert isinstance(video, DecodedVideo)
    assert video.frames.dtype == np.uint8 and video.frames.shape == (12, H, W, 3)
    assert video.timestamps.dtype == np.float32 and video.timestamps.shape == (12,)
    assert (video.width, video.height, video.codec) == (W, H, codec)
    assert video.duration_s == pytest.approx(3.0, abs=0.01)
    assert video.fps == pytest.approx(10.0)
    assert video.source_bytes == path.stat().st_size
    # Each frame is the one on screen at the centre of its twelfth of the video.
    for frame, stamp in zip(video.frames, video.timestamps):
        assert frame_index(frame) == round(stamp * 10)


@pytest.mark.parametrize("n", [1, 5, 12])
def test_uniform_sampling_spreads_n_frames_over_duration(tmp_path, settings, n):
    path = make_video(tmp_path / "clip.mp4", 40)
    video = decode_video(str(path), settings, num_frames=n)
    stamps = video.timestamps
    assert video.num_frames == n
    assert np.all(np.diff(stamps) > 0)
    segment = video.duration_s / n
    assert 0 <= stamps[0] < segment and video.duration_s - segment < stamps[-1] < video.duration_s
    expected = [math.floor((k + 0.5) * segment * 10 + 1e-6) for k in range(n)]
    assert [frame_index(f) for f in video.frames] == expected


@pytest.mark.parametrize("suffix", [".mp4", ".webm", ".mkv"])
def test_seeks_land_on_the_frame_shown_at_each_target(tmp_path, settings, suffix):
    # 100 s with keyframes seconds apart: seeking beats decoding all 1000 frames.
    path = make_video(tmp_path / f"long{suffix}", 1000, width=32, height=32)
    video = decode_video(str(path), settings, num_frames=12)
    assert video.seeks > 0
    targets = [(k + 0.5) * video.duration_s / 12 for k in range(12)]
    shown = [math.floor(t * 10 + 1e-6) for t in targets]
    assert [frame_index(f) for f in video.frames] == shown
    np.testing.assert_allclose(video.timestamps, np.array(shown) / 10, atol=1e-4)


@pytest.mark.parametrize("source_suffix, fmt, suffix", [
    (".mp4", "mpegts", ".ts"),  # no index, seeks by byte bisection and can land past the target
    (".mp4", "flv", ".flv"),
    (".webm", "ivf", ".ivf"),  # its header states the duration in frames, not seconds
])
def test_other_containers_sample_the_right_frames(tmp_path, settings, source_suffix, fmt, suffix):
    source = make_video(tmp_path / f"src{source_suffix}", 600, width=32, height=32)
    path = remux(source, tmp_path / f"clip{suffix}", fmt)
    video = decode_video(str(path), settings, num_frames=8)
    assert video.duration_s == pytest.approx(60.0, abs=0.3)
    shown = [math.floor((k + 0.5) * video.duration_s / 8 * 10 + 1e-6) for k in range(8)]
    assert [frame_index(f) for f in video.frames] == shown
    # Timestamps count from the stream start (MPEG-TS streams start at 0.2 s or so).
    np.testing.assert_allclose(video.timestamps, np.array(shown) / 10, atol=0.15)


def test_decode_threads_setting_does_not_change_frames(tmp_path):
    path = make_video(tmp_path / "clip.mp4", 200, width=32, height=32)
    results = [decode_video(str(path), DecodeSettings(allowed_prefixes=[str(tmp_path)], threads=threads))
               for threads in (0, 1, 2)]
    for other in results[1:]:
        np.testing.assert_array_equal(other.frames, results[0].frames)
        np.testing.assert_array_equal(other.timestamps, results[0].timestamps)


def test_short_video_decodes_in_one_pass(tmp_path, settings):
    path = make_video(tmp_path / "short.webm", 20)
    assert decode_video(str(path), settings).seeks == 0


def test_variable_frame_rate_timestamps(tmp_path, settings):
    stamps = [0.0, 0.04, 0.3, 0.35, 1.0, 1.7, 1.72, 2.5, 2.55, 3.9]
    path = make_video(tmp_path / "vfr.mp4", len(stamps), timestamps=stamps)
    video = decode_video(str(path), settings, num_frames=8)
    for frame, stamp in zip(video.frames, video.timestamps):
        index = frame_index(frame)
        assert stamp == pytest.approx(stamps[index], abs=1e-3)
    targets = [(k + 0.5) * video.duration_s / 8 for k in range(8)]
    on_screen = sorted({max(i for i, s in enumerate(stamps) if s <= t + 1e-6) for t in targets})
    assert [frame_index(f) for f in video.frames] == on_screen


def test_fps_sampling_count(tmp_path):
    path = make_video(tmp_path / "clip.mp4", 40)  # 4 s
    fps2 = DecodeSettings(allowed_prefixes=[str(tmp_path)], sampling="fps", fps=2.0)
    video = decode_video(str(path), fps2)
    np.testing.assert_allclose(video.timestamps, np.arange(8) * 0.5, atol=1e-4)
    assert [frame_index(f) for f in video.frames] == list(range(0, 40, 5))
    # 10 fps over 4 s is 40 frames; the cap spreads max_frames evenly instead.
    capped = DecodeSettings(allowed_prefixes=[str(tmp_path)], sampling="fps", fps=10.0, max_frames=16)
    video = decode_video(str(path), capped)
    assert video.num_frames == 16 and video.timestamps[-1] > 3.5
    assert decode_video(str(path), capped, num_frames=5).num_frames == 5


def test_one_frame_video(tmp_path, settings):
    path = make_video(tmp_path / "one.mp4", 1)
    video = decode_video(str(path), settings)
    assert video.frames.shape == (1, H, W, 3)
    assert video.timestamps.tolist() == [0.0]


def test_fewer_frames_than_requested_are_not_duplicated(tmp_path, settings):
    path = make_video(tmp_path / "five.webm", 5)
    video = decode_video(str(path), settings, num_frames=12)
    assert [frame_index(f) for f in video.frames] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("width, height, expected", [(64, 48, (24, 32)), (48, 64, (32, 24)), (64, 48, (96, 128))])
def test_resize_keeps_aspect_ratio(tmp_path, settings, width, height, expected):
    path = make_video(tmp_path / "clip.mp4", 10, width=width, height=height)
    shorter = min(expected)
    video = decode_video(str(path), settings, num_frames=3, resize_to=shorter)
    assert video.frames.shape == (3, *expected, 3)
    assert (video.width, video.height) == (width, height)  # the source, not the output
    assert [frame_index(f) for f in video.frames] == [1, 5, 8]


def test_container_without_duration_is_measured(tmp_path, settings):
    source = make_video(tmp_path / "src.webm", 30)
    path = remux(source, tmp_path / "live.webm", "webm", seekable=False)
    with av.open(str(path)) as container:
        assert container.duration is None and container.streams.video[0].duration is None
    video = decode_video(str(path), settings, num_frames=6)
    assert video.duration_s == pytest.approx(3.0, abs=0.01)
    assert [frame_index(f) for f in video.frames] == [2, 7, 12, 17, 22, 27]


def test_raw_stream_without_timestamps(tmp_path, settings):
    source = make_video(tmp_path / "src.mp4", 20)
    path = remux(source, tmp_path / "raw.h264", "h264")
    video = decode_video(str(path), settings, num_frames=4)
    assert video.seeks == 0 and video.num_frames == 4
    assert np.all(np.diff(video.timestamps) > 0)
    indexes = [frame_index(f) for f in video.frames]
    assert indexes == sorted(indexes) and len(set(indexes)) == 4


def test_file_uri_and_symlink_inside_root(tmp_path, settings):
    path = make_video(tmp_path / "my clip.mp4", 10)
    assert decode_video("file://" + str(path).replace(" ", "%20"), settings, num_frames=2).num_frames == 2
    (tmp_path / "link.mp4").symlink_to(path)
    assert decode_video(str(tmp_path / "link.mp4"), settings, num_frames=2).num_frames == 2


# ---------------------------------------------------------------- bad files


def test_zero_byte_file(tmp_path, settings):
    (tmp_path / "empty.mp4").write_bytes(b"")
    expect_error(Undecodable, str(tmp_path / "empty.mp4"), settings)


def test_truncated_mp4(tmp_path, settings):
    data = make_video(tmp_path / "full.mp4", 30).read_bytes()
    (tmp_path / "half.mp4").write_bytes(data[: len(data) // 2])
    expect_error(Undecodable, str(tmp_path / "half.mp4"), settings)


def test_text_renamed_mp4(tmp_path, settings):
    (tmp_path / "notes.mp4").write_text("this is not a video\n" * 50)
    expect_error(Undecodable, str(tmp_path / "notes.mp4"), settings)


@pytest.mark.parametrize("cover_art", [False, True])
def test_audio_only(tmp_path, settings, cover_art):
    path = write_audio_only(tmp_path / "song.mp4", cover_art=cover_art)
    err = expect_error(NoVideoStream, str(path), settings)
    assert "audio" in err.reason


def test_corrupted_files_only_raise_video_errors(tmp_path, settings):
    # Damage in random places either still decodes or fails as a VideoError; nothing else escapes.
    data = make_video(tmp_path / "ok.webm", 30).read_bytes()
    rng = np.random.default_rng(7)
    for trial in range(6):
        damaged = bytearray(data)
        start = int(rng.integers(0, len(data) - 64))
        damaged[start:start + 64] = rng.integers(0, 256, 64, dtype=np.uint8).tobytes()
        path = tmp_path / f"bad{trial}.webm"
        path.write_bytes(bytes(damaged[: int(rng.integers(len(data) // 3, len(data)))]))
        try:
            video = decode_video(str(path), settings)
        except VideoError as err:
            assert err.error_class in ("undecodable", "too_large", "no_video_stream")
        else:
            assert video.frames.ndim == 4 and video.num_frames >= 1


# ---------------------------------------------------------------- limits


def test_over_limit_resolution(tmp_path):
    path = make_video(tmp_path / "big.mp4", 3)
    limited = DecodeSettings(allowed_prefixes=[str(tmp_path)], max_pixels=W * H - 1)
    err = expect_error(TooLarge, str(path), limited)
    assert "64x48" in err.reason and "max_pixels" in err.reason
    # resize_to may not blow a small video up past the limit either.
    ok = DecodeSettings(allowed_prefixes=[str(tmp_path)], max_pixels=W * H)
    expect_error(TooLarge, str(path), ok, resize_to=96)


def test_over_limit_bytes(tmp_path):
    path = make_video(tmp_path / "clip.mp4", 10)
    size = path.stat().st_size
    limited = DecodeSettings(allowed_prefixes=[str(tmp_path)], max_bytes=size - 1)
    err = expect_error(TooLarge, str(path), limited)
    assert str(size) in err.reason and "max_bytes" in err.reason


def test_over_limit_duration(tmp_path):
    path = make_video(tmp_path / "clip.mp4", 30)
    limited = DecodeSettings(allowed_prefixes=[str(tmp_path)], max_duration_s=2.0)
    err = expect_error(TooLarge, str(path), limited)
    assert "max_duration_s" in err.reason and "3.0 s" in err.reason


def test_over_limit_duration_without_metadata(tmp_path):
    path = remux(make_video(tmp_path / "src.webm", 30), tmp_path / "live.webm", "webm", seekable=False)
    limited = DecodeSettings(allowed_prefixes=[str(tmp_path)], max_duration_s=2.0)
    expect_error(TooLarge, str(path), limited)


def test_too_many_frames_requested(tmp_path, settings):
    path = make_video(tmp_path / "clip.mp4", 10)
    err = expect_error(TooLarge, str(path), settings, num_frames=settings.max_frames + 1)
    assert "max_frames" in err.reason


@pytest.mark.parametrize("kwargs", [{"num_frames": 0}, {"num_frames": 2.5}, {"resize_to": 0}, {"resize_to": True}])
def test_bad_arguments(tmp_path, settings, kwargs):
    path = make_video(tmp_path / "clip.mp4", 3)
    with pytest.raises(ValueError):
        decode_video(str(path), settings, **kwargs)


# ---------------------------------------------------------------- uri allowlist


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "allowed").mkdir()
    make_video(tmp_path / "secret.mp4", 3)
    return tmp_path / "allowed"


@pytest.fixture
def root_settings(root: Path) -> DecodeSettings:
    return DecodeSettings(allowed_prefixes=[str(root)])


@pytest.mark.parametrize("template", ["{root}/../secret.mp4", "file://{root}/../secret.mp4",
                                      "file://{root}/%2e%2e/secret.mp4", "{root}/../allowed/../secret.mp4"])
def test_path_traversal_is_refused(root, root_settings, template):
    expect_error(NotAllowed, template.format(root=root), root_settings)


def test_symlink_escaping_root_is_refused(root, root_settings):
    (root / "escape.mp4").symlink_to(root.parent / "secret.mp4")
    (root / "dir").symlink_to(root.parent)
    expect_error(NotAllowed, str(root / "escape.mp4"), root_settings)
    expect_error(NotAllowed, str(root / "dir" / "secret.mp4"), root_settings)


def test_sibling_directory_sharing_the_prefix_is_refused(root, root_settings):
    (root.parent / "allowed-not").mkdir()
    path = make_video(root.parent / "allowed-not" / "clip.mp4", 3)
    expect_error(NotAllowed, str(path), root_settings)


def test_missing_file_and_directory(root, root_settings):
    expect_error(VideoNotFound, str(root / "nope.mp4"), root_settings)
    expect_error(VideoNotFound, str(root / "nope" / "deeper.mp4"), root_settings)
    expect_error(VideoNotFound, str(root / ("x" * 300 + ".mp4")), root_settings)
    (root / "folder.mp4").mkdir()
    expect_error(VideoNotFound, str(root / "folder.mp4"), root_settings)


def test_fifo_is_refused_without_blocking(root, root_settings):
    os.mkfifo(root / "pipe.mp4")  # opening it for reading would wait for a writer forever
    expect_error(VideoNotFound, str(root / "pipe.mp4"), root_settings)


@pytest.mark.parametrize("uri, cls", [
    ("https://example.com/a.mp4", NotAllowed),  # known scheme, not in allowed_schemes
    ("s3://bucket/a.mp4", NotAllowed),
    ("ftp://example.com/a.mp4", UnsupportedURI),
    ("data:video/mp4;base64,AAAA", UnsupportedURI),
    ("", UnsupportedURI),
    ("   ", UnsupportedURI),
    ("clip\x00.mp4", UnsupportedURI),
    ("file://otherhost/a.mp4", UnsupportedURI),
    ("file:a.mp4", UnsupportedURI),
])
def test_bad_or_disallowed_uris(root_settings, uri, cls):
    expect_error(cls, uri, root_settings)


def test_non_string_uri(root_settings):
    expect_error(UnsupportedURI, None, root_settings)  # type: ignore[arg-type]


def test_file_scheme_can_be_switched_off(root):
    remote_only = DecodeSettings(allowed_schemes=["https"], allowed_prefixes=[str(root)])
    expect_error(NotAllowed, str(root / "clip.mp4"), remote_only)


def test_resolve_uri_normalises_local_paths(root, root_settings):
    resolved = resolve_uri(f"{root}/./sub/../clip.mp4", root_settings)
    assert resolved == ResolvedURI(uri=f"{root}/./sub/../clip.mp4", scheme="file",
                                   location=os.path.realpath(root / "clip.mp4"))
    assert resolved.is_local


def test_relative_and_file_uri_prefixes(root, monkeypatch):
    monkeypatch.chdir(root.parent)
    for prefix in ("allowed", "./allowed/", f"file://{root}"):
        assert resolve_uri(str(root / "a.mp4"), DecodeSettings(allowed_prefixes=[prefix])).location.endswith("/a.mp4")
    assert resolve_uri("allowed/a.mp4", DecodeSettings(allowed_prefixes=[str(root)])).location == str(root / "a.mp4")


@pytest.mark.parametrize("uri, allowed", [
    ("https://cdn.example.com/videos/a.mp4", True),
    ("https://CDN.example.com/videos/sub/a.mp4?sig=1", True),
    ("https://cdn.example.com/videos-private/a.mp4", False),
    ("https://cdn.example.com.evil.org/videos/a.mp4", False),
    ("https://cdn.example.com/videos/../admin/a.mp4", False),
    ("https://cdn.example.com/videos/%2E%2E/admin/a.mp4", False),
    ("http://cdn.example.com/videos/a.mp4", False),  # scheme must match the prefix too
    ("s3://bucket/clips/a.mp4", True),
    ("s3://bucket-other/clips/a.mp4", False),
])
def test_remote_prefixes_match_whole_segments(uri, allowed):
    remote = DecodeSettings(allowed_schemes=["http", "https", "s3"],
                            allowed_prefixes=["https://cdn.example.com/videos", "s3://bucket/clips/"])
    if allowed:
        assert resolve_uri(uri, remote).scheme == uri.split(":")[0]
    else:
        with pytest.raises(NotAllowed):
            resolve_uri(uri, remote)


def test_reasons_do_not_leak_credentials():
    remote = DecodeSettings(allowed_schemes=["https"], allowed_prefixes=["https://cdn.example.com/videos/"])
    with pytest.raises(NotAllowed) as info:
        resolve_uri("https://user:pw@cdn.example.com/other/a.mp4?X-Amz-Signature=s3cret#t=1", remote)
    assert "pw" not in str(info.value) and "s3cret" not in str(info.value)
    assert "https://<redacted>@cdn.example.com/other/a.mp4?X-Amz-Signature=<redacted>#<redacted>" in str(info.value)
    assert "user-info (user:password@)" in str(info.value)  # says what is wrong, without the secret
    assert redact_uri("/data/" + "x" * 1000, limit=50).endswith("...") and len(redact_uri("x" * 1000, limit=50)) == 50
    assert redact_uri("/data/a.mp4") == "/data/a.mp4"


def test_remote_uri_needs_a_host():
    remote = DecodeSettings(allowed_schemes=["https"], allowed_prefixes=["https://cdn.example.com/"])
    with pytest.raises(UnsupportedURI):
        resolve_uri("https:///a.mp4", remote)


def test_s3_without_driver_is_unsupported():
    if importlib.util.find_spec("s3fs") is not None:
        pytest.skip("s3fs is installed; this checks the error when it is not")
    s3 = DecodeSettings(allowed_schemes=["s3"], allowed_prefixes=["s3://bucket/"])
    expect_error(UnsupportedURI, "s3://bucket/a.mp4", s3)


# ---------------------------------------------------------------- http via fsspec


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves the test directory; files under /nolength/ go out without a
    Content-Length (so the size is unknown until the body ends)."""

    def log_message(self, *args):
        pass

    def send_header(self, keyword, value):
        if keyword.lower() == "content-length" and self.path.startswith("/nolength/"):
            return
        super().send_header(keyword, value)

    def translate_path(self, path):
        return super().translate_path(path.replace("/nolength/", "/", 1))


@pytest.fixture
def http_root(tmp_path: Path):
    (tmp_path / "videos").mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(tmp_path)))
    server.protocol_version = "HTTP/1.0"  # close-delimited bodies, so a missing Content-Length is legal
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _http_settings(base: str, **kwargs) -> DecodeSettings:
    return DecodeSettings(allowed_schemes=["http"], allowed_prefixes=[f"{base}/videos/", f"{base}/nolength/videos/"],
                          **kwargs)


def test_http_video(http_root):
    directory, base = http_root
    make_video(directory / "videos" / "clip.mp4", 30)
    video = decode_video(f"{base}/videos/clip.mp4", _http_settings(base), num_frames=3)
    assert [frame_index(f) for f in video.frames] == [5, 15, 25]
    assert video.source_bytes == (directory / "videos" / "clip.mp4").stat().st_size


def test_http_errors(http_root):
    directory, base = http_root
    path = make_video(directory / "videos" / "clip.mp4", 30)
    expect_error(VideoNotFound, f"{base}/videos/missing.mp4", _http_settings(base))
    expect_error(NotAllowed, f"{base}/elsewhere/clip.mp4", _http_settings(base))
    small = _http_settings(base, max_bytes=path.stat().st_size - 1)
    expect_error(TooLarge, f"{base}/videos/clip.mp4", small)


def test_http_without_content_length_is_capped_while_reading(http_root):
    directory, base = http_root
    live = remux(make_video(directory / "src.webm", 30), directory / "videos" / "live.webm", "webm", seekable=False)
    uri = f"{base}/nolength/videos/live.webm"
    video = decode_video(uri, _http_settings(base), num_frames=3)
    assert video.source_bytes is None and video.num_frames == 3
    err = expect_error(TooLarge, uri, _http_settings(base, max_bytes=live.stat().st_size // 2))
    assert "max_bytes" in err.reason and "not known up front" in err.reason


class _DroppingHandler(http.server.BaseHTTPRequestHandler):
    """Announces the full body, sends half, hangs up: a flaky network, not a bad video."""

    protocol_version = "HTTP/1.1"
    body = b""

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()

    def do_GET(self):
        start, end = 0, len(self.body) - 1
        if self.headers.get("Range"):
            first, _, last = self.headers["Range"].partition("=")[2].partition("-")
            start, end = int(first), min(int(last or end), end)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(self.body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        chunk = self.body[start:end + 1]
        self.wfile.write(chunk[: len(chunk) // 2])
        self.close_connection = True


def test_network_failure_mid_read_propagates_for_retry(tmp_path):
    handler = type("Handler", (_DroppingHandler,), {"body": make_video(tmp_path / "clip.mp4", 300).read_bytes()})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with pytest.raises(Exception) as info:
            decode_video(f"{base}/clip.mp4", DecodeSettings(allowed_schemes=["http"], allowed_prefixes=[f"{base}/"]))
    finally:
        server.shutdown()
        server.server_close()
    # An OSError (worth retrying), not a VideoError (which would send the message to
    # the DLQ) and not FFmpeg's guess that the file is truncated.
    assert isinstance(info.value, OSError) and not isinstance(info.value, (VideoError, av.FFmpegError))
    assert "clip.mp4" in str(info.value)


class _FailingHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self.send_error(503)

    do_GET = do_HEAD


def test_server_error_is_an_oserror_for_retry(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FailingHandler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with pytest.raises(OSError) as info:
            decode_video(f"{base}/clip.mp4", DecodeSettings(allowed_schemes=["http"], allowed_prefixes=[f"{base}/"]))
    finally:
        server.shutdown()
        server.server_close()
    assert not isinstance(info.value, VideoError) and "503" in str(info.value)
    # Nobody listening at all is an outage too, not a missing video.
    with pytest.raises(OSError) as info:
        decode_video(f"{base}/clip.mp4", DecodeSettings(allowed_schemes=["http"], allowed_prefixes=[f"{base}/"]))
    assert not isinstance(info.value, VideoError)


def test_video_errors_survive_pickling():
    # Ray ships exceptions between processes.
    for cls in (UnsupportedURI, NotAllowed, VideoNotFound, TooLarge, Undecodable, NoVideoStream):
        copy = pickle.loads(pickle.dumps(cls("some reason")))
        assert type(copy) is cls and copy.reason == "some reason" and copy.error_class == cls.error_class
