"""Write the set: mp4s (H.264, yuv420p) and a manifest the project's synth loader reads.

Layout, as the project's synthetic datasets have it (so ``vidsearch.synth.load_manifest``
and the evaluator read it unchanged)::

    DIR/manifest.jsonl      one JSON object per video, paths relative to DIR
    DIR/generalisation.json the generation parameters
    DIR/videos/gen-s<seed>-<index>.mp4

Every video is in split ``test``. The trainer's ``load_dataset`` refuses a set with no
train videos, which is the point: this set is for the final report only.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import av
from vidsearch.video_writer import write_video

from .captions import phrase
from .draw import render
from .plan import plan_set, relation
from .scenes import VideoPlan

MANIFEST_NAME = "manifest.jsonl"
INFO_NAME = "generalisation.json"
VIDEOS_DIR = "videos"
RENDERER = "benchmarks.generalisation/1"
MAX_VIDEOS = 100_000


class GeneralisationError(ValueError):
    """Bad arguments or an unusable output directory; the message is one line."""


def video_id(seed: int, index: int) -> str:
    return f"gen-s{seed}-{index:05d}"


def _frame_xy(plan: VideoPlan, xy: tuple[float, float]) -> list[float]:
    # Manifest positions are fractions of the frame's width and height, not of the stage.
    left, top, side = plan.style.stage
    return [round((left + xy[0] * side) / plan.style.width, 4), round((top + xy[1] * side) / plan.style.height, 4)]


def record(plan: VideoPlan, family_plans: list[VideoPlan]) -> dict[str, Any]:
    """The manifest line of one video (fields as in the project's synth manifests)."""
    style, fps = plan.style, plan.style.fps
    events = []
    for act in plan.acts:
        events.append({
            "shape": act.shape, "colour": act.colour, "size": act.size, "action": act.action,
            "position": act.position, "start_xy": _frame_xy(plan, act.start_xy), "end_xy": _frame_xy(plan, act.end_xy),
            "start_frame": act.start_frame, "end_frame": act.end_frame,
            "start_s": round(act.start_frame / fps, 4), "end_s": round(act.end_frame / fps, 4),
            "phrase": phrase(act), "rgb": list(style.palette[act.colour]), "hold": act.hold, "ease": act.ease,
            "radius_px": [round(act.r_start * style.stage[2], 2), round(act.r_end * style.stage[2], 2)],
        })
    ids = {p.index: video_id(p.seed, p.index) for p in family_plans}
    negatives = [{"video_id": ids[p.index], "relation": relation(plan.variant, p.variant)}
                 for p in family_plans if p.index != plan.index]
    shapes = sorted({a.shape for a in plan.acts})
    colours = sorted({a.colour for a in plan.acts})
    actions = sorted({a.action for a in plan.acts})
    metadata = {
        "title": " and ".join(f"{a.colour} {a.shape}" for a in plan.acts),
        "tags": sorted(set(shapes) | set(colours) | set(actions) | {a.size for a in plan.acts}),
        "shapes": shapes, "colours": colours, "actions": actions, "category": f"{len(plan.acts)}-events",
        "duration": round(style.num_frames / fps, 4), "fps": fps, "num_frames": style.num_frames,
        "width": style.width, "height": style.height, "renderer": RENDERER,
        # A description, not a grey level: SynthRecord.spec() would re-render with the
        # training renderer, which must never stand in for this one, so it fails loudly.
        "background": style.background["kind"], "background_rgb": style.background["base"],
        "stage": list(style.stage), "noise_sigma": style.noise_sigma, "crf": style.crf,
        "distractors": [{"shape": p.shape, "colour": p.colour, "xy": _frame_xy(plan, p.xy),
                         "rgb": list(style.palette[p.colour])} for p in style.props],
        "change": plan.change,
    }
    vid = ids[plan.index]
    return {"video_id": vid, "path": f"{VIDEOS_DIR}/{vid}.mp4", "captions": list(plan.captions), "split": "test",
            "metadata": metadata, "events": events, "family": plan.family, "variant": plan.variant,
            "hard_negatives": negatives}


def _prepare(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise GeneralisationError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise GeneralisationError(f"output directory {out} is not empty (pass --overwrite to replace a set)")
        # Only what an earlier run of this generator wrote; anything else there is kept.
        old = [out / MANIFEST_NAME, out / INFO_NAME, out / (MANIFEST_NAME + ".partial")]
        if (out / VIDEOS_DIR).is_dir():
            old += sorted((out / VIDEOS_DIR).glob("gen-s*.mp4"))
        try:
            for path in old:
                path.unlink(missing_ok=True)
        except OSError as exc:
            raise GeneralisationError(f"cannot remove {path}: {exc.strerror or exc}") from None
    try:
        (out / VIDEOS_DIR).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GeneralisationError(f"cannot create {out / VIDEOS_DIR}: {exc.strerror or exc}") from None


def _encode(job: tuple[VideoPlan, str]) -> str:
    plan, path = job
    write_video(path, render(plan), fps=plan.style.fps, crf=plan.style.crf)
    return path


def _encode_all(jobs: list[tuple[VideoPlan, str]], workers: int) -> Iterator[str]:
    if workers == 1:
        yield from map(_encode, jobs)
        return
    # spawn: nothing inherited from the caller's threads or locks.
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(_encode, jobs, chunksize=4)


def generate_set(out_dir: str | os.PathLike, n: int, seed: int = 0, *, workers: int = 1, overwrite: bool = False,
                 progress: bool | None = None) -> Path:
    """Write n videos and the manifest into out_dir; return the manifest's path.

    ``progress=None``: a progress line on stderr only when stderr is a terminal.
    Raises GeneralisationError for bad arguments or an unusable out_dir.
    """
    if not 1 <= n <= MAX_VIDEOS:
        raise GeneralisationError(f"--n must be from 1 to {MAX_VIDEOS} (got {n})")
    if workers < 1:
        raise GeneralisationError(f"--workers must be at least 1 (got {workers})")
    out = Path(out_dir)
    _prepare(out, overwrite)
    plans = plan_set(n, seed)
    by_family: dict[int, list[VideoPlan]] = {}
    for plan in plans:
        by_family.setdefault(plan.family, []).append(plan)
    records = [record(p, by_family[p.family]) for p in plans]
    jobs = [(p, str(out / r["path"])) for p, r in zip(plans, records)]
    show = sys.stderr.isatty() if progress is None else progress
    started = time.monotonic()
    try:
        for done, _ in enumerate(_encode_all(jobs, workers), 1):
            if show and (done == len(jobs) or done % max(1, len(jobs) // 50) == 0):
                elapsed = time.monotonic() - started
                eta = elapsed / done * (len(jobs) - done)
                print(f"\rgeneralisation: {done}/{len(jobs)} videos, {elapsed:.0f} s, ~{eta:.0f} s left",
                      end="" if done < len(jobs) else "\n", file=sys.stderr, flush=True)
        info = {"renderer": RENDERER, "n": n, "seed": seed, "families": len(by_family),
                "variants": {v: sum(p.variant == v for p in plans) for v in sorted({p.variant for p in plans})},
                "rule": "final report only: never for training, model selection, the gate or tuning"}
        (out / INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
        # Manifest last and atomically: when it exists, every video it names is written.
        partial = out / (MANIFEST_NAME + ".partial")
        with partial.open("w") as handle:
            for line in records:
                handle.write(json.dumps(line) + "\n")
        partial.replace(out / MANIFEST_NAME)
    except (OSError, av.FFmpegError) as exc:
        # Disk full, directory removed under us: one line, not a traceback.
        raise GeneralisationError(f"cannot write the set into {out}: {exc}") from None
    return out / MANIFEST_NAME
