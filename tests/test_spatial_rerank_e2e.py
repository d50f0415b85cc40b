"""The spatial re-ranker end to end: real mp4 clips through the Tansu broker and a real
IngestWorker into Qdrant (region tokens stored beside the frames), Ray Serve answering
gRPC with the ingress and the Reranker, and the trainer's re-index in both directions
between a version that reads regions and one that does not.

The module is one story, in order: the tiny-spatial version (non-zero read-outs) is live;
searches re-rank with the scores the spatial scorer gives the stored frames and regions;
an index without region tokens, served by a spatial version, answers with recall only;
then re-indexes: spatial -> spatial (new head, same tokens: nothing decoded), spatial ->
a plain cross-encoder version (tokens dropped), plain -> spatial (decoded again).
"""
from __future__ import annotations

import numpy as np
import pytest

from vidsearch.model_versions import load_model_for_version
from vidsearch.services.reranker.scoring import RerankRequest, pad_frames, score_requests
from vidsearch.services.trainer.reindex import reindex
from vidsearch.store import VideoPoint, collection_name, open_store
from vidsearch.store_schema import REGION_CODEC_FIELD, REGION_ENCODER_FIELD

from query_support import (QueryData, base_settings, ingest_query_data, query_service,  # noqa: F401
                           wait_until)
from reindex_support import load_version, publish_new_head, registry_of

NUM_VIDEOS = 4
QUERY = "a bright square on the left moves to the right"
TOL = 1e-4
CELLS, WIDTH = 4, 16  # tiny-spatial: 2x2 grid, 16-d tokens


@pytest.fixture(scope="module")
def query_data(ray_local, broker, tmp_path_factory) -> QueryData:
    """What query_service serves in this module: the tiny-spatial preset's clips (this
    module's own store and registry, not the session's tiny index)."""
    root = tmp_path_factory.mktemp("spatial-videos")
    settings = base_settings(bootstrap=broker.bootstrap, store_path=tmp_path_factory.mktemp("spatial-store"),
                             video_root=root, registry=tmp_path_factory.mktemp("spatial-registry"),
                             alias="videos", preset="tiny-spatial")
    settings = settings.model_copy(update={"store": settings.store.model_copy(update={"reindex_grace_s": 0.5, "keep_collections": 10})})
    return ingest_query_data(settings, root, NUM_VIDEOS)


def padded_regions(videos, longest: int) -> np.ndarray:
    out = np.zeros((len(videos), longest, CELLS, WIDTH), np.float32)
    for k, video in enumerate(videos):
        out[k, :video.regions.shape[0]] = video.regions
    return out


def stored(data: QueryData, collection: str | None = None):
    return open_store(data.settings).get(collection or data.collection, data.video_ids, with_vectors=True)


def expected_rerank(data: QueryData, version: str, collection: str) -> dict[str, float]:
    """The spatial scorer's scores of QUERY for every stored video, computed in-process with
    ``version`` from the frames and region tokens the store holds."""
    model = load_model_for_version(data.settings, version)
    videos = stored(data, collection)
    frames, mask = pad_frames([v.frames for v in videos])
    [(scores, _)] = score_requests(model, [RerankRequest(text=QUERY, frames=frames, mask=mask, model_version=version,
                                                         regions=padded_regions(videos, frames.shape[1]))])
    return {v.video_id: float(s) for v, s in zip(videos, scores)}


def search(service, **fields):
    return service.client().search(QUERY, top_k=NUM_VIDEOS, **fields)


def test_ingest_stores_region_tokens_beside_the_frames(query_data):
    model = load_model_for_version(query_data.settings, query_data.model_version)
    assert model.uses_regions
    videos = stored(query_data)
    assert len(videos) == NUM_VIDEOS
    for video in videos:
        assert video.regions is not None and video.regions.shape == (video.frames.shape[0], CELLS, WIDTH)
        # uint8 codes: unit tokens come back unit to within the code's rounding.
        np.testing.assert_allclose(np.linalg.norm(video.regions, axis=-1), 1.0, atol=0.05)
        assert video.payload[REGION_ENCODER_FIELD] == model.region_encoder_id
        assert video.payload[REGION_CODEC_FIELD] == "uint8"
    # Different clips, different tokens.
    assert np.abs(videos[0].regions[0] - videos[1].regions[0]).max() > 1e-2


def test_rerank_scores_are_the_spatial_scorers_over_the_stored_regions(query_service):
    data = query_service.data
    want = expected_rerank(data, data.model_version, data.collection)
    response = search(query_service)
    assert response.reranked and response.model_version == data.model_version
    assert sorted(r.video_id for r in response.results) == data.video_ids
    for result in response.results:
        assert result.rerank_score == pytest.approx(want[result.video_id], abs=TOL), result.video_id
    assert max(want.values()) - min(want.values()) > 1e-3  # the read-outs are not zero: scores differ

    # The regions are on the scoring path: the same frames with each video's regions
    # mirrored left <-> right score differently.
    model = load_model_for_version(data.settings, data.model_version)
    videos = stored(data)
    frames, mask = pad_frames([v.frames for v in videos])
    mirrored = padded_regions(videos, frames.shape[1])[:, :, [1, 0, 3, 2]]
    [(other, _)] = score_requests(model, [RerankRequest(QUERY, frames, mask, data.model_version, regions=mirrored)])
    assert max(abs(float(s) - want[v.video_id]) for v, s in zip(videos, other)) > 1e-4
    assert query_service.ingress_stats()["outcomes"].get("rerank_no_regions", 0) == 0


def test_get_video_is_unaffected_by_region_tokens(query_service):
    data = query_service.data
    response = query_service.client().get_video("vid-01")
    assert response.video_id == "vid-01" and response.index == data.collection and not response.payload_notice
    payload = dict(response.payload)
    assert payload["video_id"] == "vid-01" and payload[REGION_ENCODER_FIELD].endswith(":regions:2x2:16")
    assert REGION_CODEC_FIELD not in payload
    assert list(payload["frame_timestamps"]) and payload["model_version"] == data.model_version
    for result in search(query_service).results:
        assert REGION_CODEC_FIELD not in dict(result.payload)


def test_a_spatial_version_over_an_index_without_regions_answers_with_recall(query_service):
    """An index whose points carry no region tokens (built before the spatial version,
    copied here without them), served by the spatial version: the search answers, with
    reranked=false and the recall order, and re-ranks again once the live index has them."""
    from vidsearch.models.persist import save_model_version

    data = query_service.data
    store = open_store(data.settings)
    registry = registry_of(data.settings)
    model = load_version(data.settings, data.model_version)
    version = save_model_version(registry, data.settings.model.model_name, model, parent=data.model_version)
    bare = collection_name(version, data.settings.store.alias)
    points = []
    for video in stored(data):
        payload = {k: v for k, v in video.payload.items() if k not in (REGION_CODEC_FIELD, REGION_ENCODER_FIELD)}
        points.append(VideoPoint(video.video_id, video.video_vector, video.frames,
                                 {**payload, "model_version": version}))
    store.ensure_collection(bare, model.embed_dim, model.embed_dim)
    store.upsert(bare, points)
    assert all(v.regions is None for v in stored(data, bare))
    try:
        store.set_alias(bare)
        wait_until(lambda: search(query_service).model_version == version, 60, "the region-less index to go live")
        response = search(query_service)
        assert response.reranked is False and response.index == bare
        recall = [r.recall_score for r in response.results]
        assert recall == sorted(recall, reverse=True) and len(recall) == NUM_VIDEOS
        assert all(r.rerank_score == 0.0 for r in response.results)
        assert query_service.ingress_stats()["outcomes"].get("rerank_no_regions", 0) >= 1
    finally:
        store.set_alias(data.collection)
    wait_until(lambda: search(query_service).reranked, 60, "re-ranking on the spatial index again")


def test_reindex_spatial_to_spatial_keeps_the_stored_frames_and_regions(query_service):
    data = query_service.data
    v2 = publish_new_head(data.settings, data.model_version, seed=21)
    model = load_version(data.settings, v2)
    assert model.region_encoder_id == load_version(data.settings, data.model_version).region_encoder_id
    report = reindex(data.settings, v2, progress=False)
    assert report.from_frames == NUM_VIDEOS and report.decoded == 0 and report.failed == []
    old = {v.video_id: v for v in stored(data)}
    new = {v.video_id: v for v in stored(data, report.collection)}
    assert sorted(new) == data.video_ids
    for video_id, video in new.items():
        np.testing.assert_allclose(video.frames, old[video_id].frames, atol=1e-6)
        np.testing.assert_allclose(video.regions, old[video_id].regions, atol=1e-6)
        assert video.payload[REGION_ENCODER_FIELD] == model.region_encoder_id
    response = wait_until(lambda: (r := search(query_service)).model_version == v2 and r.reranked and r, 60,
                          "the re-indexed spatial version to go live")
    want = expected_rerank(data, v2, report.collection)
    for result in response.results:
        assert result.rerank_score == pytest.approx(want[result.video_id], abs=TOL)


def test_reindex_from_a_plain_version_to_a_spatial_one_decodes_again(query_service):
    """spatial -> plain cross-encoder (same frame tower): kept from the frames, tokens
    dropped; plain -> spatial: the points have no tokens, so the videos are decoded again
    and the new points carry them."""
    from vidsearch.models import build_model, load_model_config
    from vidsearch.models.persist import BASE_SEED, save_model_version

    data = query_service.data
    registry = registry_of(data.settings)
    name = data.settings.model.model_name
    spatial = load_version(data.settings, registry.get_alias(name, "production"))
    plain_model = build_model(load_model_config("tiny"), device="cpu", seed=BASE_SEED)
    assert plain_model.frame_encoder_id == spatial.frame_encoder_id  # the same frame tower
    plain = save_model_version(registry, name, plain_model, training={"note": "spatial e2e: plain cross-encoder"})
    to_plain = reindex(data.settings, plain, progress=False)
    assert to_plain.from_frames == NUM_VIDEOS and to_plain.decoded == 0
    for video in stored(data, to_plain.collection):
        assert video.regions is None
        assert REGION_ENCODER_FIELD not in video.payload and REGION_CODEC_FIELD not in video.payload
    wait_until(lambda: search(query_service).model_version == plain, 60, "the plain version to go live")

    back = save_model_version(registry, name, spatial, parent=plain, training={"note": "spatial e2e: back"})
    to_spatial = reindex(data.settings, back, progress=False)
    assert to_spatial.decoded == NUM_VIDEOS and to_spatial.from_frames == 0 and to_spatial.failed == []
    first = {v.video_id: v for v in stored(data)}
    decoded = stored(data, to_spatial.collection)
    for video in decoded:
        assert video.regions is not None and video.regions.shape == (video.frames.shape[0], CELLS, WIDTH)
        # The same tower decoding the same file: the tokens the first ingest stored.
        np.testing.assert_allclose(video.regions, first[video.video_id].regions, atol=0.02)
        assert video.payload["frame_encoder"] == spatial.frame_encoder_id
    response = wait_until(lambda: (r := search(query_service)).model_version == back and r.reranked and r, 60,
                          "the spatial version to go live again, re-ranking")
    want = expected_rerank(data, back, to_spatial.collection)
    for result in response.results:
        assert result.rerank_score == pytest.approx(want[result.video_id], abs=TOL)
    # The re-decoded points name what computed their tokens, as ingested ones do, so the next
    # re-index to a version with the same tokens keeps them instead of decoding again.
    assert [v.payload.get(REGION_ENCODER_FIELD) for v in decoded] == [spatial.region_encoder_id] * NUM_VIDEOS
