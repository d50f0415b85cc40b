"""Decoded frames for training, cached on disk once per (dataset, decode, model input).

Frames come from the shared decoder with the ingest path's settings and resize
(``decode_video(..., resize_to=image_size)``), then the model's own centre crop,
so training sees exactly the pixels serving will see (no train/serve skew).
Two caches per split:

- ``eval``: the ``num_frames`` uniform frames ingest takes, used to evaluate and
  to compute the frozen frame features later stages train on;
- ``train`` (train split only): ``factor x num_frames`` uniform frames, from which
  augmentation picks ``num_frames`` near the uniform positions (temporal jitter).

Arrays are ``.npy`` files opened memory-mapped, so every Ray Train worker on the
machine shares one copy in the page cache.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from vidsearch.config import DecodeSettings
from vidsearch.models.preprocess import preprocess_frames
from vidsearch.telemetry import log_event
from vidsearch.video import VideoError, decode_video

from .datasets import TrainingVideo
from .errors import TrainingError

log = logging.getLogger(__name__)


@dataclass
class FrameCache:
    """uint8 frames[N,F,S,S,3], mask[N,F], timestamps[N,F] (seconds) for ``video_ids``."""

    video_ids: list[str]
    frames: np.ndarray
    mask: np.ndarray
    timestamps: np.ndarray
    path: Path

    def __len__(self) -> int:
        return len(self.video_ids)


def _crop_uint8(frames: np.ndarray, size: int) -> np.ndarray:
    # The model's preprocess with identity normalisation: its resize (a no-op after
    # decode's resize_to) and centre crop, back in uint8.
    x = preprocess_frames(frames, size, mean=(0.0, 0.0, 0.0), std=(1 / 255.0,) * 3)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _cache_key(videos: Sequence[TrainingVideo], decode: DecodeSettings, frames: int, size: int) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps([frames, size, decode.model_dump(mode="json")], sort_keys=True).encode())
    for video in videos:
        digest.update(f"{video.video_id}\0{video.uri}\n".encode())
    return digest.hexdigest()[:16]


def _decode_one(video: TrainingVideo, decode: DecodeSettings, frames: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        decoded = decode_video(video.uri, decode, num_frames=frames, resize_to=size)
    except VideoError as exc:
        raise TrainingError(f"video {video.video_id}: {exc}") from None
    return _crop_uint8(decoded.frames, size)[:frames], decoded.timestamps[:frames]


def build_cache(videos: Sequence[TrainingVideo], decode: DecodeSettings, *, frames: int, size: int,
                cache_dir: Path, label: str, threads: int = 2, progress: bool = True) -> FrameCache:
    """Decode ``frames`` uniform frames of every video (or reuse the cache on disk)."""
    key = _cache_key(videos, decode, frames, size)
    where = cache_dir / f"{label}-{key}"
    if (where / "done").is_file():
        return open_cache(where)
    where.mkdir(parents=True, exist_ok=True)
    n = len(videos)
    pixels = np.lib.format.open_memmap(where / "frames.npy", mode="w+", dtype=np.uint8, shape=(n, frames, size, size, 3))
    mask = np.zeros((n, frames), dtype=bool)
    stamps = np.zeros((n, frames), dtype=np.float32)
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool, \
            tqdm(total=n, desc=f"decode {label}", unit="video", disable=not progress, mininterval=2.0) as bar:
        for index, (got, times) in enumerate(pool.map(lambda v: _decode_one(v, decode, frames, size), videos)):
            count = got.shape[0]
            pixels[index, :count] = got
            mask[index, :count] = True
            stamps[index, :count] = times
            bar.update(1)
    pixels.flush()
    np.save(where / "mask.npy", mask)
    np.save(where / "timestamps.npy", stamps)
    (where / "ids.json").write_text(json.dumps([v.video_id for v in videos]))
    (where / "done").write_text("")
    log_event(log, "frames cached", label=label, videos=n, frames=frames, size=size, path=str(where))
    return open_cache(where)


def open_cache(where: str | os.PathLike) -> FrameCache:
    where = Path(where)
    return FrameCache(video_ids=json.loads((where / "ids.json").read_text()),
                      frames=np.load(where / "frames.npy", mmap_mode="r"),
                      mask=np.load(where / "mask.npy"), timestamps=np.load(where / "timestamps.npy"), path=where)
