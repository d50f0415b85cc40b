"""Decode a handful of sampled frames from a video with PyAV.

Only the sampled frames are ever converted to RGB (and resized while converting),
and the decoder seeks to the keyframe before a target when that skips work. The
uri allowlist and the size, duration and resolution limits are checked before a
single frame is decoded, and every PyAV failure becomes a :class:`VideoError`.

Timestamps are seconds from the video stream's start, taken from each frame's
pts, so variable-frame-rate files get their true times. With ``seek_mode=exact``
the frame sampled for a target time t is the frame on screen at t: the last frame
whose time is <= t. With ``keyframe`` it is the nearest keyframe within the
tolerance, decoded alone, where there is one (vidsearch.video_keyframes).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

import av
import numpy as np
from av.stream import Disposition

from vidsearch.config import DecodeSettings
from vidsearch.segments import Window, segment_count, segment_windows
from vidsearch.video_keyframes import sample_keyframes, tolerances
from vidsearch.uris import (
    GuardedReader,
    NotAllowed,
    NoVideoStream,
    ResolvedURI,
    TooLarge,
    Undecodable,
    UnsupportedURI,
    VideoError,
    VideoNotFound,
    resolve_uri,
)

_T = TypeVar("_T")

# Without a keyframe index, seek only past gaps longer than this (and longer than
# the largest keyframe interval seen so far); shorter gaps decode through faster
# than a seek, decoder flush and re-decode from an unknown keyframe.
MIN_SEEK_GAP_S = 1.0
# Float targets like 3 * 0.1 land a hair off a frame's pts; don't miss that frame.
_EPS = 1e-6
# A frame this far past the declared duration means the metadata lied.
_DURATION_SLACK_S = 1.0


@dataclass(frozen=True)
class DecodedVideo:
    """Sampled RGB frames plus what callers store alongside them."""

    frames: np.ndarray  # uint8 [T, H, W, 3]
    timestamps: np.ndarray  # float32 [T], seconds from the stream start, increasing
    duration_s: float
    width: int  # source dimensions, before any resize
    height: int
    fps: float | None  # average frame rate from the metadata, when known
    source_bytes: int | None
    codec: str
    seeks: int  # how many seeks the decode used (0 = one linear pass)
    keyframes: int = 0  # frames that stand for their target as the nearest keyframe (seek_mode=keyframe)

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])


def decode_video(
    uri: str,
    settings: DecodeSettings,
    *,
    num_frames: int | None = None,
    resize_to: int | None = None,
) -> DecodedVideo:
    """Decode sampled frames from ``uri``.

    ``num_frames`` is the most frames to return: the count for ``uniform``
    sampling (default ``settings.num_frames``), the cap for ``fps`` sampling
    (default ``settings.max_frames``); it may not exceed ``settings.max_frames``.
    A video with fewer frames than asked for returns the frames it has, never
    duplicates. ``resize_to`` scales the shorter side to that many pixels,
    keeping the aspect ratio.

    Raises a VideoError subclass for any bad uri or video, ValueError for bad
    arguments, and OSError for trouble in the storage layer itself (a dropped
    connection, an unreachable host, an HTTP 500): that is worth retrying, a
    VideoError is not.
    """
    return _run_decode(_decode, uri, settings, num_frames, resize_to)


@dataclass(frozen=True)
class DecodedSegments:
    """A video's segments sampled in one decoding pass.

    Each distinct frame is held once (``frames``, in time order); overlapping
    windows share frames through ``frame_index``. A video no longer than
    ``segment_s`` has one window covering it all, with the same frames as
    :func:`decode_video`.
    """

    frames: np.ndarray  # uint8 [N, H, W, 3], distinct frames, time order
    timestamps: np.ndarray  # float32 [N], seconds from the stream start
    windows: tuple[Window, ...]
    frame_index: tuple[tuple[int, ...], ...]  # per window: indices into frames, increasing
    duration_s: float
    width: int
    height: int
    fps: float | None
    source_bytes: int | None
    codec: str
    seeks: int
    keyframes: int = 0  # distinct frames taken as the nearest keyframe (seek_mode=keyframe)

    def segment(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(frames, timestamps) of window ``k``."""
        index = list(self.frame_index[k])
        return self.frames[index], self.timestamps[index]


def decode_segments(
    uri: str,
    settings: DecodeSettings,
    *,
    num_frames: int | None = None,
    resize_to: int | None = None,
) -> DecodedSegments:
    """Decode ``num_frames`` sampled frames per segment window of ``uri``, all windows
    in one pass over the file (targets of overlapping windows interleave; each frame
    is converted once).

    Raises like :func:`decode_video`, plus TooLarge when the video needs more than
    ``settings.max_segments`` windows or its frames would exceed ``max_decoded_mb``,
    both found from the header before a frame is decoded.
    """
    return _run_decode(_decode_segments, uri, settings, num_frames, resize_to)


def _run_decode(decode: Callable[[_Source, DecodeSettings, int, int | None], _T], uri: str,
                settings: DecodeSettings, num_frames: int | None, resize_to: int | None) -> _T:
    """Check the arguments, open ``uri`` behind the allowlist and limits, run ``decode``
    on it with PyAV failures translated, and always close it."""
    budget = _frame_budget(settings, num_frames)
    if resize_to is not None and (isinstance(resize_to, bool) or not isinstance(resize_to, int) or resize_to < 1):
        raise ValueError(f"resize_to must be a positive int, got {resize_to!r}")
    source = _Source(resolve_uri(uri, settings), settings)
    try:
        with _translated_errors(source):
            source.open()
            return decode(source, settings, budget, resize_to)
    finally:
        source.close()


def _decode_segments(source: _Source, settings: DecodeSettings, budget: int,
                     resize_to: int | None) -> DecodedSegments:
    meta = _checked_metadata(source, settings)
    duration = max(meta.duration_s, 0.0)
    _check_segments(duration, settings, source.uri)
    windows = segment_windows(duration, settings.segment_s, settings.segment_overlap_s)
    per_window = [_window_targets(settings, budget, meta.origin_s, w.start_s, w.length_s) for w in windows]
    _check_decoded_size(meta, sum(map(len, per_window)), resize_to, settings, source.uri)
    owners = sorted((t, k) for k, targets in enumerate(per_window) for t in targets)
    # Tolerances per window: a keyframe stands for one target of a window, and may be
    # shared with an overlapping window's target (frame_index shares it).
    window_tol = [settings.keyframe_tolerance_s if len(targets) < 2 else
                  tolerances(settings.keyframe_tolerance_s, targets[1] - targets[0], 1)[0] for targets in per_window]
    chosen: list[float] = []
    picked, seeks, keyed = _sample(source, meta, [t for t, _ in owners], resize_to, chosen,
                                   [window_tol[k] for _, k in owners])
    times = sorted(picked)
    position = {t: i for i, t in enumerate(times)}
    index: list[list[int]] = [[] for _ in windows]
    for (_, k), time in zip(owners, chosen):
        if not index[k] or index[k][-1] != position[time]:
            index[k].append(position[time])
    # A window past the last decodable frame (a truncated file) still gets that frame.
    index = [sorted(set(i)) or [len(times) - 1] for i in index]
    return DecodedSegments(
        frames=np.stack([picked[t] for t in times]),
        timestamps=np.maximum(np.asarray(times, dtype=np.float64) - meta.origin_s, 0.0).astype(np.float32),
        windows=tuple(windows),
        frame_index=tuple(tuple(i) for i in index),
        duration_s=float(duration),
        width=meta.width,
        height=meta.height,
        fps=meta.fps,
        source_bytes=source.reader.size,
        codec=source.stream.codec_context.name,
        seeks=seeks,
        keyframes=keyed,
    )


def _check_decoded_size(meta: _Meta, frames: int, resize_to: int | None, settings: DecodeSettings,
                        uri: str) -> None:
    """Refuse before decoding when the sampled RGB frames alone would pass ``max_decoded_mb``."""
    if not meta.width or not meta.height:
        return  # dimensions unknown until the first frame; max_pixels still bounds each one
    width, height = _output_size(meta.width, meta.height, resize_to, settings, uri)
    size_mb = frames * width * height * 3 / 2**20
    if size_mb > settings.max_decoded_mb:
        raise TooLarge(f"{uri!r}: {frames} sampled frames of {width}x{height} take {size_mb:.0f} MiB, "
                       f"over the limit max_decoded_mb={settings.max_decoded_mb}")


def _check_segments(duration_s: float, settings: DecodeSettings, uri: str) -> None:
    needed = segment_count(duration_s, settings.segment_s, settings.segment_overlap_s)
    if needed > settings.max_segments:
        raise TooLarge(f"{uri!r} lasts {duration_s:.1f} s: {needed} segments of {settings.segment_s:g} s, "
                       f"over the limit max_segments={settings.max_segments}")


def probe_video(uri: str, settings: DecodeSettings) -> None:
    """Check ``uri`` against the allowlist and every decode limit without decoding a frame
    (the container header only): what the ingest CLI does before publishing anything.

    Raises the VideoError that decoding it would raise (NotAllowed, TooLarge ...).
    """
    source = _Source(resolve_uri(uri, settings), settings)
    try:
        with _translated_errors(source):
            source.open()
            meta = _read_metadata(source.container, source.stream)
            _check_limits(meta, settings, source.uri)
            if meta.duration_s is not None:  # else decoding finds it (and the segment count) from the packets
                _check_segments(max(meta.duration_s, 0.0), settings, source.uri)
    finally:
        source.close()


def _frame_budget(settings: DecodeSettings, num_frames: int | None) -> int:
    if num_frames is None:
        return settings.num_frames if settings.sampling == "uniform" else settings.max_frames
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be a positive int, got {num_frames!r}")
    if num_frames > settings.max_frames:
        raise TooLarge(f"asked for {num_frames} frames, over the limit max_frames={settings.max_frames}")
    return num_frames


class _SeekFailed(Exception):
    """The container can't seek usefully; fall back to one linear pass."""


class _Source:
    """An open container and its chosen video stream; reopenable from the start."""

    def __init__(self, resolved: ResolvedURI, settings: DecodeSettings) -> None:
        self.resolved = resolved
        self.settings = settings
        self.reader: GuardedReader | None = None
        self.container: av.container.InputContainer | None = None
        self.stream: av.video.stream.VideoStream | None = None

    @property
    def uri(self) -> str:
        """For messages: redacted, see vidsearch.uris.redact_uri."""
        return self.resolved.display

    def open(self) -> None:
        self.close()
        self.reader = self.resolved.open(self.settings.max_bytes)
        if self.reader.size == 0:
            raise Undecodable(f"{self.uri!r} is an empty file (0 bytes)")
        # Metadata is never used here; a badly encoded tag must not fail the open.
        self.container = av.open(self.reader, mode="r", metadata_errors="ignore")
        self.stream = _pick_video_stream(self.container, self.uri)
        context = self.stream.codec_context
        context.thread_count = self.settings.threads  # 0 lets FFmpeg pick
        context.thread_type = "AUTO"  # frame and slice threads, whichever the codec supports

    def reopen(self) -> None:
        # A read failure hidden in the reader being dropped must not be lost.
        self.raise_read_failure()
        self.open()

    def seekable(self) -> bool:
        return self.reader is not None and self.reader.seekable()

    def close(self) -> None:
        if self.container is not None:
            try:
                self.container.close()
            except av.FFmpegError:
                pass  # closing a broken container can complain; nothing is left to save
        if self.reader is not None:
            self.reader.close()
        self.container = self.reader = self.stream = None

    def raise_read_failure(self) -> None:
        """A read error hidden from FFmpeg (see GuardedReader) wins over whatever FFmpeg made of it."""
        failure = self.reader.failure if self.reader is not None else None
        if failure is not None:
            raise failure



@contextmanager
def _translated_errors(source: _Source) -> Iterator[None]:
    """PyAV errors become Undecodable. A read failure hidden from FFmpeg (see
    GuardedReader) explains whatever FFmpeg made of it (a short read looks like a
    truncated file), so it is raised first."""
    try:
        yield
    except av.FFmpegError as exc:
        source.raise_read_failure()
        raise Undecodable(f"{source.uri!r}: {_ffmpeg_message(exc)}") from None
    except Exception:
        source.raise_read_failure()
        raise
    source.raise_read_failure()


def _ffmpeg_message(exc: av.FFmpegError) -> str:
    # PyAV appends the file name ('<none>' for file objects); the uri is already in the reason.
    return getattr(exc, "strerror", None) or str(exc)


def _pick_video_stream(container: av.container.InputContainer, uri: str) -> av.video.stream.VideoStream:
    # Cover art in audio files is a one-picture "video" stream; it is not a video.
    streams = [s for s in container.streams.video if not (s.disposition & Disposition.attached_pic)]
    if not streams:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        raise NoVideoStream(f"{uri!r} has no video stream (streams: {', '.join(kinds)})")
    stream = streams[0]
    if stream.codec_context is None:
        raise Undecodable(f"{uri!r}: no decoder for video codec '{stream.codec.name if stream.codec else '?'}'")
    return stream


@dataclass
class _Meta:
    width: int
    height: int
    origin_s: float  # stream start; timestamps are reported relative to it
    duration_s: float | None
    fps: float | None


def _read_metadata(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> _Meta:
    base = stream.time_base
    if stream.start_time is not None and base:
        origin = float(stream.start_time * base)
    elif container.start_time is not None:
        origin = container.start_time / av.time_base
    else:
        origin = 0.0  # no timestamps at all (raw elementary stream): times are synthesised from 0
    if stream.duration and base:
        duration = float(stream.duration * base)
    elif container.duration:
        duration = container.duration / av.time_base  # mkv/webm keep it on the container
    else:
        duration = None
    rate = stream.average_rate or stream.guessed_rate
    context = stream.codec_context
    return _Meta(context.width, context.height, origin, duration, float(rate) if rate else None)


def _checked_metadata(source: _Source, settings: DecodeSettings) -> _Meta:
    """The stream's metadata, checked against the limits, with a duration read from the
    packets when the headers give none or contradict themselves."""
    meta = _read_metadata(source.container, source.stream)
    _check_limits(meta, settings, source.uri)
    if meta.duration_s is None or _duration_doubtful(source.stream, meta):
        meta.duration_s = _probe_duration(source, meta)
        source.reopen()
    return meta


def _check_limits(meta: _Meta, settings: DecodeSettings, uri: str) -> None:
    pixels = meta.width * meta.height
    if pixels > settings.max_pixels:
        raise TooLarge(f"{uri!r} is {meta.width}x{meta.height} = {pixels} pixels, "
                       f"over the limit max_pixels={settings.max_pixels}")
    if meta.duration_s is not None and meta.duration_s > settings.max_duration_s:
        raise TooLarge(f"{uri!r} lasts {meta.duration_s:.1f} s, over the limit max_duration_s={settings.max_duration_s:g}")


def _duration_doubtful(stream: av.video.stream.VideoStream, meta: _Meta) -> bool:
    """Headers that disagree with themselves: a frame count at the frame rate far
    from the stated duration (ivf, for one, states its duration in frames)."""
    if not stream.frames or not meta.fps or meta.duration_s is None:
        return False
    implied = stream.frames / meta.fps
    return abs(implied - meta.duration_s) > max(1.0, 0.25 * max(implied, meta.duration_s))


def _probe_duration(source: _Source, meta: _Meta) -> float:
    """Duration from the packets themselves, for files whose headers don't say.

    Demuxing without decoding is cheap. It stops as soon as the duration limit is
    passed, so a huge undeclared file is refused without being read to the end.
    """
    end = meta.origin_s
    packets = 0
    base = source.stream.time_base
    limit = source.settings.max_duration_s
    for packet in source.container.demux(source.stream):
        if packet.size == 0:
            continue  # demux ends with an empty flush packet
        packets += 1
        if packet.pts is not None and base:
            # A packet without a duration (common in streamed webm) shows for one nominal frame.
            shown = float(packet.duration * base) if packet.duration else 1.0 / (meta.fps or 25.0)
            end = max(end, float(packet.pts * base) + shown)
        elif meta.fps:
            end = meta.origin_s + packets / meta.fps
        if end - meta.origin_s > limit:
            raise TooLarge(f"{source.uri!r} lasts over {limit:g} s (the limit max_duration_s), "
                           "found by reading it: its headers give no duration")
    return end - meta.origin_s


def _targets(settings: DecodeSettings, budget: int, meta: _Meta) -> list[float]:
    """Absolute stream times to sample over the whole video, increasing."""
    return _window_targets(settings, budget, meta.origin_s, 0.0, max(meta.duration_s or 0.0, 0.0))


def _window_targets(settings: DecodeSettings, budget: int, origin_s: float, start_s: float,
                    length_s: float) -> list[float]:
    """Absolute stream times to sample in ``[start_s, start_s + length_s)``, increasing."""
    base = origin_s + start_s
    if settings.sampling == "fps":
        count = max(1, math.ceil(length_s * settings.fps - _EPS))
        if count <= budget:
            return [base + k / settings.fps for k in range(count)]
    # Uniform (also fps sampling over budget): the centre of each of N equal parts.
    return [base + (k + 0.5) * length_s / budget for k in range(budget)]


class _Cursor:
    """Walks decoded frames forward, remembering the frame on screen at each target.

    ``current`` is the last frame at or before the latest target, ``peek`` the one
    after it (already decoded). Keyframe spacing seen on the way feeds the seek
    decision for containers without an index.
    """

    def __init__(self, source: _Source, meta: _Meta) -> None:
        self.source = source
        self.meta = meta
        self.keyframe_gap = 0.0
        self.seeks = 0
        self.index_trusted = False
        self.restart()

    def restart(self) -> None:
        self._frames: Iterator[av.VideoFrame] = iter(self.source.container.decode(self.source.stream))
        self.current: tuple[float, av.VideoFrame] | None = None
        self.peek: tuple[float, av.VideoFrame] | None = None
        self._last_time: float | None = None
        self._last_key: float | None = None
        self._exhausted = False

    @property
    def position(self) -> float | None:
        """Time of the furthest frame decoded since the last (re)start or seek."""
        if self.peek is not None:
            return self.peek[0]
        return self.current[0] if self.current is not None else None

    def _next(self) -> tuple[float, av.VideoFrame] | None:
        if self._exhausted:
            return None
        frame = next(self._frames, None)
        if frame is None:
            self._exhausted = True
            return None
        time = self._frame_time(frame)
        self._check_frame(frame, time)
        if frame.key_frame:
            if self._last_key is not None:
                self.keyframe_gap = max(self.keyframe_gap, time - self._last_key)
            self._last_key = time
        self._last_time = time
        return time, frame

    def _frame_time(self, frame: av.VideoFrame) -> float:
        if frame.pts is not None and frame.time is not None:
            return float(frame.time)
        # No pts (raw elementary streams): count frames at the nominal rate.
        if self._last_time is None:
            return self.meta.origin_s
        return self._last_time + 1.0 / (self.meta.fps or 25.0)

    def _check_frame(self, frame: av.VideoFrame, time: float) -> None:
        settings, uri = self.source.settings, self.source.uri
        if frame.width * frame.height > settings.max_pixels:
            raise TooLarge(f"{uri!r} has a {frame.width}x{frame.height} frame, "
                           f"over the limit max_pixels={settings.max_pixels}")
        if time - self.meta.origin_s > settings.max_duration_s + _DURATION_SLACK_S:
            raise TooLarge(f"{uri!r} has a frame at {time - self.meta.origin_s:.1f} s, "
                           f"over the limit max_duration_s={settings.max_duration_s:g}")

    def frame_at(self, target: float) -> tuple[float, av.VideoFrame] | None:
        """The frame on screen at ``target`` (the first frame if target precedes it)."""
        if self.peek is None:
            self.peek = self._next()
        while self.peek is not None and self.peek[0] <= target + _EPS:
            self.current, self.peek = self.peek, self._next()
        return self.current if self.current is not None else self.peek

    def seek(self, target: float) -> None:
        """Seek to the keyframe at or before ``target`` and peek the first frame there.

        Some demuxers land after the target (MPEG-TS seeks by byte bisection and
        resyncs at the next keyframe; sparse indexes); then retry from further back,
        doubling the distance. If even a seek to the start lands too late, give up
        seeking (_SeekFailed): the caller reopens the file and decodes linearly.
        """
        stream, origin = self.source.stream, self.meta.origin_s
        back_off = 0.0
        while True:
            goal = max(target - back_off, origin)
            self._seek_pts(int(math.floor(goal / stream.time_base)))
            first = self.peek = self._next()
            if first is None:
                raise _SeekFailed("no frames after seeking")
            if first[1].pts is None:
                raise _SeekFailed("frames have no timestamps, so a seek can't be placed")
            if first[0] <= target + _EPS:
                break
            if goal <= origin:
                raise _SeekFailed("seeks land after the target, even from the start")
            back_off = max(2 * back_off, MIN_SEEK_GAP_S)
        # Landing on keyframe k for target t means there is no keyframe in (k, t].
        self.keyframe_gap = max(self.keyframe_gap, target - first[0])
        self.seeks += 1

    def _seek_pts(self, pts: int) -> None:
        try:
            self.source.container.seek(pts, stream=self.source.stream, backward=True, any_frame=False)
        except av.FFmpegError as exc:
            self.source.raise_read_failure()
            raise _SeekFailed(_ffmpeg_message(exc)) from None
        self.restart()


def _worth_seeking(cursor: _Cursor, target: float) -> bool:
    """Seek when it skips decoding: the keyframe before ``target`` lies beyond what
    has been decoded already. Without a usable index, guess from keyframe gaps."""
    position = cursor.position
    if position is None:
        position = cursor.meta.origin_s  # freshly opened: the decoder is at the start
    if target <= position + _EPS:
        return False
    if cursor.index_trusted:
        keyframe = _indexed_keyframe_before(cursor.source.stream, target)
        if keyframe is not None:
            return keyframe > position + _EPS
    return target - position > max(MIN_SEEK_GAP_S, cursor.keyframe_gap)


def _indexed_keyframe_before(stream: av.video.stream.VideoStream, target: float) -> float | None:
    """Time of the last indexed keyframe <= target (mp4 indexes by dts, a frame or
    two early, which is close enough to choose between seeking and decoding on)."""
    entries = stream.index_entries
    if not stream.time_base:
        return None
    at = entries.search_timestamp(int(math.floor(target / stream.time_base)), backward=True)
    return float(entries[at].timestamp * stream.time_base) if at >= 0 else None


def _load_matroska_cues(source: _Source) -> bool:
    """Matroska/WebM read their cues (the keyframe index) only on the first seek.

    One seek to the start, before decoding, loads them so the seek decisions get
    an index, and shows early whether this file can seek at all. (Only here: in
    MPEG-TS, say, a seek is a byte bisection that can land past the start.)
    """
    try:
        source.container.seek(source.stream.start_time, stream=source.stream, backward=True)
    except av.FFmpegError:
        source.raise_read_failure()
        source.reopen()
        return False
    return True


def _output_size(width: int, height: int, resize_to: int | None, settings: DecodeSettings, uri: str) -> tuple[int, int]:
    if resize_to is None:
        return width, height
    if width <= height:
        size = (resize_to, max(1, round(height * resize_to / width)))
    else:
        size = (max(1, round(width * resize_to / height)), resize_to)
    if size[0] * size[1] > settings.max_pixels:
        raise TooLarge(f"resize_to={resize_to} would make {size[0]}x{size[1]} frames from {uri!r}, "
                       f"over the limit max_pixels={settings.max_pixels}")
    return size


def _decode(source: _Source, settings: DecodeSettings, budget: int, resize_to: int | None) -> DecodedVideo:
    meta = _checked_metadata(source, settings)
    targets = _targets(settings, budget, meta)
    spacing = targets[1] - targets[0] if len(targets) > 1 else float("inf")
    picked, seeks, keyed = _sample(source, meta, targets, resize_to, None,
                                   tolerances(settings.keyframe_tolerance_s, spacing, len(targets)))
    times = sorted(picked)
    return DecodedVideo(
        frames=np.stack([picked[t] for t in times]),
        timestamps=np.maximum(np.asarray(times, dtype=np.float64) - meta.origin_s, 0.0).astype(np.float32),
        duration_s=float(meta.duration_s),
        width=meta.width,
        height=meta.height,
        fps=meta.fps,
        source_bytes=source.reader.size,
        codec=source.stream.codec_context.name,
        seeks=seeks,
        keyframes=keyed,
    )


class _Converter:
    """RGB at the output size, for kept frames only: swscale resizes while converting,
    and every frame comes out the same shape even if the stream changes size."""

    def __init__(self, source: _Source, meta: _Meta, resize_to: int | None) -> None:
        self.source, self.meta, self.resize_to = source, meta, resize_to
        self.out_size: tuple[int, int] | None = None

    def __call__(self, frame: av.VideoFrame) -> np.ndarray:
        if self.out_size is None:
            # Metadata may lack dimensions (0x0); the first frame never does.
            meta = self.meta
            meta.width, meta.height = meta.width or frame.width, meta.height or frame.height
            self.out_size = _output_size(meta.width, meta.height, self.resize_to, self.source.settings,
                                         self.source.uri)
        return frame.to_ndarray(width=self.out_size[0], height=self.out_size[1], format="rgb24")


def _sample(source: _Source, meta: _Meta, targets: list[float], resize_to: int | None,
            chosen: list[float] | None = None,
            tols: list[float] | None = None) -> tuple[dict[float, np.ndarray], int, int]:
    """RGB arrays of the frames for ``targets`` (increasing), keyed by frame time, the
    seek count and how many of the frames are keyframes standing for their target.
    ``chosen``, when given, gets the frame time picked for each target, so callers
    sampling several windows in one pass can map frames back. ``tols`` (per target)
    turns on keyframe sampling when ``seek_mode`` is keyframe; without it every
    target gets the frame on screen at it."""
    # Seeking needs random access and timestamps (raw elementary streams have none).
    can_seek = source.seekable() and source.stream.start_time is not None
    matroska = "matroska" in source.container.format.name
    if can_seek and matroska:
        can_seek = _load_matroska_cues(source)
    # An index present before any decoding came from the file (mp4 sample tables,
    # Matroska cues, nut/flv/avi indexes) and covers it all. Formats without one
    # (MPEG-TS, ivf) grow a partial index as they demux or seek: not to be trusted.
    index_trusted = len(source.stream.index_entries) > 1
    convert = _Converter(source, meta, resize_to)
    picked: dict[float, np.ndarray] = {}
    times: list[float | None] = [None] * len(targets)
    seeks = keyed = 0
    if can_seek and tols is not None and source.settings.seek_mode == "keyframe":
        checker = _Cursor(source, meta)
        seeks, keyed = sample_keyframes(source, meta, targets, tols, index_trusted, convert, checker._check_frame,
                                        picked, times, after_scan=_load_matroska_cues if matroska else None)
    exact = [i for i, t in enumerate(times) if t is None]
    if exact:
        if seeks and not _rewind(source):
            can_seek = False  # a rewind failed: the source was reopened, decode linearly
        seeks = _sample_exact(source, meta, [targets[i] for i in exact], exact, can_seek, index_trusted,
                              convert, picked, times, seeks)
    if not picked:
        raise Undecodable(f"{source.uri!r} has a video stream but no decodable frames")
    if chosen is not None:
        # A target past the last decodable frame (a truncated file) keeps the last frame seen.
        last = None
        for time in times:
            last = time if time is not None else last
            chosen.append(last if last is not None else min(picked))
    return picked, seeks, keyed


def _rewind(source: _Source) -> bool:
    """Back to the start after keyframe grabs, for the exact pass; False if that took a reopen."""
    try:
        source.container.seek(source.stream.start_time, stream=source.stream, backward=True)
        return True
    except av.FFmpegError:
        source.raise_read_failure()
        source.reopen()
        return False


def _sample_exact(source: _Source, meta: _Meta, targets: list[float], slots: list[int], can_seek: bool,
                  index_trusted: bool, convert: _Converter, picked: dict[float, np.ndarray],
                  times: list[float | None], seeks: int) -> int:
    """The frame on screen at each of ``targets`` (increasing) into ``times[slots[i]]``;
    returns the seek count so far."""
    cursor = _Cursor(source, meta)
    cursor.seeks = seeks
    cursor.index_trusted = index_trusted
    for slot, target in zip(slots, targets):
        if can_seek and _worth_seeking(cursor, target):
            try:
                cursor.seek(target)
            except _SeekFailed:
                # Start over with one linear pass; frames picked so far stay valid.
                can_seek, seeks = False, cursor.seeks
                source.reopen()
                cursor = _Cursor(source, meta)
                cursor.seeks = seeks
        hit = cursor.frame_at(target)
        if hit is None:
            break  # no frames at all
        time, frame = hit
        times[slot] = time
        if time in picked:
            continue  # fewer frames than targets (or windows sharing a frame): convert it once
        picked[time] = convert(frame)
    return cursor.seeks


def decode_frame_at(uri: str, settings: DecodeSettings, at_s: float, *,
                    max_short_side: int | None = None) -> DecodedVideo:
    """The one frame on screen ``at_s`` seconds into the video (a thumbnail, a preview).

    The same gate, limits and seeking as :func:`decode_video`; a time past the end
    gives the last frame. ``max_short_side`` scales the frame down (never up) so
    its shorter side is at most that many pixels. Raises like ``decode_video``.
    """
    if isinstance(at_s, bool) or not isinstance(at_s, (int, float)) or not math.isfinite(at_s) or at_s < 0:
        raise ValueError(f"at_s must be a finite number of seconds >= 0, got {at_s!r}")
    if max_short_side is not None and (isinstance(max_short_side, bool) or not isinstance(max_short_side, int)
                                       or max_short_side < 1):
        raise ValueError(f"max_short_side must be a positive int, got {max_short_side!r}")
    source = _Source(resolve_uri(uri, settings), settings)
    try:
        with _translated_errors(source):
            source.open()
            meta = _checked_metadata(source, settings)
            short = min(meta.width, meta.height)
            resize_to = max_short_side if max_short_side is not None and short > max_short_side else None
            picked, seeks, _ = _sample(source, meta, [meta.origin_s + float(at_s)], resize_to)
            (time,) = picked
            return DecodedVideo(
                frames=picked[time][None], timestamps=np.array([max(time - meta.origin_s, 0.0)], np.float32),
                duration_s=float(meta.duration_s), width=meta.width, height=meta.height, fps=meta.fps,
                source_bytes=source.reader.size, codec=source.stream.codec_context.name, seeks=seeks)
    finally:
        source.close()


__all__ = [
    "DecodedSegments", "DecodedVideo", "NoVideoStream", "NotAllowed", "TooLarge", "Undecodable", "UnsupportedURI",
    "VideoError", "VideoNotFound", "decode_frame_at", "decode_segments", "decode_video", "probe_video",
]
