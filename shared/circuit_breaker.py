"""A circuit breaker for calls to a dependency that may be down.

While a dependency is healthy every call goes through (``closed``). After
``failure_threshold`` consecutive failures the breaker ``open``\\s: callers are
refused at once, without calling, for a back-off window. When the window has
passed, exactly one caller is let through as a probe (``half_open``); the others
are still refused. The probe's success closes the breaker; its failure opens it
again with the window multiplied by ``backoff_multiplier`` (capped at
``backoff_max_s``), so a dependency that stays down is probed less and less often.

Why outcomes carry a generation: calls admitted before the breaker opened may
finish after it. Their results say nothing about the dependency *now* (a late
success must not close a breaker a later failure opened, a late failure must not
lengthen the window a second time), so they are ignored.

The state lives behind a ``threading.Lock`` whose critical sections never block or
await: the breaker can be used from asyncio code and from threads alike. The
clock is injectable so that tests drive time by hand.
"""
from __future__ import annotations

import enum
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

Clock = Callable[[], float]


class BreakerState(str, enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True)
class BreakerPolicy:
    """When to open, how long to stay open, and how long a probe may hold its slot."""

    failure_threshold: int = 1
    backoff_s: float = 2.0
    backoff_max_s: float = 30.0
    backoff_multiplier: float = 2.0
    # A probe that has not reported after this long is taken as failed, so a caller that
    # never reports (a bug, a cancelled task that skipped its clean-up) cannot keep the
    # breaker half-open for ever.
    probe_lease_s: float = 30.0

    def __post_init__(self) -> None:
        if self.failure_threshold < 1:
            raise ValueError(f"failure_threshold must be >= 1 (got {self.failure_threshold})")
        if not self.backoff_s > 0:
            raise ValueError(f"backoff_s must be > 0 (got {self.backoff_s})")
        if not self.backoff_max_s >= self.backoff_s:
            raise ValueError(f"backoff_max_s must be >= backoff_s (got {self.backoff_max_s} < {self.backoff_s})")
        if not self.backoff_multiplier >= 1:
            raise ValueError(f"backoff_multiplier must be >= 1 (got {self.backoff_multiplier})")
        if not self.probe_lease_s > 0:
            raise ValueError(f"probe_lease_s must be > 0 (got {self.probe_lease_s})")


@dataclass(frozen=True)
class BreakerSnapshot:
    """The breaker at one instant (for metrics, logs, status and tests)."""

    state: BreakerState
    consecutive_failures: int
    last_error: str | None
    backoff_s: float  # the current window when open, else the one the next opening starts with
    retry_in_s: float  # open: seconds until a probe may go; otherwise 0
    admitted_total: int  # calls let through (probes included)
    short_circuited_total: int  # calls refused without calling
    opened_total: int  # times it went to open (from closed or from a failed probe)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["state"] = self.state.value
        return out


Listener = Callable[[BreakerState, BreakerState, BreakerSnapshot], None]


class Permit:
    """One admitted call. Report its outcome once with :meth:`succeeded` or
    :meth:`failed`; :meth:`release` (safe to call always, e.g. in ``finally``) ends a
    call that has no verdict, such as one cancelled or given no time, without
    counting it either way."""

    __slots__ = ("_breaker", "_generation", "is_probe", "_done")

    def __init__(self, breaker: "CircuitBreaker", generation: int, is_probe: bool) -> None:
        self._breaker = breaker
        self._generation = generation
        self.is_probe = is_probe
        self._done = False

    def succeeded(self) -> None:
        self._finish("success", None)

    def failed(self, error: str) -> None:
        self._finish("failure", error)

    def release(self) -> None:
        self._finish("release", None)

    def _finish(self, outcome: str, error: str | None) -> None:
        if self._done:
            return
        self._done = True
        self._breaker._report(self, outcome, error)


class CircuitBreaker:
    def __init__(self, policy: BreakerPolicy | None = None, *, clock: Clock = time.monotonic,
                 listener: Listener | None = None) -> None:
        self.policy = policy or BreakerPolicy()
        self._clock = clock
        self._listener = listener
        self._lock = threading.Lock()
        self._state = BreakerState.CLOSED
        # Bumped on every transition: a permit from an older generation is stale.
        self._generation = 0
        self._failures = 0
        self._last_error: str | None = None
        self._backoff_s = self.policy.backoff_s
        self._opened_at = 0.0
        self._probe_since: float | None = None  # half-open: when the outstanding probe left
        self._admitted = 0
        self._short_circuited = 0
        self._opened = 0

    # ------------------------------------------------------------------ callers
    def try_acquire(self, *, allow_probe: bool = True) -> Permit | None:
        """A permit to call now, or None: the caller must not call (short circuit).

        ``allow_probe=False`` is for callers that must never be the probe (a user's request
        when a background task does the probing): they get a permit only while closed, and
        they do not move an open breaker to half-open."""
        with self._lock:
            now = self._clock()
            transitions = []
            if self._state is BreakerState.HALF_OPEN and self._probe_since is not None \
                    and now - self._probe_since >= self.policy.probe_lease_s:
                self._failures += 1
                transitions.append(self._open_locked(now, "probe did not report within its lease", longer=True))
            if allow_probe and self._state is BreakerState.OPEN and now - self._opened_at >= self._backoff_s:
                transitions.append(self._move_locked(BreakerState.HALF_OPEN))
            if self._state is BreakerState.CLOSED:
                permit: Permit | None = Permit(self, self._generation, is_probe=False)
            elif allow_probe and self._state is BreakerState.HALF_OPEN and self._probe_since is None:
                self._probe_since = now
                permit = Permit(self, self._generation, is_probe=True)
            else:
                permit = None
            if permit is None:
                self._short_circuited += 1
            else:
                self._admitted += 1
            snapshot = self._snapshot_locked(now)
        self._notify(transitions, snapshot)
        return permit

    def snapshot(self) -> BreakerSnapshot:
        with self._lock:
            return self._snapshot_locked(self._clock())

    # ------------------------------------------------------------------ internals
    def _report(self, permit: Permit, outcome: str, error: str | None) -> None:
        with self._lock:
            now = self._clock()
            transitions = []
            if permit._generation == self._generation:
                if permit.is_probe:
                    self._probe_since = None
                if outcome == "success":
                    self._failures = 0
                    if permit.is_probe:
                        self._backoff_s = self.policy.backoff_s
                        transitions.append(self._move_locked(BreakerState.CLOSED))
                elif outcome == "failure":
                    self._failures += 1
                    self._last_error = error
                    if permit.is_probe:
                        transitions.append(self._open_locked(now, error, longer=True))
                    elif self._failures >= self.policy.failure_threshold:
                        transitions.append(self._open_locked(now, error, longer=False))
                # "release": no verdict; a released probe frees the slot for the next caller.
            snapshot = self._snapshot_locked(now)
        self._notify(transitions, snapshot)

    def _open_locked(self, now: float, error: str | None, *, longer: bool) -> tuple[BreakerState, BreakerState]:
        if longer:  # a failed probe: the dependency is still down, wait longer
            self._backoff_s = min(self._backoff_s * self.policy.backoff_multiplier, self.policy.backoff_max_s)
        else:
            self._backoff_s = self.policy.backoff_s
        if error is not None:
            self._last_error = error
        self._opened_at = now
        self._probe_since = None
        self._opened += 1
        return self._move_locked(BreakerState.OPEN)

    def _move_locked(self, to: BreakerState) -> tuple[BreakerState, BreakerState]:
        before, self._state = self._state, to
        self._generation += 1
        return before, to

    def _snapshot_locked(self, now: float) -> BreakerSnapshot:
        retry = max(self._opened_at + self._backoff_s - now, 0.0) if self._state is BreakerState.OPEN else 0.0
        return BreakerSnapshot(state=self._state, consecutive_failures=self._failures, last_error=self._last_error,
                               backoff_s=self._backoff_s, retry_in_s=retry, admitted_total=self._admitted,
                               short_circuited_total=self._short_circuited, opened_total=self._opened)

    def _notify(self, transitions: list[tuple[BreakerState, BreakerState]], snapshot: BreakerSnapshot) -> None:
        # Outside the lock: a listener may log, export metrics or read the breaker.
        if self._listener is None:
            return
        for before, after in transitions:
            self._listener(before, after, snapshot)
