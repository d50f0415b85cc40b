"""The ingress's circuit breaker around the Reranker application.

Without it, while the reranker is down (its replica died and Serve is restarting
it, or every call fails) each search waits out its rerank share of the deadline
before answering recall-only. With it an outage costs the searches almost no time:

- **Adaptive timeout.** A call gives up after ``serve.rerank_breaker_timeout_multiplier``
  times the slowest of the last ``serve.rerank_breaker_latency_window`` successful calls
  (at least ``serve.rerank_breaker_timeout_floor_s``, at most the call's share of the
  deadline), so a call to a replica that died without a word waits a small multiple of
  a normal answer, not seconds.
- **One failure opens it for everyone.** One failure or timeout
  (``serve.rerank_breaker_failures``) opens the breaker, and the calls already waiting
  on the reranker are released at once (they race their answer against the breaker's
  "opened" signal) and answer recall-only too: they do not each wait out their timeout.
- **Background probe.** While open, searches only read the state (``reranked=false``,
  reason ``circuit_open``); after the back-off window a background task of the ingress,
  never a user's search, probes the reranker with the last search's request and closes
  the breaker when it answers.

The state machine is :mod:`vidsearch.circuit_breaker`; this module maps the settings
onto it, logs its transitions and exports it as Serve metrics, which Ray serves on each
node's metrics port next to Serve's own request metrics (Prometheus names
``ray_vidsearch_query_rerank_breaker_*``).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any, Awaitable, Callable

from vidsearch.circuit_breaker import BreakerPolicy, BreakerSnapshot, BreakerState, CircuitBreaker, Clock, Permit
from vidsearch.config import ServeSettings
from vidsearch.telemetry import log_event

log = logging.getLogger(__name__)

# Extra time a probe keeps its slot beyond its own timeout, so that the lease never
# expires while the probe's own wait_for is still about to report.
PROBE_LEASE_GRACE_S = 5.0
# How long the prober waits before looking again when its look found nothing to do
# (another prober's probe in flight, or a clock that says the window is not over yet).
PROBER_IDLE_S = 0.05

# probe(timeout_s): send one reranker request, return when it answered, raise when it failed
# or took longer than timeout_s.
Probe = Callable[[float], Awaitable[Any]]


class BreakerOpened(Exception):
    """The breaker opened while this call waited: another call found the reranker down."""


def describe_error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class RerankGuard:
    """One reranker call the breaker let through (or any call, with the breaker off)."""

    def __init__(self, permit: Permit | None, settings: ServeSettings, owner: "RerankBreaker") -> None:
        self._permit = permit
        self._settings = settings
        self._owner = owner
        self._started = owner.now()
        self._open = permit is not None
        if self._open:
            owner.in_flight += 1
        # Whether the adaptive timeout (not the client's deadline) bounded this call: then a
        # timeout is evidence against the reranker however short it was.
        self.adaptive = False
        self._version: str | None = None

    @property
    def is_probe(self) -> bool:
        return self._permit is not None and self._permit.is_probe

    def timeout(self, budget_s: float, version: str | None = None) -> float:
        """How long this call may wait: its share of the deadline, cut to the adaptive timeout
        (which knows only the model version its recent answers were for)."""
        self._version = version
        adaptive = self._owner.adaptive_timeout_s(version) if self._permit is not None else None
        if adaptive is not None and adaptive < budget_s:
            self.adaptive = True
            return adaptive
        return budget_s

    async def race(self, answer: Awaitable[Any], timeout_s: float) -> Any:
        """The reranker's answer, or asyncio.TimeoutError after ``timeout_s``, or
        :class:`BreakerOpened` as soon as the breaker opens (another call failed)."""
        task = asyncio.ensure_future(answer)
        # A task given up on may still end with an error: retrieve it, so asyncio does not log it.
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        if self._permit is None:
            return await asyncio.wait_for(task, timeout=timeout_s)
        opened = self._owner.opened_signal()
        if opened is None:  # it opened between admit() and now
            task.cancel()
            raise BreakerOpened()
        waiter = asyncio.ensure_future(opened.wait())
        try:
            done, _ = await asyncio.wait({task, waiter}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if task in done:
            return task.result()
        task.cancel()
        if waiter in done:
            raise BreakerOpened()
        raise asyncio.TimeoutError()

    def succeeded(self) -> None:
        if self._permit is not None:
            self._owner.record_latency(self._owner.now() - self._started, self._version)
            self._permit.succeeded()
            self._owner.sync_metrics()

    def failed(self, exc: BaseException, budget_s: float) -> None:
        if self._permit is None:
            return
        if isinstance(exc, BreakerOpened):
            self._permit.release()  # released by another call's failure: that one was counted
            self._owner.count_released()
            return
        if isinstance(exc, asyncio.TimeoutError) and not self.adaptive \
                and budget_s < self._settings.rerank_breaker_min_timeout_s:
            # The client left the reranker too little time: no evidence either way.
            self._permit.release()
            return
        self._permit.failed(describe_error(exc))
        # Below the threshold a failure moves no state, but the failure count is news.
        self._owner.sync_metrics()

    def release(self) -> None:
        """End the call without a verdict if none was given (cancelled, or no time left)."""
        if self._permit is not None:
            self._permit.release()
        if self._open:
            self._open = False
            self._owner.in_flight -= 1


class RerankBreaker:
    """The breaker of one ingress replica: ``admit()`` before each reranker call, and a
    background prober (``probe``) that closes it again."""

    def __init__(self, settings: ServeSettings, *, probe: Probe | None = None, clock: Clock = time.monotonic,
                 export_metrics: bool = True) -> None:
        self._settings = settings
        self.enabled = settings.rerank_breaker_enabled
        policy = BreakerPolicy(
            failure_threshold=settings.rerank_breaker_failures,
            backoff_s=settings.rerank_breaker_backoff_s,
            backoff_max_s=settings.rerank_breaker_backoff_max_s,
            backoff_multiplier=2.0,
            probe_lease_s=settings.rerank_breaker_probe_timeout_s + PROBE_LEASE_GRACE_S)
        self._clock = clock
        self._probe = probe
        self._latencies: deque[float] = deque(maxlen=settings.rerank_breaker_latency_window)
        self._latency_version: str | None = None  # the model version the window's answers were for
        # Set when the breaker opens, so that the calls in flight give up together; a new one
        # for each closed period. Made on first use, inside the event loop that waits on it.
        self._opened: asyncio.Event | None = None
        self._opened_loop: asyncio.AbstractEventLoop | None = None
        self._prober: asyncio.Task[None] | None = None
        self._released = 0
        self._probes = 0
        self.in_flight = 0  # user calls admitted and not yet released (probes not counted)
        self._breaker = CircuitBreaker(policy, clock=clock, listener=self._on_transition)
        self._metrics = _BreakerMetrics() if export_metrics else None
        self.sync_metrics()

    def now(self) -> float:
        return self._clock()

    def admit(self) -> RerankGuard | None:
        """A guard for calling the reranker now, or None: answer recall-only without calling.
        A user's call never becomes the probe (the background prober makes it)."""
        if not self.enabled:
            return RerankGuard(None, self._settings, self)
        permit = self._breaker.try_acquire(allow_probe=self._probe is None)
        if permit is None:
            if self._metrics is not None:
                self._metrics.short_circuited()
            self.ensure_prober()
            return None
        return RerankGuard(permit, self._settings, self)

    # ------------------------------------------------------------------ adaptive timeout
    def record_latency(self, seconds: float, version: str | None = None) -> None:
        """One successful call's latency. A call for another model version than the window's
        starts the window over: after an alias flip the reranker loads and warms the new
        version, and its first answers are no outage (measured: with one window for all
        versions, a flip under load opened the breaker and answered 36 searches recall-only)."""
        if version is not None and version != self._latency_version:
            self._latencies.clear()
            self._latency_version = version
        self._latencies.append(max(seconds, 0.0))

    def adaptive_timeout_s(self, version: str | None = None) -> float | None:
        """k x the slowest recent successful call (at least the floor), or None while too
        few calls (for ``version``, when given) have succeeded to say what normal is."""
        if version is not None and version != self._latency_version:
            return None
        if len(self._latencies) < self._settings.rerank_breaker_latency_min_samples:
            return None
        return max(self._settings.rerank_breaker_timeout_floor_s,
                   self._settings.rerank_breaker_timeout_multiplier * max(self._latencies))

    # ------------------------------------------------------------------ in-flight release
    def opened_signal(self) -> asyncio.Event | None:
        """The event set when the breaker next opens, or None if it is not closed now."""
        if self._breaker.snapshot().state is not BreakerState.CLOSED:
            return None
        loop = asyncio.get_running_loop()
        if self._opened is None or self._opened_loop is not loop:
            self._opened, self._opened_loop = asyncio.Event(), loop
        return self._opened

    def count_released(self) -> None:
        self._released += 1

    def _signal_opened(self) -> None:
        event, loop = self._opened, self._opened_loop
        self._opened = self._opened_loop = None
        if event is None or loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            event.set()
        else:  # reported from another thread: asyncio.Event is not thread-safe
            loop.call_soon_threadsafe(event.set)

    # ------------------------------------------------------------------ background probe
    def ensure_prober(self) -> None:
        """Start the background prober if the breaker is not closed and none runs. Needs a
        running event loop (the ingress's); without one (a synchronous caller) it does nothing
        and the next call from the loop starts it."""
        if self._probe is None or (self._prober is not None and not self._prober.done()):
            return
        if self._breaker.snapshot().state is BreakerState.CLOSED:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._prober = loop.create_task(self._probe_until_closed())

    async def _probe_until_closed(self) -> None:
        assert self._probe is not None
        while True:
            snap = self._breaker.snapshot()
            if snap.state is BreakerState.CLOSED:
                return
            if snap.retry_in_s > 0:
                await asyncio.sleep(snap.retry_in_s)
                continue
            permit = self._breaker.try_acquire(allow_probe=True)
            if permit is None or not permit.is_probe:
                if permit is not None:
                    permit.release()
                await asyncio.sleep(PROBER_IDLE_S)
                continue
            await self._probe_once(permit)

    async def _probe_once(self, permit: Permit) -> None:
        assert self._probe is not None
        self._probes += 1
        started = self._clock()
        try:
            await self._probe(self._settings.rerank_breaker_probe_timeout_s)
        except asyncio.CancelledError:
            permit.release()
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of the probe means still down
            permit.failed(describe_error(exc))
            log_event(log, "reranker probe failed", logging.WARNING, error=describe_error(exc))
        else:
            # Its latency counts: a reranker that came back slower than before (a loaded node)
            # must not have every call time out against the old, faster normal.
            self.record_latency(self._clock() - started)
            permit.succeeded()
        finally:
            permit.release()
            self.sync_metrics()

    # ------------------------------------------------------------------ reporting
    def sync_metrics(self) -> None:
        if self._metrics is not None:
            self._metrics.update(self._breaker.snapshot())

    def snapshot(self) -> dict[str, Any]:
        """The breaker's state for stats() and `vidsearch status`."""
        snap = self._breaker.snapshot().as_dict()
        snap["enabled"] = self.enabled
        snap["retry_in_s"] = round(snap["retry_in_s"], 3)
        adaptive = self.adaptive_timeout_s()
        snap["adaptive_timeout_s"] = None if adaptive is None else round(adaptive, 4)
        snap["latency_samples"] = len(self._latencies)
        snap["released_total"] = self._released  # in-flight calls given up when it opened
        snap["probes_total"] = self._probes  # background probes sent
        snap["in_flight"] = self.in_flight
        return snap

    def _on_transition(self, before: BreakerState, after: BreakerState, snap: BreakerSnapshot) -> None:
        if self._metrics is not None:
            self._metrics.update(snap)
        if after is BreakerState.OPEN:
            self._signal_opened()
            log_event(log, "reranker breaker open: answering recall-only", logging.WARNING, was=before.value,
                      consecutive_failures=snap.consecutive_failures, last_error=snap.last_error,
                      probe_in_s=round(snap.backoff_s, 3))
            self.ensure_prober()
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
