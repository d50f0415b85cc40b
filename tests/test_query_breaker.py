"""The ingress's circuit breaker around the reranker, end to end on the real stack:
Ray Serve with the ingress and a real Reranker app over the tiny preset's index.

While the reranker fails, searches still succeed, answered recall-only and marked
(reranked=false, trailing metadata ``vidsearch-rerank-skipped``); once the breaker
is open no search calls the reranker (counted by the Reranker deployment itself):
the ingress's background probe does, and when the reranker is back it closes the
breaker without any search's help. Searches waiting on a reranker that stopped
answering (its replica SIGSTOPped) are released together when the first one times out.
The breaker's state is read where operators read it: the ingress's stats, the
`vidsearch status` probe and Ray's Prometheus endpoint."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import grpc
import pytest

from vidsearch.services.query.ingress import RERANK_SKIPPED_METADATA
from vidsearch.services.stack.status import StackStatus, rerank_status, serve_status
from vidsearch.v1 import search_pb2

from query_support import (NUM_VIDEOS, QueryService, free_port, query_data, serve_settings,  # noqa: F401
                           wait_until)

QUERY = "a green clip where something moves to the left"
# Windows long enough that the searches a test sends right after a failure fall inside
# them however loaded the machine is; the assertions never depend on how long anything took.
BACKOFF_S = 10.0
BACKOFF_MAX_S = 40.0
# What a production client sends (the vidsearch client's default): the reranker's share is
# then a few seconds, not the 30 s the tests' generous default deadline would give it.
DEADLINE_MS = "10000"
RECOVERY_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def service(query_data) -> Iterator[QueryService]:  # noqa: F811
    from ray import serve

    from vidsearch.services.query.deploy import start_serve

    settings = serve_settings(query_data, free_port(), rerank_breaker_backoff_s=BACKOFF_S,
                              rerank_breaker_backoff_max_s=BACKOFF_MAX_S)
    start_serve(settings, http_port=free_port())
    channel = grpc.insecure_channel(f"127.0.0.1:{settings.serve.grpc_port}")
    try:
        yield QueryService(settings=settings, data=query_data, channel=channel)
    finally:
        channel.close()
        serve.shutdown()


def search(service: QueryService) -> tuple[Any, str | None]:
    """One search; the response and why it was not re-ranked (None when it was)."""
    client = service.client()
    response, call = client.stub.Search.with_call(
        search_pb2.SearchRequest(query=QUERY, top_k=NUM_VIDEOS),
        metadata=client.metadata() + [("vidsearch-deadline-ms", DEADLINE_MS)], timeout=60)
    assert len(response.results) == NUM_VIDEOS  # degraded or not, the search succeeds
    skipped = dict(call.trailing_metadata() or ()).get(RERANK_SKIPPED_METADATA)
    assert (skipped is None) == response.reranked, (response.reranked, skipped)
    return response, skipped


def breaker(service: QueryService) -> dict[str, Any]:
    return service.ingress_stats()["rerank_breaker"]


def reranker_requests(service: QueryService) -> int:
    """Requests the Reranker replica received (it counts every batch it scored or failed)."""
    return sum(int(size) * count for size, count in service.reranker_stats()["batch_sizes"].items())


def status_line(service: QueryService) -> tuple[StackStatus, Any]:
    """What `vidsearch status` reports about the breaker (its real probes, this Ray)."""
    status = StackStatus()
    serve_status(service.settings, status, ray_ok=True)
    rerank_status(service.settings, status)
    return status, status.health.get("rerank")


def status_cli(service: QueryService) -> dict[str, Any]:
    """`vidsearch status --json` in its own process, joining this test's Ray like a second shell."""
    import ray

    settings = service.settings
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "RAY_AUTH_MODE": "token",
           "KAFKA_BOOTSTRAP": settings.broker.bootstrap or "", "VIDSEARCH_STORE__PATH": settings.store.path,
           "VIDSEARCH_STORE__ALIAS": settings.store.alias, "VIDSEARCH_SERVE__APP_NAME": settings.serve.app_name,
           "VIDSEARCH_SERVE__RERANKER_APP_NAME": settings.serve.reranker_app_name,
           "VIDSEARCH_SERVE__WEB_ENABLED": "false"}
    done = subprocess.run([sys.executable, "-m", "vidsearch.cli", "status", "--json"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.stdout.strip(), done.stderr[-3000:]
    return json.loads(done.stdout)


def prometheus_samples(name: str, app: str) -> list[tuple[str, float]]:
    """Samples of ``name`` for application ``app`` on this node's Ray metrics endpoint."""
    import ray

    port = ray.nodes()[0]["MetricsExportPort"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode("utf-8", "replace")
    samples = []
    for line in text.splitlines():
        if line.startswith(name + "{") and f'application="{app}"' in line:
            labels, _, value = line.rpartition(" ")
            samples.append((labels, float(value)))
    return samples


def wait_reranked(service: QueryService) -> Any:
    return wait_until(lambda: search(service)[0].reranked, RECOVERY_TIMEOUT_S, "re-ranking to resume")


def test_a_failing_reranker_is_not_called_while_the_breaker_is_open(service, tmp_path):
    settings = service.settings
    # A reranker that fails every call: its registry is empty, so it cannot load the index's version.
    broken = settings.model_copy(update={"model": settings.model.model_copy(update={"registry_root": str(tmp_path)})})
    service.deploy_pair(settings, broken)

    response, skipped = search(service)
    assert not response.reranked and skipped == "error"
    assert all(r.rerank_score == 0.0 for r in response.results)
    state = breaker(service)
    assert state["state"] == "open" and state["consecutive_failures"] == 1 and state["last_error"]
    assert reranker_requests(service) == 1

    status, line = status_line(service)
    assert status.health["serve"].ok and line is not None and not line.ok
    assert line.detail.startswith("breaker open, 1 consecutive failure(s)") and "last error" in line.detail
    assert status.rerank_breaker["state"] == "open"
    assert not status.ok  # `vidsearch status` exits 1 while searches are not re-ranked

    answers = [search(service) for _ in range(3)]
    assert all(not r.reranked for r, _ in answers)
    state = breaker(service)
    # The reranker got exactly the calls the breaker let through (the first search, then only the
    # background probes); the searches never reached it, not even after the back-off window.
    assert reranker_requests(service) == state["admitted_total"] == 1 + state["probes_total"]
    assert [why for _, why in answers] == ["circuit_open"] * 3
    assert state["short_circuited_total"] == 3
    assert service.ingress_stats()["outcomes"].get("rerank_circuit_open") == 3

    app = settings.serve.app_name
    # Exported every few seconds: wait for the first export after the breaker opened.
    wait_until(lambda: [v for labels, v in prometheus_samples("ray_vidsearch_query_rerank_breaker_state", app)
                        if 'state="open"' in labels] == [1.0], 90, "the open state on Ray's metrics endpoint")
    states = {labels.split('state="')[1].split('"')[0]: v
              for labels, v in prometheus_samples("ray_vidsearch_query_rerank_breaker_state", app)}
    assert states == {"closed": 0.0, "open": 1.0, "half_open": 0.0}
    assert wait_until(lambda: [v for _, v in prometheus_samples("ray_vidsearch_query_rerank_short_circuits_total",
                                                                app) if v >= 1], 90, "the short-circuit counter")

    # When the window has passed the background probe goes, without any search; the reranker
    # still fails, so the breaker opens again for twice as long.
    before = breaker(service)
    state = wait_until(lambda: (lambda s: s if s["opened_total"] > before["opened_total"] else None)(breaker(service)),
                       RECOVERY_TIMEOUT_S, "the background probe")
    assert state["state"] == "open" and state["opened_total"] == before["opened_total"] + 1
    assert state["probes_total"] == before["probes_total"] + 1
    assert state["backoff_s"] == min(2 * before["backoff_s"], BACKOFF_MAX_S) > before["backoff_s"]
    assert state["consecutive_failures"] == before["consecutive_failures"] + 1
    assert reranker_requests(service) == state["admitted_total"] == before["admitted_total"] + 1
    assert state["short_circuited_total"] == before["short_circuited_total"]  # no search was involved

    shown = status_cli(service)  # the command itself, from another process
    assert shown["rerank_breaker"]["state"] == "open"
    assert shown["rerank_breaker"]["consecutive_failures"] == state["consecutive_failures"]
    assert shown["health"]["rerank"]["ok"] is False and "breaker open" in shown["health"]["rerank"]["detail"]

    service.deploy_reranker(settings)  # a working reranker under the same name
    # The background probe (the last search's request again) finds it and closes the breaker:
    # no search is sent until then.
    state = wait_until(lambda: (lambda s: s if s["state"] == "closed" else None)(breaker(service)),
                       RECOVERY_TIMEOUT_S, "the background probe to close the breaker")
    assert state["consecutive_failures"] == 0 and state["backoff_s"] == BACKOFF_S
    assert state["short_circuited_total"] == before["short_circuited_total"]
    assert state["latency_samples"] == 1  # the probe's answer: the first normal the adaptive timeout knows
    status, line = status_line(service)
    assert line.ok and line.detail == "breaker closed, 0 consecutive failure(s)"
    assert all(search(service)[0].reranked for _ in range(2))


def test_a_deleted_reranker_costs_one_failed_call_then_recovers(service):
    """The outage of tests/test_query_rerank.py (the reranker app is gone), with the breaker:
    one search finds out, the next ones do not call it, and re-ranking resumes once it is back."""
    from ray import serve

    settings = service.settings
    service.deploy_pair(settings, settings)
    wait_reranked(service)
    before = breaker(service)
    assert before["state"] == "closed"

    serve.delete(settings.serve.reranker_app_name)
    try:
        response, skipped = search(service)
        assert not response.reranked and skipped == "error"
        state = breaker(service)
        assert state["state"] == "open" and "Unavailable" in (state["last_error"] or ""), state
        response, skipped = search(service)
        assert not response.reranked and skipped == "circuit_open"
        state = breaker(service)
        assert state["admitted_total"] == before["admitted_total"] + 1
        assert state["short_circuited_total"] == before["short_circuited_total"] + 1
        status, _ = status_line(service)
        assert not status.health["serve"].ok and "rerank" not in status.health  # the serve line says why
    finally:
        service.deploy_reranker()
    wait_reranked(service)
    state = breaker(service)
    assert state["state"] == "closed" and state["consecutive_failures"] == 0
    assert reranker_requests(service) >= 1  # the new replica is being called again


def reranker_replica_pid(service: QueryService) -> int:
    """The process of the Reranker's one Serve replica: Ray titles it
    ``ray::ServeReplica:<app>:Reranker``, and this test's local Ray runs below this process."""
    from vidsearch.services.reranker.deployment import DEPLOYMENT_NAME

    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
    below, grew = {os.getpid()}, True
    while grew:
        more = {pid for pid, parent in parents.items() if parent in below} - below
        below |= more
        grew = bool(more)
    title = f"ray::ServeReplica:{service.settings.serve.reranker_app_name}:{DEPLOYMENT_NAME}"
    found = []
    for pid in below:
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace").startswith(title):
                found.append(pid)
    assert len(found) == 1, (title, found)
    return found[0]


# Long enough that all the searches below are waiting on the stopped reranker before the first
# one gives up, however loaded the machine; the test waits for that and asserts no duration.
STOPPED_FLOOR_S = 20.0
IN_FLIGHT = 4


def test_searches_waiting_on_a_stopped_reranker_are_released_together(service):
    """A replica that stops answering without failing (SIGSTOP: alive to Ray, silent to its
    callers, as a SIGKILLed one is until Serve's controller notices): the first search to time
    out opens the breaker and the others waiting with it answer recall-only at once; then the
    background probe closes the breaker once the replica answers again."""
    from concurrent.futures import ThreadPoolExecutor

    settings = service.settings
    floor = settings.model_copy(update={"serve": settings.serve.model_copy(update={
        "rerank_breaker_timeout_floor_s": STOPPED_FLOOR_S, "rerank_breaker_latency_min_samples": 1})})
    service.deploy_pair(floor, settings)
    wait_reranked(service)
    before = breaker(service)
    assert before["state"] == "closed" and before["adaptive_timeout_s"] == STOPPED_FLOOR_S
    pid = reranker_replica_pid(service)

    def long_search(_: int) -> tuple[Any, str | None]:
        client = service.client()
        response, call = client.stub.Search.with_call(
            search_pb2.SearchRequest(query=QUERY, top_k=NUM_VIDEOS),
            metadata=client.metadata() + [("vidsearch-deadline-ms", "120000")], timeout=180)
        return response, dict(call.trailing_metadata() or ()).get(RERANK_SKIPPED_METADATA)

    os.kill(pid, signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(IN_FLIGHT) as pool:
            pending = []
            for i in range(IN_FLIGHT):
                # One at a time, each waiting on the reranker before the next: searches sent
                # together share a text-encoding batch, start their reranker calls together and
                # time out together, which would show nothing about the release.
                pending.append(pool.submit(long_search, i))
                wait_until(lambda: breaker(service)["in_flight"] == i + 1, 120, f"search {i + 1} waiting on the reranker")
            answers = [f.result() for f in pending]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    reasons = [why for _, why in answers]
    assert all(not r.reranked and len(r.results) == NUM_VIDEOS for r, _ in answers)
    state = breaker(service)
    assert state["opened_total"] >= before["opened_total"] + 1 and state["last_error"].startswith("TimeoutError")
    # One search timed out; the others were released by it (reason circuit_open), not by their own timeout.
    assert "timeout" in reasons and set(reasons) <= {"timeout", "circuit_open"}, reasons
    released = state["released_total"] - before["released_total"]
    assert released == reasons.count("circuit_open") >= 1, (reasons, state)
    assert state["short_circuited_total"] == before["short_circuited_total"]  # all four were in flight

    state = wait_until(lambda: (lambda s: s if s["state"] == "closed" else None)(breaker(service)),
                       RECOVERY_TIMEOUT_S, "the background probe to close the breaker")
    assert state["probes_total"] >= 1
    assert search(service)[0].reranked


def replica_pids(app: str, deployment: str) -> list[int]:
    """Serve replica processes of ``app``'s ``deployment`` (Ray titles them
    ``ray::ServeReplica:APP:DEPLOYMENT...``)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            title = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        if f"ServeReplica:{app}:{deployment}" in title:
            found.append(int(entry))
    return found


def test_the_reranker_replica_yields_the_cpus_to_the_ingress(service):
    # On one machine a reranker replica that starts (imports, model load) or scores must not
    # slow the recall-only answers the breaker gives meanwhile (docs/benchmarks/faults.md):
    # with serve.reranker_niceness 19 every thread of the replica runs above the ingress's 15.
    from test_cpu_priority import thread_niceness

    settings = service.settings.model_copy(update={"serve": service.settings.serve.model_copy(
        update={"reranker_niceness": 19})})
    service.deploy_pair(settings, settings)
    wait_reranked(service)
    rerankers = replica_pids(settings.serve.reranker_app_name, "Reranker")
    ingresses = replica_pids(settings.serve.app_name, "SearchIngress")
    assert rerankers and ingresses, (rerankers, ingresses)
    wanted = settings.serve.reranker_niceness
    for pid in rerankers:
        assert set(thread_niceness(pid).values()) == {wanted}, pid
    for pid in ingresses:
        assert max(thread_niceness(pid).values()) < wanted, pid
