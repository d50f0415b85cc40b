"""A bounded gRPC search load that records every request (imported as ``search_load``
from ``benchmarks/*.py``).

``clients`` threads, each with its own channel to the gRPC proxy, send ``Search`` at
most ``rate`` times a second each (a new request once the previous answer is in and
its slot has come): the load is bounded, so latency measures the service rather than
a queue the benchmark built. Every request becomes a :class:`Sample`: when it was
sent, how long it took, its status code, whether it was re-ranked (and why not, from
the ``vidsearch-rerank-skipped`` trailer), and the model versions it names, so a
response that mixes versions can be counted.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import grpc
from google.protobuf import json_format

import common
from vidsearch.services.query.deadline import DEADLINE_METADATA
from vidsearch.v1 import search_pb2, search_pb2_grpc

# Trailing metadata the ingress sets on a Search answered recall-only although re-ranking
# was asked for (services/query/ingress.py, RERANK_SKIPPED_METADATA).
RERANK_SKIPPED = "vidsearch-rerank-skipped"


@dataclass
class Sample:
    t: float  # time.monotonic() when the request was sent
    latency_s: float
    code: str  # "OK" or the gRPC status code's name
    reranked: bool = False
    skipped: str | None = None  # why not re-ranked (the trailer), when it was not
    model_version: str = ""
    index: str = ""
    mixed: bool = False  # names more than one model version (response, index, or a result's payload)
    results: int = 0
    details: str = ""


def versions_named(response: search_pb2.SearchResponse, alias: str = "videos") -> set[str]:
    """Every model version a response names: its own, its index's (``<alias>__<version>``)
    and each result's stored ``model_version``."""
    named = {response.model_version}
    prefix = f"{alias}__"
    if response.index.startswith(prefix):
        named.add(response.index[len(prefix):])
    for result in response.results:
        version = json_format.MessageToDict(result.payload).get("model_version")
        if version:
            named.add(str(version))
    return named


def search_once(stub: Any, query: str, *, app: str, deadline_s: float, top_k: int) -> Sample:
    request = search_pb2.SearchRequest(query=query, top_k=top_k)
    request.rerank = True
    metadata = [("application", app), (DEADLINE_METADATA, str(int(deadline_s * 1000)))]
    sent = time.monotonic()
    try:
        response, call = stub.Search.with_call(request, metadata=metadata, timeout=deadline_s)
    except grpc.RpcError as exc:
        code = exc.code() if hasattr(exc, "code") else None
        details = (exc.details() if hasattr(exc, "details") else "") or ""
        return Sample(sent, time.monotonic() - sent, code.name if code is not None else "UNKNOWN",
                      details=details[:300])
    latency = time.monotonic() - sent
    trailer = dict(call.trailing_metadata() or ())
    return Sample(sent, latency, "OK", reranked=response.reranked, skipped=trailer.get(RERANK_SKIPPED),
                  model_version=response.model_version, index=response.index,
                  mixed=len(versions_named(response)) > 1, results=len(response.results))


class SearchLoad:
    """``clients`` rate-bounded search loops against ``address`` until :meth:`stop`."""

    def __init__(self, address: str, queries: Sequence[str], *, clients: int = 4, rate: float = 2.0,
                 deadline_s: float = 10.0, top_k: int = 5, app: str = "vidsearch") -> None:
        self.address, self.queries, self.clients, self.rate = address, list(queries), clients, rate
        self.deadline_s, self.top_k, self.app = deadline_s, top_k, app
        self.samples: list[Sample] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.started_at = 0.0
        self.stopped_at = 0.0

    def __enter__(self) -> "SearchLoad":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> "SearchLoad":
        self.started_at = time.monotonic()
        for i in range(self.clients):
            thread = threading.Thread(target=self._loop, args=(i,), name=f"search-client-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> list[Sample]:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.deadline_s + 5)
        self.stopped_at = time.monotonic()
        return self.snapshot()

    def snapshot(self) -> list[Sample]:
        with self._lock:
            return sorted(self.samples, key=lambda s: s.t)

    def _loop(self, client: int) -> None:
        channel = grpc.insecure_channel(self.address)
        stub = search_pb2_grpc.SearchServiceStub(channel)
        period = 1.0 / self.rate
        # Spread the clients' slots over one period, so they do not fire together.
        next_at = time.monotonic() + period * client / max(1, self.clients)
        i = client
        try:
            while not self._stop.is_set():
                wait = next_at - time.monotonic()
                if wait > 0 and self._stop.wait(wait):
                    break
                next_at = max(next_at + period, time.monotonic())
                sample = search_once(stub, self.queries[i % len(self.queries)], app=self.app,
                                     deadline_s=self.deadline_s, top_k=self.top_k)
                i += self.clients
                with self._lock:
                    self.samples.append(sample)
        finally:
            channel.close()


# ============================================================================ windows
@dataclass
class Window:
    """What the load saw between two instants (by send time)."""

    name: str
    start: float
    end: float
    sent: int = 0
    ok: int = 0
    failed: int = 0
    degraded: int = 0  # answered, but not re-ranked although re-ranking was asked for
    mixed: int = 0
    codes: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    qps: float = float("nan")  # successful answers per second
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")

    @property
    def seconds(self) -> float:
        return self.end - self.start


def window(samples: Sequence[Sample], name: str, start: float, end: float) -> Window:
    """Counts and latency (of the answered requests) for requests sent in [start, end)."""
    inside = [s for s in samples if start <= s.t < end]
    ok = [s for s in inside if s.code == "OK"]
    out = Window(name, start, end, sent=len(inside), ok=len(ok), failed=len(inside) - len(ok),
                 degraded=sum(1 for s in ok if not s.reranked), mixed=sum(1 for s in ok if s.mixed))
    for s in inside:
        out.codes[s.code] = out.codes.get(s.code, 0) + 1
        if s.code == "OK" and not s.reranked:
            out.skipped[s.skipped or "unknown"] = out.skipped.get(s.skipped or "unknown", 0) + 1
    if end > start:
        out.qps = len(ok) / (end - start)
    if ok:
        out.p50_ms = 1000 * common.percentile([s.latency_s for s in ok], 50)
        out.p99_ms = 1000 * common.percentile([s.latency_s for s in ok], 99)
    return out


def ratio(x: float, y: float) -> float:
    """x / y; NaN when either is missing or y is 0."""
    return x / y if y and y == y and x == x else float("nan")


def phases(samples: Sequence[Sample], before: tuple[float, float], during: tuple[float, float],
           after: tuple[float, float]) -> dict[str, Any]:
    """Before / during / after windows and the ratios the report prints."""
    b, d, a = (window(samples, name, *span) for name, span in
               (("before", before), ("during", during), ("after", after)))
    return {"before": b, "during": d, "after": a,
            "qps_during_before": ratio(d.qps, b.qps), "qps_after_before": ratio(a.qps, b.qps),
            "p99_during_before": ratio(d.p99_ms, b.p99_ms), "p99_after_before": ratio(a.p99_ms, b.p99_ms)}
