"""The synthetic text-to-video benchmark: render scene specs and write mp4s + a manifest.

Layout of a dataset directory::

    DIR/manifest.jsonl   one JSON object per video (see SynthRecord)
    DIR/synth.json       the generation parameters
    DIR/videos/<video_id>.mp4

Manifest paths are stored *relative to DIR* (POSIX separators) so that a dataset
can be moved or mounted elsewhere; :func:`load_manifest` resolves them against the
manifest's own directory and returns absolute paths. Same arguments -> identical
manifest and identical frames (the specs come from one seeded generator in the
parent process; rendering and encoding are pure functions of the spec).

Two domains (``domain=``): "classic", the renderer the shipped model was trained on
(its output for a seed is byte-identical to what it always was: no domain key is
written for it), and "randomized" (:mod:`vidsearch.synth_domain`): the same
vocabulary with backgrounds, shades, sizes, anti-aliasing, noise, compression, frame
sizes, fps, lengths, motion and caption grammar randomised, plus direction twins. Its
manifest records carry ``metadata["domain"] = "randomized"`` and the per-family
``metadata["look"]``, its events a ``style``, and synth.json ``"domain"``.
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Iterator

import av
import numpy as np
from tqdm import tqdm

from vidsearch.synth_scenes import COLOURS, SHAPES, SIZES, HIDDEN_FRACTION, Event, VideoSpec, plan_dataset

DOMAINS: tuple[str, ...] = ("classic", "randomized")  # also in synth_domain and synth_cli (tests check)
from vidsearch.telemetry import log_event
from vidsearch.video_writer import write_video

logger = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test")
MANIFEST_NAME = "manifest.jsonl"
INFO_NAME = "synth.json"
VIDEOS_DIR = "videos"
FORMAT_VERSION = 1


class SynthError(ValueError):
    """Bad generation arguments or an unusable output directory; one-line message."""


@dataclass
class SynthRecord:
    """One manifest line. ``path`` is absolute once loaded with :func:`load_manifest`."""

    video_id: str
    path: Path
    captions: list[str]
    split: str
    metadata: dict[str, Any]
    events: list[dict[str, Any]]
    family: int
    variant: str
    hard_negatives: list[dict[str, str]] = field(default_factory=list)

    @property
    def uri(self) -> str:
        return Path(self.path).resolve().as_uri()

    def to_json(self) -> dict[str, Any]:
        return {"video_id": self.video_id, "path": Path(self.path).as_posix(), "captions": self.captions,
                "split": self.split, "metadata": self.metadata, "events": self.events,
                "family": self.family, "variant": self.variant, "hard_negatives": self.hard_negatives}

    def spec(self) -> VideoSpec:
        """The scene spec back from the manifest, to re-render the exact frames."""
        return VideoSpec(events=tuple(Event.from_dict(e) for e in self.events),
                         num_frames=int(self.metadata["num_frames"]), background=int(self.metadata["background"]),
                         family=self.family, variant=self.variant, captions=tuple(self.captions),
                         look=self.metadata.get("look"))


# ---------------------------------------------------------------- rendering

def _object_mask(shape: str, dx: np.ndarray, dy: np.ndarray, radius: np.ndarray) -> np.ndarray:
    """Boolean mask from offsets to the centre (broadcast over frames)."""
    if shape == "circle":
        return dx * dx + dy * dy <= radius * radius
    if shape == "square":
        # 0.85 r keeps the square's area close to the circle's of the same size.
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.85 * radius
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.2 * radius
    if shape == "triangle":
        # Apex at -r (up), base at +0.75 r; half-width grows linearly to r at the base.
        top, bottom = -radius, 0.75 * radius
        return (dy >= top) & (dy <= bottom) & (np.abs(dx) <= (dy - top) / (bottom - top) * radius)
    raise ValueError(f"unknown shape {shape!r}")


def event_track(event: Event, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-frame centre x, centre y, radius (pixels) and visibility of one event's object."""
    length = event.num_frames
    progress = np.linspace(0.0, 1.0, length) if length > 1 else np.zeros(1)
    (x0, y0), (x1, y1) = event.start_xy, event.end_xy
    cx = (x0 + (x1 - x0) * progress) * size
    cy = (y0 + (y1 - y0) * progress) * size
    small, big = SIZES["small"] * size, SIZES["big"] * size
    if event.action == "grow":
        radius = small + (big - small) * progress
    elif event.action == "shrink":
        radius = big + (small - big) * progress
    else:
        radius = np.full(length, SIZES[event.size] * size)
    visible = np.ones(length, dtype=bool)
    hidden = int(np.ceil(HIDDEN_FRACTION * length))
    # appear hides the first frames, disappear the last ones: one is the other played backwards.
    if event.action == "appear":
        visible[:hidden] = False
    elif event.action == "disappear":
        visible[length - hidden:] = False
    return cx, cy, radius, visible


def render_video(spec: VideoSpec, size: int) -> np.ndarray:
    """uint8[T, size, size, 3] RGB frames of a spec: plain background, one object per event.
    A randomised-domain spec (one with a look) has its own frame size and renderer."""
    if spec.look is not None:
        from vidsearch.synth_domain_render import render_frames

        return render_frames(spec)
    frames = np.full((spec.num_frames, size, size, 3), spec.background, dtype=np.uint8)
    # Pixel centres, so that a centre at x means the object is symmetric around x.
    grid = np.arange(size, dtype=np.float32) + 0.5
    for event in spec.events:
        cx, cy, radius, visible = event_track(event, size)
        dx = grid[None, None, :] - cx[:, None, None].astype(np.float32)
        dy = grid[None, :, None] - cy[:, None, None].astype(np.float32)
        mask = _object_mask(event.shape, dx, dy, radius[:, None, None].astype(np.float32))
        mask &= visible[:, None, None]
        segment = frames[event.start_frame:event.end_frame]
        segment[mask] = COLOURS[event.colour]
    return frames


def iter_frames(spec: VideoSpec, size: int, chunk_frames: int = 512) -> Iterator[np.ndarray]:
    """The frames of :func:`render_video`, rendered about ``chunk_frames`` at a time so a
    long video never holds all its pixels at once. Chunks are cut only where no event
    spans the cut (an event's track is a function of its whole length), so the frames
    are identical to ``render_video``'s; a short video is one chunk."""
    if spec.look is not None:
        from vidsearch.synth_domain_render import iter_frames as iter_random

        yield from iter_random(spec, chunk_frames)
        return
    events = sorted(spec.events, key=lambda e: e.start_frame)
    start = 0
    while start < spec.num_frames:
        stop = start + chunk_frames
        for event in events:  # sorted, so a chain of overlapping events extends the cut in one pass
            if event.start_frame < stop < event.end_frame:
                stop = event.end_frame
        stop = min(stop, spec.num_frames)
        inside = tuple(replace(e, start_frame=e.start_frame - start, end_frame=e.end_frame - start)
                       for e in events if e.start_frame < stop and e.end_frame > start)
        yield from render_video(VideoSpec(inside, stop - start, spec.background), size)
        start = stop


# ---------------------------------------------------------------- dataset

def validate_domain(domain: str) -> str:
    """Raise SynthError unless ``domain`` is one of DOMAINS."""
    if domain not in DOMAINS:
        raise SynthError(f"--domain must be one of {', '.join(DOMAINS)} (got {domain!r})")
    return domain


def validate_args(n: int, size: int, fps: float, seconds: float, val_frac: float, test_frac: float,
                  reverse_rate: float, swap_rate: float, workers: int, direction_rate: float = 0.0) -> int:
    """Raise SynthError for a bad argument; return the number of frames per video."""
    if n < 1:
        raise SynthError(f"--n must be at least 1 (got {n})")
    if size < 16 or size % 2 or size > 1024:
        raise SynthError(f"--size must be an even number of pixels from 16 to 1024 (got {size})")
    if not fps > 0 or not seconds > 0:
        raise SynthError(f"--fps and --seconds must be positive (got {fps}, {seconds})")
    for name, value in (("--val-frac", val_frac), ("--test-frac", test_frac)):
        if not 0.0 <= value < 1.0:
            raise SynthError(f"{name} must be in [0, 1) (got {value})")
    for name, value in (("--reverse-rate", reverse_rate), ("--swap-rate", swap_rate),
                        ("--direction-rate", direction_rate)):
        if not 0.0 <= value <= 1.0:
            raise SynthError(f"{name} must be in [0, 1] (got {value})")
    if val_frac + test_frac >= 1.0:
        raise SynthError(f"--val-frac + --test-frac must be below 1 (got {val_frac + test_frac:g})")
    if workers < 1:
        raise SynthError(f"--workers must be at least 1 (got {workers})")
    num_frames = int(round(fps * seconds))
    if num_frames < 9 or num_frames > 10_000:
        raise SynthError(f"--fps x --seconds must give 9 to 10000 frames (got {num_frames})")
    return num_frames


def assign_splits(specs: list[VideoSpec], seed: int, val_frac: float, test_frac: float) -> list[str]:
    """Split by family, so a video and its hard negatives always land in the same split.

    Families are shuffled with the seed and fill test, then val, up to round(frac * n)
    videos each (a family may overshoot by its size); the rest is train.
    """
    families: dict[int, list[int]] = {}
    for index, spec in enumerate(specs):
        families.setdefault(spec.family, []).append(index)
    order = np.random.default_rng([seed, 1]).permutation(sorted(families))
    targets = [("test", round(test_frac * len(specs))), ("val", round(val_frac * len(specs)))]
    splits = ["train"] * len(specs)
    for family in order:
        members = families[int(family)]
        for split, target in targets:
            taken = sum(1 for s in splits if s == split)
            if taken < target:
                for index in members:
                    splits[index] = split
                break
    return splits


def _video_id(seed: int, index: int) -> str:
    return f"synth-s{seed}-{index:05d}"


_RELATION_ORDER = ("reversed", "swap", "direction")


def _relation(a: str, b: str) -> str:
    """How two members of a family differ: "reversed", "swap:<attribute>", "direction"
    (one event played backwards: randomised domain), or two of them ("reversed+swap:size")."""
    if "base" in (a, b):
        return b if a == "base" else a
    return "+".join(sorted((a, b), key=lambda v: _RELATION_ORDER.index(v.split(":")[0])))


def _records(specs: list[VideoSpec], seed: int, splits: list[str], fps: float, size: int,
             partial: list[list[int]] | None = None) -> list[SynthRecord]:
    ids = [_video_id(seed, i) for i in range(len(specs))]
    by_family: dict[int, list[int]] = {}
    for index, spec in enumerate(specs):
        by_family.setdefault(spec.family, []).append(index)
    records = []
    for index, spec in enumerate(specs):
        negatives = [{"video_id": ids[j], "relation": _relation(spec.variant, specs[j].variant)}
                     for j in by_family[spec.family] if j != index]
        shapes = sorted({e.shape for e in spec.events})
        colours = sorted({e.colour for e in spec.events})
        actions = sorted({e.action for e in spec.events})
        look = spec.look
        rate = look["fps"] if look else fps  # the randomised domain varies fps and size per family
        metadata = {
            "title": " and ".join(f"{e.colour} {e.shape}" for e in spec.events),
            "tags": sorted(set(shapes) | set(colours) | set(actions) | {e.size for e in spec.events}),
            "shapes": shapes, "colours": colours, "actions": actions,
            "category": f"{len(spec.events)}-events",
            "duration": round(spec.num_frames / rate, 4), "fps": rate, "num_frames": spec.num_frames,
            "width": look["width"] if look else size, "height": look["height"] if look else size,
            "background": spec.background,
        }
        if look:  # only then, so that classic manifests stay byte-identical
            metadata.update(domain="randomized", look=look, partial_captions=partial[index] if partial else [])
        records.append(SynthRecord(
            video_id=ids[index], path=Path(VIDEOS_DIR) / f"{ids[index]}.mp4", captions=list(spec.captions),
            split=splits[index], metadata=metadata, events=[e.to_dict(rate) for e in spec.events],
            family=spec.family, variant=spec.variant, hard_negatives=negatives))
    return records


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise SynthError(f"output {out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise SynthError(f"output directory {out_dir} is not empty (pass --overwrite to replace a dataset)")
        # Remove only what an earlier run wrote, never anything else the user keeps there.
        videos = out_dir / VIDEOS_DIR
        old_files = [out_dir / MANIFEST_NAME, out_dir / INFO_NAME]
        old_files += sorted(videos.glob("synth-s*.mp4")) if videos.is_dir() else []
        try:
            for old in old_files:
                old.unlink(missing_ok=True)
        except OSError as exc:
            raise SynthError(f"cannot remove the old dataset file {old}: {exc.strerror or exc}") from None
    try:
        (out_dir / VIDEOS_DIR).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SynthError(f"cannot create {out_dir / VIDEOS_DIR}: {exc.strerror or exc}") from None
    if not os.access(out_dir / VIDEOS_DIR, os.W_OK):
        raise SynthError(f"output directory {out_dir} is not writable")


def _write_one(job: tuple[VideoSpec, int, float, str]) -> str:
    spec, size, fps, path = job
    if spec.look is not None:  # randomised domain: the family's own fps and compression
        write_video(path, iter_frames(spec, size), fps=spec.look["fps"], crf=int(spec.look["crf"]))
    else:
        write_video(path, iter_frames(spec, size), fps=fps)
    return path


def _write_all(jobs: list[tuple[VideoSpec, int, float, str]], workers: int) -> Iterator[str]:
    if workers == 1:
        yield from map(_write_one, jobs)
        return
    # spawn: no inherited locks or threads from the caller (pytest, Ray drivers...).
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(_write_one, jobs, chunksize=8)


def _write_dataset(out: Path, specs: list[VideoSpec], records: list[SynthRecord], info: dict[str, Any],
                   workers: int, show_progress: bool) -> Path:
    jobs = [(spec, info["size"], info["fps"], str(out / r.path)) for spec, r in zip(specs, records)]
    with tqdm(total=len(jobs), desc="synth", unit="video", file=sys.stderr, disable=not show_progress) as bar:
        for _ in _write_all(jobs, workers):
            bar.update(1)
    (out / INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
    # Manifest last and atomically: its presence means every video is written.
    manifest = out / MANIFEST_NAME
    partial = out / (MANIFEST_NAME + ".partial")
    with partial.open("w") as handle:
        for record in records:
            handle.write(json.dumps(record.to_json()) + "\n")
    partial.replace(manifest)
    return manifest


def generate_dataset(out_dir: str | os.PathLike, n: int, seed: int = 0, *, size: int = 64, fps: float = 8.0,
                     seconds: float = 3.0, val_frac: float = 0.1, test_frac: float = 0.1,
                     reverse_rate: float = 0.4, swap_rate: float = 0.4, workers: int = 1,
                     overwrite: bool = False, progress: bool | None = None, domain: str = "classic",
                     direction_rate: float | None = None) -> Path:
    """Write n synthetic videos and the manifest into out_dir; return the manifest path.

    ``reverse_rate``/``swap_rate``: fraction of base videos that get a reversed-order
    twin / a one-attribute twin. ``domain="randomized"``: the randomised domain, where
    ``size``/``fps``/``seconds`` are the centres that frame size, fps and length vary
    around, and ``direction_rate`` (default 0.3) the fraction of base videos with a
    direction twin. ``progress=None`` shows a bar only on a TTY.
    Raises :class:`SynthError` for bad arguments or an unusable out_dir.
    """
    validate_domain(domain)
    if domain == "classic" and direction_rate:
        raise SynthError("--direction-rate applies only with --domain randomized")
    direction = 0.3 if direction_rate is None else direction_rate
    num_frames = validate_args(n, size, fps, seconds, val_frac, test_frac, reverse_rate, swap_rate, workers,
                               direction)
    if domain == "randomized" and size > 512:
        raise SynthError(f"--size must be at most 512 with --domain randomized, frames reach 1.5x it (got {size})")
    out = Path(out_dir)
    _prepare_out_dir(out, overwrite)
    partial = None
    if domain == "classic":
        specs = plan_dataset(n, seed, num_frames, reverse_rate=reverse_rate, swap_rate=swap_rate)
        splits = assign_splits(specs, seed, val_frac, test_frac)
    else:
        from vidsearch.synth_domain import add_partial_captions, plan_randomized

        specs = plan_randomized(n, seed, size, fps, seconds, reverse_rate=reverse_rate, swap_rate=swap_rate,
                                direction_rate=direction)
        splits = assign_splits(specs, seed, val_frac, test_frac)
        specs, partial = add_partial_captions(specs, splits, seed)
    records = _records(specs, seed, splits, fps, size, partial)
    info = {"format_version": FORMAT_VERSION, "n": n, "seed": seed, "size": size, "fps": fps, "seconds": seconds,
            "num_frames": num_frames, "val_frac": val_frac, "test_frac": test_frac,
            "reverse_rate": reverse_rate, "swap_rate": swap_rate,
            "splits": {s: sum(r.split == s for r in records) for s in SPLITS}}
    if domain != "classic":  # classic's synth.json stays what it was (no domain key = classic)
        info.update(domain=domain, direction_rate=direction, partial_captions=sum(map(len, partial or [])))
    show = sys.stderr.isatty() if progress is None else progress
    try:
        manifest = _write_dataset(out, specs, records, info, workers, show)
    except (OSError, av.FFmpegError) as exc:
        # Disk full, path too long, directory removed under us: one line, not a traceback.
        raise SynthError(f"cannot write the dataset into {out}: {exc}") from None
    log_event(logger, "synthetic dataset written", manifest=str(manifest), videos=n, **info["splits"])
    return manifest


# ---------------------------------------------------------------- reading

def load_manifest(path: str | os.PathLike) -> list[SynthRecord]:
    """Read a manifest (or its directory); record paths come back absolute."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    root = path.resolve().parent
    records = []
    with path.open() as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
                record = SynthRecord(**{**data, "path": Path(data["path"])})
            except (ValueError, TypeError, KeyError) as exc:
                raise SynthError(f"{path}:{number}: not a synth manifest record ({exc})") from None
            if not record.path.is_absolute():
                record.path = root / record.path
            records.append(record)
    return records


def split_records(records: Iterable[SynthRecord], split: str) -> list[SynthRecord]:
    """The records of one split, in manifest order."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return [r for r in records if r.split == split]


__all__ = ["SPLITS", "SHAPES", "COLOURS", "SynthError", "SynthRecord", "assign_splits", "event_track",
           "generate_dataset", "iter_frames", "load_manifest", "render_video", "split_records", "validate_args"]
