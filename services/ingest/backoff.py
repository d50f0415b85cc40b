"""Capped exponential backoff for transient failures (store down, commit refused)."""
from __future__ import annotations

import random
import time


class Backoff:
    """initial_s, 2*initial_s, 4*initial_s ... capped at max_s, with jitter.

    The jitter (each delay drawn from [delay/2, delay]) keeps a fleet of workers
    that lost the same store at the same moment from retrying in lock-step.
    The worker never sleeps on it: it asks :meth:`ready` while it keeps polling
    Kafka (paused), so the group membership stays alive during a long outage.
    """

    def __init__(self, initial_s: float, max_s: float, rng: random.Random | None = None) -> None:
        if initial_s <= 0 or max_s <= 0:
            raise ValueError("backoff delays must be > 0")
        self.initial_s = initial_s
        self.max_s = max(max_s, initial_s)
        self._rng = rng or random.Random()
        self.failures = 0
        self._not_before = 0.0

    def failed(self) -> float:
        """Record a failure; return the delay before the next attempt."""
        base = min(self.max_s, self.initial_s * (2 ** min(self.failures, 30)))
        self.failures += 1
        delay = base / 2 + self._rng.random() * base / 2
        self._not_before = time.monotonic() + delay
        return delay

    def succeeded(self) -> None:
        self.failures = 0
        self._not_before = 0.0

    def ready(self) -> bool:
        return time.monotonic() >= self._not_before

    def remaining_s(self) -> float:
        return max(0.0, self._not_before - time.monotonic())
