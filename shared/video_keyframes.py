"""Keyframe sampling (``decode.seek_mode = keyframe``): a target takes the nearest keyframe.

Decoding the frame exactly at a target costs, on average, half a GOP of decoding
from the keyframe before it (a 250-frame GOP at 1080p: about a second of CPU per
frame). A keyframe decodes on its own. So in keyframe mode each target whose
nearest keyframe lies within the tolerance takes that keyframe, decoded alone
(seek to it, ``skip_frame = NONKEY`` so the frames after it are skipped, not
decoded). Targets with no keyframe close enough (a file with one keyframe, long
GOPs) are left to exact decoding. The frame's own pts is what callers get, so
moments stay exact; only which frame stands for a target changes.

The tolerance for a target is ``keyframe_tolerance_s``, and always less than half
the spacing between targets (see :func:`tolerances`): a keyframe then stands for at
most one target of a window, so keyframe mode returns as many distinct frames as
exact mode, and a short video (targets closer than its keyframes) decodes exactly
as before.

Keyframe times come from the container's index when it has one for the whole file
(mp4 sample tables, Matroska cues); otherwise from one demux pass over the packets'
keyframe flags, which reads but does not decode.
"""
from __future__ import annotations

import bisect
import math
from typing import TYPE_CHECKING, Callable

import av
import numpy as np

if TYPE_CHECKING:  # video.py imports this module; the types are only for hints
    from vidsearch.video import _Meta, _Source

_EPS = 1e-6


def tolerances(setting_s: float, spacing_s: float, count: int) -> list[float]:
    """Per-target tolerance for ``count`` targets ``spacing_s`` apart: the setting,
    capped just below half the spacing so one keyframe never stands for two targets."""
    return [min(setting_s, 0.5 * spacing_s - _EPS)] * count


def keyframe_times(source: "_Source", trusted_index: bool) -> tuple[list[float], bool]:
    """Sorted absolute times of the stream's keyframes, and whether a demux pass was used.

    mp4 indexes by dts, a frame or two before the keyframe's pts (B-frame delay); the
    offset of the first keyframe corrects all of them (x264 and most encoders keep it
    constant). Callers check the pts they get anyway.
    """
    stream = source.stream
    base = stream.time_base
    if trusted_index and base:
        entries = stream.index_entries
        keys = [int(e.timestamp) for e in entries if e.is_keyframe and not e.is_discard]
        if keys:
            shift = (stream.start_time - keys[0]) if stream.start_time is not None and keys[0] < stream.start_time else 0
            return [float((k + shift) * base) for k in keys], False
    times = []
    for packet in source.container.demux(stream):
        if packet.size and packet.is_keyframe and packet.pts is not None and base:
            times.append(float(packet.pts * base))
    source.reopen()
    return sorted(times), True


def plan(keyframes: list[float], targets: list[float], tols: list[float]) -> dict[int, float]:
    """Target index -> nearest keyframe time, for the targets with one within their tolerance."""
    chosen: dict[int, float] = {}
    for i, (target, tol) in enumerate(zip(targets, tols)):
        at = bisect.bisect_left(keyframes, target)
        near = [k for k in keyframes[max(at - 1, 0):at + 1]]
        if not near:
            continue
        best = min(near, key=lambda k: abs(k - target))
        if abs(best - target) <= tol:
            chosen[i] = best
    return chosen


def grab_keyframe(source: "_Source", meta: "_Meta", at_s: float) -> tuple[float, av.VideoFrame] | None:
    """(pts time, frame) of the keyframe at (about) ``at_s``, decoded alone.

    Seek to it, feed the decoder that one packet (``skip_frame = NONKEY`` besides,
    so nothing else is decoded) and drain it: a decoder holding frames back for
    B-frame reordering would otherwise decode the next keyframes before giving this
    one out, tripling the cost. Returns None when the seek lands somewhere useless
    (the caller decodes that target exactly instead).
    """
    stream = source.stream
    context = stream.codec_context
    frame_s = 1.0 / (meta.fps or 30.0)
    back_off = 0.0
    context.skip_frame = "NONKEY"
    try:
        # Some demuxers land after the goal (MPEG-TS seeks by byte bisection): then
        # retry from further back, doubling the distance, as exact seeking does.
        for _ in range(8):
            # Aim half a frame after the estimate: backward seeking then lands on this
            # keyframe even when the estimate (from dts) is a frame early.
            goal = int(math.floor((at_s + 0.5 * frame_s - back_off) / stream.time_base))
            try:
                source.container.seek(max(goal, stream.start_time or 0), stream=stream, backward=True,
                                      any_frame=False)
            except av.FFmpegError:
                source.raise_read_failure()
                return None
            landed_after = False
            for packet in source.container.demux(stream):
                if packet.size == 0 or packet.pts is None:
                    return None  # end of file, or no timestamps to place it by
                if not packet.is_keyframe:
                    continue  # reading on to the keyframe, not decoding
                time = float(packet.pts * stream.time_base)
                if time < at_s - frame_s:
                    continue  # an earlier keyframe: read on to ours
                if time > at_s + frame_s:
                    landed_after = True
                    break
                frames = stream.decode(packet) or stream.decode(None)
                if not frames or frames[0].pts is None:
                    return None
                # Drained frames carry no time base; the stream's is theirs.
                return float(frames[0].pts * stream.time_base), frames[0]
            if not landed_after or goal <= (stream.start_time or 0):
                return None
            back_off = max(2 * back_off, 1.0)
        return None
    finally:
        # Exact decoding after this needs every frame again; the next seek flushes the decoder.
        context.skip_frame = "DEFAULT"


def sample_keyframes(source: "_Source", meta: "_Meta", targets: list[float], tols: list[float],
                     index_trusted: bool, convert: Callable[[av.VideoFrame], np.ndarray],
                     check: Callable[[av.VideoFrame, float], None], picked: dict[float, np.ndarray],
                     times: list[float | None], after_scan: Callable[["_Source"], object] | None = None
                     ) -> tuple[int, int]:
    """Fill ``times[i]`` (and ``picked``, converted) for each target a keyframe can stand
    for; return (seeks, keyframes used). Targets left None are for exact decoding.
    ``check`` applies the per-frame limits; ``after_scan`` runs after a demux scan
    reopened the source (Matroska reloads its cues)."""
    keyframes, scanned = keyframe_times(source, index_trusted)
    if scanned and after_scan is not None:
        after_scan(source)
    choice = plan(keyframes, targets, tols)
    seeks, grabbed = 0, {}
    for i in sorted(choice):
        hit = grabbed.get(choice[i])
        if hit is None:
            seeks += 1
            hit = grab_keyframe(source, meta, choice[i])
            if hit is None:
                continue
            grabbed[choice[i]] = hit
        time, frame = hit
        # The index gave an estimate; the frame's own pts decides.
        if abs(time - targets[i]) > tols[i]:
            continue
        check(frame, time)
        times[i] = time
        if time not in picked:
            picked[time] = convert(frame)
    return seeks, len(picked)
