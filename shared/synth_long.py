"""Long synthetic videos: many events strung over minutes, with known event times.

The short benchmark (:mod:`vidsearch.synth`) answers "which video?"; a long video
also asks "when?". Each long video is a run of single-object events (the same scene
model and renderer as the short videos: one shape doing one action), separated by
short empty gaps, over one background. Every event has its own caption, the
canonical clause of the short captions ("a big red circle moves left"), and the
manifest records its ``start_s``/``end_s``: a caption names exactly one event of
one video, so a search for it has one right video and one right time span.

Captions are unique across the whole dataset (not only within a video), so that
"the right video" is well defined. Within a video, events also differ in
(colour, action) as long as there are such pairs left (6 x 9 = 54): the shipped model
tells colours apart far better than shapes or sizes (see docs/benchmarks/quality.md,
twins by relation), so this keeps a caption's event recognisable inside its video
rather than only unique in its wording.

The output has the short set's layout (``manifest.jsonl`` of :class:`SynthRecord`,
``synth.json``, ``videos/``), with ``variant`` "long", split "test", no twins, and
each event dict carrying its ``caption``; :func:`vidsearch.synth.load_manifest` reads
it and ``SynthRecord.spec()`` re-renders the exact frames.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable

import av
import numpy as np

from vidsearch.synth import (FORMAT_VERSION, VIDEOS_DIR, SynthError, SynthRecord, _prepare_out_dir,
                             _write_dataset, validate_domain)
from vidsearch.synth_scenes import (ACTIONS, COLOURS, MIN_EVENT_FRAMES, SHAPES, Event, VideoSpec, _sample_event,
                                    caption_key, clause)
from vidsearch.telemetry import log_event

logger = logging.getLogger(__name__)

# 2-10 minutes is the brief; up to an hour so a test can reach decode.max_duration_s.
MIN_SECONDS, MAX_SECONDS = 60.0, 3600.0
# Draws per event before giving up on a caption no other event uses.
_ATTEMPTS = 400


def validate_long_args(n: int, size: int, fps: float, seconds: float, min_event_s: float, max_event_s: float,
                       max_gap_s: float, workers: int) -> tuple[int, int, int, int]:
    """Raise SynthError for a bad argument; return (frames per video, shortest and
    longest event, longest gap) in frames."""
    if n < 1:
        raise SynthError(f"--n must be at least 1 (got {n})")
    if size < 16 or size % 2 or size > 1024:
        raise SynthError(f"--size must be an even number of pixels from 16 to 1024 (got {size})")
    if not 0 < fps <= 60:
        raise SynthError(f"--fps must be above 0 and at most 60 (got {fps:g})")
    if not MIN_SECONDS <= seconds <= MAX_SECONDS:
        raise SynthError(f"--seconds must be from {MIN_SECONDS:g} to {MAX_SECONDS:g} with --long (got {seconds:g})")
    if not 0 < min_event_s <= max_event_s:
        raise SynthError(f"--min-event-s must be above 0 and at most --max-event-s (got {min_event_s:g}, {max_event_s:g})")
    if max_event_s > seconds / 4:
        raise SynthError(f"--max-event-s must be at most a quarter of --seconds, so a video holds several events "
                         f"(got {max_event_s:g} for {seconds:g} s)")
    if max_gap_s < 0:
        raise SynthError(f"--max-gap-s must be at least 0 (got {max_gap_s:g})")
    if workers < 1:
        raise SynthError(f"--workers must be at least 1 (got {workers})")
    shortest = int(round(min_event_s * fps))
    if shortest < MIN_EVENT_FRAMES:
        raise SynthError(f"--min-event-s x --fps must give at least {MIN_EVENT_FRAMES} frames per event "
                         f"(got {min_event_s:g} s x {fps:g} fps)")
    return int(round(seconds * fps)), shortest, int(round(max_event_s * fps)), int(round(max_gap_s * fps))


def _video_id(seed: int, index: int) -> str:
    # "synth-s" prefix: --overwrite removes exactly the files a generator run wrote.
    return f"synth-s{seed}-long{index:03d}"


Sampler = Callable[[np.random.Generator, str, str, int, int], Event]


def _event_with(rng: np.random.Generator, colour: str, action: str, start: int, stop: int,
                taken: set[tuple], sampler: Sampler = _sample_event) -> Event | None:
    """An event of this colour and action whose caption no event in ``taken`` has."""
    for _ in range(_ATTEMPTS):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        event = sampler(rng, shape, colour, start, stop)
        # _sample_event draws the action itself; drawing until it matches reuses its
        # placement rules for every action without restating them here.
        if event.action == action and caption_key([event]) not in taken:
            return event
    return None


def plan_long_video(rng: np.random.Generator, num_frames: int, event_frames: tuple[int, int], max_gap: int,
                    taken: set[tuple], sampler: Sampler = _sample_event) -> tuple[Event, ...]:
    """Events back to back over ``num_frames``, each ``event_frames`` long (inclusive
    range) after a gap of 0..``max_gap`` frames; the tail after the last event that fits
    stays empty. Adds the events' caption keys to ``taken``. ``sampler`` draws one
    event (the classic one, or :func:`vidsearch.synth_domain.sample_event`)."""
    pairs = [(c, a) for c in COLOURS for a in ACTIONS]
    order: list[tuple[str, str]] = []
    events: list[Event] = []
    position = 0
    while True:
        gap = int(rng.integers(0, max_gap + 1))
        length = int(rng.integers(event_frames[0], event_frames[1] + 1))
        if position + gap + length > num_frames:
            break
        event = None
        # A pair whose captions other events already use all up is skipped; give up
        # only when a whole round of pairs has none left.
        for _ in range(len(pairs)):
            if not order:  # a fresh shuffled round of (colour, action) pairs
                order = [pairs[i] for i in rng.permutation(len(pairs))]
            colour, action = order.pop()
            event = _event_with(rng, colour, action, position + gap, position + gap + length, taken, sampler)
            if event is not None:
                break
        if event is None:
            raise SynthError(f"ran out of distinct captions after {len(taken)} events: ask for fewer or "
                             "shorter videos (--n, --seconds) or longer events (--min-event-s)")
        taken.add(caption_key([event]))
        events.append(event)
        position += gap + length
    return tuple(events)


def _record(spec: VideoSpec, video_id: str, fps: float, size: int) -> SynthRecord:
    events = [{**e.to_dict(fps), "caption": caption} for e, caption in zip(spec.events, spec.captions)]
    metadata = {
        "title": f"{len(spec.events)} events over {spec.num_frames / fps:g} s",
        "tags": sorted({e.colour for e in spec.events} | {e.shape for e in spec.events}),
        "shapes": sorted({e.shape for e in spec.events}), "colours": sorted({e.colour for e in spec.events}),
        "actions": sorted({e.action for e in spec.events}), "category": "long",
        "duration": round(spec.num_frames / fps, 4), "fps": fps, "num_frames": spec.num_frames,
        "width": spec.look["width"] if spec.look else size, "height": spec.look["height"] if spec.look else size,
        "background": spec.background, "long": True,
    }
    if spec.look:  # only then: classic long manifests stay byte-identical
        metadata.update(domain="randomized", look=spec.look)
    return SynthRecord(video_id=video_id, path=Path(VIDEOS_DIR) / f"{video_id}.mp4", captions=list(spec.captions),
                       split="test", metadata=metadata, events=events, family=spec.family, variant="long")


def generate_long_dataset(out_dir: str | os.PathLike, n: int, seed: int = 0, *, size: int = 64, fps: float = 8.0,
                          seconds: float = 180.0, min_event_s: float = 5.0, max_event_s: float = 12.0,
                          max_gap_s: float = 2.0, workers: int = 1, overwrite: bool = False,
                          progress: bool | None = None, domain: str = "classic") -> Path:
    """Write n long videos and their manifest into out_dir; return the manifest path.

    Defaults match what the shipped model was trained on (64 px, 8 fps); its frame tower
    sees single frames, so an event needs only to last longer than the spacing of the
    frames sampled per segment (about 30 s / 8 frames) to be seen at all.
    ``domain="randomized"``: each video gets a randomised look (frame size, background,
    noise, crf; fps and length stay as asked, so event times are as planned) and its
    events randomised styles; an object lingers at most its own event's length.
    Raises :class:`SynthError` for bad arguments or an unusable out_dir.
    """
    validate_domain(domain)
    num_frames, shortest, longest, max_gap = validate_long_args(n, size, fps, seconds, min_event_s, max_event_s,
                                                                max_gap_s, workers)
    out = Path(out_dir)
    _prepare_out_dir(out, overwrite)
    if domain == "classic":
        rng = np.random.default_rng([seed, 2])  # its own stream: never the short set's videos
    else:
        rng = np.random.default_rng([seed, 13])
    taken: set[tuple] = set()
    specs = []
    for index in range(n):
        if domain == "classic":
            events = plan_long_video(rng, num_frames, (shortest, longest), max_gap, taken)
            background, look = int(rng.integers(16, 72)), None
        else:
            from vidsearch.synth_domain import background_level, sample_event, sample_frame_size, sample_look

            events = plan_long_video(rng, num_frames, (shortest, longest), max_gap, taken, sample_event)
            look = sample_look(rng, {**sample_frame_size(rng, size), "fps": fps, "num_frames": num_frames},
                               [e.style["rgb"] for e in events])
            background = background_level(look)
        specs.append(VideoSpec(events, num_frames, background, family=index, variant="long",
                               captions=tuple(clause(e, 0) for e in events), look=look))
    records = [_record(spec, _video_id(seed, i), fps, size) for i, spec in enumerate(specs)]
    info: dict[str, Any] = {"format_version": FORMAT_VERSION, "mode": "long", "n": n, "seed": seed, "size": size,
                            "fps": fps, "seconds": seconds, "num_frames": num_frames, "min_event_s": min_event_s,
                            "max_event_s": max_event_s, "max_gap_s": max_gap_s,
                            "events": sum(len(s.events) for s in specs), "splits": {"test": n}}
    if domain != "classic":
        info["domain"] = domain
    show = sys.stderr.isatty() if progress is None else progress
    try:
        manifest = _write_dataset(out, specs, records, info, workers, show)
    except (OSError, av.FFmpegError) as exc:
        raise SynthError(f"cannot write the dataset into {out}: {exc}") from None
    log_event(logger, "long synthetic dataset written", manifest=str(manifest), videos=n, events=info["events"])
    return manifest


__all__ = ["MAX_SECONDS", "MIN_SECONDS", "generate_long_dataset", "plan_long_video", "validate_long_args"]
