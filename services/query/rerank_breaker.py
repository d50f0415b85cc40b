"""The ingress's circuit breaker around the Reranker application.

Without it, while the reranker is down (its replica died and Serve is restarting
it, or every call fails) each search waits out its rerank share of the deadline
before answering recall-only. With it, one failure or timeout
(``serve.rerank_breaker_failures``) opens the breaker: searches answer
recall-only at once (``reranked=false``, reason ``circuit_open``) for a back-off
window, then one search probes the reranker, and its answer closes the breaker
again. The state machine is :mod:`vidsearch.circuit_breaker`; this module maps
the settings onto it, logs its transitions and exports it as Serve metrics, which
Ray serves on each node's metrics port next to Serve's own request metrics
(Prometheus names ``ray_vidsearch_query_rerank_breaker_*``).
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from vidsearch.circuit_breaker import BreakerPolicy, BreakerSnapshot, BreakerState, CircuitBreaker, Clock, Permit
from vidsearch.config import ServeSettings
from vidsearch.telemetry import log_event

log = logging.getLogger(__name__)

# Extra time a probe keeps its slot beyond its own timeout, so that the lease never
# expires while the probe's own wait_for is still about to report.
PROBE_LEASE_GRACE_S = 5.0


class RerankGuard:
    """One reranker call the breaker let through (or any call, with the breaker off)."""

    def __init__(self, permit: Permit | None, settings: ServeSettings, owner: "RerankBreaker") -> None:
        self._permit = permit
        self._settings = settings
        self._owner = owner

    @property
    def is_probe(self) -> bool:
        return self._permit is not None and self._permit.is_probe

    def budget(self, budget_s: float) -> float:
        """The time this call may take: a probe waits at most rerank_breaker_probe_timeout_s,
        so a reranker that is still down costs that one search little."""
        return min(budget_s, self._settings.rerank_breaker_probe_timeout_s) if self.is_probe else budget_s

    def succeeded(self) -> None:
        if self._permit is not None:
            self._permit.succeeded()
            self._owner.sync_metrics()

    def failed(self, exc: BaseException, budget_s: float) -> None:
        if self._permit is None:
            return
        if isinstance(exc, asyncio.TimeoutError) and budget_s < self._settings.rerank_breaker_min_timeout_s:
            # The client left the reranker too little time: no evidence either way.
            self._permit.release()
            return
        text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        self._permit.failed(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)
        # Below the threshold a failure moves no state, but the failure count is news.
        self._owner.sync_metrics()

    def release(self) -> None:
        """End the call without a verdict if none was given (cancelled, or no time left)."""
        if self._permit is not None:
            self._permit.release()


class RerankBreaker:
    """The breaker of one ingress replica: ``admit()`` before each reranker call."""

    def __init__(self, settings: ServeSettings, *, clock: Clock = time.monotonic, export_metrics: bool = True) -> None:
        self._settings = settings
        self.enabled = settings.rerank_breaker_enabled
        policy = BreakerPolicy(
            failure_threshold=settings.rerank_breaker_failures,
            backoff_s=settings.rerank_breaker_backoff_s,
            backoff_max_s=settings.rerank_breaker_backoff_max_s,
            backoff_multiplier=2.0,
            probe_lease_s=settings.rerank_breaker_probe_timeout_s + PROBE_LEASE_GRACE_S)
        self._breaker = CircuitBreaker(policy, clock=clock, listener=self._on_transition)
        self._metrics = _BreakerMetrics() if export_metrics else None
        self.sync_metrics()

    def admit(self) -> RerankGuard | None:
        """A guard for calling the reranker now, or None: answer recall-only without calling."""
        if not self.enabled:
            return RerankGuard(None, self._settings, self)
        permit = self._breaker.try_acquire()
        if permit is None:
            if self._metrics is not None:
                self._metrics.short_circuited()
            return None
        return RerankGuard(permit, self._settings, self)

    def sync_metrics(self) -> None:
        if self._metrics is not None:
            self._metrics.update(self._breaker.snapshot())

    def snapshot(self) -> dict[str, Any]:
        """The breaker's state for stats() and `vidsearch status`."""
        snap = self._breaker.snapshot().as_dict()
        snap["enabled"] = self.enabled
        snap["retry_in_s"] = round(snap["retry_in_s"], 3)
        return snap

    def _on_transition(self, before: BreakerState, after: BreakerState, snap: BreakerSnapshot) -> None:
        if self._metrics is not None:
            self._metrics.update(snap)
        if after is BreakerState.OPEN:
            log_event(log, "reranker breaker open: answering recall-only", logging.WARNING, was=before.value,
                      consecutive_failures=snap.consecutive_failures, last_error=snap.last_error,
                      probe_in_s=round(snap.backoff_s, 3))
        elif after is BreakerState.HALF_OPEN:
            log_event(log, "reranker breaker half-open: one probe call",
                      consecutive_failures=snap.consecutive_failures)
        else:
            log_event(log, "reranker breaker closed: re-ranking again",
                      short_circuited_total=snap.short_circuited_total)


class _BreakerMetrics:
    """Serve metrics (Ray's metrics agent exports them with a ``ray_`` prefix, tagged
    with the deployment, replica and application): one gauge per state (1 for the
    current one, the Prometheus way to export an enum), the consecutive failures, and
    a counter of searches answered recall-only without calling."""

    def __init__(self) -> None:
        from ray.serve import metrics

        self._state = metrics.Gauge("vidsearch_query_rerank_breaker_state",
                                    "1 for the reranker circuit breaker's current state (closed, open, half_open)",
                                    tag_keys=("state",))
        self._failures = metrics.Gauge("vidsearch_query_rerank_breaker_consecutive_failures",
                                       "consecutive reranker failures or timeouts seen by the breaker")
        self._short = metrics.Counter("vidsearch_query_rerank_short_circuits",
                                      "searches answered recall-only because the reranker breaker was open")

    def update(self, snap: BreakerSnapshot) -> None:
        for state in BreakerState:
            self._state.set(1.0 if state is snap.state else 0.0, tags={"state": state.value})
        self._failures.set(float(snap.consecutive_failures))

    def short_circuited(self) -> None:
        self._short.inc()
