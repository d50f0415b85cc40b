"""Serving latency: gRPC end to end against the in-process compute of the same queries.

One run, over an embedded-store index of N videos (default 5,000) whose ``video``
[D] and ``frames`` [12, D] vectors are random unit vectors of the serving model's
width (search cost does not depend on the values), measures:

- p50 / p99 latency at concurrency 1 and 16, through real gRPC against the Serve apps
  that ``services/query/deploy.deploy()`` starts (free loopback ports), recall_k=50,
  re-ranking on; QPS at concurrency 16;
- the in-process compute of the same queries, with no Serve and no gRPC: text encode,
  vector query on the store, rerank forward (``services/reranker/scoring.score_requests``),
  on as many torch threads as a replica has (1 CPU each by default);
- the serving overhead p50(gRPC, concurrency 1) / p50(in-process) (target <= 1.3);
- QPS at concurrency 16 with reranker batching (``serve.rerank_batch_size`` default) and
  without it (batch size 1);
- the Fast-and-Slow speedup: re-ranking the recalled top 50 vs scoring all N videos
  with the cross-encoder, in-process.

Writes docs/benchmarks/serve.md and serve.png (``--quick``: under .bench/results).

    python benchmarks/serve.py            # 5,000 videos, vit-b-32 (random init)
    python benchmarks/serve.py --quick    # 1,000 videos, tiny model, fewer requests
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import common

common.isolate_environment()

import numpy as np  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

from vidsearch.config import ModelSettings, RaySettings, ServeSettings, Settings, StoreSettings  # noqa: E402
from vidsearch.models import VideoTextModel  # noqa: E402
from vidsearch.models.persist import load_serving_model  # noqa: E402
from vidsearch.services.query.response import pad_hits  # noqa: E402
from vidsearch.services.reranker.scoring import RerankRequest, score_requests  # noqa: E402
from vidsearch.store import VectorStore, VideoPoint, build_payload, open_store, shutdown_embedded_store  # noqa: E402
from vidsearch.store_schema import collection_name  # noqa: E402
from vidsearch.synth_scenes import plan_dataset  # noqa: E402
from vidsearch.services.query.client import ClientError, SearchClient, build_request  # noqa: E402

OVERHEAD_TARGET = 1.3
FRAMES_PER_VIDEO = 12
RPC_TIMEOUT_S = 120.0
WRITE_BATCH = 500  # points generated and handed to the store per step (the store batches further)


# ============================================================================ index
def random_unit(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    x = rng.standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def index_vectors(n: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The index's video vectors [N, D] and frames [N, T, D]; deterministic in (n, dim, seed)."""
    rng = np.random.default_rng(seed)
    return random_unit(rng, (n, dim)), random_unit(rng, (n, FRAMES_PER_VIDEO, dim))


def build_index(store: VectorStore, collection: str, model: VideoTextModel, version: str,
                videos: np.ndarray, frames: np.ndarray, captions: list[str]) -> float:
    """Write every point straight to the store (no decoding); seconds taken."""
    store.ensure_collection(collection, videos.shape[1], frames.shape[2])
    timestamps = [(k + 0.5) * 3.0 / FRAMES_PER_VIDEO for k in range(FRAMES_PER_VIDEO)]
    categories = ("sports", "news", "music", "nature")
    started = time.perf_counter()
    for start in range(0, len(videos), WRITE_BATCH):
        points = []
        for i in range(start, min(start + WRITE_BATCH, len(videos))):
            video_id = f"bench-{i:05d}"
            metadata = {"title": captions[i % len(captions)], "tags": ["bench", f"group-{i % 7}"],
                        "category": categories[i % len(categories)]}
            payload = build_payload(video_id, f"file:///bench/videos/{video_id}.mp4", metadata, timestamps, 3.0,
                                    model.frame_encoder_id, version)
            points.append(VideoPoint(video_id, videos[i], frames[i], payload))
        store.upsert(collection, points)
    store.set_alias(collection)
    return time.perf_counter() - started


def open_index(settings: Settings, model: VideoTextModel, version: str, n: int, seed: int,
               captions: list[str]) -> tuple[VectorStore, str, np.ndarray, float | None]:
    """The cached index (built on the first run); returns (store, collection, frames, build seconds or None)."""
    collection = collection_name(version, settings.store.alias)
    videos, frames = index_vectors(n, int(model.embed_dim), seed)
    marker = Path(settings.store.path).parent / "complete.json"
    store = open_store(settings)
    # The store actor loads a cached local-mode collection from disk before it answers
    # (tens of seconds for 5,000 points on a busy CPU), longer than one call's timeout.
    deadline = time.monotonic() + 900
    while not store.healthy():
        if time.monotonic() > deadline:
            raise RuntimeError(f"the embedded store at {settings.store.path} did not open within 900s")
    if marker.exists() and store.resolve_alias() == collection and store.count(collection) == n:
        return store, collection, frames, None
    # A partial index from an interrupted run: start over.
    for name in store.list_collections():
        store.delete_collection(name, force=True)
    seconds = build_index(store, collection, model, version, videos, frames, captions)
    marker.write_text(json.dumps({"collection": collection, "n": n, "seed": seed}))
    return store, collection, frames, seconds


# ============================================================================ gRPC load
@dataclass
class RequestRecord:
    latency_s: float
    reranked: bool
    encode_ms: float
    recall_ms: float
    rerank_ms: float
    total_ms: float


@dataclass
class LoadResult:
    concurrency: int
    seconds: float
    records: list[RequestRecord] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def qps(self) -> float:
        return len(self.records) / self.seconds

    def latency_ms(self, q: float) -> float:
        return 1000 * common.percentile([r.latency_s for r in self.records], q)

    def server_ms(self, stage: str, q: float = 50) -> float:
        return common.percentile([getattr(r, stage) for r in self.records], q)

    @property
    def reranked_fraction(self) -> float:
        return sum(r.reranked for r in self.records) / max(1, len(self.records))


class TimedSearch:
    """The product's gRPC client (vidsearch.services.query.client) with the benchmark's
    fixed request shape, timing each call from the client's side."""

    def __init__(self, port: int, app: str, top_k: int, recall_k: int, deadline_s: float) -> None:
        # The client states its deadline to the server (vidsearch-deadline-ms), so it is
        # the request deadline the rerank budget is cut from.
        self.client = SearchClient(f"127.0.0.1:{port}", app, timeout_s=deadline_s)
        self.top_k, self.recall_k = top_k, recall_k

    def search(self, query: str) -> RequestRecord:
        request = build_request(query, top_k=self.top_k, recall_k=self.recall_k, rerank=True)
        started = time.perf_counter()
        response = self.client.search(request)
        latency = time.perf_counter() - started
        if len(response.results) != self.top_k:
            raise RuntimeError(f"expected {self.top_k} results, got {len(response.results)}")
        t = response.timings
        return RequestRecord(latency, response.reranked, t.encode_ms, t.recall_ms, t.rerank_ms, t.total_ms)

    def close(self) -> None:
        self.client.close()


def run_load(client: TimedSearch, queries: list[str], concurrency: int, total: int) -> LoadResult:
    """``total`` requests from ``concurrency`` threads sharing one channel, each sending
    its next request as soon as the previous answer arrives (closed loop)."""
    lock = threading.Lock()
    counter = iter(range(total))
    result = LoadResult(concurrency, 0.0)

    def loop() -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            try:
                record = client.search(queries[i % len(queries)])
            except (ClientError, RuntimeError) as exc:
                with lock:
                    result.errors.append(str(exc)[:300])
                continue
            with lock:
                result.records.append(record)

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.seconds = time.perf_counter() - started
    return result


def warm_up(client: TimedSearch, queries: list[str], timeout_s: float = 600.0) -> int:
    """Send searches until they come back re-ranked (the reranker loads its model on the
    first request) and a few more after that; returns how many were sent."""
    deadline = time.monotonic() + timeout_s
    sent, reranked = 0, 0
    last_error = ""
    while reranked < 3:
        if time.monotonic() > deadline:
            raise RuntimeError(f"no re-ranked answers within {timeout_s:g}s (last error: {last_error})")
        try:
            record = client.search(queries[sent % len(queries)])
            reranked += record.reranked
        except ClientError as exc:
            last_error = str(exc)
            time.sleep(1.0)
        sent += 1
    return sent


# ============================================================================ in-process
@dataclass
class InProcessRecord:
    encode_s: float
    recall_s: float
    rerank_s: float

    @property
    def total_s(self) -> float:
        return self.encode_s + self.recall_s + self.rerank_s


def in_process(model: VideoTextModel, store: VectorStore, collection: str, version: str, query: str,
               recall_k: int) -> InProcessRecord:
    """What one search computes, without Serve or gRPC: the ingress's text encode and
    store query (through the same store actor), then the reranker's scoring."""
    t0 = time.perf_counter()
    with torch.inference_mode():
        vector = model.encode_text([query])[0].cpu().numpy()
    t1 = time.perf_counter()
    hits = store.query(collection, vector, recall_k, None, True)
    t2 = time.perf_counter()
    candidates = pad_hits(hits)
    score_requests(model, [RerankRequest(query, candidates.frames, candidates.mask, version)])
    t3 = time.perf_counter()
    return InProcessRecord(t1 - t0, t2 - t1, t3 - t2)


def time_rerank(model: VideoTextModel, request: RerankRequest) -> float:
    """Seconds of one ``score_requests`` call on one query's recalled candidates."""
    started = time.perf_counter()
    score_requests(model, [request])
    return time.perf_counter() - started


def batched_forward(model: VideoTextModel, requests: list[RerankRequest], reps: int) -> tuple[float, float]:
    """The compute side of reranker batching, in-process: p50 seconds of scoring the requests
    one ``score_requests`` call each vs all in one call (alternating, so load drift hits both)."""
    singles, batches = [], []
    score_requests(model, requests)  # warm the larger shapes
    for _ in range(reps):
        started = time.perf_counter()
        for request in requests:
            score_requests(model, [request])
        singles.append(time.perf_counter() - started)
        started = time.perf_counter()
        score_requests(model, requests)
        batches.append(time.perf_counter() - started)
    return common.percentile(singles, 50), common.percentile(batches, 50)


def score_everything(model: VideoTextModel, query: str, frames: np.ndarray, chunk: int) -> float:
    """The slow path alone: the cross-encoder over every video of the index, ``chunk``
    candidates per forward (one forward over all of them would need several GiB of
    activations). The query's token features are computed once, as a slow-only system would."""
    started = time.perf_counter()
    with torch.inference_mode():
        text = model.encode_text_features([query])
        for start in range(0, len(frames), chunk):
            block = torch.from_numpy(frames[start:start + chunk])
            mask = torch.ones(block.shape[:2], dtype=torch.bool)
            index = torch.zeros(block.shape[0], dtype=torch.long, device=model.device)
            model.score_pairs(text.select(index), block, mask)
    return time.perf_counter() - started


# ============================================================================ reranker alone
def recalled_requests(model: VideoTextModel, store: VectorStore, collection: str, version: str,
                      queries: list[str], recall_k: int) -> list[RerankRequest]:
    """What the ingress would send the reranker for each query (recalled top-k frames)."""
    out = []
    with torch.inference_mode():
        vectors = model.encode_text(queries).cpu().numpy()
    for query, vector in zip(queries, vectors):
        candidates = pad_hits(store.query(collection, vector, recall_k, None, True))
        out.append(RerankRequest(query, candidates.frames, candidates.mask, version))
    return out


def reranker_load(app: str, requests: list[RerankRequest], concurrency: int, total: int) -> float:
    """Closed-loop load on the Reranker deployment alone, through a DeploymentHandle (no
    gRPC, no ingress, no store); returns the seconds ``total`` calls took."""
    from ray import serve

    from vidsearch.services.reranker.deployment import DEPLOYMENT_NAME as RERANKER

    handle = serve.get_deployment_handle(RERANKER, app_name=app)
    lock = threading.Lock()
    counter = iter(range(total))
    failures: list[str] = []

    def loop() -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            try:
                handle.score.remote(requests[i % len(requests)]).result(timeout_s=RPC_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - counted and reported
                with lock:
                    failures.append(f"{type(exc).__name__}: {exc}"[:300])

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    if failures:
        raise RuntimeError(f"{len(failures)} reranker calls failed, first: {failures[0]}")
    return seconds


# ============================================================================ Serve
def deployment_stats(app: str, deployment: str) -> dict[str, Any]:
    from ray import serve

    return serve.get_deployment_handle(deployment, app_name=app).stats.remote().result(timeout_s=60)


def batch_size_mean(before: dict[Any, int], after: dict[Any, int]) -> float:
    """Mean batch size of the batches formed between two stats snapshots ({size: count})."""
    sizes = {int(k): after.get(k, 0) - before.get(k, 0) for k in after}
    batches = sum(sizes.values())
    return sum(k * c for k, c in sizes.items()) / batches if batches else float("nan")


@dataclass
class Variant:
    """One deployed configuration (an ingress app and its reranker app) and what it measured."""

    name: str
    settings: Settings
    client: TimedSearch
    load: LoadResult = field(default_factory=lambda: LoadResult(16, 0.0))
    reranker_calls: int = 0
    reranker_seconds: float = 0.0
    rerank_batch: float = float("nan")  # mean batch in the gRPC runs
    text_batch: float = float("nan")
    reranker_alone_batch: float = float("nan")

    def stats(self) -> tuple[dict[Any, int], dict[Any, int]]:
        from vidsearch.services.query.ingress import DEPLOYMENT_NAME as INGRESS
        from vidsearch.services.reranker.deployment import DEPLOYMENT_NAME as RERANKER

        serve_cfg = self.settings.serve
        return (deployment_stats(serve_cfg.reranker_app_name, RERANKER)["batch_sizes"],
                deployment_stats(serve_cfg.app_name, INGRESS)["text_batch_sizes"])

    @property
    def reranker_qps(self) -> float:
        return self.reranker_calls / self.reranker_seconds


def alternate(variants: list[Variant], rounds: int, run: Callable[[Variant], None]) -> None:
    """Run ``run`` on each variant, ``rounds`` times, alternating the order (ABBA...), so a
    change in the machine's background load hits every variant alike."""
    for r in range(rounds):
        for variant in (variants if r % 2 == 0 else variants[::-1]):
            run(variant)


def ab_search_load(variants: list[Variant], queries: list[str], rounds: int, per_round: int) -> None:
    """gRPC concurrency-16 load on each variant in alternating rounds; fills ``load`` and the
    mean batch sizes."""
    before = {v.name: v.stats() for v in variants}

    def run(variant: Variant) -> None:
        result = run_load(variant.client, queries, 16, per_round)
        variant.load.records += result.records
        variant.load.errors += result.errors
        variant.load.seconds += result.seconds

    alternate(variants, rounds, run)
    for v in variants:
        after = v.stats()
        v.rerank_batch = batch_size_mean(before[v.name][0], after[0])
        v.text_batch = batch_size_mean(before[v.name][1], after[1])


def ab_reranker_load(variants: list[Variant], requests: list[RerankRequest], rounds: int, per_round: int) -> None:
    """The Reranker deployments alone, concurrency 16, in alternating rounds."""
    before = {v.name: v.stats()[0] for v in variants}

    def run(variant: Variant) -> None:
        variant.reranker_seconds += reranker_load(variant.settings.serve.reranker_app_name, requests, 16, per_round)
        variant.reranker_calls += per_round

    alternate(variants, rounds, run)
    for v in variants:
        v.reranker_alone_batch = batch_size_mean(before[v.name], v.stats()[0])


# ============================================================================ report
@dataclass
class Results:
    """Everything one run measured (the report and the JSON dump read it)."""

    c1: LoadResult
    c16: LoadResult
    c16_b1: LoadResult
    inproc: list[InProcessRecord]
    fast_s: float
    slow_s: float
    batch_c1: float
    batch_c16: float
    batch_c16_b1: float
    text_batch_c16: float
    text_batch_c16_b1: float
    rr_qps: float
    rr_batch: float
    rr_qps_b1: float
    rr_batch_b1: float
    forward_batch: int  # requests per batch in the in-process forward comparison
    forward_single_s: float  # scoring them one call each
    forward_batched_s: float  # scoring them in one call
    default_rerank_batch: int
    version: str
    collection: str
    dim: int
    build_s: float | None
    deploy_s: float

    def inproc_ms(self, stage: str, q: float = 50) -> float:
        return 1000 * common.percentile([getattr(x, stage) for x in self.inproc], q)

    @property
    def overhead(self) -> float:
        return self.c1.latency_ms(50) / self.inproc_ms("total_s")


def plot(path: Path, r: Results, n: int, recall_k: int, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4.6))
    labels = ["in-process\ncompute", "gRPC\nconcurrency 1", "gRPC\nconcurrency 16"]
    p50 = [r.inproc_ms("total_s", 50), r.c1.latency_ms(50), r.c16.latency_ms(50)]
    p99 = [r.inproc_ms("total_s", 99), r.c1.latency_ms(99), r.c16.latency_ms(99)]
    x = np.arange(len(labels))
    left.bar(x - 0.2, p50, 0.4, label="p50", color="#4c72b0")
    left.bar(x + 0.2, p99, 0.4, label="p99", color="#c44e52")
    for xi, (a, b) in enumerate(zip(p50, p99)):
        left.text(xi - 0.2, a, f"{a:.0f}", ha="center", va="bottom", fontsize=8)
        left.text(xi + 0.2, b, f"{b:.0f}", ha="center", va="bottom", fontsize=8)
    left.set_xticks(x, labels)
    left.set_yscale("log")
    left.set_ylabel("latency (ms, log scale)")
    left.set_title(f"search latency (recall_k={recall_k}, re-rank on)")
    left.legend()

    groups = ["gRPC search\n(end to end)", "Reranker alone\n(DeploymentHandle)"]
    on = [r.c16.qps, r.rr_qps]
    off = [r.c16_b1.qps, r.rr_qps_b1]
    x = np.arange(len(groups))
    b1 = middle.bar(x - 0.2, on, 0.4, label=f"rerank_batch_size={r.default_rerank_batch}", color="#55a868")
    b2 = middle.bar(x + 0.2, off, 0.4, label="rerank_batch_size=1", color="#dd8452")
    for bars in (b1, b2):
        for bar in bars:
            middle.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{bar.get_height():.2f}",
                        ha="center", va="bottom", fontsize=8)
    middle.set_xticks(x, groups)
    middle.set_ylabel("queries / s")
    middle.set_title("QPS at concurrency 16: reranker batching on / off")
    middle.legend(fontsize=8)

    times = [r.fast_s * 1000, r.slow_s * 1000]
    bars = right.bar([f"re-rank top {recall_k}", f"score all {n:,}"], times, color=["#55a868", "#8172b2"])
    right.set_yscale("log")
    for bar, value in zip(bars, times):
        right.text(bar.get_x() + bar.get_width() / 2, value, f"{value:,.0f} ms", ha="center", va="bottom")
    right.set_ylabel("cross-encoder latency (ms, log scale)")
    right.set_title(f"Fast and Slow, in-process: {r.slow_s / r.fast_s:.0f}x")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_markdown(path: Path, png_name: str, args: argparse.Namespace, settings: Settings, facts: dict[str, Any],
                   load_after: tuple[float, float], r: Results) -> None:
    c1, c16, c16_b1 = r.c1, r.c16, r.c16_b1
    serve_cfg = settings.serve
    errors = c1.errors + c16.errors + c16_b1.errors
    lines = [
        "# Serving latency benchmark",
        "",
        f"Generated by `{common.command_line()}` (see `benchmarks/serve.py`). Re-run it to refresh this page.",
        "",
        *(["**Quick mode** (`--quick`): a smoke test. With the tiny model the compute takes a few milliseconds, so "
           "fixed per-request costs dominate every ratio; use the default run for numbers.", ""] if args.quick else []),
        "## What is measured",
        f"- An embedded-store index of {args.n:,} videos written straight to the store: `video` [{r.dim}] and "
        f"`frames` [{FRAMES_PER_VIDEO}, {r.dim}] random unit vectors with realistic payloads (no decoding; search "
        "cost does not depend on the vector values).",
        f"- Serve started by `services/query/deploy.deploy()` on free loopback ports: the `SearchIngress` and "
        f"`Reranker` applications with their default deployment options (one replica each, 1 CPU each). Requests: "
        f"top_k={args.top_k}, recall_k={args.recall_k}, re-ranking on; queries are captions from the synthetic "
        "generator.",
        f"- **gRPC end to end**: client-side wall time of `Search`, at concurrency 1 ({args.requests_c1} requests) "
        f"and 16 ({args.requests_c16} requests per configuration, closed loop: 16 threads sharing one channel, "
        "after a 16-request ramp).",
        "- **in-process compute** for the same queries, interleaved one-for-one with the concurrency-1 requests "
        "(so both see the same background load): `model.encode_text`, `store.query(..., recall_k, "
        "with_frames=True)` through the same store actor, and `scoring.score_requests` on the recalled candidates. "
        f"torch runs on {args.inproc_threads} thread(s), as many as a 1-CPU replica gets (Ray sets OMP_NUM_THREADS "
        "to a replica's CPUs).",
        "- **reranker batching**: a second ingress + reranker pair is deployed next to the first with "
        f"`serve.rerank_batch_size=1` (default {r.default_rerank_batch}); the concurrency-16 requests go to the two "
        f"pairs in {args.rounds} alternating rounds (ABBA...), so a change in background load hits both alike. To "
        f"isolate the reranker, {args.requests_reranker} closed-loop calls per configuration from 16 threads go "
        "straight to each `Reranker` deployment through a DeploymentHandle with pre-recalled candidates, "
        "alternating the same way.",
        f"- **Fast and Slow** (in-process, {args.slow_queries} queries, p50): `score_requests` on the recalled top "
        f"{args.recall_k} (timed 3 times right before and 3 times right after each slow run) vs the same "
        f"cross-encoder over all {args.n:,} videos ({args.slow_chunk} candidates per forward; the query's token "
        "features computed once).",
        f"- `serve.default_deadline_s` is {serve_cfg.default_deadline_s:g} s (product default 10 s) so that answers "
        "at concurrency 16 are re-ranked rather than cut to recall-only by the rerank deadline; the re-ranked "
        "column shows the share that was.",
        "",
        "## Setup",
        *common.md_table(["setting", "value"], [
            ("model", f"`{args.preset}` preset, random init, {r.dim}-d, model version `{r.version}`"),
            ("index", f"{args.n:,} points in collection `{r.collection}`"
                      + (f", written in {r.build_s:.1f} s" if r.build_s is not None else " (reused from the cache)")),
            ("serve settings", f"text_batch_size={serve_cfg.text_batch_size}, rerank_batch_size="
                               f"{serve_cfg.rerank_batch_size}, batch_wait_s={serve_cfg.batch_wait_s}, "
                               f"rerank_deadline_fraction={serve_cfg.rerank_deadline_fraction}"),
            ("deploy + first re-ranked answer", f"{r.deploy_s:.1f} s"),
            ("Ray logical CPUs", f"{settings.ray.num_cpus} (two pairs of 1-CPU replicas; one pair works at a time)"),
        ]),
        "",
        "## Machine",
        *common.machine_section(facts, load_after),
        "",
        "## Results",
        *common.md_table(["run", "requests", "p50 ms", "p99 ms", "QPS", "re-ranked", "mean rerank batch",
                          "mean text batch"], [
            ("in-process compute (sequential)", len(r.inproc), f"{r.inproc_ms('total_s', 50):.1f}",
             f"{r.inproc_ms('total_s', 99):.1f}", "-", "-", "1", "1"),
            ("gRPC, concurrency 1", len(c1.records), f"{c1.latency_ms(50):.1f}", f"{c1.latency_ms(99):.1f}",
             f"{c1.qps:.2f}", f"{c1.reranked_fraction:.0%}", f"{r.batch_c1:.2f}", "-"),
            ("gRPC, concurrency 16", len(c16.records), f"{c16.latency_ms(50):.1f}", f"{c16.latency_ms(99):.1f}",
             f"{c16.qps:.2f}", f"{c16.reranked_fraction:.0%}", f"{r.batch_c16:.2f}", f"{r.text_batch_c16:.2f}"),
            ("gRPC, concurrency 16, rerank_batch_size=1", len(c16_b1.records), f"{c16_b1.latency_ms(50):.1f}",
             f"{c16_b1.latency_ms(99):.1f}", f"{c16_b1.qps:.2f}", f"{c16_b1.reranked_fraction:.0%}",
             f"{r.batch_c16_b1:.2f}", f"{r.text_batch_c16_b1:.2f}"),
            ("Reranker alone, concurrency 16", args.requests_reranker, "-", "-", f"{r.rr_qps:.2f}", "100%",
             f"{r.rr_batch:.2f}", "-"),
            ("Reranker alone, concurrency 16, rerank_batch_size=1", args.requests_reranker, "-", "-",
             f"{r.rr_qps_b1:.2f}", "100%", f"{r.rr_batch_b1:.2f}", "-"),
        ]),
        "",
        *common.md_table(["ratio", "value", "target", "verdict"], [
            ("serving overhead p50(gRPC, c=1) / p50(in-process)", f"{r.overhead:.2f}", f"<= {OVERHEAD_TARGET}",
             common.verdict(r.overhead <= OVERHEAD_TARGET)),
            ("QPS at c=16, gRPC end to end, batching on / off", f"{c16.qps / c16_b1.qps:.2f}", "-", "n/a"),
            ("QPS at c=16, Reranker alone, batching on / off", f"{r.rr_qps / r.rr_qps_b1:.2f}", "-", "n/a"),
            (f"rerank forward in-process, {r.forward_batch} requests: one by one / batched",
             f"{r.forward_single_s / r.forward_batched_s:.2f}", "-", "n/a"),
            (f"Fast and Slow: score all {args.n:,} / re-rank top {args.recall_k}",
             f"{r.slow_s / r.fast_s:.0f}x", "-", "n/a"),
            (f"Fast and Slow, whole query: (text + score all {args.n:,}) / p50(text + recall + re-rank top "
             f"{args.recall_k})", f"{r.slow_s * 1000 / r.inproc_ms('total_s'):.0f}x", "-", "n/a"),
        ]),
        "",
        "### Where the time goes at concurrency 1 (p50, ms)",
        *common.md_table(["stage", "in-process", "served (the ingress's StageTimings)"], [
            ("text encode", f"{r.inproc_ms('encode_s'):.1f}", f"{c1.server_ms('encode_ms'):.1f}"),
            ("recall (store query with frames)", f"{r.inproc_ms('recall_s'):.1f}", f"{c1.server_ms('recall_ms'):.1f}"),
            ("re-rank", f"{r.inproc_ms('rerank_s'):.1f}", f"{c1.server_ms('rerank_ms'):.1f}"),
            ("total", f"{r.inproc_ms('total_s'):.1f}",
             f"{c1.server_ms('total_ms'):.1f} inside the ingress, {c1.latency_ms(50):.1f} at the client"),
        ]),
        "",
        f"- Fast and Slow (p50): re-rank top {args.recall_k}: {r.fast_s * 1000:.1f} ms; score all {args.n:,}: "
        f"{r.slow_s * 1000:,.0f} ms.",
        f"- gRPC errors: {len(errors)}" + (f" (first: {errors[0]})" if errors else ""),
        "",
        "## Reading the numbers",
        *analysis(args, settings, facts, r),
        "",
        f"![serve benchmark]({png_name})",
    ]
    common.write_text(path, lines)


def analysis(args: argparse.Namespace, settings: Settings, facts: dict[str, Any], r: Results) -> list[str]:
    c1, c16, c16_b1 = r.c1, r.c16, r.c16_b1
    gap = c1.latency_ms(50) - r.inproc_ms("total_s")
    outside = c1.latency_ms(50) - c1.server_ms("total_ms")
    wait_ms = settings.serve.batch_wait_s * 1000
    out = [
        f"- **Overhead.** At concurrency 1 a served search takes {gap:+.1f} ms over its compute (p50), "
        f"{r.overhead:.2f}x. {outside:.1f} ms of it is outside the ingress method (client, Serve's gRPC proxy, the "
        "hop to the replica); the rest is inside: two `@serve.batch` waits (text and rerank, up to "
        f"{wait_ms:.0f} ms each), the DeploymentHandle call carrying the {args.recall_k} candidates' frames to the "
        "reranker, fusion and building the protobuf response. These costs are fixed per request, so the ratio "
        "depends on how long the compute takes: with a model that computes faster (a GPU, the tiny preset) the "
        "same milliseconds weigh more.",
        f"- **Concurrency 16.** p50 latency is {c16.latency_ms(50) / c1.latency_ms(50):.1f}x that at concurrency 1 and "
        f"QPS {c16.qps / c1.qps:.2f}x: one replica per app on {facts['cpu_count']} cores, and the cross-encoder "
        f"(p50 {r.inproc_ms('rerank_s'):.0f} ms for one query on one thread) is the stage that saturates; requests "
        "queue in front of it.",
        f"- **Reranker batching, end to end.** Mean rerank batch at concurrency 16: {r.batch_c16:.2f} "
        f"(rerank_batch_size={r.default_rerank_batch}) vs {r.batch_c16_b1:.2f} (=1); QPS {c16.qps:.2f} vs "
        f"{c16_b1.qps:.2f} ({c16.qps / c16_b1.qps:.2f}x)"
        + (". With batches of about one request both configurations ran the same way, so that QPS difference is "
           "run-to-run noise, not batching" if r.batch_c16 < 1.2 else "")
        + f". Why batches stay small: Ray Serve's `@serve.batch` (2.60) closes a batch `batch_wait_timeout_s` "
        f"({wait_ms:.0f} ms) after its first request, whether or not the previous batch is still computing, and "
        "closed batches then queue for the handler one by one; requests that arrive while a batch computes do "
        "not join one big next batch. Requests reach the reranker staggered (each passes the single "
        f"embedded-store actor for recall one after another), more than {wait_ms:.0f} ms apart, so most batches "
        "hold one request.",
        f"- **Reranker batching, isolated.** Calling the Reranker deployment directly with 16 concurrent "
        f"callers, batches average {r.rr_batch:.1f} requests and QPS is {r.rr_qps:.2f} vs {r.rr_qps_b1:.2f} "
        f"unbatched ({r.rr_qps / r.rr_qps_b1:.2f}x). The forward alone, in-process: {r.forward_batch} requests took "
        f"{r.forward_single_s * 1000:.0f} ms as {r.forward_batch} `score_requests` calls and "
        f"{r.forward_batched_s * 1000:.0f} ms as one ({r.forward_single_s / r.forward_batched_s:.2f}x). On one CPU "
        "thread the cross-encoder is compute-bound whatever the batch, so batching has nothing to amortise here "
        "and bigger forwards can even cost more per pair; on a GPU a batch fills the device, which is where "
        "batching should pay (not measured: no GPU).",
        f"- **Fast and Slow.** Re-ranking the recalled {args.recall_k} is {r.slow_s / r.fast_s:.0f}x cheaper than "
        f"running the cross-encoder over all {args.n:,} videos (the candidate counts differ "
        f"{args.n / args.recall_k:.0f}x; both sides also pay one text encode). A whole fast-then-slow query is "
        f"{r.slow_s * 1000 / r.inproc_ms('total_s'):.0f}x cheaper than slow-only scoring.",
    ]
    if min(c1.reranked_fraction, c16.reranked_fraction, c16_b1.reranked_fraction) < 1:
        out.append("- Some answers came back with reranked=false (the reranker missed its share of the deadline). "
                   "Those are faster than re-ranked answers, which flatters the latency and QPS of that run.")
    return out


def print_results(args: argparse.Namespace, r: Results) -> None:
    print("\n=== serve benchmark ===")
    print(f"index: {args.n} videos, preset {args.preset} ({r.dim}-d), recall_k={args.recall_k}, top_k={args.top_k}")
    print(f"{'in-process compute':<26} p50 {r.inproc_ms('total_s', 50):8.1f} ms  "
          f"p99 {r.inproc_ms('total_s', 99):8.1f} ms  (encode {r.inproc_ms('encode_s'):.1f}, "
          f"recall {r.inproc_ms('recall_s'):.1f}, rerank {r.inproc_ms('rerank_s'):.1f})")
    for name, run, batch in (("gRPC c=1", r.c1, r.batch_c1), ("gRPC c=16", r.c16, r.batch_c16),
                             ("gRPC c=16 rerank batch=1", r.c16_b1, r.batch_c16_b1)):
        print(f"{name:<26} p50 {run.latency_ms(50):8.1f} ms  p99 {run.latency_ms(99):8.1f} ms  QPS {run.qps:6.2f}  "
              f"re-ranked {run.reranked_fraction:.0%}  mean rerank batch {batch:.2f}  errors {len(run.errors)}")
    print(f"{'Reranker alone c=16':<26} QPS {r.rr_qps:.2f} (mean batch {r.rr_batch:.2f}); rerank_batch_size=1: "
          f"QPS {r.rr_qps_b1:.2f} (mean batch {r.rr_batch_b1:.2f})")
    verdict = "met" if r.overhead <= OVERHEAD_TARGET else "MISSED"
    print(f"serving overhead p50(gRPC c=1) / p50(in-process) = {r.overhead:.2f}  (target <= {OVERHEAD_TARGET}) -> "
          f"{verdict}")
    print(f"QPS c=16 batching on/off: gRPC {r.c16.qps:.2f}/{r.c16_b1.qps:.2f} = {r.c16.qps / r.c16_b1.qps:.2f}; "
          f"Reranker alone {r.rr_qps:.2f}/{r.rr_qps_b1:.2f} = {r.rr_qps / r.rr_qps_b1:.2f}")
    print(f"rerank forward in-process, {r.forward_batch} requests: one by one {r.forward_single_s * 1000:.0f} ms, "
          f"batched {r.forward_batched_s * 1000:.0f} ms -> batching gain "
          f"{r.forward_single_s / r.forward_batched_s:.2f}x")
    print(f"Fast and Slow: re-rank top {args.recall_k} {r.fast_s * 1000:.1f} ms vs score all {args.n} "
          f"{r.slow_s * 1000:.0f} ms -> {r.slow_s / r.fast_s:.0f}x")


# ============================================================================ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=None, help="videos in the index (default 5000; --quick: 1000)")
    parser.add_argument("--preset", default=None, help="model preset (default vit-b-32; --quick: tiny)")
    parser.add_argument("--quick", action="store_true",
                        help="small run (tiny model, fewer requests); results go to .bench/results unless --out-dir")
    parser.add_argument("--requests-c1", type=int, default=None, help="requests at concurrency 1 (default 60)")
    parser.add_argument("--requests-c16", type=int, default=None,
                        help="gRPC requests at concurrency 16, per configuration (default 96; --quick: 64)")
    parser.add_argument("--requests-reranker", type=int, default=None,
                        help="calls to the Reranker alone, per configuration (default 64)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="alternating rounds the concurrency-16 requests are split into (default 2)")
    parser.add_argument("--slow-queries", type=int, default=None, help="queries scored against all N (default 2)")
    parser.add_argument("--slow-chunk", type=int, default=500,
                        help="candidates per cross-encoder forward when scoring all N (default 500)")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--recall-k", type=int, default=50)
    parser.add_argument("--deadline-s", type=float, default=60.0,
                        help="request deadline: serve.default_deadline_s and the client's stated "
                             "deadline (default 60, so that loaded runs stay re-ranked)")
    parser.add_argument("--inproc-threads", type=int, default=1,
                        help="torch threads for the in-process compute (default 1: what a 1-CPU replica gets)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-cpus", type=int, default=None, help="Ray logical CPUs (default: max(cores, 4))")
    parser.add_argument("--out-dir", type=Path, default=None, help="where serve.md / serve.png go")
    args = parser.parse_args(argv)
    quick = args.quick
    args.n = args.n or (1000 if quick else 5000)
    args.preset = args.preset or ("tiny" if quick else "vit-b-32")
    args.requests_c1 = args.requests_c1 or (20 if quick else 60)
    args.requests_c16 = args.requests_c16 or (64 if quick else 96)
    args.requests_reranker = args.requests_reranker or 64
    args.slow_queries = args.slow_queries or 2
    # Two ingress + reranker pairs of 1-CPU replicas live side by side (only one pair works
    # at a time), so Ray needs 4 logical CPUs even on a 2-core machine.
    args.num_cpus = args.num_cpus or max(os.cpu_count() or 1, 4)
    args.out_dir = args.out_dir or (common.CACHE_DIR / "results" if quick else common.DOCS_DIR)
    if not 1 <= args.top_k <= args.recall_k <= args.n:
        parser.error("need 1 <= --top-k <= --recall-k <= --n")
    return args


def timed_search(client: TimedSearch, query: str, into: LoadResult) -> None:
    started = time.perf_counter()
    into.records.append(client.search(query))
    into.seconds += time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    from ray import serve

    from vidsearch.services.query.deploy import deploy
    from vidsearch.services.reranker.deployment import DEPLOYMENT_NAME as RERANKER

    args = parse_args(argv)
    facts = common.machine_facts()
    common.CACHE_DIR.mkdir(exist_ok=True)
    run_dir = common.CACHE_DIR / f"serve-run-{os.getpid()}"
    suffix = str(os.getpid())
    base = Settings(
        store=StoreSettings(path=str(run_dir / "unused")),
        model=ModelSettings(preset=args.preset, registry_root=str(run_dir / "registry")),
        ray=RaySettings(num_cpus=args.num_cpus),
    )
    # The serving model: the deterministic base weights of the preset (the registry is empty),
    # i.e. exactly what the ingress and the reranker load for this version.
    model, version = load_serving_model(base)
    model.eval()
    index_dir = common.CACHE_DIR / f"serve-index-{version}-n{args.n}-s{args.seed}"
    settings = base.model_copy(update={
        "store": StoreSettings(path=str(index_dir / "qdrant")),
        "serve": ServeSettings(grpc_port=common.free_port(), app_name=f"vidsearch-bench-{suffix}",
                               reranker_app_name=f"vidsearch-bench-reranker-{suffix}",
                               default_recall_k=args.recall_k, default_top_k=args.top_k,
                               default_deadline_s=args.deadline_s,
                               # The search page is no part of what is measured: no page replica.
                               web_enabled=False),
    })
    # The same stack with reranker batching off, deployed side by side under other app names,
    # so that batched and unbatched runs can alternate instead of following each other.
    unbatched = settings.model_copy(update={"serve": settings.serve.model_copy(update={
        "rerank_batch_size": 1, "app_name": f"vidsearch-bench-b1-{suffix}",
        "reranker_app_name": f"vidsearch-bench-reranker-b1-{suffix}"})})
    captions = [spec.captions[0] for spec in plan_dataset(max(200, args.requests_c1), args.seed, 24)]
    queries = list(dict.fromkeys(captions))  # distinct, in order

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    variants: list[Variant] = []
    try:
        print(f"index: {args.n} videos ...", flush=True)
        store, collection, frames, build_s = open_index(settings, model, version, args.n, args.seed, captions)
        print("    " + (f"written in {build_s:.1f}s" if build_s is not None else "reused from cache"), flush=True)

        print("deploying Serve: ingress + reranker, and the same pair with rerank_batch_size=1 ...", flush=True)
        started = time.perf_counter()
        deploy(settings, http_port=common.free_port())
        variants.append(Variant("batched", settings, TimedSearch(
            settings.serve.grpc_port, settings.serve.app_name, args.top_k, args.recall_k, args.deadline_s)))
        warm = warm_up(variants[0].client, queries)
        deploy_s = time.perf_counter() - started
        print(f"    up and re-ranking after {deploy_s:.1f}s ({warm} warm-up requests)", flush=True)
        deploy(unbatched, http_port=common.free_port())
        variants.append(Variant("unbatched", unbatched, TimedSearch(
            settings.serve.grpc_port, unbatched.serve.app_name, args.top_k, args.recall_k, args.deadline_s)))
        warm_up(variants[1].client, queries)
        batched_variant, unbatched_variant = variants
        client = batched_variant.client

        # Same thread count as a replica, so in-process and served compute are comparable.
        torch.set_num_threads(args.inproc_threads)
        for query in queries[:3]:  # warm the in-process path too (first-call allocations)
            in_process(model, store, collection, version, query, args.recall_k)

        print(f"concurrency 1 + in-process, {args.requests_c1} queries interleaved ...", flush=True)
        before = deployment_stats(settings.serve.reranker_app_name, RERANKER)["batch_sizes"]
        c1 = LoadResult(1, 0.0)
        inproc: list[InProcessRecord] = []
        for i in range(args.requests_c1):
            query = queries[i % len(queries)]
            # Alternate which goes first so that neither always finds the warmer caches.
            if i % 2 == 0:
                timed_search(client, query, c1)
            inproc.append(in_process(model, store, collection, version, query, args.recall_k))
            if i % 2 == 1:
                timed_search(client, query, c1)
        batch_c1 = batch_size_mean(before, deployment_stats(settings.serve.reranker_app_name, RERANKER)["batch_sizes"])
        inproc_p50 = common.percentile([x.total_s for x in inproc], 50)
        print(f"    gRPC p50 {c1.latency_ms(50):.1f} ms, in-process p50 {inproc_p50 * 1000:.1f} ms, "
              f"ratio {c1.latency_ms(50) / 1000 / inproc_p50:.2f}", flush=True)

        per_round = max(16, args.requests_c16 // args.rounds)
        print(f"gRPC concurrency 16, batched / unbatched alternating, {args.rounds} rounds of {per_round} requests "
              "each ...", flush=True)
        for variant in variants:  # ramp: every thread busy once before the clock starts
            run_load(variant.client, queries, 16, 16)
        ab_search_load(variants, queries, args.rounds, per_round)
        for v in variants:
            print(f"    {v.name}: QPS {v.load.qps:.2f}, p50 {v.load.latency_ms(50):.1f} ms, "
                  f"p99 {v.load.latency_ms(99):.1f} ms, re-ranked {v.load.reranked_fraction:.0%}, "
                  f"mean rerank batch {v.rerank_batch:.2f}", flush=True)

        rerank_inputs = recalled_requests(model, store, collection, version, queries[:16], args.recall_k)
        rr_round = max(16, args.requests_reranker // args.rounds)
        print(f"Reranker alone, concurrency 16, alternating, {args.rounds} rounds of {rr_round} calls ...", flush=True)
        ab_reranker_load(variants, rerank_inputs, args.rounds, rr_round)
        for v in variants:
            print(f"    {v.name}: QPS {v.reranker_qps:.2f}, mean batch {v.reranker_alone_batch:.2f}", flush=True)

        print(f"Fast and Slow, in-process ({args.slow_queries} queries) ...", flush=True)
        fast, slow = [], []
        slow_inputs = recalled_requests(model, store, collection, version, queries[:args.slow_queries], args.recall_k)
        for request in slow_inputs:
            # The slow run takes long enough for the background load to change; timing the fast
            # path right before and right after it keeps the two comparable.
            fast += [time_rerank(model, request) for _ in range(3)]
            slow.append(score_everything(model, request.text, frames, args.slow_chunk))
            fast += [time_rerank(model, request) for _ in range(3)]
        fast_s, slow_s = common.percentile(fast, 50), common.percentile(slow, 50)
        print(f"    top {args.recall_k}: {fast_s * 1000:.1f} ms, all {args.n}: {slow_s * 1000:.0f} ms, "
              f"{slow_s / fast_s:.0f}x", flush=True)

        forward_batch = 4
        print(f"rerank forward in-process: {forward_batch} requests one by one vs batched ...", flush=True)
        forward_single_s, forward_batched_s = batched_forward(model, rerank_inputs[:forward_batch], reps=3)
        print(f"    one by one {forward_single_s * 1000:.0f} ms, batched {forward_batched_s * 1000:.0f} ms", flush=True)
    finally:
        for variant in variants:
            variant.client.close()
        try:
            serve.shutdown()
            shutdown_embedded_store(settings)
        finally:
            ray.shutdown()
            shutil.rmtree(run_dir, ignore_errors=True)
    load1, load5, _ = os.getloadavg()

    results = Results(c1=c1, c16=batched_variant.load, c16_b1=unbatched_variant.load, inproc=inproc, fast_s=fast_s,
                      slow_s=slow_s, batch_c1=batch_c1, batch_c16=batched_variant.rerank_batch,
                      batch_c16_b1=unbatched_variant.rerank_batch, text_batch_c16=batched_variant.text_batch,
                      text_batch_c16_b1=unbatched_variant.text_batch, rr_qps=batched_variant.reranker_qps,
                      rr_batch=batched_variant.reranker_alone_batch, rr_qps_b1=unbatched_variant.reranker_qps,
                      rr_batch_b1=unbatched_variant.reranker_alone_batch, forward_batch=forward_batch,
                      forward_single_s=forward_single_s, forward_batched_s=forward_batched_s,
                      default_rerank_batch=settings.serve.rerank_batch_size, version=version, collection=collection,
                      dim=int(model.embed_dim), build_s=build_s, deploy_s=deploy_s)
    print_results(args, results)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    png = args.out_dir / "serve.png"
    plot(png, results, args.n, args.recall_k,
         f"vidsearch serving, {args.n:,} videos, {args.preset}, recall_k={args.recall_k} "
         f"({facts['cpu_count']} cores, {facts['gpu'] or 'CPU only'})")
    write_markdown(args.out_dir / "serve.md", png.name, args, settings, facts, (load1, load5), results)
    raw = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "machine": facts,
           "overhead": results.overhead, **asdict(results)}
    (common.CACHE_DIR / "results").mkdir(parents=True, exist_ok=True)
    (common.CACHE_DIR / "results" / "serve.json").write_text(json.dumps(raw, indent=1, default=str))
    print(f"wrote {args.out_dir / 'serve.md'} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
