"""Prometheus metrics of one ingest worker, and the periodic log summary.

Each worker owns a private ``CollectorRegistry`` rather than the process-wide
default: two workers in one process (tests, or an operator running a small
pool) would otherwise collide on metric names, and a test can read exactly the
counters of the worker it drives.
"""
from __future__ import annotations

import logging
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from vidsearch.telemetry import log_event

log = logging.getLogger(__name__)

# Batch latency spans a tiny model on a CPU (well under a second) to a cold
# GPU actor with a full batch of long videos (minutes).
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class IngestMetrics:
    """Counters, histogram and gauges of the ingest pipeline."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.videos_ingested = Counter(
            "vidsearch_ingest_videos_total", "Ops applied to the vector store, by op",
            ["op"], registry=r)
        self.frames_encoded = Counter(
            "vidsearch_ingest_frames_encoded_total", "Frames encoded by the frame-encoder actors",
            registry=r)
        self.dlq = Counter(
            "vidsearch_ingest_dlq_total", "Messages sent to the dead-letter topic, by error class",
            ["error_class"], registry=r)
        self.retries = Counter(
            "vidsearch_ingest_retries_total", "Transient failures that were retried, by stage",
            ["stage"], registry=r)
        self.batches = Counter(
            "vidsearch_ingest_batches_total", "Poll batches by outcome (committed or abandoned)",
            ["outcome"], registry=r)
        self.batch_latency = Histogram(
            "vidsearch_ingest_batch_seconds", "Poll to commit latency of one batch",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.inflight = Gauge(
            "vidsearch_ingest_inflight_batches", "Batches polled but not yet committed", registry=r)
        self.lag = Gauge(
            "vidsearch_ingest_consumer_lag", "End offset minus consumer position, per assigned partition",
            ["topic", "partition"], registry=r)
        self.dlq_refused = Counter(
            "vidsearch_ingest_dlq_refused_total", "Bad messages whose DLQ record the broker refused for good "
            "(non-retriable); logged with their source offset, sha256 and size, then committed",
            ["error_class"], registry=r)
        self.stalled = Gauge(
            "vidsearch_ingest_partition_stalled", "1 while a partition has work and no commit for "
            "ingest.stall_after_s", ["topic", "partition"], registry=r)
        self._http_port: int | None = None
        self._http_server: Any = None

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        """Expose /metrics on ``host:port`` (0 = off) until :meth:`close`; loopback
        unless ``ingest.metrics_host`` says otherwise."""
        if port:
            self._http_server, _thread = start_http_server(port, addr=host, registry=self.registry)
            self._http_port = port
            log_event(log, "metrics endpoint up", host=host, port=port)

    def close(self) -> None:
        """Stop the /metrics endpoint and free its port (a worker started again in the
        same process would otherwise fail to bind it)."""
        server, self._http_server = self._http_server, None
        if server is not None:
            server.shutdown()
            server.server_close()
            log_event(log, "metrics endpoint down", port=self._http_port)

    def set_lag(self, lags: dict[tuple[str, int], int]) -> None:
        """Replace the lag gauges: partitions no longer assigned disappear from the output."""
        self.lag.clear()
        for (topic, partition), value in lags.items():
            self.lag.labels(topic=topic, partition=str(partition)).set(value)

    def value(self, name: str, **labels: str) -> float:
        """Current value of a sample (0 when absent); for the summary and for tests."""
        got = self.registry.get_sample_value(name, labels or None)
        return float(got) if got is not None else 0.0

    def total(self, metric_name: str) -> float:
        """Sum of a counter over all of its label values."""
        total = 0.0
        for metric in self.registry.collect():
            for sample in metric.samples:
                if sample.name == metric_name:
                    total += sample.value
        return total

    def snapshot(self) -> dict[str, Any]:
        """The headline numbers, for the periodic log line."""
        lag_total = 0.0
        for metric in self.registry.collect():
            if metric.name == "vidsearch_ingest_consumer_lag":
                lag_total = sum(s.value for s in metric.samples)
        return {
            "upserted": int(self.value("vidsearch_ingest_videos_total", op="upsert")),
            "deleted": int(self.value("vidsearch_ingest_videos_total", op="delete")),
            "frames": int(self.value("vidsearch_ingest_frames_encoded_total")),
            "dlq": int(self.total("vidsearch_ingest_dlq_total")),
            "retries": int(self.total("vidsearch_ingest_retries_total")),
            "committed_batches": int(self.value("vidsearch_ingest_batches_total", outcome="committed")),
            "abandoned_batches": int(self.value("vidsearch_ingest_batches_total", outcome="abandoned")),
            "inflight": int(self.value("vidsearch_ingest_inflight_batches")),
            "lag": int(lag_total),
            "stalled_partitions": int(self.total("vidsearch_ingest_partition_stalled")),
        }


class SummaryLogger:
    """Logs :meth:`IngestMetrics.snapshot` at most every ``interval_s`` seconds."""

    def __init__(self, metrics: IngestMetrics, interval_s: float) -> None:
        self.metrics = metrics
        self.interval_s = interval_s
        self._next = time.monotonic() + interval_s

    def maybe_log(self, force: bool = False) -> bool:
        now = time.monotonic()
        if not force and now < self._next:
            return False
        self._next = now + self.interval_s
        log_event(log, "ingest summary", **self.metrics.snapshot())
        return True
