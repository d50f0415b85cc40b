"""Decoding real-resolution video: exact and keyframe sampling against their bounds and torchcodec.

One run writes (once; cached under .bench/decode-videos) camera-like files with the
project's writer (vidsearch.video_camera: panning texture plus sensor noise, CRF 23,
H.264 and VP9, 480p to 2160p, GOPs 30/60/250) and measures, per file, on one core
(``decode.threads = 1``), CPU seconds from the process clock (all its threads):

- exact:  decode_video with seek_mode=exact (12 uniform frames, resized to 224)
- fast:   decode_video with seek_mode=keyframe (default tolerance)
- keyframe-only bound: every keyframe of the file decoded with skip_frame=NONKEY
- full decode: every frame decoded (no conversion)
- torchcodec: VideoDecoder(seek_mode="exact", one FFmpeg thread) taking the frames
  played at the same target times, resized to the same size: the anchor
- segments (one long file): decode_segments (default segment settings) in one pass,
  against opening and sampling each window on its own
- threads: exact sampling on one 1080p file with decode.threads = 1, 2 and 0 (auto)

Ratios are between numbers measured in the same run, which is what to trust on a
shared machine. Writes docs/benchmarks/decode.md and decode.png (``--quick``: under
.bench/results).

    python benchmarks/decode.py            # full set, about 25 min on a loaded 2-core box
    python benchmarks/decode.py --quick    # smaller, shorter files
    python benchmarks/decode.py --tiny     # smoke test: tiny files, seconds

End to end through Kafka with segments is benchmarks/ingest.py's job; ``--segments-json``
saves the long file's path and settings for it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import common

common.isolate_environment()

import av  # noqa: E402

from vidsearch.config import DecodeSettings  # noqa: E402
from vidsearch.segments import segment_windows  # noqa: E402
from vidsearch.video import decode_segments, decode_video  # noqa: E402
from vidsearch.video_camera import CameraSpec, write_camera_video  # noqa: E402

FAST_BOUND_TARGET = 1.5  # fast sampling at most this many times the keyframe-only bound
RESIZE_TO = 224  # the model's input size (short side)
TILE_S = 10.0  # files longer than this are one encoded tile repeated (stream copy)

FULL = [
    CameraSpec("h264", 854, 480, 10, gop=30),
    CameraSpec("h264", 1280, 720, 60, gop=60),
    CameraSpec("h264", 1920, 1080, 30, gop=30),
    CameraSpec("h264", 1920, 1080, 30, gop=60),
    CameraSpec("h264", 1920, 1080, 60, gop=250),
    CameraSpec("vp9", 1280, 720, 60, gop=60),
    CameraSpec("vp9", 1920, 1080, 30, gop=250),
    CameraSpec("h264", 3840, 2160, 10, gop=60),
]
FULL_LONG = CameraSpec("h264", 854, 480, 1200, gop=60)
QUICK = [
    CameraSpec("h264", 854, 480, 10, gop=30),
    CameraSpec("h264", 1280, 720, 30, gop=60),
    CameraSpec("h264", 1920, 1080, 30, gop=250),
    CameraSpec("vp9", 1280, 720, 30, gop=60),
]
QUICK_LONG = CameraSpec("h264", 854, 480, 120, gop=60)
TINY = [CameraSpec("h264", 256, 144, 4, gop=30), CameraSpec("vp9", 256, 144, 4, gop=30)]
TINY_LONG = CameraSpec("h264", 256, 144, 40, gop=30)


# ============================================================================ files
def tile_frames(spec: CameraSpec) -> int:
    """Frames in the encoded tile: whole GOPs, about TILE_S long (never more than the file)."""
    total = round(spec.seconds * spec.fps)
    gops = max(1, round(min(TILE_S, spec.seconds) * spec.fps / spec.gop))
    return min(total, gops * spec.gop)


def loop_tile(tile: Path, out: Path, copies: int) -> None:
    """``copies`` of ``tile`` back to back by stream copy: a long file for the cost of a short
    encode. Each copy starts on a keyframe, so the result decodes like one long encode."""
    with av.open(str(tile)) as first:
        src = first.streams.video[0]
        pts = [(p.pts, p.duration or 0) for p in first.demux(src) if p.size]
        span = max(a + d for a, d in pts) - min(a for a, _ in pts)
        with av.open(str(out), "w") as dst:
            stream = dst.add_stream_from_template(src)
            for copy in range(copies):
                # Muxing takes the packet's data, so each copy demuxes the tile again.
                with av.open(str(tile)) as again:
                    for p in again.demux(again.streams.video[0]):
                        if not p.size:
                            continue
                        p.stream = stream
                        p.pts += copy * span
                        if p.dts is not None:
                            p.dts += copy * span
                        dst.mux(p)


def ensure_file(spec: CameraSpec, cache: Path) -> Path:
    path = cache / spec.name
    if path.exists():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    frames = tile_frames(spec)
    copies = max(1, round(spec.seconds * spec.fps / frames))
    tile_spec = CameraSpec(spec.codec, spec.width, spec.height, frames / spec.fps, spec.fps, spec.gop, spec.crf)
    tmp = path.with_name("tmp-" + path.name)
    if copies == 1:
        write_camera_video(tmp, tile_spec)
    else:
        tile = cache / ("tile-" + tile_spec.name)
        if not tile.exists():
            write_camera_video(tile.with_name("tmp-" + tile.name), tile_spec)
            tile.with_name("tmp-" + tile.name).rename(tile)
        loop_tile(tile, tmp, copies)
    tmp.rename(path)
    print(f"wrote {path.name} in {time.perf_counter() - started:.0f}s", flush=True)
    return path


def file_facts(path: Path) -> dict[str, Any]:
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        keys = sum(1 for p in c.demux(s) if p.size and p.is_keyframe)
        duration = float(s.duration * s.time_base) if s.duration else c.duration / av.time_base
        frames = s.frames
    size = path.stat().st_size
    return {"bytes": size, "mbit_s": size * 8 / duration / 1e6, "duration_s": duration, "keyframes": keys,
            "frames": frames}


# ============================================================================ measuring
@dataclass
class Timing:
    cpu_s: float
    wall_s: float
    frames: int  # frames returned (or decoded, for the bounds)
    extra: dict[str, Any]


def timed(fn: Callable[[], tuple[int, dict[str, Any]]], repeats: int = 1) -> Timing:
    """The fastest of ``repeats`` runs by CPU time (other jobs on the box only add to wall time)."""
    best: Timing | None = None
    for _ in range(repeats):
        cpu, wall = time.process_time(), time.perf_counter()
        frames, extra = fn()
        timing = Timing(time.process_time() - cpu, time.perf_counter() - wall, frames, extra)
        best = timing if best is None or timing.cpu_s < best.cpu_s else best
    return best


def decode_all(path: Path, keyframes_only: bool) -> tuple[int, dict[str, Any]]:
    """Decode every frame, or (the keyframe-only bound) every keyframe and nothing else.

    The bound feeds the decoder the keyframe packets only, besides setting
    ``skip_frame = NONKEY``: FFmpeg's VP9 decoder ignores skip_frame and would decode
    every frame (measured here: the same time as a full decode)."""
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        s.codec_context.thread_count = 1
        if keyframes_only:
            s.codec_context.skip_frame = "NONKEY"
        n = 0
        for packet in c.demux(s):
            if packet.size and (packet.is_keyframe or not keyframes_only):
                n += len(s.decode(packet))
        n += len(s.decode(None))
    return n, {}


def settings_for(path: Path, mode: str, threads: int = 1) -> DecodeSettings:
    return DecodeSettings(allowed_prefixes=[str(path.parent)], seek_mode=mode, threads=threads)


def ours(path: Path, mode: str, threads: int = 1) -> tuple[int, dict[str, Any]]:
    video = decode_video(str(path), settings_for(path, mode, threads), resize_to=RESIZE_TO)
    return video.num_frames, {"timestamps": [round(float(t), 3) for t in video.timestamps],
                              "keyframes": video.keyframes, "seeks": video.seeks,
                              "size": list(video.frames.shape[1:3])}


def torchcodec_available() -> str | None:
    """None when torchcodec imports and decodes; otherwise why not."""
    try:
        from torchcodec.decoders import VideoDecoder  # noqa: F401
    except Exception as exc:  # ImportError, or FFmpeg libraries missing (OSError/RuntimeError)
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return None


def torchcodec_sample(path: Path, targets: list[float], size: list[int]) -> tuple[int, dict[str, Any]]:
    from torchcodec.decoders import VideoDecoder
    from torchcodec.transforms import Resize

    decoder = VideoDecoder(str(path), seek_mode="exact", num_ffmpeg_threads=1, dimension_order="NHWC",
                           transforms=[Resize(size=size)])
    batch = decoder.get_frames_played_at(targets)
    return int(batch.data.shape[0]), {"timestamps": [round(float(t), 3) for t in batch.pts_seconds]}


def uniform_targets(duration: float, n: int = 12) -> list[float]:
    # The same targets as decode_video's uniform sampling (the centre of each of n parts).
    return [(k + 0.5) * duration / n for k in range(n)]


def measure_file(path: Path, spec: CameraSpec, tc_ok: bool) -> dict[str, Any]:
    facts = file_facts(path)
    print(f"-- {path.name}: {facts['duration_s']:.0f}s, {facts['keyframes']} keyframes, "
          f"{facts['mbit_s']:.1f} Mbit/s", flush=True)
    row: dict[str, Any] = {"spec": asdict(spec), "name": path.name, **facts}
    row["exact"] = asdict(timed(lambda: ours(path, "exact"), 2))
    row["fast"] = asdict(timed(lambda: ours(path, "keyframe"), 2))
    row["keyframe_only"] = asdict(timed(lambda: decode_all(path, True)))
    row["full"] = asdict(timed(lambda: decode_all(path, False)))
    if tc_ok:
        row["torchcodec"] = asdict(timed(lambda: torchcodec_sample(
            path, uniform_targets(facts["duration_s"]), row["exact"]["extra"]["size"]), 2))
    for key in ("exact", "fast", "keyframe_only", "full", "torchcodec"):
        if key in row:
            print(f"   {key:14s} cpu {row[key]['cpu_s']:7.2f}s  wall {row[key]['wall_s']:7.2f}s", flush=True)
    return row


def measure_threads(path: Path) -> list[dict[str, Any]]:
    out = []
    for threads in (1, 2, 0):
        t = timed(lambda: ours(path, "exact", threads), 2)
        out.append({"threads": threads, **asdict(t)})
        print(f"   threads={threads}: cpu {t.cpu_s:.2f}s wall {t.wall_s:.2f}s", flush=True)
    return out


def per_window(path: Path, mode: str) -> tuple[int, dict[str, Any]]:
    """Each window sampled on its own: one open per window (what one pass replaces)."""
    from vidsearch import video as v

    settings = settings_for(path, mode)
    whole = v.decode_video(str(path), settings.model_copy(update={"seek_mode": "exact", "num_frames": 1}))
    frames = 0
    for w in segment_windows(whole.duration_s, settings.segment_s, settings.segment_overlap_s):
        source = v._Source(v.resolve_uri(str(path), settings), settings)
        try:
            source.open()
            meta = v._read_metadata(source.container, source.stream)
            targets = v._window_targets(settings, settings.num_frames, meta.origin_s, w.start_s, w.length_s)
            tols = v.tolerances(settings.keyframe_tolerance_s, targets[1] - targets[0], len(targets))
            picked, _, _ = v._sample(source, meta, targets, RESIZE_TO, None, tols)
            frames += len(picked)
        finally:
            source.close()
    return frames, {}


def one_pass(path: Path, mode: str) -> tuple[int, dict[str, Any]]:
    seg = decode_segments(str(path), settings_for(path, mode), resize_to=RESIZE_TO)
    return int(seg.frames.shape[0]), {"windows": len(seg.windows), "keyframes": seg.keyframes, "seeks": seg.seeks}


def measure_segments(path: Path, spec: CameraSpec) -> dict[str, Any]:
    facts = file_facts(path)
    print(f"-- segments: {path.name}", flush=True)
    out: dict[str, Any] = {"spec": asdict(spec), "name": path.name, **facts}
    for key, fn in (("one_pass_exact", lambda: one_pass(path, "exact")),
                    ("one_pass_fast", lambda: one_pass(path, "keyframe")),
                    ("per_window_exact", lambda: per_window(path, "exact")),
                    ("per_window_fast", lambda: per_window(path, "keyframe")),
                    ("keyframe_only", lambda: decode_all(path, True)),
                    ("full", lambda: decode_all(path, False))):
        out[key] = asdict(timed(fn))
        print(f"   {key:18s} cpu {out[key]['cpu_s']:7.2f}s  wall {out[key]['wall_s']:7.2f}s", flush=True)
    return out


# ============================================================================ report
def label(spec: dict[str, Any]) -> str:
    return f"{spec['codec']} {spec['height']}p GOP {spec['gop']}"


def fmt(x: float, digits: int = 2) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def report(data: dict[str, Any], out_dir: Path) -> None:
    rows = data["files"]
    tc = all("torchcodec" in r for r in rows)
    lines = ["# Decode benchmark: exact and keyframe sampling on camera-like files", "",
             f"Command: `{data['command']}`", "", "## What is measured", "",
             "Per file, on one core (`decode.threads = 1`): CPU seconds (process clock, every thread) to take "
             f"the 12 uniform frames at {RESIZE_TO} px with `decode_video` in `seek_mode=exact` and "
             "`seek_mode=keyframe` (default tolerance "
             f"{DecodeSettings().keyframe_tolerance_s:g} s, capped below half the 5 s-or-less target spacing), "
             "against decoding every keyframe alone (`skip_frame = NONKEY`, the keyframe-only bound), a full "
             "decode of every frame, and torchcodec "
             f"{data.get('torchcodec_version') or ''} (`seek_mode=\"exact\"`, one FFmpeg thread, "
             "`get_frames_played_at` at the same targets, resized on decode to the same size). "
             "Frames/s per core = sampled frames / CPU seconds. Samplers: best of 2 runs by CPU time. "
             "Files are written once by `vidsearch.video_camera` (panning multi-scale texture plus sensor "
             "noise, CRF 23, x264 veryfast / libvpx-vp9 realtime, fixed GOP, 30 fps); files longer than "
             f"{TILE_S:g} s repeat one encoded tile by stream copy.", "", "## Machine", "",
             *common.machine_section(data["machine"], tuple(data["load_after"])), "", "## Files", ""]
    lines += common.md_table(
        ["file", "duration s", "keyframes", "Mbit/s", "MB"],
        [[r["name"], fmt(r["duration_s"], 0), r["keyframes"], fmt(r["mbit_s"], 1), fmt(r["bytes"] / 1e6, 1)]
         for r in rows + ([data["segments"]] if data.get("segments") else [])])
    lines += ["", "## Results: seconds per video (CPU, one core)", ""]
    header = ["file class", "exact s", "fast s", "keyframe-only s", "full decode s"]
    header += ["torchcodec s"] if tc else []
    header += ["exact frames/s/core", "fast frames/s/core", "fast / keyframe-only", "exact / full",
               "fast / full"]
    header += ["exact / torchcodec"] if tc else []
    header += ["fast: frames from keyframes"]
    table = []
    for r in rows:
        e, f, k, full = (r[x]["cpu_s"] for x in ("exact", "fast", "keyframe_only", "full"))
        line = [label(r["spec"]) + f", {r['duration_s']:.0f} s", fmt(e), fmt(f), fmt(k), fmt(full)]
        line += [fmt(r["torchcodec"]["cpu_s"])] if tc else []
        line += [fmt(r["exact"]["frames"] / e, 1), fmt(r["fast"]["frames"] / f, 1), fmt(f / k), fmt(e / full),
                 fmt(f / full)]
        line += [fmt(e / r["torchcodec"]["cpu_s"])] if tc else []
        line += [f"{r['fast']['extra']['keyframes']} / {r['fast']['frames']}"]
        table.append(line)
    lines += common.md_table(header, table)
    lines += ["", "Wall seconds (shared machine; noisier):", ""]
    lines += common.md_table(["file class", "exact", "fast", "keyframe-only", "full"] + (["torchcodec"] if tc else []),
                             [[label(r["spec"]), *(fmt(r[x]["wall_s"]) for x in
                                                   ("exact", "fast", "keyframe_only", "full") + (("torchcodec",) if tc else ()))]
                              for r in rows])
    lines += ["", "## Targets", ""]
    fast_ok = [r["fast"]["cpu_s"] <= FAST_BOUND_TARGET * r["keyframe_only"]["cpu_s"] for r in rows]
    lines.append(f"- fast sampling within {FAST_BOUND_TARGET}x the keyframe-only bound: "
                 f"{common.verdict(all(fast_ok))} ({sum(fast_ok)} of {len(rows)} classes"
                 + ("; missed: " + ", ".join(label(r["spec"]) for r, ok in zip(rows, fast_ok) if not ok)
                    if not all(fast_ok) else "") + ")")
    if tc:
        exact_ok = [r["exact"]["cpu_s"] <= r["torchcodec"]["cpu_s"] for r in rows]
        lines.append(f"- exact sampling at or below torchcodec's time: {common.verdict(all(exact_ok))} "
                     f"({sum(exact_ok)} of {len(rows)} classes"
                     + ("; missed: " + ", ".join(label(r["spec"]) for r, ok in zip(rows, exact_ok) if not ok)
                        if not all(exact_ok) else "") + ")")
    else:
        lines.append(f"- exact against torchcodec: not measured ({data.get('torchcodec_error')})")
    if data.get("threads"):
        t = data["threads"]
        lines += ["", f"## Decode threads (exact sampling, {data['threads_file']})", ""]
        base = t[0]["cpu_s"]
        lines += common.md_table(["decode.threads", "CPU s", "wall s", "frames/s per core", "CPU vs threads=1"],
                                 [[x["threads"] if x["threads"] else "0 (FFmpeg picks)", fmt(x["cpu_s"]),
                                   fmt(x["wall_s"]), fmt(x["frames"] / x["cpu_s"], 1), fmt(x["cpu_s"] / base)]
                                  for x in t])
    seg = data.get("segments")
    if seg:
        lines += ["", f"## Segments: {seg['name']} with default segment settings", ""]
        settings = DecodeSettings()
        lines.append(f"`decode_segments` (segment_s={settings.segment_s:g}, overlap {settings.segment_overlap_s:g} s, "
                     f"{settings.num_frames} frames per window) in one pass, against opening the file and sampling "
                     "each window on its own. CPU seconds, one core.")
        lines.append("")
        windows = seg["one_pass_exact"]["extra"]["windows"]
        lines += common.md_table(
            ["sampling", "one pass s", "per window s", "per window / one pass", "/ keyframe-only", "/ full decode",
             "distinct frames"],
            [[mode, fmt(seg[f"one_pass_{mode}"]["cpu_s"]), fmt(seg[f"per_window_{mode}"]["cpu_s"]),
              fmt(seg[f"per_window_{mode}"]["cpu_s"] / seg[f"one_pass_{mode}"]["cpu_s"]),
              fmt(seg[f"one_pass_{mode}"]["cpu_s"] / seg["keyframe_only"]["cpu_s"]),
              fmt(seg[f"one_pass_{mode}"]["cpu_s"] / seg["full"]["cpu_s"]), seg[f"one_pass_{mode}"]["frames"]]
             for mode in ("exact", "fast")])
        lines += ["", f"{windows} windows; keyframe-only bound {fmt(seg['keyframe_only']['cpu_s'])} s, full decode "
                  f"{fmt(seg['full']['cpu_s'])} s."]
    lines += ["", "## Reading it", ""]
    full_keys = [r for r in rows if r["fast"]["extra"]["keyframes"] == r["fast"]["frames"]]
    if full_keys:
        gains = sorted(r["exact"]["cpu_s"] / r["fast"]["cpu_s"] for r in full_keys)
        lines.append(f"- Where every target had a keyframe within its tolerance ({len(full_keys)} classes: GOPs of "
                     f"{', '.join(sorted({str(r['spec']['gop']) for r in full_keys}))} frames), keyframe sampling took "
                     f"{gains[0]:.1f}-{gains[-1]:.1f}x less CPU than exact sampling, and at most "
                     f"{max(r['fast']['cpu_s'] / r['keyframe_only']['cpu_s'] for r in full_keys):.2f}x the "
                     "keyframe-only bound: it decodes one keyframe per target, the bound every keyframe of the file. "
                     "That is why `decode.seek_mode` defaults to `keyframe`; the frame times reported are the "
                     "keyframes' own pts, so moments stay exact.")
    partial = [r for r in rows if r["fast"]["extra"]["keyframes"] < r["fast"]["frames"]]
    if partial:
        lines.append("- Where keyframes are sparser than the targets (GOP 250, or a short file whose 12 targets lie "
                     "closer together than its keyframes), the targets without a keyframe under half the target "
                     "spacing are decoded exactly, so fast sampling costs about what exact sampling does "
                     "(" + ", ".join(f"{label(r['spec'])}: {r['fast']['cpu_s'] / r['exact']['cpu_s']:.2f}x exact" for r in partial) + ") "
                     "and misses the 1.5x bound. Nothing cheaper gives a frame near those targets: the bound there "
                     "decodes fewer frames than there are targets.")
    if tc:
        lines.append("- Exact sampling and torchcodec do the same work (seek to the keyframe before each target, "
                     "decode forward to it) and take the same time within a few percent "
                     f"(exact / torchcodec {min(r['exact']['cpu_s'] / r['torchcodec']['cpu_s'] for r in rows):.2f}-"
                     f"{max(r['exact']['cpu_s'] / r['torchcodec']['cpu_s'] for r in rows):.2f}); the classes "
                     "above 1.00 are within run-to-run noise, not a clear win.")
    if data.get("threads"):
        best = min(data["threads"], key=lambda x: x["cpu_s"])
        lines.append(f"- decode.threads = {best['threads'] or '0 (auto)'} gives the most frames per core; frame threads "
                     "cost CPU in synchronisation. Run one single-threaded decode task per core "
                     "(`ingest.decode_parallelism` = the node's decode cores, `decode.threads` = 1) rather than "
                     "fewer tasks with more threads; threads only help one long video's latency on an idle node.")
    if seg:
        lines.append(f"- Opening and sampling each of the long file's {seg['one_pass_exact']['extra']['windows']} "
                     f"windows on its own took {seg['per_window_exact']['cpu_s'] / seg['one_pass_exact']['cpu_s']:.2f}x "
                     f"(exact) and {seg['per_window_fast']['cpu_s'] / seg['one_pass_fast']['cpu_s']:.2f}x (fast) the "
                     "CPU of one pass over all of them; fast one-pass sampling of the long video "
                     f"costs {seg['one_pass_fast']['cpu_s'] / seg['full']['cpu_s']:.2f} of a full decode.")
    lines += ["", f"![decode benchmark](decode.png)", ""]
    common.write_text(out_dir / "decode.md", lines)
    plot(out_dir / "decode.png", data)


def plot(path: Path, data: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = data["files"]
    keys = [k for k in ("full", "exact", "torchcodec", "fast", "keyframe_only") if all(k in r for r in rows)]
    names = {"full": "full decode", "exact": "exact", "torchcodec": "torchcodec (exact)", "fast": "fast (keyframe)",
             "keyframe_only": "keyframe-only bound"}
    fig, ax = plt.subplots(figsize=(12, 5.5))
    x = np.arange(len(rows))
    width = 0.8 / len(keys)
    for i, k in enumerate(keys):
        ax.bar(x + i * width, [r[k]["cpu_s"] for r in rows], width, label=names[k])
    ax.set_xticks(x + 0.4 - width / 2, [f"{label(r['spec'])}\n{r['duration_s']:.0f} s" for r in rows], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("CPU seconds per video (one core, log)")
    ax.set_title("12 frames per video at 224 px: exact vs keyframe sampling")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ============================================================================ main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer, shorter files (results under .bench/results)")
    size.add_argument("--tiny", action="store_true", help="smoke test: two tiny files and a 40 s segment file")
    parser.add_argument("--out-dir", type=Path, help="where decode.md/.png/.json go")
    parser.add_argument("--cache-dir", type=Path, default=common.CACHE_DIR / "decode-videos")
    parser.add_argument("--no-torchcodec", action="store_true", help="skip the torchcodec anchor")
    parser.add_argument("--segments-json", type=Path,
                        help="also write the long file's path and decode settings here (a hook for an "
                             "end-to-end ingest run with segments)")
    parser.add_argument("--report-only", action="store_true", help="redraw decode.md/.png from decode.json")
    args = parser.parse_args()
    if args.report_only:
        out_dir = args.out_dir or common.DOCS_DIR
        report(json.loads((out_dir / "decode.json").read_text()), out_dir)
        return 0
    specs, long_spec = (TINY, TINY_LONG) if args.tiny else (QUICK, QUICK_LONG) if args.quick else (FULL, FULL_LONG)
    out_dir = args.out_dir or (common.CACHE_DIR / "results" if args.quick or args.tiny else common.DOCS_DIR)
    facts = common.machine_facts()
    started = time.perf_counter()
    paths = [ensure_file(s, args.cache_dir) for s in specs]
    long_path = ensure_file(long_spec, args.cache_dir)
    print(f"files ready in {time.perf_counter() - started:.0f}s", flush=True)
    tc_error = "skipped (--no-torchcodec)" if args.no_torchcodec else torchcodec_available()
    tc_version = None
    if tc_error is None:
        from importlib.metadata import version

        tc_version = version("torchcodec")
    else:
        print(f"torchcodec anchor off: {tc_error}", file=sys.stderr)
    data: dict[str, Any] = {"command": common.command_line(), "machine": facts, "torchcodec_error": tc_error,
                            "torchcodec_version": tc_version,
                            "files": [measure_file(p, s, tc_error is None) for p, s in zip(paths, specs)]}
    threads_spec = next((s for s in specs if s.height == 1080 and s.gop == 60), specs[-1])
    data["threads_file"] = threads_spec.name
    print(f"-- threads: {threads_spec.name}", flush=True)
    data["threads"] = measure_threads(args.cache_dir / threads_spec.name)
    data["segments"] = measure_segments(long_path, long_spec)
    load = os.getloadavg()
    data["load_after"] = [load[0], load[1]]
    data["seconds"] = time.perf_counter() - started
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "decode.json").write_text(json.dumps(data, indent=1))
    if args.segments_json:
        args.segments_json.write_text(json.dumps({"uri": str(long_path), "allowed_prefixes": [str(long_path.parent)],
                                                  "seek_mode": DecodeSettings().seek_mode}))
    report(data, out_dir)
    print(f"wrote {out_dir / 'decode.md'} in {data['seconds']:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
