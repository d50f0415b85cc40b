"""Zero-downtime re-index and rollback against the real pieces: Qdrant local mode
behind the embedded store actor, local Ray, the Tansu broker with a real ingest worker
that keeps running (and following the alias) through every flip, Ray Serve answering
gRPC searches during each flip, and tiny open_clip models published to a registry.

The module is one story, in order: v1 is live; a new head (v2) is re-indexed from the
stored frames; a new frame encoder (v3) is re-indexed by decoding the videos again,
while a video is ingested and another deleted; then two rollbacks (v3 -> v2, whose
collection is caught up, and v2 -> v1 through the CLI, whose collection retention had
dropped, so it is re-built). Searches run throughout and never fail.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import grpc
import numpy as np
import pytest

from vidsearch.config import Settings
from vidsearch.services.trainer.reindex import ReindexError, reindex, rollback
from vidsearch.store import open_store, shutdown_embedded_store

from query_support import Client, base_settings, free_port, video_metadata, write_test_clip
from reindex_support import (TUNED_ENCODER, Searches, WorkerThread, aggregate_one, delete, load_version,
                             produce, publish_first, publish_new_frame_encoder, publish_new_head, registry_of,
                             run_cli, upsert, wait_for, write_config)

NUM_VIDEOS = 6
TIMEOUT_S = 120
# Serve replicas take no CPU slot: ray_local's 4 logical CPUs carry the worker's encoder
# actor, the re-index's encoder actor and a decode task (and, when the ingest tests ran
# first, their session encoder actor).
REPLICA_OPTIONS = {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0}}


@dataclass
class Env:
    settings: Settings
    config: Path
    video_root: Path
    worker: WorkerThread
    client: Client
    store: Any
    versions: dict[str, str]

    @property
    def alias(self) -> str:
        return self.settings.store.alias

    def collection(self, version: str) -> str:
        return f"{self.alias}__{version}"

    def ids(self, collection: str) -> set[str]:
        return {v.video_id for page in self.store.scroll(collection) for v in page}

    def production(self) -> str | None:
        return registry_of(self.settings).get_alias(self.settings.model.model_name, "production")

    def live_after_flip(self, version: str) -> None:
        """Wait until the search service and the ingest worker both moved to ``version``."""
        wait_for(lambda: self.client.search("a clip", top_k=1).model_version == version, TIMEOUT_S,
                 f"search answering with {version}")
        wait_for(lambda: self.worker.worker.model_version == version, TIMEOUT_S, f"the worker following {version}")


@pytest.fixture(scope="module")
def env(ray_local, broker, tmp_path_factory) -> Iterator[Env]:
    from ray import serve

    from vidsearch.services.query.deploy import deploy

    root = tmp_path_factory.mktemp("reindex-videos")
    settings = base_settings(bootstrap=broker.bootstrap, store_path=tmp_path_factory.mktemp("reindex-store"),
                             video_root=root, registry=tmp_path_factory.mktemp("reindex-registry"),
                             alias="videos", grpc_port=free_port())
    settings = settings.model_copy(update={"store": settings.store.model_copy(
        update={"reindex_grace_s": 1.5, "keep_collections": 2})})
    config = write_config(settings, tmp_path_factory.mktemp("reindex-config") / "settings.yaml")
    v1 = publish_first(settings)
    for i in range(NUM_VIDEOS):
        write_test_clip(root / f"vid-{i:02d}.mp4", i)

    from vidsearch.broker import ensure_topics

    ensure_topics(broker.bootstrap, [settings.broker.ingest_topic, settings.broker.dlq_topic], 4)
    worker = WorkerThread(settings)
    store = open_store(settings)
    channel = None
    try:
        produce(settings, [upsert(f"vid-{i:02d}", root / f"vid-{i:02d}.mp4", **video_metadata(i))
                           for i in range(NUM_VIDEOS)])
        wait_for(lambda: worker.error or (store.resolve_alias() == f"videos__{v1}"
                                          and store.count(f"videos__{v1}") == NUM_VIDEOS),
                 TIMEOUT_S, "the first videos to be ingested")
        assert worker.error is None, worker.error
        deploy(settings, ingress_options=REPLICA_OPTIONS, reranker_options=REPLICA_OPTIONS, http_port=free_port())
        channel = grpc.insecure_channel(f"127.0.0.1:{settings.serve.grpc_port}")
        client = Client(channel, settings.serve.app_name)
        wait_for(lambda: client.search("warm up", top_k=1, timeout=60).model_version == v1, TIMEOUT_S,
                 "the first search")
        yield Env(settings=settings, config=config, video_root=root, worker=worker, client=client, store=store,
                  versions={"v1": v1})
    finally:
        worker.stop()
        if channel is not None:
            channel.close()
        serve.shutdown()
        store.close()
        shutdown_embedded_store(settings)
    assert worker.error is None, worker.error


def test_stored_frames_reindex_flips_without_downtime_and_decodes_nothing(env):
    """New head, same frame encoder: every point's video vector is the new head over its
    stored frames, the frames and payload are kept, and nothing is decoded. Proof of the
    latter: the source videos are not on disk while it runs (a decode would fail and the
    video would be missing), and the report counts 0 decoded videos. An upsert and a
    delete that still reach the old collection right after the flip (a worker that has
    not noticed it yet) are carried over by the catch-up after the flip."""
    from vidsearch.store import VideoPoint
    from vidsearch.store_schema import rfc3339

    v1 = env.versions["v1"]
    v2 = env.versions["v2"] = publish_new_head(env.settings, v1, seed=3)
    old_collection = env.collection(v1)

    def late_writes(label: str, _report: Any) -> None:
        # Right after the flip, what a worker that has not noticed it yet does: one
        # upsert and one delete still land in the old collection.
        if label != "after flip 1":
            return
        (video,) = env.store.get(old_collection, ["vid-02"], with_vectors=True)
        payload = {**video.payload, "metadata": {**video.payload["metadata"], "title": "rewritten late"},
                   "ingested_at": rfc3339(datetime.now(timezone.utc))}
        env.store.upsert(old_collection, [VideoPoint("vid-02", video.video_vector, video.frames, payload)])
        env.store.delete(old_collection, ["vid-03"])

    away = env.video_root.with_name(env.video_root.name + "-away")
    env.video_root.rename(away)
    try:
        with Searches(env.client) as searches:
            report = reindex(env.settings, v2, progress=False, on_pass=late_writes)
            env.live_after_flip(v2)
    finally:
        away.rename(env.video_root)

    assert report.decoded == 0 and report.failed == []
    assert report.from_frames == NUM_VIDEOS + 1 and report.late == 1 and report.deleted == 1
    assert report.points == NUM_VIDEOS - 1
    assert (report.previous_collection, report.collection) == (env.collection(v1), env.collection(v2))
    assert env.store.resolve_alias() == env.collection(v2)
    assert env.production() == v2 == report.production
    assert registry_of(env.settings).get_alias(env.settings.model.model_name, "previous") == v1

    ids = sorted(env.ids(env.collection(v1)))
    old = {v.video_id: v for v in env.store.get(env.collection(v1), ids, with_vectors=True)}
    new = {v.video_id: v for v in env.store.get(env.collection(v2), ids, with_vectors=True)}
    assert sorted(new) == ids
    model = load_version(env.settings, v2)
    for video_id in ids:
        # Kept (Qdrant re-normalises cosine vectors on write, hence float rounding).
        np.testing.assert_allclose(new[video_id].frames, old[video_id].frames, atol=1e-6)
        np.testing.assert_allclose(new[video_id].video_vector, aggregate_one(model, new[video_id].frames),
                                   atol=1e-5)
        assert not np.allclose(new[video_id].video_vector, old[video_id].video_vector, atol=1e-3)
        assert new[video_id].payload == {**old[video_id].payload, "model_version": v2}
    assert new["vid-02"].payload["metadata"]["title"] == "rewritten late"
    assert "vid-03" not in new
    searches.check_swap(v1, v2)


def test_new_frame_encoder_reindex_decodes_again_and_keeps_what_is_ingested_meanwhile(env):
    """New frame encoder: the videos are decoded again from their uris and encoded by the
    new version's tower. A video ingested and one deleted through Kafka in the middle of
    the migration are in (and not in) the new collection; a uri that stopped decoding is
    reported and skipped; searches never fail; the worker follows with the new tower."""
    from google.protobuf import struct_pb2

    from vidsearch.services.ingest.encoder import EncoderInfo, frames_per_video
    from vidsearch.video import decode_video
    from vidsearch.v1 import search_pb2

    v2 = env.versions["v2"]
    v3 = env.versions["v3"] = publish_new_frame_encoder(env.settings, v2, seed=5)
    old_collection = env.collection(v2)
    # A video that was fine when ingested and whose file is garbage now.
    broken = env.video_root / "broken.mp4"
    write_test_clip(broken, 7)
    produce(env.settings, [upsert("broken", broken)])
    wait_for(lambda: "broken" in env.ids(old_collection), TIMEOUT_S, "the soon-broken video to be ingested")
    broken.write_bytes(b"not a video any more" * 50)

    before = env.ids(old_collection)
    during = env.video_root / "during.mp4"
    write_test_clip(during, 8)
    seen: list[str] = []

    def meanwhile(label: str, _report: Any) -> None:
        seen.append(label)
        if label != "pass 1":
            return
        # Between the bulk pass and the catch-up: the live collection is still v2's.
        produce(env.settings, [upsert("during", during, title="ingested during the re-index"), delete("vid-00")])
        wait_for(lambda: "during" in env.ids(old_collection) and "vid-00" not in env.ids(old_collection),
                 TIMEOUT_S, "the worker to write the old collection during the re-index")

    with Searches(env.client) as searches:
        report = reindex(env.settings, v3, progress=False, on_pass=meanwhile)
        env.live_after_flip(v3)
    searches.check_swap(v2, v3)
    assert seen[0] == "pass 1" and seen[-1] == "final" and any(s.startswith("after flip") for s in seen)

    new_collection = env.collection(v3)
    expected = (before - {"vid-00", "broken"}) | {"during"}
    assert env.ids(new_collection) == expected
    assert [(f.video_id, f.error_class) for f in report.failed] == [("broken", "undecodable")]
    assert report.decoded == len(before) + 1  # pass 1 (with broken), then "during"
    assert report.from_frames == 0 and report.deleted >= 1
    assert report.points == len(expected)
    assert env.production() == v3
    assert report.dropped == [env.collection(env.versions["v1"])]  # keep 2: v3 and v2 (rollback target)

    ids = sorted(expected - {"during"})
    old = {v.video_id: v for v in env.store.get(old_collection, ids, with_vectors=True)}
    new = {v.video_id: v for v in env.store.get(new_collection, sorted(expected), with_vectors=True)}
    assert len(old) == len(ids)
    model = load_version(env.settings, v3)
    for video_id in ids:
        assert new[video_id].frames.shape == old[video_id].frames.shape
        assert not np.allclose(new[video_id].frames, old[video_id].frames, atol=1e-3)
        assert new[video_id].payload["frame_encoder"] == TUNED_ENCODER
        assert new[video_id].payload["model_version"] == v3
        assert new[video_id].payload["ingested_at"] == old[video_id].payload["ingested_at"]
        assert new[video_id].payload["metadata"] == old[video_id].payload["metadata"]
        np.testing.assert_allclose(new[video_id].video_vector, aggregate_one(model, new[video_id].frames),
                                   atol=1e-5)
    # The frames really are the new tower's over the decoded video.
    info = EncoderInfo(model_version=v3, frame_encoder_id=TUNED_ENCODER, embed_dim=model.embed_dim,
                       image_size=model.image_size, num_frames=model.config.num_frames, max_frames=16, device="cpu")
    decoded = decode_video(new["vid-01"].payload["uri"], env.settings.decode,
                           num_frames=frames_per_video(env.settings.decode, info), resize_to=model.image_size)
    import torch

    with torch.inference_mode():
        expected_frames = model.encode_frames(model.preprocess(decoded.frames)).numpy()
    np.testing.assert_allclose(new["vid-01"].frames, expected_frames, atol=1e-4)

    # The video ingested during the migration is searchable in the new index.
    assert new["during"].payload["frame_encoder"] == TUNED_ENCODER
    found = env.client.get_video("during")
    assert found.index == new_collection
    response = env.client.search("a clip", top_k=5, filters=[
        search_pb2.FieldFilter(field="video_id", equals=struct_pb2.Value(string_value="during"))])
    assert [r.video_id for r in response.results] == ["during"] and response.model_version == v3

    # After the flip the worker writes the new collection with the new frame tower.
    after = env.video_root / "after.mp4"
    write_test_clip(after, 9)
    produce(env.settings, [upsert("after", after)])
    stored = wait_for(lambda: env.store.get(new_collection, ["after"]), TIMEOUT_S, "a video ingested after the flip")
    assert stored[0].payload["frame_encoder"] == TUNED_ENCODER and stored[0].payload["model_version"] == v3
    assert "after" not in env.ids(old_collection)
    assert env.worker.worker.switches == 2


def test_rollbacks_catch_up_or_rebuild_the_old_collection_without_downtime(env):
    """v3 -> v2 (the manifest's parent; its collection was kept and is caught up with what
    happened since), then v2 -> v1 through the CLI (its collection was dropped, so it is
    re-built from v2's stored frames). Searches never fail during either flip."""
    v1, v2, v3 = env.versions["v1"], env.versions["v2"], env.versions["v3"]
    current = env.ids(env.collection(v3))

    with Searches(env.client) as searches:
        report = rollback(env.settings, progress=False)
        env.live_after_flip(v2)
    searches.check_swap(v3, v2)
    assert report.version == v2 and report.previous_version == v3
    assert env.production() == v2
    # Only what changed since v2 was live moved: "after" (v3's tower) is decoded again
    # with v2's, "broken" (skipped by v3) leaves v2's collection too.
    assert report.decoded == 1 and report.from_frames == 0 and report.failed == []
    assert env.ids(env.collection(v2)) == current
    (after,) = env.store.get(env.collection(v2), ["after"])
    assert after.payload["frame_encoder"] == load_version(env.settings, v2).frame_encoder_id
    assert after.payload["model_version"] == v2

    assert env.collection(v1) not in env.store.list_collections()
    with Searches(env.client) as searches:
        result = run_cli(["--config", str(env.config), "models", "rollback", "--no-progress"])
        assert result.code == 0, result.err
        env.live_after_flip(v1)
    searches.check_swap(v2, v1)
    assert f"rolled back {v2} -> {v1}" in result.out
    assert env.production() == v1
    assert env.ids(env.collection(v1)) == current
    model = load_version(env.settings, v1)
    for video in env.store.get(env.collection(v1), sorted(current), with_vectors=True):
        np.testing.assert_allclose(video.video_vector, aggregate_one(model, video.frames), atol=1e-5)
    assert env.collection(v3) not in env.store.list_collections()  # kept: v1 (live) and v2 (previous)


def test_models_cli_lists_shows_and_explains_errors_in_one_line(env, tmp_path):
    v1, v2, v3 = env.versions["v1"], env.versions["v2"], env.versions["v3"]
    config = ["--config", str(env.config)]

    listing = run_cli([*config, "models", "list"])
    assert listing.code == 0, listing.err
    lines = {line.split()[0]: line for line in listing.out.splitlines() if line.split()}
    assert {v1, v2, v3} <= set(lines)
    assert "production" in lines[v1] and "videos (live)" in lines[v1] and "val.student.R@1=0.25" in lines[v1]
    assert "previous" in lines[v2] and "val.student.R@1=0.5" in lines[v2]
    assert TUNED_ENCODER in lines[v3] and v2 in lines[v3]  # its parent

    rows = [json.loads(line) for line in run_cli([*config, "models", "list", "--json"]).out.splitlines()]
    assert {r["version"]: r["parent"] for r in rows} == {v1: None, v2: v1, v3: v2}

    shown = run_cli([*config, "models", "show", v3])
    assert shown.code == 0
    manifest = registry_of(env.settings).get_manifest(env.settings.model.model_name, v3)
    assert json.loads(shown.out) == manifest.to_dict()
    assert json.loads(run_cli([*config, "models", "show", "production"]).out)["version"] == v1

    again = run_cli([*config, "reindex", "--no-progress"])  # production is live already
    assert again.code == 0 and "already live" in again.out

    def one_line_error(args: list[str], expected: str) -> None:
        result = run_cli(args)
        assert result.code == 1, (args, result)
        assert result.err.count("\n") == 1 and expected in result.err, (args, result.err)

    unknown = "20000101T000000-000000"
    one_line_error([*config, "models", "show", unknown], f"has no version '{unknown}'")
    one_line_error([*config, "models", "rollback", "--to", unknown], f"has no version '{unknown}'")
    one_line_error([*config, "models", "rollback", "--to", v1], f"version {v1} is already live")
    one_line_error([*config, "reindex", "--version", "staging"], "has no alias 'staging'")

    empty = env.settings.model_copy(update={"model": env.settings.model.model_copy(
        update={"registry_root": str(tmp_path / "no-registry")})})
    empty_config = ["--config", str(write_config(empty, tmp_path / "empty.yaml"))]
    one_line_error([*empty_config, "models", "list"], "no versions of model 'vidsearch'")
    one_line_error([*empty_config, "reindex"], "has no alias 'production'")

    unindexed = env.settings.model_copy(update={"store": env.settings.store.model_copy(update={"alias": "nothing"})})
    unindexed_config = ["--config", str(write_config(unindexed, tmp_path / "unindexed.yaml"))]
    one_line_error([*unindexed_config, "models", "rollback"], "points at no collection")
    with pytest.raises(ReindexError, match="points at no collection"):
        reindex(unindexed, v2, progress=False)


def test_a_batch_in_flight_when_the_alias_flips_is_encoded_again_for_the_new_version(env):
    """A worker that polled a batch before a flip writes it to the new collection, encoded
    with the new version, not to the old one. (Its own alias, topic and group; it is
    stepped by hand, so the flip lands while the batch is between poll and store write.)"""
    from vidsearch.services.ingest.worker import IngestWorker

    v2 = env.versions["v2"]
    settings = base_settings(bootstrap=env.settings.broker.bootstrap, store_path=Path(env.settings.store.path),
                             video_root=env.video_root, registry=Path(env.settings.model.registry_root),
                             alias="retarget", alias_poll_s=1.0)
    settings = settings.model_copy(update={"store": settings.store.model_copy(update={"reindex_grace_s": 1.5})})
    from vidsearch.broker import ensure_topics

    ensure_topics(settings.broker.bootstrap, [settings.broker.ingest_topic, settings.broker.dlq_topic], 4)
    clip = write_test_clip(env.video_root / "caught.mp4", 10)
    worker = IngestWorker(settings, client_id="retarget-tests")
    try:
        worker.start()
        old = worker.collection
        assert old == f"retarget__{env.versions['v1']}"  # first boot: production
        produce(settings, [upsert("caught", clip)])
        assert worker.run_until(lambda w: w.inflight_batches == 1, TIMEOUT_S)
        # The flip happens while the batch is polled but not written; the re-index's
        # grace (1.5 s) outlasts the worker's alias poll (1 s), so its next step sees it.
        report = reindex(settings, v2, progress=False)
        assert report.collection == f"retarget__{v2}" and report.points == 0
        assert worker.run_until(lambda w: w.inflight_batches == 0 and w.switches == 1, TIMEOUT_S)
        assert worker.collection == report.collection and worker.model_version == v2
    finally:
        worker.close()
    assert env.store.get(old, ["caught"]) == []
    (stored,) = env.store.get(report.collection, ["caught"], with_vectors=True)
    assert stored.payload["model_version"] == v2
    np.testing.assert_allclose(stored.video_vector, aggregate_one(load_version(env.settings, v2), stored.frames),
                               atol=1e-5)
    assert worker.metrics.value("vidsearch_ingest_videos_total", op="upsert") == 1
