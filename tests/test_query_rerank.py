"""Re-ranking over gRPC: fusion follows beta with the cross-encoder scores the
Reranker app really computes, the service degrades to recall when the reranker is
gone and recovers when it is back, and concurrent requests are batched."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from vidsearch.model_versions import load_model_for_version
from vidsearch.services.query.fusion import minmax
from vidsearch.services.reranker.scoring import RerankRequest, pad_frames, score_requests
from vidsearch.store import open_store

from query_support import (NUM_VIDEOS, publish_and_reindex, query_data, query_service, serve_settings,  # noqa: F401
                           wait_until)

QUERY = "a green clip where something moves to the left"
TOL = 1e-4


@pytest.fixture(scope="module")
def expected(query_service) -> dict[str, dict[str, float]]:
    """Recall cosines and cross-encoder scores of QUERY for every stored video, computed
    in-process with the version that built the index and the frames the store holds."""
    data = query_service.data
    model = load_model_for_version(data.settings, data.model_version)
    videos = open_store(data.settings).get(data.collection, data.video_ids, with_vectors=True)
    text = model.encode_text([QUERY]).detach().numpy()[0]
    recall = {v.video_id: float(text @ v.video_vector / np.linalg.norm(v.video_vector)) for v in videos}
    frames, mask = pad_frames([v.frames for v in videos])
    [(scores, _relevance)] = score_requests(
        model, [RerankRequest(text=QUERY, frames=frames, mask=mask, model_version=data.model_version)])
    rerank = {v.video_id: float(s) for v, s in zip(videos, scores)}
    return {"recall": recall, "rerank": rerank}


def order(scores: dict[str, float]) -> list[str]:
    return sorted(scores, key=lambda vid: -scores[vid])


def fused(expected: dict[str, dict[str, float]], beta: float) -> dict[str, float]:
    ids = list(expected["recall"])
    recall = minmax(np.array([expected["recall"][i] for i in ids]))
    rerank = minmax(np.array([expected["rerank"][i] for i in ids]))
    return dict(zip(ids, beta * rerank + (1 - beta) * recall))


def search(service, **fields):
    return service.client().search(QUERY, top_k=NUM_VIDEOS, **fields)


def test_rerank_scores_are_the_cross_encoders(query_service, expected):
    response = search(query_service)
    assert response.reranked
    for result in response.results:
        assert result.recall_score == pytest.approx(expected["recall"][result.video_id], abs=TOL)
        assert result.rerank_score == pytest.approx(expected["rerank"][result.video_id], abs=TOL)
    # Otherwise the beta tests below could not tell the two rankings apart.
    assert order(expected["recall"]) != order(expected["rerank"])


@pytest.mark.parametrize("beta", [0.0, 1.0, 0.3, 0.7])
def test_fused_order_follows_beta(query_service, expected, beta):
    response = search(query_service, beta=beta)
    assert response.reranked
    want = fused(expected, beta)
    got = [(r.video_id, r.score) for r in response.results]
    for video_id, score in got:
        assert score == pytest.approx(want[video_id], abs=TOL), video_id
    scores = [score for _, score in got]
    assert scores == sorted(scores, reverse=True)
    if beta == 0.0:
        assert [vid for vid, _ in got] == order(expected["recall"])
    if beta == 1.0:
        assert [vid for vid, _ in got] == order(expected["rerank"])


def test_server_default_beta_is_used_when_unset(query_service, expected):
    beta = query_service.settings.serve.beta
    response = search(query_service)
    want = fused(expected, beta)
    assert all(r.score == pytest.approx(want[r.video_id], abs=TOL) for r in response.results)


def test_best_moment_is_a_stored_frame_time(query_service):
    for response in (search(query_service), search(query_service, rerank=False)):
        for result in response.results:
            times = list(result.payload["frame_timestamps"])
            assert result.best_moment_seconds == pytest.approx(
                min(times, key=lambda t: abs(t - result.best_moment_seconds)), abs=1e-5)


def test_concurrent_searches_all_succeed_and_are_batched(query_service):
    client = query_service.client()
    queries = [f"clip number {i} in {('red', 'green', 'blue')[i % 3]}" for i in range(32)]
    with ThreadPoolExecutor(max_workers=32) as pool:
        responses = list(pool.map(lambda q: client.search(q, top_k=5), queries))
    assert all(len(r.results) == 5 and r.reranked for r in responses)
    ingress = query_service.ingress_stats()
    reranker = query_service.reranker_stats()
    assert max(ingress["text_batch_sizes"]) > 1, ingress
    assert max(reranker["batch_sizes"]) > 1, reranker
    assert max(ingress["rerank_batch_sizes"]) > 1, ingress
    assert ingress["live"] == {"model_version": query_service.data.model_version,
                               "collection": query_service.data.collection}


def test_reranker_down_falls_back_to_recall_and_recovers(query_service, expected):
    from ray import serve

    serve.delete(query_service.settings.serve.reranker_app_name)
    try:
        response = search(query_service)
        assert response.reranked is False
        assert [r.video_id for r in response.results] == order(expected["recall"])
        assert all(r.rerank_score == 0.0 for r in response.results)
        stats = query_service.ingress_stats()
        assert any(k.startswith("rerank_") for k in stats["outcomes"]), stats
    finally:
        query_service.deploy_reranker()
    recovered = wait_until(lambda: search(query_service).reranked, 120, "re-ranking after the redeploy")
    assert recovered
    response = search(query_service, beta=1.0)
    assert [r.video_id for r in response.results] == order(expected["rerank"])


def test_a_failing_reranker_degrades_to_recall(query_service, expected, tmp_path):
    """A reranker that raises (here: it cannot load the index's model version, because
    its registry is empty) costs re-ranking, not the search."""
    from ray import serve

    data = query_service.data
    settings = serve_settings(data, query_service.settings.serve.grpc_port)
    broken = settings.model_copy(update={"model": settings.model.model_copy(update={"registry_root": str(tmp_path)})})
    query_service.deploy_pair(settings, broken)
    try:
        response = query_service.client(settings.serve.app_name).search(QUERY, top_k=NUM_VIDEOS)
        assert response.reranked is False
        assert [r.video_id for r in response.results] == order(expected["recall"])
        outcomes = query_service.ingress_stats(settings.serve.app_name)["outcomes"]
        assert outcomes.get("recall_only") == 1 and sum(v for k, v in outcomes.items() if k.startswith("rerank_")) == 1
    finally:
        serve.delete(settings.serve.app_name, _blocking=False)
        serve.delete(settings.serve.reranker_app_name, _blocking=False)


def expected_scores(data, version: str, query: str) -> dict[str, dict[str, float]]:
    """Recall and rerank scores of ``query`` under one model version (from the registry)."""
    settings = data.settings
    model = load_model_for_version(settings, version)
    collection = f"{settings.store.alias}__{version}"
    videos = open_store(settings).get(collection, data.video_ids, with_vectors=True)
    text = model.encode_text([query]).detach().numpy()[0]
    frames, mask = pad_frames([v.frames for v in videos])
    [(scores, _)] = score_requests(model, [RerankRequest(text=query, frames=frames, mask=mask, model_version=version)])
    return {"recall": {v.video_id: float(text @ v.video_vector / np.linalg.norm(v.video_vector)) for v in videos},
            "rerank": {v.video_id: float(s) for v, s in zip(videos, scores)}}


def test_alias_flip_switches_versions_without_mixing_them(query_service):
    """A new version goes live by flipping the alias; while searches run concurrently,
    every response uses one version end to end: its index, its text tower (recall
    scores) and its cross-encoder (rerank scores)."""
    import threading

    data = query_service.data
    store = open_store(data.settings)
    new_version, new_collection = publish_and_reindex(data)
    want = {data.model_version: expected_scores(data, data.model_version, QUERY),
            new_version: expected_scores(data, new_version, QUERY)}
    assert want[new_version]["recall"] != pytest.approx(want[data.model_version]["recall"], abs=TOL)

    responses, stop = [], threading.Event()

    def keep_searching() -> None:
        while not stop.is_set():
            responses.append(search(query_service))

    threads = [threading.Thread(target=keep_searching) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        store.set_alias(new_collection)
        wait_until(lambda: search(query_service).model_version == new_version, 60, "the new version to go live")
        store.set_alias(data.collection)  # and back: the cached old version serves again
        wait_until(lambda: search(query_service).model_version == data.model_version, 60, "the flip back")
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        store.set_alias(data.collection)

    versions = {r.model_version for r in responses}
    assert versions == {data.model_version, new_version}, versions
    for response in responses:
        version = response.model_version
        assert response.index == f"{data.settings.store.alias}__{version}"
        for result in response.results:
            assert result.recall_score == pytest.approx(want[version]["recall"][result.video_id], abs=TOL)
            if response.reranked:
                assert result.rerank_score == pytest.approx(want[version]["rerank"][result.video_id], abs=TOL)
    assert any(r.reranked and r.model_version == new_version for r in responses)
    assert set(query_service.ingress_stats()["cached_versions"]) == {data.model_version, new_version}
    assert new_version in query_service.reranker_stats()["model_versions"]
