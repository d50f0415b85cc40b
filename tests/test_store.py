"""The vector store against real Qdrant local mode: in-process and through the embedded
Ray actor. Behaviour tests run on both, so the two modes are held to one contract."""
from __future__ import annotations

import math
import pickle
import socket
import time
import uuid
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from vidsearch.config import ConfigError, Settings, StoreSettings
from vidsearch.store import (
    CollectionNotFound,
    FilterError,
    Match,
    MatchAny,
    Range,
    StoreError,
    StoreUnavailable,
    VectorStore,
    VideoPoint,
    build_payload,
    collection_name,
    model_version_of,
    open_store,
    point_id,
    shutdown_embedded_store,
)
from vidsearch.store import RAY_NAMESPACE, embedded_actor_name
from vidsearch.store_schema import ALIAS, POINT_NAMESPACE, FilterSchema

DIM, FRAME_DIM, T = 8, 6, 4
T0 = datetime(2024, 5, 1, tzinfo=timezone.utc)
FILTER_FIELDS = {"video_id": "keyword", "duration_s": "float", "ingested_at": "datetime",
                 "tags": "keyword", "category": "keyword", "year": "integer", "featured": "bool"}


def _settings(path, **store) -> Settings:
    return Settings(store=StoreSettings(path=str(path), upsert_batch=3, filter_fields=FILTER_FIELDS, **store))


def _unit(rng: np.random.Generator, *shape: int) -> np.ndarray:
    x = rng.normal(size=shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _point(i: int, rng: np.random.Generator, **meta) -> VideoPoint:
    video_id = f"vid-{i}"
    metadata = {"title": f"clip {i}", "tags": ["even" if i % 2 == 0 else "odd", f"t{i % 3}"],
                "category": "sports" if i < 4 else "news", "year": 2020 + i, "featured": i == 0, **meta}
    payload = build_payload(video_id, f"file:///data/{i}.mp4", metadata, [0.5 * k for k in range(T)],
                            duration_s=10.0 * (i + 1), frame_encoder="enc-1", model_version="v1",
                            ingested_at=T0 + timedelta(days=i))
    return VideoPoint(video_id, _unit(rng, DIM), _unit(rng, T, FRAME_DIM), payload)


def _points(n: int = 8, seed: int = 0) -> list[VideoPoint]:
    rng = np.random.default_rng(seed)
    return [_point(i, rng) for i in range(n)]


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def inproc_store(tmp_path_factory):
    from qdrant_client import QdrantClient

    settings = _settings(tmp_path_factory.mktemp("inproc"))
    store = VectorStore.in_process(QdrantClient(path=settings.store.path), settings.store)
    yield store
    store.close()


@pytest.fixture(scope="module")
def embedded_store(tmp_path_factory, ray_local):
    settings = _settings(tmp_path_factory.mktemp("embedded"))
    store = open_store(settings)
    yield store
    store.close()
    shutdown_embedded_store(settings)


@pytest.fixture(params=["in_process", "embedded"])
def store(request) -> VectorStore:
    return request.getfixturevalue("inproc_store" if request.param == "in_process" else "embedded_store")


@pytest.fixture
def collection(store):
    name = collection_name(f"t{uuid.uuid4().hex[:8]}")
    assert store.ensure_collection(name, DIM, FRAME_DIM) is True
    yield name
    store.delete_collection(name, force=True)


# ----------------------------------------------------------------------------- schema

def test_collection_names_round_trip():
    assert ALIAS == "videos"
    assert collection_name("base-1a2b.3_x") == "videos__base-1a2b.3_x"
    assert model_version_of("videos__base-1a2b.3_x") == "base-1a2b.3_x"


@pytest.mark.parametrize("bad", ["", "a/b", "-x", "a b", "x" * 129, None])
def test_bad_model_version_is_rejected(bad):
    with pytest.raises(ValueError, match="model version"):
        collection_name(bad)


@pytest.mark.parametrize("bad", ["videos", "videos__", "other__v1", "videos__a/b"])
def test_model_version_of_rejects_foreign_names(bad):
    with pytest.raises(ValueError, match="collection name"):
        model_version_of(bad)


def test_point_id_is_a_fixed_uuid5():
    assert point_id("abc") == str(uuid.uuid5(POINT_NAMESPACE, "abc")) == point_id("abc")
    assert point_id("abc") != point_id("abd")
    assert uuid.UUID(point_id("ü")).version == 5
    with pytest.raises(TypeError):
        point_id(7)


def test_build_payload_holds_the_contract_fields():
    payload = build_payload("v", "file:///a.mp4", {"title": "A", "tags": ["x"], "nested": {"k": [1, 2]}},
                            np.array([0.0, 1.5], dtype=np.float32), 3.0, "enc", "v1")
    assert set(payload) == {"video_id", "uri", "metadata", "frame_timestamps", "duration_s", "ingested_at",
                            "frame_encoder", "model_version"}
    assert payload["metadata"] == {"title": "A", "tags": ["x"], "nested": {"k": [1, 2]}}
    assert payload["frame_timestamps"] == [0.0, 1.5]
    assert isinstance(payload["duration_s"], float)
    parsed = datetime.fromisoformat(payload["ingested_at"])
    assert payload["ingested_at"].endswith("Z") and parsed.utcoffset() == timedelta(0)


@pytest.mark.parametrize("kwargs,needle", [
    ({"video_id": ""}, "video_id is empty"),
    ({"uri": ""}, "uri must be"),
    ({"frame_encoder": None}, "frame_encoder must be"),
    ({"model_version": ""}, "model_version must be"),
    ({"metadata": ["x"]}, "metadata must be a mapping"),
    ({"metadata": {"x": object()}}, "not JSON-serialisable"),
    ({"metadata": {"x": float("nan")}}, "not JSON-serialisable"),
    ({"frame_timestamps": [0.0, -1.0]}, "frame timestamp"),
    ({"frame_timestamps": ["a"]}, "frame timestamp must be a number"),
    ({"duration_s": float("inf")}, "duration_s must be finite"),
    ({"duration_s": True}, "duration_s must be a number"),
    ({"ingested_at": datetime(2024, 1, 1)}, "timezone-aware"),
])
def test_build_payload_rejects_bad_input(kwargs, needle):
    args = dict(video_id="v", uri="file:///a.mp4", metadata={}, frame_timestamps=[0.0], duration_s=1.0,
                frame_encoder="enc", model_version="v1")
    args.update(kwargs)
    with pytest.raises(ValueError, match=needle):
        build_payload(**args)


@pytest.mark.parametrize("vector,frames,payload,needle", [
    (np.ones((2, 3)), np.ones((2, 3)), {}, "video_vector must be a non-empty 1-d"),
    (np.ones(3), np.ones(3), {}, "frames must be a non-empty 2-d"),
    (np.ones(3), np.ones((0, 3)), {}, "frames must be a non-empty 2-d"),
    (np.array([1.0, np.nan]), np.ones((1, 2)), {}, "NaN or infinity"),
    (np.zeros(3), np.ones((1, 3)), {}, "all-zero"),
    (np.ones(3), np.array([[1.0, 1, 1], [0, 0, 0]]), {}, "frames contains an all-zero"),
    (np.ones(3), np.ones((2, 3)), {"video_id": "other"}, "payload video_id"),
    (np.ones(3), np.ones((2, 3)), {"frame_timestamps": [0.0]}, "1 frame timestamps for 2 frames"),
    (np.ones(3), np.ones((2, 3)), ["x"], "payload must be a dict"),
])
def test_video_point_rejects_bad_input(vector, frames, payload, needle):
    with pytest.raises(ValueError, match=needle):
        VideoPoint("v", vector, frames, payload)


def test_video_point_casts_to_float32():
    point = VideoPoint("v", [1, 0], [[0, 1]], {})
    assert point.video_vector.dtype == np.float32 and point.frames.shape == (1, 2)


SCHEMA = FilterSchema(FILTER_FIELDS)


@pytest.mark.parametrize("spec,field,needle", [
    (Match("nope", "x"), "nope", "unknown filter field"),
    (Match("title", "x"), "title", "unknown filter field"),  # stored, but not configured as filterable
    (Match("duration_s", 10.0), "duration_s", "exact match is not supported on a float"),
    (Match("ingested_at", "2024-01-01T00:00:00Z"), "ingested_at", "use a range"),
    (Match("category", 3), "category", "keyword field needs a keyword value"),
    (Match("year", "2020"), "year", "integer field needs a integer value"),
    (Match("year", True), "year", "integer field needs"),
    (Match("featured", 1), "featured", "bool field needs"),
    (MatchAny("tags", []), "tags", "at least one value"),
    (MatchAny("tags", "odd"), "tags", "needs a list"),
    (MatchAny("tags", ["a", 1]), "tags", "keyword values"),
    (MatchAny("tags", ["a"] * 2000), "tags", "at most"),
    (MatchAny("duration_s", [1.0]), "duration_s", "only supported on keyword and integer"),
    (Range("duration_s"), "duration_s", "at least one of"),
    (Range("duration_s", gt=1, gte=2), "duration_s", "one lower bound"),
    (Range("duration_s", lt=1, lte=2), "duration_s", "one lower bound"),
    (Range("duration_s", gte=5, lte=1), "duration_s", "range is empty"),
    (Range("duration_s", gt=5, lte=5), "duration_s", "range is empty"),
    (Range("duration_s", gte="5"), "duration_s", "must be a number"),
    (Range("duration_s", gte=True), "duration_s", "must be a number"),
    (Range("duration_s", lt=math.nan), "duration_s", "must be finite"),
    (Range("category", gte=1), "category", "not supported on a keyword"),
    (Range("featured", gte=1), "featured", "not supported on a bool"),
    (Range("ingested_at", gte="yesterday"), "ingested_at", "not an RFC3339"),
    (Range("ingested_at", gte="2024-01-01T00:00:00"), "ingested_at", "needs a timezone"),
    (Range("ingested_at", gte=datetime(2024, 1, 1)), "ingested_at", "needs a timezone"),
    (Range("ingested_at", gte=1700000000), "ingested_at", "datetime or RFC3339"),
    (Range("ingested_at", gte="2024-02-01T00:00:00Z", lt="2024-01-01T00:00:00Z"), "ingested_at", "empty"),
])
def test_malformed_filters_raise_filter_error(spec, field, needle):
    with pytest.raises(FilterError) as info:
        SCHEMA.to_qdrant([spec])
    assert info.value.field == field
    assert needle in info.value.reason


def test_filter_list_must_hold_filters():
    with pytest.raises(FilterError, match="not a filter"):
        SCHEMA.to_qdrant([{"field": "tags"}])
    with pytest.raises(FilterError, match="expected a list"):
        SCHEMA.to_qdrant("tags")


def test_filter_paths_and_conversion():
    assert SCHEMA.path("video_id") == "video_id"
    assert SCHEMA.path("tags") == "metadata.tags"
    assert SCHEMA.index_schemas()["metadata.year"] == "integer"
    assert SCHEMA.to_qdrant(None) is None and SCHEMA.to_qdrant([]) is None
    converted = SCHEMA.to_qdrant([Match("tags", "x"), Range("ingested_at", gte="2024-01-01T02:00:00+02:00")])
    assert [c.key for c in converted.must] == ["metadata.tags", "ingested_at"]
    assert converted.must[1].range.gte == datetime(2024, 1, 1, tzinfo=timezone.utc)


def test_filter_error_survives_pickling():
    err = pickle.loads(pickle.dumps(FilterError("tags", "why")))
    assert (err.field, err.reason) == ("tags", "why")


def test_system_field_with_wrong_type_is_a_config_error():
    with pytest.raises(ConfigError, match="duration_s"):
        FilterSchema({"duration_s": "keyword"})


# ----------------------------------------------------------------------------- both modes

def test_ensure_collection_is_idempotent_and_checks_layout(store, collection):
    assert store.ensure_collection(collection, DIM, FRAME_DIM) is False
    assert collection in store.list_collections()
    with pytest.raises(StoreError, match="another layout"):
        store.ensure_collection(collection, DIM + 1, FRAME_DIM)
    with pytest.raises(ValueError, match="dim must be a positive integer"):
        store.ensure_collection(collection, 0, FRAME_DIM)
    assert store.healthy()


def test_upsert_get_query_delete(store, collection):
    points = _points()
    assert store.upsert(collection, points) == len(points)
    assert store.count(collection) == len(points)

    got = store.get(collection, ["vid-3", "missing", "vid-1", "vid-3"], with_vectors=True)
    assert [g.video_id for g in got] == ["vid-3", "vid-1"]
    np.testing.assert_allclose(got[0].video_vector, points[3].video_vector, atol=1e-5)
    # The multivector comes back whole: one row per frame, in frame order.
    np.testing.assert_allclose(got[0].frames, points[3].frames, atol=1e-5)
    assert got[0].payload == points[3].payload
    plain = store.get(collection, ["vid-3"])
    assert plain[0].video_vector is None and plain[0].frames is None

    hits = store.query(collection, points[5].video_vector, limit=3, with_frames=True)
    assert hits[0].video_id == "vid-5" and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert len(hits) == 3 and hits[0].score >= hits[1].score >= hits[2].score
    assert hits[0].frames.shape == (T, FRAME_DIM)
    # The stored video vector comes back too (the reranker builds on it); cosine
    # collections keep it unit-length.
    stored = np.asarray(points[5].video_vector, dtype=np.float32)
    np.testing.assert_allclose(hits[0].video, stored / np.linalg.norm(stored), atol=1e-5)
    plain_hit = store.query(collection, points[5].video_vector, limit=2)[0]
    assert plain_hit.frames is None and plain_hit.video is None

    assert store.delete(collection, ["vid-5", "vid-6"]) == 2
    assert store.count(collection) == len(points) - 2
    assert store.get(collection, ["vid-5"]) == []
    assert store.delete(collection, []) == 0


@pytest.mark.parametrize("filters,expected", [
    ([Match("category", "news")], {"vid-4", "vid-5", "vid-6", "vid-7"}),
    ([Match("video_id", "vid-2")], {"vid-2"}),
    ([MatchAny("tags", ["t0", "missing"])], {"vid-0", "vid-3", "vid-6"}),
    ([Match("year", 2021)], {"vid-1"}),
    ([MatchAny("year", [2021, 2022])], {"vid-1", "vid-2"}),
    ([Match("featured", True)], {"vid-0"}),
    ([Range("duration_s", gt=20.0, lte=40)], {"vid-2", "vid-3"}),
    ([Range("ingested_at", gte=T0 + timedelta(days=6))], {"vid-6", "vid-7"}),
    ([Range("ingested_at", lt="2024-05-02T00:00:00Z")], {"vid-0"}),
    ([Match("category", "sports"), MatchAny("tags", ["odd"]), Range("duration_s", gte=30)], {"vid-3"}),
    ([Match("category", "nothing")], set()),
])
def test_query_filters(store, collection, filters, expected):
    store.upsert(collection, _points())
    query = np.ones(DIM, dtype=np.float32)
    assert {h.video_id for h in store.query(collection, query, limit=20, filters=filters)} == expected


def test_unknown_filter_field_is_a_filter_error(store, collection):
    with pytest.raises(FilterError) as info:
        store.query(collection, np.ones(DIM), limit=3, filters=[Match("colour", "red")])
    assert info.value.field == "colour"
    assert "unknown filter field" in info.value.reason


def test_alias_switch(store):
    alias = f"alias-{uuid.uuid4().hex[:8]}"
    first, second = collection_name(f"a{uuid.uuid4().hex[:8]}"), collection_name(f"b{uuid.uuid4().hex[:8]}")
    for name, seed in ((first, 1), (second, 2)):
        store.ensure_collection(name, DIM, FRAME_DIM)
        store.upsert(name, _points(2, seed=seed))
    try:
        assert store.resolve_alias(alias) is None
        assert store.set_alias(first, alias) is None
        assert store.resolve_alias(alias) == first
        # One update call: delete + create. The previous target is handed back.
        assert store.set_alias(second, alias) == first
        assert store.resolve_alias(alias) == second
        hit = store.query(alias, _points(1, seed=2)[0].video_vector, limit=1)[0]
        assert hit.score == pytest.approx(1.0, abs=1e-5)
        assert store.count(alias) == 2
        with pytest.raises(StoreError, match="live behind alias"):
            store.delete_collection(second)
        with pytest.raises(CollectionNotFound):
            store.set_alias(collection_name("does-not-exist"), alias)
        assert store.resolve_alias(alias) == second
    finally:
        assert store.delete_collection(first) is True
        assert store.delete_collection(second, force=True) is True
    assert store.delete_collection(first) is False


def test_default_alias_comes_from_settings(store, collection):
    previous = store.resolve_alias()
    store.set_alias(collection)
    assert store.resolve_alias() == store.resolve_alias(ALIAS) == collection
    if previous is not None and previous in store.list_collections():
        store.set_alias(previous)


def test_redelivered_upsert_overwrites_the_same_point(store, collection):
    rng = np.random.default_rng(3)
    first = _point(0, rng)
    second = _point(0, rng, title="updated")
    store.upsert(collection, [first])
    store.upsert(collection, [second])
    assert store.count(collection) == 1
    (stored,) = store.get(collection, ["vid-0"], with_vectors=True)
    assert stored.payload["metadata"]["title"] == "updated"
    np.testing.assert_allclose(stored.video_vector, second.video_vector, atol=1e-5)


def test_upsert_is_batched(store, collection):
    before = store.stats()
    store.upsert(collection, _points(8))  # upsert_batch=3 -> 3 + 3 + 2
    after = store.stats()
    assert after["upsert_requests"] - before["upsert_requests"] == 3
    assert after["points_written"] - before["points_written"] == 8
    assert store.count(collection) == 8
    assert store.upsert(collection, []) == 0


def test_scroll_reads_every_point_once(store, collection):
    store.upsert(collection, _points(8))
    pages = list(store.scroll(collection, batch_size=3, with_vectors=True))
    assert [len(p) for p in pages] == [3, 3, 2]
    ids = [v.video_id for page in pages for v in page]
    assert sorted(ids) == sorted(f"vid-{i}" for i in range(8))
    assert all(v.frames.shape == (T, FRAME_DIM) for page in pages for v in page)
    with pytest.raises(ValueError, match="batch_size"):
        next(store.scroll(collection, batch_size=0))


def test_missing_collection_is_collection_not_found(store):
    for call in (lambda: store.count("videos__missing"),
                 lambda: store.query("videos__missing", np.ones(DIM), limit=1),
                 lambda: store.get("videos__missing", ["x"]),
                 lambda: store.upsert("videos__missing", _points(1))):
        with pytest.raises(CollectionNotFound, match="videos__missing"):
            call()


def test_bad_requests(store, collection):
    with pytest.raises(StoreError, match="rejected"):
        store.query(collection, np.ones(DIM + 2), limit=1)  # wrong dimension
    with pytest.raises(ValueError, match="limit"):
        store.query(collection, np.ones(DIM), limit=0)
    with pytest.raises(ValueError, match="NaN"):
        store.query(collection, np.full(DIM, np.nan), limit=1)
    with pytest.raises(TypeError, match="VideoPoint"):
        store.upsert(collection, [{"video_id": "x"}])
    with pytest.raises(TypeError, match="not one string"):
        store.get(collection, "vid-1")
    with pytest.raises(TypeError, match="must be strings"):
        store.delete(collection, [1])


# ----------------------------------------------------------------------------- across modes

def test_both_modes_give_the_same_results(inproc_store, embedded_store):
    name = collection_name(f"p{uuid.uuid4().hex[:8]}")
    points = _points(8, seed=9)
    for store in (inproc_store, embedded_store):
        store.ensure_collection(name, DIM, FRAME_DIM)
        store.upsert(name, points)
    try:
        rng = np.random.default_rng(11)
        for filters in (None, [MatchAny("tags", ["odd"])], [Range("duration_s", gte=25)]):
            query = _unit(rng, DIM)
            a = inproc_store.query(name, query, limit=5, filters=filters, with_frames=True)
            b = embedded_store.query(name, query, limit=5, filters=filters, with_frames=True)
            assert [h.video_id for h in a] == [h.video_id for h in b]
            np.testing.assert_allclose([h.score for h in a], [h.score for h in b], atol=1e-6)
            assert [h.payload for h in a] == [h.payload for h in b]
            for x, y in zip(a, b):
                np.testing.assert_allclose(x.frames, y.frames)
        ids = [p.video_id for p in points]
        assert ([v.payload for v in inproc_store.get(name, ids)] ==
                [v.payload for v in embedded_store.get(name, ids)])
    finally:
        inproc_store.delete_collection(name)
        embedded_store.delete_collection(name)


# ----------------------------------------------------------------------------- embedded lifecycle

def _wait_until_gone(ray, name: str) -> None:
    # ray.kill returns before the actor is dead; wait (bounded) until its name is free,
    # so the next call deterministically meets the dead actor.
    for _ in range(400):
        try:
            ray.get_actor(name, namespace=RAY_NAMESPACE)
        except ValueError:
            return
        time.sleep(0.05)
    raise AssertionError(f"actor {name} still alive")


def test_killed_actor_is_store_unavailable_then_recovers(ray_local, tmp_path):
    settings = _settings(tmp_path / "q")
    store = open_store(settings)
    name = collection_name("kill")
    store.ensure_collection(name, DIM, FRAME_DIM)
    store.upsert(name, _points(4))
    actor = ray_local.get_actor(embedded_actor_name(settings.store.path), namespace=RAY_NAMESPACE)
    ray_local.kill(actor, no_restart=True)
    _wait_until_gone(ray_local, embedded_actor_name(settings.store.path))
    try:
        with pytest.raises(StoreUnavailable, match="unavailable"):
            store.count(name)
        # Transient: the next call starts a fresh actor on the same directory, and the
        # data written before the kill is all there.
        recovered = None
        for _ in range(20):
            try:
                recovered = store.count(name)
                break
            except StoreUnavailable:
                continue
        assert recovered == 4
    finally:
        shutdown_embedded_store(settings)


def test_first_call_waits_for_the_store_to_open_then_calls_are_timed(ray_local, tmp_path):
    """Opening takes longer than a call may (a new actor process, loading the points):
    the first call waits for the open, and store.timeout_s bounds each call after it."""
    settings = _settings(tmp_path / "q", timeout_s=0.3)
    store = open_store(settings)
    try:
        name = collection_name("slowopen")
        store.ensure_collection(name, DIM, FRAME_DIM)
        assert store.count(name) == 0
    finally:
        shutdown_embedded_store(settings)


def test_shutdown_releases_the_file_lock(ray_local, tmp_path):
    from qdrant_client import QdrantClient

    settings = _settings(tmp_path / "q")
    store = open_store(settings)
    store.ensure_collection(collection_name("lock"), DIM, FRAME_DIM)
    assert shutdown_embedded_store(settings) is True
    assert shutdown_embedded_store(settings) is False
    # Only one process may hold local mode's lock; now this one can.
    client = QdrantClient(path=settings.store.path)
    try:
        assert client.collection_exists(collection_name("lock"))
    finally:
        client.close()


def test_store_paths_get_distinct_actors(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "a")
    assert embedded_actor_name(tmp_path / "a") == embedded_actor_name(tmp_path / "link")
    assert embedded_actor_name(tmp_path / "a") != embedded_actor_name(tmp_path / "b")


def test_unreachable_server_is_store_unavailable():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Nothing listens on the port: the real client fails to connect.
    store = open_store(Settings(store=StoreSettings(url=f"http://127.0.0.1:{port}", timeout_s=2)))
    assert store.location == f"http://127.0.0.1:{port}"
    assert store.healthy() is False
    with pytest.raises(StoreUnavailable, match="unreachable"):
        store.count("videos__x")
    store.close()
