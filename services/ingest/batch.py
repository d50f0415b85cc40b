"""One poll batch: its records, what happened to each, and what to write and commit.

Every record of a batch ends in exactly one of three states before the batch is
finalised: a parsed op whose work is done (an encoded video, or a delete), or a
permanent failure (DLQ). The batch then yields the store writes, the DLQ records
and the offsets to commit.

Ordering. Messages are keyed by video_id, so all updates of one video sit on one
partition, in offset order, and arrive in one batch in that order (or in later
batches, which are finalised after this one). Every op is a full replacement of
the video's points (an upsert writes every segment and trims the ones past its
segment count; a delete removes them all), so
applying a sequence of ops leaves the same state as applying only the last one.
A permanent failure, though, is a no-op in that sequence: "upsert A (ok), upsert
B (file missing)" leaves A. So the batch does not collapse to the last *message*
per video_id; it collapses to the last op that did not fail permanently, which is
exactly what applying every message in order would leave (each failing one also
goes to the DLQ, as in sequential processing).
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from vidsearch.config import MessageSettings
from vidsearch.messages import DeleteOp, IngestOp, MessageError, UpsertOp, parse_ingest_message
from vidsearch.redact import redact

_batch_ids = itertools.count(1)


@dataclass(frozen=True)
class Encoded:
    """What the pipeline produced for one upsert: every segment of the video (one for a
    short video), over the distinct frames decoded once for all of them."""

    segment_vectors: np.ndarray  # float32 [S, D], L2-normalised, one per segment
    frames: np.ndarray  # float32 [N, D], L2-normalised, the distinct frames
    timestamps: list[float]  # [N], seconds from the video's start
    windows: tuple[tuple[float, float], ...]  # [S] (start_s, end_s)
    frame_index: tuple[tuple[int, ...], ...]  # [S] indices into frames
    duration_s: float
    width: int
    height: int
    fps: float | None
    codec: str
    regions: np.ndarray | None = None  # float32 [N, G, W]: region tokens of the distinct frames

    @property
    def segment_count(self) -> int:
        return len(self.windows)

    def points(self, video_id: str, payload: dict[str, Any]) -> list[Any]:
        """The VideoPoints of every segment: ``payload`` (from build_payload) plus each
        segment's fields, its vector, and its own frames and their timestamps."""
        from vidsearch.store_schema import VideoPoint, segment_payload

        stamps = np.asarray(self.timestamps, dtype=np.float64)
        points = []
        for k, ((start, end), index) in enumerate(zip(self.windows, self.frame_index)):
            rows = list(index)
            points.append(VideoPoint(video_id, self.segment_vectors[k], self.frames[rows], segment_payload(
                payload, k, self.segment_count, start, end, stamps[rows]),
                regions=None if self.regions is None else self.regions[rows]))
        return points


@dataclass(eq=False)
class Item:
    """One Kafka record of a batch."""

    batch: "Batch"
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    op: IngestOp | None = None
    error_class: str | None = None
    reason: str | None = None
    encoded: Encoded | None = None
    points: Any = None  # the VideoPoints (one per segment), built when the batch is finalised
    dlq_sent: bool = False  # this failed item's DLQ record was acknowledged (or refused for good)
    dlq_minimal: bool = False  # the broker refused its full DLQ record: send only size, sha256, source

    @property
    def tp(self) -> tuple[str, int]:
        return (self.topic, self.partition)

    @property
    def failed(self) -> bool:
        return self.error_class is not None

    @property
    def needs_work(self) -> bool:
        """An upsert that has neither a result nor a permanent failure yet."""
        return isinstance(self.op, UpsertOp) and not self.failed and self.encoded is None

    def fail(self, error_class: str, reason: str) -> None:
        # Every DLQ reason enters here: redacted once, before it is logged or published.
        self.error_class, self.reason = error_class, redact(reason)

    def describe(self) -> dict[str, Any]:
        return {"topic": self.topic, "partition": self.partition, "offset": self.offset,
                "video_id": getattr(self.op, "video_id", None)}


@dataclass(eq=False)
class Batch:
    """The records of one ``poll()``, finalised (written, then committed) as a unit."""

    items: list[Item] = field(default_factory=list)
    id: int = field(default_factory=lambda: next(_batch_ids))
    polled_at: float = field(default_factory=time.monotonic)
    # Partitions taken away by a rebalance: their records are neither written nor committed.
    revoked: set[tuple[str, int]] = field(default_factory=set)
    # Finalisation progress, so a retry resumes at the step that failed.
    dlq_sent: bool = False
    store_written: bool = False
    # The EncodeTarget (model version + collection) the worker captured for this batch:
    # every point of the batch is encoded with that version and written to its
    # collection (the worker re-targets a batch not yet written when the alias moves).
    target: Any = None

    @classmethod
    def from_records(cls, records: Iterable[Any], limits: MessageSettings | None = None) -> "Batch":
        """Build from kafka-python ConsumerRecords, parsing each (within ``limits``); a
        parse failure is a DLQ item."""
        batch = cls()
        for record in records:
            item = Item(batch, record.topic, record.partition, record.offset, record.key, record.value)
            try:
                item.op = parse_ingest_message(record.value, record.key, limits)
            except MessageError as exc:
                item.fail(exc.error_class, exc.reason)
            batch.items.append(item)
        return batch

    def live_items(self) -> list[Item]:
        return [item for item in self.items if item.tp not in self.revoked]

    @property
    def abandoned(self) -> bool:
        """Every partition of the batch was revoked: nothing of it may be written or committed."""
        return all(item.tp in self.revoked for item in self.items)

    @property
    def ready(self) -> bool:
        return all(not item.needs_work for item in self.live_items())

    def partitions(self) -> set[tuple[str, int]]:
        return {item.tp for item in self.items}

    def dlq_items(self) -> list[Item]:
        return [item for item in self.live_items() if item.failed]

    def final_ops(self) -> tuple[list[Item], list[Item]]:
        """(upserts, deletes): per video_id the last op that did not fail permanently.

        See the module docstring for why this equals applying every op in order.
        """
        last: dict[str, Item] = {}
        for item in sorted(self.live_items(), key=lambda i: (i.partition, i.offset)):
            if item.op is not None and not item.failed:
                last[item.op.video_id] = item
        upserts = [item for item in last.values() if isinstance(item.op, UpsertOp)]
        deletes = [item for item in last.values() if isinstance(item.op, DeleteOp)]
        return upserts, deletes

    def commit_offsets(self) -> dict[tuple[str, int], int]:
        """Per live partition: the highest offset in this batch + 1 (the next one to read)."""
        offsets: dict[tuple[str, int], int] = {}
        for item in self.live_items():
            offsets[item.tp] = max(offsets.get(item.tp, 0), item.offset + 1)
        return offsets
