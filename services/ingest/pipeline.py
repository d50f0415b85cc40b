"""Drive upserts through decode tasks and encoder actors, without blocking the consumer.

The driver loop calls :meth:`Pipeline.pump` between polls. Nothing here waits:
it starts decode tasks (at most ``decode_parallelism`` in flight), collects the
finished ones, packs decoded videos into encoder calls and collects encoder
results into the batch items. So decoding of later videos overlaps encoding of
earlier ones, and the poll loop keeps the consumer's group membership alive.

Packing (dynamic batching). Decoded videos wait in an accumulator. A call is sent
when the accumulator holds ``encoder_batch_frames`` frames, or as soon as some
actor is idle (an idle device never waits for a fuller batch). At most two calls
are queued per actor, so a burst can't pile unbounded work onto one actor.

Versions. A job is encoded for the ``target`` (an ``EncodeTarget``: model version,
frames per video, input size) its batch carried when it was submitted; a call packs
only jobs of one target. When the worker re-targets a batch (the live alias moved),
the jobs of the old target are dropped like those of a revoked partition, and the
batch's videos are submitted again. Items of a batch without a target use the
pipeline's own ``num_frames``/``resize_to`` and the actors' default version.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import RayActorError, RayError, RayTaskError

from vidsearch.config import DecodeSettings
from vidsearch.messages import UpsertOp
from vidsearch.redact import redact_cut
from vidsearch.telemetry import log_event

from .backoff import Backoff
from .batch import Encoded, Item
from .encoder import DecodeMeta, EncoderPool, decode_frames
from .metrics import IngestMetrics

log = logging.getLogger(__name__)

MAX_CALLS_PER_ACTOR = 2


@dataclass(eq=False)
class _Job:
    item: Item
    backoff: Backoff
    # The batch's EncodeTarget when the job was submitted (None: pipeline defaults).
    target: Any = None
    meta: DecodeMeta | None = None
    frames_ref: Any = None
    # After a multi-video encoder call raised, each video is retried alone so one
    # bad input can't fail its neighbours.
    solo: bool = False

    @property
    def dropped(self) -> bool:
        batch = self.item.batch
        # Revoked partition, or the batch was re-targeted to another model version.
        return self.item.tp in batch.revoked or batch.target is not self.target

    @property
    def version(self) -> str | None:
        return None if self.target is None else self.target.version


@dataclass(eq=False)
class _Call:
    actor: int
    jobs: list[_Job]
    ref: Any


class Pipeline:
    def __init__(self, pool: EncoderPool, decode: DecodeSettings, *, num_frames: int, resize_to: int,
                 parallelism: int, batch_frames: int, retry_initial_s: float, retry_max_s: float,
                 metrics: IngestMetrics) -> None:
        self.pool = pool
        self.decode = decode
        self.num_frames = num_frames
        self.resize_to = resize_to
        self.parallelism = parallelism
        self.batch_frames = batch_frames
        self._backoff = lambda: Backoff(retry_initial_s, retry_max_s)
        self.metrics = metrics
        self._queue: deque[_Job] = deque()  # waiting to decode (or to retry a decode)
        self._decoding: dict[Any, _Job] = {}  # meta ref -> job
        self._decoded: list[_Job] = []  # the accumulator
        self._calls: dict[Any, _Call] = {}  # encoder call ref -> call

    # ---- bookkeeping -------------------------------------------------------------
    def submit(self, items: list[Item]) -> None:
        for item in items:
            if isinstance(item.op, UpsertOp) and not item.failed:
                self._queue.append(_Job(item, self._backoff(), target=item.batch.target))

    @property
    def busy(self) -> bool:
        return bool(self._queue or self._decoding or self._decoded or self._calls)

    def drop_revoked(self) -> None:
        """Forget the work of revoked partitions and re-targeted batches. Running decode
        tasks are cancelled; running encoder calls finish and their results for dropped
        jobs are ignored."""
        self._queue = deque(j for j in self._queue if not j.dropped)
        for ref, job in list(self._decoding.items()):
            if job.dropped:
                del self._decoding[ref]
                try:
                    ray.cancel(ref)
                except Exception:  # noqa: BLE001 - it may have finished already
                    pass
        self._decoded = [j for j in self._decoded if not j.dropped]

    def outstanding_refs(self) -> list[Any]:
        return list(self._decoding) + list(self._calls)

    def wait(self, timeout_s: float) -> None:
        """Block until some task finishes or ``timeout_s`` passes."""
        refs = self.outstanding_refs()
        if refs:
            ray.wait(refs, num_returns=1, timeout=timeout_s, fetch_local=False)
        elif timeout_s > 0:
            time.sleep(min(timeout_s, self._next_retry_in()))

    def _next_retry_in(self) -> float:
        waits = [job.backoff.remaining_s() for job in self._queue]
        return min(waits) if waits else 0.05

    # ---- progress ----------------------------------------------------------------
    def pump(self) -> None:
        self._collect_encodes()
        self._collect_decodes()
        self._start_decodes()
        self._start_encodes()

    def _start_decodes(self) -> None:
        deferred: list[_Job] = []
        while self._queue and len(self._decoding) < self.parallelism:
            job = self._queue.popleft()
            if job.dropped:
                continue
            if not job.backoff.ready():
                deferred.append(job)
                continue
            if job.target is None:
                num_frames, resize_to = self.num_frames, self.resize_to
            else:
                num_frames, resize_to = job.target.num_frames, job.target.resize_to
            meta_ref, frames_ref = decode_frames.remote(job.item.op.uri, self.decode, num_frames, resize_to)
            job.frames_ref = frames_ref
            self._decoding[meta_ref] = job
        # Jobs still backing off keep their place at the head, so FIFO order holds.
        self._queue.extendleft(reversed(deferred))

    def _collect_decodes(self) -> None:
        if not self._decoding:
            return
        refs = list(self._decoding)
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        for ref in done:
            job = self._decoding.pop(ref)
            try:
                meta: DecodeMeta = ray.get(ref)
            except RayError as exc:
                # The task's worker died more often than Ray retries, or the object was
                # lost: an infrastructure problem, so try again later.
                self._retry(job, "decode", f"{type(exc).__name__}: {exc}")
                continue
            if job.dropped:
                continue
            if meta.ok:
                job.meta = meta
                self._decoded.append(job)
            elif meta.transient:
                self._retry(job, "decode", meta.reason)
            else:
                job.item.fail(meta.error_class, meta.reason)

    def _retry(self, job: _Job, stage: str, reason: str) -> None:
        delay = job.backoff.failed()
        job.frames_ref, job.meta = None, None
        self.metrics.retries.labels(stage=stage).inc()
        log_event(log, "transient failure, will retry", logging.WARNING, stage=stage,
                  retry_in_s=round(delay, 2), reason=redact_cut(reason, 300), **job.item.describe())
        if not job.dropped:
            self._queue.appendleft(job)

    def _start_encodes(self) -> None:
        self._decoded = [j for j in self._decoded if not j.dropped]
        # Head-of-line first: the oldest batch is the one the commit order waits for.
        self._decoded.sort(key=lambda j: (j.item.batch.id, j.item.offset))
        while self._decoded:
            actor = self.pool.pick()
            load = self.pool.outstanding[actor]
            if load >= MAX_CALLS_PER_ACTOR:
                return
            frames = sum(j.meta.num_frames for j in self._decoded)
            if load > 0 and frames < self.batch_frames:
                return  # every actor is busy: let the batch fill up meanwhile
            jobs = self._take_pack()
            refs = [j.frames_ref for j in jobs]
            version = jobs[0].version
            handle = self.pool.actors[actor]
            # Each distinct frame is encoded once; the actor aggregates every segment.
            windows = [j.meta.frame_index for j in jobs]
            ref = handle.encode_segments.remote(*refs, windows=windows, version=version)
            self._calls[ref] = _Call(actor, jobs, ref)
            self.pool.outstanding[actor] += 1

    def _take_pack(self) -> list[_Job]:
        head = self._decoded[0]
        if head.solo:
            return [self._decoded.pop(0)]
        pack, frames = [], 0
        # One call encodes for one target (model version) only.
        while self._decoded and not self._decoded[0].solo and self._decoded[0].target is head.target:
            job = self._decoded[0]
            if pack and frames + job.meta.num_frames > self.batch_frames:
                break
            pack.append(self._decoded.pop(0))
            frames += job.meta.num_frames
        return pack

    def _collect_encodes(self) -> None:
        if not self._calls:
            return
        refs = list(self._calls)
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        for ref in done:
            call = self._calls.pop(ref)
            self.pool.outstanding[call.actor] -= 1
            try:
                results = ray.get(ref)
            except RayTaskError as exc:
                self._encode_failed(call, exc)
                continue
            except (RayActorError, RayError) as exc:
                # The actor died (Ray restarts it): decode again from scratch, since the
                # frames may have gone with the node.
                for job in call.jobs:
                    self._retry(job, "encode", f"{type(exc).__name__}: {exc}")
                continue
            frames_total = 0
            for job, (vectors, frames, regions) in zip(call.jobs, results):
                frames_total += int(frames.shape[0])
                if job.dropped:
                    continue
                meta = job.meta
                job.item.encoded = Encoded(
                    segment_vectors=vectors, frames=frames, regions=regions, timestamps=list(meta.timestamps),
                    windows=meta.windows, frame_index=meta.frame_index,
                    duration_s=meta.duration_s, width=meta.width, height=meta.height,
                    fps=meta.fps, codec=meta.codec)
            self.metrics.frames_encoded.inc(frames_total)

    def _encode_failed(self, call: _Call, exc: RayTaskError) -> None:
        reason = str(exc.cause if getattr(exc, "cause", None) is not None else exc).strip().splitlines()
        reason_text = reason[-1] if reason else type(exc).__name__
        if len(call.jobs) > 1:
            log_event(log, "encoder call failed, retrying its videos one by one", logging.WARNING,
                      videos=len(call.jobs), reason=redact_cut(reason_text, 300))
            for job in call.jobs:
                job.solo = True
            self._decoded[:0] = call.jobs
            return
        job = call.jobs[0]
        if not job.dropped:
            job.item.fail("encode_failed", redact_cut(reason_text, 1000))

