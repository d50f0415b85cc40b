"""What `vidsearch status` reports: the live index, points, lag, DLQ and the health of
every piece, gathered from the real endpoints (the running stack's, found through
its state file, or the configured ones). Each probe fails on its own: one piece down
is reported as such and the rest are still shown."""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from vidsearch.config import Settings

PROBE_TIMEOUT_S = 5.0


@dataclass
class Health:
    ok: bool
    detail: str = ""


@dataclass
class StackStatus:
    live_index: str | None = None
    model_version: str | None = None
    points: int | None = None
    # "topic:partition" -> committed lag of the consumer group
    lag: dict[str, int] = field(default_factory=dict)
    dlq_records: int | None = None
    health: dict[str, Health] = field(default_factory=dict)
    # The query ingress's circuit breaker around the reranker, as one ingress replica
    # reports it (state, consecutive_failures, last_error, retry_in_s, ...); None when unread.
    rerank_breaker: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def ok(self) -> bool:
        return all(h.ok for h in self.health.values())


def _probe(status: StackStatus, name: str, fn: Callable[[], str]) -> None:
    try:
        status.health[name] = Health(True, fn())
    except Exception as exc:  # noqa: BLE001 - every failure is a health line, not a crash
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        status.health[name] = Health(False, f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__)


def worker_from_metrics(endpoint: str | None) -> str:
    """The ingest worker is healthy when its Prometheus endpoint answers."""
    import urllib.request

    if not endpoint:
        raise RuntimeError("cannot tell: the broker does not describe groups and no worker metrics endpoint is known")
    with urllib.request.urlopen(f"http://{endpoint}/metrics", timeout=PROBE_TIMEOUT_S) as answer:
        text = answer.read().decode("utf-8", "replace")
    if "vidsearch_ingest_inflight_batches" not in text:
        raise RuntimeError(f"{endpoint} is not an ingest worker's metrics endpoint")
    return f"the stack's worker answers on {endpoint}"


def broker_status(settings: Settings, status: StackStatus, metrics_endpoint: str | None = None) -> None:
    """Lag per partition of the consumer group, DLQ size and the worker's group membership."""
    from kafka import KafkaConsumer, TopicPartition
    from kafka.admin import KafkaAdminClient

    from vidsearch.kafka_offsets import end_offsets

    b = settings.broker
    if not b.bootstrap:
        status.health["broker"] = Health(False, "no broker configured (KAFKA_BOOTSTRAP) and no running stack found")
        return
    timeout_ms = int(PROBE_TIMEOUT_S * 1000)
    admin = consumer = None

    def probe_broker() -> str:
        nonlocal admin, consumer
        admin = KafkaAdminClient(bootstrap_servers=b.bootstrap, client_id="vidsearch-status",
                                 request_timeout_ms=timeout_ms, bootstrap_timeout_ms=timeout_ms)
        consumer = KafkaConsumer(bootstrap_servers=b.bootstrap, client_id="vidsearch-status",
                                 enable_auto_commit=False, request_timeout_ms=timeout_ms + 1000)
        topics = admin.list_topics()
        missing = [t for t in (b.ingest_topic, b.dlq_topic) if t not in topics]
        from vidsearch.broker import storage_note  # the embedded broker's storage, from the state file

        return f"{b.bootstrap}{storage_note(settings)}" + (f" (missing topics: {', '.join(missing)})" if missing else "")

    _probe(status, "broker", probe_broker)
    if admin is None or consumer is None:
        return
    try:
        def lag() -> None:
            parts = [TopicPartition(b.ingest_topic, p) for p in sorted(consumer.partitions_for_topic(b.ingest_topic) or [])]
            # Counted from the records: the embedded broker's watermark can stop short (kafka_offsets).
            ends = end_offsets(consumer, parts)
            committed = admin.list_group_offsets(b.consumer_group).get(b.consumer_group, {})
            for tp in parts:
                done = committed.get(tp)
                position = done.offset if done is not None and done.offset >= 0 else 0
                status.lag[f"{tp.topic}:{tp.partition}"] = max(int(ends.get(tp, 0)) - position, 0)

        def dlq() -> None:
            parts = [TopicPartition(b.dlq_topic, p) for p in sorted(consumer.partitions_for_topic(b.dlq_topic) or [])]
            if parts:
                ends, starts = end_offsets(consumer, parts), consumer.beginning_offsets(parts)
                status.dlq_records = sum(int(ends[tp]) - int(starts[tp]) for tp in parts)
            else:
                status.dlq_records = 0

        def worker() -> str:
            try:
                (group,) = admin.describe_groups([b.consumer_group])
            except ValueError:
                # kafka-python cannot parse some brokers' DescribeGroups answer (Tansu's):
                # fall back on the stack's own worker and its metrics endpoint.
                return worker_from_metrics(metrics_endpoint)
            members = len(group.members)
            if members == 0:
                raise RuntimeError(f"no ingest worker in consumer group {b.consumer_group!r} "
                                   f"(state {group.state or 'empty'})")
            return f"{members} worker(s) in group {b.consumer_group!r}"

        for name, fn in (("lag", lag), ("dlq", dlq)):
            _probe(status, name, lambda fn=fn: fn() or "")
            if status.health[name].ok:  # reported as numbers above; only a failure is a line
                del status.health[name]
        _probe(status, "worker", worker)
    finally:
        with contextlib.suppress(Exception):
            consumer.close()
        with contextlib.suppress(Exception):
            admin.close()


def ray_status(settings: Settings, status: StackStatus) -> bool:
    """Join the configured Ray (never start one: status only looks)."""
    if not settings.ray.address:
        status.health["ray"] = Health(False, "no Ray configured (RAY_ADDRESS) and no running stack found")
        return False

    def probe() -> str:
        from vidsearch.services.stack.local import init_ray

        init_ray(settings, log_to_driver=False)
        return settings.ray.address or ""

    _probe(status, "ray", probe)
    return status.health["ray"].ok


def store_status(settings: Settings, status: StackStatus, ray_ok: bool) -> None:
    from vidsearch.store import open_store
    from vidsearch.store_schema import model_version_of

    if settings.store.url is None and not ray_ok:
        status.health["store"] = Health(False, "the embedded store lives in the stack's Ray, which is not reachable")
        return

    def probe() -> str:
        store = open_store(settings)
        if not store.healthy():
            raise RuntimeError("store is not healthy")
        collection = store.resolve_alias(settings.store.alias)
        if collection is not None:
            status.live_index = collection
            status.model_version = model_version_of(collection, settings.store.alias)
            status.points = store.count(collection)
        return settings.store.url or f"embedded {settings.store.path}"

    _probe(status, "store", probe)


def serve_status(settings: Settings, status: StackStatus, ray_ok: bool) -> None:
    from vidsearch.services.query.deploy import app_names

    if not ray_ok:
        status.health["serve"] = Health(False, "Ray is not reachable")
        return

    def probe() -> str:
        from ray import serve

        apps = serve.status().applications
        # The search and reranker apps must run; others (the search page) count when deployed.
        required = (settings.serve.app_name, settings.serve.reranker_app_name)
        names = [n for n in app_names(settings) if n in required or n in apps]
        states = {name: str(getattr(apps.get(name), "status", "NOT_DEPLOYED")).rsplit(".", 1)[-1]
                  for name in names}
        summary = ", ".join(f"{name} {state}" for name, state in states.items())
        if any(state != "RUNNING" for state in states.values()):
            raise RuntimeError(summary)
        return summary

    _probe(status, "serve", probe)


def describe_breaker(breaker: dict[str, Any]) -> str:
    """One line on the reranker breaker: its state and, unless closed, why and when it probes."""
    if not breaker.get("enabled", True):
        return "breaker off (serve.rerank_breaker_enabled=false)"
    state, failures = breaker["state"], breaker["consecutive_failures"]
    text = f"breaker {state}, {failures} consecutive failure(s)"
    if state == "open":
        text += f", probe in {breaker['retry_in_s']:.1f} s"
    elif state == "half_open":
        text += ", probing the reranker"
    if state != "closed" and breaker.get("last_error"):
        text += f"; last error: {breaker['last_error']}"
    return text


def rerank_status(settings: Settings, status: StackStatus) -> None:
    """The ingress's reranker circuit breaker, read from one ingress replica (its stats()).
    Down while it is not closed: searches are then answered by recall alone."""
    if not status.health.get("serve", Health(False)).ok:
        return  # the serve line already says the apps are not running

    def probe() -> str:
        from ray import serve

        from vidsearch.services.query.ingress import DEPLOYMENT_NAME

        handle = serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=settings.serve.app_name)
        status.rerank_breaker = handle.stats.remote().result(timeout_s=PROBE_TIMEOUT_S).get("rerank_breaker")
        if status.rerank_breaker is None:
            raise RuntimeError("the search app reports no reranker breaker (a version from before it?)")
        return describe_breaker(status.rerank_breaker)

    _probe(status, "rerank", probe)
    breaker = status.rerank_breaker
    if breaker is not None and breaker.get("enabled", True) and breaker["state"] != "closed":
        status.health["rerank"] = Health(False, status.health["rerank"].detail)


def collect(settings: Settings, metrics_endpoint: str | None = None) -> StackStatus:
    """``metrics_endpoint``: the stack's own worker's (from the state file), if any."""
    status = StackStatus()
    broker_status(settings, status, metrics_endpoint)
    ray_ok = ray_status(settings, status)
    store_status(settings, status, ray_ok)
    serve_status(settings, status, ray_ok)
    rerank_status(settings, status)
    return status


def format_status(status: StackStatus) -> str:
    lines = [f"live index: {status.live_index or 'none'}  model: {status.model_version or '-'}  "
             f"points: {'-' if status.points is None else status.points}",
             f"dlq records: {'-' if status.dlq_records is None else status.dlq_records}",
             "consumer lag: " + (", ".join(f"{k}={v}" for k, v in sorted(status.lag.items())) or "-")]
    for name, health in status.health.items():
        lines.append(f"{name:<7} {'ok  ' if health.ok else 'DOWN'} {health.detail}")
    return "\n".join(lines)
