"""Helpers and fixtures for the query-service tests (imported by tests/test_query_*.py).

The expensive pieces are shared:

* ``query_data`` (session): real mp4 files ingested once, through the real broker,
  by a real IngestWorker with the tiny preset, into an embedded store of its own.
* ``query_service`` (module): Ray Serve with gRPC on a free loopback port, the
  ingress and the Reranker as two applications with small CPU shares (the shared
  ``ray_local`` has 4 logical CPUs), shut down after the module.
"""
from __future__ import annotations

import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import grpc
import numpy as np
import pytest

from vidsearch.config import (BrokerSettings, DecodeSettings, IngestSettings, ModelSettings, ServeSettings,
                              Settings, StoreSettings)
from vidsearch.video_writer import write_video

NUM_VIDEOS = 12
FILTER_FIELDS = {"video_id": "keyword", "duration_s": "float", "ingested_at": "datetime",
                 "tags": "keyword", "category": "keyword", "views": "integer"}
CATEGORIES = ("sports", "news", "music")
COLOURS = ("red", "green", "blue")
# Small CPU shares: replicas are mostly idle, and ray_local's 4 logical CPUs also
# carry the encoder actor and decode tasks.
REPLICA_CPUS = 0.1
DEPLOY_TIMEOUT_S = 180
INGEST_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def video_metadata(index: int) -> dict[str, Any]:
    colour = COLOURS[index % 3]
    return {"title": f"{colour} clip number {index}", "tags": [colour, "even" if index % 2 == 0 else "odd"],
            "category": CATEGORIES[index // 4 % 3], "views": index * 10}


def write_test_clip(path: Path, index: int) -> Path:
    """A real mp4 whose content and length (1, 2, 3 or 4 s at 8 fps) depend on ``index``."""
    rng = np.random.default_rng(1000 + index)
    frames = 8 * (1 + index % 4)
    base = rng.integers(0, 255, size=(1, 32, 48, 3))
    drift = np.arange(frames).reshape(-1, 1, 1, 1) * rng.integers(1, 9)
    return write_video(path, ((base + drift) % 256).astype(np.uint8), fps=8.0)


def base_settings(*, bootstrap: str, store_path: Path, video_root: Path, registry: Path, alias: str,
                  grpc_port: int = 50051, preset: str = "tiny", **serve: Any) -> Settings:
    suffix = uuid.uuid4().hex[:8]
    serve_fields = {"grpc_port": grpc_port, "app_name": f"vidsearch-{suffix}",
                    "reranker_app_name": f"vidsearch-reranker-{suffix}", "alias_poll_s": 0.5,
                    # Generous: the first requests on a busy 2-core machine may be slow, and a
                    # missed rerank deadline would make reranked=false where a test expects true.
                    "default_deadline_s": 60.0, "batch_wait_s": 0.02,
                    # The search page is deployed only by the tests that use it (tests/test_web_*.py).
                    "web_enabled": False, **serve}
    return Settings(
        broker=BrokerSettings(bootstrap=bootstrap, ingest_topic=f"query-ingest-{suffix}",
                              dlq_topic=f"query-dlq-{suffix}", consumer_group=f"query-group-{suffix}",
                              partitions=4, session_timeout_ms=6000, heartbeat_interval_ms=1000,
                              max_poll_interval_ms=60_000, max_poll_records=8),
        store=StoreSettings(path=str(store_path), alias=alias, timeout_s=20.0, filter_fields=FILTER_FIELDS),
        decode=DecodeSettings(allowed_prefixes=[str(video_root)], max_bytes=2_000_000, max_duration_s=30.0,
                              max_pixels=320 * 240),
        model=ModelSettings(preset=preset, registry_root=str(registry), device="cpu"),
        ingest=IngestSettings(encoder_actors=1, metrics_port=0, retry_initial_s=0.1, retry_max_s=1.0,
                              encoder_batch_frames=64, shutdown_grace_s=20.0),
        serve=ServeSettings(**serve_fields),
    )


@dataclass
class QueryData:
    """What was ingested, and where."""

    settings: Settings  # broker, store, decode and model settings of the ingest
    video_root: Path
    collection: str
    model_version: str
    metadata: dict[str, dict[str, Any]]  # video_id -> metadata
    durations: dict[str, float] = field(default_factory=dict)

    @property
    def video_ids(self) -> list[str]:
        return sorted(self.metadata)


def publish_reranking_version(settings: Settings) -> str:
    """Publish the tiny base model with non-zero cross-encoder output layers as production.

    A fresh cross-encoder's output layers are zero-initialised, so it scores exactly
    like recall (cosine with the mean-pooled frames) and could not show re-ranking. This
    stands in for a trained teacher, and makes the whole stack load a registry version
    (not the base model): the worker indexes with it, ingress and reranker serve it.
    """
    import torch

    from vidsearch.models import build_model, load_model_config
    from vidsearch.models.persist import BASE_SEED, PRODUCTION_ALIAS, save_model_version
    from vidsearch.registry import ModelRegistry

    model = build_model(load_model_config(settings.model.preset), device="cpu", seed=BASE_SEED)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for head in (model.scorer.score_head, model.scorer.relevance_head):
            head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * 0.5)
    registry = ModelRegistry(settings.model.registry_root)
    version = save_model_version(registry, settings.model.model_name, model,
                                 training={"note": "query tests: perturbed cross-encoder heads"})
    registry.set_alias(settings.model.model_name, PRODUCTION_ALIAS, version)
    return version


def ingest_through_broker(settings: Settings, bodies: list[dict[str, Any]]) -> tuple[str, str]:
    """Produce upsert messages to Kafka and ingest them with a real IngestWorker;
    returns the (collection, model version) the worker wrote."""
    import json

    from kafka import KafkaProducer

    from vidsearch.broker import ensure_topics
    from vidsearch.services.ingest.worker import IngestWorker

    bootstrap = settings.broker.bootstrap or ""
    ensure_topics(bootstrap, [settings.broker.ingest_topic, settings.broker.dlq_topic], 4)
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    try:
        for body in bodies:
            producer.send(settings.broker.ingest_topic, key=body["video_id"].encode(), value=json.dumps(body).encode())
        producer.flush(timeout=30)
    finally:
        producer.close(timeout=5)

    worker = IngestWorker(settings)
    try:
        worker.start()
        done = worker.run_until(
            lambda w: w.metrics.value("vidsearch_ingest_videos_total", op="upsert") >= len(bodies)
            and w.inflight_batches == 0, INGEST_TIMEOUT_S)
        assert done, worker.metrics.snapshot()
        return worker.collection, worker.model_version
    finally:
        worker.close()  # also frees the encoder actor's CPU for the Serve replicas


def ingest_query_data(settings: Settings, root: Path, num_videos: int = NUM_VIDEOS) -> QueryData:
    """``num_videos`` clips written under ``root``, produced to Kafka and ingested by a real
    IngestWorker, indexed with a published version of ``settings.model.preset`` (see
    publish_reranking_version)."""
    from vidsearch.store import open_store

    published = publish_reranking_version(settings)
    metadata = {}
    for i in range(num_videos):
        video_id = f"vid-{i:02d}"
        write_test_clip(root / f"{video_id}.mp4", i)
        metadata[video_id] = video_metadata(i)
    bodies = [{"op": "upsert", "video_id": video_id, "uri": (root / f"{video_id}.mp4").resolve().as_uri(),
               "metadata": meta} for video_id, meta in metadata.items()]
    collection, version = ingest_through_broker(settings, bodies)
    assert version == published
    store = open_store(settings)
    assert store.resolve_alias(settings.store.alias) == collection
    stored = store.get(collection, list(metadata))
    assert len(stored) == num_videos
    durations = {v.video_id: float(v.payload["duration_s"]) for v in stored}
    return QueryData(settings=settings, video_root=root, collection=collection, model_version=version,
                     metadata=metadata, durations=durations)


@pytest.fixture(scope="session")
def query_data(ray_local, broker, tmp_path_factory) -> QueryData:
    """NUM_VIDEOS clips produced to Kafka and ingested by a real IngestWorker, indexed
    with a published model version (see publish_reranking_version)."""
    root = tmp_path_factory.mktemp("query-videos")
    settings = base_settings(bootstrap=broker.bootstrap, store_path=tmp_path_factory.mktemp("query-store"),
                             video_root=root, registry=tmp_path_factory.mktemp("query-registry"),
                             alias="videos")
    return ingest_query_data(settings, root)


# --------------------------------------------------------------------------- serving

def serve_settings(data: QueryData, grpc_port: int, **serve: Any) -> Settings:
    """The ingest settings plus a serve section of this test's own (app names, port)."""
    fresh = base_settings(bootstrap=data.settings.broker.bootstrap or "", store_path=Path(data.settings.store.path),
                          video_root=data.video_root, registry=Path(data.settings.model.registry_root),
                          alias=data.settings.store.alias, grpc_port=grpc_port, **serve)
    return data.settings.model_copy(update={"serve": fresh.serve})


def small_options() -> dict[str, Any]:
    return {"num_replicas": 1, "ray_actor_options": {"num_cpus": REPLICA_CPUS}}


@dataclass
class QueryService:
    settings: Settings
    data: QueryData
    channel: grpc.Channel
    clients: dict[str, "Client"] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.settings.serve.grpc_port}"

    def client(self, app: str | None = None) -> "Client":
        app = app or self.settings.serve.app_name
        if app not in self.clients:
            self.clients[app] = Client(self.channel, app)
        return self.clients[app]

    def ingress_stats(self, app: str | None = None) -> dict[str, Any]:
        from ray import serve

        from vidsearch.services.query.ingress import DEPLOYMENT_NAME

        handle = serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=app or self.settings.serve.app_name)
        return handle.stats.remote().result(timeout_s=30)

    def reranker_stats(self) -> dict[str, Any]:
        from ray import serve

        from vidsearch.services.reranker.deployment import DEPLOYMENT_NAME

        handle = serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=self.settings.serve.reranker_app_name)
        return handle.stats.remote().result(timeout_s=30)

    def deploy_reranker(self, settings: Settings | None = None) -> None:
        """(Re)deploy a reranker application: this service's, or the one ``settings`` names."""
        from ray import serve

        from vidsearch.services.reranker.app import reranker_app

        settings = settings or self.settings
        serve.run(reranker_app(settings, **small_options()), name=settings.serve.reranker_app_name,
                  route_prefix=None, blocking=False)

    def deploy_pair(self, ingress: Settings, reranker: Settings) -> None:
        """An extra ingress and the reranker it calls, deployed together."""
        from ray import serve

        from vidsearch.services.query.app import query_app
        from vidsearch.services.reranker.app import reranker_app

        assert ingress.serve.reranker_app_name == reranker.serve.reranker_app_name
        serve.run_many([
            serve.RunTarget(reranker_app(reranker, **small_options()), name=reranker.serve.reranker_app_name,
                            route_prefix=None),
            serve.RunTarget(query_app(ingress, **small_options()), name=ingress.serve.app_name,
                            route_prefix=f"/{ingress.serve.app_name}"),
        ])

    def deploy_ingresses(self, *settings: Settings) -> None:
        """Extra ingress applications (own app names, same Serve instance and port), together."""
        from ray import serve

        from vidsearch.services.query.app import query_app

        serve.run_many([serve.RunTarget(query_app(s, **small_options()), name=s.serve.app_name,
                                        route_prefix=f"/{s.serve.app_name}") for s in settings])


class Client:
    """A plain gRPC client of one Serve application (the `application` metadata)."""

    def __init__(self, channel: grpc.Channel, app: str) -> None:
        from vidsearch.v1 import search_pb2_grpc

        self.app = app
        self.stub = search_pb2_grpc.SearchServiceStub(channel)

    def metadata(self, api_key: str | None = None) -> list[tuple[str, str]]:
        pairs = [("application", self.app)]
        if api_key is not None:
            pairs.append(("authorization", f"Bearer {api_key}"))
        return pairs

    def search(self, query: str = "a clip", *, api_key: str | None = None, metadata: list | None = None,
               timeout: float = 60.0, **fields: Any) -> Any:
        from vidsearch.v1 import search_pb2

        request = search_pb2.SearchRequest(query=query, **fields)
        return self.stub.Search(request, metadata=metadata or self.metadata(api_key), timeout=timeout)

    def get_video(self, video_id: str, *, api_key: str | None = None, timeout: float = 30.0) -> Any:
        from vidsearch.v1 import search_pb2

        return self.stub.GetVideo(search_pb2.GetVideoRequest(video_id=video_id),
                                  metadata=self.metadata(api_key), timeout=timeout)


def rpc_error(call: Callable[[], Any]) -> grpc.RpcError:
    """The RpcError ``call`` raises (fails the test when it succeeds)."""
    try:
        result = call()
    except grpc.RpcError as exc:
        return exc
    raise AssertionError(f"expected a gRPC error, got a response: {result}")


def wait_until(predicate: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except grpc.RpcError as exc:
            last = f"{exc.code().name}: {exc.details()}"
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what} (last: {last})")


@pytest.fixture(scope="module")
def query_service(query_data) -> Iterator[QueryService]:
    """Serve (gRPC on a free port) running the ingress and reranker over ``query_data``."""
    from ray import serve

    from vidsearch.services.query.deploy import deploy

    settings = serve_settings(query_data, free_port())
    deploy(settings, ingress_options=small_options(), reranker_options=small_options(), http_port=free_port())
    channel = grpc.insecure_channel(f"127.0.0.1:{settings.serve.grpc_port}")
    service = QueryService(settings=settings, data=query_data, channel=channel)
    try:
        wait_until(lambda: service.client().search("warm up", top_k=1).results, DEPLOY_TIMEOUT_S,
                   "the first search to answer")
        yield service
    finally:
        channel.close()
        serve.shutdown()


def publish_and_reindex(data: QueryData) -> tuple[str, str]:
    """A new model version (text projection and scorer changed, same frame encoder)
    published to the registry, and its collection built from the stored frames, as
    the trainer's re-index does. The alias is not touched. Returns (version, collection)."""
    import torch

    from vidsearch.models.persist import load_model_version, save_model_version
    from vidsearch.registry import ModelRegistry
    from vidsearch.store import VideoPoint, collection_name, open_store

    settings = data.settings
    registry = ModelRegistry(settings.model.registry_root)
    model, _ = load_model_version(registry, settings.model.model_name, data.model_version, device="cpu")
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        projection = model.clip.text_projection
        projection.add_(torch.randn(projection.shape, generator=generator) * projection.std())
        head = model.scorer.score_head
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator))
    version = save_model_version(registry, settings.model.model_name, model, parent=data.model_version)
    store = open_store(settings)
    collection = collection_name(version, settings.store.alias)
    points = []
    for page in store.scroll(data.collection, with_vectors=True):
        for video in page:
            frames = torch.from_numpy(np.array(video.frames))[None]
            with torch.inference_mode():
                vector = model.aggregate(frames, torch.ones(frames.shape[:2], dtype=torch.bool))[0].numpy()
            points.append(VideoPoint(video.video_id, vector, video.frames,
                                     {**video.payload, "model_version": version}))
    store.ensure_collection(collection, points[0].video_vector.shape[0], points[0].frames.shape[1])
    store.upsert(collection, points)
    return version, collection
