"""The Ray Serve gRPC ingress of ``vidsearch.v1.SearchService``.

Search: validate -> encode the text (batched across concurrent requests) ->
recall from the live collection -> re-rank on the separate Reranker app within a
share of the deadline -> fuse -> respond. A request captures one
:class:`LiveIndex` (model + collection) at its start and uses only that, so a
response never mixes model versions (see ``live.py``).

Status codes are set through Serve's ``grpc_context`` (``RayServegRPCContext``):
the method sets code and details and returns an empty message, which the Serve
gRPC proxy turns into that status for the client.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, defaultdict
from typing import Any

import grpc
import numpy as np
import torch
from ray import serve

from vidsearch.config import Settings
from vidsearch.model_versions import ModelCache, load_model_for_version
from vidsearch.models import VideoTextModel
from vidsearch.services.reranker.deployment import DEPLOYMENT_NAME as RERANKER_DEPLOYMENT
from vidsearch.services.reranker.scoring import RerankRequest, RerankResult
from vidsearch.store import CollectionNotFound, StoreError, StoreUnavailable, open_store
from vidsearch.store_schema import FilterError, FilterSchema
from vidsearch.telemetry import log_event
from vidsearch.v1 import search_pb2

from .auth import is_authorized
from .errors import RequestError, RpcFailure
from .live import LiveIndex, LiveIndexTracker
from .rerank_breaker import BreakerOpened, RerankBreaker
from .response import Candidates, build_results, pad_groups, stage_timings, video_response
from .deadline import deadline_from_metadata
from .validation import SearchParams, validate_search, validate_video_id

log = logging.getLogger(__name__)

DEPLOYMENT_NAME = "SearchIngress"
CACHED_VERSIONS = 2
# Trailing metadata of a Search answered recall-only although re-ranking was asked for:
# why (circuit_open, also for a call released when the breaker opened while it waited; timeout, error,
# no_time_left, no_region_tokens, version_mismatch).
RERANK_SKIPPED_METADATA = "vidsearch-rerank-skipped"


def text_side(model: VideoTextModel) -> VideoTextModel:
    """Drop the vision tower and the slow scorer: the ingress only encodes text.

    For ViT-B/32 the vision tower is most of the weights; the reranker keeps its
    own full copy of the same version.
    """
    model.scorer = None
    model.scorer_text = None
    if hasattr(model.clip, "visual"):
        model.clip.visual = None
    return model


def encode_grouped(items: list[tuple[str, LiveIndex]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Encode queries that may belong to different live versions: one forward pass
    per model, each query with the model its request captured.

    Per query: (token features[L,D], sentence vector[D]). The vector is the recall
    query; both go to the reranker, which then needs no text pass of its own.
    """
    groups: dict[int, list[int]] = defaultdict(list)
    for i, (_, live) in enumerate(items):
        groups[id(live.model)].append(i)
    encoded: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(items)
    with torch.inference_mode():
        for indices in groups.values():
            model = items[indices[0]][1].model
            rows = model.encode_text_features([items[i][0] for i in indices]).rows()
            for row, i in zip(rows, indices):
                encoded[i] = row
    return encoded  # type: ignore[return-value]


@serve.deployment(name=DEPLOYMENT_NAME, max_ongoing_requests=128)
class SearchIngress:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        key = settings.serve.api_key
        self._api_key = key.get_secret_value() if key is not None else None
        self._store = open_store(settings)
        self._models = ModelCache(lambda version: text_side(load_model_for_version(settings, version)),
                                  capacity=CACHED_VERSIONS)
        self._live = LiveIndexTracker(self._store, settings.store.alias, self._models.get,
                                      settings.serve.alias_poll_s)
        try:
            self._live.refresh()
        except Exception as exc:  # noqa: BLE001 - the replica must start even without an index
            log_event(log, "no live index at startup", logging.WARNING, error=str(exc))
        self._live.start()
        self._reranker: Any = None
        # The reranker request of the latest search: what the breaker's background probe sends.
        self._last_rerank_request: RerankRequest | None = None
        self._breaker = RerankBreaker(settings.serve, probe=self._probe_reranker)
        self._text_batches: Counter[int] = Counter()
        self._rerank_batches: Counter[int] = Counter()
        self._outcomes: Counter[str] = Counter()
        self._encode_batch.set_max_batch_size(settings.serve.text_batch_size)
        self._encode_batch.set_batch_wait_timeout_s(settings.serve.batch_wait_s)
        # Filters become qdrant_client.models objects, whose first import takes about a
        # second: pay it at start-up rather than in the first filtered request.
        FilterSchema(settings.store.filter_fields).to_qdrant([])

    def __del__(self) -> None:
        self._live.stop()

    # ------------------------------------------------------------------ RPCs
    async def Search(self, request: search_pb2.SearchRequest,
                     grpc_context: Any = None) -> search_pb2.SearchResponse:
        started = time.perf_counter()
        try:
            self._authorize(grpc_context)
            params = validate_search(request, self._settings.serve, self._settings.store.filter_fields)
            deadline = started + self._deadline_s(grpc_context)
            response, skipped = await self._search(params, started, deadline)
            self._outcomes["reranked" if response.reranked else "recall_only"] += 1
            if skipped is not None and grpc_context is not None:
                grpc_context.set_trailing_metadata([(RERANK_SKIPPED_METADATA, skipped)])
            return response
        except Exception as exc:  # noqa: BLE001 - every failure becomes a gRPC status
            return self._fail(grpc_context, exc, search_pb2.SearchResponse())

    async def GetVideo(self, request: search_pb2.GetVideoRequest,
                       grpc_context: Any = None) -> search_pb2.GetVideoResponse:
        try:
            self._authorize(grpc_context)
            video_id = validate_video_id(request.video_id)
            live = await self._capture_live()
            found = await asyncio.to_thread(self._store.get, live.collection, [video_id])
            if not found:
                raise RpcFailure(grpc.StatusCode.NOT_FOUND,
                                 f"video_id: no video {video_id!r} in the live index {live.collection}")
            return video_response(video_id, found[0].payload, live.collection,
                                  self._settings.serve.max_response_bytes)
        except Exception as exc:  # noqa: BLE001
            return self._fail(grpc_context, exc, search_pb2.GetVideoResponse())

    def stats(self) -> dict[str, Any]:
        """Observed batch sizes ({size: count}) and outcomes, for tests and dashboards."""
        live = self._live.current
        return {
            "text_batch_sizes": dict(self._text_batches),
            "rerank_batch_sizes": dict(self._rerank_batches),
            "outcomes": dict(self._outcomes),
            "live": None if live is None else {"model_version": live.version, "collection": live.collection},
            "cached_versions": self._models.versions(),
            "rerank_breaker": self._breaker.snapshot(),
        }

    # ------------------------------------------------------------------ search
    async def _search(self, params: SearchParams, started: float,
                      deadline: float) -> tuple[search_pb2.SearchResponse, str | None]:
        """The response, and why it was not re-ranked when re-ranking was asked for (else None)."""
        live = await self._capture_live()
        for attempt in range(2):
            t_encode = time.perf_counter()
            tokens, vector = await asyncio.wait_for(self._encode_batch((params.query, live)),
                                                    timeout=max(deadline - t_encode, 0.0))
            t_recall = time.perf_counter()
            try:
                # One group per video (Qdrant group-by on video_id), each with its best
                # serve.rerank_segments segments for the reranker.
                groups = await asyncio.wait_for(
                    asyncio.to_thread(self._store.query_groups, live.collection, vector, params.recall_k,
                                      self._settings.serve.rerank_segments, list(params.filters), True),
                    timeout=max(deadline - t_recall, 0.0))
            except CollectionNotFound:
                # The captured collection was dropped right after an alias flip: redo
                # the whole request (text included) on the new pair, never mix them.
                newer = self._live.current
                if attempt == 0 and newer is not None and newer.collection != live.collection:
                    live = newer
                    continue
                raise RpcFailure(grpc.StatusCode.FAILED_PRECONDITION,
                                 f"the live collection {live.collection} no longer exists")
            break
        t_rerank = time.perf_counter()
        candidates = pad_groups(groups)

        rerank: RerankResult | None = None
        skipped: str | None = None
        if params.rerank and candidates.hits and live.model.uses_regions and candidates.regions is None:
            # A spatial re-ranker over an index built without region tokens has nothing to read:
            # answer with the recall ranking (reranked=false) and say how to fix it.
            self._outcomes["rerank_no_regions"] += 1
            skipped = "no_region_tokens"
            log_event(log, "rerank skipped", logging.WARNING, reason="no_region_tokens", index=live.collection,
                      fix="re-index with 'vidsearch reindex' so points carry region tokens")
        elif params.rerank and candidates.hits:
            budget = (deadline - t_rerank) * self._settings.serve.rerank_deadline_fraction
            rerank, skipped = await self._call_reranker(params.query, (tokens, vector), candidates, live.version,
                                                        budget)
        t_done = time.perf_counter()

        results = build_results(
            candidates, vector, params.top_k, params.beta,
            rerank_scores=None if rerank is None else rerank.scores,
            frame_relevance=None if rerank is None else rerank.frame_relevance,
            max_payload_bytes=self._settings.serve.max_payload_bytes,
            max_response_bytes=self._settings.serve.max_response_bytes)
        cut = sum(1 for r in results if r.payload_notice)
        if cut:
            self._outcomes["payloads_cut"] += cut
            log_event(log, "payloads cut", logging.WARNING, index=live.collection, count=cut,
                      video_ids=[r.video_id for r in results if r.payload_notice][:5])
        response = search_pb2.SearchResponse(
            results=results, reranked=rerank is not None, model_version=live.version,
            index=live.collection, payloads_cut=cut,
            timings=stage_timings(encode_ms=_ms(t_encode, t_recall), recall_ms=_ms(t_recall, t_rerank),
                                  rerank_ms=_ms(t_rerank, t_done), total_ms=_ms(started, time.perf_counter())))
        return response, skipped

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _encode_batch(self, items: list[tuple[str, LiveIndex]]) -> list[tuple[np.ndarray, np.ndarray]]:
        self._text_batches[len(items)] += 1
        # In a worker thread: the event loop keeps admitting requests (the next batch).
        return await asyncio.to_thread(encode_grouped, items)

    async def _call_reranker(self, text: str, encoded: tuple[np.ndarray, np.ndarray], candidates: Candidates,
                             version: str, budget_s: float) -> tuple[RerankResult | None, str | None]:
        """Cross-encoder scores, or (None, why) when the reranker is down, failing or late,
        or the breaker says it is (then it is not called at all): the caller answers with
        the recall ranking (reranked=false)."""
        if budget_s <= 0:
            return None, "no_time_left"
        guard = self._breaker.admit()
        if guard is None:
            # Counted, not logged: the breaker logs its transitions, and at full traffic a line
            # per short-circuited search would drown them.
            self._outcomes["rerank_circuit_open"] += 1
            return None, "circuit_open"
        budget_s = guard.timeout(budget_s, version)
        response = None
        try:
            request = RerankRequest(text=text, frames=candidates.frames, mask=candidates.mask, model_version=version,
                                    text_tokens=encoded[0], text_vector=encoded[1], video=candidates.video,
                                    regions=candidates.regions)
            self._last_rerank_request = request
            response = self._reranker_handle().score.remote(request)
            result: RerankResult = await guard.race(response, budget_s)
            guard.succeeded()  # it answered; a wrong version below is no outage
        except BreakerOpened as exc:
            # Another search found the reranker down while this one waited: answer now.
            _cancel(response)
            guard.failed(exc, budget_s)
            self._outcomes["rerank_released"] += 1
            return None, "circuit_open"
        except Exception as exc:  # noqa: BLE001 - any reranker problem degrades, never fails
            if isinstance(exc, asyncio.TimeoutError):
                _cancel(response)
            guard.failed(exc, budget_s)
            log_event(log, "rerank skipped", logging.WARNING, reason=type(exc).__name__,
                      error=str(exc)[:200], budget_s=round(budget_s, 3), adaptive_timeout=guard.adaptive)
            self._outcomes[f"rerank_{type(exc).__name__}"] += 1
            return None, "timeout" if isinstance(exc, asyncio.TimeoutError) else "error"
        finally:
            guard.release()  # a cancelled search must not keep its permit
        if result.model_version != version or result.scores.shape[0] != len(candidates.hits):
            log_event(log, "rerank result discarded", logging.WARNING, expected=version,
                      got=result.model_version)
            return None, "version_mismatch"
        self._rerank_batches[result.batch_size] += 1
        return result, None

    async def _probe_reranker(self, timeout_s: float) -> None:
        """The breaker's background probe: the latest search's reranker request again, so a
        replica that just came back is also warmed up on the shapes searches send."""
        request = self._last_rerank_request
        if request is None:
            raise RuntimeError("no reranker request to probe with yet")
        response = self._reranker_handle().score.remote(request)
        try:
            await asyncio.wait_for(asyncio.ensure_future(response), timeout=timeout_s)
        except asyncio.TimeoutError:
            _cancel(response)
            raise

    def _reranker_handle(self) -> Any:
        # Resolved lazily and by name: the reranker is a separate Serve application
        # that may be deployed after this one, or redeployed while we run.
        if self._reranker is None:
            self._reranker = serve.get_deployment_handle(
                RERANKER_DEPLOYMENT, app_name=self._settings.serve.reranker_app_name)
        return self._reranker

    # ------------------------------------------------------------------ helpers
    async def _capture_live(self) -> LiveIndex:
        live = self._live.current
        if live is None:
            # Nothing live yet: check now instead of waiting for the next poll, so the
            # first search after the first ingest already succeeds.
            try:
                live = await asyncio.to_thread(self._live.refresh)
            except StoreUnavailable:
                raise
            except Exception:  # noqa: BLE001 - the problem text says why
                live = None
        if live is None:
            raise RpcFailure(grpc.StatusCode.FAILED_PRECONDITION, f"no live index: {self._live.problem}")
        return live

    def _authorize(self, grpc_context: Any) -> None:
        if self._api_key is None or grpc_context is None:
            return  # no key configured, or an in-cluster DeploymentHandle call
        if not is_authorized(grpc_context.invocation_metadata(), self._api_key):
            raise RpcFailure(grpc.StatusCode.UNAUTHENTICATED,
                             "authorization: missing or invalid API key (send 'authorization: Bearer <key>')")

    def _deadline_s(self, grpc_context: Any) -> float:
        """Seconds this request may take: the client's ``vidsearch-deadline-ms``
        metadata (Serve 2.60's gRPC proxy does not forward the gRPC deadline itself),
        else the configured default."""
        if grpc_context is not None:
            stated = deadline_from_metadata(grpc_context.invocation_metadata())
            if stated is not None:
                return stated
        return self._settings.serve.default_deadline_s

    def _fail(self, grpc_context: Any, exc: Exception, empty: Any) -> Any:
        failure = _as_failure(exc)
        if failure.code == grpc.StatusCode.INTERNAL:
            log.error("request failed: %s", exc, exc_info=exc)
        if grpc_context is None:
            raise failure
        grpc_context.set_code(failure.code)
        grpc_context.set_details(failure.details)
        return empty


def _as_failure(exc: Exception) -> RpcFailure:
    if isinstance(exc, RpcFailure):
        return exc
    if isinstance(exc, RequestError):
        return RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    if isinstance(exc, FilterError):
        return RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, f"filters: {exc}")
    if isinstance(exc, asyncio.TimeoutError):
        return RpcFailure(grpc.StatusCode.DEADLINE_EXCEEDED,
                          "the deadline passed before text encoding and recall finished")
    if isinstance(exc, StoreUnavailable):
        return RpcFailure(grpc.StatusCode.UNAVAILABLE, f"vector store unavailable: {exc}")
    if isinstance(exc, StoreError):
        return RpcFailure(grpc.StatusCode.INTERNAL, f"vector store error: {exc}")
    return RpcFailure(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")


def _cancel(response: Any) -> None:
    """Cancel a reranker call given up on. Only a late call needs it; Serve 2.60's cancel()
    re-raises the error of a call that already failed (e.g. DeploymentUnavailableError once
    the reranker app is deleted), which must not fail the search."""
    if response is not None:
        with contextlib.suppress(Exception):
            response.cancel()


def _ms(start: float, end: float) -> float:
    return (end - start) * 1000.0
