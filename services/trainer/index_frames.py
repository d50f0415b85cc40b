"""Training frames read from the live index instead of decoded: no video is opened.

When the frame tower is frozen (no backbone stage) and the model's frame encoder
is the one that produced the live collection's points (their payload's
``frame_encoder``), the stored ``frames`` multivectors are exactly the features
training would compute, so they are copied into a feature cache (``.npy``:
frames[N,T,D] float32, mask, timestamps) that the stages read directly.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from vidsearch.config import Settings
from vidsearch.telemetry import log_event

from .datasets import TrainingVideo
from .errors import TrainingError

log = logging.getLogger(__name__)


def cache_index_frames(settings: Settings, videos: Sequence[TrainingVideo], frame_encoder: str, num_frames: int,
                       cache_dir: Path, label: str) -> Path:
    """Copy the stored frames of ``videos`` from the live collection into a feature cache."""
    from vidsearch.store import open_store

    try:
        store = open_store(settings)
        collection = store.resolve_alias(settings.store.alias)
    except Exception as exc:  # noqa: BLE001 - any store failure is one line for the user
        raise TrainingError(f"data.frames=index: the vector store is not reachable: {str(exc).splitlines()[0]}") from None
    if collection is None:
        raise TrainingError(f"data.frames=index: alias {settings.store.alias!r} points at no collection")
    where = cache_dir / f"{label}-index-{collection}"
    where.mkdir(parents=True, exist_ok=True)
    ids = [v.video_id for v in videos]
    stored = {s.video_id: s for batch in (store.get(collection, ids[i:i + 256], with_vectors=True)
                                          for i in range(0, len(ids), 256)) for s in batch}
    missing = [vid for vid in ids if vid not in stored]
    if missing:
        raise TrainingError(f"data.frames=index: {len(missing)} video(s) are not in {collection} "
                            f"(first: {missing[0]}); ingest them or use data.frames=decode")
    foreign = [vid for vid in ids if stored[vid].payload.get("frame_encoder") != frame_encoder]
    if foreign:
        got = stored[foreign[0]].payload.get("frame_encoder")
        raise TrainingError(f"data.frames=index: video {foreign[0]} was encoded by {got!r}, not by this model's "
                            f"frame encoder {frame_encoder!r}; use data.frames=decode")
    dim = stored[ids[0]].frames.shape[1]
    frames = np.zeros((len(ids), num_frames, dim), dtype=np.float32)
    mask = np.zeros((len(ids), num_frames), dtype=bool)
    stamps = np.zeros((len(ids), num_frames), dtype=np.float32)
    for row, vid in enumerate(ids):
        point = stored[vid]
        count = min(num_frames, point.frames.shape[0])
        frames[row, :count] = point.frames[:count]
        mask[row, :count] = True
        stamps[row, :count] = np.asarray(point.payload.get("frame_timestamps", [0.0] * count))[:count]
    np.save(where / "features.npy", frames)
    np.save(where / "mask.npy", mask)
    np.save(where / "timestamps.npy", stamps)
    (where / "ids.json").write_text(json.dumps(ids))
    log_event(log, "frames read from the index", label=label, collection=collection, videos=len(ids))
    return where


def open_feature_cache(where: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    where = Path(where)
    return np.load(where / "features.npy"), np.load(where / "mask.npy"), np.load(where / "timestamps.npy")
