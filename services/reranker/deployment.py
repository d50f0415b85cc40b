"""The reranker: a Ray Serve deployment running the slow cross-encoder.

It is its own Serve application (see ``app.py``) so it scales, takes GPUs and
can be redeployed independently of the query ingress; the ingress reaches it
through a DeploymentHandle. Requests from many concurrent searches are grouped
by ``@serve.batch`` and scored in one forward pass per model version.

Every request names the model version that built the searched index, and the
scorer of exactly that version is used (loaded on first use, then cached), so
an alias flip never makes a query be scored by another version's weights.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from collections import Counter, defaultdict
from typing import Any

from ray import serve

from vidsearch.config import Settings
from vidsearch.cpu_priority import lower_process_priority
from vidsearch.model_versions import ModelCache, load_model_for_version
from vidsearch.telemetry import log_event

from .scoring import RerankRequest, RerankResult, score_requests

log = logging.getLogger(__name__)

DEPLOYMENT_NAME = "Reranker"
# Enough versions for the live one and the one being swapped in or out.
CACHED_VERSIONS = 2


@serve.deployment(name=DEPLOYMENT_NAME, max_ongoing_requests=64)
class Reranker:
    def __init__(self, settings: Settings) -> None:
        # Before the model load: yield the CPUs to the query path (vidsearch.cpu_priority).
        lower_process_priority(settings.serve.reranker_niceness)
        self._settings = settings
        self._models = ModelCache(lambda version: load_model_for_version(settings, version),
                                  capacity=CACHED_VERSIONS)
        self._batch_sizes: Counter[int] = Counter()
        self._score_batch.set_max_batch_size(settings.serve.rerank_batch_size)
        self._score_batch.set_batch_wait_timeout_s(settings.serve.batch_wait_s)
        # Load the live version in the background: otherwise the first requests after a
        # deploy pay the model load and miss their deadline (recall-only answers). A
        # request arriving meanwhile waits for the same load (ModelCache), never a second.
        threading.Thread(target=self._preload_live, name="reranker-preload", daemon=True).start()

    def _preload_live(self) -> None:
        try:
            from vidsearch.store import open_store
            from vidsearch.store_schema import model_version_of

            collection = open_store(self._settings).resolve_alias()
            if collection is None:
                return  # nothing indexed yet: the first request loads its version
            version = model_version_of(collection, alias=self._settings.store.alias)
            self._models.get(version)
            log_event(log, "reranker preloaded the live version", model_version=version)
        except Exception as exc:  # noqa: BLE001 - an optimisation; requests load on demand
            log_event(log, "reranker preload skipped", logging.WARNING, error=str(exc)[:200])

    async def score(self, request: RerankRequest) -> RerankResult:
        """Scores for one query's candidates; raises if they can't be computed."""
        result = await self._score_batch(request)
        if isinstance(result, Exception):
            raise result
        return result

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _score_batch(self, requests: list[RerankRequest]) -> list[RerankResult | Exception]:
        self._batch_sizes[len(requests)] += 1
        # torch runs in a worker thread so the replica's event loop keeps accepting
        # requests while this batch computes. Serve 2.60 closes a batch batch_wait_s
        # after its first request even while the previous one computes, so requests
        # that arrive spread out still get batches of one (docs/benchmarks/serve.md).
        return await asyncio.to_thread(self._score_all, requests)

    def _score_all(self, requests: list[RerankRequest]) -> list[RerankResult | Exception]:
        results: list[RerankResult | Exception | None] = [None] * len(requests)
        by_version: dict[str, list[int]] = defaultdict(list)
        for i, request in enumerate(requests):
            by_version[request.model_version].append(i)
        for version, indices in by_version.items():
            # A failure is confined to its version group: other queries in the
            # batch are still scored.
            try:
                model = self._models.get(version)
                scored = score_requests(model, [requests[i] for i in indices])
            except Exception as exc:  # noqa: BLE001 - returned to each caller of the group
                log_event(log, "rerank failed", logging.WARNING, model_version=version, error=str(exc))
                for i in indices:
                    results[i] = exc
                continue
            for i, (scores, relevance) in zip(indices, scored):
                results[i] = RerankResult(scores=scores, frame_relevance=relevance,
                                          model_version=version, batch_size=len(requests))
        return results  # type: ignore[return-value]

    def stats(self) -> dict[str, Any]:
        return {"batch_sizes": dict(self._batch_sizes), "model_versions": self._models.versions()}
