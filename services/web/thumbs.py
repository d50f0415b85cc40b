"""JPEG thumbnails: one frame decoded by the shared decoder, kept in a small LRU.

The key holds the collection and the uri, so a re-ingested or re-indexed video
never shows a stale frame; the time is rounded to 10 ms, finer than any frame
rate, so a page's repeated requests hit the cache.
"""
from __future__ import annotations

import io
import math
import threading
from collections import OrderedDict

from vidsearch.config import DecodeSettings
from vidsearch.services.query.errors import RequestError
from vidsearch.video import decode_frame_at

# Cards show thumbnails a few hundred pixels wide; larger sources are scaled down.
THUMB_SHORT_SIDE = 270
JPEG_QUALITY = 85


def parse_time(raw: str | None) -> float:
    """The ``t`` parameter: seconds into the video, default 0."""
    if raw is None or raw.strip() == "":
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        raise RequestError("t", f"must be a number of seconds (got {raw!r})") from None
    if not math.isfinite(value) or value < 0:
        raise RequestError("t", f"must be a finite number of seconds >= 0 (got {raw!r})")
    return value


def jpeg_frame(uri: str, decode: DecodeSettings, at_s: float, short_side: int = THUMB_SHORT_SIDE) -> bytes:
    """The frame on screen at ``at_s`` as JPEG bytes; raises the decoder's VideoError."""
    from PIL import Image

    frame = decode_frame_at(uri, decode, at_s, max_short_side=short_side).frames[0]
    out = io.BytesIO()
    Image.fromarray(frame).save(out, format="JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


class ThumbCache:
    """A thread-safe LRU of JPEG bytes; ``capacity`` 0 turns caching off."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[tuple, bytes] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(collection: str, video_id: str, uri: str, at_s: float) -> tuple:
        return (collection, video_id, uri, round(at_s * 100))

    def get(self, key: tuple) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return data

    def put(self, key: tuple, data: bytes) -> None:
        if self.capacity == 0:
            return
        with self._lock:
            self._items[key] = data
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)
