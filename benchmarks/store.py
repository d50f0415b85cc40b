"""The embedded store's envelope: recall latency, upsert rate, memory and reopen time
against the point count, for qdrant-client local mode (the embedded default) and
qdrant-edge side by side on the same points.

Each engine's store lives in its own writer process (as the embedded store lives in one
Ray actor) and grows through the sizes (default 1k, 5k, 10k, 20k, 50k points of the
production layout: ``video`` [512] plus ``frames`` [12, 512], realistic payloads),
written through the project's own store code (``VectorStore`` over ``QdrantStore`` with
``QdrantClient(path=...)``; for qdrant-edge the adapter in ``store_edge.py`` behind the
same ``VectorStore``). At each size it measures:

- upsert rate (points/s) of the points added since the previous size, in
  ``store.upsert_batch`` requests (plus, for qdrant-edge, the blocking HNSW build);
- recall query latency p50/p95 (``store.query``, recall_k=50): without frames, with
  frames, and with frames plus a payload filter; recall@50 against an exact numpy search;
- the writer's resident memory (VmRSS) and disk size;
- reopen: a fresh process opens a copy of the store directory, as a restarted store
  actor would: open time, its RSS and peak RSS, and query latency after the reopen.

Memory is watched as it goes: a process above ``--mem-limit-gib`` is killed, and a size
whose predicted memory (from the previous sizes) is above it is not attempted. Raw
results are written after every step (store.json), so a cut run still leaves data.

    python benchmarks/store.py            # 1k .. 50k points; docs/benchmarks/store.md, store.png, store.json
    python benchmarks/store.py --quick    # 500 and 2,000 points, under .bench/results
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import common

common.isolate_environment()

import numpy as np  # noqa: E402

from vidsearch.config import BrokerSettings, StoreSettings  # noqa: E402
from vidsearch.store import Match, VectorStore, VideoPoint, _DirectBackend, build_payload  # noqa: E402

import store_edge  # noqa: E402

ENGINES = ("local", "edge")
ENGINE_LABEL = {"local": "qdrant-client local mode (embedded default)", "edge": "qdrant-edge (adapter)"}
COLLECTION = "videos__bench"
FRAMES = 12
CHUNK = 1000  # points generated at a time
POLL_BATCH = BrokerSettings().max_poll_records  # videos per store.upsert call, as the ingest worker makes them
QUERY_MODES = ("no_frames", "frames", "filtered_frames")
MODE_LABEL = {"no_frames": "no frames", "frames": "with frames", "filtered_frames": "filter + frames"}
CATEGORIES = ("sports", "news", "music", "nature")
GIB = 2**30
# What "serves" means for the envelope: the recall stage stays small next to a request's
# other stages (serve.md: text encode ~120 ms, re-rank ~430 ms on this CPU), a restarted
# store actor comes back within a minute, and it fits the memory limit of the run. Both
# times are CPU time, which other jobs on a shared machine inflate far less than wall time.
SERVE_P95_MS = 100.0
SERVE_REOPEN_S = 60.0


# ============================================================================ data
def _block_rows(start: int, stop: int, shape: tuple[int, ...], seed: int, stream: int) -> np.ndarray:
    """Rows [start, stop) of an endless random array made of CHUNK-row blocks, so a point's
    vectors do not depend on how a run splits the writes."""
    parts = []
    for block in range(start // CHUNK, (stop - 1) // CHUNK + 1):
        rows = np.random.default_rng([seed, block, stream]).standard_normal((CHUNK, *shape)).astype(np.float32)
        lo, hi = max(start, block * CHUNK) - block * CHUNK, min(stop, (block + 1) * CHUNK) - block * CHUNK
        parts.append(rows[lo:hi])
    x = np.concatenate(parts)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def video_vectors(start: int, stop: int, dim: int, seed: int) -> np.ndarray:
    """The ``video`` vectors of points [start, stop): deterministic, and apart from the
    frames' stream so the parent can compute exact answers without the frames."""
    return _block_rows(start, stop, (dim,), seed, 0)


def frame_vectors(start: int, stop: int, dim: int, seed: int) -> np.ndarray:
    return _block_rows(start, stop, (FRAMES, dim), seed, 1)


def chunks(start: int, stop: int) -> list[tuple[int, int]]:
    """[start, stop) in CHUNK pieces aligned to CHUNK, so every engine sees the same vectors."""
    out, at = [], start
    while at < stop:
        end = min(stop, (at // CHUNK + 1) * CHUNK)
        out.append((at, end))
        at = end
    return out


def make_points(start: int, stop: int, dim: int, seed: int) -> list[VideoPoint]:
    videos, frames = video_vectors(start, stop, dim, seed), frame_vectors(start, stop, dim, seed)
    stamps = [(k + 0.5) * 30.0 / FRAMES for k in range(FRAMES)]
    points = []
    for i in range(start, stop):
        video_id = f"bench-{i:06d}"
        metadata = {"title": f"benchmark video {i}", "tags": ["bench", f"group-{i % 7}"],
                    "category": CATEGORIES[i % len(CATEGORIES)]}
        payload = build_payload(video_id, f"file:///bench/videos/{video_id}.mp4", metadata, stamps, 30.0,
                                "bench-encoder", "bench")
        points.append(VideoPoint(video_id, videos[i - start], frames[i - start], payload))
    return points


def query_vectors(count: int, dim: int, seed: int) -> np.ndarray:
    # Random directions: the hardest case for an approximate index (no clusters to exploit).
    x = np.random.default_rng([seed, 1 << 30]).standard_normal((count, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def exact_top(n: int, queries: np.ndarray, k: int, dim: int, seed: int) -> list[set[str]]:
    """The true top-k video ids of each query over points [0, n) (cosine, numpy)."""
    scores = np.concatenate([video_vectors(a, b, dim, seed) @ queries.T for a, b in chunks(0, n)])
    top = np.argsort(-scores, axis=0)[:k].T
    return [{f"bench-{i:06d}" for i in row} for row in top]


# ============================================================================ engines (child processes)
def memory() -> dict[str, int]:
    """This process's VmRSS, VmHWM (peak) and RssAnon (RSS not backed by files), bytes."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon"):
            values[key] = int(rest.split()[0]) * 1024
    return {"rss": values["VmRSS"], "peak": values["VmHWM"], "anon": values.get("RssAnon", 0)}


def open_engine(engine: str, path: str, settings: StoreSettings) -> tuple[VectorStore, Any]:
    """The store API over one engine: (VectorStore, the engine core)."""
    if engine == "local":
        from qdrant_client import QdrantClient

        store = VectorStore.in_process(QdrantClient(path=path), settings)
        return store, store._backend.core
    core = store_edge.EdgeStore(path, settings)
    return VectorStore(_DirectBackend(core), settings, location=f"edge:{path}"), core


def time_queries(store: VectorStore, queries: np.ndarray, k: int,
                 modes: tuple[str, ...] = QUERY_MODES) -> dict[str, Any]:
    """Wall and CPU milliseconds per query mode (``<mode>`` and ``<mode>_cpu``), and the
    ids the unfiltered query with frames (what recall for re-ranking asks) returned."""
    warm = min(2, len(queries))
    for q in queries[:warm]:
        store.query(COLLECTION, q, k, with_frames=True)
    out: dict[str, Any] = {key: [] for mode in modes for key in (mode, mode + "_cpu")}
    out["ids"] = []
    # Round-robin over modes, so that a change in background load hits all of them alike.
    for q in queries:
        for mode in modes:
            filters = [Match("category", "news")] if mode == "filtered_frames" else None
            # CPU time of the whole process (all its threads): what the query costs
            # whatever else the machine runs; wall time is what the caller waited.
            cpu, started = time.process_time(), time.perf_counter()
            hits = store.query(COLLECTION, q, k, filters=filters, with_frames=mode != "no_frames")
            out[mode].append((time.perf_counter() - started) * 1000)
            out[mode + "_cpu"].append((time.process_time() - cpu) * 1000)
            if mode == "frames":
                out["ids"].append([h.video_id for h in hits])
            elif mode == "filtered_frames" and any(h.payload["metadata"]["category"] != "news" for h in hits):
                raise RuntimeError("the filtered query returned a point outside the filter")
    return out


# qdrant-edge's accuracy against its cost: search-time settings measured besides the default.
EDGE_SEARCH = (("hnsw_ef=128", 128, False), ("hnsw_ef=512", 512, False), ("exact", None, True))


def edge_search_variants(store: VectorStore, core: Any, queries: np.ndarray, k: int) -> dict[str, Any]:
    out = {}
    for name, ef, exact in EDGE_SEARCH:
        core.hnsw_ef, core.exact = ef, exact
        try:
            out[name] = time_queries(store, queries, k, modes=("frames",))
        finally:
            core.hnsw_ef, core.exact = None, False
    return out


def dir_bytes(path: str) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass  # the engine removed it (a compacted segment) while we walked
    return total


def writer_main(engine: str, path: str, dim: int, seed: int, conn: Any) -> None:
    """The engine's store process: grows, answers queries and snapshots on command."""
    warnings.filterwarnings("ignore", message="Local mode is not recommended")
    settings = StoreSettings(path=path)
    base = memory()
    store, core = open_engine(engine, path, settings)
    store.ensure_collection(COLLECTION, dim, dim)
    conn.send({"ok": True, "memory": base})
    while True:
        command, arg = conn.recv()
        try:
            if command == "grow":
                start, stop = arg
                write_s = 0.0
                for a, b in chunks(start, stop):
                    points = make_points(a, b, dim, seed)  # generation is not timed
                    # As the ingest worker writes: one store.upsert per poll batch (it splits
                    # that into store.upsert_batch requests, then trims stale segments).
                    for at in range(0, len(points), POLL_BATCH):
                        t = time.perf_counter()
                        store.upsert(COLLECTION, points[at:at + POLL_BATCH])
                        write_s += time.perf_counter() - t
                    del points
                index_s = 0.0
                if engine == "edge":
                    t = time.perf_counter()
                    core.optimize(COLLECTION)
                    core.flush()
                    index_s = time.perf_counter() - t
                count = store.count(COLLECTION)
                if count != stop:
                    raise RuntimeError(f"{engine} holds {count} points after growing to {stop}")
                conn.send({"ok": True, "write_s": write_s, "index_s": index_s, "memory": memory(),
                           "disk": dir_bytes(path)})
            elif command == "query":
                queries, k = arg
                timed = time_queries(store, queries, k)
                variants = edge_search_variants(store, core, queries, k) if engine == "edge" else {}
                conn.send({"ok": True, **timed, "variants": variants, "memory": memory()})
            elif command == "snapshot":
                if engine == "edge":
                    core.flush()
                t = time.perf_counter()
                shutil.copytree(path, arg)
                conn.send({"ok": True, "copy_s": time.perf_counter() - t})
            elif command == "close":
                t = time.perf_counter()
                store.close()  # closes the engine's client or shards too
                conn.send({"ok": True, "close_s": time.perf_counter() - t})
                return
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which records it
            conn.send({"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]})


def probe_main(engine: str, path: str, queries: np.ndarray, k: int, conn: Any) -> None:
    """A restarted store: open a copy of the directory in a fresh process, then query it."""
    warnings.filterwarnings("ignore", message="Local mode is not recommended")
    try:
        base = memory()
        cpu, started = time.process_time(), time.perf_counter()
        store, _core = open_engine(engine, path, StoreSettings(path=path))
        count = store.count(COLLECTION)  # the first answer: the store is usable
        open_s, open_cpu_s = time.perf_counter() - started, time.process_time() - cpu
        opened = memory()
        lat = time_queries(store, queries, k)
        started = time.perf_counter()
        store.close()
        conn.send({"ok": True, "open_s": open_s, "open_cpu_s": open_cpu_s, "close_s": time.perf_counter() - started, "count": count,
                   "base": base, "opened": opened, "after_queries": memory(),
                   **{key: lat[key] for mode in QUERY_MODES for key in (mode, mode + "_cpu")}})
    except Exception as exc:  # noqa: BLE001
        conn.send({"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]})


# ============================================================================ parent side
class Watched:
    """A child process, killed when its RSS passes the limit (checked every 0.2 s)."""

    def __init__(self, target: Any, args: tuple, limit: int) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=target, args=(*args, child), daemon=True)
        self.proc.start()
        child.close()
        self.limit = limit
        self.max_rss = 0
        self.killed_at: int | None = None
        self._stop = threading.Event()
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            mem = common.proc_memory(self.proc.pid)
            if mem is None:
                return
            self.max_rss = max(self.max_rss, mem.rss)
            if mem.rss > self.limit:
                self.killed_at = mem.rss
                self.proc.kill()
                return

    def ask(self, command: str | None = None, arg: Any = None, timeout: float = 3600) -> dict[str, Any]:
        if command is not None:
            self.conn.send((command, arg))
        try:
            if not self.conn.poll(timeout):
                raise TimeoutError(f"no answer within {timeout:.0f}s")
            reply = self.conn.recv()
        except (EOFError, OSError, TimeoutError) as exc:
            self.proc.kill()
            if self.killed_at is not None:
                return {"ok": False, "error": f"killed at {self.killed_at / GIB:.2f} GiB RSS (limit "
                                              f"{self.limit / GIB:.1f} GiB)", "killed": True}
            return {"ok": False, "error": f"process ended: {type(exc).__name__}: {exc}"}
        return reply

    def end(self) -> None:
        self._stop.set()
        self.proc.join(timeout=30)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def recall(truth: list[set[str]], answers: list[list[str]], k: int) -> float:
    """Mean share of the exact top k that an engine's answer holds."""
    return float(np.mean([len(truth[i] & set(ids)) / k for i, ids in enumerate(answers)]))


def lat_stats(values: list[float]) -> dict[str, float]:
    return {"p50": common.percentile(values, 50), "p95": common.percentile(values, 95)}


class Run:
    """Raw results, rewritten to store.json after every step."""

    def __init__(self, path: Path, args: argparse.Namespace, facts: dict[str, Any]) -> None:
        self.path = path
        self.data: dict[str, Any] = {
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "machine": facts, "edge_version": store_edge.edge_version(), "gaps": store_edge.GAPS,
            "engines": {e: {"sizes": {}, "stopped": None} for e in args.engines}, "events": [],
            "complete": False,
        }

    def size(self, engine: str, n: int) -> dict[str, Any]:
        return self.data["engines"][engine]["sizes"].setdefault(str(n), {"points": n})

    def event(self, text: str) -> None:
        print("    " + text, flush=True)
        self.data["events"].append(text)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)


def run_benchmark(args: argparse.Namespace, run: Run) -> None:
    limit = int(args.mem_limit_gib * GIB)
    work = common.CACHE_DIR / f"store-run-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    queries = query_vectors(args.queries, args.dim, args.seed)
    started = time.monotonic()
    writers: dict[str, Watched] = {}
    try:
        for engine in args.engines:
            writers[engine] = Watched(writer_main, (engine, str(work / engine), args.dim, args.seed), limit)
            reply = writers[engine].ask(timeout=600)
            if not reply["ok"]:
                raise RuntimeError(f"{engine}: {reply['error']}")
            run.data["engines"][engine]["base_memory"] = reply["memory"]
        previous = 0
        probe_slope: dict[str, float] = {}
        for n in args.sizes:
            print(f"{n:,} points ...", flush=True)
            truth = exact_top(n, queries, args.recall_k, args.dim, args.seed)
            for engine in args.engines:
                state = run.data["engines"][engine]
                if state["stopped"]:
                    continue
                why = growth_refusal(run, engine, previous, n, limit, args.budget_s - (time.monotonic() - started))
                if why:
                    state["stopped"] = why
                    run.event(f"{engine}: not growing to {n:,}: {why}")
                    continue
                reply = writers[engine].ask("grow", (previous, n))
                if not reply["ok"]:
                    state["stopped"] = f"growing to {n:,} failed: {reply['error']}"
                    run.event(f"{engine}: {state['stopped']}")
                    continue
                row = run.size(engine, n)
                added = n - previous
                row.update(added=added, write_s=reply["write_s"], index_s=reply["index_s"],
                           upsert_rate=added / reply["write_s"],
                           ingest_rate=added / (reply["write_s"] + reply["index_s"]),
                           writer_memory=reply["memory"], disk=reply["disk"])
                reply = writers[engine].ask("query", (queries, args.recall_k))
                if not reply["ok"]:
                    state["stopped"] = f"queries at {n:,} failed: {reply['error']}"
                    run.event(f"{engine}: {state['stopped']}")
                    continue
                row["query"] = {mode: lat_stats(reply[mode]) for mode in QUERY_MODES}
                row["query_cpu"] = {mode: lat_stats(reply[mode + "_cpu"]) for mode in QUERY_MODES}
                row["query_raw"] = {mode: reply[mode] for mode in QUERY_MODES}
                row["recall"] = recall(truth, reply["ids"], args.recall_k)
                row["search_variants"] = {
                    name: {"query": lat_stats(v["frames"]), "query_cpu": lat_stats(v["frames_cpu"]),
                           "recall": recall(truth, v["ids"], args.recall_k)}
                    for name, v in reply["variants"].items()}
                row["writer_memory"] = reply["memory"]
                print(f"  {engine}: {row['upsert_rate']:.0f} points/s written"
                      + (f" (+{row['index_s']:.1f}s index build)" if row["index_s"] else "")
                      + f", query p50 {row['query']['no_frames']['p50']:.1f} ms / with frames "
                        f"{row['query']['frames']['p50']:.1f} ms, recall@{args.recall_k} {row['recall']:.3f}, "
                        f"RSS {common.mib(row['writer_memory']['rss']):.0f} MiB", flush=True)
                run.save()
                reopen(args, run, writers[engine], engine, n, work, queries, limit, probe_slope)
                run.save()
            previous = n
        for engine, writer in writers.items():
            if writer.proc.is_alive():
                writer.ask("close", timeout=600)
    finally:
        for writer in writers.values():
            writer.end()
        shutil.rmtree(work, ignore_errors=True)
    run.data["elapsed_s"] = time.monotonic() - started


def growth_refusal(run: Run, engine: str, previous: int, n: int, limit: int, budget_left: float) -> str | None:
    """Why growing ``engine`` from ``previous`` to ``n`` points is not attempted, or None."""
    rows = [run.data["engines"][engine]["sizes"][k] for k in sorted(run.data["engines"][engine]["sizes"], key=int)]
    if not rows:
        return None
    last = rows[-1]
    base = run.data["engines"][engine]["base_memory"]["rss"]
    slope = (last["writer_memory"]["rss"] - base) / last["points"]
    predicted = last["writer_memory"]["rss"] + slope * (n - previous)
    if predicted > limit:
        return f"predicted writer RSS {predicted / GIB:.1f} GiB > limit {limit / GIB:.1f} GiB"
    # Time for the new points at the last rate; qdrant-edge's index build grows with the whole store.
    seconds = (n - previous) / last["upsert_rate"] + last["index_s"] * n / last["points"]
    if seconds > budget_left:
        return f"predicted {seconds:.0f}s of writing > {budget_left:.0f}s left of --budget-s"
    return None


def reopen(args: argparse.Namespace, run: Run, writer: Watched, engine: str, n: int, work: Path,
           queries: np.ndarray, limit: int, probe_slope: dict[str, float]) -> None:
    """Open a copy of the store in a fresh process (a restarted store actor) and query it."""
    row = run.size(engine, n)
    if engine in probe_slope:
        predicted = probe_slope[engine + ":base"] + probe_slope[engine] * n
        room = mem_available() - 1.5 * GIB
        if predicted > min(limit, room):
            row["reopen"] = {"skipped": f"predicted peak RSS {predicted / GIB:.1f} GiB > "
                                        + (f"limit {limit / GIB:.1f} GiB" if predicted > limit else
                                           f"memory available now minus 1.5 GiB ({room / GIB:.1f} GiB)")}
            run.event(f"{engine}: reopen at {n:,} skipped: {row['reopen']['skipped']}")
            return
    copy = work / f"{engine}-copy"
    reply = writer.ask("snapshot", str(copy))
    if not reply["ok"]:
        row["reopen"] = {"error": reply["error"]}
        return
    probe = Watched(probe_main, (engine, str(copy), queries[: args.reopen_queries], args.recall_k), limit)
    try:
        reply = probe.ask(timeout=1200)
    finally:
        probe.end()
        shutil.rmtree(copy, ignore_errors=True)
    if not reply["ok"]:
        row["reopen"] = {"error": reply["error"], "max_rss_seen": probe.max_rss}
        run.event(f"{engine}: reopen at {n:,} failed: {reply['error']}")
        return
    row["reopen"] = {"open_s": reply["open_s"], "open_cpu_s": reply["open_cpu_s"], "close_s": reply["close_s"],
                     "base": reply["base"], "opened": reply["opened"], "after_queries": reply["after_queries"],
                     "query": {mode: lat_stats(reply[mode]) for mode in QUERY_MODES},
                     "query_cpu": {mode: lat_stats(reply[mode + "_cpu"]) for mode in QUERY_MODES}}
    probe_slope[engine + ":base"] = reply["base"]["rss"]
    probe_slope[engine] = max(0.0, (reply["opened"]["peak"] - reply["base"]["rss"]) / n)
    print(f"  {engine}: reopened in {reply['open_s']:.2f}s, RSS {common.mib(reply['opened']['rss']):.0f} MiB "
          f"(peak {common.mib(reply['opened']['peak']):.0f} MiB)", flush=True)


# ============================================================================ report
def rows_of(data: dict[str, Any], engine: str) -> list[dict[str, Any]]:
    sizes = data["engines"].get(engine, {}).get("sizes", {})
    return [sizes[k] for k in sorted(sizes, key=int) if "query" in sizes[k]]


def opened(row: dict[str, Any]) -> dict[str, Any] | None:
    r = row.get("reopen") or {}
    return r if "open_s" in r else None


def frames_cpu_p95(row: dict[str, Any]) -> float:
    return row.get("query_cpu", row["query"])["frames"]["p95"]


def open_cpu_s(reopened: dict[str, Any]) -> float:
    return reopened.get("open_cpu_s", reopened["open_s"])


def serves(row: dict[str, Any], limit_gib: float) -> bool | None:
    """The envelope test for one size (None when the reopen was not measured)."""
    r = opened(row)
    if r is None:
        return None
    return (frames_cpu_p95(row) <= SERVE_P95_MS and open_cpu_s(r) <= SERVE_REOPEN_S
            and r["opened"]["peak"] <= limit_gib * GIB)


def envelope(data: dict[str, Any], engine: str) -> dict[str, Any]:
    """The largest measured size that serves, and the first one that does not (with why)."""
    limit_gib = float(data["args"]["mem_limit_gib"])
    best, first_fail = None, None
    for row in rows_of(data, engine):
        ok = serves(row, limit_gib)
        if ok:
            best = row
        elif first_fail is None:
            first_fail = row
    return {"serves_up_to": best, "first_beyond": first_fail}


def fmt_ratio(value: float) -> str:
    return f"{value:.0f}x" if value >= 10 else f"{value:.1f}x" if value >= 1 else f"{value:.2f}x"


def fmt_ms(stats: dict[str, float]) -> str:
    return f"{stats['p50']:.1f} / {stats['p95']:.1f}"


def reopen_cells(row: dict[str, Any]) -> tuple[str, str]:
    r = row.get("reopen") or {}
    if "open_s" in r:
        return f"{r['open_s']:.2f} ({open_cpu_s(r):.2f})", f"{common.mib(r['opened']['rss']):,.0f} ({common.mib(r['opened']['peak']):,.0f})"
    reason = r.get("skipped") or r.get("error") or "not run"
    return "-", f"not run: {reason}"


def results_table(data: dict[str, Any]) -> list[str]:
    k = data["args"]["recall_k"]
    rows = []
    for engine in data["engines"]:
        for row in rows_of(data, engine):
            q = row["query"]
            reopen_s, reopen_mem = reopen_cells(row)
            rows.append((engine, f"{row['points']:,}", f"{row['upsert_rate']:,.0f}",
                         f"{row['index_s']:.1f}" if engine == "edge" else "-", fmt_ms(q["no_frames"]),
                         fmt_ms(q["frames"]), fmt_ms(row.get("query_cpu", q)["frames"]),
                         fmt_ms(q["filtered_frames"]), f"{row['recall']:.3f}",
                         f"{common.mib(row['writer_memory']['rss']):,.0f} ({common.mib(row['writer_memory']['anon']):,.0f})",
                         f"{common.mib(row['disk']):,.0f}",
                         reopen_s, reopen_mem))
    return common.md_table(["engine", "points", "upsert points/s", "index build s", "query ms p50 / p95, no frames",
                            "with frames", "with frames, CPU ms", "filter + frames", f"recall@{k}", "writer RSS MiB (anon)", "disk MiB",
                            "reopen s (CPU s)", "RSS after reopen MiB (peak)"], rows)


def variants_table(data: dict[str, Any]) -> list[str]:
    """qdrant-edge's recall against its cost, per search setting."""
    k = data["args"]["recall_k"]
    rows = []
    for row in rows_of(data, "edge"):
        settings = {"default": {"query": row["query"]["frames"], "query_cpu": row.get("query_cpu", row["query"])["frames"],
                                "recall": row["recall"]}}
        settings.update({name: {"query": v["query"], "query_cpu": v["query_cpu"], "recall": v["recall"]}
                         for name, v in row.get("search_variants", {}).items()})
        for name, v in settings.items():
            rows.append((f"{row['points']:,}", name, f"{v['recall']:.3f}", fmt_ms(v["query"]), fmt_ms(v["query_cpu"])))
    return common.md_table(["points", "search setting", f"recall@{k}", "query ms p50 / p95, with frames",
                            "CPU ms p50 / p95"], rows)


def ratio_table(data: dict[str, Any]) -> list[str]:
    local = {r["points"]: r for r in rows_of(data, "local")}
    rows = []
    for edge in rows_of(data, "edge"):
        base = local.get(edge["points"])
        if base is None:
            continue
        lo, eo = opened(base), opened(edge)
        q, eq = base["query"], edge["query"]
        rows.append((f"{edge['points']:,}",
                     fmt_ratio(q["no_frames"]["p50"] / eq["no_frames"]["p50"]),
                     fmt_ratio(q["frames"]["p50"] / eq["frames"]["p50"]),
                     fmt_ratio(q["frames"]["p95"] / eq["frames"]["p95"]),
                     fmt_ratio(edge["upsert_rate"] / base["upsert_rate"]),
                     fmt_ratio(edge["ingest_rate"] / base["upsert_rate"]),
                     fmt_ratio(base["writer_memory"]["rss"] / edge["writer_memory"]["rss"]),
                     fmt_ratio(lo["open_s"] / eo["open_s"]) if lo and eo else "-",
                     fmt_ratio(lo["opened"]["peak"] / eo["opened"]["peak"]) if lo and eo else "-"))
    return common.md_table(["points", "query p50, no frames", "query p50, with frames", "query p95, with frames",
                            "upsert rate", "upsert rate incl. index build", "writer RSS", "reopen time",
                            "peak RSS at reopen"], rows)


def plot(path: Path, data: dict[str, Any], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"local": "#c44e52", "edge": "#4c72b0"}
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    (lat, rate), (mem, reo) = axes
    for engine in data["engines"]:
        rows = rows_of(data, engine)
        if not rows:
            continue
        x = [r["points"] for r in rows]
        c = colors.get(engine, "gray")
        for mode, style in (("no_frames", ":"), ("frames", "-"), ("filtered_frames", "--")):
            lat.plot(x, [r["query"][mode]["p50"] for r in rows], style, marker="o", color=c,
                     label=f"{engine}, {MODE_LABEL[mode]}")
        lat.plot(x, [frames_cpu_p95(r) for r in rows], "-", marker="^", color=c, alpha=0.35,
                 label=f"{engine}, with frames, CPU p95")
        rate.plot(x, [r["upsert_rate"] for r in rows], "-", marker="o", color=c, label=f"{engine}, writes")
        if engine == "edge":
            rate.plot(x, [r["ingest_rate"] for r in rows], "--", marker="o", color=c,
                      label=f"{engine}, writes + index build")
        mem.plot(x, [common.mib(r["writer_memory"]["rss"]) for r in rows], "-", marker="o", color=c,
                 label=f"{engine}, writer after writes")
        done = [r for r in rows if opened(r)]
        if done:
            mem.plot([r["points"] for r in done], [common.mib(opened(r)["opened"]["peak"]) for r in done], "--",
                     marker="s", color=c, label=f"{engine}, peak at reopen")
            reo.plot([r["points"] for r in done], [opened(r)["open_s"] for r in done], "-", marker="o", color=c,
                     label=f"{engine}, wall")
            reo.plot([r["points"] for r in done], [open_cpu_s(opened(r)) for r in done], "--", marker="o",
                     color=c, alpha=0.5, label=f"{engine}, CPU")
    lat.axhline(SERVE_P95_MS, color="gray", lw=0.8, ls="-.", label=f"{SERVE_P95_MS:.0f} ms (envelope, CPU p95)")
    mem.axhline(float(data["args"]["mem_limit_gib"]) * 1024, color="gray", lw=0.8, ls="-.", label="memory limit")
    reo.axhline(SERVE_REOPEN_S, color="gray", lw=0.8, ls="-.", label=f"{SERVE_REOPEN_S:.0f} s (envelope, CPU)")
    for ax, ylabel, name in ((lat, "ms (log)", f"recall query latency p50 (recall_k={data['args']['recall_k']})"),
                             (rate, "points / s (log)", "upsert rate"), (mem, "MiB (log)", "resident memory"),
                             (reo, "s (log)", "reopen: fresh process opens the store")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("points in the collection (log)")
        ax.set_ylabel(ylabel)
        ax.set_title(name)
        ax.legend(fontsize=7)
        ax.grid(True, which="major", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def envelope_lines(data: dict[str, Any]) -> list[str]:
    out = []
    limit_gib = float(data["args"]["mem_limit_gib"])
    for engine in data["engines"]:
        env = envelope(data, engine)
        best, fail = env["serves_up_to"], env["first_beyond"]
        text = f"- **{ENGINE_LABEL.get(engine, engine)}**: "
        if best is not None:
            r = opened(best)
            text += (f"serves up to **{best['points']:,} points** of those measured (query with frames p95 "
                     f"{frames_cpu_p95(best):.0f} ms CPU, {best['query']['frames']['p95']:.0f} ms wall; reopen "
                     f"{open_cpu_s(r):.1f} s CPU, {r['open_s']:.1f} s wall; peak RSS at reopen "
                     f"{r['opened']['peak'] / GIB:.2f} GiB)")
        else:
            text += "no measured size met all three conditions"
        if fail is not None:
            why = []
            if frames_cpu_p95(fail) > SERVE_P95_MS:
                why.append(f"query with frames p95 {frames_cpu_p95(fail):.0f} ms CPU")
            r = opened(fail)
            if r is None:
                why.append("reopen " + reopen_cells(fail)[1].removeprefix("not run: "))
            else:
                if open_cpu_s(r) > SERVE_REOPEN_S:
                    why.append(f"reopen {open_cpu_s(r):.0f} s CPU")
                if r["opened"]["peak"] > limit_gib * GIB:
                    why.append(f"peak RSS at reopen {r['opened']['peak'] / GIB:.1f} GiB")
            text += f"; at {fail['points']:,} points: " + ", ".join(why)
        stopped = data["engines"][engine].get("stopped")
        if stopped:
            text += f". Growth stopped: {stopped}"
        out.append(text + ".")
    return out


def analysis(data: dict[str, Any]) -> list[str]:
    out = []
    local, edge = rows_of(data, "local"), rows_of(data, "edge")
    if len(local) >= 2:
        a, b = local[0], local[-1]
        ca, cb = a.get("query_cpu", a["query"]), b.get("query_cpu", b["query"])
        growth = cb["frames"]["p50"] / ca["frames"]["p50"]
        out.append(f"- **Local mode searches by brute force**: from {a['points']:,} to {b['points']:,} points "
                   f"({b['points'] / a['points']:.0f}x) its query p50 with frames changes {growth:.1f}x in CPU "
                   f"({a['query']['frames']['p50']:.1f} to {b['query']['frames']['p50']:.1f} ms wall, "
                   f"{ca['frames']['p50']:.1f} to {cb['frames']['p50']:.1f} ms CPU), and without frames "
                   f"{cb['no_frames']['p50'] / ca['no_frames']['p50']:.1f}x (CPU): at these sizes scoring is a small "
                   "part of a query next to building its answer.")
        ra, rb = a["upsert_rate"], b["upsert_rate"]
        if ra > 2 * rb:
            out.append(f"- **Local mode's write rate falls with the store size**: {ra:.0f} points/s at {a['points']:,} "
                       f"points, {rb:.0f} at {b['points']:,}. Each `store.upsert` ends with `trim_segments`, a delete "
                       "by filter (one clause per video of the batch), and local mode evaluates a filter in Python "
                       "on every stored point, so each poll batch costs time in proportion to the store.")
        costs = {engine: [r.get("query_cpu", r["query"])["frames"]["p50"]
                          - r.get("query_cpu", r["query"])["no_frames"]["p50"] for r in rows_of(data, engine)]
                 for engine in data["engines"]}
        text = ("- **Returning frames** (CPU p50 with frames minus without, per size): "
                + "; ".join(f"{engine} " + ", ".join(f"{c:.0f}" for c in values) + " ms"
                            for engine, values in costs.items() if values)
                + ". The hits' 12x512 frames travel as Python lists of floats and become arrays again, whatever "
                  "the engine (local mode also deep-copies each hit's payload).")
        if any(c < 0 for c in costs.get("local", [])):
            text += (" Where the difference is negative, local mode's query without frames was the slower one: it "
                     "runs first in each round, after the filtered query; not explained by this run (Python's "
                     "garbage collector over the store's objects is a guess, not checked).")
        out.append(text)
        out.append(f"- **A payload filter** costs local mode most ({cb['filtered_frames']['p50']:.0f} ms CPU p50 "
                   f"with frames at {b['points']:,} points): it evaluates the filter "
                   "in Python on every point (its payload indexes are no-ops). qdrant-client itself warns above "
                   "20,000 points that local mode is not meant for that size.")
        done = [r for r in local if opened(r)]
        if done:
            r = done[-1]
            o = opened(r)
            per_point = (o["opened"]["peak"] - o["base"]["rss"]) / r["points"]
            after = (r["writer_memory"]["rss"] - data["engines"]["local"]["base_memory"]["rss"]) / r["points"]
            out.append(f"- **Reopening local mode is the binding limit.** Opening {r['points']:,} points takes "
                       f"{o['open_s']:.1f} s and peaks at {o['opened']['peak'] / GIB:.2f} GiB "
                       f"(~{per_point / 1024:.0f} KiB per point, against ~{after / 1024:.0f} KiB per point in the "
                       "process that wrote them): qdrant-client reads every pickled point back from SQLite and "
                       "builds the arrays from Python lists of floats, which the process keeps. A restarted store "
                       "actor pays this before it answers (`EMBEDDED_OPEN_TIMEOUT_S` in shared/store.py).")
    if edge:
        b = edge[-1]
        out.append(f"- **qdrant-edge** at {b['points']:,} points: query p50 {b['query']['no_frames']['p50']:.2f} ms "
                   f"without frames and {b['query']['frames']['p50']:.2f} ms with frames (HNSW on `video`), "
                   f"recall@{data['args']['recall_k']} {b['recall']:.3f} against an exact search (random "
                   f"vectors: the hard case for HNSW). Writing is {b['upsert_rate']:,.0f} points/s; the HNSW build that follows "
                   f"(`optimize()`, blocking) took {b['index_s']:.1f} s for the whole store.")
        variants = b.get("search_variants", {})
        if variants:
            best = max(variants.items(), key=lambda kv: kv[1]["recall"])
            out.append(f"- **HNSW accuracy.** At {b['points']:,} points the default search finds "
                       f"{b['recall']:.0%} of the exact top {data['args']['recall_k']}; "
                       + "; ".join(f"{name}: {v['recall']:.0%} at p50 {v['query']['p50']:.1f} ms "
                                   f"({v['query_cpu']['p50']:.1f} ms CPU)" for name, v in variants.items())
                       + f". A product backend would need a search setting like {best[0]}: the default loses "
                         "candidates the re-ranker would never see.")
    if data.get("edge_version") is None and "edge" in data["args"]["engines"]:
        out.append("- **qdrant-edge-py is not installed**, so only local mode was measured: "
                   "`.venv/bin/pip install -e '.[bench]'`.")
    return out


def verdict_lines(data: dict[str, Any]) -> list[str]:
    """Would qdrant-edge lift the envelope by an order of magnitude? The measured answer."""
    local, edge = rows_of(data, "local"), rows_of(data, "edge")
    if not local or not edge:
        return ["- Not measured: this run had only one engine."]
    env_local, env_edge = envelope(data, "local"), envelope(data, "edge")
    common_sizes = sorted({r["points"] for r in local} & {r["points"] for r in edge})
    out = []
    lo = env_local["serves_up_to"]["points"] if env_local["serves_up_to"] else None
    ed = env_edge["serves_up_to"]["points"] if env_edge["serves_up_to"] else None
    edge_max = edge[-1]["points"]
    if lo and ed:
        bound = "" if env_edge["first_beyond"] else " (it met the conditions at every size measured, so its own " \
                                                    "limit lies beyond)"
        out.append(f"- **Envelope**: local mode serves up to {lo:,} points, qdrant-edge up to {ed:,}{bound}: "
                   f"at least {ed / lo:.0f}x here.")
    if common_sizes:
        n = common_sizes[-1]
        a = next(r for r in local if r["points"] == n)
        b = next(r for r in edge if r["points"] == n)
        ca, cb = a.get("query_cpu", a["query"]), b.get("query_cpu", b["query"])
        parts = [f"query with frames {ca['frames']['p50'] / cb['frames']['p50']:.1f}x less CPU "
                 f"({ca['frames']['p50']:.1f} vs {cb['frames']['p50']:.1f} ms p50), without frames "
                 f"{ca['no_frames']['p50'] / cb['no_frames']['p50']:.0f}x, with a filter "
                 f"{ca['filtered_frames']['p50'] / cb['filtered_frames']['p50']:.0f}x",
                 f"writes {b['upsert_rate'] / a['upsert_rate']:.0f}x faster, "
                 f"{b['ingest_rate'] / a['upsert_rate']:.1f}x counting the HNSW build"]
        oa, ob = opened(a), opened(b)
        if oa and ob:
            parts.append(f"reopen {open_cpu_s(oa) / open_cpu_s(ob):.0f}x less CPU and "
                         f"{oa['opened']['peak'] / ob['opened']['peak']:.1f}x less peak memory")
        out.append(f"- **At {n:,} points** (the largest size both reached): " + "; ".join(parts) + ".")
    # The limit that binds local mode is memory at reopen: where would each engine reach the
    # memory limit, extrapolating linearly from its largest measured reopen?
    limit = float(data["args"]["mem_limit_gib"]) * GIB
    reach: dict[str, dict[str, float]] = {}
    for engine, rows in (("local", local), ("edge", edge)):
        done = [r for r in rows if opened(r)]
        if done:
            r = done[-1]
            o = opened(r)
            # Peak RSS, and RssAnon after the open: memory the kernel cannot drop (qdrant-edge's
            # mmapped vector files count in RSS, not in RssAnon).
            reach[engine] = {kind: (limit - o["base"][key]) / max(1.0, (o["opened"][field] - o["base"][key])
                                                                  / r["points"])
                             for kind, field, key in (("rss", "peak", "rss"), ("anon", "anon", "anon"))}
    lift = lift_anon = None
    if len(reach) == 2:
        # A straight line says little far past the sizes measured: cap it at 10x the largest.
        cap = 10 * max(r["points"] for r in local + edge)

        def shown(kind: str) -> tuple[str, float]:
            e, lo = reach["edge"][kind], reach["local"][kind]
            if e > cap:
                return f"beyond {cap:,} points (> {fmt_ratio(cap / lo)})", cap / lo
            return f"about {e:,.0f} points ({fmt_ratio(e / lo)})", e / lo

        rss_text, lift = shown("rss")
        anon_text, lift_anon = shown("anon")
        out.append(f"- **Memory at reopen** (what binds local mode), extrapolated linearly from the largest reopen "
                   f"each engine made: local mode reaches {limit / GIB:g} GiB of peak RSS at about "
                   f"{reach['local']['rss']:,.0f} points, qdrant-edge {rss_text}. Counting only memory the kernel "
                   "cannot drop (RssAnon; qdrant-edge keeps its vectors in mmapped files): local mode at about "
                   f"{reach['local']['anon']:,.0f} points, qdrant-edge {anon_text}.")
    default_recall = edge[-1]["recall"]
    variants = edge[-1].get("search_variants", {})
    good = [name for name, v in variants.items() if v["recall"] >= 0.95 and name != "exact"]
    if lift is not None and lift >= 10:
        text = "- **So: yes, on memory at reopen**, the limit that binds local mode"
    elif lift_anon is not None and lift_anon >= 10:
        text = ("- **So: on memory at reopen, the limit that binds local mode, yes if its mmapped files are left "
                f"to the page cache** ({fmt_ratio(lift_anon)} by RssAnon, {fmt_ratio(lift)} by RSS)")
    else:
        text = "- **So: not by an order of magnitude in this run**"
    pairs = [(a, b) for a in local for b in edge if a["points"] == b["points"]]
    text += (". Query with frames, local / edge CPU p50 by size: "
             + ", ".join(f"{fmt_ratio(a.get('query_cpu', a['query'])['frames']['p50'] / b.get('query_cpu', b['query'])['frames']['p50'])}"
                         f" at {a['points']:,}" for a, b in pairs)
             + ": carrying frames back as Python lists costs both engines about the same, which bounds the gain; "
               "writes alone: " + ", ".join(fmt_ratio(b["upsert_rate"] / a["upsert_rate"]) for a, b in pairs)
             + ", but counting qdrant-edge's blocking HNSW build only "
             + ", ".join(fmt_ratio(b["ingest_rate"] / a["upsert_rate"]) for a, b in pairs) + ".")
    if default_recall < 0.95:
        text += (f" But the default search found only {default_recall:.0%} of the exact top "
                 f"{data['args']['recall_k']} at {edge[-1]['points']:,} points: a backend would have to set "
                 + (f"a wider beam ({good[0]} reached {variants[good[0]]['recall']:.0%})" if good else
                    "a wider beam or exact search (see the recall table)") + ".")
    exact = variants.get("exact")
    default_cpu = edge[-1].get("query_cpu", edge[-1]["query"])["frames"]["p50"]
    if exact and exact["query_cpu"]["p50"] <= 1.5 * default_cpu:
        text += (f" At these sizes brute force is cheap in qdrant-edge: `exact=True` cost "
                 f"{exact['query_cpu']['p50']:.1f} ms CPU p50 with frames at {edge[-1]['points']:,} points against "
                 f"{default_cpu:.1f} ms for the default search, so a backend could search exactly and skip the "
                 "HNSW build (and its blocking `optimize()`) up to such sizes.")
    text += (" Aliases, collections and group-by would have to be built around it (below). The store was not "
             "switched; the way past the envelope today is a Qdrant server (`store.url`, README).")
    out.append(text)
    if edge_max and not env_edge["first_beyond"]:
        out.append(f"- qdrant-edge's own limit was not reached: {edge_max:,} points was the largest size this run "
                   "attempted for it.")
    return out


def write_markdown(path: Path, png_name: str, data: dict[str, Any]) -> None:
    args, facts = data["args"], data["machine"]
    quick = args.get("quick")
    lines = [
        "# Store benchmark: the embedded store's envelope",
        "",
        f"Generated by `{data.get('command', 'python benchmarks/store.py')}` (see `benchmarks/store.py`). Re-run it "
        "to refresh this page.",
        "",
        *(["**Quick mode** (`--quick`): a smoke test at small sizes; use the default run for numbers.", ""]
          if quick else []),
        *(["**This run did not finish**; the tables hold what it measured before it stopped.", ""]
          if not data.get("complete") else []),
        "## What is measured",
        f"- Points of the production layout, written through the project's store code: `video` [{args['dim']}] "
        f"and `frames` [{FRAMES}, {args['dim']}] random unit vectors, with the payload `build_payload` makes "
        "(title, tags, category). Local mode is `VectorStore.in_process(QdrantClient(path=...))`; qdrant-edge "
        "is `benchmarks/store_edge.py`'s `EdgeStore` behind the same `VectorStore`, with the same layout "
        "(`frames` MAX_SIM, no HNSW graph for them) and payload indexes.",
        "- Each engine's store lives in its own process, as the embedded store lives in one Ray actor, and grows "
        f"through the sizes {', '.join(f'{n:,}' for n in args['sizes'])}; the engines take turns at each size.",
        f"- **upsert points/s**: the points added since the previous size, written as the ingest worker writes "
        f"them: one `store.upsert` per poll batch (`broker.max_poll_records`, {POLL_BATCH}), which sends "
        f"`store.upsert_batch` ({StoreSettings().upsert_batch}) point requests, each acknowledged, and then trims "
        "stale segments (`trim_segments`, one delete by filter); generating the points is not timed. "
        "qdrant-edge builds its HNSW index only when told (`optimize()`, blocking): **index build s** is that "
        "call after each size's writes.",
        f"- **query**: `store.query(..., recall_k={args['recall_k']})` for {args['queries']} random query vectors, "
        "without frames, with frames (what recall for re-ranking asks), and with frames plus a payload filter "
        "(`category = news`, a quarter of the points), round-robin; wall time, and the CPU time of the whole "
        "store process (all its threads). **recall@k**: overlap of the unfiltered answer with an exact numpy "
        "search.",
        "- **writer RSS**: VmRSS of the writer process after the writes and queries, and in parentheses its "
        "RssAnon (memory not backed by files: qdrant-edge keeps its vectors in mmapped files, whose pages count in "
        "RSS but the kernel can drop); **disk**: the store directory.",
        f"- **reopen**: the store directory is copied and a fresh process opens the copy (as a restarted store "
        f"actor does: local mode loads every point), until the first `count` answers; then {args['reopen_queries']} "
        "queries. **RSS after reopen**: VmRSS then, and the peak (VmHWM) in parentheses.",
        f"- Memory safety: a process above {args['mem_limit_gib']:g} GiB RSS is killed, and a size or reopen whose "
        "memory, extrapolated from the smaller sizes, would pass that is not attempted (said below). Raw results: "
        "`store.json` next to this page, rewritten after every step.",
        "",
        "## Machine",
        *common.machine_section(facts, tuple(data.get("load_after", (float("nan"), float("nan"))))),
        "- Other helpers (a training run, other benchmarks and tests) shared the 2 cores and 24 GiB during the "
        "run, so wall times are inflated and noisy (CPU times much less); the growth with the point count and the "
        "ratio between the engines, measured side by side in the same run, are the point.",
        f"- qdrant-client {data.get('qdrant_client_version', '?')}, qdrant-edge-py "
        f"{data.get('edge_version') or 'not installed'}; run took {data.get('elapsed_s', float('nan')):.0f} s.",
        "",
        "## Results",
        *results_table(data),
        "",
        "### qdrant-edge: recall against cost",
        "The default search, and the same queries with a wider HNSW beam (`SearchParams(hnsw_ef=...)`) and "
        "by brute force (`exact=True`); recall against the exact numpy answer.",
        "",
        *variants_table(data),
        "",
        "### qdrant-edge against local mode (local / edge for times and memory, edge / local for rates)",
        *ratio_table(data),
        "",
        "## The envelope",
        f"A size *serves* when the recall query with frames costs under {SERVE_P95_MS:.0f} ms of CPU at p95 "
        "(small next to text encoding and re-ranking), a restarted store opens within "
        f"{SERVE_REOPEN_S:.0f} s of CPU, and its peak memory at reopen stays under {args['mem_limit_gib']:g} GiB. "
        "CPU time, not wall time, because other jobs shared this machine: local mode works on one thread, so on "
        "an idle core its wall time is about its CPU time.",
        "",
        *envelope_lines(data),
        "",
        "## Would qdrant-edge lift the envelope by an order of magnitude?",
        *verdict_lines(data),
        "",
        "## Reading the numbers",
        *analysis(data),
        *[f"- {e}" for e in data["events"]],
        "",
        "## What qdrant-edge can and cannot do for this store",
        *[f"- **{k}**: {v}" for k, v in data["gaps"].items()],
        "",
        f"![store benchmark]({png_name})",
    ]
    common.write_text(path, lines)


def print_summary(data: dict[str, Any]) -> None:
    print("\n=== store benchmark ===")
    print("\n".join(results_table(data)))
    print()
    print("\n".join(ratio_table(data)))
    print()
    print("\n".join(envelope_lines(data)))


def report(data: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / "store.png"
    facts = data["machine"]
    plot(png, data, f"vidsearch store envelope, {FRAMES}x{data['args']['dim']} frames per point "
                    f"({facts['cpu_count']} cores, shared machine)")
    write_markdown(out_dir / "store.md", png.name, data)
    print(f"wrote {out_dir / 'store.md'}, {png} and {out_dir / 'store.json'}")


# ============================================================================ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="500 and 2,000 points; results go to .bench/results unless --out-dir")
    parser.add_argument("--sizes", default=None, help="comma-separated point counts (default 1000,5000,10000,"
                                                      "20000,50000; --quick: 500,2000)")
    parser.add_argument("--engines", default="local,edge", help="comma-separated, of: local, edge")
    parser.add_argument("--dim", type=int, default=512, help="vector width (default 512: ViT-B/32)")
    parser.add_argument("--queries", type=int, default=None, help="query vectors per size (default 30; --quick 10)")
    parser.add_argument("--reopen-queries", type=int, default=None, help="queries after a reopen (default 10)")
    parser.add_argument("--recall-k", type=int, default=50, help="recall limit (serve.default_recall_k)")
    parser.add_argument("--mem-limit-gib", type=float, default=6.0, help="kill / do not attempt above this RSS")
    parser.add_argument("--budget-s", type=float, default=1080.0,
                        help="seconds of growth; a size that would not fit is not attempted (default 1080)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=None, help="where store.md / store.png / store.json go")
    parser.add_argument("--report-only", action="store_true",
                        help="redraw store.md and store.png from the store.json in --out-dir (e.g. of a cut run)")
    args = parser.parse_args(argv)
    sizes = args.sizes or ("500,2000" if args.quick else "1000,5000,10000,20000,50000")
    try:
        args.sizes = sorted({int(s) for s in sizes.split(",") if s.strip()})
    except ValueError:
        parser.error(f"--sizes must be comma-separated integers, got {sizes!r}")
    if not args.sizes or args.sizes[0] < 1:
        parser.error("--sizes needs positive point counts")
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if not args.engines or set(args.engines) - set(ENGINES):
        parser.error(f"--engines takes a comma-separated list of {', '.join(ENGINES)}")
    args.queries = args.queries or (10 if args.quick else 30)
    args.reopen_queries = min(args.queries, args.reopen_queries or 10)
    args.out_dir = args.out_dir or (common.CACHE_DIR / "results" if args.quick else common.DOCS_DIR)
    if not 1 <= args.recall_k <= args.sizes[0]:
        parser.error("need 1 <= --recall-k <= the smallest size")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    json_path = args.out_dir / "store.json"
    if args.report_only:
        if not json_path.exists():
            print(f"store benchmark: no {json_path} to report from", file=sys.stderr)
            return 2
        data = json.loads(json_path.read_text())
        print_summary(data)
        report(data, args.out_dir)
        return 0
    if "edge" in args.engines and store_edge.edge_version() is None:
        # Said here, in the output and in the report: the run goes on with local mode alone.
        print("store benchmark: qdrant-edge-py is not installed (.venv/bin/pip install -e '.[bench]'); "
              "measuring local mode only", file=sys.stderr)
        args.engines = [e for e in args.engines if e != "edge"]
        missing_edge = True
    else:
        missing_edge = False
    from importlib import metadata

    run = Run(json_path, args, common.machine_facts())
    run.data["command"] = common.command_line()
    run.data["qdrant_client_version"] = metadata.version("qdrant-client")
    if missing_edge:
        run.data["args"]["engines"] = [*args.engines, "edge"]
        run.event("qdrant-edge-py is not installed: only local mode was measured "
                  "(`.venv/bin/pip install -e '.[bench]'`)")
    run.save()
    try:
        run_benchmark(args, run)
        run.data["complete"] = True
    finally:
        load1, load5, _ = os.getloadavg()
        run.data["load_after"] = (load1, load5)
        run.save()
        if any(rows_of(run.data, e) for e in run.data["engines"]):
            print_summary(run.data)
            report(run.data, args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
