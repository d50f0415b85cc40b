"""The ingest worker: Kafka consumer -> decode -> encode -> vector store -> commit.

One thread drives everything (kafka-python consumers are not thread-safe):

    poll -> Batch -> Pipeline (Ray decode tasks, encoder actors) -> finalise -> commit

* At most ``max_inflight_batches`` batches are between poll and commit. When the
  limit is reached the assigned partitions are paused and ``poll`` keeps being
  called (it returns nothing), so heartbeats, rebalances and ``max_poll_interval``
  stay healthy however long the store or the encoders take.
* Batches are finalised strictly in poll order (FIFO): DLQ records are produced
  and acknowledged, the store write is acknowledged (wait=True), and only then are
  the offsets committed (per partition, highest offset in the batch + 1). So the
  committed offset of a partition only moves forward, and everything below it
  is in the store or the DLQ.
* Transient failures (store unavailable, DLQ produce or commit refused) put the
  head batch on a capped exponential backoff; it is retried, never committed
  before it succeeds. Permanent failures (bad messages, bad videos) are per
  record: to the DLQ, then committed with their batch.
* Rebalance: kafka-python calls the listener from inside ``poll`` (on its IO
  thread, while this thread waits in poll), so it never races the code below.
  Work of revoked partitions is dropped uncommitted; the new owner re-reads it
  from the committed offset, and re-writing is harmless because point ids are
  uuid5 of (video_id, segment) and the write trims a shorter video's stale segments.
* The worker follows the store alias (not the registry's ``production``): every
  ``serve.alias_poll_s`` it checks which collection ``store.alias`` points at. Each
  batch captures one :class:`EncodeTarget` (model version, collection, frames per
  video) when it is polled, and all its points are encoded with that version and
  written to that collection. When the alias moves (a re-index or rollback flipped
  it), the worker stops taking records, has the encoder actors load the new version
  (same ``frame_encoder``: only the head is new and the frame tower is shared; a new
  ``frame_encoder``: the actors load its frame tower), then re-targets every batch
  not yet written (its videos are encoded again for the new version) and goes on.
  So after the worker noticed a flip it writes nothing more to the old collection;
  writes the old collection still gets in between (at most ``serve.alias_poll_s``
  plus one store write) are copied by the re-index's catch-up after the flip. For
  the same reason deletes are also applied to the previous collection, so a late
  catch-up (or a rollback) never brings a deleted video back.
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from collections import deque
from typing import Any, Callable

from vidsearch.config import Settings
from vidsearch.dlq import dlq_key, dlq_record, minimal_dlq_record
from vidsearch.messages import UpsertOp
from vidsearch.redact import redact, redact_cut
from vidsearch.store_schema import REGION_ENCODER_FIELD
from vidsearch.telemetry import log_event

from .backoff import Backoff
from .batch import Batch, Item
from .encoder import EncodeTarget, EncoderInfo, EncoderPool, frames_per_video
from .metrics import IngestMetrics, SummaryLogger
from .pipeline import Pipeline

log = logging.getLogger(__name__)

# Poll timeouts: short while work is in flight (the loop also watches Ray), longer when idle.
BUSY_POLL_MS = 20
IDLE_POLL_MS = 250
LAG_REFRESH_S = 5.0
# Of the shutdown grace, what is kept back for closing the consumer and producer.
CLOSE_RESERVE_S = 5.0


class WorkerError(RuntimeError):
    """The worker can't start (no broker, store layout mismatch ...); one-line message."""


_UNKNOWN = object()  # the alias has not been looked up yet


class _Switch:
    """A move of the live alias the worker is following: the new version is loading."""

    def __init__(self, collection: str, version: str, refs: list[Any]) -> None:
        self.collection = collection
        self.version = version
        self.refs = refs
        self.started = time.monotonic()


class _Transient(Exception):
    """A finalisation step failed in a way that a later retry can fix."""

    def __init__(self, stage: str, reason: str) -> None:
        reason = redact(reason)  # logged, and kept as the partition's last failure
        super().__init__(f"{stage}: {reason}")
        self.stage = stage
        self.reason = reason


def ensure_ray(settings: Settings) -> None:
    """Join the configured Ray cluster, or start a local one (once per process)."""
    import ray

    if ray.is_initialized():
        return
    # ray.init replaces the SIGTERM handler with one that exits at once (code 15). A
    # handler the application installed (the CLI's stop-and-drain) is put back.
    previous = signal.getsignal(signal.SIGTERM)
    restore = callable(previous) and threading.current_thread() is threading.main_thread()
    try:
        if settings.ray.address:
            ray.init(address=settings.ray.address, log_to_driver=False)
        else:
            ray.init(num_cpus=settings.ray.num_cpus, include_dashboard=False, log_to_driver=False)
    finally:
        if restore:
            signal.signal(signal.SIGTERM, previous)


class IngestWorker:
    """One consumer-group member. ``run()`` until ``stop()``; or ``run_until`` in tests.

    ``pool`` and ``store`` may be passed in (tests share one encoder actor between
    workers); a worker closes only what it created.
    """

    def __init__(self, settings: Settings, *, topic: str | None = None, group: str | None = None,
                 pool: EncoderPool | None = None, store: Any = None, metrics: IngestMetrics | None = None,
                 client_id: str | None = None, shutdown_grace_s: float | None = None) -> None:
        self.settings = settings
        self.topic = topic or settings.broker.ingest_topic
        self.group = group or settings.broker.consumer_group
        self.dlq_topic = settings.broker.dlq_topic
        self.client_id = client_id or "vidsearch-ingest"
        self.metrics = metrics or IngestMetrics()
        self.shutdown_grace_s = settings.ingest.shutdown_grace_s if shutdown_grace_s is None else shutdown_grace_s
        self._pool, self._owns_pool = pool, pool is None
        self._store, self._owns_store = store, store is None
        self._consumer: Any = None
        self._producer: Any = None
        self.pipeline: Pipeline | None = None
        # What new batches are encoded for and written to (follows the store alias).
        self.target: EncodeTarget | None = None
        # The collection written before the last switch: deletes go there too.
        self.previous_collection: str | None = None
        self._switch: _Switch | None = None
        self._switch_backoff = Backoff(settings.ingest.retry_initial_s, settings.ingest.retry_max_s)
        # The last collection the alias was seen pointing at (from the alias-watch thread).
        self._alias_observed: Any = _UNKNOWN
        self._alias_stop = threading.Event()
        self._alias_thread: threading.Thread | None = None
        self.switches = 0  # alias moves followed (for tests and the log)
        self._inflight: deque[Batch] = deque()
        self._backoff = Backoff(settings.ingest.retry_initial_s, settings.ingest.retry_max_s)
        self._summary = SummaryLogger(self.metrics, settings.ingest.log_summary_interval_s)
        self._stop = threading.Event()
        # Batches between poll and commit when stop() was first called (for the drain log).
        self._inflight_at_stop: int | None = None
        self._paused = False
        self._next_lag = 0.0
        self._started = False
        self._closed = False
        # What the partitions were, for the revoke listener and tests.
        self.assignment: set[tuple[str, int]] = set()
        # Per revoked partition, the first offset of its abandoned records (see on_assigned).
        self._rewind: dict[tuple[str, int], int] = {}
        # Per assigned partition: the first offset not yet committed (what lag counts
        # from, so records polled but stuck in flight are lag too), the end of what was
        # polled, and when the partition last made progress (stall detection).
        self._commit_floor: dict[tuple[str, int], int] = {}
        self._polled_end: dict[tuple[str, int], int] = {}
        self._progress_at: dict[tuple[str, int], float] = {}
        self._stalled: set[tuple[str, int]] = set()
        self._last_failure = ""
        self._last_stage = ""
        # When SIGTERM's grace period ends (set by drain); blocking calls stay inside it.
        self._stop_deadline: float | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "IngestWorker":
        if self._started:
            return self
        from kafka import KafkaConsumer, KafkaProducer
        from kafka.errors import KafkaError

        from vidsearch.broker import BrokerError, client_security, ensure_topics
        from vidsearch.store import open_store

        settings = self.settings
        broker = settings.broker
        if not broker.bootstrap:
            raise WorkerError("no Kafka broker configured: set KAFKA_BOOTSTRAP (or broker.bootstrap)")
        try:
            ensure_topics(broker.bootstrap, [self.topic, self.dlq_topic], broker.partitions,
                          security=client_security(broker), create=broker.create_topics)
        except BrokerError as exc:
            raise WorkerError(str(exc).splitlines()[0]) from None
        try:
            # Before the slow steps, so that a taken port fails at once; and it shows the
            # retry counter while the store is unreachable at startup.
            self.metrics.serve(settings.ingest.metrics_port, settings.ingest.metrics_host)
        except OSError as exc:
            raise WorkerError(f"cannot serve metrics on port {settings.ingest.metrics_port}: "
                              f"{exc.strerror or exc}") from None

        ensure_ray(settings)
        if self._pool is None:
            self._pool = EncoderPool(settings)
        if self._store is None:
            self._store = open_store(settings)
        self.target = self._initial_target()
        self._ensure_collection(first_boot=True)
        self._alias_observed = self.target.collection
        self._alias_thread = threading.Thread(target=self._watch_alias, name="alias-watch", daemon=True)
        self._alias_thread.start()
        self.pipeline = Pipeline(
            self._pool, settings.decode, num_frames=self.target.num_frames,
            resize_to=self.target.resize_to, parallelism=settings.ingest.decode_parallelism,
            batch_frames=settings.ingest.encoder_batch_frames, retry_initial_s=settings.ingest.retry_initial_s,
            retry_max_s=settings.ingest.retry_max_s, metrics=self.metrics)
        try:
            publish_ms = int(settings.ingest.publish_timeout_s * 1000)
            # Every wait of a DLQ publish is bounded, so a broker that refuses or hangs
            # can only ever cost one retry's backoff, never a stuck loop.
            self._producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all",
                                           client_id=f"{self.client_id}-dlq", linger_ms=0,
                                           max_request_size=broker.max_request_bytes, max_block_ms=publish_ms,
                                           request_timeout_ms=publish_ms,
                                           delivery_timeout_ms=max(publish_ms * 3, 30_000),
                                           **client_security(broker))
            self._consumer = KafkaConsumer(
                bootstrap_servers=broker.bootstrap, group_id=self.group, client_id=self.client_id,
                enable_auto_commit=False, auto_offset_reset="earliest",
                session_timeout_ms=broker.session_timeout_ms, heartbeat_interval_ms=broker.heartbeat_interval_ms,
                max_poll_interval_ms=broker.max_poll_interval_ms, max_poll_records=broker.max_poll_records,
                **client_security(broker))
        except KafkaError as exc:
            raise WorkerError(f"cannot reach Kafka at {broker.bootstrap}: {exc}") from None
        self._consumer.subscribe([self.topic], listener=_listener_class()(self))
        self._started = True
        log_event(log, "ingest worker started", topic=self.topic, group=self.group, collection=self.collection,
                  model_version=self.model_version, encoder_actors=len(self._pool.actors),
                  device=self.target.info.device, gpu=self._pool.gpu)
        return self

    # The current target, under the names the worker has always had.
    @property
    def collection(self) -> str | None:
        return None if self.target is None else self.target.collection

    @property
    def model_version(self) -> str | None:
        return None if self.target is None else self.target.version

    @property
    def frame_encoder(self) -> str | None:
        return None if self.target is None else self.target.frame_encoder

    def _frames_per_video(self, info: EncoderInfo) -> int:
        return frames_per_video(self.settings.decode, info)

    def _make_target(self, collection: str, info: EncoderInfo) -> EncodeTarget:
        return EncodeTarget(version=info.model_version, collection=collection, info=info,
                            num_frames=self._frames_per_video(info))

    def _initial_target(self) -> EncodeTarget:
        """The collection the alias points at (its version loaded on the actors), or on
        first boot, the pool's serving model and its ``videos__<version>``."""
        import ray
        from ray.exceptions import RayError

        from vidsearch.store import StoreError, StoreUnavailable, collection_name, model_version_of

        alias = self.settings.store.alias
        while True:
            try:
                live = self._store.resolve_alias(alias)
                break
            except StoreError as exc:
                if not isinstance(exc, StoreUnavailable):
                    raise WorkerError(str(exc)) from None
                self._wait_for_store(exc)
        info = self._pool.info
        if live is None:
            return self._make_target(collection_name(info.model_version, alias), info)
        try:
            version = model_version_of(live, alias)
        except ValueError as exc:
            raise WorkerError(f"alias {alias!r} points at {live!r}, which is not a "
                              f"'{alias}__<model_version>' collection: {exc}") from None
        if version != info.model_version:
            try:
                infos = ray.get(self._pool.prepare(version))
            except RayError as exc:
                reason = str(getattr(exc, "cause", None) or exc).strip().splitlines()
                raise WorkerError(f"the live collection {live} was built with model version {version}, "
                                  f"which the encoder actors cannot load: {reason[-1] if reason else exc}") from None
            info = infos[0]
        return self._make_target(live, info)

    def _wait_for_store(self, exc: Exception) -> None:
        delay = self._backoff.failed()
        self.metrics.retries.labels(stage="store").inc()
        log_event(log, "store unavailable at startup, retrying", logging.WARNING,
                  retry_in_s=round(delay, 2), reason=redact_cut(exc, 300))
        if self._stop.wait(delay):
            raise WorkerError("stopped while waiting for the store") from None

    def _ensure_collection(self, first_boot: bool = False) -> None:
        """Create ``videos__<version>``; on first boot (no alias yet) point the alias at it."""
        from vidsearch.store import StoreError

        info = self.target.info
        while True:
            try:
                self._store.ensure_collection(self.collection, info.embed_dim, info.embed_dim, info.region_dim)
                alias = self.settings.store.alias
                if first_boot and self._store.resolve_alias(alias) is None:
                    self._store.set_alias(self.collection, alias)
                    log_event(log, "alias created (first boot)", alias=self.settings.store.alias,
                              collection=self.collection)
                return
            except StoreError as exc:
                from vidsearch.store import StoreUnavailable

                if not isinstance(exc, StoreUnavailable):
                    raise WorkerError(str(exc)) from None
                self._wait_for_store(exc)

    def stop(self) -> None:
        """Ask the loop to stop polling and drain (safe from signal handlers and other threads)."""
        if self._inflight_at_stop is None:
            self._inflight_at_stop = len(self._inflight)
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self) -> None:
        """Consume until :meth:`stop`; then drain within the grace period and close."""
        try:
            # Inside the try: a start that fails half-way still releases what it opened.
            self.start()
            while not self.stopping:
                self.step()
            self.drain(self.shutdown_grace_s)
        finally:
            self.close()

    def run_until(self, predicate: Callable[["IngestWorker"], bool], timeout_s: float) -> bool:
        """Step until ``predicate(self)`` holds (True) or ``timeout_s`` passes (False)."""
        self.start()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.step()
            if predicate(self):
                return True
        return False

    def drain(self, grace_s: float) -> bool:
        """Stop taking new records and finish in-flight batches; False if the grace ran out.

        The whole grace period bounds the drain *and* the close after it: the drain
        leaves :data:`CLOSE_RESERVE_S` (at most a quarter of the grace) for closing, and
        every publish wait inside it is cut to what is left.
        """
        self.stop()
        # The loop finishes ready batches before it notices the stop, hence both counts.
        log_event(log, "draining in-flight batches", batches=len(self._inflight),
                  at_stop=self._inflight_at_stop, grace_s=grace_s)
        self._stop_deadline = time.monotonic() + grace_s
        deadline = self._stop_deadline - min(CLOSE_RESERVE_S, grace_s / 4)
        while self._inflight and time.monotonic() < deadline:
            self.step()
        if self._inflight:
            log_event(log, "grace period over, abandoning in-flight batches uncommitted", logging.WARNING,
                      batches=len(self._inflight))
            return False
        return True

    def _left_s(self, wanted_s: float) -> float:
        """``wanted_s``, cut to what is left of the shutdown grace once draining."""
        if self._stop_deadline is None:
            return wanted_s
        return max(0.0, min(wanted_s, self._stop_deadline - time.monotonic()))

    def _watch_alias(self) -> None:
        """Background lookups of the alias, every ``serve.alias_poll_s``.

        A thread of its own, so a store that is down or slow (an embedded actor that is
        reopening can take many seconds per call) never holds up polling and heartbeats;
        the poll loop only reads the last answer.
        """
        from vidsearch.store import StoreError

        alias = self.settings.store.alias
        while not self._alias_stop.wait(self.settings.serve.alias_poll_s):
            try:
                self._alias_observed = self._store.resolve_alias(alias)
            except (StoreError, Exception) as exc:  # noqa: BLE001 - the batch writes retry outages
                log_event(log, "alias check failed", logging.DEBUG, alias=alias, error=redact_cut(exc, 300))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._alias_stop.set()
        if self._consumer is not None:
            # Closing revokes the partitions (the listener abandons what is left) and
            # leaves the group at once, so the partitions move without a session timeout.
            try:
                self._consumer.close(autocommit=False, timeout_ms=int(self._left_s(5.0) * 1000))
            except Exception as exc:  # noqa: BLE001 - closing must not mask the real exit reason
                log_event(log, "consumer close failed", logging.WARNING, error=str(exc))
        if self._producer is not None:
            try:
                self._producer.close(timeout=max(self._left_s(5.0), 0.1))
            except Exception as exc:  # noqa: BLE001
                log_event(log, "producer close failed", logging.WARNING, error=str(exc))
        if self._owns_pool and self._pool is not None:
            self._pool.close()
        if self._owns_store and self._store is not None:
            self._store.close()
        self._summary.maybe_log(force=True)
        self.metrics.close()
        log_event(log, "ingest worker stopped", topic=self.topic, group=self.group)

    # ------------------------------------------------------------------ the loop
    def step(self) -> None:
        """One loop iteration: follow the alias, progress the pipeline, finalise, poll."""
        self._follow_alias()
        self.pipeline.pump()
        self._finalise_ready()
        # While a switch is pending, nothing new is taken: it would be encoded for the
        # version that is going away.
        accept = (not self.stopping and self._switch is None
                  and len(self._inflight) < self.settings.ingest.max_inflight_batches)
        self._set_paused(not accept)
        busy = self.pipeline.busy or bool(self._inflight)
        records = self._consumer.poll(timeout_ms=BUSY_POLL_MS if busy or not accept else IDLE_POLL_MS)
        if records and accept:
            self._take(records)
        elif busy:
            # Nothing new from Kafka: wait on Ray instead of spinning.
            self.pipeline.wait(0.1 if self._backoff.ready() else min(0.1, self._backoff.remaining_s() + 0.01))
        if not self.stopping:  # no broker round trips eat into the shutdown grace
            self._refresh_lag()
        self._check_stalls()
        self._summary.maybe_log()

    def _set_paused(self, paused: bool) -> None:
        assigned = self._consumer.assignment() or set()
        if paused:
            if assigned:
                self._consumer.pause(*assigned)
        elif self._paused and assigned:
            self._consumer.resume(*assigned)
        self._paused = paused

    # ------------------------------------------------------------------ following the alias
    def _follow_alias(self) -> None:
        """Every ``serve.alias_poll_s``: has the alias moved? Then load its version and switch."""
        if self._switch is not None:
            self._advance_switch()
            return
        from vidsearch.store import model_version_of

        alias = self.settings.store.alias
        observed = self._alias_observed
        if observed is _UNKNOWN:
            return
        live = observed
        if live is None or live == self.target.collection:
            return
        try:
            version = model_version_of(live, alias)
        except ValueError:
            log_event(log, "alias points at a collection without a model version; not following it",
                      logging.WARNING, alias=alias, collection=live)
            return
        log_event(log, "live alias moved: loading its model version on the encoder actors", alias=alias,
                  collection=live, model_version=version, previous=self.target.collection)
        self._switch = _Switch(live, version, self._pool.prepare(version))

    def _advance_switch(self) -> None:
        import ray
        from ray.exceptions import RayError

        switch = self._switch
        if not self._switch_backoff.ready():
            return
        if switch.refs is None:
            # Retrying after a failed load: the alias may have moved on (or back) meanwhile.
            if not self._still_moving_to(switch):
                return
            switch.refs = self._pool.prepare(switch.version)
        done, _ = ray.wait(switch.refs, num_returns=len(switch.refs), timeout=0)
        if len(done) < len(switch.refs):
            return
        try:
            infos: list[EncoderInfo] = ray.get(switch.refs)
        except RayError as exc:
            # Nothing is written to a collection that is no longer live, and nothing is
            # committed: ingestion waits (partitions paused) and the load is retried.
            delay = self._switch_backoff.failed()
            switch.refs = None
            self.metrics.retries.labels(stage="model").inc()
            reason = str(getattr(exc, "cause", None) or exc).strip().splitlines()
            log_event(log, "cannot load the live model version, retrying", logging.WARNING,
                      model_version=switch.version, retry_in_s=round(delay, 2),
                      reason=redact_cut(reason[-1] if reason else type(exc).__name__, 300))
            return
        self._switch_backoff.succeeded()
        target = self._make_target(switch.collection, infos[0])
        previous, self.target = self.target, target
        self.previous_collection = previous.collection
        self._switch = None
        self.switches += 1
        retargeted = 0
        for batch in self._inflight:
            if batch.target is not target and not batch.store_written and not batch.abandoned:
                self._retarget(batch, target)
                retargeted += 1
        self.pipeline.drop_revoked()  # forget the old target's decode/encode work
        log_event(log, "following the live alias", collection=target.collection, model_version=target.version,
                  frame_encoder=target.frame_encoder, previous=previous.collection,
                  same_frame_encoder=target.frame_encoder == previous.frame_encoder,
                  retargeted_batches=retargeted, load_s=round(time.monotonic() - switch.started, 2))

    def _still_moving_to(self, switch: _Switch) -> bool:
        """Re-read the alias before retrying a failed switch: cancel it when the alias is
        back on the current target, or aim it at wherever the alias points now."""
        from vidsearch.store import StoreError, model_version_of

        alias = self.settings.store.alias
        try:
            live = self._store.resolve_alias(alias)
        except StoreError:
            return True  # can't tell: keep trying the switch we know about
        if live is None or live == self.target.collection:
            log_event(log, "alias is back on the current collection; switch cancelled", collection=live)
            self._switch = None
            self._switch_backoff.succeeded()
            return False
        if live != switch.collection:
            try:
                switch.version = model_version_of(live, alias)
            except ValueError:
                self._switch = None
                return False
            switch.collection = live
        return True

    def _retarget(self, batch: Batch, target: EncodeTarget) -> None:
        """Encode a batch not yet written again, for ``target``: its upserts lose their
        results and go through the pipeline once more (deletes only change collection)."""
        batch.target = target
        redo = []
        for item in batch.live_items():
            if isinstance(item.op, UpsertOp) and not item.failed:
                item.encoded, item.points = None, None
                redo.append(item)
        self.pipeline.submit(redo)

    def _take(self, records: dict[Any, list[Any]]) -> None:
        flat = [record for tp_records in records.values() for record in tp_records]
        batch = Batch.from_records(flat, self.settings.messages)
        now = time.monotonic()
        for record in flat:
            tp = (record.topic, record.partition)
            # The first record polled after an assignment sits at the committed offset.
            self._commit_floor.setdefault(tp, record.offset)
            if self._polled_end.get(tp, 0) <= self._commit_floor[tp]:
                self._progress_at[tp] = now  # the partition had no work until now
            self._polled_end[tp] = max(self._polled_end.get(tp, 0), record.offset + 1)
        batch.target = self.target
        self._inflight.append(batch)
        self.metrics.inflight.set(len(self._inflight))
        self.pipeline.submit(batch.items)
        for item in batch.items:
            if item.failed:
                log_event(log, "bad message", logging.WARNING, error_class=item.error_class,
                          reason=item.reason[:300], **item.describe())

    # ------------------------------------------------------------------ finalise
    def _finalise_ready(self) -> None:
        while self._inflight:
            batch = self._inflight[0]
            if batch.abandoned:
                self._drop_head("abandoned")
                continue
            if not batch.ready or not self._backoff.ready():
                return
            if self._switch is not None and batch.target.collection != self._switch.collection:
                return  # encoded for a collection that is no longer live: re-targeted once the switch is done
            if (self._stop_deadline is not None and self._last_stage == "store" and self._backoff.failures
                    and self._left_s(float("inf")) < self.settings.store.timeout_s):
                # Draining with the store down: one more write could block past the grace
                # (store.timeout_s); the batch stays uncommitted for the next owner instead.
                return
            try:
                self._finalise(batch)
            except _Transient as exc:
                self._last_failure = f"{exc.stage}: {exc.reason[:200]}"
                self._last_stage = exc.stage
                delay = self._backoff.failed()
                self.metrics.retries.labels(stage=exc.stage).inc()
                log_event(log, "transient failure, batch will be retried", logging.WARNING, stage=exc.stage,
                          batch=batch.id, retry_in_s=round(delay, 2), reason=exc.reason[:300])
                return
            self._backoff.succeeded()
            self._last_stage = ""
            self.metrics.batch_latency.observe(time.monotonic() - batch.polled_at)
            self._drop_head("committed")

    def _drop_head(self, outcome: str) -> None:
        self._inflight.popleft()
        self.metrics.batches.labels(outcome=outcome).inc()
        self.metrics.inflight.set(len(self._inflight))

    def _finalise(self, batch: Batch) -> None:
        if not batch.store_written:
            # Also after a re-target: its points are built again for the new version.
            self._write_points_check(batch)
            self._send_dlq(batch)
            batch.dlq_sent = True
            self._write_store(batch)
            batch.store_written = True
        self._commit(batch)

    def _write_points_check(self, batch: Batch) -> None:
        """Build every point now, so a point the store schema refuses goes to the DLQ
        with its message instead of failing the whole batch's write.

        A refused op is a failed op: the video falls back to its previous op in the
        batch (see batch.py), which may be an upsert that needs its point too, hence
        the loop until nothing new fails.
        """
        while True:
            upserts, _ = batch.final_ops()
            refused = False
            for item in upserts:
                if item.points is not None:
                    continue
                try:
                    item.points = self._points(item)
                except ValueError as exc:
                    item.fail("bad_message" if "metadata" in str(exc) else "encode_failed", str(exc)[:1000])
                    refused = True
            if not refused:
                return

    def _points(self, item: Item) -> list[Any]:
        """One point per segment (one for a short video), all with one ``ingested_at``."""
        from vidsearch.store import build_payload

        op, encoded, target = item.op, item.encoded, item.batch.target
        payload = build_payload(op.video_id, op.uri, op.metadata, encoded.timestamps, encoded.duration_s,
                                target.frame_encoder, target.version)
        payload.update({"width": encoded.width, "height": encoded.height, "fps": encoded.fps,
                        "codec": encoded.codec})
        if target.info.region_encoder is not None and encoded.regions is not None:
            payload[REGION_ENCODER_FIELD] = target.info.region_encoder
        return encoded.points(op.video_id, payload)

    def _send_dlq(self, batch: Batch) -> None:
        """Publish the DLQ records of the batch's failed items.

        A record the broker refuses for good (a non-retriable error: too large for its
        limit, not authorised ...) is sent once more as the minimal record (size,
        sha256, source offset; no bytes of the message). If that is refused for good
        too, the message is logged and counted (``vidsearch_ingest_dlq_refused_total``)
        and committed with its batch: a non-retriable error is never retried forever.
        Retriable errors (timeouts, no leader) fail the batch transiently: retried.
        """
        failed = [item for item in batch.dlq_items() if not item.dlq_sent]
        if not failed:
            return
        errors = self._produce_dlq(failed)
        refused = [item for item, exc in errors.items() if exc is not None and not _retriable(exc)]
        for item in refused:
            item.dlq_minimal = True
            log_event(log, "broker refused the DLQ record for good; sending the minimal record", logging.WARNING,
                      error=_kafka_error(errors[item]), **item.describe())
        if refused:
            errors.update(self._produce_dlq(refused))
        transient: BaseException | None = None
        for item, exc in errors.items():
            if exc is None:
                item.dlq_sent = True
                self.metrics.dlq.labels(error_class=item.error_class).inc()
                log_event(log, "sent to DLQ", logging.WARNING, error_class=item.error_class,
                          reason=item.reason[:300], **item.describe())
            elif not _retriable(exc):
                item.dlq_sent = True  # given up: committed with its batch, never retried forever
                self.metrics.dlq_refused.labels(error_class=item.error_class).inc()
                log_event(log, "DLQ refused the message for good; it is committed without a DLQ record",
                          logging.ERROR, error_class=item.error_class, reason=item.reason[:300],
                          error=_kafka_error(exc), size=len(item.value or b""),
                          sha256=_sha256(item.value), **item.describe())
            else:
                transient = exc
        if transient is not None:
            raise _Transient("dlq", _kafka_error(transient))

    def _dlq_value(self, item: Item) -> bytes:
        args = (item.value, item.key, item.topic, item.partition, item.offset, item.error_class, item.reason)
        if item.dlq_minimal:
            return minimal_dlq_record(*args)
        return dlq_record(*args, keep_bytes=self.settings.ingest.dlq_value_bytes,
                          max_record_bytes=self.settings.broker.max_request_bytes)

    def _produce_dlq(self, items: list[Item]) -> dict[Item, BaseException | None]:
        """Send one record per item and wait (bounded) for the acks: item -> error or None."""
        from kafka.errors import KafkaError, KafkaTimeoutError

        out: dict[Item, BaseException | None] = {}
        futures = []
        for item in items:
            try:
                futures.append((item, self._producer.send(self.dlq_topic, key=dlq_key(item.key),
                                                           value=self._dlq_value(item))))
            except KafkaError as exc:  # e.g. no metadata within max_block_ms
                out[item] = exc
        timeout_s = self._left_s(self.settings.ingest.publish_timeout_s)
        try:
            self._producer.flush(timeout=max(timeout_s, 0.01))
        except KafkaError:
            pass  # what was not acknowledged shows in its future below
        for item, future in futures:
            if not future.is_done:
                out[item] = KafkaTimeoutError(f"not acknowledged within {timeout_s:.1f}s")
            else:
                out[item] = future.exception if future.failed() else None
        return out

    def _write_store(self, batch: Batch) -> None:
        from vidsearch.store import CollectionNotFound, StoreError, StoreUnavailable

        upserts, deletes = batch.final_ops()
        target = batch.target
        try:
            if upserts:
                # Every segment of each video; the store then trims segments a longer
                # earlier version of a video left (see VectorStore.upsert).
                self._store.upsert(target.collection, [p for item in upserts for p in item.points])
            if deletes:
                ids = [item.op.video_id for item in deletes]
                self._store.delete(target.collection, ids)
                self._delete_from_previous(target, ids)
        except CollectionNotFound as exc:
            # Someone dropped the collection under us: recreate it, then retry the batch.
            try:
                self._store.ensure_collection(target.collection, target.info.embed_dim, target.info.embed_dim,
                                              target.info.region_dim)
            except StoreError:
                pass
            raise _Transient("store", str(exc)) from None
        except StoreUnavailable as exc:
            raise _Transient("store", str(exc)) from None
        except StoreError as exc:
            # Not a connectivity problem, but the store refused the write: nothing is
            # committed and the batch is retried; a persistent refusal shows in the
            # logs and the retry counter instead of silently dropping videos.
            raise _Transient("store", f"store refused the write: {exc}") from None
        if upserts:
            self.metrics.videos_ingested.labels(op="upsert").inc(len(upserts))
        if deletes:
            self.metrics.videos_ingested.labels(op="delete").inc(len(deletes))
        log_event(log, "batch stored", logging.DEBUG, batch=batch.id, upserts=len(upserts), deletes=len(deletes))

    def _delete_from_previous(self, target: EncodeTarget, video_ids: list[str]) -> None:
        """Deletes also reach the collection written before the last switch: a re-index
        catching up late writes from it, or a rollback to it, must not bring them back."""
        from vidsearch.store import CollectionNotFound

        previous = self.previous_collection
        if previous is None or previous == target.collection:
            return
        try:
            self._store.delete(previous, video_ids)
        except CollectionNotFound:
            self.previous_collection = None  # dropped by retention: nothing to keep in step

    def _commit(self, batch: Batch) -> None:
        from kafka import TopicPartition
        from kafka.errors import KafkaError
        from kafka.structs import OffsetAndMetadata

        offsets = {TopicPartition(topic, partition): OffsetAndMetadata(offset, "", -1)
                   for (topic, partition), offset in batch.commit_offsets().items()}
        if not offsets:
            return
        try:
            # Bounded like a DLQ publish: without a timeout a commit waits for a coordinator
            # forever when the broker is gone, and SIGTERM's grace with it.
            timeout_s = self._left_s(self.settings.ingest.publish_timeout_s)
            self._consumer.commit(offsets, timeout_ms=max(int(timeout_s * 1000), 10))
        except KafkaError as exc:
            # CommitFailed / rebalance in progress: the next poll rejoins and the revoke
            # listener abandons this batch if its partitions moved; otherwise retry.
            raise _Transient("commit", f"{type(exc).__name__}: {exc}") from None
        now = time.monotonic()
        for tp, meta in offsets.items():
            key = (tp.topic, tp.partition)
            self._commit_floor[key] = max(self._commit_floor.get(key, 0), meta.offset)
            self._progress_at[key] = now
        log_event(log, "batch committed", logging.DEBUG, batch=batch.id, records=len(batch.items),
                  offsets={f"{t.topic}[{t.partition}]": o.offset for t, o in offsets.items()})

    # ------------------------------------------------------------------ rebalance
    def on_revoked(self, partitions: set[Any]) -> None:
        revoked = {(tp.topic, tp.partition) for tp in partitions}
        self.assignment -= revoked
        for tp in revoked:  # a partition that comes back starts its bookkeeping afresh
            for table in (self._commit_floor, self._polled_end, self._progress_at):
                table.pop(tp, None)
            self._set_stalled(tp, False)
        abandoned = 0
        for batch in self._inflight:
            hit = batch.partitions() & revoked
            if hit:
                batch.revoked |= hit
                for item in batch.items:
                    if item.tp in hit:
                        abandoned += 1
                        self._rewind[item.tp] = min(item.offset, self._rewind.get(item.tp, item.offset))
        self.pipeline.drop_revoked()
        # A finished batch whose partitions are all gone is removed at once; a partly
        # revoked one is finalised later with only its remaining partitions.
        while self._inflight and self._inflight[0].abandoned:
            self._drop_head("abandoned")
        self._inflight = deque(b for b in self._inflight if not b.abandoned)
        self.metrics.inflight.set(len(self._inflight))
        self._backoff.succeeded()  # a fresh assignment starts without the old batch's backoff
        log_event(log, "partitions revoked", partitions=sorted(revoked), abandoned_records=abandoned)

    def on_assigned(self, partitions: set[Any]) -> None:
        self.assignment |= {(tp.topic, tp.partition) for tp in partitions}
        # kafka-python keeps the fetch position of a partition that comes straight back
        # to this member, which is past the records of the batches abandoned on revoke:
        # they would be skipped, then committed over. Read them again instead.
        for tp in partitions:
            offset = self._rewind.get((tp.topic, tp.partition))
            if offset is not None:
                self._consumer.seek(tp, offset)
        self._rewind.clear()  # a partition that went elsewhere restarts from its committed offset
        if self._paused and partitions:
            # Still at the in-flight limit: don't let the new partitions deliver records yet.
            self._consumer.pause(*partitions)
        log_event(log, "partitions assigned", partitions=sorted(self.assignment))

    # ------------------------------------------------------------------ observability
    def _refresh_lag(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now < self._next_lag:
            return
        self._next_lag = now + min(LAG_REFRESH_S, self.settings.ingest.log_summary_interval_s)
        assigned = list(self._consumer.assignment() or [])
        if not assigned:
            self.metrics.set_lag({})
            return
        try:
            listed = self._consumer.end_offsets(assigned, timeout_ms=2000)
            lags = {}
            for tp in assigned:
                position = self._consumer.position(tp, timeout_ms=1000)
                # Two views of the end offset, both lower bounds: the highwater of the last
                # fetch (stale while paused) and ListOffsets (Tansu answers the last record
                # batch's base offset + 1 there, short of the end for multi-record batches).
                end = max(self._consumer.highwater(tp) or 0, listed.get(tp) or 0)
                key = (tp.topic, tp.partition)
                # Counted from the first offset not committed: records polled but still in
                # flight (or stuck behind a failing step) are lag, not progress.
                floor = self._commit_floor.get(key, position)
                if floor is not None:
                    lags[key] = max(0, max(end, self._polled_end.get(key, 0)) - floor)
        except Exception as exc:  # noqa: BLE001 - metrics must never stop ingestion
            log_event(log, "lag refresh failed", logging.DEBUG, error=str(exc))
            return
        self.metrics.set_lag(lags)

    def _check_stalls(self) -> None:
        """A partition with uncommitted work and no commit for ``ingest.stall_after_s``
        is stalled: the gauge goes to 1 and one log line names the partition, the
        offset it is stuck at and the last transient failure."""
        now = time.monotonic()
        limit = self.settings.ingest.stall_after_s
        for tp, end in self._polled_end.items():
            floor = self._commit_floor.get(tp, end)
            stuck = end > floor and now - self._progress_at.get(tp, now) >= limit
            if stuck and tp not in self._stalled:
                log_event(log, "partition stalled", logging.WARNING, topic=tp[0], partition=tp[1], offset=floor,
                          uncommitted=end - floor, stalled_s=round(now - self._progress_at[tp], 1),
                          last_failure=self._last_failure or None)
            elif not stuck and tp in self._stalled:
                log_event(log, "partition progressing again", topic=tp[0], partition=tp[1], offset=floor)
            self._set_stalled(tp, stuck)

    def _set_stalled(self, tp: tuple[str, int], stalled: bool) -> None:
        if stalled == (tp in self._stalled):
            return
        if stalled:
            self._stalled.add(tp)
            self.metrics.stalled.labels(topic=tp[0], partition=str(tp[1])).set(1)
        else:
            self._stalled.discard(tp)
            self.metrics.stalled.remove(tp[0], str(tp[1]))

    @property
    def stalled_partitions(self) -> set[tuple[str, int]]:
        return set(self._stalled)

    def committed(self) -> dict[tuple[str, int], int | None]:
        """Committed offsets of the assigned partitions (for tests and operators)."""
        from kafka import TopicPartition

        return {tp: self._consumer.committed(TopicPartition(*tp)) for tp in sorted(self.assignment)}

    @property
    def inflight_batches(self) -> int:
        return len(self._inflight)


def _retriable(exc: BaseException) -> bool:
    """Worth retrying: anything but a broker's (or the client's own) definite refusal.
    Connection trouble and timeouts are retriable; "message too large", "not
    authorised", "invalid topic" are not."""
    from kafka.errors import BrokerResponseError

    return not isinstance(exc, BrokerResponseError) or bool(getattr(exc, "retriable", False))


def _kafka_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:300]}"


def _sha256(value: bytes | None) -> str | None:
    import hashlib

    return None if value is None else hashlib.sha256(bytes(value)).hexdigest()


def _listener_class() -> type:
    # kafka-python insists on a ConsumerRebalanceListener subclass; imported lazily
    # like the rest of kafka-python so that `vidsearch --help` stays fast.
    from kafka import ConsumerRebalanceListener

    class _Listener(ConsumerRebalanceListener):
        """Forwards rebalance events to the worker."""

        def __init__(self, worker: IngestWorker) -> None:
            self.worker = worker

        def on_partitions_revoked(self, revoked: set[Any]) -> None:
            self.worker.on_revoked(set(revoked))

        def on_partitions_lost(self, lost: set[Any]) -> None:
            # Evicted from the group: handled like a revoke (nothing of it is committed).
            self.worker.on_revoked(set(lost))

        def on_partitions_assigned(self, assigned: set[Any]) -> None:
            self.worker.on_assigned(set(assigned))

    return _Listener
