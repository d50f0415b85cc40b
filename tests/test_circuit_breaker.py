"""The circuit breaker's state machine (vidsearch.circuit_breaker), driven by an injected
clock, the ingress's use of it (services.query.rerank_breaker) and its settings."""
from __future__ import annotations

import asyncio
import threading
from typing import Callable

import pytest

from vidsearch.circuit_breaker import BreakerPolicy, BreakerState, CircuitBreaker
from vidsearch.cli import main
from vidsearch.config import ConfigError, ServeSettings, load_settings
from vidsearch.services.query.rerank_breaker import RerankBreaker
from vidsearch.services.stack.status import describe_breaker

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


class FakeClock:
    """Time that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Dependency:
    """A dependency the test switches between up and down; counts the calls it gets."""

    def __init__(self) -> None:
        self.up = True
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if not self.up:
            raise ConnectionError("dependency is down")
        return "answer"


def guarded(breaker: CircuitBreaker, call: Callable[[], str]) -> str:
    """How a caller uses the breaker: ask, call only with a permit, report the outcome."""
    permit = breaker.try_acquire()
    if permit is None:
        return "short-circuited"
    try:
        result = call()
        permit.succeeded()
        return result
    except ConnectionError as exc:
        permit.failed(str(exc))
        return "failed"
    finally:
        permit.release()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make(clock: FakeClock, **policy: float) -> CircuitBreaker:
    return CircuitBreaker(BreakerPolicy(**policy), clock=clock)


def test_closed_opens_on_the_first_failure(clock):
    breaker, dep = make(clock), Dependency()
    assert guarded(breaker, dep) == "answer" and breaker.snapshot().state is CLOSED
    dep.up = False
    assert guarded(breaker, dep) == "failed"
    snap = breaker.snapshot()
    assert snap.state is OPEN and snap.consecutive_failures == 1 and snap.opened_total == 1
    assert snap.last_error == "dependency is down"
    assert snap.retry_in_s == pytest.approx(2.0) and snap.backoff_s == 2.0


def test_open_short_circuits_without_calling(clock):
    breaker, dep = make(clock), Dependency()
    dep.up = False
    guarded(breaker, dep)
    dep.up = True  # back already, but the window has not passed: no call is made to find out
    for _ in range(5):
        clock.advance(0.3)
        assert guarded(breaker, dep) == "short-circuited"
    assert dep.calls == 1
    snap = breaker.snapshot()
    assert snap.state is OPEN and snap.short_circuited_total == 5 and snap.admitted_total == 1
    assert snap.retry_in_s == pytest.approx(0.5)


def test_threshold_counts_consecutive_failures_only(clock):
    breaker, dep = make(clock, failure_threshold=3), Dependency()
    dep.up = False
    guarded(breaker, dep), guarded(breaker, dep)
    assert breaker.snapshot().state is CLOSED and breaker.snapshot().consecutive_failures == 2
    dep.up = True
    guarded(breaker, dep)  # a success in between starts the count again
    assert breaker.snapshot().consecutive_failures == 0
    dep.up = False
    for _ in range(3):
        guarded(breaker, dep)
    assert breaker.snapshot().state is OPEN and dep.calls == 6


def test_half_open_lets_exactly_one_probe_through(clock):
    breaker, dep = make(clock), Dependency()
    dep.up = False
    guarded(breaker, dep)
    clock.advance(2.0)
    probe = breaker.try_acquire()
    assert probe is not None and probe.is_probe and breaker.snapshot().state is HALF_OPEN
    # While the probe is out, everyone else is still answered without a call.
    assert [breaker.try_acquire() for _ in range(3)] == [None, None, None]
    probe.succeeded()
    assert breaker.snapshot().state is CLOSED


def test_probe_success_closes_and_resets_the_backoff(clock):
    breaker, dep = make(clock), Dependency()
    dep.up = False
    guarded(breaker, dep)
    clock.advance(2.0)
    guarded(breaker, dep)  # failed probe: 4 s now
    assert breaker.snapshot().backoff_s == 4.0
    clock.advance(4.0)
    dep.up = True
    assert guarded(breaker, dep) == "answer"
    snap = breaker.snapshot()
    assert snap.state is CLOSED and snap.consecutive_failures == 0 and snap.backoff_s == 2.0
    assert [guarded(breaker, dep) for _ in range(3)] == ["answer"] * 3
    dep.up = False
    guarded(breaker, dep)
    assert breaker.snapshot().retry_in_s == pytest.approx(2.0)  # a new outage starts at the first window


def test_probe_failure_reopens_with_a_doubling_capped_backoff(clock):
    breaker, dep = make(clock, backoff_s=2.0, backoff_max_s=30.0), Dependency()
    dep.up = False
    guarded(breaker, dep)
    windows = []
    for _ in range(6):
        window = breaker.snapshot().backoff_s
        windows.append(window)
        clock.advance(window - 0.25)
        assert guarded(breaker, dep) == "short-circuited"  # not a moment early
        clock.advance(0.25)
        assert guarded(breaker, dep) == "failed"  # the probe
        assert breaker.snapshot().state is OPEN
    assert windows == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    snap = breaker.snapshot()
    assert snap.consecutive_failures == 7 and snap.opened_total == 7 and dep.calls == 7


def test_outcomes_of_calls_admitted_before_the_breaker_opened_are_ignored(clock):
    breaker = make(clock)
    slow_ok, slow_bad, failing = breaker.try_acquire(), breaker.try_acquire(), breaker.try_acquire()
    failing.failed("timeout")
    assert breaker.snapshot().state is OPEN
    slow_ok.succeeded()  # started before the outage: proves nothing about now
    slow_bad.failed("late failure")  # must not lengthen the window a second time
    snap = breaker.snapshot()
    assert snap.state is OPEN and snap.backoff_s == 2.0 and snap.opened_total == 1
    assert snap.last_error == "timeout"


def test_a_released_probe_frees_the_slot_and_a_lost_one_expires(clock):
    breaker = make(clock, probe_lease_s=10.0)
    breaker.try_acquire().failed("down")
    clock.advance(2.0)
    probe = breaker.try_acquire()
    probe.release()  # e.g. the search was cancelled: no verdict either way
    assert breaker.snapshot().state is HALF_OPEN and breaker.snapshot().consecutive_failures == 1
    lost = breaker.try_acquire()
    assert lost is not None and lost.is_probe
    clock.advance(9.5)
    assert breaker.try_acquire() is None
    clock.advance(0.5)  # the lost probe never reported: taken as a failure, window doubled
    assert breaker.try_acquire() is None
    snap = breaker.snapshot()
    assert snap.state is OPEN and snap.backoff_s == 4.0 and snap.consecutive_failures == 2
    lost.succeeded()  # too late to count
    assert breaker.snapshot().state is OPEN


def test_listener_sees_every_transition(clock):
    seen = []
    breaker = CircuitBreaker(BreakerPolicy(), clock=clock,
                             listener=lambda before, after, snap: seen.append((before.value, after.value,
                                                                                snap.state.value)))
    breaker.try_acquire().failed("down")
    clock.advance(2.0)
    breaker.try_acquire().failed("still down")
    clock.advance(4.0)
    breaker.try_acquire().succeeded()
    assert [(b, a) for b, a, _ in seen] == [("closed", "open"), ("open", "half_open"), ("half_open", "open"),
                                             ("open", "half_open"), ("half_open", "closed")]
    assert all(a == s for _, a, s in seen)


def test_one_probe_among_many_threads(clock):
    breaker = make(clock)
    breaker.try_acquire().failed("down")
    clock.advance(2.0)
    start, permits = threading.Barrier(16), []

    def contend() -> None:
        start.wait()
        permits.append(breaker.try_acquire())

    threads = [threading.Thread(target=contend) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(p is not None for p in permits) == 1
    assert breaker.snapshot().short_circuited_total == 15


def test_one_probe_among_concurrent_tasks(clock):
    breaker, dep = make(clock), Dependency()
    dep.up = False
    guarded(breaker, dep)
    clock.advance(2.0)
    dep.up = True

    async def search() -> str:
        permit = breaker.try_acquire()
        if permit is None:
            return "recall-only"
        try:
            await asyncio.sleep(0.01)  # the probe is in flight while the others arrive
            dep()
            permit.succeeded()
            return "reranked"
        finally:
            permit.release()

    async def burst() -> list[str]:
        return await asyncio.gather(*(search() for _ in range(10)))

    results = asyncio.run(burst())
    assert results.count("reranked") == 1 and results.count("recall-only") == 9
    assert dep.calls == 2 and breaker.snapshot().state is CLOSED


@pytest.mark.parametrize(("policy", "named"), [
    ({"failure_threshold": 0}, "failure_threshold"),
    ({"backoff_s": 0}, "backoff_s"),
    ({"backoff_s": 5, "backoff_max_s": 1}, "backoff_max_s"),
    ({"backoff_multiplier": 0.5}, "backoff_multiplier"),
    ({"probe_lease_s": 0}, "probe_lease_s"),
])
def test_bad_policy_names_the_field(policy, named):
    with pytest.raises(ValueError, match=named):
        BreakerPolicy(**policy)


# --------------------------------------------------------------------------- the ingress's breaker

def serve_settings(**fields: object) -> ServeSettings:
    return ServeSettings(**fields)


def test_rerank_breaker_follows_the_settings(clock):
    breaker = RerankBreaker(serve_settings(rerank_breaker_failures=2, rerank_breaker_backoff_s=1.0,
                                           rerank_breaker_backoff_max_s=3.0), clock=clock, export_metrics=False)
    for _ in range(2):
        guard = breaker.admit()
        guard.failed(ConnectionError("replica died\nsecond line"), budget_s=5.0)
        guard.release()
    snap = breaker.snapshot()
    assert snap["state"] == "open" and snap["consecutive_failures"] == 2 and snap["enabled"] is True
    assert snap["last_error"] == "ConnectionError: replica died"  # one line
    assert breaker.admit() is None
    for window in (1.0, 2.0, 3.0, 3.0):
        clock.advance(window)
        probe = breaker.admit()
        assert probe is not None and probe.is_probe
        probe.failed(TimeoutError(), budget_s=5.0)
    assert breaker.snapshot()["backoff_s"] == 3.0


def test_adaptive_timeout_is_a_small_multiple_of_recent_latency(clock):
    breaker = RerankBreaker(serve_settings(rerank_breaker_timeout_multiplier=2.0, rerank_breaker_timeout_floor_s=0.05,
                                           rerank_breaker_latency_window=4, rerank_breaker_latency_min_samples=3),
                            clock=clock, export_metrics=False)

    def answered_after(seconds: float) -> None:
        guard = breaker.admit()
        clock.advance(seconds)
        guard.succeeded()
        guard.release()

    for latency in (0.1, 0.3):
        answered_after(latency)
        # Too few answers to know what normal is: a call may take its whole share of the deadline.
        guard = breaker.admit()
        assert guard.timeout(5.0) == 5.0 and not guard.adaptive
        guard.release()
    answered_after(0.2)
    assert breaker.snapshot()["adaptive_timeout_s"] == pytest.approx(0.6)  # 2 x the slowest of the window
    guard = breaker.admit()
    assert guard.timeout(5.0) == pytest.approx(0.6) and guard.adaptive
    short = breaker.admit()
    assert short.timeout(0.4) == 0.4 and not short.adaptive  # never more than the deadline's share
    short.release()
    for _ in range(4):  # the window slides: only the last 4 answers count, and the floor holds
        answered_after(0.001)
    assert breaker.snapshot()["adaptive_timeout_s"] == pytest.approx(0.05)
    # A call for another model version (an alias flip) may take its whole share: the reranker
    # may be loading that version. Its answer starts the window over.
    flip = breaker.admit()
    assert flip.timeout(5.0, "v2") == 5.0 and not flip.adaptive
    clock.advance(2.5)
    flip.succeeded()
    flip.release()
    assert breaker.snapshot()["latency_samples"] == 1 and breaker.snapshot()["adaptive_timeout_s"] is None
    for _ in range(3):
        answered_after(0.001)
    probe_v2 = breaker.admit()
    assert probe_v2.timeout(5.0, "v2") == 5.0  # 2 x 2.5 s: the slow first answer is still in the window
    probe_v2.release()
    # A call cut short by the adaptive timeout is evidence against the reranker, however short:
    # the reranker answered many calls in well under that.
    guard.failed(TimeoutError(), budget_s=0.05)
    assert breaker.snapshot()["state"] == "open"


class Answers:
    """Reranker answers the test resolves by hand: one asyncio future per call."""

    def __init__(self, n: int) -> None:
        loop = asyncio.get_running_loop()
        self.futures = [loop.create_future() for _ in range(n)]


async def rerank_call(breaker: RerankBreaker, answer: "asyncio.Future[str]", budget_s: float = 60.0) -> str:
    """How the ingress calls the reranker through the breaker (SearchIngress._call_reranker)."""
    from vidsearch.services.query.rerank_breaker import BreakerOpened

    guard = breaker.admit()
    if guard is None:
        return "circuit_open"
    timeout = guard.timeout(budget_s)
    try:
        result = await guard.race(answer, timeout)
        guard.succeeded()
        return result
    except BreakerOpened as exc:
        guard.failed(exc, timeout)
        return "released"
    except Exception as exc:  # noqa: BLE001
        guard.failed(exc, timeout)
        return "timeout" if isinstance(exc, asyncio.TimeoutError) else "failed"
    finally:
        guard.release()


def test_one_failure_releases_every_call_in_flight():
    """Three searches wait on a reranker that does not answer; the first one's failure opens
    the breaker and the other two give up at once, without a failure of their own."""

    async def scenario() -> tuple[list[str], dict, list[bool]]:
        breaker = RerankBreaker(serve_settings(rerank_breaker_backoff_s=60.0, rerank_breaker_backoff_max_s=60.0),
                                export_metrics=False)
        answers = Answers(3)
        calls = [asyncio.ensure_future(rerank_call(breaker, fut)) for fut in answers.futures]
        for _ in range(10):  # each turn of the loop runs every call up to its wait on the reranker
            await asyncio.sleep(0)
        assert not any(call.done() for call in calls)
        answers.futures[0].set_exception(ConnectionError("replica died"))
        outcomes = await asyncio.gather(*calls)
        return outcomes, breaker.snapshot(), [f.cancelled() for f in answers.futures[1:]]

    outcomes, snap, cancelled = asyncio.run(scenario())
    assert outcomes == ["failed", "released", "released"]
    assert snap["state"] == "open" and snap["consecutive_failures"] == 1 and snap["opened_total"] == 1
    assert snap["released_total"] == 2
    assert cancelled == [True, True]  # the released calls' reranker requests are cancelled


def test_a_timed_out_call_releases_the_others_and_later_calls_short_circuit():
    async def scenario() -> tuple[list[str], str, dict]:
        settings = serve_settings(rerank_breaker_backoff_s=60.0, rerank_breaker_backoff_max_s=60.0,
                                  rerank_breaker_latency_min_samples=1, rerank_breaker_timeout_floor_s=0.01)
        breaker = RerankBreaker(settings, export_metrics=False)
        breaker.record_latency(0.001)  # normal is 1 ms: a silent reranker is given up on after the floor
        answers = Answers(3)
        first = asyncio.ensure_future(rerank_call(breaker, answers.futures[0]))
        others = [asyncio.ensure_future(rerank_call(breaker, fut, budget_s=600.0)) for fut in answers.futures[1:]]
        # None of the three waits out its share of the deadline (60 s, 600 s): the first adaptive
        # timeout opens the breaker and releases the others (or they time out on their own).
        outcomes = await asyncio.gather(first, *others)
        late = await rerank_call(breaker, asyncio.get_running_loop().create_future())
        return outcomes, late, breaker.snapshot()

    outcomes, late, snap = asyncio.run(scenario())
    assert outcomes[0] in ("timeout", "released") and "timeout" in outcomes
    assert set(outcomes) <= {"timeout", "released"}
    assert late == "circuit_open"
    assert snap["state"] == "open" and snap["consecutive_failures"] == 1
    assert snap["released_total"] == outcomes.count("released")


class Reranker:
    """The probe's far end: down or up as the test says; counts the probes it gets."""

    def __init__(self) -> None:
        self.up = False
        self.probes = 0

    async def __call__(self, timeout_s: float) -> None:
        self.probes += 1
        await asyncio.sleep(0)
        if not self.up:
            raise ConnectionError("reranker still down")


async def wait_for_state(breaker: RerankBreaker, check: Callable[[dict], bool], limit_s: float = 60.0) -> dict:
    loop = asyncio.get_running_loop()
    give_up = loop.time() + limit_s
    while not check(breaker.snapshot()):
        assert loop.time() < give_up, breaker.snapshot()
        await asyncio.sleep(0.01)
    return breaker.snapshot()


def test_the_background_probe_closes_the_breaker_and_searches_never_probe():
    async def scenario() -> tuple[list[str], dict, dict, int, str]:
        reranker = Reranker()
        settings = serve_settings(rerank_breaker_backoff_s=0.02, rerank_breaker_backoff_max_s=0.1)
        breaker = RerankBreaker(settings, probe=reranker, export_metrics=False)
        loop = asyncio.get_running_loop()
        failing = loop.create_future()
        failing.set_exception(ConnectionError("replica died"))
        first = await rerank_call(breaker, failing)
        # While it is open, searches only read the state: none is let through, not even after the
        # back-off window, while the background probes find the reranker still down.
        searches = []
        while reranker.probes < 3:
            searches.append(await rerank_call(breaker, loop.create_future()))
            await asyncio.sleep(0.005)
        down = await wait_for_state(breaker, lambda s: s["probes_total"] >= 3 and s["state"] == "open")
        reranker.up = True
        closed = await wait_for_state(breaker, lambda s: s["state"] == "closed")
        answer = loop.create_future()
        answer.set_result("scores")
        after = await rerank_call(breaker, answer)
        return [first, *searches], down, closed, reranker.probes, after

    outcomes, down, closed, probes, after = asyncio.run(scenario())
    assert outcomes[0] == "failed" and set(outcomes[1:]) == {"circuit_open"}
    assert down["opened_total"] >= 3 and down["backoff_s"] > 0.02  # failed probes lengthen the window
    assert closed["consecutive_failures"] == 0 and closed["backoff_s"] == 0.02
    assert closed["probes_total"] == probes and closed["latency_samples"] == 1  # the probe's answer counts
    # Every call that reached the reranker was a probe or the first search.
    assert closed["admitted_total"] == 1 + probes
    assert after == "scores"


def test_a_user_call_never_takes_the_probe_when_asked_not_to(clock):
    breaker, dep = make(clock), Dependency()
    dep.up = False
    assert guarded(breaker, dep) == "failed"
    clock.advance(60.0)
    assert breaker.try_acquire(allow_probe=False) is None
    assert breaker.snapshot().state is OPEN  # reading does not move it to half-open
    probe = breaker.try_acquire()
    assert probe is not None and probe.is_probe and breaker.snapshot().state is HALF_OPEN
    assert breaker.try_acquire(allow_probe=False) is None
    probe.succeeded()
    permit = breaker.try_acquire(allow_probe=False)
    assert permit is not None and not permit.is_probe


def test_a_client_deadline_too_short_for_the_reranker_is_no_failure(clock):
    breaker = RerankBreaker(serve_settings(rerank_breaker_min_timeout_s=0.5), clock=clock, export_metrics=False)
    guard = breaker.admit()
    guard.failed(TimeoutError(), budget_s=0.2)
    guard.release()
    assert breaker.snapshot()["state"] == "closed" and breaker.snapshot()["consecutive_failures"] == 0
    guard = breaker.admit()
    guard.failed(TimeoutError(), budget_s=0.5)
    assert breaker.snapshot()["state"] == "open"
    # A short-deadline probe gives up the slot instead of deciding.
    clock.advance(2.0)
    probe = breaker.admit()
    probe.failed(TimeoutError(), budget_s=0.1)
    probe.release()
    assert breaker.snapshot()["state"] == "half_open" and breaker.admit().is_probe


def test_disabled_breaker_never_refuses(clock):
    breaker = RerankBreaker(serve_settings(rerank_breaker_enabled=False), clock=clock, export_metrics=False)
    for _ in range(5):
        guard = breaker.admit()
        assert guard is not None and not guard.is_probe
        guard.failed(ConnectionError("down"), budget_s=5.0)
    assert breaker.snapshot()["state"] == "closed" and breaker.snapshot()["enabled"] is False


def test_status_line_of_the_breaker():
    assert describe_breaker({"enabled": True, "state": "closed", "consecutive_failures": 0, "retry_in_s": 0.0,
                             "last_error": "old"}) == "breaker closed, 0 consecutive failure(s)"
    line = describe_breaker({"enabled": True, "state": "open", "consecutive_failures": 3, "retry_in_s": 3.21,
                             "last_error": "DeploymentUnavailableError: gone"})
    assert line == ("breaker open, 3 consecutive failure(s), probe in 3.2 s; "
                    "last error: DeploymentUnavailableError: gone")
    assert "probing" in describe_breaker({"state": "half_open", "consecutive_failures": 1, "retry_in_s": 0.0})
    assert describe_breaker({"enabled": False, "state": "closed"}).startswith("breaker off")


# --------------------------------------------------------------------------- settings

def test_breaker_defaults():
    serve = load_settings(env={}).serve
    assert serve.rerank_breaker_enabled and serve.rerank_breaker_failures == 1
    assert (serve.rerank_breaker_backoff_s, serve.rerank_breaker_backoff_max_s) == (2.0, 30.0)
    assert (serve.rerank_breaker_timeout_multiplier, serve.rerank_breaker_timeout_floor_s) == (2.0, 0.05)
    assert (serve.rerank_breaker_latency_window, serve.rerank_breaker_latency_min_samples) == (50, 5)


@pytest.mark.parametrize(("env", "named"), [
    ({"VIDSEARCH_SERVE__RERANK_BREAKER_ENABLED": "sometimes"}, "serve.rerank_breaker_enabled"),
    ({"VIDSEARCH_SERVE__RERANK_BREAKER_FAILURES": "0"}, "serve.rerank_breaker_failures"),
    ({"VIDSEARCH_SERVE__RERANK_BREAKER_FAILURES": "two"}, "serve.rerank_breaker_failures"),
    ({"VIDSEARCH_SERVE__RERANK_BREAKER_BACKOFF_S": "0"}, "serve.rerank_breaker_backoff_s"),
    ({"VIDSEARCH_SERVE__RERANK_BREAKER_BACKOFF_S": "-1"}, "serve.rerank_breaker_backoff_s"),
    ({"VIDSEARCH_SERVE__RERANK_BREAKER_BACKOFF_MAX_S": "1"}, "serve.rerank_breaker_backoff_max_s"),
    ({"VIDSEARCH_SERVE__RERANK_BREAKER_BACKOFF_S": "10", "VIDSEARCH_SERVE__RERANK_BREAKER_BACKOFF_MAX_S": "5"},
     "serve.rerank_breaker_backoff_max_s"),
    ({"VIDSEARCH_SERVE__RERANK_BREAKER_PROBE_TIMEOUT_S": "0"}, "serve.rerank_breaker_probe_timeout_s"),
    ({"VIDSEARCH_SERVE__RERANK_BREAKER_MIN_TIMEOUT_S": "-0.1"}, "serve.rerank_breaker_min_timeout_s"),
    ({"VIDSEARCH_SERVE__RERANK_BREAKER_MIN_TIMEOUT_S": "9"}, "serve.rerank_breaker_min_timeout_s"),
    ({"VIDSEARCH_SERVE__RERANK_BREAKER_TIMEOUT_MULTIPLIER": "0.5"}, "serve.rerank_breaker_timeout_multiplier"),
    ({"VIDSEARCH_SERVE__RERANK_BREAKER_TIMEOUT_FLOOR_S": "0"}, "serve.rerank_breaker_timeout_floor_s"),
    ({"VIDSEARCH_SERVE__RERANK_BREAKER_LATENCY_WINDOW": "0"}, "serve.rerank_breaker_latency_window"),
    ({"VIDSEARCH_SERVE__RERANK_BREAKER_LATENCY_WINDOW": "10", "VIDSEARCH_SERVE__RERANK_BREAKER_LATENCY_MIN_SAMPLES": "11"},
     "serve.rerank_breaker_latency_min_samples"),
])
def test_bad_breaker_setting_is_one_line_naming_it(env, named):
    with pytest.raises(ConfigError) as info:
        load_settings(env=env)
    message = str(info.value)
    assert message.startswith(f"invalid setting {named}:") and "\n" not in message


def test_cli_refuses_a_bad_breaker_setting_with_exit_2(capsys, monkeypatch):
    monkeypatch.setenv("VIDSEARCH_SERVE__RERANK_BREAKER_BACKOFF_MAX_S", "0.5")
    assert main(["config"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "serve.rerank_breaker_backoff_max_s" in err and "0.5" in err
